"""Property-based fuzzing of every op and of the layer against torch_engram.reference: shapes
(empty batch, T = 1, T < N, odd D and d_head), dtypes, strides (non-contiguous inputs, storage
offsets, expanded tensors) and row/id ranges.

Bounded for CI (profile "ci", the default); `HYPOTHESIS_PROFILE=long pytest tests/python/test_fuzz.py`
runs 20x more examples by hand."""

import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import torch_engram as te
from torch_engram import ops
from torch_engram import reference as ref

settings.register_profile("ci", max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("long", max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

LAYOUTS = ("contiguous", "strided", "offset", "expanded")
TOL = {torch.float32: dict(rtol=2e-5, atol=2e-5), torch.float64: dict(rtol=1e-10, atol=1e-10),
       torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}  # fmt: skip


def lay_out(t: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values in another memory layout: every other element of a wider buffer, at a
    storage offset, or broadcast from a smaller tensor (a view with stride 0 on dim 0)."""
    if layout == "strided":
        wide = torch.empty(*t.shape, 2, dtype=t.dtype, device=t.device)
        out = wide.select(-1, 1)
        out.copy_(t)
        return out
    if layout == "offset":
        flat = torch.empty(t.numel() + 5, dtype=t.dtype, device=t.device)
        out = flat[5:].view(t.shape)
        out.copy_(t)
        return out
    if layout == "expanded" and t.dim() >= 1 and t.shape[0] >= 1:
        return t[:1].expand(t.shape)
    return t


def values_for(t: torch.Tensor, layout: str) -> torch.Tensor:
    """What lay_out(t, layout) holds, contiguous (the expanded layout repeats row 0)."""
    return lay_out(t, layout).contiguous()


@st.composite
def hash_case(draw):
    N = draw(st.integers(2, 4))
    K = draw(st.integers(1, 3))
    cfg = te.EngramConfig(
        engram_vocab_size=tuple(draw(st.integers(40, 400)) for _ in range(N - 1)), max_ngram_size=N,
        n_embed_per_ngram=K, n_head_per_ngram=K, layer_ids=(0, 2), pad_id=draw(st.integers(0, 9)),
        seed=draw(st.integers(0, 3)),
    )  # fmt: skip
    B = draw(st.integers(0, 3))
    T = draw(st.integers(1, 9))
    return (
        cfg,
        B,
        T,
        draw(st.sampled_from(LAYOUTS)),
        draw(st.booleans()),
        draw(st.sampled_from([torch.int64, torch.int32])),
    )


@given(hash_case(), st.randoms(use_true_random=False))
def test_ngram_hash(case, rnd):
    cfg, B, T, layout, with_doc, id_dtype = case
    vocab = 60
    lut = torch.tensor([rnd.randrange(0, 30) for _ in range(vocab)])
    lut[:30] = torch.randperm(30, generator=torch.Generator().manual_seed(rnd.randrange(1000)))
    hasher = te.NgramHasher(cfg, lut=lut)
    ids = torch.tensor([[rnd.randrange(0, vocab) for _ in range(T)] for _ in range(B)], dtype=id_dtype).view(B, T)
    doc = torch.tensor([[rnd.random() < 0.2 for _ in range(T)] for _ in range(B)], dtype=torch.bool).view(B, T)
    doc = doc if with_doc else None
    args = (hasher.lut, hasher.num_ids, hasher.multipliers, hasher.primes, hasher.offsets, hasher.pad_id)
    got = ops.ngram_hash(lay_out(ids, layout), *args, doc_start=None if doc is None else lay_out(doc, layout))
    want = ref.ngram_hash(values_for(ids, layout), *args, doc_start=None if doc is None else values_for(doc, layout))
    assert torch.equal(got, want)


@st.composite
def gather_case(draw):
    R = draw(st.integers(1, 300))
    d = draw(st.sampled_from([1, 3, 8, 17]))
    H = draw(st.integers(1, 5))
    lead = tuple(draw(st.lists(st.integers(0, 4), min_size=1, max_size=2)))
    dtype = draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16]))
    return R, d, H, lead, dtype, draw(st.sampled_from(LAYOUTS)), draw(st.sampled_from([torch.int64, torch.int32]))


@given(gather_case(), st.integers(0, 2**31))
def test_multihead_gather_forward_backward(case, seed):
    R, d, H, lead, dtype, layout, idx = case
    g = torch.Generator().manual_seed(seed)
    table = torch.randn(R, d, generator=g).to(dtype)
    rows = torch.randint(0, R, (*lead, H), generator=g).to(idx)
    got = ops.multihead_gather(lay_out(table, layout), lay_out(rows, layout))
    assert torch.equal(got, ref.multihead_gather(values_for(table, layout), values_for(rows, layout)))
    grad = torch.randn(*lead, H * d, generator=g).to(dtype)
    dense = ops.multihead_gather_backward(lay_out(grad, layout), lay_out(rows, layout), R)
    want = ref.multihead_gather_backward(values_for(grad, layout).double(), values_for(rows, layout), R)
    torch.testing.assert_close(dense.double(), want, **TOL[dtype])
    unique, sums = ops.multihead_gather_backward_sparse(lay_out(grad, layout), lay_out(rows, layout))
    assert torch.equal(unique, torch.unique(values_for(rows, layout).long()))
    torch.testing.assert_close(sums.double(), want[unique], **TOL[dtype])


@st.composite
def gate_case(draw):
    lead = tuple(draw(st.lists(st.integers(0, 3), min_size=0, max_size=2)))
    M = draw(st.integers(1, 3))
    D = draw(st.sampled_from([1, 5, 8, 33]))
    return lead, M, D, draw(st.sampled_from([torch.float32, torch.float64])), draw(st.sampled_from(LAYOUTS))


@given(gate_case(), st.integers(0, 2**31))
def test_engram_gate_forward_backward(case, seed):
    lead, M, D, dtype, layout = case
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, M, D, generator=g, dtype=torch.float64).to(dtype)
    kv = torch.randn(*lead, (M + 1) * D, generator=g, dtype=torch.float64).to(dtype)
    w = (0.5 + torch.rand(M, D, generator=g)).to(torch.float32 if dtype == torch.float32 else dtype)
    xl, kvl = lay_out(x, layout), lay_out(kv, layout)
    xl.requires_grad_()
    kvl.requires_grad_()
    out = ops.engram_gate(xl, kvl, w, 1e-6)
    xv, kvv = values_for(x, layout).double().requires_grad_(), values_for(kv, layout).double().requires_grad_()
    k = kvv[..., : M * D].unflatten(-1, (M, D))
    want = ref.engram_gate(xv, k, kvv[..., M * D :], w.double(), 1e-6)
    torch.testing.assert_close(out.double(), want, **TOL[dtype])
    grad = torch.randn(out.shape, generator=g, dtype=torch.float64)
    got = torch.autograd.grad(out, [xl, kvl], grad.to(dtype), allow_unused=True)
    exp = torch.autograd.grad(want, [xv, kvv], grad)
    for a, b in zip(got, exp):
        torch.testing.assert_close(a.double(), b, rtol=1e-4 if dtype == torch.float32 else 1e-9, atol=1e-4)


@st.composite
def conv_case(draw):
    B = draw(st.integers(0, 2))
    T = draw(st.integers(1, 12))
    M = draw(st.integers(1, 2))
    D = draw(st.sampled_from([1, 3, 8]))
    K = draw(st.integers(1, 4))
    return B, T, M, D, K, draw(st.integers(1, 3)), draw(st.booleans()), draw(st.sampled_from(LAYOUTS))


@given(conv_case(), st.integers(0, 2**31))
def test_short_conv_forward_backward(case, seed):
    B, T, M, D, K, dilation, activation, layout = case
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(B, T, M, D, generator=g, dtype=torch.float64)
    nw = 1 + 0.2 * torch.randn(M, D, generator=g, dtype=torch.float64)
    cw = 0.5 * torch.randn(M * D, K, generator=g, dtype=torch.float64)
    ul = lay_out(u, layout).requires_grad_()
    out = ops.short_conv(ul, nw, cw, dilation, 1e-5, activation)
    uv = values_for(u, layout).requires_grad_()
    want = ref.short_conv(uv, nw, cw, dilation, 1e-5, activation)
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)
    grad = torch.randn(out.shape, generator=g, dtype=torch.float64)
    (a,) = torch.autograd.grad(out, [ul], grad)
    (b,) = torch.autograd.grad(want, [uv], grad)
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


@given(
    st.sampled_from(te.table.OPTIMIZERS), st.integers(1, 200), st.sampled_from([1, 3, 16]),
    st.sampled_from([torch.float32, torch.float64]), st.sampled_from(LAYOUTS), st.integers(0, 2**31),
)  # fmt: skip
def test_fused_table_update(optimizer, R, d, dtype, layout, seed):
    g = torch.Generator().manual_seed(seed)
    t = te.EngramTable(R, d, optimizer=optimizer, dtype=dtype, lr=0.05, weight_decay=0.01)
    state = [t.weight.detach(), t.momentum1, t.momentum2, t.row_step, t.step_count]
    want = [s.clone() for s in state]
    H = int(torch.randint(1, 4, (), generator=g))
    rows = torch.randint(0, R, (3, 5, H), generator=g)
    grad = torch.randn(3, 5, H * d, generator=g, dtype=dtype)
    with torch.no_grad():
        torch.ops.engram._multihead_gather_fused_update(
            lay_out(grad, layout), lay_out(rows, layout), *state, t.hparams, optimizer, -1
        )
    ref.multihead_gather_fused_update(values_for(grad, layout), values_for(rows, layout), *want, t.hparams, optimizer)
    for a, b in zip(state, want):
        torch.testing.assert_close(a, b, **TOL[dtype])


@pytest.mark.parametrize("grad", ["fused", "dense"])
@given(st.integers(1, 9), st.integers(0, 2), st.sampled_from([1, 2]), st.booleans(), st.integers(0, 2**31))
def test_layer_matches_reference(grad, T, B, M, use_conv, seed):
    cfg = te.EngramConfig(
        engram_vocab_size=(97, 101), max_ngram_size=3, n_embed_per_ngram=6, n_head_per_ngram=2, layer_ids=(1,),
        pad_id=0, compressed_vocab_size=40, use_conv=use_conv,
    )  # fmt: skip
    torch.manual_seed(seed % 1000)
    mod = te.Engram(cfg, 1, 7, hc_mult=M, hasher=te.NgramHasher(cfg), table_grad=grad, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 40, (B, T), generator=g)
    hidden = torch.randn(B, T, M, 7, generator=g, dtype=torch.float64)
    rows = mod.hasher(ids)[0]
    want = ref.engram_module_reference(mod, hidden, rows)
    torch.testing.assert_close(mod(hidden, rows=rows), want, rtol=1e-10, atol=1e-10)
