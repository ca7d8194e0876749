"""Allocation law: analytic P_tot / P_act against built models, and the rho split's guarantees."""

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from torch_engram.config import EngramConfig
from torch_engram.experiment.allocation import (
    allocate,
    count_model_params,
    count_params,
    engram_dense_params,
    engram_rows_per_layer,
)
from torch_engram.experiment.models import ModelConfig, TransformerLM

SETTINGS = {"deadline": None, "suppress_health_check": [HealthCheck.too_slow]}


@st.composite
def engram_configs(draw, n_layers: int):
    n = draw(st.integers(2, 4))
    k = draw(st.sampled_from([1, 2, 4, 8]))
    d_head = draw(st.sampled_from([4, 8, 16]))
    n_eng = draw(st.integers(1, min(2, n_layers - 1)))
    layers = tuple(sorted(draw(st.permutations(range(1, n_layers)))[:n_eng]))
    return EngramConfig(
        engram_vocab_size=(2,) * (n - 1),
        max_ngram_size=n,
        n_embed_per_ngram=k * d_head,
        n_head_per_ngram=k,
        layer_ids=layers,
        pad_id=0,
        compressed_vocab_size=64,
        use_conv=draw(st.booleans()),
        proj_bias=draw(st.booleans()),
    )


@st.composite
def base_and_engram(draw):
    """A pure-MoE base config whose shared expert can absorb the Engram's activated parameters."""
    D = draw(st.sampled_from([64, 96, 128, 192]))
    n_layers = draw(st.integers(2, 6))
    n_dense = draw(st.integers(0, 1))
    top_k = draw(st.integers(1, 4))
    free = draw(st.integers(4, 64))
    d_expert = draw(st.sampled_from([16, 32, 64, 128]))
    hc_mult = draw(st.sampled_from([1, 1, 2]))
    engram = draw(engram_configs(n_layers))
    per_layer = engram_dense_params(engram, D, hc_mult) + engram.num_heads * engram.d_head
    need = -(-len(engram.layer_ids) * per_layer // (3 * D * (n_layers - n_dense)))
    d_shared = need + 1 + draw(st.integers(0, 256))
    base = ModelConfig(
        vocab_size=64,
        d_model=D,
        n_layers=n_layers,
        n_heads=2,
        n_dense_layers=n_dense,
        d_dense=2 * D,
        n_routed_experts=top_k + free,
        top_k=top_k,
        d_expert=d_expert,
        d_shared=d_shared,
        hc_mult=hc_mult,
        tie_embeddings=draw(st.booleans()),
    )
    return base, engram


rhos = st.floats(min_value=0.02, max_value=1.0, allow_nan=False)


@settings(max_examples=60, **SETTINGS)
@given(base_and_engram(), rhos)
def test_totals_within_one_percent(case, rho):
    base, engram = case
    # The smallest tables (every prime just above 2) are a fixed granule of the sparse budget;
    # where they are a sizeable share of it, rho cannot be realised finely (or at all), so the
    # bounds below are stated for budgets where that granule is small.
    smallest = engram.replace(engram_vocab_size=(2,) * engram.num_orders)
    granule = (sum(engram_rows_per_layer(smallest)) - len(engram.layer_ids) * engram.num_heads) * engram.d_head
    assume(granule <= 0.02 * count_params(base).sparse)
    a = allocate(base, rho, engram)
    target = count_params(base)
    assert a.target_total == target.total and a.target_active == target.active
    assert abs(a.counts.total / target.total - 1) <= 0.01
    assert abs(a.counts.active / target.active - 1) <= 0.01
    assert a.counts == count_params(a.config)
    # Only the routed experts, the shared width and the tables move.
    assert a.config.replace(n_routed_experts=base.n_routed_experts, d_shared=base.d_shared, engram=None) == base
    free = base.n_routed_experts - base.top_k
    if rho < 1:
        assert a.config.engram is not None
        assert a.config.engram.replace(engram_vocab_size=engram.engram_vocab_size) == engram
        assert a.counts.engram_tables > 0
        # Realised rho is the requested one up to one expert and the smallest possible tables.
        assert abs(a.rho_realised - rho) <= 1.5 / free + 0.05


@settings(max_examples=30, **SETTINGS)
@given(base_and_engram())
def test_rho_one_is_pure_moe(case):
    base, engram = case
    a = allocate(base, 1.0, engram)
    assert a.config == base and a.config.engram is None
    assert a.rho_realised == 1.0 and a.counts.engram_tables == 0 and a.counts.engram_dense == 0
    assert a.total_error == 0.0 and a.active_error == 0.0


@settings(max_examples=25, **SETTINGS)
@given(base_and_engram(), st.lists(rhos, min_size=2, max_size=6, unique=True))
def test_expert_count_and_tables_monotone_in_rho(case, values):
    base, engram = case
    allocs = [allocate(base, r, engram) for r in sorted(values)]
    experts = [a.config.n_routed_experts for a in allocs]
    assert experts == sorted(experts)
    assert all(base.top_k <= e <= base.n_routed_experts for e in experts)
    tables = [a.counts.engram_tables for a in allocs]
    # Fewer experts never means smaller tables.
    for (e0, t0), (e1, t1) in zip(zip(experts, tables), zip(experts[1:], tables[1:])):
        if e1 > e0:
            assert t1 <= t0


def _built_counts(cfg: ModelConfig):
    with torch.device("meta"):
        model = TransformerLM(cfg)
    return count_model_params(model), model


@settings(max_examples=25, **SETTINGS)
@given(base_and_engram(), rhos)
def test_analytic_counts_equal_built_model(case, rho):
    base, engram = case
    cfg = allocate(base, rho, engram).config
    built, model = _built_counts(cfg)
    assert built == count_params(cfg)
    if cfg.engram is not None:
        rows = engram_rows_per_layer(cfg.engram)
        assert tuple(model.hasher.rows_per_layer) == rows
        assert [e.table.weight.shape[0] for e in model.engram_modules()] == list(rows)


def test_counts_by_hand():
    # D = 8, one MoE block (E = 4, top-2, d_e = 2, shared 4), one Engram layer without conv/bias.
    e = EngramConfig(
        engram_vocab_size=(5,),
        max_ngram_size=2,
        n_embed_per_ngram=2,
        n_head_per_ngram=1,
        layer_ids=(0,),
        pad_id=0,
        compressed_vocab_size=10,
        use_conv=False,
        proj_bias=False,
    )
    cfg = ModelConfig(
        vocab_size=10,
        d_model=8,
        n_layers=1,
        n_heads=2,
        n_routed_experts=4,
        top_k=2,
        d_expert=2,
        d_shared=4,
        engram=e,
    )
    c = count_params(cfg)
    dense = 2 * 8 + 4 * 64 + 8 + 8 * 4 + 3 * 8 * 4  # norms, attention, final norm, router, shared
    routed = 4 * 3 * 8 * 2
    eng_dense = 2 * (2 * 8) + 2 * 8  # value + key projection (d_mem 2 -> 8), query/key gains
    rows = 5  # the first prime above 4
    assert engram_rows_per_layer(e) == (rows,)
    assert c.total == dense + routed + eng_dense + rows * 2
    assert c.active == dense + routed // 2 + eng_dense + 1 * 2
    assert c.excluded == 2 * 10 * 8
    assert c.sparse == routed // 2 + (rows - 1) * 2


def test_quick_base_allocations_are_close_to_requested_rho():
    engram = EngramConfig(
        engram_vocab_size=(2, 2),
        n_embed_per_ngram=64,
        n_head_per_ngram=4,
        layer_ids=(1, 2),
        pad_id=0,
        compressed_vocab_size=3000,
        proj_bias=False,
    )
    base = ModelConfig(
        vocab_size=4096,
        d_model=128,
        n_layers=4,
        n_heads=4,
        n_routed_experts=32,
        top_k=2,
        d_expert=64,
        d_shared=256,
    )
    for rho in (0.9, 0.8, 0.6, 0.4):
        a = allocate(base, rho, engram)
        assert abs(a.rho_realised - rho) < 0.02
        assert abs(a.total_error) < 1e-3 and abs(a.active_error) < 1e-3


def test_bad_arguments():
    base = ModelConfig(
        vocab_size=64, d_model=64, n_layers=2, n_heads=2, n_routed_experts=8, top_k=2, d_expert=16, d_shared=8
    )
    engram = EngramConfig(
        engram_vocab_size=(2, 2),
        n_embed_per_ngram=64,
        n_head_per_ngram=4,
        layer_ids=(1,),
        pad_id=0,
        compressed_vocab_size=64,
    )
    with pytest.raises(ValueError, match=r"rho must be in \(0, 1\], got 0.0"):
        allocate(base, 0.0, engram)
    with pytest.raises(ValueError, match=r"rho must be in \(0, 1\], got 1.5"):
        allocate(base, 1.5, engram)
    with pytest.raises(ValueError, match="rho < 1 needs an Engram config"):
        allocate(base, 0.5)
    with pytest.raises(ValueError, match="cannot keep P_act"):
        allocate(base, 0.5, engram)  # a shared expert of width 8 cannot absorb Engram's projections
    with pytest.raises(ValueError, match=r"engram\.layer_ids must be < n_layers=2"):
        allocate(base, 0.5, engram.replace(layer_ids=(1, 2)))
    with pytest.raises(ValueError, match="base must have MoE blocks"):
        allocate(base.replace(n_dense_layers=2), 0.5, engram)
