"""Pure-PyTorch oracle of every engram op and of the whole layer: float64-capable, written from
ENGRAM.md and readable as its executable spec. Tests compare the native kernels against it."""

from .hashing import ngram_hash

__all__ = ["ngram_hash"]
