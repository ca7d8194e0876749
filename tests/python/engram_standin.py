"""Test-only stand-in with the Engram layer's interface and parameter set (pure PyTorch, slow)."""

import math

import torch
import torch.nn.functional as F
from torch import nn

from torch_engram.hashing import TableLayout


class StandInEngram(nn.Module):
    def __init__(self, cfg, layer_id, hidden_size, hc_mult=1):
        super().__init__()
        self.cfg, self.layer_id, self.D, self.M = cfg, layer_id, hidden_size, hc_mult
        rows = TableLayout.from_config(cfg).rows_per_layer[cfg.layer_ids.index(layer_id)]
        self.table = nn.Parameter(torch.randn(rows, cfg.d_head) * 0.02)
        M, D = hc_mult, hidden_size
        self.value = nn.Linear(cfg.d_mem, D, bias=cfg.proj_bias)
        self.keys = nn.Linear(cfg.d_mem, M * D, bias=cfg.proj_bias)
        self.norm_q = nn.Parameter(torch.ones(M, D))
        self.norm_k = nn.Parameter(torch.ones(M, D))
        if cfg.use_conv:
            self.conv_norm = nn.Parameter(torch.ones(M, D))
            self.conv_weight = nn.Parameter(torch.zeros(M * D, 1, cfg.kernel_size))

    def table_parameters(self):
        return [self.table]

    def dense_parameters(self):
        return [p for n, p in self.named_parameters() if n != "table"]

    def forward(self, hidden, rows):
        squeeze = hidden.dim() == 3
        h = hidden.unsqueeze(2) if squeeze else hidden
        B, T, M, D = h.shape
        e = self.table[rows.long()].flatten(-2)
        k = self.keys(e).view(B, T, M, D)
        v = self.value(e).unsqueeze(2)
        s = (F.rms_norm(h, (D,)) * self.norm_q * F.rms_norm(k, (D,)) * self.norm_k).sum(-1) / math.sqrt(D)
        alpha = torch.sigmoid(s.sign() * s.abs().clamp_min(1e-6).sqrt()).unsqueeze(-1)
        u = alpha * v
        if self.cfg.use_conv:
            x = (F.rms_norm(u, (D,), eps=self.cfg.conv_eps) * self.conv_norm).flatten(2).transpose(1, 2)
            pad = (self.cfg.kernel_size - 1) * self.cfg.dilation
            y = F.conv1d(F.pad(x, (pad, 0)), self.conv_weight, dilation=self.cfg.dilation, groups=M * D)
            u = u + F.silu(y).transpose(1, 2).view(B, T, M, D)
        return u.squeeze(2) if squeeze else u


def standin_factory(cfg, layer_id, hidden_size, hc_mult):
    return StandInEngram(cfg, layer_id, hidden_size, hc_mult)
