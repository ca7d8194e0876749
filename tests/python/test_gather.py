"""multihead_gather and its dense/sparse backward against the pure-PyTorch reference."""

import pytest
import torch

import torch_engram  # noqa: F401
from conftest import DEVICES
from torch_engram import ops
from torch_engram import reference as ref

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
INDEX_DTYPES = [torch.int64, torch.int32]
# Leading shapes of rows [..., H]: [B, T, H], [T, H], T = 1, and a few lookups in one token.
SHAPES = [(2, 7, 16), (7, 16), (1, 1, 16), (3, 4)]


def make(
    shape, num_rows=97, d_head=8, dtype=torch.float32, index_dtype=torch.int64, device="cpu", seed=0, num_distinct=None
):
    """A table and rows with plenty of duplicates (rows drawn from `num_distinct` values)."""
    g = torch.Generator().manual_seed(seed)
    table = torch.randn(num_rows, d_head, generator=g, dtype=torch.float64).to(dtype)
    hi = num_rows if num_distinct is None else num_distinct
    rows = torch.randint(0, hi, shape, generator=g).to(index_dtype)
    return table.to(device), rows.to(device)


def grad_for(rows, d_head, dtype, device, seed=1):
    g = torch.Generator().manual_seed(seed)
    shape = (*rows.shape[:-1], rows.shape[-1] * d_head)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype).to(device)


def assert_grad_close(actual, expected):
    """float64 must match exactly; lower precisions within the rounding of fp32 sums."""
    if actual.dtype == torch.float64:
        torch.testing.assert_close(actual, expected, rtol=0, atol=0)
    else:
        torch.testing.assert_close(
            actual,
            expected,
            rtol=2e-5 if actual.dtype == torch.float32 else None,
            atol=2e-5 if actual.dtype == torch.float32 else None,
        )


# --- forward ----------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("index_dtype", INDEX_DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_matches_reference(device, dtype, index_dtype, shape):
    table, rows = make(shape, dtype=dtype, index_dtype=index_dtype, device=device, num_distinct=20)
    e = ops.multihead_gather(table, rows)
    assert e.shape == (*shape[:-1], shape[-1] * table.shape[1]) and e.dtype == dtype
    assert torch.equal(e, ref.multihead_gather(table, rows))


@pytest.mark.parametrize("device", DEVICES)
def test_forward_noncontiguous_inputs(device):
    base = torch.randn(50, 24, dtype=torch.float64, device=device)
    rows = torch.randint(0, 50, (6, 5, 2), device=device).transpose(0, 2)  # non-contiguous [2, 5, 6]
    for table in (base[:, 8:16], base.t().contiguous().t(), base[::2, :8], base[:, ::3]):
        r = rows % table.shape[0]
        assert torch.equal(ops.multihead_gather(table, r), ref.multihead_gather(table, r))
    expanded = base[:1].expand(30, 24)  # row stride 0: every row aliases row 0
    assert torch.equal(ops.multihead_gather(expanded, rows % 30), ref.multihead_gather(expanded, rows % 30))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(0, 5, 4), (3, 0, 4), (0, 4)])
def test_empty_batch(device, shape):
    table, rows = make(shape, device=device)
    table.requires_grad_()
    e = ops.multihead_gather(table, rows)
    assert e.shape == (*shape[:-1], 4 * table.shape[1])
    e.sum().backward()
    assert torch.equal(table.grad, torch.zeros_like(table))
    unique_rows, values = ops.multihead_gather_backward_sparse(torch.zeros_like(e), rows)
    assert unique_rows.shape == (0,) and values.shape == (0, table.shape[1])


@pytest.mark.parametrize("device", DEVICES)
def test_forward_inference_mode_and_no_grad(device):
    table, rows = make((2, 3, 4), device=device)
    table.requires_grad_()
    with torch.inference_mode():
        e = ops.multihead_gather(table, rows)
    assert e.is_inference() and torch.equal(e, ref.multihead_gather(table.detach(), rows))
    with torch.no_grad():
        assert ops.multihead_gather(table, rows, True).grad_fn is None


def test_forward_fake_tensors():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        table = torch.empty(1000, 16, dtype=torch.bfloat16)
        rows = torch.empty(4, 9, 6, dtype=torch.int32)
        e = ops.multihead_gather(table, rows)
        assert e.shape == (4, 9, 96) and e.dtype == torch.bfloat16
        g = ops.multihead_gather_backward(e, rows, 1000)
        assert g.shape == (1000, 16)


# --- backward ---------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("index_dtype", INDEX_DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_backward_ops_match_reference(device, dtype, index_dtype, shape):
    table, rows = make(shape, dtype=dtype, index_dtype=index_dtype, device=device, num_distinct=20)
    grad_e = grad_for(rows, table.shape[1], dtype, device)
    dense = ops.multihead_gather_backward(grad_e, rows, table.shape[0])
    assert dense.shape == table.shape and dense.dtype == dtype
    assert_grad_close(dense, ref.multihead_gather_backward(grad_e, rows, table.shape[0]))
    unique_rows, values = ops.multihead_gather_backward_sparse(grad_e, rows)
    ref_rows, ref_values = ref.multihead_gather_backward_sparse(grad_e, rows)
    assert unique_rows.dtype == torch.int64 and torch.equal(unique_rows, ref_rows)
    assert_grad_close(values, ref_values)
    # One code path: the sparse values are exactly the sorted dense gradient's touched rows (the
    # CUDA dense op adds with atomics unless deterministic algorithms are on).
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        dense_sorted = ops.multihead_gather_backward(grad_e, rows, table.shape[0])
    finally:
        torch.use_deterministic_algorithms(prev)
    assert torch.equal(dense_sorted[unique_rows], values)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_backward_many_lookups(device, dtype):
    # Enough lookups for the parallel radix sort (not the small-input comparison sort).
    _table, rows = make((8, 256, 16), num_rows=50000, d_head=4, dtype=dtype, device=device, num_distinct=3000)
    grad_e = grad_for(rows, 4, dtype, device)
    assert_grad_close(
        ops.multihead_gather_backward(grad_e, rows, 50000), ref.multihead_gather_backward(grad_e, rows, 50000)
    )
    unique_rows, values = ops.multihead_gather_backward_sparse(grad_e, rows)
    ref_rows, ref_values = ref.multihead_gather_backward_sparse(grad_e, rows)
    assert torch.equal(unique_rows, ref_rows)
    assert_grad_close(values, ref_values)


def test_backward_sums_in_position_order():
    # fp32 sums are order dependent: 1e8 + 1 - 1e8 is 0 in position order, 1 in other orders.
    rows = torch.tensor([[3, 3, 3]])
    grad_e = torch.tensor([[1e8, 1.0, -1e8]])
    assert ops.multihead_gather_backward(grad_e, rows, 5)[3].item() == 0.0
    rows = torch.tensor([[3, 3, 3]])
    grad_e = torch.tensor([[1.0, 1e8, -1e8]])
    assert ops.multihead_gather_backward(grad_e, rows, 5)[3].item() == 0.0
    grad_e = torch.tensor([[1e8, -1e8, 1.0]])
    assert ops.multihead_gather_backward(grad_e, rows, 5)[3].item() == 1.0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sparse_grad", [False, True])
def test_autograd_matches_reference(device, dtype, sparse_grad):
    table, rows = make((3, 11, 16), dtype=dtype, device=device, num_distinct=30)
    grad_e = grad_for(rows, table.shape[1], dtype, device)
    t = table.clone().requires_grad_()
    ops.multihead_gather(t, rows, sparse_grad).backward(grad_e)
    expected = ref.multihead_gather_backward(grad_e, rows, table.shape[0])
    if sparse_grad:
        assert t.grad.layout == torch.sparse_coo and t.grad.shape == table.shape
        # AccumulateGrad drops the coalesced flag (pytorch/pytorch#105916); the indices are
        # still sorted and unique (test_sparse_grad_is_coalesced checks the flag itself).
        indices = t.grad._indices()[0]
        assert torch.equal(indices, torch.unique(rows.long()))
        assert_grad_close(t.grad.to_dense(), expected)
    else:
        assert t.grad.layout == torch.strided
        assert_grad_close(t.grad, expected)


@pytest.mark.parametrize("device", DEVICES)
def test_sparse_grad_is_coalesced(device):
    table, rows = make((4, 5, 6), device=device, num_distinct=10)
    t = table.clone().requires_grad_()
    e = ops.multihead_gather(t, rows, True)
    (g,) = torch.autograd.grad(e, t, torch.ones_like(e))
    assert g.is_sparse and g.is_coalesced()
    assert torch.equal(g._indices()[0], torch.unique(rows))
    torch.testing.assert_close(g.to_dense(), ref.multihead_gather_backward(torch.ones_like(e), rows, 97))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("sparse_grad", [False, True])
def test_grad_accumulates_on_parameter(device, sparse_grad):
    table, rows = make((2, 6, 4), device=device, num_distinct=15)
    _, rows2 = make((3, 4), device=device, seed=5, num_distinct=15)
    p = torch.nn.Parameter(table.clone())
    for r in (rows, rows2):
        ops.multihead_gather(p, r, sparse_grad).pow(2).sum().backward()
    q = torch.nn.Parameter(table.clone())
    for r in (rows, rows2):
        ref.multihead_gather(q, r).pow(2).sum().backward()
    got = p.grad.to_dense() if sparse_grad else p.grad
    torch.testing.assert_close(got, q.grad)


@pytest.mark.parametrize("device", DEVICES)
def test_sparse_grad_with_sparse_adam(device):
    table, _rows = make((4, 8, 16), num_rows=300, device=device, num_distinct=100)
    p = torch.nn.Parameter(table.clone())
    q = torch.nn.Parameter(table.clone())
    opt_p = torch.optim.SparseAdam([p], lr=1e-2)
    opt_q = torch.optim.SparseAdam([q], lr=1e-2)
    for step in range(3):
        _, r = make((4, 8, 16), num_rows=300, device=device, seed=step, num_distinct=100)
        for param, opt, fn in ((p, opt_p, ops.multihead_gather), (q, opt_q, ref.multihead_gather)):
            opt.zero_grad()
            fn(param, r, True).sin().sum().backward()
            opt.step()
    torch.testing.assert_close(p, q)
    assert not torch.equal(p, table)


def test_gradcheck_float64():
    table, rows = make((2, 3, 4), num_rows=9, d_head=3, dtype=torch.float64, num_distinct=6)
    table.requires_grad_()
    assert torch.autograd.gradcheck(lambda t: ops.multihead_gather(t, rows), (table,))
    # gradcheck rejects sparse gradients of strided inputs; check the sparse path against the
    # numerically verified dense one instead.
    (dense,) = torch.autograd.grad(ops.multihead_gather(table, rows).sum(), table)
    (sparse,) = torch.autograd.grad(ops.multihead_gather(table, rows, True).sum(), table)
    assert torch.equal(sparse.to_dense(), dense)


# --- determinism ------------------------------------------------------------------------------


def test_backward_deterministic_across_runs_and_threads():
    # Zipf-like duplicates so segments are long and order-dependent sums would show.
    g = torch.Generator().manual_seed(0)
    rows = (torch.rand(16, 512, 16, generator=g) ** 4 * 5000).long()
    grad_e = torch.randn(16, 512, 16 * 16, generator=g)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(max(2, threads))
        a = ops.multihead_gather_backward(grad_e, rows, 5000)
        b = ops.multihead_gather_backward(grad_e, rows, 5000)
        sa = ops.multihead_gather_backward_sparse(grad_e, rows)
        torch.set_num_threads(1)
        c = ops.multihead_gather_backward(grad_e, rows, 5000)
        sc = ops.multihead_gather_backward_sparse(grad_e, rows)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(a, b) and torch.equal(a, c)
    assert torch.equal(sa[0], sc[0]) and torch.equal(sa[1], sc[1])
    # Position-order fp32 sums: bitwise equal to summing each row's gradients one by one.
    flat_rows, flat_grad = rows.reshape(-1), grad_e.reshape(-1, 16)
    for r in (0, 1, 2, 4999 // 2):
        acc = None
        for n in torch.nonzero(flat_rows == r).flatten().tolist():
            acc = flat_grad[n].clone() if acc is None else acc + flat_grad[n]
        assert torch.equal(a[r], acc if acc is not None else torch.zeros(16))


# --- torch.library / torch.compile ------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    table, rows = make((2, 5, 4), d_head=6, device=device, num_distinct=12)
    grad_e = grad_for(rows, 6, torch.float32, device)
    torch.library.opcheck(torch.ops.engram.multihead_gather, (table, rows, False))
    torch.library.opcheck(torch.ops.engram.multihead_gather, (table.clone().requires_grad_(), rows, False))
    torch.library.opcheck(
        torch.ops.engram.multihead_gather,
        (table.clone().requires_grad_(), rows, True),
        test_utils=("test_schema", "test_autograd_registration", "test_faketensor"),
    )
    torch.library.opcheck(torch.ops.engram._multihead_gather_backward, (grad_e, rows, table.shape[0]))
    torch.library.opcheck(torch.ops.engram._multihead_gather_backward_sparse, (grad_e, rows))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dynamic", [False, True])
def test_compile_forward_backward(device, dynamic):
    table, rows = make((2, 9, 8), dtype=torch.float32, device=device, num_distinct=40)

    def step(t, r):
        e = ops.multihead_gather(t, r)
        (e * e).sum().backward()
        return e.detach()

    def loss(t, r):
        e = ops.multihead_gather(t, r)
        return (e * e).sum()

    t_eager = table.clone().requires_grad_()
    e_eager = step(t_eager, rows)
    torch._dynamo.reset()
    t_comp = table.clone().requires_grad_()
    if hasattr(torch._dynamo.config, "trace_autograd_ops"):  # .backward() inside the graph
        with torch._dynamo.config.patch(trace_autograd_ops=True):
            e_comp = torch.compile(step, fullgraph=True, dynamic=dynamic)(t_comp, rows)
    else:
        e_comp = None
        torch.compile(loss, fullgraph=True, dynamic=dynamic)(t_comp, rows).backward()
    if e_comp is not None:
        assert torch.equal(e_comp, e_eager)
    torch.testing.assert_close(t_comp.grad, t_eager.grad)
    # The compiled forward with an eager-driven compiled backward (AOTAutograd).
    torch._dynamo.reset()
    t2 = table.clone().requires_grad_()
    torch.compile(loss, fullgraph=True, dynamic=dynamic)(t2, rows).backward()
    torch.testing.assert_close(t2.grad, t_eager.grad)


@pytest.mark.parametrize("device", DEVICES)
def test_compile_sparse_grad(device):
    table, rows = make((2, 9, 8), dtype=torch.float32, device=device, num_distinct=40)

    def loss(t, r):
        return ops.multihead_gather(t, r, True).pow(2).sum()

    t_eager = table.clone().requires_grad_()
    loss(t_eager, rows).backward()
    torch._dynamo.reset()
    t_comp = table.clone().requires_grad_()
    torch.compile(loss, fullgraph=True)(t_comp, rows).backward()
    assert t_comp.grad.layout == torch.sparse_coo
    assert torch.equal(t_comp.grad.to_dense(), t_eager.grad.to_dense())


# --- bad inputs -------------------------------------------------------------------------------


def test_bad_inputs():
    table, rows = make((2, 3, 4))
    with pytest.raises(RuntimeError, match=r"rows must be int64 or int32, got Float"):
        ops.multihead_gather(table, rows.float())
    with pytest.raises(RuntimeError, match=r"rows must be \[\.\.\., H\] \(at least one dimension\)"):
        ops.multihead_gather(table, torch.tensor(3))
    with pytest.raises(RuntimeError, match=r"rows must be \[\.\.\., H\] with H >= 1"):
        ops.multihead_gather(table, rows[..., :0])
    with pytest.raises(RuntimeError, match=r"table must be \[num_rows, d_head\], got shape \[97\]"):
        ops.multihead_gather(table[:, 0], rows)
    with pytest.raises(RuntimeError, match=r"table must be float32, bfloat16, float16 or float64, got Int"):
        ops.multihead_gather(table.int(), rows)
    bad = rows.clone()
    bad[0, 2, 1] = 97
    bad[1, 0, 0] = 500  # only the first offending lookup in flat order is reported
    msg = r"rows must lie in \[0, 97\) \(table.size\(0\)\), got "
    with pytest.raises(RuntimeError, match=msg + r"97 at rows\[0, 2, 1\]"):
        ops.multihead_gather(table, bad)
    bad = rows.clone()
    bad[0, 1, 0] = -1
    with pytest.raises(RuntimeError, match=msg + r"-1 at rows\[0, 1, 0\]"):
        ops.multihead_gather(table, bad.int())
    grad_e = grad_for(rows, 8, torch.float32, "cpu")
    with pytest.raises(RuntimeError, match=r"gather_backward: rows must lie in \[0, 50\) \(num_rows\)"):
        ops.multihead_gather_backward(grad_e, rows + 50, 50)
    with pytest.raises(RuntimeError, match=r"backward_sparse: rows must be non-negative, got -1"):
        ops.multihead_gather_backward_sparse(grad_e, bad)
    with pytest.raises(RuntimeError, match=r"grad_e's last dimension must be H \* d_head with H = 4"):
        ops.multihead_gather_backward(grad_e[..., :-1], rows, 97)
    with pytest.raises(RuntimeError, match=r"grad_e must be \[\.\.\., H \* d_head\] with the leading shape"):
        ops.multihead_gather_backward_sparse(grad_e[:1], rows)
    with pytest.raises(RuntimeError, match=r"num_rows must be non-negative"):
        ops.multihead_gather_backward(grad_e, rows, -1)
    with pytest.raises(RuntimeError, match=r"grad_e must be float32, bfloat16, float16 or float64, got Long"):
        ops.multihead_gather_backward(grad_e.long(), rows, 97)


def test_bad_device():
    table, rows = make((2, 3, 4))
    with pytest.raises(RuntimeError, match=r"rows must be on table's device"):
        ops.multihead_gather(table, rows.to("meta"))
    with pytest.raises(RuntimeError, match=r"rows must be on grad_e's device"):
        ops.multihead_gather_backward(torch.empty(2, 3, 32, device="meta"), rows, 97)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible")
def test_bad_device_cuda():
    table, rows = make((2, 3, 4))
    with pytest.raises(RuntimeError, match=r"rows must be on table's device"):
        ops.multihead_gather(table.cuda(), rows)
