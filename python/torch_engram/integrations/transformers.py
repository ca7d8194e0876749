"""Engram in Hugging Face `transformers` causal LMs (`pip install torch-engram[hf]`).

    from torch_engram.integrations.transformers import add_engram, from_pretrained
    model = AutoModelForCausalLM.from_config(cfg)            # Llama, Qwen3, Qwen3-MoE, Mixtral, ...
    add_engram(model, EngramConfig(...), layer_ids=(1, 4), tokenizer=tok, lr=3e-4, zero_init=True)
    model.generate(...)                                      # n-gram and conv state carried per step
    model.save_pretrained(d); model = from_pretrained(d)     # Engram layers, LUT and hashing included

One mechanism for every decoder whose layers sit in a ModuleList (`model.get_decoder().layers`, or
`model.model.layers`) and take the hidden states [B, T, D] as their first argument:

- the Engram of layer i is a submodule of that decoder layer (`...layers.{i}.engram`), so every
  other state_dict key keeps its name and pretrained weights still load into the base model;
- a forward pre-hook on the decoder hashes the input ids once per forward for all Engram layers
  (one NgramHasher, `...engram_hasher`), and a forward pre-hook on each chosen layer adds its
  Engram update to the hidden states before the layer runs (its attention: docs/SPEC.md section 6);
- without gradients and with the KV cache on (generation), the decoder's pre-hook keeps an
  EngramState per generation (tied to the cache object): a step of new tokens reads the n-gram and
  conv histories of the tokens before it, so decoding with the cache gives the tokens of
  recomputing the whole prefix. Beam search (which reorders the cache) is not supported.

Tables learn with the library's fused optimizers inside backward, at `table_lr_mult` (5x) the base
learning rate and no weight decay; they have no .grad, so the user's optimizer (or the Trainer's)
leaves them alone. `EngramCallback` keeps the table learning rate at 5x the Trainer's schedule.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from ..config import EngramConfig
from ..hashing import NgramHasher
from ..modules import Engram
from ..state import EngramState

CONFIG_KEY = "engram"  # model.config.engram: what from_pretrained needs to rebuild the layers


class _Context:
    """Per-model runtime state shared by the hooks (not a module: nothing of it is saved)."""

    def __init__(self, hasher: NgramHasher):
        self.hasher = hasher
        self.rows: torch.Tensor | None = None
        self.state: EngramState | None = None
        self.state_cache = None  # the KV cache object the state belongs to
        self.lengths = None


def _decoder_layers(model: nn.Module) -> tuple[nn.Module, nn.ModuleList]:
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", None)
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(
            f"add_engram: {type(model).__name__} has no decoder layer list (model.get_decoder().layers); "
            "add_engram supports decoder-only causal LMs such as Llama, Qwen3, Qwen3-MoE and Mixtral"
        )
    return decoder, layers


def _hidden_size(model: nn.Module) -> int:
    cfg = getattr(model, "config", None)
    cfg = getattr(cfg, "get_text_config", lambda: cfg)()
    d = getattr(cfg, "hidden_size", None)
    if d is None:
        raise ValueError(f"add_engram: {type(model).__name__}'s config has no hidden_size")
    return int(d)


def _find_cache(kwargs: dict):
    for k in ("cache", "past_key_values"):
        if kwargs.get(k) is not None:
            return kwargs[k]
    return None


def _decoder_pre_hook(model: nn.Module, ctx: _Context):
    def hook(module, args, kwargs):
        ids = args[0] if args else kwargs.get("input_ids")
        if ids is None:
            raise ValueError(
                f"Engram ({type(model).__name__}): the Engram layers need input_ids (not inputs_embeds) to hash"
            )
        cache = _find_cache(kwargs)
        use_cache = kwargs.get("use_cache")
        if use_cache is None:
            use_cache = bool(getattr(model.config, "use_cache", False))
        seen = int(cache.get_seq_length()) if cache is not None and hasattr(cache, "get_seq_length") else 0
        if use_cache and not torch.is_grad_enabled():
            # Generation: new tokens after what this cache has seen.
            if seen == 0 or ctx.state is None or ctx.state_cache is not cache:
                if seen != 0:
                    raise RuntimeError(
                        "Engram: a forward continues a KV cache whose Engram state is not known (a cache "
                        "built elsewhere, or reordered by beam search); run the prefix with this model first"
                    )
                ctx.state = EngramState(ctx.hasher.config, ids.shape[0], device=ids.device)
            elif ctx.state.batch_size != ids.shape[0]:
                raise RuntimeError("Engram: the batch size changed within one generation (no beam search)")
            ctx.rows = ctx.state.hash(ctx.hasher, ids)
            # The cache object is created inside the first forward when none is passed: bind the
            # state to it after that forward (see _decoder_post_hook).
            ctx.state_cache = cache
        else:
            ctx.state, ctx.state_cache = None, None
            ctx.rows = ctx.hasher(ids)
        return None

    return hook


def _decoder_post_hook(ctx: _Context):
    def hook(module, args, kwargs, output):
        if ctx.state is not None and ctx.state_cache is None:
            ctx.state_cache = getattr(output, "cache", None) or getattr(output, "past_key_values", None)
        ctx.rows = None
        return None

    return hook


def _layer_pre_hook(engram: Engram, ctx: _Context):
    def hook(module, args, kwargs):
        if ctx.rows is None:
            raise RuntimeError("Engram: a decoder layer with Engram ran outside the decoder's forward")
        rows = ctx.rows[engram.layer_index]
        if args:
            hidden, rest = args[0], args[1:]
        else:
            hidden, rest = kwargs.pop("hidden_states"), ()
        u = engram(hidden, rows=rows, state=ctx.state)
        hidden = hidden + u.to(hidden.dtype)
        if args:
            return (hidden, *rest), kwargs
        kwargs["hidden_states"] = hidden
        return args, kwargs

    return hook


def add_engram(
    model: nn.Module,
    engram_config: EngramConfig,
    layer_ids=None,
    *,
    tokenizer=None,
    lut: torch.Tensor | None = None,
    lr: float = 1e-3,
    table_lr_mult: float = 5.0,
    zero_init: bool = False,
    table_optimizer: str = "partial_rowwise_adam",
    table_init_std: float = 0.02,
    table_options: dict | None = None,
) -> nn.Module:
    """Insert Engram layers into the decoder layers `layer_ids` (default engram_config.layer_ids)
    of a transformers causal LM, in place; returns the model.

    tokenizer (anything build_compression takes, e.g. a PreTrainedTokenizerFast) or lut: the token
    compression of the hasher (or neither when engram_config.compressed_vocab_size is set: ids are
    hashed as they are). lr: the base learning rate; the tables train at table_lr_mult * lr with no
    weight decay. zero_init: zero the value projection, so the model's outputs are unchanged until
    the first update (fine-tuning starts from the pretrained behaviour). The Engram modules take
    the model's device and dtype (tables in float32 unless table_options says dtype=...)."""
    if getattr(model, "_engram_context", None) is not None:
        raise ValueError(f"add_engram: {type(model).__name__} already has Engram layers")
    decoder, layers = _decoder_layers(model)
    if layer_ids is not None:
        engram_config = engram_config.replace(layer_ids=tuple(int(i) for i in layer_ids))
    bad = [i for i in engram_config.layer_ids if not 0 <= i < len(layers)]
    if bad:
        raise ValueError(f"add_engram: layer_ids must lie in [0, {len(layers)}) (decoder layers), got {bad}")
    if tokenizer is not None and lut is not None:
        raise ValueError("add_engram: pass tokenizer= or lut=, not both")
    if tokenizer is not None:
        from ..tokenizer import build_compression

        lut = build_compression(tokenizer).lut
    if lut is None and engram_config.compressed_vocab_size is None:
        raise ValueError("add_engram: pass tokenizer= or lut= (or set engram_config.compressed_vocab_size)")
    p = next(model.parameters())
    D = _hidden_size(model)
    hasher = NgramHasher(engram_config, lut=lut, device=p.device)
    decoder.engram_hasher = hasher
    ctx = _Context(hasher)
    options = dict(lr=lr * table_lr_mult, weight_decay=0.0, **(table_options or {}))
    for i in engram_config.layer_ids:
        engram = Engram(
            engram_config,
            i,
            D,
            table_optimizer=table_optimizer,
            table_init_std=table_init_std,
            table_options=options,
            device=p.device,
            dtype=p.dtype,
        )
        if zero_init:
            with torch.no_grad():
                engram.kv_proj.weight[D:].zero_()  # the value rows: u = alpha * v = 0
                if engram.kv_proj.bias is not None:
                    engram.kv_proj.bias[D:].zero_()
        layers[i].engram = engram
        layers[i].register_forward_pre_hook(_layer_pre_hook(engram, ctx), with_kwargs=True)
    decoder.register_forward_pre_hook(_decoder_pre_hook(model, ctx), with_kwargs=True)
    decoder.register_forward_hook(_decoder_post_hook(ctx), with_kwargs=True)
    model._engram_context = ctx
    setattr(
        model.config,
        CONFIG_KEY,
        dict(
            config=asdict(engram_config),
            table_optimizer=table_optimizer,
            table_lr_mult=table_lr_mult,
            lr=lr,
            table_options={k: v for k, v in (table_options or {}).items() if k != "dtype"},
            table_dtype=str((table_options or {}).get("dtype", "")).replace("torch.", "") or None,
        ),
    )
    return model


def engram_modules(model: nn.Module) -> list[Engram]:
    return [m for m in model.modules() if isinstance(m, Engram)]


def set_table_lr(model: nn.Module, base_lr: float) -> None:
    """Set every Engram table's learning rate to table_lr_mult * base_lr (e.g. per scheduler step)."""
    mult = getattr(model.config, CONFIG_KEY, {}).get("table_lr_mult", 5.0)
    for e in engram_modules(model):
        e.table.lr = mult * base_lr


def from_pretrained(path: str | os.PathLike, **kwargs) -> nn.Module:
    """A model saved with save_pretrained after add_engram: the base model through
    AutoModelForCausalLM.from_pretrained(path, **kwargs), then its Engram layers rebuilt from
    config.json and loaded (tables, their optimizer state, projections, gains, hashing buffers)."""
    from transformers import AutoModelForCausalLM

    from ..deepseek_v41 import _Checkpoint

    path = os.fspath(path)
    info = json.loads((Path(path) / "config.json").read_text()).get(CONFIG_KEY)
    if info is None:
        raise ValueError(f"from_pretrained: {path} has no Engram layers (config.json has no {CONFIG_KEY!r})")
    from transformers.utils import logging as hf_logging

    # The base model's loader lists the Engram tensors as unexpected keys: they are loaded below.
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    finally:
        hf_logging.set_verbosity(level)
    ckpt = _Checkpoint(path)
    keys = [k for k in ckpt.where if ".engram." in k or "engram_hasher." in k]
    lut_key = next((k for k in keys if k.endswith("engram_hasher.lut")), None)
    lut = ckpt.get(lut_key) if lut_key is not None else None
    cfg = EngramConfig(**info["config"])
    options = dict(info.get("table_options") or {})
    if info.get("table_dtype"):
        options["dtype"] = getattr(torch, info["table_dtype"])
    add_engram(
        model,
        cfg,
        lut=lut if lut is not None and lut.numel() else None,
        lr=info.get("lr", 1e-3),
        table_lr_mult=info.get("table_lr_mult", 5.0),
        table_optimizer=info.get("table_optimizer", "partial_rowwise_adam"),
        table_options=options,
    )
    own = model.state_dict()
    want = {k for k in own if ".engram." in k or "engram_hasher." in k}
    state = {}
    for k in keys:
        # Saved names may lack the wrapper's prefix (a base model saved alone) or match exactly.
        name = k if k in own else next((o for o in want if o.endswith("." + k) or k.endswith("." + o)), None)
        if name is None:
            raise ValueError(f"from_pretrained: {k!r} of the checkpoint matches no Engram parameter of the model")
        state[name] = ckpt.get(k)
    missing = sorted(want - set(state))
    if missing:
        raise ValueError(f"from_pretrained: the checkpoint lacks Engram tensors {missing[:6]}")
    p = next(model.parameters())
    model.load_state_dict({k: v.to(p.device) for k, v in state.items()}, strict=False)
    return model


try:
    from transformers import TrainerCallback
except ImportError:  # transformers is optional: the callback exists only with it
    TrainerCallback = object


class EngramCallback(TrainerCallback):
    """For `transformers.Trainer`: keeps the fused tables' learning rate at table_lr_mult times
    the Trainer's scheduled learning rate, at every step."""

    def on_step_begin(self, args, state, control, model=None, lr_scheduler=None, optimizer=None, **kwargs):
        if model is None:
            return
        if lr_scheduler is not None:
            lr = lr_scheduler.get_last_lr()[0]
        elif optimizer is not None:
            lr = optimizer.param_groups[0]["lr"]
        else:
            return
        set_table_lr(model, lr)
