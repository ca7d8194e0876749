"""Reference models: a small decoder-only MoE transformer with Engram layers."""

from .config import ModelConfig, default_engram_layers
from .moe import MoE, SwiGLU
from .transformer import LMOutput, TransformerLM

__all__ = ["ModelConfig", "default_engram_layers", "MoE", "SwiGLU", "LMOutput", "TransformerLM"]
