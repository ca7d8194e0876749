"""The whole Engram layer in plain PyTorch, two ways: a functional oracle composed of the per-op
references (float64-capable), and the formulation a user would write from the official demo (one
nn.Embedding over the concatenated tables, nn.RMSNorm modules, nn.Conv1d), the benchmark peer."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .conv import DemoShortConv, short_conv
from .gate import DemoGate, engram_gate_separate


def engram_layer(
    hidden,
    rows,
    table,
    kv_weight,
    kv_bias,
    norm_q_weight,
    norm_k_weight,
    conv_norm_weight,
    conv_weight,
    *,
    gate_eps: float,
    conv_eps: float,
    dilation: int,
):
    """hidden [B, T, M, D], rows [B, T, H] -> update [B, T, M, D] (docs/SPEC.md sections 3-5).

    conv_weight None gives the V4.1 form (no conv)."""
    M, D = hidden.shape[-2:]
    e = table[rows.long()].flatten(-2)  # [B, T, H * d_head], order-major, head-minor
    kv = F.linear(e, kv_weight, kv_bias)
    key = kv[..., : M * D].unflatten(-1, (M, D))
    value = kv[..., M * D :]
    u = engram_gate_separate(hidden, key, value, norm_q_weight, norm_k_weight, gate_eps)
    if conv_weight is None:
        return u
    return short_conv(u, conv_norm_weight, conv_weight, dilation, conv_eps)


def engram_module_reference(module, hidden: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """The oracle evaluated on an Engram module's own parameters (hidden [B, T, D] or [B, T, M, D])."""
    squeeze = hidden.dim() == 3
    h = hidden.unsqueeze(2) if squeeze else hidden
    c = module.config
    if module.fold_gains:
        wq, wk = torch.ones_like(module.gate_weight), module.gate_weight
    else:
        wq, wk = module.norm_q_weight, module.norm_k_weight
    gate_eps = c.gate_eps if c.gate_eps is not None else torch.finfo(hidden.dtype).eps
    out = engram_layer(
        h,
        rows,
        module.table.weight,
        module.kv_proj.weight,
        module.kv_proj.bias,
        wq,
        wk,
        module.conv_norm_weight if c.use_conv else None,
        module.conv_weight if c.use_conv else None,
        gate_eps=gate_eps,
        conv_eps=c.conv_eps,
        dilation=c.dilation,
    )
    return out.squeeze(2) if squeeze else out


class OfficialEngram(nn.Module):
    """What a user writes from the official demo: one nn.Embedding over all H tables (dense
    gradient), M key projections and a value projection, the demo's gate (nn.RMSNorm modules) and
    ShortConv (nn.Conv1d). Takes per-table ids [B, T, H] (before offsets), like the demo's hash."""

    def __init__(
        self,
        table_sizes,
        d_head: int,
        hidden_size: int,
        hc_mult: int,
        kernel_size: int = 4,
        dilation: int = 3,
        bias: bool = True,
        use_conv: bool = True,
        gate_eps=None,
        conv_eps: float = 1e-5,
        device=None,
        dtype=None,
    ):
        super().__init__()
        f = dict(device=device, dtype=dtype)
        offsets = [0]
        for n in table_sizes[:-1]:
            offsets.append(offsets[-1] + n)
        self.register_buffer("offsets", torch.tensor(offsets, dtype=torch.long, device=device))
        self.embedding = nn.Embedding(sum(table_sizes), d_head, **f)
        d_mem = len(table_sizes) * d_head
        self.hc_mult, self.hidden_size = hc_mult, hidden_size
        self.value_proj = nn.Linear(d_mem, hidden_size, bias=bias, **f)
        self.key_projs = nn.ModuleList([nn.Linear(d_mem, hidden_size, bias=bias, **f) for _ in range(hc_mult)])
        self.gate = DemoGate(hidden_size, hc_mult, eps=gate_eps, dtype=dtype).to(device)
        self.short_conv = (
            DemoShortConv(hidden_size, kernel_size, dilation, conv_eps, hc_mult, dtype=dtype).to(device)
            if use_conv
            else None
        )

    def forward(self, hidden: torch.Tensor, table_ids: torch.Tensor) -> torch.Tensor:
        """hidden [B, T, M, D], table_ids [B, T, H] -> the update [B, T, M, D]."""
        e = self.embedding(table_ids + self.offsets).flatten(start_dim=-2)
        key = torch.stack([proj(e) for proj in self.key_projs], dim=-2)
        value = self.gate(hidden, key, self.value_proj(e))
        return value if self.short_conv is None else value + self.short_conv(value)

    @torch.no_grad()
    def load_from(self, module) -> OfficialEngram:
        """Copy an Engram module's weights (same layout) into this formulation."""
        M, D = self.hc_mult, self.hidden_size
        self.embedding.weight.copy_(module.table.weight)
        w, b = module.kv_proj.weight, module.kv_proj.bias
        for m in range(M):
            self.key_projs[m].weight.copy_(w[m * D : (m + 1) * D])
            if b is not None:
                self.key_projs[m].bias.copy_(b[m * D : (m + 1) * D])
        self.value_proj.weight.copy_(w[M * D :])
        if b is not None:
            self.value_proj.bias.copy_(b[M * D :])
        wk = module.gate_weight if module.fold_gains else module.norm_k_weight
        wq = torch.ones_like(wk) if module.fold_gains else module.norm_q_weight
        for m in range(M):
            self.gate.norm1[m].weight.copy_(wk[m])
            self.gate.norm2[m].weight.copy_(wq[m])
        if self.short_conv is not None:
            self.short_conv.conv.weight.copy_(module.conv_weight.unsqueeze(1))
            for m in range(M):
                self.short_conv.norms[m].weight.copy_(module.conv_norm_weight[m])
        return self
