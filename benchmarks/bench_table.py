"""CPU training step of one Engram table (forward gather + backward + optimizer update, nothing else)
against FBGEMM's table-batched embedding and nn.Embedding(sparse=True) + SparseAdam, side by side.

One step looks up tokens x H rows, back-propagates a fixed upstream gradient and updates the table
(ours: grad="fused", the update runs inside backward; FBGEMM: its fused optimizers, also inside
backward; torch: sparse .grad then SparseAdam.step()). Rows are drawn uniformly or Zipf(a)-distributed
(hot ranks scattered over the table by a bijective hash), seeded. Each configuration runs in its own
process so that thread settings and RSS are clean. Reported: median step time after warm-up,
lookups/s, speedup of ours over each peer (peer time / time of our matching optimizer, same run),
peak RSS, and the optimizer state bytes per row measured from RSS (eager state, fully written)
next to `state_bytes_per_row`.

FBGEMM runs twice: "fbgemm-none" (PoolingMode.NONE, its nobag lookup) and "fbgemm-sum1" (SUM
pooling over bags of one index: the same step through its pooled CPU kernels, which are faster).
Its rowwise Adagrad and SGD match ours bit for bit or to rounding (a small check runs each time).

Tables: the demo layer (10,344,164 x 64 float32) and, with --big, 100M x 64 bfloat16 (state
allocated on touch; configurations whose memory would not fit are skipped and say why). FBGEMM's
CPU kernels take no bfloat16 weights (1.9.0), so its 100M table is float16, the same bytes per row.

    pip install fbgemm-gpu-cpu   # benchmark-only peer; skipped with the import error if absent
    python benchmarks/bench_table.py [--threads 1,2] [--tokens 4096] [--heads 16] [--big] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))

from torch_engram import EngramTable
from torch_engram.table import OPTIMIZERS, state_bytes_per_row

# (rows, d_head, dtype, our state_alloc): eager at demo size, as FBGEMM's and torch's states are;
# on touch at 100M, where a full Adam state (52 GB) could not be allocated.
SIZES = {"demo": (10_344_164, 64, torch.float32, "eager"), "100M": (100_000_000, 64, torch.bfloat16, "on_touch")}
FBGEMM_OPTS = ("EXACT_ROWWISE_ADAGRAD", "EXACT_ADAGRAD", "EXACT_SGD")
# FBGEMM (or torch) optimizer -> ours with the same update; EXACT_ADAGRAD (full [R, D] accumulator)
# has no counterpart and is a reference row. SparseAdam's bias correction is global, ours per row.
MATCH = {"EXACT_ROWWISE_ADAGRAD": "rowwise_adagrad", "EXACT_SGD": "sgd", "SparseAdam": "adam"}
DISTS = ("uniform", "zipf")
LR = 0.01
PAGE = 4096


def rss_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def lookup_rows(dist: str, num_rows: int, n: int, zipf_a: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if dist == "uniform":
        return rng.integers(0, num_rows, n, dtype=np.int64)
    ranks = np.empty(0, dtype=np.int64)
    while ranks.size < n:  # truncated Zipf: redraw the ranks beyond the table
        z = rng.zipf(zipf_a, 2 * n)
        ranks = np.concatenate([ranks, z[z <= num_rows] - 1])
    # The hottest ranks would otherwise be adjacent rows sharing cache lines; a multiplicative hash
    # by a prime (coprime to num_rows) scatters them as hashed n-grams are.
    return (ranks[:n] * 2654435761) % num_rows


def fbgemm_precision(SparseType, build):
    """bfloat16 weights where FBGEMM's CPU kernels take them, else float16 (same bytes per row)."""
    try:
        m = build(64, SparseType.BF16)
        m(torch.zeros(1, dtype=torch.int64), torch.arange(2))
        return SparseType.BF16
    except (NotImplementedError, RuntimeError):
        return SparseType.FP16


def make_step(impl: str, opt: str, size: str, rows: torch.Tensor):
    """(step function, gradient dtype, state_alloc) of one implementation; `rows` is refilled in place."""
    R, D, dtype, alloc = SIZES[size]
    if impl == "ours":
        t = EngramTable(R, D, grad="fused", optimizer=opt, lr=LR, dtype=dtype, state_alloc=alloc)
        return (lambda g: t(rows).backward(g)), dtype, alloc
    if impl == "torch":
        emb = torch.nn.Embedding(R, D, sparse=True, dtype=dtype)
        sparse_adam = torch.optim.SparseAdam(emb.parameters(), lr=LR)

        def step(g):
            sparse_adam.zero_grad(set_to_none=True)
            emb(rows).backward(g.view(*rows.shape, D))
            sparse_adam.step()

        return step, dtype, "eager"
    from fbgemm_gpu.split_embedding_configs import EmbOptimType, SparseType
    from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation, PoolingMode
    from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
        ComputeDevice,
        SplitTableBatchedEmbeddingBagsCodegen,
    )

    # "none": nobag lookups (PoolingMode.NONE); "sum1": SUM pooling over bags of one index, the
    # same maths through FBGEMM's pooled CPU kernels.
    pooling = PoolingMode.NONE if impl == "fbgemm-none" else PoolingMode.SUM

    def build(rows_, prec):
        return SplitTableBatchedEmbeddingBagsCodegen(
            [(rows_, D, EmbeddingLocation.HOST, ComputeDevice.CPU)],
            optimizer=EmbOptimType[opt],
            pooling_mode=pooling,
            learning_rate=LR,
            eps=1e-8,
            weights_precision=prec,
            output_dtype=prec,
        )

    prec = SparseType.FP32 if dtype == torch.float32 else fbgemm_precision(SparseType, build)
    m = build(R, prec)
    with torch.no_grad():  # its weights start as zeros; write them so the table is resident, as ours
        m.split_embedding_weights()[0].normal_()
    flat = rows.view(-1)
    offsets = torch.arange(flat.numel() + 1, dtype=torch.int64)
    return (lambda g: m(flat, offsets).backward(g.view(-1, D))), prec.as_dtype(), "eager"


def run_one(a: argparse.Namespace) -> dict:
    torch.set_num_threads(a.threads)
    R, D = SIZES[a.size][:2]
    rows = torch.zeros(a.tokens, a.heads, dtype=torch.int64)
    step, gdtype, alloc = make_step(a.impl, a.opt, a.size, rows)
    grad = torch.randn(a.tokens, a.heads * D, generator=torch.Generator().manual_seed(1)).to(gdtype)
    out = {
        "impl": a.impl,
        "opt": a.opt,
        "size": a.size,
        "threads": a.threads,
        "state_alloc": alloc,
        "dtype": str(gdtype).removeprefix("torch."),
        "lookups": rows.numel(),
        "dists": {},
    }
    for dist in DISTS:
        rows.copy_(torch.from_numpy(lookup_rows(dist, R, rows.numel(), a.zipf)).view_as(rows))
        for _ in range(a.warmup):
            step(grad)
        times = []
        for _ in range(a.repeat):
            t0 = time.perf_counter()
            step(grad)
            times.append(time.perf_counter() - t0)
        out["dists"][dist] = statistics.median(times)
    out["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return out


def measure_state(opt: str) -> dict:
    """RSS taken by the optimizer state of the demo table, allocated eagerly (torch.zeros writes
    every byte, so every page is resident); the weight (written by its init) is subtracted."""
    R, D, dtype, _ = SIZES["demo"]
    before = rss_bytes()
    t = EngramTable(R, D, optimizer=opt, dtype=dtype, state_alloc="eager")
    used = rss_bytes() - before - t.weight.numel() * t.weight.element_size()
    return {"opt": opt, "measured": used / R, "expected": state_bytes_per_row(opt, D)}


def check_fbgemm() -> list[str]:
    """One and three steps of ours and FBGEMM from the same weights: largest weight difference."""
    from fbgemm_gpu.split_embedding_configs import EmbOptimType
    from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation, PoolingMode
    from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
        ComputeDevice,
        SplitTableBatchedEmbeddingBagsCodegen,
    )

    R, D, n = 1000, 64, 4096
    rows = torch.from_numpy(lookup_rows("zipf", R, n, 1.1)).view(-1, 16)
    grad = torch.randn(rows.shape[0], 16 * D, generator=torch.Generator().manual_seed(1))
    lines = []
    for fb_opt, ours_opt in (("EXACT_ROWWISE_ADAGRAD", "rowwise_adagrad"), ("EXACT_SGD", "sgd")):
        t = EngramTable(R, D, optimizer=ours_opt, lr=LR, state_alloc="eager")
        m = SplitTableBatchedEmbeddingBagsCodegen(
            [(R, D, EmbeddingLocation.HOST, ComputeDevice.CPU)],
            optimizer=EmbOptimType[fb_opt],
            pooling_mode=PoolingMode.NONE,
            learning_rate=LR,
            eps=1e-8,
        )
        w = m.split_embedding_weights()[0]
        with torch.no_grad():
            w.copy_(t.weight)
        diffs = []
        for _ in range(3):
            t(rows).backward(grad)
            m(rows.view(-1), torch.arange(n + 1)).backward(grad.view(-1, D))
            diffs.append((t.weight.detach() - w).abs().max().item())
        lines.append(
            f"{ours_opt} vs {fb_opt} (fp32, {R} rows, Zipf): max |w diff| after 1 step "
            f"{diffs[0]:.2e}, after 3 {diffs[2]:.2e}"
        )
    return lines


def mem_need(impl: str, opt: str, size: str, lookups: int, steps: int) -> float:
    """Bytes a configuration commits, bounding on-touch state by the pages its steps can reach."""
    R, D, dtype, alloc = SIZES[size]
    weight = R * D * torch.empty((), dtype=dtype).element_size()
    if impl == "torch":
        return weight + 2 * R * D * 4
    if impl.startswith("fbgemm"):
        return weight + {"EXACT_ROWWISE_ADAGRAD": R * 4, "EXACT_ADAGRAD": R * D * 4, "EXACT_SGD": 0}[opt]
    if alloc == "eager":
        return weight + R * state_bytes_per_row(opt, D)
    touched = lookups * steps * PAGE
    rd = {"adam": 2, "partial_rowwise_adam": 1}.get(opt, 0) * min(R * D * 4, touched)
    rowwise = {"adam": 1, "partial_rowwise_adam": 2, "rowwise_adagrad": 1, "sgd": 0}[opt]
    return weight + rd + rowwise * min(R * 4, touched)


def child(args: argparse.Namespace, *extra: str) -> dict | str:
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads_one), MKL_NUM_THREADS=str(args.threads_one))
    cmd = [
        sys.executable,
        __file__,
        *extra,
        "--threads-one",
        str(args.threads_one),
        "--tokens",
        str(args.tokens),
        "--heads",
        str(args.heads),
        "--repeat",
        str(args.repeat),
        "--warmup",
        str(args.warmup),
        "--zipf",
        str(args.zipf),
    ]
    out = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env)
    if out.returncode:
        return f"failed (rc {out.returncode}): {(out.stderr.strip().splitlines() or ['?'])[-1][:200]}"
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--heads", type=int, default=16, help="lookups per token (demo: 2 orders x 8 heads)")
    ap.add_argument("--zipf", type=float, default=1.1, help="Zipf exponent of the skewed distribution")
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--big", action="store_true", help="also the 100M x 64 bfloat16 table (minutes, ~20 GB)")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--impl", help=argparse.SUPPRESS)  # child process: one configuration
    ap.add_argument("--opt", help=argparse.SUPPRESS)
    ap.add_argument("--size", help=argparse.SUPPRESS)
    ap.add_argument("--state", help=argparse.SUPPRESS)
    ap.add_argument("--check", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--threads-one", dest="threads_one", type=int, default=1, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.impl or args.state or args.check:
        args.threads = args.threads_one
        res = run_one(args) if args.impl else measure_state(args.state) if args.state else check_fbgemm()
        print(json.dumps(res))
        return

    load0 = os.getloadavg()
    try:
        import fbgemm_gpu

        fbgemm = f"fbgemm-gpu-cpu {fbgemm_gpu.__version__}"
    except Exception as e:  # any import failure skips the peer, with its reason
        fbgemm, fbgemm_err = None, f"{type(e).__name__}: {e}"
    configs = [("ours", o) for o in OPTIMIZERS] + [("torch", "SparseAdam")]
    configs += [(f"fbgemm-{p}", o) for p in ("none", "sum1") for o in FBGEMM_OPTS] if fbgemm else []
    avail = next(
        int(line.split()[1]) * 1024
        for line in Path("/proc/meminfo").read_text().splitlines()
        if line.startswith("MemAvailable")
    )
    lookups, steps = args.tokens * args.heads, 2 * (args.warmup + args.repeat)
    results, skipped = [], []
    for size in ("demo", "100M") if args.big else ("demo",):
        for threads in map(int, args.threads.split(",")):
            args.threads_one = threads
            for impl, opt in configs:
                need = mem_need(impl, opt, size, lookups, steps)
                # SparseAdam's dense moments (2 x 25.6 GB at 100M) are its design, not a skip to explain.
                if impl == "torch" and size != "demo":
                    continue
                if need > 0.9 * avail:
                    if threads == int(args.threads.split(",")[0]):
                        skipped.append(
                            f"{size} {impl}:{opt}: needs ~{need / 2**30:.1f} GiB, {avail / 2**30:.1f} GiB available"
                        )
                    continue
                r = child(args, "--impl", impl, "--opt", opt, "--size", size)
                if isinstance(r, str):
                    skipped.append(f"{size} {threads}t {impl}:{opt}: {r}")
                else:
                    results.append(r)
    args.threads_one = 1
    states = [child(args, "--state", o) for o in OPTIMIZERS]
    checks = child(args, "--check") if fbgemm else [f"FBGEMM skipped: {fbgemm_err}"]
    load1 = os.getloadavg()

    lscpu = subprocess.run(["lscpu"], check=False, capture_output=True, text=True).stdout.splitlines()
    cpu = next((line.split(":", 1)[1].strip() for line in lscpu if line.startswith("Model name")), "?")
    print(
        f"# Engram table training step, CPU: {cpu} ({os.cpu_count()} cores), threads {args.threads}, "
        f"torch {torch.__version__}, {fbgemm or 'FBGEMM: not available'}, {time.strftime('%Y-%m-%d')}; "
        f"{args.tokens} tokens x {args.heads} lookups, Zipf a={args.zipf}, median of {args.repeat} after "
        f"{args.warmup} warm-up; load average {load0[0]:.2f} before, {load1[0]:.2f} after"
    )
    print(
        "\n| table | threads | impl | optimizer | dtype | dist | step ms | M lookups/s | ours speedup | "
        "peak RSS GB |\n|---|---|---|---|---|---|---|---|---|---|"
    )
    ours = {
        (r["size"], r["threads"], r["opt"], d): s for r in results if r["impl"] == "ours" for d, s in r["dists"].items()
    }
    for r in results:
        for dist, s in r["dists"].items():
            mine = ours.get((r["size"], r["threads"], MATCH.get(r["opt"]), dist))
            speed = f"{s / mine:.2f}x vs {MATCH[r['opt']]}" if mine else "reference"
            speed = "" if r["impl"] == "ours" else speed
            print(
                f"| {r['size']} | {r['threads']} | {r['impl']} | {r['opt']} | {r['dtype']} | {dist} | "
                f"{1e3 * s:.2f} | {r['lookups'] / s / 1e6:.2f} | {speed} | {r['peak_rss_gb']:.1f} |"
            )
    print("\n| optimizer | state B/row measured | state_bytes_per_row |\n|---|---|---|")
    for s in states:
        ok = isinstance(s, dict)
        print(f"| {s['opt']} | {s['measured']:.2f} | {s['expected']} |" if ok else f"| ? | {s} | |")
    print()
    for line in (checks if isinstance(checks, list) else [checks]) + [f"skipped: {s}" for s in skipped]:
        print(line)
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "results": results,
                    "states": states,
                    "checks": checks,
                    "skipped": skipped,
                    "cpu": cpu,
                    "torch": torch.__version__,
                    "fbgemm": fbgemm,
                    "load": [load0, load1],
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
