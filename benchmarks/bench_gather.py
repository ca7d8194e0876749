"""CPU throughput of multihead_gather and its backward ops against the pure-PyTorch formulations
(F.embedding / index_select over the concatenated table, embedding_dense_backward, index_add_,
unique + index_add_, sparse COO coalesce), as GB/s next to the measured copy bandwidth.

Bytes follow docs/SPEC.md section 10: forward n*d_head*(b_table + b_out) + n*b_idx for n = tokens*H
lookups; backward reads the n gradient rows and indices and writes the touched rows (sparse) or
the whole [num_rows, d_head] gradient (dense). Sort traffic is not counted.

Contenders of one comparison run round-robin and each keeps its best time, so load from other
processes hits them alike. Every op allocates a fresh output, so the copy reference is a clone
(which pays the same page faults); a copy_ into an existing buffer is printed as well.

    PYTHONPATH=python python benchmarks/bench_gather.py               # demo layer, ~1 minute
    PYTHONPATH=python python benchmarks/bench_gather.py --rows 1000000 --tokens 4096 --skip-dense
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

import torch_engram  # noqa: F401
from torch_engram import ops


def best_times(fns, iters, warmup=True):
    """Best wall time of each callable, measured round-robin."""
    if warmup:
        for f in fns.values():
            f()
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(iters):
        for name, f in fns.items():
            t0 = time.perf_counter()
            f()
            best[name] = min(best[name], time.perf_counter() - t0)
    return best


def copy_bandwidth(nbytes=1 << 29, iters=5):
    """(clone, copy_ into an existing buffer) in bytes/s, read + write."""
    x = torch.empty(nbytes // 4, dtype=torch.float32).fill_(1.0)
    y = torch.empty_like(x).fill_(0.0)
    t = best_times({"clone": lambda: x.clone(), "copy_": lambda: y.copy_(x)}, iters)
    return 2 * nbytes / t["clone"], 2 * nbytes / t["copy_"]


def report(title, times, nbytes, peak):
    """First entry is ours; the last column is peer time / our time (> 1: ours faster)."""
    ours = next(iter(times.values()))
    for i, (name, t) in enumerate(times.items()):
        ratio = "   ours" if i == 0 else f"{t / ours:6.2f}x"
        print(
            f"  {title:<10s} {name:<36s} {t * 1e3:9.2f} ms {nbytes / t / 1e9:7.2f} GB/s "
            f"{100 * nbytes / t / peak:6.1f}% of clone  {ratio}"
        )


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=10_344_164, help="table rows (demo layer 1: 10,344,164)")
    p.add_argument("--d-head", type=int, default=64)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384], help="B*T per call")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "float64"])
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--skip-dense", action="store_true", help="skip the dense backward (a full-table write)")
    args = p.parse_args()
    dtype = getattr(torch, args.dtype)
    R, d, H = args.rows, args.d_head, args.heads
    b_w = torch.empty(0, dtype=dtype).element_size()

    peak, stream = copy_bandwidth()
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; copy bandwidth (read+write): "
        f"clone {peak / 1e9:.2f} GB/s, copy_ into an existing buffer {stream / 1e9:.2f} GB/s"
    )
    print(
        f"table [{R}, {d}] {args.dtype} = {R * d * b_w / 2**30:.2f} GiB, H = {H}; "
        "last column: peer time / our time (> 1: ours faster)"
    )
    table = torch.empty(R, d, dtype=dtype).uniform_(-1, 1)

    for tokens in args.tokens:
        for dist in ("uniform", "zipf"):
            n = tokens * H
            g = torch.Generator().manual_seed(tokens)
            if dist == "uniform":  # distinct n-grams hash to uniformly spread rows
                rows = torch.randint(0, R, (tokens, H), generator=g)
            else:  # real text: frequent n-grams repeat (Zipf-like), so rows repeat within a batch
                ranks = (torch.rand(tokens, H, generator=g) ** 3 * (R // 100)).long()
                rows = (ranks * 7919) % R  # the frequent rows spread over the table
            flat = rows.reshape(-1)
            grad = torch.randn(tokens, H * d, generator=g).to(dtype)
            unique = torch.unique(flat).numel()
            print(f"\ntokens {tokens}, {dist} rows: {n} lookups, {unique} unique rows")

            fwd = best_times(
                {
                    "multihead_gather": lambda: ops.multihead_gather(table, rows),
                    "F.embedding + view": lambda: F.embedding(rows, table).view(tokens, H * d),
                    "index_select + view": lambda: table.index_select(0, flat).view(tokens, H * d),
                },
                args.iters,
            )
            report("forward", fwd, n * d * 2 * b_w + n * 8, peak)

            def unique_index_add():
                u, inv = torch.unique(flat, sorted=True, return_inverse=True)
                return u, torch.zeros(u.numel(), d, dtype=dtype).index_add_(0, inv, grad.view(-1, d))

            def coo_coalesce():  # F.embedding(sparse=True)'s gradient as SparseAdam consumes it
                return torch.sparse_coo_tensor(
                    flat.unsqueeze(0), grad.view(-1, d), (R, d), check_invariants=False
                ).coalesce()

            sparse = best_times(
                {
                    "multihead_gather_backward_sparse": lambda: ops.multihead_gather_backward_sparse(grad, rows),
                    "unique + index_add_": unique_index_add,
                    "sparse_coo_tensor.coalesce": coo_coalesce,
                },
                args.iters,
            )
            report("sparse bwd", sparse, n * d * b_w + n * 8 + unique * (d * b_w + 8), peak)

            if not args.skip_dense and dist == "uniform":
                # Every call writes a fresh [R, d_head] gradient (GiBs): no warm-up, fewer repeats.
                dense = best_times(
                    {
                        "multihead_gather_backward": lambda: ops.multihead_gather_backward(grad, rows, R),
                        "embedding_dense_backward": lambda: torch.ops.aten.embedding_dense_backward(
                            grad.view(tokens, H, d), rows, R, -1, False
                        ),
                        "zeros + index_add_": lambda: torch.zeros(R, d, dtype=dtype).index_add_(
                            0, flat, grad.view(-1, d)
                        ),
                    },
                    max(1, args.iters - 1),
                    warmup=False,
                )
                report("dense bwd", dense, n * d * b_w + n * 8 + R * d * b_w, peak)


if __name__ == "__main__":
    main()
