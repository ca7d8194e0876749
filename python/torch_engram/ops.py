"""Typed functional wrappers of the engram ops (no host synchronisation)."""

from __future__ import annotations

import torch

from . import _C  # noqa: F401  (loading the library registers torch.ops.engram.*)


def ngram_hash(
    ids: torch.Tensor,
    lut: torch.Tensor | None,
    num_ids: int,
    multipliers: torch.Tensor,
    primes: torch.Tensor,
    offsets: torch.Tensor,
    pad_id: int,
    doc_start: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.int64,
    oov_to_pad: bool = False,
) -> torch.Tensor:
    """Row ids [L, B, T, H] of every Engram layer for raw ids [B, T] (see csrc/library.cpp)."""
    return torch.ops.engram.ngram_hash(
        ids, lut, num_ids, multipliers, primes, offsets, pad_id, doc_start, out_dtype, oov_to_pad
    )


def multihead_gather(table: torch.Tensor, rows: torch.Tensor, sparse_grad: bool = False) -> torch.Tensor:
    """e[..., H * d_head]: the H rows of `table` named by rows[..., H], concatenated head-minor."""
    return torch.ops.engram.multihead_gather(table, rows, sparse_grad)


def multihead_gather_fp8(
    table: torch.Tensor, scale: torch.Tensor, rows: torch.Tensor, out_dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    """e[..., H * d_head] dequantised from an FP8 table: E4M3 values [R, d_head] times one E8M0
    scale [R, d_head / 32] per 32 values (torch_engram.fp8), exact in float32 or bfloat16."""
    return torch.ops.engram.multihead_gather_fp8(table, scale, rows, out_dtype)


def multihead_gather_backward(grad_e: torch.Tensor, rows: torch.Tensor, num_rows: int) -> torch.Tensor:
    """Dense table gradient [num_rows, d_head] of multihead_gather for grad_e [..., H * d_head].

    Deterministic: each row's gradient is summed in lookup order (fp32 accumulation, fp64 for
    float64) and written once; rows never looked up are zero."""
    return torch.ops.engram._multihead_gather_backward(grad_e, rows, num_rows)


def multihead_gather_backward_sparse(grad_e: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-sparse table gradient: (unique_rows [U] int64 ascending, values [U, d_head]).

    Memory grows with the number of lookups, not with the table; same summation order as the
    dense op."""
    return torch.ops.engram._multihead_gather_backward_sparse(grad_e, rows)


def engram_gate(hidden: torch.Tensor, kv: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Context-aware gate u^(m) = sigmoid(s') * v (docs/SPEC.md section 4).

    hidden [..., M, D]; kv [..., (M + 1) * D], the fused K/V projection output (M keys, then the
    value), read in place; weight [M, D] = w_q * w_k, float32 or hidden's dtype; eps the RMSNorm
    eps. Returns [..., M, D] in hidden's dtype. Differentiable in all three tensors; the kv
    gradient is one [..., (M + 1) * D] tensor, as the projection's backward takes it.
    """
    return torch.ops.engram.engram_gate(hidden, kv, weight, eps)


def gate_kv(key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """kv [..., (M + 1) * D] of separate keys [..., M, D] and value [..., D] (a copy; a model
    gets kv straight from one fused projection instead)."""
    return torch.cat([key.flatten(-2), value], dim=-1)


def short_conv(
    u: torch.Tensor,
    norm_weight: torch.Tensor,
    conv_weight: torch.Tensor,
    dilation: int,
    eps: float,
    activation: bool = True,
) -> torch.Tensor:
    """Y = U + SiLU(Conv1D(RMSNorm(U))) per branch, causal and depthwise (docs/SPEC.md section 5).

    u [B, T, M, D]; norm_weight [M, D]; conv_weight [M * D, kernel_size] (nn.Conv1d's weight
    without its middle dimension); both weights float32 or u's dtype.
    Differentiable in u and both weights.
    """
    return torch.ops.engram.short_conv(u, norm_weight, conv_weight, dilation, eps, activation)


# ---- Table optimizer ops (state layouts: csrc/library.cpp; use them through EngramTable) ----
def table_update(
    weight: torch.Tensor,
    momentum1: torch.Tensor,
    momentum2: torch.Tensor,
    row_step: torch.Tensor,
    step: torch.Tensor,
    rows: torch.Tensor,
    grads: torch.Tensor,
    hparams: torch.Tensor,
    optimizer: str,
    seed: int = -1,
) -> None:
    """One optimizer update of weight[rows] and their state with grads [U, d_head], in place.

    rows strictly increasing; hparams float64 CPU [5] = (lr, beta1, beta2, eps, weight_decay);
    seed >= 0 rounds a bfloat16 weight stochastically. Call under torch.no_grad()."""
    torch.ops.engram.table_update(weight, momentum1, momentum2, row_step, step, rows, grads, hparams, optimizer, seed)


def multihead_gather_fused(
    weight: torch.Tensor,
    rows: torch.Tensor,
    momentum1: torch.Tensor,
    momentum2: torch.Tensor,
    row_step: torch.Tensor,
    step: torch.Tensor,
    hparams: torch.Tensor,
    optimizer: str,
    seed: int = -1,
) -> torch.Tensor:
    """multihead_gather whose backward updates weight and state in place (no table gradient)."""
    return torch.ops.engram.multihead_gather_fused(
        weight, rows, momentum1, momentum2, row_step, step, hparams, optimizer, seed
    )
