"""Engram in other libraries' models: `torch_engram.integrations.transformers` (Hugging Face)."""
