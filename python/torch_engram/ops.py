"""Typed functional wrappers of the engram ops (no host synchronisation)."""

from __future__ import annotations

import torch

from . import _C  # noqa: F401  (loading the library registers torch.ops.engram.*)


def ngram_hash(ids: torch.Tensor, lut: torch.Tensor | None, num_ids: int, multipliers: torch.Tensor,
               primes: torch.Tensor, offsets: torch.Tensor, pad_id: int, doc_start: torch.Tensor | None = None,
               out_dtype: torch.dtype = torch.int64, oov_to_pad: bool = False) -> torch.Tensor:
    """Row ids [L, B, T, H] of every Engram layer for raw ids [B, T] (see csrc/library.cpp)."""
    return torch.ops.engram.ngram_hash(ids, lut, num_ids, multipliers, primes, offsets, pad_id, doc_start,
                                       out_dtype, oov_to_pad)


def multihead_gather(table: torch.Tensor, rows: torch.Tensor, sparse_grad: bool = False) -> torch.Tensor:
    """e[..., H * d_head]: the H rows of `table` named by rows[..., H], concatenated head-minor."""
    return torch.ops.engram.multihead_gather(table, rows, sparse_grad)


# ---- Optimizer ops ----
def sparse_adam_step(table: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, row_step: torch.Tensor,
                     rows: torch.Tensor, grads: torch.Tensor, lr: float, beta1: float = 0.9, beta2: float = 0.999,
                     eps: float = 1e-8, weight_decay: float = 0.0) -> None:
    """Lazy row-wise Adam, in place: updates table[rows] and its moments with grads [U, d_head].

    rows must be strictly increasing (unique and sorted, as multihead_gather_backward_sparse and a
    coalesced sparse gradient give them); row_step (int32 [num_rows]) counts each row's own updates
    and sets its bias correction. Rows not listed keep their weights and moments. Call under
    torch.no_grad(). Full semantics: csrc/library.cpp.
    """
    torch.ops.engram.sparse_adam_step(table, exp_avg, exp_avg_sq, row_step, rows, grads, lr, beta1, beta2, eps,
                                      weight_decay)
