"""Atomic training checkpoints: model, optimizers (the tables' lazy Adam state included), RNG
state and user extras in one file, written so that a crash mid-save never loses the previous one."""

from __future__ import annotations

import os
import re
import tempfile
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .offload import CHECKPOINT_FILES, same_layout

FORMAT = "torch_engram.checkpoint"
VERSION = 1

_Opt = torch.optim.Optimizer
Optimizers = _Opt | Sequence[_Opt | None] | Mapping[str, _Opt | None]


def _optimizer_states(optimizers: Optimizers | None):
    if optimizers is None:
        return None
    if isinstance(optimizers, torch.optim.Optimizer):
        return optimizers.state_dict()
    if isinstance(optimizers, Mapping):
        return {k: None if o is None else o.state_dict() for k, o in optimizers.items()}
    return [None if o is None else o.state_dict() for o in optimizers]


def _rng_state() -> dict:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _fsync_dir(directory: str) -> None:
    # The rename is durable only once the directory entry is; not every platform can open a
    # directory for fsync.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomic(path: str | os.PathLike, write) -> None:
    """write(tmp_path) into a temporary file next to `path`, fsynced, then renamed over `path`
    (os.replace, atomic on POSIX and Windows) and the directory fsynced: a crash at any point
    leaves either the old file or the new one. The temporary file is removed on exceptions."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(directory)


def save_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    optimizers: Optimizers | None = None,
    extra: Any = None,
    *,
    rng: bool = True,
) -> None:
    """Write {model, optimizers, extra, rng} to `path` atomically.

    The payload goes to a temporary file in the same directory, is flushed and fsynced, then
    renamed over `path` (os.replace, atomic on POSIX and Windows) and the directory is fsynced. An
    exception or a crash at any point leaves the previous file at `path` intact; the temporary file
    is removed on exceptions. `optimizers`: one optimizer, a sequence or a name -> optimizer
    mapping (None entries allowed, as make_optimizers may return them); load_checkpoint takes the
    same structure. `extra` should be plain data (numbers, strings, lists, dicts, tensors) to load
    with weights_only=True. `rng` saves torch's CPU (and initialised CUDA) generator states.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    base = os.path.basename(path)
    # File-placed tables write their records to files named after this checkpoint ("<name>.<token>.
    # <i>.rows", holes kept) instead of through memory; the payload names them. They are complete
    # and durable before the payload that names them replaces the previous one, and the previous
    # checkpoint's files are removed only after: a crash leaves a loadable checkpoint either way.
    files = {"mode": "save", "dir": directory, "base": base, "token": uuid.uuid4().hex[:12], "written": []}
    reset = CHECKPOINT_FILES.set(files)
    try:
        payload = {
            "format": FORMAT,
            "version": VERSION,
            "model": model.state_dict(),
            "optimizers": _optimizer_states(optimizers),
            "extra": extra,
            "rng": _rng_state() if rng else None,
        }
        CHECKPOINT_FILES.reset(reset)
        reset = None
        if files["written"]:
            _fsync_dir(directory)

        def write(tmp: str) -> None:
            with open(tmp, "wb") as f:
                torch.save(payload, f)

        write_atomic(path, write)
    except BaseException:
        if reset is not None:
            CHECKPOINT_FILES.reset(reset)
        for name in files["written"]:
            try:
                os.unlink(os.path.join(directory, name))
            except FileNotFoundError:
                pass
        raise
    keep = set(files["written"])
    ours = re.compile(re.escape(base) + r"\.[0-9a-f]{12}\.\d+\.rows")  # this checkpoint's, no one else's
    for name in os.listdir(directory):
        if ours.fullmatch(name) and name not in keep:
            try:
                os.unlink(os.path.join(directory, name))
            except FileNotFoundError:
                pass


def _optimizer_pairs(optimizers: Optimizers | None, states) -> list:
    """[(optimizer, saved state, key)], checking that the structure matches the saved one."""
    if optimizers is None:
        return []
    if isinstance(optimizers, torch.optim.Optimizer):
        optimizers, states = [optimizers], [states]
    if isinstance(optimizers, Mapping):
        if not isinstance(states, Mapping) or set(states) != set(optimizers):
            have = sorted(states) if isinstance(states, Mapping) else type(states).__name__
            raise ValueError(
                f"load_checkpoint: optimizers must match the saved ones, saved {have}, given {sorted(optimizers)}"
            )
        pairs = [(optimizers[k], states[k], k) for k in optimizers]
    else:
        if not isinstance(states, Sequence) or len(states) != len(optimizers):
            have = len(states) if isinstance(states, Sequence) else type(states).__name__
            raise ValueError(
                f"load_checkpoint: optimizers must match the saved ones, saved {have}, given {len(optimizers)}"
            )
        pairs = [(o, s, i) for i, (o, s) in enumerate(zip(optimizers, states))]
    for opt, state, key in pairs:
        if (opt is None) != (state is None):
            given = "None" if opt is None else "given"
            saved = "none" if state is None else "a state"
            raise ValueError(f"load_checkpoint: optimizer {key!r} is {given} but the checkpoint has {saved} for it")
    return [(o, s, k) for o, s, k in pairs if o is not None]


def _check_model_state(model: nn.Module, saved: Mapping, strict: bool) -> None:
    """Every key, shape and dtype of `saved` against the model's state_dict, before anything changes
    (load_state_dict copies the matching tensors before it reports a mismatch)."""
    own = model.state_dict()
    missing = sorted(set(own) - set(saved))
    unexpected = sorted(set(saved) - set(own))
    if strict and (missing or unexpected):
        raise ValueError(
            f"load_checkpoint: the checkpoint does not match the model: missing keys {missing[:8]}"
            f"{' ...' if len(missing) > 8 else ''}, unexpected keys {unexpected[:8]}"
            f"{' ...' if len(unexpected) > 8 else ''}"
        )
    for key in sorted(set(own) & set(saved)):
        a, b = own[key], saved[key]
        if isinstance(a, dict) and isinstance(b, dict):  # a file table's record file
            if not same_layout(a, b):
                raise ValueError(f"load_checkpoint: {key!r}: the saved record layout {b} differs from the model's {a}")
            continue
        if isinstance(a, torch.Tensor) != isinstance(b, torch.Tensor):
            raise ValueError(
                f"load_checkpoint: {key!r} is a {type(b).__name__} in the checkpoint, a {type(a).__name__} in the model"
            )
        if isinstance(a, torch.Tensor) and (a.shape != b.shape or a.dtype != b.dtype):
            raise ValueError(
                f"load_checkpoint: {key!r} is {tuple(b.shape)} {b.dtype} in the checkpoint but "
                f"{tuple(a.shape)} {a.dtype} in the model"
            )


def load_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    optimizers: Optimizers | None = None,
    *,
    map_location: str | torch.device | None = "cpu",
    strict: bool = True,
    restore_rng: bool = True,
    weights_only: bool = True,
) -> Any:
    """Load a save_checkpoint file into `model` and `optimizers` (same structure as saved; None
    skips them) and return its `extra`. Tensors are read to `map_location` (default CPU) and then
    copied to where the parameters live; optimizer state keeps its saved dtypes. `restore_rng`
    restores the generator states saved with rng=True, so dropout and sampling resume exactly.
    Keys, shapes and dtypes (hashing buffers included) and the optimizers' structure are all
    checked first: a checkpoint that does not fit raises and changes nothing."""
    payload = torch.load(os.fspath(path), map_location=map_location, weights_only=weights_only)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"load_checkpoint: {os.fspath(path)!r} is not a torch_engram checkpoint")
    if payload.get("version", 0) > VERSION:
        raise ValueError(
            f"load_checkpoint: checkpoint version {payload['version']} is newer than this torch_engram's {VERSION}"
        )
    # Everything is checked before anything changes: a failed load leaves model and optimizers as
    # they were. File-placed tables saved as record files read them from next to the checkpoint.
    directory = os.path.dirname(os.path.abspath(os.fspath(path)))
    files = {"mode": "load", "dir": directory, "keys": set(payload["model"])}
    reset = CHECKPOINT_FILES.set(files)
    try:
        return _load(payload, path, model, optimizers, strict, restore_rng, directory)
    finally:
        CHECKPOINT_FILES.reset(reset)


def _load(payload, path, model, optimizers, strict, restore_rng, directory):
    _check_model_state(model, payload["model"], strict)
    for key, v in payload["model"].items():
        if isinstance(v, dict) and "file" in v and not os.path.exists(os.path.join(directory, v["file"])):
            raise ValueError(
                f"load_checkpoint: {key!r} is in {v['file']!r}, which is missing next to {os.fspath(path)!r}"
            )
    pairs = _optimizer_pairs(optimizers, payload["optimizers"])
    rng = payload.get("rng")
    if restore_rng and rng is not None and "cuda" in rng and torch.cuda.is_available():
        if len(rng["cuda"]) != torch.cuda.device_count():
            raise ValueError(
                f"load_checkpoint: the checkpoint has the RNG states of {len(rng['cuda'])} CUDA "
                f"devices, this process sees {torch.cuda.device_count()}; pass restore_rng=False"
            )
    before = [opt.state_dict() for opt, _, _ in pairs]  # references, not copies: loading replaces them
    touched = 0
    try:
        for opt, state, _ in pairs:
            touched += 1  # a failing load may have changed its optimizer halfway: roll it back too
            opt.load_state_dict(state)
        model.load_state_dict(payload["model"], strict=strict)
    except BaseException:
        for (opt, _, _), old in zip(pairs[:touched], before):
            opt.load_state_dict(old)
        raise
    if restore_rng and rng is not None:
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
    return payload["extra"]
