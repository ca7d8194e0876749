"""Fake (meta) kernels of every engram op, for torch.compile and FakeTensor tracing."""

from __future__ import annotations

import torch


@torch.library.register_fake("engram::ngram_hash")
def _ngram_hash_fake(
    ids, lut, num_ids, multipliers, primes, offsets, pad_id, doc_start=None, out_dtype=torch.int64, oov_to_pad=False
):
    torch._check(ids.dim() == 2, lambda: f"ngram_hash: ids must be [batch, seq], got {tuple(ids.shape)}")
    return ids.new_empty((multipliers.shape[0], ids.shape[0], ids.shape[1], primes.shape[1]), dtype=out_dtype)


_GATHER_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _check_gather_rows(rows, op):
    torch._check(rows.dim() >= 1, lambda: f"{op}: rows must be [..., H] (at least one dimension), got a 0-d tensor")
    torch._check(
        rows.dtype in (torch.int64, torch.int32), lambda: f"{op}: rows must be int64 or int32, got {rows.dtype}"
    )
    torch._check(rows.shape[-1] >= 1, lambda: f"{op}: rows must be [..., H] with H >= 1 heads, got {tuple(rows.shape)}")


def _check_gather_grad(grad_e, rows, op):
    _check_gather_rows(rows, op)
    torch._check(
        grad_e.dtype in _GATHER_DTYPES,
        lambda: f"{op}: grad_e must be float32, bfloat16, float16 or float64, got {grad_e.dtype}",
    )
    torch._check(
        grad_e.device == rows.device,
        lambda: f"{op}: rows must be on grad_e's device {grad_e.device}, got {rows.device}",
    )
    torch._check(
        grad_e.dim() == rows.dim() and grad_e.shape[:-1] == rows.shape[:-1],
        lambda: (
            f"{op}: grad_e must be [..., H * d_head] with the leading shape of rows "
            f"{tuple(rows.shape[:-1])}, got {tuple(grad_e.shape)}"
        ),
    )
    H = rows.shape[-1]
    torch._check(
        grad_e.shape[-1] % H == 0,
        lambda: f"{op}: grad_e's last dimension must be H * d_head with H = {H}, got {grad_e.shape[-1]}",
    )
    return grad_e.shape[-1] // H


@torch.library.register_fake("engram::multihead_gather")
def _multihead_gather_fake(table, rows, sparse_grad=False):
    torch._check(
        table.dim() == 2, lambda: f"multihead_gather: table must be [num_rows, d_head], got {tuple(table.shape)}"
    )
    torch._check(
        table.dtype in _GATHER_DTYPES,
        lambda: f"multihead_gather: table must be float32, bfloat16, float16 or float64, got {table.dtype}",
    )
    _check_gather_rows(rows, "multihead_gather")
    torch._check(
        rows.device == table.device,
        lambda: f"multihead_gather: rows must be on table's device {table.device}, got {rows.device}",
    )
    return table.new_empty((*rows.shape[:-1], rows.shape[-1] * table.shape[1]))


@torch.library.register_fake("engram::multihead_gather_fp8")
def _multihead_gather_fp8_fake(table, scale, rows, out_dtype):
    from .fp8 import BLOCK

    op = "multihead_gather_fp8"
    torch._check(table.dim() == 2, lambda: f"{op}: table must be [num_rows, d_head], got {tuple(table.shape)}")
    torch._check(table.dtype == torch.float8_e4m3fn, lambda: f"{op}: table must be float8_e4m3fn, got {table.dtype}")
    torch._check(
        table.shape[1] % BLOCK == 0,
        lambda: (
            f"{op}: table's d_head must be a multiple of {BLOCK} (one scale per {BLOCK} values), got {table.shape[1]}"
        ),
    )
    torch._check(
        scale.dtype in (torch.float8_e8m0fnu, torch.uint8),
        lambda: f"{op}: scale must be float8_e8m0fnu (or its bytes, uint8), got {scale.dtype}",
    )
    torch._check(
        scale.dim() == 2 and scale.shape[0] == table.shape[0] and scale.shape[1] * BLOCK == table.shape[1],
        lambda: f"{op}: scale must be [num_rows, d_head / {BLOCK}], got {tuple(scale.shape)}",
    )
    torch._check(
        out_dtype in (torch.float32, torch.bfloat16),
        lambda: f"{op}: out_dtype must be float32 or bfloat16, got {out_dtype}",
    )
    _check_gather_rows(rows, op)
    torch._check(
        rows.device == table.device and scale.device == table.device,
        lambda: f"{op}: rows and scale must be on table's device {table.device}",
    )
    return table.new_empty((*rows.shape[:-1], rows.shape[-1] * table.shape[1]), dtype=out_dtype)


@torch.library.register_fake("engram::_multihead_gather_backward")
def _multihead_gather_backward_fake(grad_e, rows, num_rows):
    d_head = _check_gather_grad(grad_e, rows, "multihead_gather_backward")
    torch._check(num_rows >= 0, lambda: f"multihead_gather_backward: num_rows must be non-negative, got {num_rows}")
    return grad_e.new_empty((num_rows, d_head))


@torch.library.register_fake("engram::_multihead_gather_backward_sparse")
def _multihead_gather_backward_sparse_fake(grad_e, rows):
    d_head = _check_gather_grad(grad_e, rows, "multihead_gather_backward_sparse")
    # The number of distinct rows U is data-dependent: at most one per lookup.
    num_unique = torch.library.get_ctx().new_dynamic_size()
    return rows.new_empty((num_unique,), dtype=torch.int64), grad_e.new_empty((num_unique, d_head))


def _acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_gate_shapes(op, hidden, kv, weight):
    torch._check(hidden.dim() >= 2, lambda: f"{op}: hidden must be [..., M, D], got {tuple(hidden.shape)}")
    M, D = hidden.shape[-2], hidden.shape[-1]
    torch._check(
        tuple(kv.shape) == tuple(hidden.shape[:-2]) + ((M + 1) * D,),
        lambda: (
            f"{op}: kv must be [..., (M + 1) * D] = {tuple(hidden.shape[:-2]) + ((M + 1) * D,)} "
            f"(the M keys, then the value), got {tuple(kv.shape)}"
        ),
    )
    torch._check(
        tuple(weight.shape) == tuple(hidden.shape[-2:]),
        lambda: f"{op}: weight must be [M, D] = {tuple(hidden.shape[-2:])}, got {tuple(weight.shape)}",
    )


@torch.library.register_fake("engram::engram_gate")
def _engram_gate_fake(hidden, kv, weight, eps):
    _check_gate_shapes("engram_gate", hidden, kv, weight)
    return hidden.new_empty(hidden.shape)


@torch.library.register_fake("engram::_engram_gate_forward")
def _engram_gate_forward_fake(hidden, kv, weight, eps):
    _check_gate_shapes("engram_gate_forward", hidden, kv, weight)
    stat = hidden.new_empty(hidden.shape[:-1], dtype=_acc_dtype(hidden.dtype))
    return (
        hidden.new_empty(hidden.shape),
        stat,
        torch.empty_like(stat),
        torch.empty_like(stat),
        torch.empty_like(stat),
    )


@torch.library.register_fake("engram::_engram_gate_backward")
def _engram_gate_backward_fake(grad_out, hidden, kv, weight, alpha, r_x, r_k, raw):
    _check_gate_shapes("engram_gate_backward", hidden, kv, weight)
    return hidden.new_empty(hidden.shape), kv.new_empty(kv.shape), weight.new_empty(weight.shape)


def _check_conv_shapes(op, u, norm_weight, conv_weight):
    torch._check(u.dim() == 4, lambda: f"{op}: u must be [B, T, M, D], got {tuple(u.shape)}")
    torch._check(
        tuple(norm_weight.shape) == tuple(u.shape[2:]),
        lambda: f"{op}: norm_weight must be [M, D] = {tuple(u.shape[2:])}, got {tuple(norm_weight.shape)}",
    )
    torch._check(
        conv_weight.dim() == 2 and conv_weight.shape[0] == u.shape[2] * u.shape[3],
        lambda: f"{op}: conv_weight must be [M*D, kernel_size], got {tuple(conv_weight.shape)}",
    )


@torch.library.register_fake("engram::short_conv")
def _short_conv_fake(u, norm_weight, conv_weight, dilation, eps, activation=True):
    _check_conv_shapes("short_conv", u, norm_weight, conv_weight)
    return u.new_empty(u.shape)


@torch.library.register_fake("engram::_short_conv_forward")
def _short_conv_forward_fake(u, norm_weight, conv_weight, dilation, eps, activation=True):
    _check_conv_shapes("short_conv_forward", u, norm_weight, conv_weight)
    return u.new_empty(u.shape), u.new_empty(u.shape[:3], dtype=_acc_dtype(u.dtype))


@torch.library.register_fake("engram::_short_conv_backward")
def _short_conv_backward_fake(grad_out, u, norm_weight, conv_weight, rstd, dilation, activation):
    _check_conv_shapes("short_conv_backward", u, norm_weight, conv_weight)
    return (u.new_empty(u.shape), norm_weight.new_empty(norm_weight.shape), conv_weight.new_empty(conv_weight.shape))


# ---- Table optimizer ops ----
def _check_table_weight(weight, op):
    torch._check(weight.dim() == 2, lambda: f"{op}: weight must be [num_rows, d_head], got {tuple(weight.shape)}")


@torch.library.register_fake("engram::table_update")
def _table_update_fake(
    weight, momentum1, momentum2, row_step, step, rows, grads, hparams, optimizer, seed, row_ids=None
):
    # In place on weight and state; nothing to allocate. Shapes are checked so that traced
    # programs fail where eager ones would.
    _check_table_weight(weight, "table_update")
    torch._check(rows.dim() == 1, lambda: f"table_update: rows must be [U], got {tuple(rows.shape)}")
    torch._check(
        grads.dim() == 2 and grads.shape[0] == rows.shape[0] and grads.shape[1] == weight.shape[1],
        lambda: f"table_update: grads must be [U={rows.shape[0]}, d_head={weight.shape[1]}], got {tuple(grads.shape)}",
    )
    return None


@torch.library.register_fake("engram::_multihead_gather_fused_update")
def _multihead_gather_fused_update_fake(
    grad_e, rows, weight, momentum1, momentum2, row_step, step, hparams, optimizer, seed, row_ids=None
):
    _check_table_weight(weight, "multihead_gather_fused_update")
    d_head = _check_gather_grad(grad_e, rows, "multihead_gather_fused_update")
    torch._check(
        d_head == weight.shape[1],
        lambda: (
            f"multihead_gather_fused_update: grad_e's last dimension must be H * d_head with "
            f"d_head={weight.shape[1]}, got d_head {d_head}"
        ),
    )
    return None


@torch.library.register_fake("engram::multihead_gather_fused")
def _multihead_gather_fused_fake(
    weight, rows, momentum1, momentum2, row_step, step, hparams, optimizer, seed, row_ids=None
):
    return _multihead_gather_fake(weight, rows)


@torch.library.register_fake("engram::_row_cache_fetch")
def _row_cache_fetch_fake(
    rows,
    slot_of_row,
    slot_row,
    slot_meta,
    lru_links,
    store,
    cache,
    field_offsets,
    stamp,
    keep_from,
    policy,
    stats,
    flag_offset,
    init_std,
    init_seed,
):
    return rows.new_empty(rows.shape, dtype=torch.int64)


@torch.library.register_fake("engram::_row_cache_flush")
def _row_cache_flush_fake(slot_row, store, cache, field_offsets, flag_offset):
    return None
