"""short_conv against the reference (values, gradients) over kernel sizes, dilations and short
sequences, the official demo ShortConv, gradcheck, opcheck, torch.compile, determinism and
argument errors."""

import pytest
import torch

import torch_engram  # noqa: F401
from conftest import DEVICES, assert_close, conv_inputs
from torch_engram import ops
from torch_engram import reference as ref


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("K", [1, 2, 3, 4])
@pytest.mark.parametrize("dilation", [1, 2, 3])
@pytest.mark.parametrize("T", [1, 4, 13])  # 4: shorter than the receptive field for K >= 3
def test_values_match_reference_float64(device, K, dilation, T):
    u, nw, cw = conv_inputs(2, T, 3, 8, K, torch.float64, device)
    for activation in (True, False):
        out = ops.short_conv(u, nw, cw, dilation, 1e-5, activation)
        assert_close(out, ref.short_conv(u, nw, cw, dilation, 1e-5, activation), torch.float64)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("M", [1, 4])
def test_values_match_reference(device, dtype, M):
    u, nw, cw = conv_inputs(2, 11, M, 24, 4, dtype, device, seed=1)
    out = ops.short_conv(u, nw, cw, 3, 1e-5)
    assert out.dtype == dtype and out.shape == u.shape
    assert_close(out, ref.short_conv(u.double(), nw.double(), cw.double(), 3, 1e-5), dtype)
    _, rstd = torch.ops.engram._short_conv_forward(u, nw, cw, 3, 1e-5)
    want = torch.rsqrt(u.double().pow(2).mean(-1) + 1e-5)
    assert rstd.dtype == torch.float32 and rstd.shape == u.shape[:3]
    torch.testing.assert_close(rstd.double(), want, atol=1e-5, rtol=1e-5)


def test_causality():
    # Changing position t must leave every output before t unchanged.
    u, nw, cw = conv_inputs(1, 12, 2, 8, 4, torch.float64, seed=2)
    base = ops.short_conv(u, nw, cw, 3, 1e-5)
    u2 = u.clone()
    u2[:, 7] += 1.0
    out = ops.short_conv(u2, nw, cw, 3, 1e-5)
    assert torch.equal(out[:, :7], base[:, :7])
    assert not torch.equal(out[:, 7], base[:, 7])
    # Taps of kernel 4, dilation 3: output 10 reads positions 10, 7, 4, 1; output 9 reads 9, 6, 3, 0.
    assert not torch.equal(out[:, 10], base[:, 10])
    assert torch.equal(out[:, 9], base[:, 9]) and torch.equal(out[:, 8], base[:, 8])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("M", [1, 4])
@pytest.mark.parametrize("activation", [True, False])
def test_gradients_match_reference(device, dtype, M, activation):
    u, nw, cw = conv_inputs(2, 10, M, 16, 4, dtype, device, seed=3)
    grad = torch.randn(2, 10, M, 16, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    grad = grad.to(device, dtype)
    inputs = [t.clone().requires_grad_() for t in (u, nw, cw)]
    got = torch.autograd.grad(ops.short_conv(*inputs, 2, 1e-5, activation), inputs, grad)
    ref_inputs = [t.detach().double().requires_grad_() for t in (u, nw, cw)]
    want = torch.autograd.grad(ref.short_conv(*ref_inputs, 2, 1e-5, activation), ref_inputs, grad.double())
    for name, a, b, t in zip(["u", "norm_weight", "conv_weight"], got, want, inputs):
        assert a.dtype == t.dtype and a.shape == t.shape, name
        assert_close(a, b, dtype if name == "u" or dtype == torch.float64 else torch.float32)


@pytest.mark.parametrize(
    "B, T, M, K, dilation, activation",
    [
        (2, 7, 2, 4, 2, True),
        (1, 1, 1, 4, 3, True),
        (2, 3, 4, 3, 3, True),
        (1, 5, 1, 1, 1, True),
        (2, 6, 2, 2, 1, False),
    ],
)
def test_gradcheck(B, T, M, K, dilation, activation):
    u, nw, cw = conv_inputs(B, T, M, 5, K, torch.float64, seed=5)
    inputs = [t.requires_grad_() for t in (u, nw, cw)]
    assert torch.autograd.gradcheck(lambda *a: ops.short_conv(*a, dilation, 1e-5, activation), inputs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("M", [1, 4])
def test_matches_official_demo_shortconv(dtype, M):
    torch.manual_seed(6)
    D = 16
    demo = ref.DemoShortConv(D, kernel_size=4, dilation=3, hc_mult=M, dtype=dtype)
    with torch.no_grad():  # the demo zero-initialises nothing here; give every parameter a value
        demo.conv.weight.copy_(0.4 * torch.randn_like(demo.conv.weight))
        for norm in demo.norms:
            norm.weight.copy_(1 + 0.3 * torch.randn(D, dtype=dtype))
    u = torch.randn(2, 14, M, D, dtype=dtype, requires_grad=True)
    want = u + demo(u)
    norm_weight, conv_weight = demo.op_weights()
    got = ops.short_conv(u, norm_weight, conv_weight, 3, 1e-5)
    loosen = 10.0 if dtype == torch.float32 else 1.0  # both sides round in float32
    assert_close(got, want, dtype, loosen)
    g = torch.randn_like(want)
    params = [demo.conv.weight] + [n.weight for n in demo.norms]
    grads_demo = torch.autograd.grad(want, [u] + params, g)
    grads_op = torch.autograd.grad(got, [u, norm_weight, conv_weight], g)
    assert_close(grads_op[0], grads_demo[0], dtype, loosen)
    assert_close(grads_op[2], grads_demo[1].squeeze(1), dtype, loosen)
    assert_close(grads_op[1], torch.stack(grads_demo[2:]), dtype, loosen)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_weights_in_input_dtype(dtype):
    # A model cast with .to(dtype) holds its conv weights in that dtype.
    u, nw, cw = conv_inputs(2, 9, 4, 16, 4, dtype, seed=12)
    nw, cw = nw.to(dtype).requires_grad_(), cw.to(dtype).requires_grad_()
    out = ops.short_conv(u, nw, cw, 3, 1e-5)
    assert_close(out, ref.short_conv(u.double(), nw.double(), cw.double(), 3, 1e-5), dtype)
    grads = torch.autograd.grad(out.sum(), [nw, cw])
    assert grads[0].dtype == dtype and grads[1].dtype == dtype


def test_zero_conv_weight_is_identity():
    # The official init (conv weight zero) makes the block the identity.
    u, nw, cw = conv_inputs(2, 6, 4, 8, 4, torch.float32)
    assert torch.equal(ops.short_conv(u, nw, torch.zeros_like(cw), 3, 1e-5), u)


def test_weight_gradients_are_deterministic():
    u, nw, cw = conv_inputs(3, 100, 4, 32, 4, torch.float32, seed=7)
    nw.requires_grad_()
    cw.requires_grad_()
    threads = torch.get_num_threads()
    grads = []
    try:
        for n in (1, max(2, threads)):
            torch.set_num_threads(n)
            for _ in range(2):
                grads.append(torch.autograd.grad(ops.short_conv(u, nw, cw, 3, 1e-5).sum(), [nw, cw]))
    finally:
        torch.set_num_threads(threads)
    for g in grads[1:]:
        assert torch.equal(g[0], grads[0][0]) and torch.equal(g[1], grads[0][1])


def test_empty_batch_and_inference_mode():
    u, nw, cw = conv_inputs(0, 5, 4, 8, 4, torch.float32)
    inputs = [t.requires_grad_() for t in (u, nw, cw)]
    out = ops.short_conv(*inputs, 3, 1e-5)
    assert out.shape == (0, 5, 4, 8)
    grads = torch.autograd.grad(out.sum(), inputs)
    assert bool((grads[1] == 0).all()) and bool((grads[2] == 0).all())
    u, nw, cw = conv_inputs(2, 5, 4, 8, 4, torch.float32)
    with torch.inference_mode():
        out = ops.short_conv(u, nw, cw, 3, 1e-5)
    assert_close(out, ref.short_conv(u.double(), nw.double(), cw.double(), 3, 1e-5), torch.float32)


def test_opcheck_public_and_internal():
    u, nw, cw = conv_inputs(2, 7, 4, 8, 4, torch.float32, seed=8)
    grad_inputs = [t.clone().requires_grad_() for t in (u, nw, cw)]
    torch.library.opcheck(torch.ops.engram.short_conv.default, (*grad_inputs, 3, 1e-5, True))
    torch.library.opcheck(torch.ops.engram.short_conv.default, (u, nw, cw, 2, 1e-5, False))
    torch.library.opcheck(torch.ops.engram._short_conv_forward.default, (u, nw, cw, 3, 1e-5, True))
    out, rstd = torch.ops.engram._short_conv_forward(u, nw, cw, 3, 1e-5)
    for activation in (True, False):
        torch.library.opcheck(
            torch.ops.engram._short_conv_backward.default, (torch.randn_like(out), u, nw, cw, rstd, 3, activation)
        )


def test_torch_compile_matches_eager():
    u, nw, cw = conv_inputs(2, 9, 4, 8, 4, torch.float32, seed=9)

    def f(u, nw, cw):
        return ops.short_conv(u * 2, nw, cw, 3, 1e-5).sum(-1)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    eager_in = [t.clone().requires_grad_() for t in (u, nw, cw)]
    comp_in = [t.clone().requires_grad_() for t in (u, nw, cw)]
    want, got = f(*eager_in), compiled(*comp_in)
    torch.testing.assert_close(got, want)
    g = torch.randn_like(want)
    for a, b in zip(torch.autograd.grad(got, comp_in, g), torch.autograd.grad(want, eager_in, g)):
        torch.testing.assert_close(a, b)


def test_torch_compile_inductor_fullgraph():
    u, nw, cw = conv_inputs(1, 5, 2, 8, 3, torch.float32, seed=10)

    def f(u, nw, cw):
        return ops.short_conv(u.sin(), nw, cw, 2, 1e-5) + 1

    compiled = torch.compile(f, fullgraph=True)
    eager_in = [t.clone().requires_grad_() for t in (u, nw, cw)]
    comp_in = [t.clone().requires_grad_() for t in (u, nw, cw)]
    want, got = f(*eager_in), compiled(*comp_in)
    torch.testing.assert_close(got, want)
    for a, b in zip(torch.autograd.grad(got.sum(), comp_in), torch.autograd.grad(want.sum(), eager_in)):
        torch.testing.assert_close(a, b)


def test_non_contiguous_input():
    u, nw, cw = conv_inputs(3, 7, 2, 8, 4, torch.float64, seed=11)
    u = u.transpose(0, 1).contiguous().transpose(0, 1).requires_grad_()  # [3, 7, 2, 8], strides permuted
    assert not u.is_contiguous()
    inputs = [u, nw.requires_grad_(), cw.t().contiguous().t().requires_grad_()]
    out = ops.short_conv(*inputs, 2, 1e-5)
    want = ref.short_conv(*inputs, 2, 1e-5)
    assert_close(out, want, torch.float64)
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, inputs, g), torch.autograd.grad(want, inputs, g)):
        assert_close(a, b, torch.float64)


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda u, nw, cw, d: (u[0], nw, cw, d), "u must be \\[B, T, M, D\\]"),
        (lambda u, nw, cw, d: (u, nw[:1], cw, d), "norm_weight must be \\[M=4, D=8\\]"),
        (lambda u, nw, cw, d: (u, nw, cw[:5], d), "conv_weight must be \\[M\\*D=32, kernel_size >= 1\\]"),
        (lambda u, nw, cw, d: (u, nw, cw.unsqueeze(1), d), "conv_weight must be \\[M\\*D=32"),
        (lambda u, nw, cw, d: (u, nw, cw[:, :0], d), "kernel_size >= 1"),
        (lambda u, nw, cw, d: (u, nw, cw, 0), "dilation must be >= 1, got 0"),
        (
            lambda u, nw, cw, d: (u, nw.bfloat16(), cw, d),
            "norm_weight must be float32 or u's dtype Float, got BFloat16",
        ),
        (lambda u, nw, cw, d: (u, nw, cw.double(), d), "conv_weight must be float32 or u's dtype Float, got Double"),
        (lambda u, nw, cw, d: (u.long(), nw, cw, d), "u must be float32, bfloat16, float16 or float64"),
    ],
)
def test_bad_inputs_name_the_argument(change, match):
    args = change(*conv_inputs(2, 5, 4, 8, 4, torch.float32), 3)
    with pytest.raises(RuntimeError, match=match):
        ops.short_conv(*args, 1e-5)


@pytest.mark.parametrize("eps", [-1e-5, float("nan")])
def test_bad_eps(eps):
    with pytest.raises(RuntimeError, match="eps must be finite and >= 0"):
        ops.short_conv(*conv_inputs(1, 3, 1, 8, 4, torch.float32), 1, eps)


def test_backward_rejects_mismatched_rstd():
    u, nw, cw = conv_inputs(2, 5, 4, 8, 4, torch.float32)
    out, rstd = torch.ops.engram._short_conv_forward(u, nw, cw, 3, 1e-5)
    with pytest.raises(RuntimeError, match="rstd must be \\[B, T, M\\]"):
        torch.ops.engram._short_conv_backward(out, u, nw, cw, rstd[:, :2], 3, True)
    with pytest.raises(RuntimeError, match="rstd must be Float"):
        torch.ops.engram._short_conv_backward(out, u, nw, cw, rstd.double(), 3, True)
    with pytest.raises(RuntimeError, match="grad_out must have u's dtype"):
        torch.ops.engram._short_conv_backward(out.double(), u, nw, cw, rstd, 3, True)
