"""DeepSeek-V4.1 Engram weights: a synthetic, reduced-size checkpoint written in the exact V4.1
layout (names, shapes, dtypes, sharded with an index, config.json's text_config) loads into
Engram modules whose output equals the V4.1 formulation computed here from the raw tensors."""

import json

import pytest
import torch

import torch_engram as te
from torch_engram.deepseek_v41 import dequantize_blocks, engram_config_from_v41, load_v41_engram
from torch_engram.fp8 import quantize_fp8

safetensors = pytest.importorskip("safetensors.torch")

V, V_COMP, H, M, D_HEAD, K, N = 60, 40, 64, 2, 32, 2, 4
LAYERS = [1, 3]


def primes_above(start, count, seen):
    out, c = [], start
    while len(out) < count:
        c += 1
        if all(c % p for p in range(2, int(c**0.5) + 1)) and c not in seen:
            out.append(c)
            seen.add(c)
    return out


def text_config():
    # V4.1's prime layout, computed independently: per layer, per order, the search restarts at
    # engram_vocab_size - 1 and every head takes the next unused prime.
    seen, rows = set(), []
    for _ in LAYERS:
        ps = [p for _ in range(N - 1) for p in primes_above(100, K, seen)]
        rows.append(sum(ps))
    return {
        "hidden_size": H,
        "hc_mult": M,
        "rms_norm_eps": 1e-20,
        "engram_layer_ids": LAYERS,
        "engram_num_embeddings": rows,
        "engram_max_ngram_size": N,
        "engram_n_heads": K,
        "engram_head_dim": D_HEAD,
        "engram_vocab_size": 101,
        "engram_compressed_vocab_size": V_COMP,
        "engram_pad_token_id": 2,
    }


def write_checkpoint(tmp_path):
    tc = text_config()
    g = torch.Generator().manual_seed(0)
    C = (N - 1) * K
    shards, raw = [{}, {}], {}
    for s, (i, rows) in enumerate(zip(LAYERS, tc["engram_num_embeddings"])):
        w, sc = quantize_fp8(torch.randn(rows, D_HEAD, generator=g) * 0.3)
        kv, kv_scale = quantize_fp8(torch.randn((M + 1) * H, C * D_HEAD, generator=g) * 0.05)
        # wkv's scales are 32 x 32 blocks: requantise with one scale per block.
        blocks = torch.randn((M + 1) * H // 32, C * D_HEAD // 32, generator=g).abs().log2().round().clamp(-4, 2)
        kv_scale = (blocks.to(torch.int32) + 127).to(torch.uint8).view(torch.float8_e8m0fnu)
        t = {
            f"layers.{i}.engram.embed.weight": w,
            f"layers.{i}.engram.embed.scale": sc,
            f"layers.{i}.engram.wkv.weight": kv,
            f"layers.{i}.engram.wkv.scale": kv_scale,
            f"layers.{i}.engram.q_weight": (1 + 0.3 * torch.randn(M, H, generator=g)).bfloat16(),
            f"layers.{i}.engram.k_weight": (1 + 0.3 * torch.randn(M, H, generator=g)).bfloat16(),
        }
        shards[s].update(t)
        raw.update(t)
    shards[0]["layers.0.attn.wq.weight"] = torch.zeros(4, 4)  # other tensors of the model
    names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    weight_map = {}
    for name, shard in zip(names, shards):
        safetensors.save_file(shard, str(tmp_path / name))
        weight_map.update(dict.fromkeys(shard, name))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["DeepseekV41ForCausalLM"], "text_config": tc}))
    return raw


def v41_engram(raw, i, hidden, ids, lut, cfg):
    """V4.1's Engram from the raw tensors: hash, FP8 gather, FP8 wkv, gate on the hc stream."""
    hasher = te.NgramHasher(cfg, lut=lut)
    rows = hasher(ids)[cfg.layer_ids.index(i)].long()
    w = raw[f"layers.{i}.engram.embed.weight"].float()
    sc = raw[f"layers.{i}.engram.embed.scale"].float()
    e = (w[rows].unflatten(-1, (-1, 32)) * sc[rows].unsqueeze(-1)).flatten(-2).bfloat16().flatten(-2)
    wkv = raw[f"layers.{i}.engram.wkv.weight"].float()
    s = raw[f"layers.{i}.engram.wkv.scale"].float().repeat_interleave(32, 0).repeat_interleave(32, 1)
    kv = e.float() @ (wkv * s).t()
    key, value = kv.split([M * H, H], dim=-1)
    key = key.unflatten(-1, (M, H))
    wgt = raw[f"layers.{i}.engram.q_weight"].float() * raw[f"layers.{i}.engram.k_weight"].float()
    h = hidden.float()
    rstd = torch.rsqrt(h.square().mean(-1) + 1e-20) * torch.rsqrt(key.square().mean(-1) + 1e-20)
    dot = (h * wgt * key).sum(-1) * rstd * H**-0.5
    gate = torch.sigmoid(dot.sign() * dot.abs().clamp_min(1e-6).sqrt())
    return gate.unsqueeze(-1) * value.unsqueeze(-2)


def test_config_mapping_and_layout_check():
    tc = text_config()
    cfg = engram_config_from_v41({"text_config": tc})
    assert cfg.max_ngram_size == N and cfg.d_head == D_HEAD and cfg.num_heads == (N - 1) * K
    assert not cfg.use_conv and not cfg.proj_bias and cfg.gate_eps == 1e-20 and cfg.pad_id == 2
    assert te.TableLayout.from_config(cfg).rows_per_layer == tuple(tc["engram_num_embeddings"])
    with pytest.raises(ValueError, match="disagree with the prime layout"):
        engram_config_from_v41({**tc, "engram_num_embeddings": [1, 2]})
    with pytest.raises(ValueError, match="no 'engram_head_dim'"):
        engram_config_from_v41({k: v for k, v in tc.items() if k != "engram_head_dim"})
    # The released V4.1-Flash config gives the rows of ENGRAM.md.
    flash = {
        "engram_layer_ids": [1, 14],
        "engram_max_ngram_size": 4,
        "engram_n_heads": 8,
        "engram_head_dim": 256,
        "engram_vocab_size": 16000000,
        "engram_compressed_vocab_size": 99092,
        "engram_pad_token_id": 2,
        "engram_num_embeddings": [384006168, 384016682],
    }
    assert engram_config_from_v41(flash) == te.EngramConfig.v41_flash(pad_id=2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_synthetic_checkpoint_loads_and_equals_the_v41_formulation(tmp_path, dtype):
    raw = write_checkpoint(tmp_path)
    lut = torch.arange(V) % V_COMP
    _, engrams = load_v41_engram(tmp_path, lut=lut, dtype=dtype)
    assert sorted(engrams) == LAYERS
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, V, (2, 17), generator=g)
    hidden = torch.randn(2, 17, M, H, generator=g).to(dtype)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5  # bfloat16: the GEMM's output rounding
    for i, eng in engrams.items():
        assert eng.table.storage == "fp8" and eng.table.weight.dtype == torch.float8_e4m3fn
        assert torch.equal(eng.table.weight.view(torch.uint8), raw[f"layers.{i}.engram.embed.weight"].view(torch.uint8))
        assert eng.kv_proj.bias is None and not eng.config.use_conv
        torch.testing.assert_close(
            eng.kv_proj.weight.float(),
            dequantize_blocks(raw[f"layers.{i}.engram.wkv.weight"], raw[f"layers.{i}.engram.wkv.scale"], torch.float32),
            atol=0,
            rtol=2**-8 if dtype == torch.bfloat16 else 0,
        )
        with torch.no_grad():
            out = eng(hidden, input_ids=ids)
        want = v41_engram(raw, i, hidden, ids, lut, eng.config)
        assert out.dtype == dtype
        torch.testing.assert_close(out.float(), want, atol=tol * float(want.abs().max()), rtol=tol)
    # One layer alone, and a plain safetensors file with the config passed in.
    _, one = load_v41_engram(tmp_path, lut=lut, layer_ids=[3])
    assert list(one) == [3]
    with pytest.raises(ValueError, match="exactly one of tokenizer= and lut="):
        load_v41_engram(tmp_path)
    with pytest.raises(ValueError, match="must be among engram_layer_ids"):
        load_v41_engram(tmp_path, lut=lut, layer_ids=[2])


def test_shape_mismatch_names_the_tensor(tmp_path):
    write_checkpoint(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["text_config"]["hidden_size"] = 32
    with pytest.raises(
        ValueError, match=r"layers\.1\.engram\.wkv\.weight is \(192, 192\), the config gives \(96, 192\)"
    ):
        load_v41_engram(tmp_path, config=cfg, lut=torch.arange(V) % V_COMP)
