"""`python -m torch_engram [--preset demo|paper-27b|v4.1-flash]`: build an Engram config, compress a
tokenizer trained offline on the built-in real text, hash that text with every Engram layer, and
print the table layout, the compression ratio and the hashing throughput."""

from __future__ import annotations

import argparse
import time

import torch

from . import PRESETS, EngramConfig, NgramHasher, build_compression
from .experiment.corpus import default_tokenizer, encode_documents, load_documents


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m torch_engram", description=__doc__)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="demo")
    ap.add_argument("--vocab-size", type=int, default=8192, help="BPE vocabulary trained on the built-in corpus")
    ap.add_argument("--max-bytes", type=int, default=4_000_000, help="text to hash")
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    tok = default_tokenizer(vocab_size=args.vocab_size)
    comp = build_compression(tok)
    print(
        f"tokenizer: byte-level BPE, {comp.vocab_size} ids -> {comp.num_compressed} compressed "
        f"({100 * comp.ratio:.2f}% smaller), built in {time.perf_counter() - t0:.1f}s"
    )
    config: EngramConfig = PRESETS[args.preset](compressed_vocab_size=None)
    t0 = time.perf_counter()
    hasher = NgramHasher(config, lut=comp.lut)
    print(
        f"config {args.preset}: orders 2..{config.max_ngram_size}, {config.n_head_per_ngram} heads per order, "
        f"d_head {config.d_head}, d_mem {config.d_mem}; layout built in {1e3 * (time.perf_counter() - t0):.0f} ms"
    )
    print(f"{'layer':>6} {'order':>6} {'head':>5} {'prime (rows)':>14} {'offset':>13}")
    for li, layer_id in enumerate(config.layer_ids):
        for c in range(config.num_heads):
            if c % config.n_head_per_ngram in (0, config.n_head_per_ngram - 1):
                print(
                    f"{layer_id:>6} {2 + c // config.n_head_per_ngram:>6} {c % config.n_head_per_ngram:>5} "
                    f"{int(hasher.primes[li, c]):>14,} {int(hasher.offsets[li, c]):>13,}"
                )
        print(
            f"{layer_id:>6} {'all':>6} {'':>5} {hasher.rows_per_layer[li]:>14,} rows, "
            f"{hasher.rows_per_layer[li] * config.d_head / 1e6:,.1f}M table parameters"
        )
    stream = encode_documents(tok, load_documents(max_bytes=args.max_bytes))
    ids = stream.ids[: (stream.ids.numel() // 1024) * 1024].view(-1, 1024)
    hasher(ids[:2])
    t0 = time.perf_counter()
    rows = hasher(ids)
    dt = time.perf_counter() - t0
    print(
        f"hashed {ids.numel():,} tokens of real text ({stream.num_bytes / 1e6:.1f} MB) into {tuple(rows.shape)} "
        f"{rows.dtype} rows: {ids.numel() / dt / 1e6:.1f}M tokens/s on {torch.get_num_threads()} threads"
    )


if __name__ == "__main__":
    main()
