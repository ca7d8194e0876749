"""Reference multi-head gather (docs/SPEC.md section 3) and its table gradients, in plain PyTorch.

Gradients are summed in float64 and rounded once to grad_e's dtype, so they serve as the oracle
for the native kernels' fp32 (fp64 for float64) position-order sums."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def multihead_gather(table: torch.Tensor, rows: torch.Tensor, sparse_grad: bool = False) -> torch.Tensor:
    """e[..., h*d_head:(h+1)*d_head] = table[rows[..., h]]: [..., H * d_head]."""
    e = F.embedding(rows.long(), table, sparse=sparse_grad)  # [..., H, d_head]
    return e.reshape(*rows.shape[:-1], rows.shape[-1] * table.shape[1])


def multihead_gather_fp8(
    table: torch.Tensor, scale: torch.Tensor, rows: torch.Tensor, out_dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    """The FP8 gather: E4M3 rows [R, d] times their E8M0 scales [R, d / 32], in PyTorch ops."""
    values = table[rows.long()].float().unflatten(-1, (-1, 32))
    s = scale.view(torch.uint8)[rows.long()].to(torch.int32)
    f = torch.ldexp(torch.ones(s.shape, device=s.device), s - 127).masked_fill(s == 0xFF, float("nan"))
    return (values * f.unsqueeze(-1)).flatten(-3).to(out_dtype)


def multihead_gather_backward(grad_e: torch.Tensor, rows: torch.Tensor, num_rows: int) -> torch.Tensor:
    """Dense table gradient [num_rows, d_head]: grad_table[r] = sum of grad_e's rows that read r."""
    d_head = grad_e.shape[-1] // rows.shape[-1]
    # Summed on the CPU, whose index_add_ adds in lookup order: on CUDA it uses atomics, whose
    # order (and so the last bits of a float64 oracle) would change from run to run.
    flat = rows.reshape(-1).long().cpu()
    acc = torch.zeros(num_rows, d_head, dtype=torch.float64)
    acc.index_add_(0, flat, grad_e.reshape(-1, d_head).double().cpu())
    return acc.to(device=grad_e.device, dtype=grad_e.dtype)


def multihead_gather_backward_sparse(grad_e: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-sparse table gradient: (ascending unique rows [U] int64, their summed gradients [U, d_head])."""
    d_head = grad_e.shape[-1] // rows.shape[-1]
    unique_rows, inverse = torch.unique(rows.reshape(-1).long().cpu(), sorted=True, return_inverse=True)
    acc = torch.zeros(unique_rows.numel(), d_head, dtype=torch.float64)
    acc.index_add_(0, inverse, grad_e.reshape(-1, d_head).double().cpu())  # CPU: lookup order, as above
    return unique_rows.to(grad_e.device), acc.to(device=grad_e.device, dtype=grad_e.dtype)
