"""Engram slotted beside an MoE block: a one-block language model (embedding -> [Engram ->
attention -> top-k MoE] -> LM head) trained for a few steps on real text, once with Engram and
once without, on the same data and seed.

    python examples/engram_moe_block.py [--steps 40] [--table-grad dense|sparse|fused]

The Engram update is added to the residual stream before attention (docs/SPEC.md section 6). Tables
train with Adam at 5x the base learning rate and no weight decay (torch_engram.optim).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn

import torch_engram as te
from torch_engram.experiment.corpus import default_tokenizer, encode_documents, load_documents
from torch_engram.experiment.models.moe import MoE
from torch_engram.optim import make_optimizers


class Attention(nn.Module):
    def __init__(self, d_model: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.out = nn.Linear(d_model, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_heads, D // self.n_heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(B, T, D))


class Block(nn.Module):
    """h += Engram(h); h += Attn(norm(h)); h += MoE(norm(h))."""

    def __init__(self, d_model: int, engram: te.Engram | None):
        super().__init__()
        self.engram = engram
        self.attn_norm, self.ffn_norm = nn.RMSNorm(d_model), nn.RMSNorm(d_model)
        self.attn = Attention(d_model, n_heads=4)
        self.moe = MoE(d_model, n_experts=8, top_k=2, d_expert=2 * d_model, d_shared=2 * d_model)
        for w in self.moe.routed_parameters():
            nn.init.normal_(w, std=d_model**-0.5)

    def forward(self, h: torch.Tensor, rows: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        if self.engram is not None:
            h = h + self.engram(h, rows=rows)
        h = h + self.attn(self.attn_norm(h))
        f, aux = self.moe(self.ffn_norm(h))
        return h + f, aux


class TinyLM(nn.Module):
    def __init__(self, vocab: int, d_model: int, hasher: te.NgramHasher | None, table_grad: str):
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        engram = None
        if hasher is not None:
            engram = te.Engram(
                hasher.config,
                layer_id=0,
                hidden_size=d_model,
                hasher=hasher,
                table_grad=table_grad,
                table_init_std=0.02,
            )
        self.hasher = hasher
        self.block = Block(d_model, engram)
        self.norm = nn.RMSNorm(d_model)
        self.head = nn.Linear(d_model, vocab, bias=False)

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows = self.hasher(ids)[0] if self.hasher is not None else None  # known from ids alone
        h, aux = self.block(self.embed(ids), rows)
        return self.head(self.norm(h)), aux


def train(with_engram: bool, stream: torch.Tensor, lut: torch.Tensor, args) -> list[float]:
    torch.manual_seed(args.seed)
    hasher = None
    if with_engram:
        config = te.EngramConfig(
            engram_vocab_size=(20_000, 20_000),
            max_ngram_size=3,
            n_embed_per_ngram=64,
            n_head_per_ngram=4,
            layer_ids=(0,),
            pad_id=2,
            proj_bias=False,
        )
        hasher = te.NgramHasher(config, lut=lut)
    model = TinyLM(int(lut.numel()), args.d_model, hasher, args.table_grad)
    table_opt, rest_opt = make_optimizers(model, base_lr=args.lr, weight_decay=0.1)
    opts = [o for o in (table_opt, rest_opt) if o is not None]
    g = torch.Generator().manual_seed(args.seed)
    losses = []
    for _ in range(args.steps):
        start = torch.randint(0, stream.numel() - args.seq_len - 1, (args.batch,), generator=g)
        window = torch.stack([stream[s : s + args.seq_len + 1] for s in start.tolist()])
        logits, aux = model(window[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), window[:, 1:].flatten())
        for o in opts:
            o.zero_grad(set_to_none=True)
        (loss + 0.01 * aux).backward()
        for o in opts:
            o.step()
        losses.append(loss.item())
    return losses


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--table-grad", choices=("dense", "sparse", "fused"), default="fused")
    args = ap.parse_args()
    tok = default_tokenizer(vocab_size=2048)
    lut = te.build_compression(tok).lut
    stream = encode_documents(tok, load_documents(max_bytes=2_000_000)).ids
    print(f"real text: {stream.numel():,} tokens; vocabulary {lut.numel()} -> {int(lut.max()) + 1} compressed")
    for with_engram in (False, True):
        t0 = time.perf_counter()
        losses = train(with_engram, stream, lut, args)
        tail = sum(losses[-10:]) / min(10, len(losses))
        print(
            f"{'MoE + Engram' if with_engram else 'MoE only':<13} loss {losses[0]:.3f} -> {tail:.3f} "
            f"(mean of last 10 of {args.steps} steps, {time.perf_counter() - t0:.1f}s)"
        )


if __name__ == "__main__":
    main()
