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
from ...state import EngramState
from .config import ModelConfig
from .moe import MoE, SwiGLU


def _rotary_tables(head_dim: int, max_seq_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), inv_freq)
    return angles.cos().float(), angles.sin().float()


def _apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Half-split rotary embedding on x [B, heads, T, head_dim]; cos/sin [T, head_dim / 2] (or
    [B, 1, T, head_dim / 2] for per-sequence positions)."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x.dtype)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.head_dim = cfg.n_heads, cfg.head_dim
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.out = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: tuple | None = None
    ) -> torch.Tensor:
        """cache: (keys, values [B, heads, max_seq_len, head_dim], positions [B, T]) of a decode
        step: the new keys and values are written at their positions, and each query attends to
        every cached position up to its own."""
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = _apply_rotary(q, cos, sin), _apply_rotary(k, cos, sin)
        if cache is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            keys, values, positions = cache
            at = positions.view(B, 1, T, 1).expand(B, self.n_heads, T, self.head_dim)
            keys.scatter_(2, at, k)
            values.scatter_(2, at, v)
            span = int(positions.max()) + 1
            visible = torch.arange(span, device=x.device).view(1, 1, 1, span) <= positions.view(B, 1, T, 1)
            y = F.scaled_dot_product_attention(q, keys[:, :, :span], values[:, :, :span], attn_mask=visible)
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

    def forward(
        self, h: torch.Tensor, cos, sin, rows: torch.Tensor | None, cache: DecodeCache | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """h: [B, T, D] (M = 1) or [B, T, M, D]; returns (h, aux_loss)."""
        if self.engram is not None:
            if cache is None:
                h = h + self.engram(h, rows=rows)
            else:
                h = h + self.engram(h, rows=rows, state=cache.engram, lengths=cache.step_lengths)
        multi = h.dim() == 4
        x = h.mean(dim=2) if multi else h
        kv = None if cache is None else (*cache.kv[self.layer_id], cache.step_positions)
        a = self.attn(self.attn_norm(x), cos, sin, kv)
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


class DecodeCache:
    """What TransformerLM carries between decode steps of B sequences: each block's keys and
    values, each sequence's length so far, and the Engram layers' EngramState (n-gram and conv
    histories). Made by TransformerLM.new_cache."""

    def __init__(self, model: TransformerLM, batch_size: int):
        cfg = model.cfg
        p = model.lm_head.weight
        # One spare position past max_seq_len: where the padding of a right-padded step writes.
        shape = (batch_size, cfg.n_heads, cfg.max_seq_len + 1, cfg.head_dim)
        self.kv = [(p.new_zeros(shape), p.new_zeros(shape)) for _ in range(cfg.n_layers)]
        self.lengths = torch.zeros(batch_size, dtype=torch.int64, device=p.device)
        self.engram = EngramState(cfg.engram, batch_size, device=p.device) if cfg.engram is not None else None
        self.batch_size = batch_size
        # Set for the duration of one forward.
        self.step_lengths: torch.Tensor | None = None
        self.step_positions: torch.Tensor | None = None

    def reset(self, mask: torch.Tensor | None = None) -> None:
        """Start sequences anew (all, or where mask [B] is True)."""
        mask = torch.ones_like(self.lengths, dtype=torch.bool) if mask is None else mask.to(self.lengths.device)
        self.lengths.masked_fill_(mask, 0)
        if self.engram is not None:
            self.engram.reset(mask)


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
            # Through the table, so a host- or file-placed one initialises its rows (lazily, on
            # their first fetch) with this std too, not only the cache slots.
            block.engram.table_init_std = self.cfg.engram_table_init_std
            block.engram.table.init_std = self.cfg.engram_table_init_std
            block.engram.table.reset_parameters()
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

    @torch.no_grad()
    def generate(
        self,
        prompts: list[list[int]] | torch.Tensor,
        max_new_tokens: int,
        *,
        temperature: float = 0.0,
        top_k: int | None = None,
        seed: int = 0,
        use_cache: bool = True,
        eos_id: int | None = None,
    ) -> list[list[int]]:
        """The new tokens of each prompt (lists of ids, lengths may differ; or a [B, T] tensor).

        temperature 0: greedy; else sampling from softmax(logits / temperature), restricted to the
        top_k most likely tokens when top_k is set, from a generator seeded with `seed` (the same
        seed gives the same tokens). use_cache: decode with the KV cache and the Engram state (one
        token per step); False recomputes every prefix in full (the same tokens, far slower).
        A sequence stops after eos_id; generation stops when all have."""
        if isinstance(prompts, torch.Tensor):
            prompts = prompts.tolist()
        B = len(prompts)
        lens = [len(p) for p in prompts]
        if B == 0 or min(lens) == 0:
            raise ValueError("TransformerLM.generate: prompts must be non-empty lists of token ids")
        if max_new_tokens < 0:
            raise ValueError(f"TransformerLM.generate: max_new_tokens must be >= 0, got {max_new_tokens}")
        if max(lens) + max_new_tokens > self.cfg.max_seq_len:
            raise ValueError(
                f"TransformerLM.generate: the longest prompt ({max(lens)}) plus max_new_tokens "
                f"({max_new_tokens}) exceeds max_seq_len={self.cfg.max_seq_len}"
            )
        if temperature < 0 or (top_k is not None and top_k < 1):
            raise ValueError(
                f"TransformerLM.generate: need temperature >= 0 and top_k >= 1, got {temperature} and {top_k}"
            )
        dev = self.lm_head.weight.device
        gen = torch.Generator(device=dev)
        gen.manual_seed(seed)
        seqs = [list(p) for p in prompts]
        out: list[list[int]] = [[] for _ in range(B)]
        done = [False] * B

        def padded(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
            n = max(len(r) for r in rows)
            x = torch.tensor([r + [0] * (n - len(r)) for r in rows], dtype=torch.int64, device=dev)
            return x, torch.tensor([len(r) for r in rows], dtype=torch.int64, device=dev)

        cache = self.new_cache(B) if use_cache else None
        x, lengths = padded(seqs)
        for step in range(max_new_tokens):
            logits = self(x, cache=cache, lengths=lengths if use_cache else None).logits
            last = logits[torch.arange(B, device=dev), lengths - 1].float()
            if temperature == 0:
                tok = last.argmax(dim=-1)
            else:
                last = last / temperature
                if top_k is not None and top_k < last.shape[-1]:
                    kth = last.topk(top_k, dim=-1).values[:, -1:]
                    last = last.masked_fill(last < kth, float("-inf"))
                tok = torch.multinomial(last.softmax(dim=-1), 1, generator=gen).view(B)
            for b, t in enumerate(tok.tolist()):
                if not done[b]:
                    out[b].append(t)
                    done[b] = eos_id is not None and t == eos_id
                seqs[b].append(t)
            if all(done) or step + 1 == max_new_tokens:
                break
            if use_cache:
                x, lengths = tok.view(B, 1), torch.ones(B, dtype=torch.int64, device=dev)
            else:
                x, lengths = padded(seqs)
        return out

    def new_cache(self, batch_size: int) -> DecodeCache:
        """An empty decode cache for batch_size sequences (see forward's cache argument)."""
        return DecodeCache(self, batch_size)

    def forward(
        self,
        input_ids: torch.Tensor,
        targets: torch.Tensor | None = None,
        cache: DecodeCache | None = None,
        lengths: torch.Tensor | None = None,
    ) -> LMOutput:
        """input_ids [B, T]. cache: a DecodeCache; the T tokens then follow what each sequence has
        seen so far, and the logits equal those of the whole sequence at their positions (within
        float rounding: BLAS and attention kernels round a short step differently). lengths [B]:
        valid tokens per sequence of a right-padded step (cache only)."""
        B, T = input_ids.shape
        if cache is None:
            if lengths is not None:
                raise ValueError("TransformerLM: lengths are for decode steps with a cache")
            if T > self.cfg.max_seq_len:
                raise ValueError(
                    f"TransformerLM: sequence length must be <= max_seq_len={self.cfg.max_seq_len}, got {T}"
                )
            cos, sin = self.rope_cos[:T], self.rope_sin[:T]
        else:
            if cache.batch_size != B:
                raise ValueError(f"TransformerLM: the cache holds {cache.batch_size} sequences, input_ids has {B}")
            steps = torch.full_like(cache.lengths, T) if lengths is None else lengths.to(cache.lengths)
            if bool(((steps < 0) | (steps > T)).any()):
                raise ValueError(f"TransformerLM: lengths must lie in [0, {T}], got {steps.tolist()}")
            L = self.cfg.max_seq_len
            end = int((cache.lengths + steps).max())
            if end > L:
                raise ValueError(f"TransformerLM: a sequence would reach {end} tokens, max_seq_len is {L}")
            offs = torch.arange(T, device=input_ids.device).view(1, T)
            # Padding tokens write their keys and values to the cache's spare slot L, which no
            # valid query sees; their outputs are meaningless.
            positions = torch.where(offs < steps.view(B, 1), cache.lengths.view(B, 1) + offs, L)
            rope_at = positions.clamp(max=L - 1)
            cos, sin = self.rope_cos[rope_at].unsqueeze(1), self.rope_sin[rope_at].unsqueeze(1)
            cache.step_lengths, cache.step_positions = steps, positions
        h = self.embed(input_ids)
        if self.cfg.hc_mult > 1:
            h = h.unsqueeze(2).expand(B, T, self.cfg.hc_mult, self.cfg.d_model).contiguous()
        # A decode step that fails halfway leaves the cache as it was: the Engram histories are
        # replaced (never written in place) by a step, so keeping the old ones restores them, and
        # keys and values written past the sequences' lengths are overwritten by the next step.
        kept = None if cache is None or cache.engram is None else cache.engram.snapshot()
        try:
            rows = None
            if self.hasher is not None:
                rows = (
                    self.hasher(input_ids)
                    if cache is None
                    else cache.engram.hash(self.hasher, input_ids, lengths=steps)
                )
            aux_total = h.new_zeros((), dtype=torch.float32)
            n_moe = 0
            for block in self.blocks:
                block_rows = rows[self.hasher.layer_index(block.layer_id)] if block.engram is not None else None
                h, aux = block(h, cos, sin, block_rows, cache)
                if isinstance(block.ffn, MoE):
                    aux_total, n_moe = aux_total + aux, n_moe + 1
            if h.dim() == 4:
                h = h.mean(dim=2)
            logits = self.lm_head(self.norm(h))
        except BaseException:
            if kept is not None:
                cache.engram.restore(kept)
            raise
        finally:
            if cache is not None:
                cache.step_lengths = cache.step_positions = None
        if cache is not None:
            cache.lengths += steps
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
        return LMOutput(logits, loss, aux_total / max(n_moe, 1))
