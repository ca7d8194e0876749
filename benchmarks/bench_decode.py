"""Decoding on the CPU: the latency of one decode step, side by side in one run, on real text (the
built-in corpus, hashed):

  layer  one Engram layer in the V4.1 form (orders 2-4, 8 heads, d_head 64, no conv, gate eps
         1e-20, hc_mult 4; 500k rows per table, 12M in all) and in the demo form (orders 2-3, d_head 64,
         with the short conv), for batch 1 and 32: a step with the EngramState (one new token after
         a context of --context tokens) against recomputing the layer over the whole prefix, with
         the table in bfloat16 and in FP8 (E4M3 + E8M0 per 32 values); plus the tables' bytes;
  model  the sweep's TransformerLM (quick-preset shape, d_head 32 so the tables can be FP8):
         generate() tokens/s with the KV cache and Engram state against recomputing every prefix,
         for batch 1 and 32, float32 with bfloat16 and with FP8 tables.

Times are medians after a warm-up. Prints a table; --json writes the figures.
    python benchmarks/bench_decode.py [--parts layer,model] [--context 256] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))

import torch_engram as te
from torch_engram.experiment.corpus import default_tokenizer, encode_documents, load_documents, tile
from torch_engram.experiment.models import ModelConfig, TransformerLM

RESULTS: list[dict] = []


def timed(fn, reps: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def record(part: str, case: str, **fields) -> None:
    RESULTS.append(dict(part=part, case=case, **fields))
    more = "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in fields.items())
    print(f"{part:<6} {case:<44} {more}", flush=True)


def corpus_ids(lut_tok, n: int) -> torch.Tensor:
    return tile(encode_documents(lut_tok, load_documents()).ids, n)


def layer_part(args, tok, comp) -> None:
    forms = {
        "v4.1 form": te.EngramConfig(
            engram_vocab_size=(500_000,) * 3,
            max_ngram_size=4,
            n_embed_per_ngram=512,
            layer_ids=(1,),
            use_conv=False,
            proj_bias=False,
            gate_eps=1e-20,
        ),
        "demo form": te.EngramConfig(engram_vocab_size=(500_000,) * 2, layer_ids=(1,)),
    }
    D, M, C = args.hidden, 4, args.context
    for form, cfg in forms.items():
        hasher = te.NgramHasher(cfg, lut=comp.lut)
        for B in (1, 32):
            torch.manual_seed(0)  # the same bfloat16 layer for every batch size
            eng = te.Engram(cfg, 1, D, hc_mult=M, hasher=hasher, dtype=torch.bfloat16)
            eng.requires_grad_(False)
            bf16_bytes = eng.table.weight.nbytes
            ids = corpus_ids(tok, B * (C + 1)).view(B, C + 1)
            hidden = torch.randn(B, C + 1, M, D, dtype=torch.bfloat16)
            for storage in ("bf16", "fp8"):
                if storage == "fp8":
                    eng.table.quantize_fp8_()
                    fp8_bytes = eng.table.weight.nbytes + eng.table.weight_scale.nbytes
                    if B == 1:
                        record("layer", f"{form}: table bytes", bf16_MiB=bf16_bytes / 2**20,
                               fp8_MiB=fp8_bytes / 2**20, ratio=fp8_bytes / bf16_bytes)  # fmt: skip
                with torch.inference_mode():
                    state = te.EngramState(cfg, B)
                    eng(hidden[:, :C], input_ids=ids[:, :C], state=state)  # the context

                    def step(state=state):
                        # One new token; the state is copied so every repetition sees the same context.
                        s = te.EngramState(cfg, B)
                        s.ids, s.filled, s.conv = state.ids, state.filled, dict(state.conv)
                        return eng(hidden[:, C:], input_ids=ids[:, C:], state=s)

                    t_state = timed(step, args.reps)
                    t_full = timed(lambda: eng(hidden, input_ids=ids)[:, -1:], max(3, args.reps // 4))
                record(
                    "layer",
                    f"{form}: B={B} {storage} table",
                    state_ms=t_state * 1e3,
                    recompute_ms=t_full * 1e3,
                    speedup=t_full / t_state,
                    tok_s=B / t_state,
                )


def model_part(args, tok, comp) -> None:
    V = tok.get_vocab_size()
    ecfg = te.EngramConfig(
        engram_vocab_size=(500_000, 500_000),
        n_embed_per_ngram=128,
        n_head_per_ngram=4,
        layer_ids=(1, 2),
        compressed_vocab_size=None,
    )
    cfg = ModelConfig(
        vocab_size=V,
        d_model=256,
        n_layers=4,
        n_heads=4,
        max_seq_len=args.context + args.new_tokens,
        n_routed_experts=16,
        top_k=2,
        d_expert=128,
        d_shared=256,
        engram=ecfg,
    )
    torch.manual_seed(0)
    model = TransformerLM(cfg, lut=comp.lut).eval()
    for B in (1, 32):
        prompts = corpus_ids(tok, B * args.context).view(B, args.context).tolist()
        for storage in ("bf16", "fp8"):
            # The model in float32 (so that both decodings give the same tokens), its Engram
            # tables in bfloat16, then in FP8.
            for e in model.engram_modules():
                if storage == "fp8":
                    e.table.quantize_fp8_()
                else:
                    e.table.to(torch.bfloat16)
            with torch.inference_mode():
                n = args.new_tokens
                t0 = time.perf_counter()
                a = model.generate(prompts, n)
                t_cache = time.perf_counter() - t0
                t0 = time.perf_counter()
                b = model.generate(prompts, n, use_cache=False)
                t_full = time.perf_counter() - t0
            record(
                "model",
                f"generate B={B} {storage} tables, {n} new",
                cache_tok_s=B * n / t_cache,
                recompute_tok_s=B * n / t_full,
                speedup=t_full / t_cache,
                same=a == b,
            )
        torch.manual_seed(0)
        model = TransformerLM(cfg, lut=comp.lut).eval()  # unquantised tables for the next batch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="layer,model")
    ap.add_argument("--context", type=int, default=256, help="tokens before the decoded one")
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    tok = default_tokenizer()
    comp = te.build_compression(tok)
    header = dict(
        machine=platform.processor() or platform.machine(),
        threads=torch.get_num_threads(),
        torch=torch.__version__,
        date=time.strftime("%Y-%m-%d"),
    )
    print("# " + ", ".join(f"{k}={v}" for k, v in header.items()))
    parts = set(args.parts.split(","))
    if "layer" in parts:
        layer_part(args, tok, comp)
    if "model" in parts:
        model_part(args, tok, comp)
    if args.json:
        Path(args.json).write_text(json.dumps(dict(header=header, results=RESULTS), indent=1))


if __name__ == "__main__":
    main()
