"""DeepSeek-V4.1 Engram weights: load the Engram tensors of a V4.1(-Flash) safetensors checkpoint
into `Engram` modules in the V4.1 form (docs/SPEC.md section 12).

The layout, as the public V4.1 inference code reads it (DeepSeek's reference inference code, vLLM's
`deepseek_v41` and SGLang's `layers/engram.py`), per Engram layer i of `engram_layer_ids`
(checkpoint keys carry no `model.` prefix):

    layers.{i}.engram.embed.weight  [N_i, d_head]            float8_e4m3fn   the layer's table (24 tables)
    layers.{i}.engram.embed.scale   [N_i, d_head / 32]       float8_e8m0fnu  one scale per 32 values
    layers.{i}.engram.wkv.weight    [(M + 1) H, C d_head]    float8_e4m3fn   keys (M blocks of H), then value
    layers.{i}.engram.wkv.scale     [(M + 1) H / 32, C d_head / 32]  float8_e8m0fnu  32 x 32 block scales
    layers.{i}.engram.q_weight      [M, H]                   bfloat16        RMSNorm gain of the hidden stream
    layers.{i}.engram.k_weight      [M, H]                   bfloat16        RMSNorm gain of the key

(C = (max_ngram_size - 1) * n_heads tables, M = hc_mult, H = hidden_size.) Nothing of the hashing
is stored: multipliers, primes and offsets follow from the config exactly as in the official demo
(seed 0; one `engram_vocab_size` for every order), and the compression LUT comes from the
tokenizer (the demo's normaliser), which must compress to `engram_compressed_vocab_size` ids.

The mapping into torch_engram:

    embed.weight, embed.scale  -> Engram.table.weight, .weight_scale   (EngramTable(storage="fp8"), as stored)
    wkv.weight x wkv.scale     -> Engram.kv_proj.weight (dequantised to `dtype`; no bias)
    q_weight, k_weight         -> Engram.norm_q_weight, .norm_k_weight (float32; the gate uses their
                                  product in float32, as V4.1 does)
    text_config                -> EngramConfig(use_conv=False, proj_bias=False, gate_eps=rms_norm_eps)

One difference from the V4.1 serving path: V4.1 quantises the gathered rows to FP8 (one scale per
32 values) before its FP8 key/value GEMM; here the GEMM runs in `dtype` on the exact dequantised
rows and weight.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable

import torch

from .config import EngramConfig
from .fp8 import BLOCK, e8m0_to_float
from .hashing import NgramHasher, TableLayout
from .modules import Engram

_KEYS = ("embed.weight", "embed.scale", "wkv.weight", "wkv.scale", "q_weight", "k_weight")


def engram_config_from_v41(text_config: dict) -> EngramConfig:
    """The EngramConfig of a V4.1 `config.json` (its `text_config`, or the whole file when it has
    none). Checks `engram_num_embeddings` against the rows the prime layout gives."""
    c = text_config.get("text_config", text_config)

    def need(name: str, *aliases: str):
        for n in (name, *aliases):
            if n in c:
                return c[n]
        raise ValueError(f"engram_config_from_v41: config has no {name!r}")

    N = int(need("engram_max_ngram_size"))
    K = int(need("engram_n_heads"))
    d_head = int(need("engram_head_dim"))
    vocab = need("engram_vocab_size")
    vocab = tuple(int(v) for v in vocab) if isinstance(vocab, list | tuple) else (int(vocab),) * (N - 1)
    cfg = EngramConfig(
        engram_vocab_size=vocab,
        max_ngram_size=N,
        n_embed_per_ngram=K * d_head,
        n_head_per_ngram=K,
        layer_ids=tuple(int(i) for i in need("engram_layer_ids")),
        pad_id=int(need("engram_pad_token_id", "engram_pad_id")),
        seed=0,
        compressed_vocab_size=int(need("engram_compressed_vocab_size")),
        use_conv=False,
        proj_bias=False,
        gate_eps=float(c.get("rms_norm_eps", c.get("norm_eps", 1e-20))),
    )
    if "engram_num_embeddings" in c:
        want = tuple(int(n) for n in c["engram_num_embeddings"])
        got = TableLayout.from_config(cfg).rows_per_layer
        if want != got:
            raise ValueError(
                f"engram_config_from_v41: engram_num_embeddings {list(want)} disagree with the prime layout "
                f"of the config ({list(got)} rows)"
            )
    return cfg


def dequantize_blocks(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """An FP8 matrix [n_out, n_in] with one E8M0 scale per 32 x 32 block, [ceil(n_out / 32),
    ceil(n_in / 32)], as `dtype`."""
    n_out, n_in = weight.shape
    want = ((n_out + BLOCK - 1) // BLOCK, (n_in + BLOCK - 1) // BLOCK)
    if tuple(scale.shape) != want:
        raise ValueError(
            f"dequantize_blocks: scale must be {list(want)} for a [{n_out}, {n_in}] weight, got {tuple(scale.shape)}"
        )
    f = e8m0_to_float(scale).repeat_interleave(BLOCK, 0)[:n_out].repeat_interleave(BLOCK, 1)[:, :n_in]
    return (weight.float() * f).to(dtype)


class _Checkpoint:
    """Tensors by name from one safetensors file, or from a directory of shards (with
    model.safetensors.index.json, or every *.safetensors file in it)."""

    def __init__(self, path: str | os.PathLike):
        from safetensors import safe_open

        path = os.fspath(path)
        if os.path.isdir(path):
            index = os.path.join(path, "model.safetensors.index.json")
            if os.path.exists(index):
                with open(index) as f:
                    where = {k: os.path.join(path, v) for k, v in json.load(f)["weight_map"].items()}
            else:
                where = {}
                for name in sorted(os.listdir(path)):
                    if name.endswith(".safetensors"):
                        with safe_open(os.path.join(path, name), framework="pt") as f:
                            where.update({k: os.path.join(path, name) for k in f.keys()})
        else:
            with safe_open(path, framework="pt") as f:
                where = dict.fromkeys(f.keys(), path)
        self.where = where
        self._open = safe_open

    def get(self, key: str, device=None) -> torch.Tensor:
        """The tensor `key`, read straight onto `device` (default CPU)."""
        if key not in self.where:
            raise KeyError(f"load_v41_engram: the checkpoint has no tensor {key!r}")
        dev = str(torch.device(device)) if device is not None else "cpu"
        with self._open(self.where[key], framework="pt", device=dev) as f:
            return f.get_tensor(key)


def load_v41_engram(
    checkpoint: str | os.PathLike,
    *,
    config: dict | EngramConfig | None = None,
    hidden_size: int | None = None,
    hc_mult: int | None = None,
    tokenizer=None,
    lut: torch.Tensor | None = None,
    layer_ids: Iterable[int] | None = None,
    dtype: torch.dtype = torch.bfloat16,
    device=None,
) -> tuple[NgramHasher, dict[int, Engram]]:
    """(hasher, {layer_id: Engram}) of a V4.1 checkpoint (a safetensors file or a directory of
    shards with its config.json). config: the config.json dict (default: read from the
    directory) or an EngramConfig (then hidden_size and hc_mult are needed). tokenizer (a
    `tokenizers.Tokenizer` or anything build_compression takes) or lut: the compression of token
    ids. layer_ids: a subset of the Engram layers. The tables keep their FP8 storage; the key/value
    projection is dequantised into `dtype`, which is also the gather's output dtype."""
    path = os.fspath(checkpoint)
    if config is None:
        cfg_path = os.path.join(path if os.path.isdir(path) else os.path.dirname(path), "config.json")
        if not os.path.exists(cfg_path):
            raise ValueError(f"load_v41_engram: pass config=, or put config.json next to the weights ({cfg_path})")
        with open(cfg_path) as f:
            config = json.load(f)
    if isinstance(config, EngramConfig):
        cfg = config
        if hidden_size is None or hc_mult is None:
            raise ValueError("load_v41_engram: with an EngramConfig, pass hidden_size and hc_mult")
    else:
        cfg = engram_config_from_v41(config)
        text = config.get("text_config", config)
        hidden_size = int(hidden_size or text.get("hidden_size") or text["dim"])
        hc_mult = int(hc_mult or text.get("hc_mult", 1))
    if (tokenizer is None) == (lut is None):
        raise ValueError("load_v41_engram: pass exactly one of tokenizer= and lut= (the token compression)")
    if tokenizer is not None:
        from .tokenizer import build_compression

        lut = build_compression(tokenizer).lut
    hasher = NgramHasher(cfg, lut=lut, device=device)
    wanted = tuple(cfg.layer_ids) if layer_ids is None else tuple(layer_ids)
    ckpt = _Checkpoint(path)
    engrams: dict[int, Engram] = {}
    for i in wanted:
        if i not in cfg.layer_ids:
            raise ValueError(f"load_v41_engram: layer_ids must be among engram_layer_ids {cfg.layer_ids}, got {i}")
        t = {k: ckpt.get(f"layers.{i}.engram.{k}", device) for k in _KEYS}
        rows = hasher.rows_per_layer[cfg.layer_ids.index(i)]
        M, H, C = hc_mult, hidden_size, cfg.num_heads * cfg.d_head
        shapes = {
            "embed.weight": (rows, cfg.d_head),
            "embed.scale": (rows, cfg.d_head // BLOCK),
            "wkv.weight": ((M + 1) * H, C),
            "q_weight": (M, H),
            "k_weight": (M, H),
        }
        for k, shape in shapes.items():
            if tuple(t[k].shape) != shape:
                raise ValueError(
                    f"load_v41_engram: layers.{i}.engram.{k} is {tuple(t[k].shape)}, the config gives {shape}"
                )
        # Built on the meta device: no memory for the table until the checkpoint's tensors are
        # assigned (a V4.1-Flash table is 98 GB).
        eng = Engram(
            cfg,
            i,
            H,
            hc_mult=M,
            table_options=dict(storage="fp8"),
            device="meta",
            dtype=dtype,
        )
        state = {
            "table.weight": t["embed.weight"].to(device),
            "table.weight_scale": t["embed.scale"].view(torch.float8_e8m0fnu).to(device),
            "table.momentum1": torch.zeros(0, device=device),
            "table.momentum2": torch.zeros(0, device=device),
            "table.row_step": torch.zeros(0, dtype=torch.int32, device=device),
            "table.step_count": torch.zeros(1, dtype=torch.int64, device=device),
            "kv_proj.weight": dequantize_blocks(t["wkv.weight"], t["wkv.scale"], dtype).to(device),
            "norm_q_weight": t["q_weight"].float().to(device),
            "norm_k_weight": t["k_weight"].float().to(device),
        }
        eng.load_state_dict(state, assign=True)
        eng.table.weight.requires_grad_(False)
        eng.table.out_dtype = dtype
        eng.hasher = hasher
        engrams[i] = eng
    return hasher, engrams
