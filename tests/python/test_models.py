"""Reference MoE transformer: shapes, causality (Engram included), routing, config checks."""

import pytest
import torch

from conftest import tiny_lm_config
from torch_engram.experiment.models import MoE, TransformerLM, default_engram_layers

pytestmark = pytest.mark.usefixtures("one_thread")
V = 50


def config(**changes):
    return tiny_lm_config(V, {"proj_bias": False}, **changes)


@pytest.mark.parametrize("hc_mult", [1, 2])
@pytest.mark.parametrize("routing", ["softmax", "sigmoid"])
def test_forward_backward_and_causality(hc_mult, routing):
    torch.manual_seed(0)
    cfg = config(hc_mult=hc_mult, routing=routing, n_dense_layers=1)
    model = TransformerLM(cfg, table_grad="dense")
    ids = torch.randint(0, V, (2, 12))
    out = model(ids, ids)
    assert out.logits.shape == (2, 12, V) and out.loss.ndim == 0 and out.aux_loss.ndim == 0
    (out.loss + out.aux_loss).backward()
    tables = model.table_parameters()
    assert len(tables) == 2 and all(t.grad is not None and t.grad.abs().sum() > 0 for t in tables)
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad and p.dim() >= 2)
    # Changing token 7 changes no logit before position 7 (attention is causal, n-grams look back).
    changed = ids.clone()
    changed[:, 7] = (changed[:, 7] + 1) % V
    with torch.no_grad():
        a, b = model(ids).logits, model(changed).logits
    torch.testing.assert_close(a[:, :7], b[:, :7])
    assert (a[:, 7:] - b[:, 7:]).abs().max() > 1e-4


def test_engram_update_reaches_the_residual_before_attention():
    torch.manual_seed(0)
    model = TransformerLM(config())
    ids = torch.randint(0, V, (1, 10))
    with torch.no_grad():
        before = model(ids).logits
        model.blocks[1].engram.table.weight.mul_(3.0)
        after = model(ids).logits
    assert (before - after).abs().max() > 1e-4
    assert [b.layer_id for b in model.blocks if b.engram is not None] == [1, 2]


def test_moe_routes_top_k_and_balances():
    torch.manual_seed(0)
    moe = MoE(d_model=8, n_experts=4, top_k=2, d_expert=4, d_shared=0)
    for p in (moe.w1, moe.w3, moe.w2):
        torch.nn.init.normal_(p)
    x = torch.randn(3, 5, 8)
    y, _aux = moe(x)
    # Dense check: every token's output is its top-2 experts weighted by renormalised softmax scores.
    scores = moe.router(x.reshape(-1, 8)).softmax(-1)
    w, e = scores.topk(2, dim=-1)
    w = w / w.sum(-1, keepdim=True)
    expected = torch.zeros(15, 8)
    for t in range(15):
        for j in range(2):
            xe = x.reshape(-1, 8)[t]
            k = e[t, j]
            expected[t] += w[t, j] * ((torch.nn.functional.silu(xe @ moe.w1[k]) * (xe @ moe.w3[k])) @ moe.w2[k])
    torch.testing.assert_close(y.reshape(-1, 8), expected, rtol=1e-5, atol=1e-5)
    torch.nn.init.zeros_(moe.router.weight)  # uniform scores: the balance loss is exactly 1
    assert moe(x)[1].item() == pytest.approx(1.0)


def test_tied_embeddings_share_the_weight():
    model = TransformerLM(config(tie_embeddings=True, engram=None))
    assert model.lm_head.weight is model.embed.weight


def test_default_engram_layers():
    assert default_engram_layers(2) == (1,)
    assert default_engram_layers(4) == (1, 2)
    assert default_engram_layers(8) == (1, 4)
    assert default_engram_layers(30) == (1, 15)
    with pytest.raises(ValueError, match="n_layers must be >= 2"):
        default_engram_layers(1)


def test_bad_configs():
    with pytest.raises(ValueError, match="routing must be one of"):
        config(routing="hash")
    with pytest.raises(ValueError, match="n_routed_experts must be >= top_k=2"):
        config(n_routed_experts=1)
    with pytest.raises(ValueError, match=r"engram.layer_ids must be block indices < n_layers=2"):
        config(n_layers=2)
    with pytest.raises(ValueError, match="d_model must be a multiple of 2 \\* n_heads=4"):
        config(d_model=18)
    model = TransformerLM(config(engram=None))
    with pytest.raises(ValueError, match="sequence length must be <= max_seq_len=32, got 33"):
        model(torch.zeros(1, 33, dtype=torch.int64))


def test_bf16_autocast_trains():
    # The GPU preset runs under bf16 autocast; the CPU autocast exercises the same dtype mixing.
    torch.manual_seed(0)
    model = TransformerLM(config(), table_grad="sparse")
    ids = torch.randint(0, V, (2, 12))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids, ids)
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.loss)
    (out.loss + out.aux_loss).backward()
    assert all(t.grad.is_sparse for t in model.table_parameters())
    assert all(torch.isfinite(p.grad).all() for p in model.dense_parameters() if p.grad is not None)


def test_host_tables_train_evaluate_and_generate_as_device_tables():
    # The sweep's model with every Engram table in host memory behind a small row cache, the next
    # batch prefetched: training, evaluation and greedy generation match the device tables.
    torch.manual_seed(0)
    dev = TransformerLM(config())
    host = TransformerLM(config(), table_options=dict(placement="host", cache_rows=140))
    host.load_state_dict(dev.state_dict())
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, V, (2, 12), generator=g) for _ in range(6)]
    for model in (dev, host):
        opt = torch.optim.SGD([p for n, p in model.named_parameters() if ".table." not in n], lr=0.1)
        model.losses = []
        for s, ids in enumerate(batches):
            out = model(ids, targets=ids)
            if s + 1 < len(batches):
                model.prefetch(batches[s + 1])
            out.loss.backward()
            opt.step()
            opt.zero_grad()
            model.losses.append(out.loss.item())
    assert dev.losses == host.losses
    assert sum(b.engram.table.cache_stats()["evictions"] for b in host.blocks if b.engram is not None) > 0
    prompts = [batches[0][0, :4].tolist(), batches[0][1, :7].tolist()]
    for kw in (dict(), dict(temperature=1.0, top_k=5, seed=2)):
        assert host.generate(prompts, 10, **kw) == dev.generate(prompts, 10, use_cache=False, **kw)
    with torch.no_grad():
        assert torch.equal(dev(batches[1]).logits, host(batches[1]).logits)


def test_host_tables_start_with_the_model_table_std():
    # A fresh host-placed model initialises its rows (lazily) with engram_table_init_std, as the
    # device tables do: the rows' spread matches, though not the values (another generator).
    torch.manual_seed(0)
    cfg = config(engram_table_init_std=0.05)
    dev = TransformerLM(cfg)
    host = TransformerLM(cfg, table_options=dict(placement="host", cache_rows=140))
    ids = torch.randint(0, V, (2, 12))
    for model in (dev, host):
        e = model.engram_modules()[0]
        rows = model.hasher(ids)[0]
        std = float(e.table(rows).detach().std())
        assert 0.035 < std < 0.065, std
