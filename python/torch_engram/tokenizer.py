"""Tokenizer compression (docs/SPEC.md section 1): a surjective LUT from tokenizer ids to compressed ids
that merges tokens differing only in case, accents, Unicode form or surrounding whitespace.

Built once from any vocabulary (a `tokenizers.Tokenizer`, a transformers tokenizer, or a list of
token strings or bytes); the LUT is a plain int64 tensor stored with the model (NgramHasher keeps
it as a buffer), so no tokenizer is needed at run time.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tokenizers import Regex, Tokenizer, normalizers

REPLACEMENT_CHAR = "\ufffd"  # what decoding a partial UTF-8 byte sequence yields
_SENTINEL = "\ue000"  # private-use character that shields a lone space from Strip


def engram_normalizer() -> normalizers.Normalizer:
    """The official key normalizer. A token that is only whitespace keeps one space (through the
    sentinel) instead of stripping to the empty string, so " " and "" stay distinct keys."""
    return normalizers.Sequence(
        [
            normalizers.NFKC(),
            normalizers.NFD(),
            normalizers.StripAccents(),
            normalizers.Lowercase(),
            normalizers.Replace(Regex("[ \t\r\n]+"), " "),
            normalizers.Replace(Regex("^ $"), _SENTINEL),
            normalizers.Strip(),
            normalizers.Replace(_SENTINEL, " "),
        ]
    )


@dataclass(frozen=True, eq=False)
class Compression:
    """lut[tid] = compressed id of raw id tid (int64, length vocab_size, values 0..num_compressed-1,
    each new id first used in increasing tid order). keys[new_id] is the key that defined it
    (a str, or the raw bytes of a partial UTF-8 token given as bytes)."""

    lut: torch.Tensor
    num_compressed: int
    vocab_size: int
    keys: tuple[str | bytes, ...]

    @property
    def ratio(self) -> float:
        """Fraction by which the vocabulary shrinks: 1 - V'/V (the paper's 23.43% for DeepSeek-V3)."""
        return 1.0 - self.num_compressed / self.vocab_size

    def compress(self, ids, oov_to_pad: int | None = None) -> torch.Tensor:
        return compress(ids, self.lut, oov_to_pad=oov_to_pad)

    def __repr__(self) -> str:
        return (
            f"Compression(vocab_size={self.vocab_size}, num_compressed={self.num_compressed}, ratio={self.ratio:.4f})"
        )


def _texts_and_raw(tokenizer: Any) -> tuple[list[str], Any]:
    """Per id: decode([tid]) with special tokens kept, and a function giving the raw key of tid."""
    if isinstance(tokenizer, Tokenizer):
        n = tokenizer.get_vocab_size(with_added_tokens=True)
        # decode_batch runs in Rust threads; each entry equals decode([tid], skip_special_tokens=False).
        texts = tokenizer.decode_batch([[tid] for tid in range(n)], skip_special_tokens=False)
        return texts, tokenizer.id_to_token
    if hasattr(tokenizer, "convert_ids_to_tokens") and hasattr(tokenizer, "decode"):
        # transformers tokenizers, duck-typed: the exact calls of the official code.
        n = len(tokenizer)
        texts = [tokenizer.decode([tid], skip_special_tokens=False) for tid in range(n)]
        return texts, tokenizer.convert_ids_to_tokens
    if isinstance(tokenizer, Sequence) and not isinstance(tokenizer, (str, bytes, bytearray)):
        tokens = list(tokenizer)
        texts = []
        for tid, tok in enumerate(tokens):
            if isinstance(tok, (bytes, bytearray)):
                texts.append(bytes(tok).decode("utf-8", errors="replace"))
            elif isinstance(tok, str):
                texts.append(tok)
            else:
                raise TypeError(
                    f"build_compression: tokens must be str or bytes, got {type(tok).__name__} at index {tid}"
                )
        # The raw key of a list entry is the entry itself (bytes stay bytes, so they never equal a str key).
        return texts, lambda tid: bytes(tokens[tid]) if isinstance(tokens[tid], bytearray) else tokens[tid]
    raise TypeError(
        "build_compression: tokenizer must be a tokenizers.Tokenizer, a transformers tokenizer "
        "(with decode and convert_ids_to_tokens) or a sequence of token str/bytes, "
        f"got {type(tokenizer).__name__}"
    )


def build_compression(tokenizer: Any) -> Compression:
    """The compression LUT of docs/SPEC.md section 1, scanning tid = 0, 1, 2, ... once.

    Key of tid: if decode([tid]) contains U+FFFD (a partial UTF-8 byte token) the raw token
    (convert_ids_to_tokens / id_to_token / the list entry), else the normalized text, or the text
    itself when it normalizes to "". List entries are the tokens' decoded text (or raw bytes), not
    byte-level symbols such as "Ġthe".
    """
    texts, raw = _texts_and_raw(tokenizer)
    normalize = engram_normalizer().normalize_str
    key_to_new: dict[str | bytes, int] = {}
    lut = [0] * len(texts)
    for tid, text in enumerate(texts):
        if REPLACEMENT_CHAR in text:
            key = raw(tid)
            if key is None:  # an id hole in the vocabulary: nothing better than its text
                key = text
        else:
            key = normalize(text) or text
        lut[tid] = key_to_new.setdefault(key, len(key_to_new))
    if not lut:
        raise ValueError("build_compression: tokenizer must have at least one token, got an empty vocabulary")
    return Compression(torch.tensor(lut, dtype=torch.int64), len(key_to_new), len(lut), tuple(key_to_new))


def compress(ids, lut: torch.Tensor | Compression, oov_to_pad: int | None = None) -> torch.Tensor:
    """lut[ids] as int64, on ids' device. An id < 0 or >= len(lut) raises a ValueError naming it,
    unless oov_to_pad is a raw pad id: then such ids compress as that pad id (never read out of
    bounds, never clamped to the nearest end). Checking reads the ids on the host: a data-pipeline
    helper, not for use inside a captured graph."""
    if isinstance(lut, Compression):
        lut = lut.lut
    ids = torch.as_tensor(ids)
    if ids.dtype == torch.bool or ids.is_floating_point() or ids.is_complex():
        raise TypeError(f"compress: ids must be an integer tensor, got dtype {ids.dtype}")
    lut = torch.as_tensor(lut)
    if lut.dim() != 1 or lut.dtype != torch.int64:
        raise ValueError(
            f"compress: lut must be a 1-D int64 tensor, got shape {tuple(lut.shape)} and dtype {lut.dtype}"
        )
    lut = lut.to(ids.device)
    n = lut.numel()
    ids = ids.to(torch.int64)
    outside = (ids < 0) | (ids >= n)
    if oov_to_pad is not None:
        if not 0 <= oov_to_pad < n:
            raise ValueError(f"compress: oov_to_pad must be a raw id in [0, {n}) (the lut length), got {oov_to_pad}")
        return lut[torch.where(outside, oov_to_pad, ids)]
    if bool(outside.any()):
        bad = ids[outside]
        first = int(bad[0])
        raise ValueError(
            f"compress: ids must lie in [0, {n}) (the lut length), got {first} "
            f"({bad.numel()} ids outside; pass oov_to_pad=<raw pad id> to map them)"
        )
    return lut[ids]
