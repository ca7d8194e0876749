"""FP8 tables: E4M3 values with one E8M0 (power-of-two) scale per 32 values of a row, the layout
DeepSeek-V4.1 serves its Engram tables in (docs/SPEC.md section 3).

quantize_fp8 picks, per block of 32 values, the smallest power of two 2^e with
amax / 2^e <= 448 (E4M3's largest finite value), so no value saturates, and rounds x / 2^e to the
nearest E4M3 value (ties to even). The dequantised value is exact in float32 and bfloat16. Error
bounds, per value x of a block with scale 2^e: |deq - x| <= 2^-4 |x| where x / 2^e is an E4M3
normal (|x| >= 2^(e-6)), and <= 2^(e-10) below it (E4M3 subnormals are spaced 2^-9).
"""

from __future__ import annotations

import torch

BLOCK = 32
E4M3_MAX = 448.0


def quantize_fp8(table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(values [R, d] float8_e4m3fn, scale [R, d / 32] float8_e8m0fnu) of a table [R, d] (any
    float dtype; d a multiple of 32). Works in chunks of rows, so a large table needs no float32
    copy of itself."""
    if table.dim() != 2 or table.shape[1] % BLOCK:
        raise ValueError(
            f"quantize_fp8: table must be [num_rows, d_head] with d_head % {BLOCK} == 0, got {tuple(table.shape)}"
        )
    if not table.is_floating_point():
        raise ValueError(f"quantize_fp8: table must be a float tensor, got {table.dtype}")
    R, d = table.shape
    values = torch.empty(R, d, dtype=torch.float8_e4m3fn, device=table.device)
    scale = torch.empty(R, d // BLOCK, dtype=torch.uint8, device=table.device)
    chunk = max(1, (1 << 24) // max(d, 1))
    for start in range(0, R, chunk):
        x = table[start : start + chunk].float().view(-1, d // BLOCK, BLOCK)
        if not bool(torch.isfinite(x).all()):
            raise ValueError("quantize_fp8: table has non-finite values")
        amax = x.abs().amax(dim=-1)
        # e = ceil(log2(amax / 448)), exactly: frexp gives amax / 448 = m * 2^k with m in [0.5, 1).
        m, k = torch.frexp(amax / E4M3_MAX)
        e = torch.where(m == 0.5, k - 1, k).to(torch.int32)
        e = torch.where(amax == 0, torch.zeros_like(e), e).clamp(-127, 127)
        values[start : start + chunk] = (
            (x * torch.ldexp(torch.ones_like(amax), -e).unsqueeze(-1)).view(-1, d).to(torch.float8_e4m3fn)
        )
        scale[start : start + chunk] = (e + 127).to(torch.uint8)
    return values, scale.view(torch.float8_e8m0fnu)


def e8m0_to_float(scale: torch.Tensor) -> torch.Tensor:
    """E8M0 scales (float8_e8m0fnu or their uint8 bytes) as float32 2^(s - 127); 0xFF is NaN."""
    b = scale.view(torch.uint8).to(torch.int32)
    f = torch.ldexp(torch.ones(b.shape, dtype=torch.float32, device=b.device), b - 127)
    return f.masked_fill(b == 0xFF, float("nan"))


def dequantize_fp8(values: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """values * scale as [R, d] `dtype` (the reference of the gather's fused dequantisation)."""
    R, d = values.shape
    return (values.float().view(R, d // BLOCK, BLOCK) * e8m0_to_float(scale).unsqueeze(-1)).view(R, d).to(dtype)
