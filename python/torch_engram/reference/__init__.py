"""Pure-PyTorch oracle of every engram op and of the whole layer: float64-capable, written from
ENGRAM.md and readable as its executable spec. Tests compare the native kernels against it."""

from .gather import multihead_gather, multihead_gather_backward, multihead_gather_backward_sparse
from .hashing import ngram_hash

__all__ = ["multihead_gather", "multihead_gather_backward", "multihead_gather_backward_sparse", "ngram_hash"]
