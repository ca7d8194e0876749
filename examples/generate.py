"""Generate text with a model the sweep trained and saved, on the CPU, twice: decoding with the KV
cache and the Engram state (one new token per step), and recomputing the whole prefix at every
token (no state). Both give the same tokens; the example checks it and prints tokens/s for each.

    python -m torch_engram.experiment.sweep --preset quick          # saves results/sweep/models/...
    python examples/generate.py [--model DIR] [--prompt "..."] [--tokens 64] [--temperature 0.8 --top-k 40]

--model defaults to the sweep's Engram model with the lowest validation loss (results/sweep). With
--fp8 the Engram tables are converted to FP8 storage first (torch_engram.fp8).
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

import torch

from torch_engram.experiment.models import load_model


def best_engram_model(sweep_dir: Path) -> Path:
    """The saved Engram model (rho < 1) with the lowest validation loss of a sweep's results.csv."""
    csv_path = sweep_dir / "results.csv"
    if not csv_path.exists():
        raise SystemExit(
            f"generate: no sweep results at {csv_path}; run `python -m torch_engram.experiment.sweep --preset quick` "
            "first, or pass --model DIR"
        )
    with open(csv_path, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("model_dir") and float(r["rho"]) < 1]
    if not rows:
        raise SystemExit(f"generate: {csv_path} lists no saved Engram model (was the sweep run with --no-save?)")
    best = min(rows, key=lambda r: float(r["val_loss"]))
    return sweep_dir / best["model_dir"]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help="a saved model directory (default: the sweep's best Engram model)")
    ap.add_argument("--sweep", type=Path, default=Path("results/sweep"), help="where the sweep wrote its results")
    ap.add_argument("--prompt", default="The Python interpreter reads a file and", help="text to continue")
    ap.add_argument("--batch", type=int, default=1, help="copies of the prompt decoded together")
    ap.add_argument("--tokens", type=int, default=64, help="new tokens per sequence")
    ap.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    ap.add_argument("--top-k", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fp8", action="store_true", help="FP8 Engram tables (E4M3 with E8M0 scales per 32 values)")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    path = args.model or best_engram_model(args.sweep)
    model, tokenizer, extra = load_model(path)
    if tokenizer is None:
        raise SystemExit(f"generate: {path} was saved without its tokenizer")
    if args.fp8:
        for e in model.engram_modules():
            e.table.quantize_fp8_()
    run = extra.get("run", {})
    print(
        f"model {path} (rho={run.get('rho', '?')}, val_loss={run.get('val_loss', '?')}); "
        f"{sum(p.numel() for p in model.parameters()):,} parameters, "
        f"{len(model.engram_modules())} Engram layers{' (FP8 tables)' if args.fp8 else ''}"
    )
    prompt = tokenizer.encode(args.prompt, add_special_tokens=False).ids
    if not prompt:
        raise SystemExit("generate: the prompt encodes to no tokens")
    room = model.cfg.max_seq_len - len(prompt)
    if room < 1:
        raise SystemExit(f"generate: the prompt is {len(prompt)} tokens, max_seq_len is {model.cfg.max_seq_len}")
    n = min(args.tokens, room)
    prompts = [prompt] * args.batch
    sampling = dict(temperature=args.temperature, top_k=args.top_k, seed=args.seed)
    out, times = {}, {}
    with torch.inference_mode():
        for use_cache in (True, False):
            t0 = time.perf_counter()
            out[use_cache] = model.generate(prompts, n, use_cache=use_cache, **sampling)
            times[use_cache] = time.perf_counter() - t0
    same = out[True] == out[False]
    print(f"prompt: {args.prompt!r} ({len(prompt)} tokens)")
    print(f"continuation: {tokenizer.decode(out[True][0])!r}")
    new = sum(len(t) for t in out[True])
    rates = {k: new / t for k, t in times.items()}
    print(f"with the KV cache and Engram state: {rates[True]:8.1f} tokens/s ({times[True]:.2f} s)")
    print(f"recomputing every prefix:           {rates[False]:8.1f} tokens/s ({times[False]:.2f} s)")
    print(f"same tokens: {same}; state speed-up {times[False] / times[True]:.1f}x")
    if not same:
        print("generate: the two decodings differ", file=sys.stderr)
        raise SystemExit(1)
    return dict(tokens=out[True], tokens_per_s=rates, same=same)


if __name__ == "__main__":
    main()
