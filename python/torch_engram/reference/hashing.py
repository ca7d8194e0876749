"""Reference n-gram hashing (docs/SPEC.md section 2) in plain torch int64 arithmetic."""

from __future__ import annotations

import torch


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
    """Row ids [L, B, T, H]. Products x' * m stay below 2^63, so int64 arithmetic is exact."""
    ids = ids.to(torch.int64)
    bad = (ids < 0) | (ids >= num_ids)
    if bool(bad.any()) and not oov_to_pad:
        raise ValueError(f"ngram_hash: ids must lie in [0, {num_ids}), got {int(ids[bad][0])}")
    x = torch.where(bad, 0, ids)
    if lut is not None:
        x = lut.to(ids.device)[x]
    x = torch.where(bad, pad_id, x)
    B, T = x.shape
    L, N = multipliers.shape
    H = primes.shape[1]
    K = H // (N - 1)
    # shifted[k][b, t] = x'[b, t - k], pad before the start and past a document start.
    shifted = [x]
    crossed = torch.zeros_like(x, dtype=torch.bool)
    for k in range(1, N):
        prev = torch.full_like(x, pad_id)
        prev[:, k:] = x[:, :-k] if k < T else prev[:, k:]
        if doc_start is not None:
            # The token at t - k + 1 starting a document means shift k crosses a boundary.
            starts = torch.zeros_like(crossed)
            starts[:, k - 1 :] = doc_start[:, : T - k + 1] if k - 1 < T else starts[:, k - 1 :]
            crossed = crossed | starts
            prev = torch.where(crossed, pad_id, prev)
        shifted.append(prev)
    out = torch.empty((L, B, T, H), dtype=torch.int64, device=ids.device)
    for li in range(L):
        h = shifted[0] * multipliers[li, 0]
        for k in range(1, N):
            h = h ^ (shifted[k] * multipliers[li, k])
            for j in range(K):
                c = (k - 1) * K + j
                out[li, :, :, c] = h % primes[li, c] + offsets[li, c]
    return out.to(out_dtype)
