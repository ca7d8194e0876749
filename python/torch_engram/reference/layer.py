"""The whole Engram layer in plain PyTorch, two ways: a functional oracle written from ENGRAM.md
(float64-capable) and the formulation a user would write from the official demo (one nn.Embedding
over the concatenated tables, nn.RMSNorm modules, nn.Conv1d), used as the benchmark peer."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def rms_reciprocal(x: torch.Tensor, eps: float) -> torch.Tensor:
    return torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps)


def signed_sqrt(s: torch.Tensor, clamp: float = 1e-6) -> torch.Tensor:
    """sign(s) * sqrt(max(|s|, clamp)): in all official code, not in the paper's equation."""
    return s.abs().clamp_min(clamp).sqrt() * s.sign()


def engram_layer(hidden, rows, table, kv_weight, kv_bias, norm_q_weight, norm_k_weight, conv_norm_weight,
                 conv_weight, *, gate_eps: float, conv_eps: float, dilation: int):
    """hidden [B, T, M, D], rows [B, T, H] -> update [B, T, M, D] (ENGRAM.md sections 3-5).

    conv_weight None gives the V4.1 form (no conv). Computes in the inputs' dtype.
    """
    B, T, M, D = hidden.shape
    e = table[rows.long()].flatten(-2)  # [B, T, H * d_head], order-major, head-minor
    kv = F.linear(e, kv_weight, kv_bias)
    key = kv[..., : M * D].unflatten(-1, (M, D))
    value = kv[..., M * D:]
    q = hidden * rms_reciprocal(hidden, gate_eps) * norm_q_weight
    k = key * rms_reciprocal(key, gate_eps) * norm_k_weight
    s = (q * k).sum(dim=-1) / math.sqrt(D)
    alpha = torch.sigmoid(signed_sqrt(s))
    u = alpha.unsqueeze(-1) * value.unsqueeze(2)
    if conv_weight is None:
        return u
    return u + short_conv(u, conv_norm_weight, conv_weight, dilation, conv_eps)


def short_conv(u, norm_weight, conv_weight, dilation: int, eps: float):
    """SiLU(depthwise causal dilated Conv1D(RMSNorm(u))) per branch, u [B, T, M, D] (no residual)."""
    B, T, M, D = u.shape
    kernel = conv_weight.shape[-1]
    x = (u * rms_reciprocal(u, eps) * norm_weight).reshape(B, T, M * D).transpose(1, 2)
    y = F.conv1d(x, conv_weight.reshape(M * D, 1, kernel), padding=(kernel - 1) * dilation, dilation=dilation,
                 groups=M * D)[..., :T]
    return F.silu(y).transpose(1, 2).reshape(B, T, M, D)


def engram_module_reference(module, hidden: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """The oracle evaluated on an Engram module's own parameters (hidden [B, T, D] or [B, T, M, D])."""
    squeeze = hidden.dim() == 3
    h = hidden.unsqueeze(2) if squeeze else hidden
    c = module.config
    if module.fold_gains:
        wq, wk = module.gate_weight, torch.ones_like(module.gate_weight)
    else:
        wq, wk = module.norm_q_weight, module.norm_k_weight
    gate_eps = c.gate_eps if c.gate_eps is not None else torch.finfo(hidden.dtype).eps
    out = engram_layer(
        h, rows, module.table, module.kv_proj.weight, module.kv_proj.bias, wq, wk,
        module.conv_norm_weight if c.use_conv else None, module.conv_weight if c.use_conv else None,
        gate_eps=gate_eps, conv_eps=c.conv_eps, dilation=c.dilation)
    return out.squeeze(2) if squeeze else out


class OfficialEngram(nn.Module):
    """What a user writes from the official demo: one nn.Embedding over all H tables (dense
    gradient), M key projections and a value projection, nn.RMSNorm modules, nn.Conv1d.
    Takes precomputed per-table ids [B, T, H] (z, before offsets) like the demo's hash output."""

    def __init__(self, table_sizes, d_head: int, hidden_size: int, hc_mult: int, kernel_size: int = 4,
                 dilation: int = 3, bias: bool = True, use_conv: bool = True, gate_eps=None,
                 conv_eps: float = 1e-5, device=None, dtype=None):
        super().__init__()
        f = dict(device=device, dtype=dtype)
        offsets = [0]
        for n in table_sizes[:-1]:
            offsets.append(offsets[-1] + n)
        self.register_buffer("offsets", torch.tensor(offsets, dtype=torch.long, device=device))
        self.embedding = nn.Embedding(sum(table_sizes), d_head, **f)
        d_mem = len(table_sizes) * d_head
        self.hc_mult, self.hidden_size, self.use_conv = hc_mult, hidden_size, use_conv
        self.value_proj = nn.Linear(d_mem, hidden_size, bias=bias, **f)
        self.key_projs = nn.ModuleList([nn.Linear(d_mem, hidden_size, bias=bias, **f) for _ in range(hc_mult)])
        self.norm1 = nn.ModuleList([nn.RMSNorm(hidden_size, eps=gate_eps, **f) for _ in range(hc_mult)])
        self.norm2 = nn.ModuleList([nn.RMSNorm(hidden_size, eps=gate_eps, **f) for _ in range(hc_mult)])
        if use_conv:
            channels = hidden_size * hc_mult
            self.conv = nn.Conv1d(channels, channels, kernel_size, groups=channels, bias=False,
                                  padding=(kernel_size - 1) * dilation, dilation=dilation, **f)
            self.conv_norms = nn.ModuleList([nn.RMSNorm(hidden_size, eps=conv_eps, **f) for _ in range(hc_mult)])

    def forward(self, hidden: torch.Tensor, table_ids: torch.Tensor) -> torch.Tensor:
        """hidden [B, T, M, D], table_ids [B, T, H] -> the update [B, T, M, D]."""
        B, T, M, D = hidden.shape
        e = self.embedding(table_ids + self.offsets).flatten(start_dim=-2)
        gates = []
        for m in range(M):
            key = self.norm1[m](self.key_projs[m](e))
            query = self.norm2[m](hidden[:, :, m, :])
            g = (key * query).sum(dim=-1) / math.sqrt(D)
            gates.append(signed_sqrt(g).sigmoid().unsqueeze(-1))
        value = torch.stack(gates, dim=2) * self.value_proj(e).unsqueeze(2)
        if not self.use_conv:
            return value
        normed = torch.cat([self.conv_norms[m](value[:, :, m, :]) for m in range(M)], dim=-1)
        y = F.silu(self.conv(normed.transpose(1, 2))[..., :T])
        return value + y.transpose(1, 2).reshape(B, T, M, D)

    @torch.no_grad()
    def load_from(self, module) -> "OfficialEngram":
        """Copy an Engram module's weights (same layout) into this formulation."""
        M, D = self.hc_mult, self.hidden_size
        self.embedding.weight.copy_(module.table)
        w, b = module.kv_proj.weight, module.kv_proj.bias
        for m in range(M):
            self.key_projs[m].weight.copy_(w[m * D:(m + 1) * D])
            if b is not None:
                self.key_projs[m].bias.copy_(b[m * D:(m + 1) * D])
        self.value_proj.weight.copy_(w[M * D:])
        if b is not None:
            self.value_proj.bias.copy_(b[M * D:])
        wq = module.gate_weight if module.fold_gains else module.norm_q_weight
        wk = torch.ones_like(wq) if module.fold_gains else module.norm_k_weight
        for m in range(M):
            self.norm1[m].weight.copy_(wk[m])
            self.norm2[m].weight.copy_(wq[m])
        if self.use_conv:
            self.conv.weight.copy_(module.conv_weight.unsqueeze(1))
            for m in range(M):
                self.conv_norms[m].weight.copy_(module.conv_norm_weight[m])
        return self
