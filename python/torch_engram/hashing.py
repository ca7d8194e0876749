"""Hashing layout (multipliers, primes, offsets) and the NgramHasher module (docs/SPEC.md section 2)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from . import _C, ops
from .config import EngramConfig

_LAYER_SEED_STRIDE = 10007  # official: seed + 10007 * layer_id


def layer_multipliers(compressed_vocab_size: int, max_ngram_size: int, layer_ids, seed: int) -> np.ndarray:
    """Odd multipliers m[l, k], drawn with NumPy exactly as the official code: [L, N] int64."""
    if compressed_vocab_size < 1:
        raise ValueError(f"layer_multipliers: compressed_vocab_size must be >= 1, got {compressed_vocab_size}")
    m_max = int(np.iinfo(np.int64).max // compressed_vocab_size)
    half = max(1, m_max // 2)
    out = np.empty((len(layer_ids), max_ngram_size), dtype=np.int64)
    for i, layer_id in enumerate(layer_ids):
        rng = np.random.default_rng(int(seed + _LAYER_SEED_STRIDE * int(layer_id)))
        r = rng.integers(low=0, high=half, size=(max_ngram_size,), dtype=np.int64)
        out[i] = r * 2 + 1
    return out


def layer_primes(engram_vocab_size, num_layers: int, n_head: int) -> list[list[list[int]]]:
    """primes[layer][order - 2][head] of the official layout (prime search in C++)."""
    return _C.layer_primes([int(v) for v in engram_vocab_size], int(num_layers), int(n_head))


@dataclass(frozen=True)
class TableLayout:
    """Per layer: table sizes and row offsets [L, H] (order-major, head-minor) and total rows."""

    primes: np.ndarray
    offsets: np.ndarray
    rows_per_layer: tuple[int, ...]

    @classmethod
    def from_config(cls, config: EngramConfig) -> TableLayout:
        nested = layer_primes(config.engram_vocab_size, len(config.layer_ids), config.n_head_per_ngram)
        primes = np.array([[p for order in layer for p in order] for layer in nested], dtype=np.int64)
        offsets = np.zeros_like(primes)
        offsets[:, 1:] = np.cumsum(primes[:, :-1], axis=1)
        return cls(primes, offsets, tuple(int(r) for r in primes.sum(axis=1)))


def compressed_vocab_size_of(config: EngramConfig, lut: torch.Tensor | None) -> int:
    if lut is not None:
        return int(lut.max().item()) + 1 if lut.numel() else 0
    if config.compressed_vocab_size is None:
        raise ValueError("NgramHasher: pass a compression lut or set EngramConfig.compressed_vocab_size")
    return config.compressed_vocab_size


class NgramHasher(nn.Module):
    """Maps input_ids [B, T] to row ids [L, B, T, H] of every Engram layer in one call.

    Everything that determines the hashing (compression LUT, multipliers, primes, offsets and the
    compressed pad id) is a buffer, so a state_dict alone reproduces the row ids.
    """

    def __init__(self, config: EngramConfig, lut: torch.Tensor | None = None, device=None):
        super().__init__()
        self.config = config
        if lut is not None:
            lut = torch.as_tensor(lut, dtype=torch.int64).flatten()
            if lut.numel() == 0 or int(lut.min()) < 0:
                raise ValueError("NgramHasher: lut must be a non-empty int64 vector of compressed ids >= 0")
            if not 0 <= config.pad_id < lut.numel():
                raise ValueError(
                    f"NgramHasher: config.pad_id must lie in [0, {lut.numel()}) (the lut length), got {config.pad_id}"
                )
        v_comp = compressed_vocab_size_of(config, lut)
        if config.compressed_vocab_size is not None and lut is not None and v_comp != config.compressed_vocab_size:
            raise ValueError(
                f"NgramHasher: the lut compresses to {v_comp} ids but "
                f"config.compressed_vocab_size is {config.compressed_vocab_size}"
            )
        pad = int(lut[config.pad_id]) if lut is not None else config.pad_id
        if lut is None and pad >= v_comp:
            raise ValueError(f"NgramHasher: config.pad_id must be < compressed_vocab_size={v_comp}, got {pad}")
        self.compressed_vocab_size = v_comp
        layout = TableLayout.from_config(config)
        self.rows_per_layer = layout.rows_per_layer
        mult = layer_multipliers(v_comp, config.max_ngram_size, config.layer_ids, config.seed)
        kw = dict(dtype=torch.int64, device=device)
        self.register_buffer("lut", (lut if lut is not None else torch.empty(0, dtype=torch.int64)).to(device))
        self.register_buffer("multipliers", torch.as_tensor(mult, **kw))
        self.register_buffer("primes", torch.as_tensor(layout.primes, **kw))
        self.register_buffer("offsets", torch.as_tensor(layout.offsets, **kw))
        self.register_buffer("pad_id", torch.tensor(pad, **kw))
        # Python-side copy so forward never reads a device scalar (no host sync).
        self._pad_id = pad

    @classmethod
    def from_tokenizer(cls, config: EngramConfig, tokenizer, device=None) -> NgramHasher:
        """Hasher whose LUT compresses `tokenizer` (any vocabulary tokenizer.build_compression takes)."""
        from .tokenizer import build_compression

        return cls(config, lut=build_compression(tokenizer).lut, device=device)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._pad_id = int(self.pad_id)
        self.rows_per_layer = tuple(int(r) for r in (self.primes.sum(dim=1)).tolist())

    @property
    def num_ids(self) -> int:
        return self.lut.numel() if self.lut.numel() else self.compressed_vocab_size

    def layer_index(self, layer_id: int) -> int:
        try:
            return self.config.layer_ids.index(layer_id)
        except ValueError:
            raise ValueError(f"NgramHasher: layer_id must be one of {self.config.layer_ids}, got {layer_id}") from None

    def forward(
        self,
        input_ids: torch.Tensor,
        doc_start: torch.Tensor | None = None,
        out_dtype: torch.dtype | None = None,
        oov_to_pad: bool = False,
    ) -> torch.Tensor:
        """Row ids [L, B, T, H]; int32 when every layer has < 2^31 rows (unless out_dtype says)."""
        if out_dtype is None:
            out_dtype = torch.int32 if max(self.rows_per_layer) < 2**31 else torch.int64
        lut = self.lut if self.lut.numel() else None
        return ops.ngram_hash(
            input_ids,
            lut,
            self.num_ids,
            self.multipliers,
            self.primes,
            self.offsets,
            self._pad_id,
            doc_start=doc_start,
            out_dtype=out_dtype,
            oov_to_pad=oov_to_pad,
        )

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"layers={list(c.layer_ids)}, orders=2..{c.max_ngram_size}, heads={c.n_head_per_ngram}, "
            f"compressed_vocab={self.compressed_vocab_size}, rows_per_layer={list(self.rows_per_layer)}"
        )
