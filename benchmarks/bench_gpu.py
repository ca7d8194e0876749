"""GPU benchmark of torch-engram's CUDA kernels, each beside its pure-PyTorch peer, in one run:

1. device copy bandwidth (a large device-to-device copy): the roofline for everything below;
2. multihead_gather: achieved bytes/s as a share of the copy bandwidth, vs F.embedding; the FP8
   gather (multihead_gather_fp8) likewise, vs the same dequantisation in PyTorch ops;
3. table gradient: the sorted (deterministic) and atomic dense backward and the row-sparse op,
   vs PyTorch's embedding backward (sorted) and index_add_ (atomic);
4. ngram_hash vs the same algorithm in PyTorch ops (torch_engram.reference.ngram_hash) on GPU;
5. the whole Engram layer forward+backward vs the official-demo formulation in PyTorch, eager
   and torch.compile, when the layer's ops run on CUDA (skipped with a message otherwise).

Times are medians of CUDA-event timings after warm-up. Prints a table and writes JSON.
Usage: python benchmarks/bench_gpu.py [--json out.json] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
import traceback

import torch
import torch.nn.functional as F

import torch_engram as te
from torch_engram import reference

RESULTS: list[dict] = []
# Where results go; rewritten after every measurement, so a run cut short by a time limit still
# leaves everything it measured.
OUT: dict = dict(path=None, header=None)


def flush() -> None:
    if OUT["path"]:
        with open(OUT["path"], "w") as f:
            json.dump(dict(header=OUT["header"], results=RESULTS), f, indent=1)


def cuda_time(fn, warmup: int = 3, iters: int = 10) -> float:
    """Median seconds per call of fn() on the current stream."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    times.sort()
    return times[len(times) // 2]


def record(
    section: str,
    name: str,
    seconds: float,
    nbytes: float | None = None,
    copy_bw: float | None = None,
    peer: str | None = None,
    **extra,
) -> None:
    row = dict(section=section, name=name, ms=seconds * 1e3, **extra)
    if nbytes is not None:
        row["GB/s"] = nbytes / seconds / 1e9
        if copy_bw:
            row["%copy"] = 100.0 * nbytes / seconds / copy_bw
    if peer is not None:
        row["peer"] = peer
    RESULTS.append(row)
    flush()
    bw = f"{row['GB/s']:9.1f}" if "GB/s" in row else " " * 9
    pct = f"{row['%copy']:6.1f}%" if "%copy" in row else " " * 7
    more = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in extra.items())
    print(f"{section:<10} {name:<62} {row['ms']:10.3f} {bw} {pct}  {more}", flush=True)


def bench_copy(quick: bool) -> float:
    n = (1 << 28) if quick else (1 << 30)  # bytes per buffer (256 MiB / 1 GiB)
    src = torch.empty(n, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    t = cuda_time(lambda: dst.copy_(src))
    bw = 2 * n / t  # read + write
    record("copy", f"device copy {n >> 20} MiB", t, 2 * n, bw)
    return bw


def bench_gather(copy_bw: float, quick: bool) -> None:
    num_rows, d_head, H = 10_000_000, 64, 16
    tokens = (1 << 16) if quick else (1 << 18)
    n = tokens * H  # lookups (>= 1M unless quick)
    for dtype in (torch.bfloat16, torch.float32):
        table = torch.randn(num_rows, d_head, device="cuda", dtype=dtype)
        b = table.element_size()
        for idx_dtype in (torch.int32, torch.int64):
            rows = torch.randint(0, num_rows, (tokens, H), device="cuda", dtype=idx_dtype)
            bi = rows.element_size()
            nbytes = n * d_head * 2 * b + n * bi  # read rows of the table, write e, read ids
            tag = f"{str(dtype)[6:]} {num_rows // 10**6}Mx{d_head} {n / 2**20:.0f}Mi lookups {str(idx_dtype)[6:]}"
            t = cuda_time(lambda: te.ops.multihead_gather(table, rows))
            record("gather", f"engram {tag}", t, nbytes, copy_bw)
            rows_l = rows.long()
            t_peer = cuda_time(lambda: F.embedding(rows_l, table).flatten(-2))
            record("gather", f"F.embedding {tag}", t_peer, nbytes, copy_bw, speedup=t_peer / t)
        table = None  # free it before the next allocation
        torch.cuda.empty_cache()
    # FP8 tables (E4M3 values + one E8M0 scale per 32 values), dequantised into bf16 or fp32 by
    # the gather, against the same rows gathered in PyTorch ops (reference.multihead_gather_fp8).
    # Goal: >= 75% of the copy bandwidth.
    from torch_engram.fp8 import quantize_fp8

    for d in (64, 256):
        R = num_rows if d == 64 else num_rows // 4
        values, scale = quantize_fp8(torch.randn(R, d, device="cuda"))
        rows = torch.randint(0, R, (tokens, H), device="cuda", dtype=torch.int32)
        for out_dtype in (torch.bfloat16, torch.float32):
            ob = torch.empty((), dtype=out_dtype).element_size()
            nbytes = n * (d + d // 32 + d * ob) + n * 4  # read values and scales, write e, read ids
            tag = f"fp8->{str(out_dtype)[6:]} {R // 10**6}Mx{d} {n / 2**20:.0f}Mi lookups int32"
            t = cuda_time(lambda: te.ops.multihead_gather_fp8(values, scale, rows, out_dtype))
            record("gather", f"engram {tag}", t, nbytes, copy_bw)
            t_peer = cuda_time(lambda: reference.multihead_gather_fp8(values, scale, rows, out_dtype))
            record("gather", f"PyTorch ops {tag}", t_peer, nbytes, copy_bw, speedup=t_peer / t)
        values = scale = None
        torch.cuda.empty_cache()


def bench_scatter(copy_bw: float, quick: bool) -> None:
    num_rows, d_head, H = 10_000_000, 64, 16
    tokens = (1 << 16) if quick else (1 << 18)
    n = tokens * H
    for dtype in (torch.bfloat16, torch.float32):
        b = torch.tensor([], dtype=dtype).element_size()
        g = torch.Generator(device="cuda").manual_seed(0)
        # Zipf-like reuse, as n-gram frequencies are: many rows read once, a few read thousands of times.
        u = torch.rand(tokens, H, device="cuda", generator=g)
        rows = (u.pow(3) * num_rows).long().clamp_max(num_rows - 1).to(torch.int32)
        grad = torch.randn(tokens, H * d_head, device="cuda", dtype=dtype, generator=g)
        rows_l = rows.long().flatten()
        grad2 = grad.view(-1, d_head)
        unique = int(torch.unique(rows_l).numel())
        # Useful traffic of a dense table gradient: read grad and ids, write the dense output
        # (its zero fill is part of any dense gradient).
        dense_bytes = n * d_head * b + n * 4 + num_rows * d_head * b
        sparse_bytes = n * d_head * b + n * 4 + unique * (d_head * b + 8)
        tag = f"{str(dtype)[6:]} {num_rows // 10**6}Mx{d_head} {n / 2**20:.0f}Mi lookups U={unique}"
        for det in (True, False):
            # The sorted path is the default; the atomic one runs only on request.
            os.environ["ENGRAM_GATHER_BACKWARD"] = "sorted" if det else "atomic"
            try:
                t = cuda_time(lambda: te.ops.multihead_gather_backward(grad, rows, num_rows))
                mode = "sorted" if det else "atomic"
                record("scatter", f"engram dense {mode} {tag}", t, dense_bytes, copy_bw)
                if det:
                    t_peer = cuda_time(
                        lambda: torch.ops.aten.embedding_dense_backward(grad2, rows_l, num_rows, -1, False)
                    )
                    record(
                        "scatter",
                        f"aten embedding_dense_backward {tag}",
                        t_peer,
                        dense_bytes,
                        copy_bw,
                        speedup=t_peer / t,
                    )
                else:
                    t_peer = cuda_time(
                        lambda: torch.zeros(num_rows, d_head, device="cuda", dtype=dtype).index_add_(0, rows_l, grad2)
                    )
                    record(
                        "scatter",
                        f"zeros().index_add_ (atomic) {tag}",
                        t_peer,
                        dense_bytes,
                        copy_bw,
                        speedup=t_peer / t,
                    )
            finally:
                os.environ.pop("ENGRAM_GATHER_BACKWARD", None)
        t = cuda_time(lambda: te.ops.multihead_gather_backward_sparse(grad, rows))
        record("scatter", f"engram sparse (sorted) {tag}", t, sparse_bytes, copy_bw)
        t_peer = cuda_time(lambda: torch.unique(rows_l, return_inverse=True))
        record("scatter", f"torch.unique(return_inverse) alone {tag}", t_peer, None, None, speedup=t_peer / t)
        # The fused backward (sort, per-row sums, Adam update of row and state, no gradient
        # tensor): useful traffic = the gradient and ids read, plus a read-modify-write of each
        # touched row, its two fp32 moments and its step count.
        for opt in ("adam", "rowwise_adagrad"):
            table = te.EngramTable(num_rows, d_head, optimizer=opt, dtype=dtype, device="cuda")
            state_row = te.table.state_bytes_per_row(opt, d_head)
            fused_bytes = n * d_head * b + n * 4 + 2 * unique * (d_head * b + state_row)
            t = cuda_time(
                lambda: torch.ops.engram._multihead_gather_fused_update(
                    grad,
                    rows,
                    table.weight.detach(),
                    table.momentum1,
                    table.momentum2,
                    table.row_step,
                    table.step_count,
                    table.hparams,
                    opt,
                    table.seed if table.stochastic_rounding else -1,
                )
            )
            record("scatter", f"engram fused backward {opt} {tag}", t, fused_bytes, copy_bw)
            table = None  # free it before the next allocation
        grad = grad2 = None  # free them before the next dtype
        torch.cuda.empty_cache()


def bench_hash(quick: bool) -> None:
    vocab = 128_000
    g = torch.Generator().manual_seed(0)
    tokens = (1 << 18) if quick else (1 << 20)
    for name, factory in (("demo", te.EngramConfig.official_demo), ("v4.1-flash", te.EngramConfig.v41_flash)):
        cfg = factory(compressed_vocab_size=None)
        v_comp = int(vocab * 0.7657)
        lut = torch.randint(0, v_comp, (vocab,), generator=g)
        lut[:v_comp] = torch.randperm(v_comp, generator=g)
        hasher = te.NgramHasher(cfg, lut=lut, device="cuda")
        ids = torch.randint(0, vocab, (16, tokens // 16), generator=g).cuda()
        ours = hasher(ids, out_dtype=torch.int64)
        ref = reference.ngram_hash(
            ids, hasher.lut, hasher.num_ids, hasher.multipliers, hasher.primes, hasher.offsets, hasher._pad_id
        )
        assert torch.equal(ours, ref), "CUDA hashing differs from the reference"
        t = cuda_time(lambda: hasher(ids))
        out_bytes = hasher(ids).numel() * 4 + ids.numel() * 8
        record("hash", f"engram ngram_hash {name} {tokens >> 10}Ki tokens", t, out_bytes, None, Mtok_s=tokens / t / 1e6)
        t_ref = cuda_time(
            lambda: reference.ngram_hash(
                ids, hasher.lut, hasher.num_ids, hasher.multipliers, hasher.primes, hasher.offsets, hasher._pad_id
            ),
            warmup=1,
            iters=3,
        )
        record(
            "hash",
            f"PyTorch ops {name} {tokens >> 10}Ki tokens",
            t_ref,
            None,
            None,
            Mtok_s=tokens / t_ref / 1e6,
            speedup=t_ref / t,
        )


def bench_layer(quick: bool) -> None:
    """The whole layer: Engram (ours) vs OfficialEngram (the demo formulation) eager and compiled."""
    Engram = getattr(te, "Engram", None)
    OfficialEngram = getattr(reference, "OfficialEngram", None)
    if Engram is None or OfficialEngram is None:
        msg = "torch_engram.Engram or reference.OfficialEngram is not available"
        print(f"layer      skipped: {msg}")
        RESULTS.append(dict(section="layer", skipped=msg))
        return
    B, T, M, D = (4, 1024, 1, 1024) if quick else (8, 2048, 4, 2048)
    cfg = te.EngramConfig.official_demo(compressed_vocab_size=99_092)
    hasher = te.NgramHasher(cfg, device="cuda")
    dtype = torch.bfloat16
    try:
        ours = Engram(cfg, cfg.layer_ids[0], D, hc_mult=M, hasher=hasher, device="cuda", dtype=dtype)
        hidden = torch.randn(B, T, M, D, device="cuda", dtype=dtype, requires_grad=True)
        ids = torch.randint(0, hasher.num_ids, (B, T), device="cuda")
        rows = hasher(ids)[ours.layer_index]
        ours(hidden, rows=rows).float().sum().backward()  # fails here when an op has no CUDA kernel
    except (RuntimeError, NotImplementedError) as exc:
        msg = str(exc).splitlines()[0]
        print(f"layer      skipped: the Engram layer does not run on CUDA yet ({msg})")
        RESULTS.append(dict(section="layer", skipped=msg))
        return
    H = cfg.num_heads
    primes = hasher.primes[ours.layer_index].tolist()
    peer = OfficialEngram(
        primes,
        cfg.d_head,
        D,
        M,
        kernel_size=cfg.kernel_size,
        dilation=cfg.dilation,
        bias=cfg.proj_bias,
        use_conv=cfg.use_conv,
        gate_eps=cfg.gate_eps,
        conv_eps=cfg.conv_eps,
        device="cuda",
        dtype=dtype,
    ).load_from(ours)
    table_ids = rows - hasher.offsets[ours.layer_index].view(1, 1, H).to(rows.dtype)
    table_ids = table_ids.long()
    g_out = torch.randn(B, T, M, D, device="cuda", dtype=dtype)

    def step(module, fn_input):
        def run():
            module.zero_grad(set_to_none=True)
            hidden.grad = None
            fn_input().backward(g_out)

        return run

    tag = f"demo B={B} T={T} M={M} D={D} {str(dtype)[6:]}"
    t = cuda_time(step(ours, lambda: ours(hidden, rows=rows)), warmup=2, iters=5)
    record("layer", f"engram fwd+bwd {tag}", t, None, None, Mtok_s=B * T / t / 1e6)
    t_eager = cuda_time(step(peer, lambda: peer(hidden, table_ids)), warmup=2, iters=5)
    record(
        "layer", f"PyTorch eager fwd+bwd {tag}", t_eager, None, None, Mtok_s=B * T / t_eager / 1e6, speedup=t_eager / t
    )
    try:
        compiled = torch.compile(peer)
        t_comp = cuda_time(step(peer, lambda: compiled(hidden, table_ids)), warmup=3, iters=5)
        record(
            "layer",
            f"PyTorch torch.compile fwd+bwd {tag}",
            t_comp,
            None,
            None,
            Mtok_s=B * T / t_comp / 1e6,
            speedup=t_comp / t,
        )
    except Exception as exc:  # compile failures are a finding, not a crash of the benchmark
        print(f"layer      torch.compile peer failed: {type(exc).__name__}: {str(exc).splitlines()[0]}")
        RESULTS.append(dict(section="layer", name="torch.compile peer", error=str(exc).splitlines()[0]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--quick", action="store_true", help="smaller sizes (a smoke run)")
    ap.add_argument("--only", default="copy,gather,scatter,hash,layer")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_gpu: no CUDA GPU visible")
    props = torch.cuda.get_device_properties(0)
    header = dict(
        device=props.name,
        sms=props.multi_processor_count,
        memory_gib=props.total_memory / 2**30,
        torch=torch.__version__,
        cuda=torch.version.cuda,
        python=platform.python_version(),
        date=time.strftime("%Y-%m-%d %H:%M"),
        quick=args.quick,
    )
    OUT.update(path=args.json, header=header)
    print("# " + ", ".join(f"{k}={v}" for k, v in header.items()))
    print(f"{'section':<10} {'case':<62} {'ms':>10} {'GB/s':>9} {'%copy':>7}  extra")
    only = set(args.only.split(","))
    copy_bw = bench_copy(args.quick)
    sections = [
        ("gather", lambda: bench_gather(copy_bw, args.quick)),
        ("scatter", lambda: bench_scatter(copy_bw, args.quick)),
        ("hash", lambda: bench_hash(args.quick)),
        ("layer", lambda: bench_layer(args.quick)),
    ]
    failed = 0
    for name, fn in sections:
        if name not in only:
            continue
        try:
            fn()
        except Exception as exc:  # keep going: one broken section must not hide the others
            failed += 1
            traceback.print_exc()
            RESULTS.append(dict(section=name, error=f"{type(exc).__name__}: {exc}"))
        torch.cuda.empty_cache()
    flush()
    raise SystemExit(1 if failed else 0)


if __name__ == "__main__":
    main()
