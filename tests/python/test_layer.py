"""The whole Engram layer: module vs the reference oracle and the official-demo formulation,
gradcheck in float64, state_dict round trips, compile, shapes and errors."""

import io

import pytest
import torch

import torch_engram as te
from conftest import DEVICES
from torch_engram.reference.layer import OfficialEngram, engram_module_reference

SMALL = te.EngramConfig(
    engram_vocab_size=(211, 307),
    max_ngram_size=3,
    n_embed_per_ngram=8,
    n_head_per_ngram=2,
    layer_ids=(1, 3),
    pad_id=0,
    compressed_vocab_size=50,
)


def make(config=SMALL, M=1, D=16, dtype=torch.float32, device="cpu", layer_id=1, **kw):
    torch.manual_seed(0)
    kw.setdefault("table_grad", "dense")  # these tests look at the table's gradient
    hasher = te.NgramHasher(config).to(device)
    mod = te.Engram(config, layer_id, D, hc_mult=M, hasher=hasher, device=device, dtype=dtype, **kw)
    with torch.no_grad():  # non-trivial conv and gains so every branch of the maths is exercised
        if config.use_conv:
            mod.conv_weight.normal_(0, 0.3)
            mod.conv_norm_weight.uniform_(0.5, 1.5)
        for name in ("norm_q_weight", "norm_k_weight", "gate_weight"):
            if hasattr(mod, name):
                getattr(mod, name).uniform_(0.5, 1.5)
    return mod


def inputs(mod, B=2, T=9, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, mod.config.compressed_vocab_size, (B, T), generator=g).to(device)
    shape = (B, T, mod.hidden_size) if mod.hc_mult == 1 else (B, T, mod.hc_mult, mod.hidden_size)
    hidden = torch.randn(shape, generator=g).to(device=device, dtype=dtype)
    return ids, hidden


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("M", [1, 4])
@pytest.mark.parametrize("variant", ["demo", "v4.1", "folded"])
@pytest.mark.parametrize("T", [1, 2, 9])
def test_matches_reference_float32(device, M, variant, T):
    cfg = SMALL if variant != "v4.1" else SMALL.replace(use_conv=False, proj_bias=False, gate_eps=1e-20)
    mod = make(cfg, M=M, device=device, fold_gains=variant == "folded")
    ids, hidden = inputs(mod, T=T, device=device)
    rows = mod.hasher(ids)[mod.layer_index]
    out = mod(hidden, input_ids=ids)
    assert out.shape == hidden.shape
    assert torch.equal(out, mod(hidden, rows=rows))
    with torch.no_grad():
        mod64 = make(cfg, M=M, device=device, dtype=torch.float64, fold_gains=variant == "folded")
        mod64.load_state_dict({k: v.double() if v.is_floating_point() else v for k, v in mod.state_dict().items()})
        ref = engram_module_reference(mod64, hidden.double(), rows)
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-5)


def test_matches_official_demo_formulation():
    mod = make(SMALL, M=4, D=32)
    ids, hidden = inputs(mod, T=12)
    rows = mod.hasher(ids)[mod.layer_index]
    official = OfficialEngram(
        list(mod.hasher.primes[mod.layer_index].tolist()), SMALL.d_head, 32, 4, dilation=SMALL.dilation
    ).load_from(mod)
    table_ids = rows.long() - mod.hasher.offsets[mod.layer_index]
    torch.testing.assert_close(mod(hidden, rows=rows), official(hidden, table_ids), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_bfloat16_within_tolerance(device):
    mod = make(SMALL, M=4, D=32, dtype=torch.bfloat16, device=device)
    ids, hidden = inputs(mod, T=16, dtype=torch.bfloat16, device=device)
    rows = mod.hasher(ids)[mod.layer_index]
    out = mod(hidden, rows=rows)
    assert out.dtype == torch.bfloat16
    mod32 = make(SMALL, M=4, D=32, device=device)
    mod32.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in mod.state_dict().items()})
    ref = mod32(hidden.float(), rows=rows)
    torch.testing.assert_close(out.float(), ref, rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("M", [1, 2])
@pytest.mark.parametrize("use_conv", [True, False])
def test_gradcheck_whole_layer(device, M, use_conv):
    cfg = SMALL.replace(use_conv=use_conv)
    mod = make(cfg, M=M, D=6, dtype=torch.float64, device=device)
    ids, hidden = inputs(mod, B=1, T=7, dtype=torch.float64, device=device)
    rows = mod.hasher(ids)[mod.layer_index]
    names = [n for n, _ in mod.named_parameters() if not n.startswith("hasher")]
    params = [p.detach().clone().requires_grad_() for n, p in mod.named_parameters() if not n.startswith("hasher")]
    # Only the touched table rows matter; a small table keeps gradcheck's Jacobian cheap.
    table_idx = names.index("table.weight")

    def f(h, *ps):
        state = dict(zip(names, ps))
        return torch.func.functional_call(mod, state, (h,), {"rows": rows})

    hidden.requires_grad_()
    assert torch.autograd.gradcheck(f, (hidden, *params), eps=1e-6, atol=1e-6, rtol=1e-4, fast_mode=True)
    assert params[table_idx].shape[0] == mod.num_rows


def test_table_gradient_only_touches_looked_up_rows():
    mod = make(SMALL, M=1, D=8)
    ids, hidden = inputs(mod, T=5)
    rows = mod.hasher(ids)[mod.layer_index]
    mod(hidden, rows=rows).sum().backward()
    touched = torch.zeros(mod.num_rows, dtype=torch.bool)
    touched[rows.long().flatten()] = True
    assert mod.table.weight.grad[~touched].abs().max() == 0
    assert mod.table.weight.grad[touched].abs().sum(dim=1).gt(0).all()


def test_sparse_table_grad_equals_dense():
    dense = make(SMALL, M=2, D=8)
    sparse = make(SMALL, M=2, D=8, table_grad="sparse")
    sparse.load_state_dict(dense.state_dict())
    ids, hidden = inputs(dense, T=11)
    dense(hidden, input_ids=ids).square().sum().backward()
    sparse(hidden, input_ids=ids).square().sum().backward()
    assert sparse.table.weight.grad.is_sparse
    torch.testing.assert_close(sparse.table.weight.grad.to_dense(), dense.table.weight.grad, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(sparse.kv_proj.weight.grad, dense.kv_proj.weight.grad)


def test_state_dict_round_trip_bitwise():
    lut = torch.randint(0, 40, (60,))
    lut[:40] = torch.randperm(40)
    cfg = SMALL.replace(compressed_vocab_size=None)
    torch.manual_seed(3)
    src = te.Engram(cfg, 3, 16, hc_mult=2, hasher=te.NgramHasher(cfg, lut=lut))
    buf = io.BytesIO()
    torch.save(src.state_dict(), buf)
    buf.seek(0)
    torch.manual_seed(4)
    dst = te.Engram(cfg, 3, 16, hc_mult=2, hasher=te.NgramHasher(cfg, lut=torch.zeros(60, dtype=torch.long)))
    dst.load_state_dict(torch.load(buf))
    ids = torch.randint(0, 60, (2, 10))
    hidden = torch.randn(2, 10, 2, 16)
    assert torch.equal(src(hidden, input_ids=ids), dst(hidden, input_ids=ids))
    assert any(k.startswith("hasher.") for k in src.state_dict())


def test_meta_device_and_repr():
    mod = te.Engram(te.EngramConfig.official_demo(compressed_vocab_size=129280), 1, 1024, hc_mult=4, device="meta")
    assert mod.table.weight.shape == (10_344_164, 64) and mod.table.weight.is_meta
    assert "rows=10344164" in repr(mod)
    assert mod.kv_proj.weight.shape == (5 * 1024, 1024)


def test_conv_starts_as_identity():
    cfg = SMALL
    torch.manual_seed(0)
    a = te.Engram(cfg, 1, 8, hasher=te.NgramHasher(cfg))
    b = te.Engram(cfg.replace(use_conv=False), 1, 8, hasher=te.NgramHasher(cfg.replace(use_conv=False)))
    b.load_state_dict({k: v for k, v in a.state_dict().items() if "conv" not in k})
    ids, hidden = inputs(a)
    assert torch.equal(a(hidden, input_ids=ids), b(hidden, input_ids=ids))


def test_torch_compile_fullgraph_matches_eager():
    mod = make(SMALL, M=2, D=8)
    ids, hidden = inputs(mod, T=7)
    rows = mod.hasher(ids)[mod.layer_index]
    hidden.requires_grad_()

    def step(h, r):
        out = mod(h, rows=r)
        return out.square().sum()

    eager = step(hidden, rows)
    g_eager = torch.autograd.grad(eager, [hidden, mod.table.weight, mod.kv_proj.weight])
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    out = compiled(hidden, rows)
    g = torch.autograd.grad(out, [hidden, mod.table.weight, mod.kv_proj.weight])
    torch.testing.assert_close(out, eager)
    for a, b in zip(g, g_eager):
        torch.testing.assert_close(a, b)


def test_bad_inputs():
    mod = make(SMALL, M=2, D=8)
    ids, hidden = inputs(mod, T=5)
    with pytest.raises(ValueError, match=r"hidden must be \[B, T, 2, 8\]"):
        mod(torch.randn(2, 5, 3, 8), input_ids=ids)
    with pytest.raises(ValueError, match="hidden must be \\[B, T, M=2"):
        mod(torch.randn(2, 5, 8), input_ids=ids)
    with pytest.raises(ValueError, match="pass input_ids or rows"):
        mod(hidden)
    with pytest.raises(ValueError, match="rows must be \\[B, T, H=4\\]"):
        mod(hidden, rows=torch.zeros(2, 5, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="must share \\[B, T\\]"):
        mod(hidden, rows=torch.zeros(2, 4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="layer_id must be one of"):
        te.Engram(SMALL, 2, 8)
    with pytest.raises(ValueError, match="table_grad must be one of"):
        te.Engram(SMALL, 1, 8, table_grad="lazy")
    with pytest.raises(ValueError, match="input_ids need a hasher"):
        te.Engram(SMALL, 1, 8)(torch.randn(2, 5, 8), input_ids=ids)


def test_gate_reads_the_kv_projection_in_place():
    # Forward and backward of the layer make no copies of key/value views: the gate reads the
    # fused projection output as it is and returns its gradient in one [..., (M + 1) * D] tensor.
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.seen.append(str(func.overloadpacket))
            return func(*args, **(kwargs or {}))

    mod = make(SMALL.replace(use_conv=False), M=2, D=8)
    ids, hidden = inputs(mod, T=6)
    rows = mod.hasher(ids)[mod.layer_index]
    hidden.requires_grad_()
    with Ops() as mode:
        mod(hidden, rows=rows).sum().backward()
    copies = [op for op in mode.seen if any(c in op for c in ("copy", "clone", "cat", "slice_backward", "contiguous"))]
    assert copies == [], copies
    assert any("engram_gate" in op for op in mode.seen)
