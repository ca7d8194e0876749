"""Fake (meta) kernels of every engram op, for torch.compile and FakeTensor tracing."""

from __future__ import annotations

import torch


@torch.library.register_fake("engram::ngram_hash")
def _ngram_hash_fake(ids, lut, num_ids, multipliers, primes, offsets, pad_id, doc_start=None,
                     out_dtype=torch.int64, oov_to_pad=False):
    torch._check(ids.dim() == 2, lambda: f"ngram_hash: ids must be [batch, seq], got {tuple(ids.shape)}")
    return ids.new_empty((multipliers.shape[0], ids.shape[0], ids.shape[1], primes.shape[1]), dtype=out_dtype)
