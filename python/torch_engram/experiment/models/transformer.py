"""Reference decoder-only MoE transformer with Engram layers (docs/SPEC.md section 6 placement)."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ...hashing import NgramHasher
from .config import ModelConfig
from .moe import MoE, SwiGLU


def _rotary_tables(head_dim: int, max_seq_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), inv_freq)
    return angles.cos().float(), angles.sin().float()


def _apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Half-split rotary embedding on x [B, heads, T, head_dim]; cos/sin [T, head_dim / 2]."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x.dtype)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.head_dim = cfg.n_heads, cfg.head_dim
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.out = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = _apply_rotary(q, cos, sin), _apply_rotary(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(B, T, D))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int, engram: nn.Module | None):
        super().__init__()
        self.layer_id = layer_id
        self.engram = engram
        self.attn_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.attn = CausalSelfAttention(cfg)
        self.ffn_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        if layer_id < cfg.n_dense_layers:
            self.ffn: nn.Module = SwiGLU(cfg.d_model, cfg.d_dense)
        else:
            self.ffn = MoE(cfg.d_model, cfg.n_routed_experts, cfg.top_k, cfg.d_expert, cfg.d_shared, cfg.routing)

    def forward(self, h: torch.Tensor, cos, sin, rows: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """h: [B, T, D] (M = 1) or [B, T, M, D]; returns (h, aux_loss)."""
        if self.engram is not None:
            h = h + self.engram(h, rows=rows)
        multi = h.dim() == 4
        x = h.mean(dim=2) if multi else h
        a = self.attn(self.attn_norm(x), cos, sin)
        h = h + (a.unsqueeze(2) if multi else a)
        x = h.mean(dim=2) if multi else h
        if isinstance(self.ffn, MoE):
            f, aux = self.ffn(self.ffn_norm(x))
        else:
            f, aux = self.ffn(self.ffn_norm(x)), h.new_zeros((), dtype=torch.float32)
        h = h + (f.unsqueeze(2) if multi else f)
        return h, aux


@dataclass
class LMOutput:
    logits: torch.Tensor
    loss: torch.Tensor | None  # mean next-token cross entropy (nats), without the aux loss
    aux_loss: torch.Tensor  # mean load-balancing loss over MoE blocks (unscaled)


def _default_engram_factory(
    cfg,
    layer_id: int,
    hidden_size: int,
    hc_mult: int,
    table_grad: str,
    table_optimizer: str = "partial_rowwise_adam",
    table_options: dict | None = None,
) -> nn.Module:
    from ...modules import Engram

    return Engram(
        cfg,
        layer_id=layer_id,
        hidden_size=hidden_size,
        hc_mult=hc_mult,
        table_grad=table_grad,
        table_optimizer=table_optimizer,
        table_options=table_options,
    )


EngramFactory = Callable[..., nn.Module]


class TransformerLM(nn.Module):
    """Decoder-only LM. `lut` is the tokenizer-compression LUT given to the n-gram hasher (or None
    when cfg.engram.compressed_vocab_size is set). Row ids of all Engram layers are hashed once per
    forward from the token ids, then each Engram block reads its own slice.

    table_grad, table_optimizer: how Engram tables learn ("fused" into backward, "sparse" COO or
    "dense" gradients; "adam", "partial_rowwise_adam", "rowwise_adagrad" or "sgd"; see
    torch_engram.table). table_options: more EngramTable arguments for every Engram layer, e.g.
    dict(placement="host", cache_rows=...) (a "file" placement needs a path per layer: use
    engram_factory). engram_factory(engram_config, layer_id=, hidden_size=, hc_mult=, table_grad=,
    table_optimizer=) builds each Engram layer (default: torch_engram.Engram).
    """

    def __init__(
        self,
        cfg: ModelConfig,
        lut: torch.Tensor | None = None,
        engram_factory: EngramFactory | None = None,
        table_grad: str = "fused",
        table_optimizer: str = "partial_rowwise_adam",
        table_options: dict | None = None,
    ):
        super().__init__()
        self.cfg = cfg
        D, M = cfg.d_model, cfg.hc_mult
        self.embed = nn.Embedding(cfg.vocab_size, D)
        self.hasher = NgramHasher(cfg.engram, lut=lut) if cfg.engram is not None else None
        if engram_factory is None:
            factory = functools.partial(_default_engram_factory, table_options=table_options)
        elif table_options is not None:
            raise ValueError(
                "TransformerLM: pass table_options to the default Engram factory, or build tables in yours"
            )
        else:
            factory = engram_factory
        engram_ids = set(cfg.engram.layer_ids) if cfg.engram is not None else set()
        self.blocks = nn.ModuleList(
            Block(
                cfg,
                i,
                factory(
                    cfg.engram,
                    layer_id=i,
                    hidden_size=D,
                    hc_mult=M,
                    table_grad=table_grad,
                    table_optimizer=table_optimizer,
                )
                if i in engram_ids
                else None,
            )
            for i in range(cfg.n_layers)
        )
        self.norm = nn.RMSNorm(D, eps=cfg.norm_eps)
        self.lm_head = nn.Linear(D, cfg.vocab_size, bias=False)
        cos, sin = _rotary_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self._init_weights()
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    def _init_weights(self) -> None:
        # GPT-2 style: N(0, 0.02), residual output projections scaled by 1/sqrt(2 * n_layers).
        std, out_std = 0.02, 0.02 / math.sqrt(2 * self.cfg.n_layers)
        nn.init.normal_(self.embed.weight, std=std)
        nn.init.normal_(self.lm_head.weight, std=std)
        for block in self.blocks:
            nn.init.normal_(block.attn.qkv.weight, std=std)
            nn.init.normal_(block.attn.out.weight, std=out_std)
            ffn = block.ffn
            swiglus = [ffn] if isinstance(ffn, SwiGLU) else ([ffn.shared] if ffn.shared is not None else [])
            for s in swiglus:
                nn.init.normal_(s.w13.weight, std=std)
                nn.init.normal_(s.w2.weight, std=out_std)
            if isinstance(ffn, MoE):
                nn.init.normal_(ffn.router.weight, std=std)
                nn.init.normal_(ffn.w1, std=std)
                nn.init.normal_(ffn.w3, std=std)
                nn.init.normal_(ffn.w2, std=out_std)
            if block.engram is None:
                continue
            with torch.no_grad():
                nn.init.normal_(block.engram.table.weight, std=self.cfg.engram_table_init_std)
            kv = getattr(block.engram, "kv_proj", None)
            if kv is not None:
                # The value rows get the residual-output std, like attention's output projection,
                # so Engram's update starts small; keys are RMS-normalised, their scale is
                # irrelevant. Layout: M key blocks of D rows, then the value.
                M_D = self.cfg.hc_mult * self.cfg.d_model
                with torch.no_grad():
                    nn.init.normal_(kv.weight[:M_D], std=std)
                    nn.init.normal_(kv.weight[M_D:], std=out_std)
                    if kv.bias is not None:
                        nn.init.zeros_(kv.bias)

    # Parameter roles, for optimizer groups and the allocation cross-check -------------------
    def engram_modules(self) -> list[nn.Module]:
        return [b.engram for b in self.blocks if b.engram is not None]

    def moe_modules(self) -> list[MoE]:
        return [b.ffn for b in self.blocks if isinstance(b.ffn, MoE)]

    def table_parameters(self) -> list[nn.Parameter]:
        return [e.table.weight for e in self.engram_modules()]

    def dense_parameters(self) -> list[nn.Parameter]:
        """Every parameter that is not an Engram table (backbone, Engram projections/norms/conv)."""
        tables = {id(p) for p in self.table_parameters()}
        return [p for p in self.parameters() if id(p) not in tables]

    def prefetch(self, input_ids: torch.Tensor) -> None:
        """Start bringing the rows of a later batch's input_ids into the caches of host- or
        file-placed Engram tables (hashed once for every layer); no-op for tables on the device."""
        if self.hasher is None:
            return
        rows = None
        for block in self.blocks:
            if block.engram is not None and block.engram.table.placement != "device":
                rows = self.hasher(input_ids) if rows is None else rows
                block.engram.table.prefetch(rows[self.hasher.layer_index(block.layer_id)])

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor | None = None) -> LMOutput:
        B, T = input_ids.shape
        if T > self.cfg.max_seq_len:
            raise ValueError(f"TransformerLM: sequence length must be <= max_seq_len={self.cfg.max_seq_len}, got {T}")
        h = self.embed(input_ids)
        if self.cfg.hc_mult > 1:
            h = h.unsqueeze(2).expand(B, T, self.cfg.hc_mult, self.cfg.d_model).contiguous()
        rows = self.hasher(input_ids) if self.hasher is not None else None
        cos, sin = self.rope_cos[:T], self.rope_sin[:T]
        aux_total = h.new_zeros((), dtype=torch.float32)
        n_moe = 0
        for block in self.blocks:
            block_rows = rows[self.hasher.layer_index(block.layer_id)] if block.engram is not None else None
            h, aux = block(h, cos, sin, block_rows)
            if isinstance(block.ffn, MoE):
                aux_total, n_moe = aux_total + aux, n_moe + 1
        if h.dim() == 4:
            h = h.mean(dim=2)
        logits = self.lm_head(self.norm(h))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
        return LMOutput(logits, loss, aux_total / max(n_moe, 1))
