"""CPU forward and forward+backward time of engram_gate and short_conv against the official demo's
eager PyTorch formulation and torch.compile of it, at a demo-like shape; ratios from one run.

    PYTHONPATH=python python benchmarks/bench_gate_conv.py [--tokens 4096] [--M 4] [--D 1024]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))

from torch_engram import ops
from torch_engram import reference as ref


def timeit(fn, repeat: int) -> float:
    fn()  # warm-up (and compilation for compiled callables)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def fwd_bwd(forward, params):
    def run():
        for p in params:
            p.grad = None
        out = forward()
        out.backward(torch.ones_like(out))

    return run


def fwd_only(forward):
    def run():
        with torch.no_grad():
            forward()

    return run


def report(title: str, rows: list[tuple[str, float]]) -> None:
    base = rows[0][1]
    print(f"\n{title}")
    for name, t in rows:
        print(f"  {name:<34s} {t * 1e3:9.2f} ms   x{t / base:5.2f} of ours")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=4096, help="B*T (B=1)")
    p.add_argument("--M", type=int, default=4)
    p.add_argument("--D", type=int, default=1024)
    p.add_argument("--kernel-size", type=int, default=4)
    p.add_argument("--dilation", type=int, default=3)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile of the demo code")
    args = p.parse_args()
    T, M, D = args.tokens, args.M, args.D
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, B=1 T={T} M={M} D={D} float32")

    torch.manual_seed(0)
    # Gate: demo nn.RMSNorm modules (default eps) vs the op with folded gains.
    x = torch.randn(1, T, M, D, requires_grad=True)
    k = torch.randn(1, T, M, D, requires_grad=True)
    v = torch.randn(1, T, D, requires_grad=True)
    demo_gate = ref.DemoGate(D, M)
    w = demo_gate.folded_weight().requires_grad_()
    eps = demo_gate.eps_for(torch.float32)
    gate_params = [x, k, v, *demo_gate.parameters()]
    # Ours reads the fused K/V projection output [.., (M + 1) * D] as a model produces it.
    kv = ops.gate_kv(k, v).detach().requires_grad_()
    ours = lambda: ops.engram_gate(x, kv, w, eps)  # noqa: E731
    demo = lambda: demo_gate(x, k, v)  # noqa: E731
    fwd_rows = [
        ("engram_gate", timeit(fwd_only(ours), args.repeat)),
        ("demo eager", timeit(fwd_only(demo), args.repeat)),
    ]
    bwd_rows = [
        ("engram_gate", timeit(fwd_bwd(ours, [x, kv, w]), args.repeat)),
        ("demo eager", timeit(fwd_bwd(demo, gate_params), args.repeat)),
    ]
    if not args.no_compile:
        compiled = torch.compile(demo_gate)
        demo_c = lambda: compiled(x, k, v)  # noqa: E731
        fwd_rows.append(("demo torch.compile", timeit(fwd_only(demo_c), args.repeat)))
        bwd_rows.append(("demo torch.compile", timeit(fwd_bwd(demo_c, gate_params), args.repeat)))
    report("context-aware gate, forward", fwd_rows)
    report("context-aware gate, forward+backward", bwd_rows)

    # Short conv: the demo ShortConv plus its residual vs the op.
    u = torch.randn(1, T, M, D, requires_grad=True)
    demo_conv = ref.DemoShortConv(D, args.kernel_size, args.dilation, hc_mult=M)
    with torch.no_grad():
        demo_conv.conv.weight.normal_(0, 0.3)  # the demo zero-initialises it; any value costs the same
    nw, cw = (t.detach().clone().requires_grad_() for t in demo_conv.op_weights())
    conv_params = [u, *demo_conv.parameters()]
    ours = lambda: ops.short_conv(u, nw, cw, args.dilation, 1e-5)  # noqa: E731
    demo = lambda: u + demo_conv(u)  # noqa: E731
    fwd_rows = [
        ("short_conv", timeit(fwd_only(ours), args.repeat)),
        ("demo eager", timeit(fwd_only(demo), args.repeat)),
    ]
    bwd_rows = [
        ("short_conv", timeit(fwd_bwd(ours, [u, nw, cw]), args.repeat)),
        ("demo eager", timeit(fwd_bwd(demo, conv_params), args.repeat)),
    ]
    if not args.no_compile:
        compiled = torch.compile(demo_conv)
        demo_c = lambda: u + compiled(u)  # noqa: E731
        fwd_rows.append(("demo torch.compile", timeit(fwd_only(demo_c), args.repeat)))
        bwd_rows.append(("demo torch.compile", timeit(fwd_bwd(demo_c, conv_params), args.repeat)))
    report("short causal conv, forward", fwd_rows)
    report("short causal conv, forward+backward", bwd_rows)


if __name__ == "__main__":
    main()
