"""One training step (gather forward, backward, optimizer) on a huge Engram table, in the three
table-gradient modes side by side: "dense" (table-sized .grad), "sparse" (sparse COO .grad) and
"fused" (update inside backward), plus "adam" (torch.optim.Adam(fused=True) on a dense gradient,
updating every row: what a plain PyTorch model does) when it fits. Each mode runs in its own
process; peak memory is the process's peak RSS (VmHWM) above its RSS once the table is built,
so it counts the gradient, the optimizer state pages actually committed and every temporary.

Modes whose estimated peak does not fit in the memory available are skipped and reported with
the estimate. The default size (100M rows x 64, bfloat16: 12.8 GB of table) is the one to run once
on a quiet machine; use --rows 10000000 for a run where every mode fits.

Usage: python benchmarks/bench_optim.py [--rows 100000000] [--d-head 64] [--dtype bf16|fp32]
       [--tokens 8192] [--heads 16] [--steps 3] [--zipf 1.05] [--modes dense,sparse,fused,adam] [--mem-gib N]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

GIB = 1 << 30
DTYPES = {"bf16": ("bfloat16", 2), "fp32": ("float32", 4)}


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/meminfo has no MemAvailable")


def estimate_bytes(mode: str, rows: int, d: int, elem: int, lookups: int, steps: int,
                   state_alloc: str) -> int:
    """Peak bytes of a mode: the table plus what the step adds (rough, for the skip decision)."""
    table = rows * d * elem
    touched = lookups * d * 16 + (64 << 20)  # gathered rows, their gradients, sort buffers, slack
    # Lazy Adam state is committed a 4 KiB page at a time as rows are first updated: at most one
    # page per distinct row per moment and step, at most the whole state (float32 moments).
    state = min(2 * rows * d * 4, 2 * 4096 * lookups * steps) + rows * 4
    if state_alloc == "eager":
        state = 2 * rows * d * 4 + rows * 4
    extra = {"dense": table + state,         # dense .grad (+ its scan, chunked)
             "sparse": 2 * touched + state,  # COO gradient (+ coalescing)
             "fused": touched + state,
             "adam": 3 * table}[mode]        # dense .grad + exp_avg + exp_avg_sq (fused Adam: no temps)
    return table + extra + touched + (400 << 20)  # + torch and Python themselves


# ---------------------------------------------------------------------------------------------
# Worker: one mode in a fresh process


def worker(args) -> None:
    import numpy as np
    import torch
    from torch import nn

    import torch_engram  # noqa: F401
    from torch_engram import ops, optim

    torch.manual_seed(0)
    dtype = getattr(torch, DTYPES[args.dtype][0])
    R, d, H, T = args.rows, args.d_head, args.heads, args.tokens
    mode = args.worker

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.table = nn.Parameter(torch.empty(R, d, dtype=dtype))
            with torch.no_grad():
                self.table.fill_(0.01)  # commits every page: the table is resident, as in training
            optim.mark_table(self.table, None if mode == "adam" else mode)
            self.table_grad = "dense" if mode == "adam" else mode
            self.head = nn.Linear(H * d, 1, dtype=dtype)
            self._fused_state = None

        def forward(self, rows):
            if self.table_grad == "fused":
                e = optim.fused_multihead_gather(self.table, rows, self._fused_state)
            else:
                e = ops.multihead_gather(self.table, rows, sparse_grad=self.table_grad == "sparse")
            return self.head(e).squeeze(-1)

    rss_start = _status_kib("VmRSS") * 1024
    model = Model()
    rss_table = _status_kib("VmRSS") * 1024
    if mode == "adam":
        table_opt = torch.optim.Adam([model.table], lr=2e-3, fused=True)
        rest_opt = torch.optim.AdamW(model.head.parameters(), lr=4e-4, weight_decay=0.1)
    else:
        table_opt, rest_opt = optim.make_optimizers(model, base_lr=4e-4, weight_decay=0.1,
                                                    state_alloc=args.state)

    # Zipfian n-gram popularity scattered over the table by a multiplicative hash, as hashed
    # n-gram rows are.
    rng = np.random.default_rng(0)

    def batch():
        z = rng.zipf(args.zipf, size=T * H).astype(np.uint64)
        rows = (z * np.uint64(0x9E3779B97F4A7C15)) % np.uint64(R)
        return torch.from_numpy(rows.astype(np.int64)).view(T, H), torch.randn(T, dtype=dtype)

    times = []
    unique = []
    for step in range(args.steps + 1):  # step 0 warms up (state allocation, first touches)
        rows, target = batch()
        unique.append(int(rows.unique().numel()))
        t0 = time.perf_counter()
        loss = (model(rows) - target).float().square().mean()
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        table_opt.step()
        rest_opt.step()
        table_opt.zero_grad()
        rest_opt.zero_grad()
        t3 = time.perf_counter()
        if step:
            times.append((t1 - t0, t2 - t1, t3 - t2, t3 - t0))
    med = [statistics.median(col) for col in zip(*times)]
    peak = _status_kib("VmHWM") * 1024
    print(json.dumps(dict(
        mode=mode, fwd_s=med[0], bwd_s=med[1], opt_s=med[2], step_s=med[3],
        table_gib=R * d * DTYPES[args.dtype][1] / GIB, rss_start_gib=rss_start / GIB,
        rss_table_gib=rss_table / GIB, peak_gib=peak / GIB, extra_peak_gib=(peak - rss_table) / GIB,
        rss_end_gib=_status_kib("VmRSS") * 1024 / GIB, unique_rows=sum(unique) // len(unique),
        lookups=T * H)), flush=True)


# ---------------------------------------------------------------------------------------------
# Driver


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=100_000_000, help="table rows (default 100M)")
    ap.add_argument("--d-head", type=int, default=64)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    ap.add_argument("--tokens", type=int, default=8192, help="tokens per step (B*T)")
    ap.add_argument("--heads", type=int, default=16, help="H lookups per token")
    ap.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
    ap.add_argument("--zipf", type=float, default=1.05,
                    help="Zipf exponent of row popularity (1.05: ~60%% of lookups are distinct rows, about "
                         "the type/token ratio of bigrams and trigrams in a batch)")
    ap.add_argument("--modes", default="dense,sparse,fused,adam")
    ap.add_argument("--mem-gib", type=float, default=None,
                    help="memory a mode may use (default: MemAvailable minus 2 GiB, at most 20 GiB)")
    ap.add_argument("--state", choices=["auto", "eager", "on_touch"], default="auto",
                    help="Adam state allocation: eager (steady-state step times) or on_touch (only touched "
                         "pages take memory, first touches fault); auto: eager when the whole state fits")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return

    import torch

    elem = DTYPES[args.dtype][1]
    limit = args.mem_gib * GIB if args.mem_gib else min(_mem_available() - 2 * GIB, 20 * GIB)
    lookups = args.tokens * args.heads
    if args.state == "auto":
        full = args.rows * args.d_head * elem + 2 * args.rows * args.d_head * 4 + args.rows * 4
        args.state = "eager" if full + args.rows * args.d_head * elem + (2 << 30) <= limit else "on_touch"
    print(f"# {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch "
          f"{torch.__version__}, {time.strftime('%Y-%m-%d')}; table {args.rows:,} x {args.d_head} "
          f"{args.dtype} ({args.rows * args.d_head * elem / GIB:.2f} GiB), {args.tokens} tokens x "
          f"{args.heads} heads per step, memory limit {limit / GIB:.1f} GiB; table Adam state {args.state}")
    results = {}
    for mode in args.modes.split(","):
        need = estimate_bytes(mode, args.rows, args.d_head, elem, lookups, args.steps + 1, args.state)
        if need > limit:
            results[mode] = dict(mode=mode, skipped=f"needs ~{need / GIB:.1f} GiB > {limit / GIB:.1f} GiB")
            continue
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", mode, "--rows", str(args.rows),
               "--d-head", str(args.d_head), "--dtype", args.dtype, "--tokens", str(args.tokens),
               "--heads", str(args.heads), "--steps", str(args.steps), "--zipf", str(args.zipf),
               "--state", args.state]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            results[mode] = dict(mode=mode, skipped=f"failed (exit {proc.returncode}): "
                                 f"{proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else ''}")
            continue
        results[mode] = json.loads(proc.stdout.strip().splitlines()[-1])

    print(f"{'mode':<7} {'step ms':>9} {'fwd':>8} {'bwd':>8} {'optim':>8} {'peak GiB':>9} {'+table':>7} "
          f"{'state':>6} {'uniq rows':>10} {'vs dense':>9}")
    dense = results.get("dense", {}).get("step_s")
    for mode, r in results.items():
        if "skipped" in r:
            print(f"{mode:<7} skipped: {r['skipped']}")
            continue
        ratio = f"{dense / r['step_s']:.1f}x" if dense else "-"
        print(f"{mode:<7} {r['step_s'] * 1e3:>9.1f} {r['fwd_s'] * 1e3:>8.1f} {r['bwd_s'] * 1e3:>8.1f} "
              f"{r['opt_s'] * 1e3:>8.1f} {r['peak_gib']:>9.2f} {r['extra_peak_gib']:>7.2f} "
              f"{r['rss_end_gib'] - r['rss_table_gib']:>6.2f} {r['unique_rows']:>10,} {ratio:>9}")
    print("# times: medians of the timed steps. peak GiB: process peak RSS; +table: peak above the RSS with "
          "the table built (gradient, optimizer state, temporaries); state: RSS still held after the last "
          "step above the table (optimizer state committed so far: lazy moments take memory a page at a "
          "time as rows are first updated, so it grows over a run towards 2 x 4 B x rows x d_head)")


if __name__ == "__main__":
    main()
