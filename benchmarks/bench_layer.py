"""CPU forward+backward of the whole Engram layer (demo shape, >= 10M-row table) against the
pure-PyTorch layer a user would write from the official demo (one nn.Embedding over the
concatenated tables, dense gradient), eager and under torch.compile, side by side in one run:
median step time, ratios, and peak memory (RSS, each implementation in its own process).
Our steps include the table's Adam update (inside backward for "fused", the default; through
EngramTable.step() for "sparse" and "dense"); the peer's step is forward + backward only, without
any optimizer, so the ratios understate our advantage.

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

IMPLS = ("official-eager", "official-compile", "engram-fused", "engram-sparse", "engram-dense")


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_one(impl: str, tokens: int, hidden: int, M: int, repeat: int) -> dict:
    torch.manual_seed(0)
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

    def step():
        for p in params:
            p.grad = None
        x.grad = None
        out = step_fn()
        if out is not None:
            out.backward(torch.ones_like(out))

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
        impl=impl,
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
    ref = {r["impl"]: r for r in results}
    eager = ref.get("official-eager", {}).get("median_s")
    compiled = ref.get("official-compile", {}).get("median_s")
    print(
        f"# Engram layer fwd+bwd, CPU, {torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"{time.strftime('%Y-%m-%d')}; demo table (layer 1: 10,344,164 x 64 fp32), "
        f"{args.tokens} tokens, D={args.hidden}, M={args.hc_mult}"
    )
    print(f"{'impl':<18} {'step ms':>9} {'vs eager':>9} {'vs compile':>11} {'peak RSS MB':>12} {'table grad MB':>14}")
    for r in results:
        print(
            f"{r['impl']:<18} {1e3 * r['median_s']:>9.1f} "
            f"{(eager / r['median_s']) if eager else float('nan'):>8.2f}x "
            f"{(compiled / r['median_s']) if compiled else float('nan'):>10.2f}x "
            f"{r['peak_rss_mb']:>12.0f} {r['table_grad_mb']:>14.1f}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
