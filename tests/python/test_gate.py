"""engram_gate against the reference (values, gradients), the official demo formulation, gradcheck
near the signed-sqrt clamp, opcheck, torch.compile, determinism and argument errors."""

import math

import pytest
import torch

import torch_engram  # noqa: F401
from conftest import DEVICES, assert_close, gate, gate_inputs, kv_of
from torch_engram import ops
from torch_engram import reference as ref


def ref64(x, k, v, w, eps):
    return ref.engram_gate(x.double(), k.double(), v.double(), w.double(), eps)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("M", [1, 4])
@pytest.mark.parametrize("lead", [(2, 7), (5,), ()])
def test_values_match_reference(device, dtype, M, lead):
    x, k, v, w = gate_inputs(lead, M, 40, dtype, device)
    out = gate(x, k, v, w, 1e-6)
    assert out.dtype == dtype and out.shape == x.shape
    assert_close(out, ref64(x, k, v, w, 1e-6), dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_saved_statistics(device):
    x, k, v, w = gate_inputs((3, 5), 4, 24, torch.float32, device)
    _out, alpha, r_x, r_k, raw = torch.ops.engram._engram_gate_forward(x, kv_of(k, v), w, 1e-5)
    xd, kd, wd = x.double(), k.double(), w.double()
    rx = torch.rsqrt(xd.pow(2).mean(-1) + 1e-5)
    rk = torch.rsqrt(kd.pow(2).mean(-1) + 1e-5)
    dot = (xd * wd * kd).sum(-1)
    s = dot * rx * rk / math.sqrt(24)
    for name, got, want in [
        ("r_x", r_x, rx),
        ("r_k", r_k, rk),
        ("raw", raw, dot),
        ("alpha", alpha, torch.sigmoid(ref.signed_sqrt(s))),
    ]:
        assert got.dtype == torch.float32 and got.shape == (3, 5, 4), name
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("M", [1, 4])
def test_gradients_match_reference(device, dtype, M):
    x, k, v, w = gate_inputs((3, 6), M, 33, dtype, device, seed=1)
    grad = torch.randn(3, 6, M, 33, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    grad = grad.to(device, dtype)
    inputs = [t.detach().requires_grad_() for t in (x, k, v, w)]
    out = gate(*inputs, 1e-6)
    got = torch.autograd.grad(out, inputs, grad)
    ref_inputs = [t.detach().double().requires_grad_() for t in (x, k, v, w)]
    want = torch.autograd.grad(ref.engram_gate(*ref_inputs, 1e-6), ref_inputs, grad.double())
    for name, a, b, t in zip("xkvw", got, want, inputs):
        assert a.dtype == t.dtype and a.shape == t.shape, name
        assert_close(a, b, dtype if name != "w" or dtype == torch.float64 else torch.float32)


@pytest.mark.parametrize("M", [1, 4])
@pytest.mark.parametrize("lead", [(2, 3), ()])
def test_gradcheck(M, lead):
    x, k, v, w = gate_inputs(lead, M, 12, torch.float64, seed=3)
    inputs = [t.requires_grad_() for t in (x, k, v, w)]
    assert torch.autograd.gradcheck(lambda *a: gate(*a, 1e-6), inputs)


def _place_scores(x, k, w, targets):
    """Move each key row so that s = dot(x r_x, k r_k w) / sqrt(D) lands on `targets` [..., M]."""
    D = x.shape[-1]
    xw = x * w
    # Remove the component along x*w (raw = 0), then add the amount that gives the target.
    # The added amount changes r_k, hence a few fixed-point steps.
    base = k - (k * xw).sum(-1, keepdim=True) / (xw * xw).sum(-1, keepdim=True) * xw
    rx = torch.rsqrt(x.pow(2).mean(-1, keepdim=True))
    k = base
    for _ in range(50):
        rk = torch.rsqrt(k.pow(2).mean(-1, keepdim=True))
        raw = targets.unsqueeze(-1) * math.sqrt(D) / (rx * rk)
        k = base + raw / (xw * xw).sum(-1, keepdim=True) * xw
    return k


def test_gradcheck_near_signed_sqrt_clamp():
    # Branches inside the clamp (|s| < 1e-6: constant alpha, zero gradient through s), just
    # above it (steep slope 0.5/sqrt|s|), and ordinary ones.
    x, k, v, w = gate_inputs((3,), 4, 10, torch.float64, seed=4)
    targets = torch.tensor(
        [[4e-7, -4e-7, 3e-6, -3e-6], [2e-7, 0.3, -2e-6, 5e-7], [-0.7, -5e-7, 2e-6, 1.2]], dtype=torch.float64
    )
    k = _place_scores(x, k, w, targets)
    _, _, r_x, r_k, raw = torch.ops.engram._engram_gate_forward(x, kv_of(k, v), w, 0.0)
    s = raw * r_x * r_k / math.sqrt(10)
    torch.testing.assert_close(s, targets, rtol=1e-3, atol=0)
    inputs = [t.clone().requires_grad_() for t in (x, k, v, w)]
    # Steps that move s by ~1e-9: no branch crosses the clamp edge or the sign jump at 0.
    assert torch.autograd.gradcheck(lambda *a: gate(*a, 0.0), inputs, eps=1e-8, atol=1e-6, rtol=1e-4)
    out = gate(*inputs, 0.0)
    grads = torch.autograd.grad(out.sum(), inputs)
    clamped = targets.abs() < 1e-6
    assert bool((grads[0][clamped] == 0).all()) and bool((grads[1][clamped] == 0).all())
    assert bool((grads[0][~clamped].abs().sum(-1) > 0).all())
    ref_inputs = [t.detach().clone().requires_grad_() for t in (x, k, v, w)]
    want = torch.autograd.grad(ref.engram_gate(*ref_inputs, 0.0).sum(), ref_inputs)
    for a, b in zip(grads, want):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("M", [1, 4])
def test_matches_official_demo_formulation(dtype, M):
    # Separate nn.RMSNorm modules with PyTorch's default eps equal the op with folded gains
    # w = w_q * w_k and eps = finfo(dtype).eps.
    torch.manual_seed(5)
    D = 32
    demo = ref.DemoGate(D, M, dtype=dtype)
    with torch.no_grad():
        for norm in [*demo.norm1, *demo.norm2]:
            norm.weight.copy_(1 + 0.3 * torch.randn(D, dtype=dtype))
    x, k, v, _ = gate_inputs((2, 5), M, D, dtype, seed=6)
    inputs = [t.requires_grad_() for t in (x, k, v)]
    want = demo(*inputs)
    weight = demo.folded_weight().requires_grad_()
    got = gate(*inputs, weight, demo.eps_for(dtype))
    # Both sides round in float32 for float32 inputs, hence a looser bound there.
    loosen = 10.0 if dtype == torch.float32 else 1.0
    assert_close(got, want, dtype, loosen)
    g = torch.randn_like(want)
    grads_demo = torch.autograd.grad(want, inputs + [demo.norm1[0].weight, demo.norm2[0].weight], g)
    grads_op = torch.autograd.grad(got, inputs + [weight], g)
    for a, b in zip(grads_op[:3], grads_demo[:3]):
        assert_close(a, b, dtype, loosen)
    # Chain rule through w = w_q * w_k for branch 0's key gain.
    assert_close(grads_op[3][0] * demo.norm2[0].weight, grads_demo[3], dtype, loosen)
    separate = ref.engram_gate_separate(
        x,
        k,
        v,
        torch.stack([n.weight for n in demo.norm2]),
        torch.stack([n.weight for n in demo.norm1]),
        demo.eps_for(dtype),
    )
    assert_close(separate, want, dtype, loosen)


@pytest.mark.parametrize(
    "dtype, w_dtype", [(torch.float64, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16)]
)
def test_weight_in_float32_or_input_dtype(dtype, w_dtype):
    x, k, v, w = gate_inputs((4,), 2, 16, dtype, w_dtype=w_dtype)
    w.requires_grad_()
    out = gate(x, k, v, w, 1e-6)
    assert_close(out, ref64(x, k, v, w, 1e-6), dtype)
    (gw,) = torch.autograd.grad(out.sum(), [w])
    assert gw.dtype == w_dtype


def test_weight_gradient_is_deterministic():
    x, k, v, w = gate_inputs((300,), 4, 64, torch.float32, seed=7)
    w.requires_grad_()
    threads = torch.get_num_threads()
    grads = []
    try:
        for n in (1, max(2, threads)):
            torch.set_num_threads(n)
            for _ in range(2):
                (gw,) = torch.autograd.grad(gate(x, k, v, w, 1e-6).sum(), [w])
                grads.append(gw)
    finally:
        torch.set_num_threads(threads)
    for g in grads[1:]:
        assert torch.equal(g, grads[0])


def test_empty_batch_and_inference_mode():
    x, k, v, w = gate_inputs((0, 3), 4, 8, torch.float32)
    inputs = [t.requires_grad_() for t in (x, k, v, w)]
    out = gate(*inputs, 1e-6)
    assert out.shape == (0, 3, 4, 8)
    grads = torch.autograd.grad(out.sum(), inputs)
    assert grads[3].shape == (4, 8) and bool((grads[3] == 0).all())
    x, k, v, w = gate_inputs((2,), 4, 8, torch.float32)
    with torch.inference_mode():
        out = gate(x, k, v, w, 1e-6)
    assert_close(out, ref64(x, k, v, w, 1e-6), torch.float32)


def test_opcheck_public_and_internal():
    x, k, v, w = gate_inputs((2, 3), 4, 16, torch.float32, seed=8)
    grad_inputs = [t.clone().requires_grad_() for t in (x, k, v, w)]
    kv = kv_of(k, v).requires_grad_()
    torch.library.opcheck(torch.ops.engram.engram_gate.default, (grad_inputs[0], kv, grad_inputs[3], 1e-6))
    torch.library.opcheck(torch.ops.engram.engram_gate.default, (x, kv_of(k, v), w, 1e-6))
    torch.library.opcheck(torch.ops.engram._engram_gate_forward.default, (x, kv_of(k, v), w, 1e-6))
    out, alpha, r_x, r_k, raw = torch.ops.engram._engram_gate_forward(x, kv_of(k, v), w, 1e-6)
    torch.library.opcheck(
        torch.ops.engram._engram_gate_backward.default, (torch.randn_like(out), x, kv_of(k, v), w, alpha, r_x, r_k, raw)
    )


def test_torch_compile_matches_eager():
    x, k, v, w = gate_inputs((2, 5), 4, 16, torch.float32, seed=9)

    def f(x, k, v, w):
        return (gate(x, k, v, w, 1e-6) * 2).sum(-1)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    eager_in = [t.clone().requires_grad_() for t in (x, k, v, w)]
    comp_in = [t.clone().requires_grad_() for t in (x, k, v, w)]
    want, got = f(*eager_in), compiled(*comp_in)
    torch.testing.assert_close(got, want)
    g = torch.randn_like(want)
    for a, b in zip(torch.autograd.grad(got, comp_in, g), torch.autograd.grad(want, eager_in, g)):
        torch.testing.assert_close(a, b)


def test_torch_compile_inductor_fullgraph():
    x, k, v, w = gate_inputs((3,), 2, 8, torch.float32, seed=10)

    def f(x, k, v, w):
        return gate(x.sin(), k, v, w, 1e-6) + 1

    compiled = torch.compile(f, fullgraph=True)
    eager_in = [t.clone().requires_grad_() for t in (x, k, v, w)]
    comp_in = [t.clone().requires_grad_() for t in (x, k, v, w)]
    want, got = f(*eager_in), compiled(*comp_in)
    torch.testing.assert_close(got, want)
    for a, b in zip(torch.autograd.grad(got.sum(), comp_in), torch.autograd.grad(want.sum(), eager_in)):
        torch.testing.assert_close(a, b)


def test_non_contiguous_and_broadcast_inputs():
    # The demo feeds one hidden stream expanded over the M branches (stride 0).
    base, k, v, w = gate_inputs((2, 5), 1, 16, torch.float64, seed=11)
    k = torch.randn(16, 4, 5, 2, dtype=torch.float64).permute(3, 2, 1, 0)  # [2, 5, 4, 16], non-contiguous
    w = w.expand(4, 16).clone()
    hidden = base.expand(2, 5, 4, 16).requires_grad_()
    inputs = [hidden, k.requires_grad_(), v.requires_grad_(), w.requires_grad_()]
    out = gate(*inputs, 1e-6)
    want = ref.engram_gate(*inputs, 1e-6)
    assert_close(out, want, torch.float64)
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, inputs, g), torch.autograd.grad(want, inputs, g)):
        assert_close(a, b, torch.float64)


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda x, kv, w: (x[0, 0, 0], kv, w), "hidden must be \\[..., M, D\\]"),
        (lambda x, kv, w: (x, kv[..., :-1], w), "kv must be \\[..., \\(M \\+ 1\\) \\* D\\]"),
        (lambda x, kv, w: (x, kv.unsqueeze(-2), w), "kv must be \\[..., \\(M \\+ 1\\) \\* D\\]"),
        (lambda x, kv, w: (x, kv, w[:1]), "weight must be \\[M=4, D=8\\]"),
        (lambda x, kv, w: (x, kv.double(), w), "kv must have hidden's dtype"),
        (
            lambda x, kv, w: (x, kv, w.bfloat16()),
            "weight \\(folded RMSNorm gains\\) must be float32 or hidden's dtype Float, got BFloat16",
        ),
        (lambda x, kv, w: (x, kv, w.double()), "weight .* must be float32 or hidden's dtype Float, got Double"),
        (lambda x, kv, w: (x.int(), kv.int(), w), "hidden must be float32, bfloat16"),
        (lambda x, kv, w: (x[..., :0], kv[..., :0], w[:, :0]), "D >= 1"),
    ],
)
def test_bad_inputs_name_the_argument(change, match):
    x, k, v, w = gate_inputs((2, 3), 4, 8, torch.float32)
    args = change(x, kv_of(k, v), w)
    with pytest.raises(RuntimeError, match=match):
        ops.engram_gate(*args, 1e-6)


@pytest.mark.parametrize("eps", [-1.0, float("nan"), float("inf")])
def test_bad_eps(eps):
    with pytest.raises(RuntimeError, match="eps must be finite and >= 0"):
        gate(*gate_inputs((2,), 1, 8, torch.float32), eps)


def test_backward_rejects_mismatched_statistics():
    x, k, v, w = gate_inputs((2, 3), 4, 8, torch.float32)
    out, alpha, r_x, r_k, raw = torch.ops.engram._engram_gate_forward(x, kv_of(k, v), w, 1e-6)
    with pytest.raises(RuntimeError, match=r"r_k must be \[\.\.\., M\]"):
        torch.ops.engram._engram_gate_backward(out, x, kv_of(k, v), w, alpha, r_x, r_k[:1], raw)
    with pytest.raises(RuntimeError, match="alpha must be Float"):
        torch.ops.engram._engram_gate_backward(out, x, kv_of(k, v), w, alpha.double(), r_x, r_k, raw)
    with pytest.raises(RuntimeError, match="grad_out must have the shape of hidden"):
        torch.ops.engram._engram_gate_backward(out[:1], x, kv_of(k, v), w, alpha, r_x, r_k, raw)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", ["nan", "inf", "-inf", "zero_row_eps0", "nan_key"])
def test_nan_and_inf_propagate_as_in_the_official_formulation(device, case):
    # A bad token must not come out finite: the official code (and the reference) give NaN for it,
    # and the gradients then are NaN too; the other tokens are untouched.
    x, k, v, w = gate_inputs((3,), 2, 8, torch.float64, device, seed=11)
    eps = 0.0 if case == "zero_row_eps0" else 1e-6
    if case == "nan":
        x[1, 0, 3] = float("nan")
    elif case == "inf":
        x[1, 0, 3] = float("inf")
    elif case == "-inf":
        x[1, 0, 3] = -float("inf")
    elif case == "zero_row_eps0":
        x[1, 0] = 0.0
    else:
        k[1, 0, 5] = float("nan")
    inputs = [t.clone().requires_grad_() for t in (x, k, v, w)]
    out = gate(*inputs, eps)
    want = ref.engram_gate(x, k, v, w, eps)
    assert bool(torch.isnan(want[1, 0]).all()) and bool(torch.isfinite(want[0]).all())
    torch.testing.assert_close(out, want, equal_nan=True)
    got = torch.autograd.grad(out.sum(), inputs)
    ref_inputs = [t.clone().requires_grad_() for t in (x, k, v, w)]
    expected = torch.autograd.grad(ref.engram_gate(*ref_inputs, eps).sum(), ref_inputs)
    for a, b in zip(got[:3], expected[:3]):
        assert torch.equal(torch.isnan(a[1]), torch.isnan(b[1]))
        torch.testing.assert_close(a[[0, 2]], b[[0, 2]])
