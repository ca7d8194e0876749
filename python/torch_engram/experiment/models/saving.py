"""Saved TransformerLMs: a directory with config.json (model and Engram configs), model.safetensors
(the whole state_dict: weights, Engram tables and their optimizer state, hashing buffers with the
compression LUT) and tokenizer.json, loadable without the sweep (`load_model`)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from ...checkpoint import write_atomic
from .config import ModelConfig
from .transformer import TransformerLM

FORMAT = "torch_engram.transformer_lm"
VERSION = 1


def save_model(
    directory: str | os.PathLike, model: TransformerLM, tokenizer=None, extra: dict | None = None, state=None
) -> Path:
    """Write `model` (and its `tokenizers.Tokenizer`, if given) to `directory`; each file is
    replaced atomically. extra: plain data stored in config.json (e.g. the run's metrics). state:
    the state_dict to write instead of model's (a sharded model's, gathered whole by
    torch_engram.sharded.full_state_dict); the saved model loads as one process's."""
    from safetensors.torch import save_file

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    # safetensors stores no aliases: the one tied weight (tie_embeddings) is written once and
    # re-tied on load.
    state = {
        k: v.detach().contiguous().cpu()
        for k, v in (model.state_dict() if state is None else state).items()
        if not (model.cfg.tie_embeddings and k == "lm_head.weight")
    }
    tables = [e.table for e in model.engram_modules()]
    table = dict(grad=tables[0].grad_mode, optimizer=tables[0].optimizer, storage=tables[0].storage) if tables else None
    meta = {"format": FORMAT, "version": VERSION, "model": model.cfg.to_dict(), "tables": table, "extra": extra or {}}
    write_atomic(d / "model.safetensors", lambda p: save_file(state, p, metadata={"format": FORMAT}))
    if tokenizer is not None:
        write_atomic(d / "tokenizer.json", lambda p: tokenizer.save(p))
    write_atomic(d / "config.json", lambda p: Path(p).write_text(json.dumps(meta, indent=2)))
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
    tables = meta.get("tables") or {}
    model = TransformerLM(
        cfg,
        lut=lut if lut is not None and lut.numel() else None,
        table_grad=tables.get("grad", "fused"),
        table_optimizer=tables.get("optimizer", "partial_rowwise_adam"),
    )
    if tables.get("storage") == "fp8":
        for e in model.engram_modules():
            e.table.quantize_fp8_()
    if cfg.tie_embeddings:
        state["lm_head.weight"] = state["embed.weight"]
    model.load_state_dict(state)
    tokenizer = None
    if (d / "tokenizer.json").exists():
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(d / "tokenizer.json"))
    return model.to(device or "cpu").eval(), tokenizer, meta.get("extra", {})
