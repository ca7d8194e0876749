"""CPU forward+backward of the whole Engram layer (demo shape, >= 10M-row table) against the
pure-PyTorch layer a user would write from the official demo (one nn.Embedding over the
concatenated tables, dense gradient), eager and under torch.compile, side by side in one run:
median step time, ratios, and peak memory (RSS, each implementation in its own process).
Our steps include the table's update (inside backward for "fused", the default; through
EngramTable.step() for "sparse" and "dense"); the peer's plain step is forward + backward only.
The "+adam" rows are whole training steps: torch.optim.Adam over every parameter of the peer (its
table gradient is dense, and so is its Adam) and over our dense parameters, each compared with
the peer of the same kind.

Most of the peer's step on glibc's default malloc is page faults: its table-sized gradient (2.5 GB
here) is above malloc's mmap threshold, so every step maps fresh zeroed pages. Run with
MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=4294967296 (inherited by every child) to
see the steps without that cost (benchmarks/RESULTS.md has both).

    python benchmarks/bench_layer.py [--tokens 2048] [--hidden 1024] [--hc-mult 4] [--repeat 7]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))

import torch_engram as te
from torch_engram.reference import OfficialEngram

# "+adam": the whole training step, with torch.optim.Adam over the peer's parameters (its table
# gradient is dense, so is its Adam) and over our dense parameters (the table updates itself).
IMPLS = (
    "official-eager",
    "official-compile",
    "engram-fused",
    "engram-sparse",
    "engram-dense",
    "official-eager+adam",
    "official-compile+adam",
    "engram-fused+adam",
)


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_one(impl: str, tokens: int, hidden: int, M: int, repeat: int) -> dict:
    torch.manual_seed(0)
    impl, _, with_opt = impl.partition("+")
    config = te.EngramConfig.official_demo(compressed_vocab_size=129280)
    hasher = te.NgramHasher(config)
    B, T = max(1, tokens // 512), min(tokens, 512)
    ids = torch.randint(0, 129280, (B, T))
    rows = hasher(ids)[0]
    x = torch.randn(B, T, M, hidden, requires_grad=True)
    mod = te.Engram(
        config,
        config.layer_ids[0],
        hidden,
        hc_mult=M,
        hasher=hasher,
        table_grad=impl.split("-")[1] if impl.startswith("engram") else "dense",
    )
    base = rss_mb()
    if impl.startswith("official"):
        peer = OfficialEngram(hasher.primes[0].tolist(), config.d_head, hidden, M, dilation=config.dilation)
        peer.load_from(mod)
        del mod
        table_ids = rows.long() - hasher.offsets[0]
        params = list(peer.parameters())
        fwd = torch.compile(peer) if impl == "official-compile" else peer
        step_fn = lambda: fwd(x, table_ids)  # noqa: E731
        table = peer.embedding.weight
    else:
        params = [p for n, p in mod.named_parameters() if not n.startswith("hasher")]

        def step_fn():
            out = mod(x, rows=rows)
            out.backward(torch.ones_like(out))
            mod.table.step()  # sparse and dense modes; fused updated the table inside backward
            return None

        table = mod.table.weight
    # Adam's parameters: all of the peer's; ours but the table, which updates itself (its grad is
    # still reset with the rest each step).
    adam = [p for p in params if p is not table or impl.startswith("official")]
    opt = torch.optim.Adam(adam, lr=1e-4) if with_opt else None

    def step():
        for p in params:
            p.grad = None
        x.grad = None
        out = step_fn()
        if out is not None:
            out.backward(torch.ones_like(out))
        if opt is not None:
            opt.step()

    t0 = time.perf_counter()
    step()  # warm-up (compilation for the compiled peer)
    first = time.perf_counter() - t0
    # A second warm-up: the first steps also settle the allocator (malloc's mmap threshold, pages
    # of the big buffers); a training loop runs in that steady state.
    step()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    g = table.grad
    grad_bytes = (
        0
        if g is None
        else (g._values().numel() * g.element_size() + g._indices().numel() * 8)
        if g.is_sparse
        else g.numel() * g.element_size()
    )
    return dict(
        impl=impl + ("+" + with_opt if with_opt else ""),
        median_s=statistics.median(times),
        first_s=first,
        peak_rss_mb=rss_mb(),
        rss_after_build_mb=base,
        table_grad_mb=grad_bytes / 2**20,
        table_mb=table.numel() * table.element_size() / 2**20,
        tokens=B * T,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--hc-mult", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--impl", choices=IMPLS, help=argparse.SUPPRESS)  # child process
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    if args.impl:
        print(json.dumps(run_one(args.impl, args.tokens, args.hidden, args.hc_mult, args.repeat)))
        return
    results = []
    for impl in IMPLS:
        cmd = [
            sys.executable,
            __file__,
            "--impl",
            impl,
            "--tokens",
            str(args.tokens),
            "--hidden",
            str(args.hidden),
            "--hc-mult",
            str(args.hc_mult),
            "--repeat",
            str(args.repeat),
        ]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode:
            print(f"{impl}: failed\n{out.stderr[-2000:]}")
            continue
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    ref = {r["impl"]: r["median_s"] for r in results}
    print(
        f"# Engram layer fwd+bwd, CPU, {torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"{time.strftime('%Y-%m-%d')}; demo table (layer 1: 10,344,164 x 64 fp32), "
        f"{args.tokens} tokens, D={args.hidden}, M={args.hc_mult}"
    )
    print(f"{'impl':<22} {'step ms':>9} {'vs eager':>9} {'vs compile':>11} {'peak RSS MB':>12} {'table grad MB':>14}")
    for r in results:
        # Each row against the peers of the same kind of step (with or without Adam).
        kind = "+adam" if r["impl"].endswith("+adam") else ""
        eager, compiled = ref.get("official-eager" + kind), ref.get("official-compile" + kind)
        print(
            f"{r['impl']:<22} {1e3 * r['median_s']:>9.1f} "
            f"{(eager / r['median_s']) if eager else float('nan'):>8.2f}x "
            f"{(compiled / r['median_s']) if compiled else float('nan'):>10.2f}x "
            f"{r['peak_rss_mb']:>12.0f} {r['table_grad_mb']:>14.1f}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
