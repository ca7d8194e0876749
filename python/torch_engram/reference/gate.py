"""Reference context-aware gate (docs/SPEC.md section 4) in plain PyTorch, float64-capable: the
folded-gain form of the engram_gate op, the separate-gain form, and the official demo's
formulation with one nn.RMSNorm module per branch for keys and for queries."""

from __future__ import annotations

import math

import torch
from torch import nn

# |s| is clamped here before the square root in every official implementation.
SIGNED_SQRT_FLOOR = 1e-6


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def rms_reciprocal(x: torch.Tensor, eps: float) -> torch.Tensor:
    """1 / sqrt(mean(x^2) + eps) over the last dimension, keepdim."""
    return torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def signed_sqrt(s: torch.Tensor) -> torch.Tensor:
    """s' = sign(s) * sqrt(max(|s|, 1e-6))."""
    return s.abs().clamp_min(SIGNED_SQRT_FLOOR).sqrt() * s.sign()


def engram_gate_separate(
    hidden: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    query_weight: torch.Tensor,
    key_weight: torch.Tensor,
    eps: float,
) -> torch.Tensor:
    """u^(m) = sigmoid(s') * v with s = dot(RMSNorm_q(h^(m)), RMSNorm_k(k^(m))) / sqrt(D).

    hidden, key [..., M, D]; value [..., D]; query_weight, key_weight [M, D] (the gains).
    Computed in float32 (float64 for float64 hidden), returned in hidden's dtype.
    """
    acc = _acc_dtype(hidden.dtype)
    x, k, v = hidden.to(acc), key.to(acc), value.to(acc)
    q_normed = x * rms_reciprocal(x, eps) * query_weight.to(acc)
    k_normed = k * rms_reciprocal(k, eps) * key_weight.to(acc)
    s = (q_normed * k_normed).sum(-1) / math.sqrt(x.shape[-1])
    alpha = torch.sigmoid(signed_sqrt(s))
    return (alpha.unsqueeze(-1) * v.unsqueeze(-2)).to(hidden.dtype)


def engram_gate(
    hidden: torch.Tensor, key: torch.Tensor, value: torch.Tensor, weight: torch.Tensor, eps: float
) -> torch.Tensor:
    """The engram_gate op: folded gains weight = w_q * w_k [M, D]."""
    return engram_gate_separate(hidden, key, value, torch.ones_like(weight), weight, eps)


class DemoGate(nn.Module):
    """The official demo's gate over given key projections: nn.RMSNorm modules with the default
    eps (None: the dtype's machine epsilon), norm1 for keys and norm2 for queries.

    forward(hidden [B, T, M, D], key [B, T, M, D], value [B, T, D]) -> [B, T, M, D].
    """

    def __init__(self, hidden_size: int, hc_mult: int, eps: float | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        self.hidden_size = hidden_size
        self.norm1 = nn.ModuleList([nn.RMSNorm(hidden_size, eps=eps, dtype=dtype) for _ in range(hc_mult)])
        self.norm2 = nn.ModuleList([nn.RMSNorm(hidden_size, eps=eps, dtype=dtype) for _ in range(hc_mult)])

    def forward(self, hidden: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        gates = []
        for m in range(len(self.norm1)):
            normed_key = self.norm1[m](key[..., m, :])
            normed_query = self.norm2[m](hidden[..., m, :])
            gate = (normed_key * normed_query).sum(dim=-1) / math.sqrt(self.hidden_size)
            gate = gate.abs().clamp_min(SIGNED_SQRT_FLOOR).sqrt() * gate.sign()
            gates.append(gate.sigmoid().unsqueeze(-1))
        return torch.stack(gates, dim=-2) * value.unsqueeze(-2)

    def folded_weight(self) -> torch.Tensor:
        """w = w_q * w_k [M, D] in float32 (float64 for float64 gains), the op's weight."""
        w = torch.stack([q.weight * k.weight for q, k in zip(self.norm2, self.norm1)])
        return w.detach().to(_acc_dtype(w.dtype))

    def eps_for(self, dtype: torch.dtype) -> float:
        """The eps nn.RMSNorm uses for inputs of `dtype`."""
        eps = self.norm1[0].eps
        return torch.finfo(dtype).eps if eps is None else eps
