"""Saved TransformerLMs: a directory with config.json (model and Engram configs), model.safetensors
(the whole state_dict: weights, Engram tables and their optimizer state, hashing buffers with the
compression LUT) and tokenizer.json, loadable without the sweep (`load_model`)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from .config import ModelConfig
from .transformer import TransformerLM

FORMAT = "torch_engram.transformer_lm"
VERSION = 1


def _write_atomic(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_model(directory: str | os.PathLike, model: TransformerLM, tokenizer=None, extra: dict | None = None) -> Path:
    """Write `model` (and its `tokenizers.Tokenizer`, if given) to `directory`; each file is
    replaced atomically. extra: plain data stored in config.json (e.g. the run's metrics)."""
    from safetensors.torch import save_file

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    state, seen = {}, {}
    for k, v in model.state_dict().items():
        # safetensors stores no aliases: a tied weight is written once and re-tied on load.
        key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape))
        if key in seen:
            continue
        seen[key] = k
        state[k] = v.detach().contiguous().cpu()
    meta = {"format": FORMAT, "version": VERSION, "model": model.cfg.to_dict(), "extra": extra or {}}
    _write_atomic(d / "model.safetensors", lambda p: save_file(state, p, metadata={"format": FORMAT}))
    if tokenizer is not None:
        _write_atomic(d / "tokenizer.json", lambda p: tokenizer.save(p))
    _write_atomic(d / "config.json", lambda p: Path(p).write_text(json.dumps(meta, indent=2)))
    return d


def load_model(directory: str | os.PathLike, device=None) -> tuple[TransformerLM, object | None, dict]:
    """(model in eval mode, its tokenizer or None, config.json's extra) from a save_model directory."""
    from safetensors.torch import load_file

    d = Path(directory)
    meta = json.loads((d / "config.json").read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"load_model: {d} is not a saved {FORMAT} (config.json format {meta.get('format')!r})")
    if meta.get("version", 0) > VERSION:
        raise ValueError(f"load_model: format version {meta['version']} is newer than this torch_engram's {VERSION}")
    cfg = ModelConfig.from_dict(meta["model"])
    state = load_file(str(d / "model.safetensors"))
    lut = state.get("hasher.lut")
    model = TransformerLM(cfg, lut=lut if lut is not None and lut.numel() else None)
    if cfg.tie_embeddings and "lm_head.weight" not in state:
        state["lm_head.weight"] = state["embed.weight"]
    elif cfg.tie_embeddings and "embed.weight" not in state:
        state["embed.weight"] = state["lm_head.weight"]
    model.load_state_dict(state)
    tokenizer = None
    if (d / "tokenizer.json").exists():
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(d / "tokenizer.json"))
    return model.to(device or "cpu").eval(), tokenizer, meta.get("extra", {})
