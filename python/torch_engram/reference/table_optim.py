"""Pure-PyTorch oracle of the table optimizer ops (table_update, and the fused backward
multihead_gather_fused_update = multihead_gather_backward_sparse + table_update), written as the
executable spec of engram/table_optim.h. Maths in float64 by default (`maths` picks another
dtype, e.g. float32 to compare with the kernels' rounding)."""

from __future__ import annotations

import numpy as np
import torch

from .gather import multihead_gather_backward_sparse

_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def rounding_bits(seed: int, step: int, rows: torch.Tensor, d_head: int) -> torch.Tensor:
    """The 16 random bits of stochastic rounding for each (row, column): [U, d_head] int64."""
    r = rows.long().cpu().numpy().astype(np.uint64)[:, None]
    c = np.arange(d_head, dtype=np.uint64)[None, :]
    with np.errstate(over="ignore"):
        inner = _splitmix64(r * np.uint64(0x100000001B3) + c)
        h = _splitmix64(np.uint64(seed) ^ _splitmix64(np.uint64(step) ^ inner))
    return torch.from_numpy((h >> np.uint64(48)).astype(np.int64))


def bf16_stochastic(x: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """float32 x rounded to bfloat16 by adding 16 random bits below the kept ones and truncating;
    NaN and inf keep their value."""
    u = x.float().contiguous().view(torch.int32).long() & 0xFFFFFFFF
    special = (u & 0x7F800000) == 0x7F800000
    out = ((u + bits.to(u.device)) >> 16) & 0xFFFF
    out = torch.where(special, ((u >> 16) | ((u & 0xFFFF) != 0).long() * 0x40) & 0xFFFF, out)
    return out.to(torch.int32).to(torch.int16).view(torch.bfloat16)


def table_update(
    weight: torch.Tensor,
    momentum1: torch.Tensor,
    momentum2: torch.Tensor,
    row_step: torch.Tensor,
    step: torch.Tensor,
    rows: torch.Tensor,
    grads: torch.Tensor,
    hparams,
    optimizer: str,
    seed: int = -1,
    maths: torch.dtype = torch.float64,
) -> None:
    """In place, for each r = rows[i] (strictly increasing) with gradient g = grads[i]
    (decay = 1 - lr * weight_decay):

        sgd                   w = w * decay - lr * g
        adam                  s = ++row_step[r]; m = lerp(m, g, 1 - b1); v = b2 v + (1 - b2) g^2
                              w = w * decay - lr / (1 - b1^s) * m / (sqrt(v) / sqrt(1 - b2^s) + eps)
        partial_rowwise_adam  as adam with v[r] (one per row) fed by mean(g^2)
        rowwise_adagrad       G[r] += mean(g^2); w = w * decay - lr * g / (sqrt(G[r]) + eps)

    A bfloat16 weight is rounded stochastically when seed >= 0 (bits from rounding_bits with the
    table's step count), else to nearest. step (int64 [1]) is incremented.
    """
    lr, beta1, beta2, eps, weight_decay = (
        float(x) for x in (hparams.tolist() if torch.is_tensor(hparams) else hparams)
    )
    rows = rows.long()
    if rows.numel() > 1 and not bool((rows[1:] > rows[:-1]).all()):
        raise ValueError("table_update: rows must be strictly increasing")
    U = rows.numel()
    count = int(step[0])
    step += 1
    if U == 0:
        return

    def c(x: float) -> torch.Tensor:
        return torch.tensor(x, dtype=maths)

    g = grads.to(maths)
    w = weight[rows].to(maths) * c(1.0 - lr * weight_decay)
    sq_mean = (g * g).sum(-1, keepdim=True) / c(g.shape[-1])
    if optimizer in ("adam", "partial_rowwise_adam"):
        s = row_step[rows].long() + 1
        row_step[rows] = s.to(row_step.dtype)
        s = s.double()
        step_size = (lr / (1.0 - beta1**s)).to(maths)[:, None]
        bc2_sqrt = torch.sqrt(1.0 - beta2**s).to(maths)[:, None]
        m = torch.lerp(momentum1[rows].to(maths), g, c(1.0 - beta1))
        if optimizer == "adam":
            v = c(beta2) * momentum2[rows].to(maths) + c(1.0 - beta2) * g * g
            momentum2[rows] = v.to(momentum2.dtype)
        else:
            v = c(beta2) * momentum2[rows].to(maths)[:, None] + c(1.0 - beta2) * sq_mean
            momentum2[rows] = v[:, 0].to(momentum2.dtype)
        w = w - step_size * m / (torch.sqrt(v) / bc2_sqrt + c(eps))
        momentum1[rows] = m.to(momentum1.dtype)
    elif optimizer == "rowwise_adagrad":
        G = momentum1[rows].to(maths)[:, None] + sq_mean
        momentum1[rows] = G[:, 0].to(momentum1.dtype)
        w = w - c(lr) / (torch.sqrt(G) + c(eps)) * g
    elif optimizer == "sgd":
        w = w - c(lr) * g
    else:
        raise ValueError(f"table_update: unknown optimizer {optimizer!r}")
    if weight.dtype == torch.bfloat16 and seed >= 0:
        weight[rows] = bf16_stochastic(w.float(), rounding_bits(seed, count, rows, w.shape[-1]))
    else:
        weight[rows] = w.to(weight.dtype)


def multihead_gather_fused_update(
    grad_e: torch.Tensor,
    rows: torch.Tensor,
    weight: torch.Tensor,
    momentum1: torch.Tensor,
    momentum2: torch.Tensor,
    row_step: torch.Tensor,
    step: torch.Tensor,
    hparams,
    optimizer: str,
    seed: int = -1,
    maths: torch.dtype = torch.float64,
) -> None:
    """The fused backward: the row-sparse gradient of multihead_gather, then one table_update."""
    unique, sums = multihead_gather_backward_sparse(grad_e.to(maths), rows)
    table_update(weight, momentum1, momentum2, row_step, step, unique, sums, hparams, optimizer, seed, maths)
