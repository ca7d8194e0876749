"""Fake (meta) kernels of every engram op, for torch.compile and FakeTensor tracing."""

from __future__ import annotations

import torch


@torch.library.register_fake("engram::ngram_hash")
def _ngram_hash_fake(ids, lut, num_ids, multipliers, primes, offsets, pad_id, doc_start=None,
                     out_dtype=torch.int64, oov_to_pad=False):
    torch._check(ids.dim() == 2, lambda: f"ngram_hash: ids must be [batch, seq], got {tuple(ids.shape)}")
    return ids.new_empty((multipliers.shape[0], ids.shape[0], ids.shape[1], primes.shape[1]), dtype=out_dtype)


# ---- Optimizer ops ----
@torch.library.register_fake("engram::sparse_adam_step")
def _sparse_adam_step_fake(table, exp_avg, exp_avg_sq, row_step, rows, grads, lr, beta1, beta2, eps, weight_decay):
    # In place on table, exp_avg, exp_avg_sq and row_step; nothing to allocate. The shape rules are
    # checked here too so traced programs fail where eager ones would.
    torch._check(table.dim() == 2, lambda: f"sparse_adam_step: table must be [num_rows, d_head], got {tuple(table.shape)}")
    torch._check(rows.dim() == 1, lambda: f"sparse_adam_step: rows must be [U], got {tuple(rows.shape)}")
    torch._check(
        grads.dim() == 2 and grads.shape[0] == rows.shape[0] and grads.shape[1] == table.shape[1],
        lambda: f"sparse_adam_step: grads must be [U={rows.shape[0]}, d_head={table.shape[1]}], got {tuple(grads.shape)}",
    )
    return None
