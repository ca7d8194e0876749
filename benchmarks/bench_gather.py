"""CPU throughput of multihead_gather and its backward ops against the pure-PyTorch formulations
(F.embedding / index_select over the concatenated table, embedding_dense_backward, index_add_,
unique + index_add_, sparse COO coalesce), as GB/s next to the measured copy bandwidth.

Bytes follow ENGRAM.md section 10: forward n*d_head*(b_table + b_out) + n*b_idx for n = tokens*H
lookups; backward reads the n gradient rows and indices and writes the touched rows (sparse) or
the whole [num_rows, d_head] gradient (dense). Sort traffic is not counted.

    PYTHONPATH=python python benchmarks/bench_gather.py               # demo layer, ~1 minute
    PYTHONPATH=python python benchmarks/bench_gather.py --rows 1000000 --tokens 4096
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import torch_engram  # noqa: F401
from torch_engram import ops


def bench(fn, iters):
    fn()  # warm-up (first touch of outputs, allocator)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def copy_bandwidth(nbytes=1 << 29, iters=5):
    x = torch.empty(nbytes // 4, dtype=torch.float32).fill_(1.0)
    t = bench(lambda: x.clone(), iters)
    return 2 * nbytes / t  # read + write


def row(name, seconds, nbytes, peak, ref_seconds=None):
    ratio = f"{seconds / ref_seconds:6.2f}x" if ref_seconds is not None else "   ours"
    print(f"  {name:<40s} {seconds * 1e3:9.2f} ms {nbytes / seconds / 1e9:8.2f} GB/s "
          f"{100 * nbytes / seconds / peak:6.1f}% copy   {ratio}")


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

    peak = copy_bandwidth()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; copy bandwidth (clone, read+write) "
          f"{peak / 1e9:.2f} GB/s")
    print(f"table [{R}, {d}] {args.dtype} = {R * d * b_w / 2**30:.2f} GiB, H = {H}; ratio = peer time / ours")
    table = torch.empty(R, d, dtype=dtype).uniform_(-1, 1)

    for tokens in args.tokens:
        n = tokens * H
        g = torch.Generator().manual_seed(tokens)
        # Hashed rows are close to uniform over the table; int64 as produced by ngram_hash.
        rows = torch.randint(0, R, (tokens, H), generator=g)
        flat = rows.reshape(-1)
        grad = torch.randn(tokens, H * d, generator=g).to(dtype)
        unique = torch.unique(flat).numel()
        print(f"\ntokens {tokens}: {n} lookups, {unique} unique rows")

        fwd_bytes = n * d * 2 * b_w + n * 8
        ours = bench(lambda: ops.multihead_gather(table, rows), args.iters)
        row("forward  multihead_gather", ours, fwd_bytes, peak)
        row("forward  F.embedding + view", bench(lambda: F.embedding(rows, table).view(tokens, H * d), args.iters),
            fwd_bytes, peak, ours)
        row("forward  index_select + view", bench(lambda: table.index_select(0, flat).view(tokens, H * d), args.iters),
            fwd_bytes, peak, ours)

        sparse_bytes = n * d * b_w + n * 8 + unique * (d * b_w + 8)
        ours = bench(lambda: ops.multihead_gather_backward_sparse(grad, rows), args.iters)
        row("sparse bwd  multihead_gather_backward_sparse", ours, sparse_bytes, peak)

        def unique_index_add():
            u, inv = torch.unique(flat, sorted=True, return_inverse=True)
            return u, torch.zeros(u.numel(), d, dtype=dtype).index_add_(0, inv, grad.view(-1, d))

        def coo_coalesce():  # F.embedding(sparse=True)'s gradient as SparseAdam consumes it
            return torch.sparse_coo_tensor(flat.unsqueeze(0), grad.view(-1, d), (R, d),
                                           check_invariants=False).coalesce()

        row("sparse bwd  unique + index_add_", bench(unique_index_add, args.iters), sparse_bytes, peak, ours)
        row("sparse bwd  sparse_coo_tensor.coalesce", bench(coo_coalesce, args.iters), sparse_bytes, peak, ours)

        if not args.skip_dense:
            dense_bytes = n * d * b_w + n * 8 + R * d * b_w
            ours = bench(lambda: ops.multihead_gather_backward(grad, rows, R), args.iters)
            row("dense bwd  multihead_gather_backward", ours, dense_bytes, peak)
            row("dense bwd  embedding_dense_backward",
                bench(lambda: torch.ops.aten.embedding_dense_backward(grad.view(tokens, H, d), rows, R, -1, False),
                      args.iters), dense_bytes, peak, ours)
            row("dense bwd  zeros + index_add_",
                bench(lambda: torch.zeros(R, d, dtype=dtype).index_add_(0, flat, grad.view(-1, d)), args.iters),
                dense_bytes, peak, ours)


if __name__ == "__main__":
    main()
