"""Pure-PyTorch oracle of every engram op and of the whole layer: float64-capable, written from
ENGRAM.md and readable as its executable spec. Tests compare the native kernels against it."""

from .hashing import ngram_hash
from .sparse_adam import sparse_adam_step

__all__ = ["ngram_hash", "sparse_adam_step"]
