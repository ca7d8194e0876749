"""Engram: the drop-in nn.Module (hashing -> multi-head gather -> gate -> short conv).

The module returns the update to add to the residual stream(s); the caller adds it before the
block's attention (docs/SPEC.md section 6).
"""

from __future__ import annotations

import torch
from torch import nn

from . import ops
from .config import EngramConfig
from .hashing import NgramHasher, TableLayout
from .state import EngramState, linear_rows
from .table import GRAD_MODES as TABLE_GRAD_MODES
from .table import EngramTable


class Engram(nn.Module):
    """One Engram layer (docs/SPEC.md sections 3-5).

    Args:
        config: the model's EngramConfig; `layer_id` must be one of `config.layer_ids`.
        hidden_size: D. hc_mult: M, the number of residual branches (hidden [B, T, M, D]).
        hasher: an NgramHasher shared by all Engram layers; needed to call forward with input_ids
            (precomputed `rows` work without one). When given it is a submodule, so its buffers
            (LUT, multipliers, primes, offsets) are in the state_dict.
        table_grad: "fused" (default: the table's optimizer runs inside backward), "sparse"
            (coalesced sparse COO .grad) or "dense" (ordinary .grad); see torch_engram.table.
        table_optimizer: the table's optimizer ("adam", "partial_rowwise_adam",
            "rowwise_adagrad", "sgd"); table_options: further EngramTable arguments (lr,
            state_dtype, seed, placement, storage, dtype for a table dtype other than the layer's, ...).
        fold_gains: one fp32 gate gain w = w_q * w_k per branch (TileKernels/V4.1) instead of
            separate query and key RMSNorm gains (official demo).
        table_init_std: tables start as N(0, std^2); 1.0 matches nn.Embedding in the official demo.

    Submodules and parameters: `table` (an EngramTable: weight [rows, d_head] and its optimizer
    state); `kv_proj` one fused GEMM producing M keys and the value
    ([(M + 1) * D, d_mem], keys first); gate gains; conv RMSNorm gains and depthwise conv weight
    [M * D, kernel_size] (zero-initialised, so the conv branch starts as the identity).
    """

    def __init__(
        self,
        config: EngramConfig,
        layer_id: int,
        hidden_size: int,
        hc_mult: int = 1,
        hasher: NgramHasher | None = None,
        table_grad: str = "fused",
        fold_gains: bool = False,
        table_init_std: float = 1.0,
        table_optimizer: str = "partial_rowwise_adam",
        table_options: dict | None = None,
        device=None,
        dtype=None,
    ):
        super().__init__()
        if layer_id not in config.layer_ids:
            raise ValueError(f"Engram: layer_id must be one of config.layer_ids={config.layer_ids}, got {layer_id}")
        if hidden_size < 1:
            raise ValueError(f"Engram: hidden_size must be >= 1, got {hidden_size}")
        if hc_mult < 1:
            raise ValueError(f"Engram: hc_mult must be >= 1, got {hc_mult}")
        if table_grad not in TABLE_GRAD_MODES:
            raise ValueError(f"Engram: table_grad must be one of {TABLE_GRAD_MODES}, got {table_grad!r}")
        if hasher is not None and hasher.config != config:
            raise ValueError("Engram: hasher.config must equal config")
        self.config = config
        self.layer_id = layer_id
        self.layer_index = config.layer_ids.index(layer_id)
        self.hidden_size = hidden_size
        self.hc_mult = hc_mult
        self.table_grad = table_grad
        self.fold_gains = fold_gains
        self.table_init_std = table_init_std
        self.hasher = hasher
        # capture_gate: forward keeps the gate values alpha [B, T, M] in last_gate (analyses;
        # the forward is then not differentiable in the gate's inputs).
        self.capture_gate = False
        self.last_gate: torch.Tensor | None = None
        rows = hasher.rows_per_layer if hasher is not None else TableLayout.from_config(config).rows_per_layer
        self.num_rows = rows[self.layer_index]
        factory = dict(device=device, dtype=dtype)
        D, M = hidden_size, hc_mult
        self.table = EngramTable(
            self.num_rows,
            config.d_head,
            grad=table_grad,
            optimizer=table_optimizer,
            init_std=table_init_std,
            init=False,  # reset_parameters below fills it once
            # table_options may give the table its own dtype (bfloat16 rows in a float32 layer).
            **{**factory, **(table_options or {})},
        )
        self.kv_proj = nn.Linear(config.d_mem, (M + 1) * D, bias=config.proj_bias, **factory)
        gain = dict(
            device=device,
            dtype=torch.float32 if dtype in (None, torch.float32, torch.bfloat16, torch.float16) else dtype,
        )
        if fold_gains:
            self.gate_weight = nn.Parameter(torch.empty(M, D, **gain))
        else:
            self.norm_q_weight = nn.Parameter(torch.empty(M, D, **gain))
            self.norm_k_weight = nn.Parameter(torch.empty(M, D, **gain))
        if config.use_conv:
            self.conv_norm_weight = nn.Parameter(torch.empty(M, D, **gain))
            self.conv_weight = nn.Parameter(torch.empty(M * D, config.kernel_size, **gain))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self.table.init_std = self.table_init_std
        self.table.reset_parameters()
        self.kv_proj.reset_parameters()
        for name in ("gate_weight", "norm_q_weight", "norm_k_weight", "conv_norm_weight"):
            if hasattr(self, name):
                nn.init.ones_(getattr(self, name))
        if self.config.use_conv:
            nn.init.zeros_(self.conv_weight)

    def dense_parameters(self):
        """Every parameter but the table's weight and the hasher's (the dense optimizer's share)."""
        for name, p in self.named_parameters():
            if not name.startswith(("table.", "hasher.")):
                yield p

    def gate_gain(self) -> torch.Tensor:
        """The folded gain w = w_q * w_k [M, D] the fused gate kernel uses."""
        return self.gate_weight if self.fold_gains else self.norm_q_weight * self.norm_k_weight

    def gather(self, rows: torch.Tensor) -> torch.Tensor:
        """e [..., d_mem]: this layer's H rows per token, concatenated order-major, head-minor."""
        return self.table(rows)

    def forward(
        self,
        hidden: torch.Tensor,
        input_ids: torch.Tensor | None = None,
        rows: torch.Tensor | None = None,
        doc_start: torch.Tensor | None = None,
        state: EngramState | None = None,
        lengths: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """hidden [B, T, D] (M = 1) or [B, T, M, D]; rows [B, T, H] of this layer, or input_ids [B, T]
        hashed by the attached hasher. Returns the update, shaped like hidden.

        state: an EngramState for incremental decoding: the T tokens follow everything the state
        has seen, and the result equals the full forward's at their positions (bit for bit on the
        CPU). With input_ids, the state's n-gram history is advanced here (one Engram layer); with
        several layers, hash once with state.hash and pass each layer its rows. lengths [B]: valid
        new tokens per sequence of a right-padded batch (see EngramState)."""
        M, D = self.hc_mult, self.hidden_size
        squeeze = hidden.dim() == 3
        if squeeze:
            if M != 1:
                raise ValueError(
                    f"Engram: hidden must be [B, T, M={M}, D={D}] for hc_mult={M}, got {tuple(hidden.shape)}"
                )
            hidden = hidden.unsqueeze(2)
        if hidden.dim() != 4 or hidden.shape[2:] != (M, D):
            raise ValueError(f"Engram: hidden must be [B, T, {M}, {D}] or [B, T, {D}], got {tuple(hidden.shape)}")
        if rows is None:
            if input_ids is None:
                raise ValueError("Engram: pass input_ids or rows")
            if self.hasher is None:
                raise ValueError("Engram: input_ids need a hasher (Engram(..., hasher=NgramHasher(config)))")
            if state is not None:
                rows = state.hash(self.hasher, input_ids, doc_start=doc_start, lengths=lengths)[self.layer_index]
            else:
                rows = self.hasher(input_ids, doc_start=doc_start)[self.layer_index]
        elif rows.dim() != 3 or rows.shape[-1] != self.config.num_heads:
            raise ValueError(f"Engram: rows must be [B, T, H={self.config.num_heads}], got {tuple(rows.shape)}")
        if rows.shape[:2] != hidden.shape[:2]:
            raise ValueError(
                f"Engram: rows {tuple(rows.shape[:2])} and hidden {tuple(hidden.shape[:2])} must share [B, T]"
            )
        e = self.gather(rows).to(self.kv_proj.weight.dtype)
        # [B, T, (M + 1) * D]: M keys, then the value
        kv = (self.kv_proj(e) if state is None else linear_rows(e, self.kv_proj)).to(hidden.dtype)
        eps = self.config.gate_eps if self.config.gate_eps is not None else torch.finfo(hidden.dtype).eps
        if self.capture_gate:
            # For analyses: the same kernel's forward with its statistics (not differentiable).
            u, alpha = torch.ops.engram._engram_gate_forward(hidden, kv, self.gate_gain(), eps)[:2]
            self.last_gate = alpha.detach()  # [B, T, M]
        else:
            u = ops.engram_gate(hidden, kv, self.gate_gain(), eps)  # reads kv in place, no key/value copies
        if self.config.use_conv:
            if state is None:
                u = self._conv(u)
            else:
                u = state.conv_step(self.layer_id, u, self._conv, lengths)
        return u.squeeze(2) if squeeze else u

    def _conv(self, u: torch.Tensor) -> torch.Tensor:
        return ops.short_conv(u, self.conv_norm_weight, self.conv_weight, self.config.dilation, self.config.conv_eps)

    def prefetch(self, input_ids: torch.Tensor | None = None, rows: torch.Tensor | None = None, doc_start=None) -> None:
        """Start bringing a later step's rows into the cache of a host- or file-placed table (a
        background thread) from its input_ids [B, T] (hashed by the attached hasher) or its rows
        [B, T, H]; the forward of that step waits for it. No-op for placement='device'."""
        if self.table.placement == "device":
            return
        if rows is None:
            if input_ids is None or self.hasher is None:
                raise ValueError("Engram.prefetch: pass rows, or input_ids with a hasher attached")
            rows = self.hasher(input_ids, doc_start=doc_start)[self.layer_index]
        self.table.prefetch(rows)

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"layer_id={self.layer_id}, rows={self.num_rows}, d_head={c.d_head}, heads={c.num_heads}, "
            f"hidden_size={self.hidden_size}, hc_mult={self.hc_mult}, conv={c.use_conv}, "
            f"bias={c.proj_bias}, fold_gains={self.fold_gains}"
        )
