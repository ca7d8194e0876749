"""Fake (meta) kernels of every engram op, for torch.compile and FakeTensor tracing."""

from __future__ import annotations

import torch


@torch.library.register_fake("engram::ngram_hash")
def _ngram_hash_fake(ids, lut, num_ids, multipliers, primes, offsets, pad_id, doc_start=None,
                     out_dtype=torch.int64, oov_to_pad=False):
    torch._check(ids.dim() == 2, lambda: f"ngram_hash: ids must be [batch, seq], got {tuple(ids.shape)}")
    return ids.new_empty((multipliers.shape[0], ids.shape[0], ids.shape[1], primes.shape[1]), dtype=out_dtype)


_GATHER_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _check_gather_rows(rows, op):
    torch._check(rows.dim() >= 1, lambda: f"{op}: rows must be [..., H] (at least one dimension), got a 0-d tensor")
    torch._check(rows.dtype in (torch.int64, torch.int32), lambda: f"{op}: rows must be int64 or int32, got {rows.dtype}")
    torch._check(rows.shape[-1] >= 1, lambda: f"{op}: rows must be [..., H] with H >= 1 heads, got {tuple(rows.shape)}")


def _check_gather_grad(grad_e, rows, op):
    _check_gather_rows(rows, op)
    torch._check(grad_e.dtype in _GATHER_DTYPES,
                 lambda: f"{op}: grad_e must be float32, bfloat16, float16 or float64, got {grad_e.dtype}")
    torch._check(grad_e.device == rows.device,
                 lambda: f"{op}: rows must be on grad_e's device {grad_e.device}, got {rows.device}")
    torch._check(grad_e.dim() == rows.dim() and grad_e.shape[:-1] == rows.shape[:-1],
                 lambda: f"{op}: grad_e must be [..., H * d_head] with the leading shape of rows "
                         f"{tuple(rows.shape[:-1])}, got {tuple(grad_e.shape)}")
    H = rows.shape[-1]
    torch._check(grad_e.shape[-1] % H == 0,
                 lambda: f"{op}: grad_e's last dimension must be H * d_head with H = {H}, got {grad_e.shape[-1]}")
    return grad_e.shape[-1] // H


@torch.library.register_fake("engram::multihead_gather")
def _multihead_gather_fake(table, rows, sparse_grad=False):
    torch._check(table.dim() == 2, lambda: f"multihead_gather: table must be [num_rows, d_head], got {tuple(table.shape)}")
    torch._check(table.dtype in _GATHER_DTYPES,
                 lambda: f"multihead_gather: table must be float32, bfloat16, float16 or float64, got {table.dtype}")
    _check_gather_rows(rows, "multihead_gather")
    torch._check(rows.device == table.device,
                 lambda: f"multihead_gather: rows must be on table's device {table.device}, got {rows.device}")
    return table.new_empty((*rows.shape[:-1], rows.shape[-1] * table.shape[1]))


@torch.library.register_fake("engram::multihead_gather_backward")
def _multihead_gather_backward_fake(grad_e, rows, num_rows):
    d_head = _check_gather_grad(grad_e, rows, "multihead_gather_backward")
    torch._check(num_rows >= 0, lambda: f"multihead_gather_backward: num_rows must be non-negative, got {num_rows}")
    return grad_e.new_empty((num_rows, d_head))


@torch.library.register_fake("engram::multihead_gather_backward_sparse")
def _multihead_gather_backward_sparse_fake(grad_e, rows):
    d_head = _check_gather_grad(grad_e, rows, "multihead_gather_backward_sparse")
    # The number of distinct rows U is data-dependent: at most one per lookup.
    num_unique = torch.library.get_ctx().new_dynamic_size()
    return rows.new_empty((num_unique,), dtype=torch.int64), grad_e.new_empty((num_unique, d_head))
