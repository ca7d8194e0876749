"""Engram in a Hugging Face model: a small Qwen3-MoE-style causal LM built from its config (no
download), trained on the built-in real text with and without Engram on the same batches, then
saved, loaded back and asked to continue a prompt.

    pip install torch-engram[hf]
    python examples/hf_engram.py [--steps 300] [--out results/hf_engram]

The Engram layers go into decoder layers 1 and 2 (before their attention); the tables train inside
backward at 5x the base learning rate with no weight decay, the rest with AdamW.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
import transformers as hf

import torch_engram as te
from torch_engram.experiment.corpus import default_tokenizer, encode_documents, load_documents, split_train_val
from torch_engram.integrations.transformers import add_engram, from_pretrained, set_table_lr


def model_config(vocab: int) -> hf.Qwen3MoeConfig:
    return hf.Qwen3MoeConfig(
        vocab_size=vocab,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        num_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=64,
        decoder_sparse_step=1,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )


def engram_config() -> te.EngramConfig:
    # Orders 2-3, 4 heads per order, d_head 16: 8 tables of ~20k rows per layer.
    return te.EngramConfig(
        engram_vocab_size=(20_000, 20_000), n_embed_per_ngram=64, n_head_per_ngram=4, layer_ids=(1, 2), pad_id=2
    )


def run(args, tok, train_ids, val_ids, with_engram: bool):
    torch.manual_seed(args.seed)
    model = hf.AutoModelForCausalLM.from_config(model_config(tok.get_vocab_size()))
    if with_engram:
        add_engram(model, engram_config(), tokenizer=tok, lr=args.lr)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1)
    g = torch.Generator().manual_seed(args.seed)
    B, T = args.batch_size, args.seq_len
    losses, t0 = [], time.perf_counter()
    model.train()
    for step in range(args.steps):
        lr = args.lr * min(1.0, (step + 1) / 20)  # warm-up, then constant
        for group in opt.param_groups:
            group["lr"] = lr
        if with_engram:
            set_table_lr(model, lr)
        starts = torch.randint(0, train_ids.numel() - T - 1, (B,), generator=g)
        x = torch.stack([train_ids[s : s + T] for s in starts.tolist()])
        out = model(x, labels=x)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(out.loss.item())
    model.eval()
    n = val_ids.numel() // T * T
    with torch.no_grad():
        val = sum(model(c.view(1, -1), labels=c.view(1, -1)).loss.item() for c in val_ids[:n].view(-1, T)) / (n // T)
    secs = time.perf_counter() - t0
    tail = losses[-20:]
    print(
        f"{'with Engram' if with_engram else 'without   '}: train loss (last 20 steps) {sum(tail) / len(tail):.3f}, "
        f"val loss {val:.3f} ({math.exp(val):.1f} perplexity), {sum(p.numel() for p in model.parameters()):,} "
        f"parameters, {secs:.0f} s"
    )
    return model, val


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-bytes", type=int, default=3_000_000, help="of the built-in corpus")
    ap.add_argument("--out", default="results/hf_engram")
    args = ap.parse_args(argv)
    tok = default_tokenizer()
    train_docs, val_docs = split_train_val(load_documents(max_bytes=args.max_bytes), 0.05, seed=0)
    train_ids = encode_documents(tok, train_docs).ids
    val_ids = encode_documents(tok, val_docs).ids[: 64 * args.seq_len]
    print(f"{train_ids.numel():,} training tokens, {val_ids.numel():,} validation tokens, vocab {tok.get_vocab_size()}")
    _, val_plain = run(args, tok, train_ids, val_ids, with_engram=False)
    model, val_engram = run(args, tok, train_ids, val_ids, with_engram=True)
    out = Path(args.out)
    model.save_pretrained(out)
    back = from_pretrained(out).eval()
    prompt = torch.tensor([tok.encode("The list of arguments", add_special_tokens=False).ids])
    a = back.generate(
        prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=24, do_sample=False, pad_token_id=2
    )
    b = model.generate(
        prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=24, do_sample=False, pad_token_id=2
    )
    print(f"saved to {out} and loaded back; same continuation: {torch.equal(a, b)}")
    print(f"continuation: {tok.decode(a[0, prompt.shape[1] :].tolist())!r}")
    return dict(val_plain=val_plain, val_engram=val_engram, same=torch.equal(a, b))


if __name__ == "__main__":
    main()
