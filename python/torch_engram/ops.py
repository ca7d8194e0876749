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
