"""Reference models: a small decoder-only MoE transformer with Engram layers."""

from .config import ModelConfig, default_engram_layers
from .moe import MoE, SwiGLU
from .transformer import LMOutput, TransformerLM

__all__ = ["LMOutput", "MoE", "ModelConfig", "SwiGLU", "TransformerLM", "default_engram_layers"]
