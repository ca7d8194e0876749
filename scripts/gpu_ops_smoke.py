"""One short CUDA run of every engram op, forward and backward, for compute-sanitizer
(scripts/gpu_check.sh runs it under `compute-sanitizer --tool memcheck`): small shapes, odd sizes
and the vector paths, so every kernel launches at least once."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))

import torch_engram as te


def main() -> None:
    dev = "cuda"
    torch.manual_seed(0)
    cfg = te.EngramConfig(
        engram_vocab_size=(211, 307), max_ngram_size=3, n_embed_per_ngram=16, n_head_per_ngram=2,
        layer_ids=(1,), pad_id=0, compressed_vocab_size=50,
    )  # fmt: skip
    hasher = te.NgramHasher(cfg).to(dev)
    ids = torch.randint(0, 50, (3, 37), device=dev)
    rows = hasher(ids, doc_start=torch.rand(3, 37, device=dev) < 0.1)[0]
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        for grad in ("fused", "sparse", "dense"):
            mod = te.Engram(cfg, 1, 24, hc_mult=2, hasher=hasher, table_grad=grad, device=dev, dtype=dtype)
            hidden = torch.randn(3, 37, 2, 24, device=dev, dtype=dtype, requires_grad=True)
            out = mod(hidden, rows=rows)
            out.float().square().sum().backward()
            mod.table.step()
        for opt in ("adam", "partial_rowwise_adam", "rowwise_adagrad", "sgd"):
            t = te.EngramTable(500, 8, optimizer=opt, device=dev, dtype=dtype)
            t(torch.randint(0, 500, (5, 9, 3), device=dev)).sum().backward()
    # float16 tables, the sparse backward, the atomic dense backward (on request), and rows read
    # by more than 128 lookups (the block-wide hot-row sums).
    t16 = te.EngramTable(500, 8, optimizer="adam", device=dev, dtype=torch.float16)
    t16(torch.randint(0, 500, (5, 9, 3), device=dev)).sum().backward()
    table = torch.randn(300, 8, device=dev, requires_grad=True)
    r = torch.randint(0, 300, (4, 6, 2), device=dev)
    te.ops.multihead_gather(table, r, sparse_grad=True).sum().backward()
    os.environ["ENGRAM_GATHER_BACKWARD"] = "atomic"
    te.ops.multihead_gather(table, r).sum().backward()
    del os.environ["ENGRAM_GATHER_BACKWARD"]
    hot = torch.zeros(64, 8, 2, dtype=torch.long, device=dev)  # 1,024 lookups of row 0
    te.ops.multihead_gather(table, hot).sum().backward()
    te.EngramTable(300, 8, device=dev)(hot).sum().backward()
    # The row cache of a pinned host table: fills, evictions with write-back, lazy initialisation,
    # a prefetch on the side stream, a flush; bfloat16 with stochastic rounding keyed by row_ids.
    for dtype in (torch.float32, torch.bfloat16):
        cached = te.EngramTable(5000, 12, placement="host", cache_rows=90, device=dev, dtype=dtype)
        schedule = [torch.randint(0, 5000, (7, 5), device=dev) for _ in range(7)]
        for step in range(6):  # the prefetch brings the next step's rows: two steps pinned (<= 70)
            cached(schedule[step]).float().sum().backward()
            cached.prefetch(schedule[step + 1])
        cached.flush()
    # FP8 tables: the gather with fused dequantisation into float32 and bfloat16, at an odd offset.
    from torch_engram.fp8 import quantize_fp8

    v, sc = quantize_fp8(torch.randn(301, 96, device=dev))
    fr = torch.randint(0, 300, (4, 7, 3), device=dev)
    for out_dtype in (torch.float32, torch.bfloat16):
        te.ops.multihead_gather_fp8(v, sc, fr, out_dtype)
        te.ops.multihead_gather_fp8(v[1:], sc[1:], fr, out_dtype)
    torch.cuda.synchronize()
    print("gpu_ops_smoke: every op ran")


if __name__ == "__main__":
    main()
