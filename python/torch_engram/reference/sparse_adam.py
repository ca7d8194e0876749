"""Pure-PyTorch oracle of sparse_adam_step: lazy row-wise Adam with per-row bias correction,
float64-capable, written as the executable spec of the op in csrc/library.cpp."""

from __future__ import annotations

import torch


def sparse_adam_step(table: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                     row_step: torch.Tensor, rows: torch.Tensor, grads: torch.Tensor, lr: float,
                     beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8,
                     weight_decay: float = 0.0) -> None:
    """In place, for each r = rows[i] (strictly increasing), with s = ++row_step[r]:

        table[r] *= 1 - lr * weight_decay
        m = exp_avg[r] = lerp(exp_avg[r], g, 1 - beta1)
        v = exp_avg_sq[r] = beta2 * exp_avg_sq[r] + (1 - beta2) * g * g
        table[r] -= lr / (1 - beta1**s) * m / (sqrt(v) / sqrt(1 - beta2**s) + eps)

    Maths in float64 for float64 tables, float32 otherwise; rows not listed are left alone.
    """
    rows = rows.long()
    if rows.numel() > 1 and not bool((rows[1:] > rows[:-1]).all()):
        raise ValueError("sparse_adam_step: rows must be strictly increasing")
    acc = torch.float64 if table.dtype == torch.float64 else torch.float32
    step = row_step[rows].long() + 1
    row_step[rows] = step.to(row_step.dtype)
    step = step.double()
    # Per-row constants in double, as the kernels compute them.
    step_size = (lr / (1.0 - beta1**step)).to(acc)[:, None]
    bc2_sqrt = torch.sqrt(1.0 - beta2**step).to(acc)[:, None]

    def c(x: float) -> torch.Tensor:
        return torch.tensor(x, dtype=acc)

    w = table[rows].to(acc) * c(1.0 - lr * weight_decay)
    g = grads.to(acc)
    m = torch.lerp(exp_avg[rows].to(acc), g, c(1.0 - beta1))
    v = c(beta2) * exp_avg_sq[rows].to(acc) + c(1.0 - beta2) * g * g
    denom = torch.sqrt(v) / bc2_sqrt + c(eps)
    w = w - step_size * m / denom
    table[rows] = w.to(table.dtype)
    exp_avg[rows] = m.to(exp_avg.dtype)
    exp_avg_sq[rows] = v.to(exp_avg_sq.dtype)
