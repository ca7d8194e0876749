"""torch-engram: fast, trainable Engram conditional-memory layers for PyTorch."""

import torch  # noqa: F401  (libtorch must be loaded before the extension)

from . import _C, _fake, ops  # noqa: F401
from .config import PRESETS, EngramConfig
from .hashing import NgramHasher, TableLayout, layer_multipliers, layer_primes
from .modules import Engram
from .state import EngramState
from .table import EngramTable
from .tokenizer import Compression, build_compression, compress

__all__ = [
    "PRESETS",
    "Compression",
    "Engram",
    "EngramConfig",
    "EngramState",
    "EngramTable",
    "NgramHasher",
    "TableLayout",
    "build_compression",
    "compress",
    "layer_multipliers",
    "layer_primes",
    "ops",
]
__version__ = "0.1.0"
