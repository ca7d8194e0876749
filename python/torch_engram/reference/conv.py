"""Reference short causal convolution Y = U + SiLU(Conv1D(RMSNorm(U))) (docs/SPEC.md section 5) in
plain PyTorch via a grouped conv1d, and the official demo's ShortConv formulation."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def short_conv(
    u: torch.Tensor,
    norm_weight: torch.Tensor,
    conv_weight: torch.Tensor,
    dilation: int,
    eps: float,
    activation: bool = True,
) -> torch.Tensor:
    """u [B, T, M, D]; norm_weight [M, D]; conv_weight [M * D, kernel_size] (channel m * D + d,
    tap i reads t - (kernel_size - 1 - i) * dilation). Computed in float32 (float64 for float64
    u), returned in u's dtype."""
    acc = torch.float64 if u.dtype == torch.float64 else torch.float32
    B, T, M, D = u.shape
    K = conv_weight.shape[1]
    x = u.to(acc)
    normed = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * norm_weight.to(acc)
    channels = normed.reshape(B, T, M * D).transpose(1, 2)  # [B, C, T]
    # Causal: left padding (K - 1) * dilation, so position t only reads t and earlier.
    y = F.conv1d(
        F.pad(channels, ((K - 1) * dilation, 0)), conv_weight.to(acc).unsqueeze(1), groups=M * D, dilation=dilation
    )
    if activation:
        y = F.silu(y)
    return (x + y.transpose(1, 2).reshape(B, T, M, D)).to(u.dtype)


class DemoShortConv(nn.Module):
    """The official demo's ShortConv: one nn.RMSNorm (eps 1e-5) per branch, a depthwise
    nn.Conv1d padded on both sides and cut back to T, SiLU. Returns SiLU(Conv(RMSNorm(U))) without
    the residual, as the demo (which adds U outside)."""

    def __init__(
        self,
        hidden_size: int,
        kernel_size: int = 4,
        dilation: int = 1,
        norm_eps: float = 1e-5,
        hc_mult: int = 4,
        activation: bool = True,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        channels = hidden_size * hc_mult
        self.conv = nn.Conv1d(
            channels,
            channels,
            kernel_size,
            groups=channels,
            bias=False,
            padding=(kernel_size - 1) * dilation,
            dilation=dilation,
            dtype=dtype,
        )
        self.norms = nn.ModuleList([nn.RMSNorm(hidden_size, eps=norm_eps, dtype=dtype) for _ in range(hc_mult)])
        self.activation = activation
        self.dilation = dilation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, G, C = x.shape
        normed = torch.cat([self.norms[g](x[:, :, g, :]) for g in range(G)], dim=-1)
        y = self.conv(normed.transpose(1, 2))[..., :T]
        if self.activation:
            y = F.silu(y)
        return y.transpose(1, 2).reshape(B, T, G, C)

    def op_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm_weight [M, D], conv_weight [M * D, kernel_size]) as the short_conv op takes them."""
        norm_weight = torch.stack([n.weight for n in self.norms])
        return norm_weight, self.conv.weight.squeeze(1)
