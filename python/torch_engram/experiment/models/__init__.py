"""Reference models: a small decoder-only MoE transformer with Engram layers."""

from .config import ModelConfig, default_engram_layers
from .moe import MoE, SwiGLU
from .saving import load_model, save_model
from .transformer import DecodeCache, LMOutput, TransformerLM

__all__ = [
    "DecodeCache",
    "LMOutput",
    "MoE",
    "ModelConfig",
    "SwiGLU",
    "TransformerLM",
    "default_engram_layers",
    "load_model",
    "save_model",
]
