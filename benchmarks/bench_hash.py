"""Hashing throughput (tokens/s, all Engram layers, LUT compression included): torch-engram's
ngram_hash against the official NumPy formulation and the same algorithm in PyTorch ops, in one
run. Usage: python benchmarks/bench_hash.py [--tokens 65536] [--repeats 5] [--cpu-time]

Wall clock with torch's default threads by default; --cpu-time runs everything on one thread and
times it with time.thread_time(), which a busy shared machine disturbs far less. Each call
allocates its output, and fresh pages fault on first write: that cost is part of every figure
(for torch-engram it can exceed the hashing itself on machines with slow page faults)."""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np
import torch

import torch_engram as te
from torch_engram import reference


def official_numpy(ids: np.ndarray, lut: np.ndarray, hasher: te.NgramHasher) -> dict:
    """The official demo's path: compress with the LUT, then per layer shift/mix/mod in NumPy."""
    x = lut[ids]
    pad = int(hasher.pad_id)
    cfg = hasher.config
    _B, T = x.shape
    out = {}
    for li, layer_id in enumerate(cfg.layer_ids):
        m = hasher.multipliers[li].numpy()
        shifts = [x] + [
            np.pad(x, ((0, 0), (k, 0)), mode="constant", constant_values=pad)[:, :T]
            for k in range(1, cfg.max_ngram_size)
        ]
        heads = []
        for n in range(2, cfg.max_ngram_size + 1):
            mix = shifts[0] * m[0]
            for k in range(1, n):
                mix = np.bitwise_xor(mix, shifts[k] * m[k])
            for j in range(cfg.n_head_per_ngram):
                heads.append(mix % int(hasher.primes[li, (n - 2) * cfg.n_head_per_ngram + j]))
        out[layer_id] = np.stack(heads, axis=2)
    return out


def best_time(fn, repeats: int, clock=time.perf_counter) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = clock()
        fn()
        times.append(clock() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tokens", type=int, default=65536, help="tokens per call (batch 16 x T)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--cpu-time", action="store_true", help="one thread, timed with time.thread_time()")
    args = ap.parse_args()
    clock = time.perf_counter
    if args.cpu_time:
        torch.set_num_threads(1)
        clock = time.thread_time
    vocab = 128_000
    g = torch.Generator().manual_seed(0)
    print(
        f"# {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
        f"{'thread CPU time' if args.cpu_time else 'wall clock'}, ngram_hash kernel "
        f"{te._C.ngram_hash_isa()}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}"
    )
    print(f"{'config':<12} {'impl':<22} {'Mtok/s':>9} {'vs numpy':>9}")
    for name, factory in (("demo", te.EngramConfig.official_demo), ("v4.1-flash", te.EngramConfig.v41_flash)):
        cfg = factory(compressed_vocab_size=None)
        # A LUT of the paper's shape: 128k raw ids onto ~77% as many compressed ids.
        v_comp = int(vocab * 0.7657)
        lut = torch.randint(0, v_comp, (vocab,), generator=g)
        lut[:v_comp] = torch.randperm(v_comp, generator=g)
        hasher = te.NgramHasher(cfg, lut=lut)
        ids = torch.randint(0, vocab, (16, args.tokens // 16), generator=g)
        n_tok = ids.numel()
        lut_np, ids_np = lut.numpy(), ids.numpy()
        t_np = best_time(lambda: official_numpy(ids_np, lut_np, hasher), args.repeats, clock)
        t_ref = best_time(
            lambda: reference.ngram_hash(
                ids, hasher.lut, hasher.num_ids, hasher.multipliers, hasher.primes, hasher.offsets, hasher._pad_id
            ),
            args.repeats,
            clock,
        )
        t_ours = best_time(lambda: hasher(ids), args.repeats, clock)
        # Check equality once so the figures compare the same computation.
        ours = hasher(ids, out_dtype=torch.int64)
        ref = official_numpy(ids_np, lut_np, hasher)
        for li, layer_id in enumerate(cfg.layer_ids):
            assert np.array_equal(ours[li].numpy() - hasher.offsets[li].numpy(), ref[layer_id])
        for impl, t in (("official NumPy", t_np), ("PyTorch ops (reference)", t_ref), ("torch-engram", t_ours)):
            print(f"{name:<12} {impl:<22} {n_tok / t / 1e6:>9.2f} {t_np / t:>8.1f}x")


if __name__ == "__main__":
    main()
