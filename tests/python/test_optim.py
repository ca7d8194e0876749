"""Lazy row-wise Adam (sparse_adam_step), the table optimizers and the dense / sparse / fused
table-gradient modes, against plain-PyTorch references and torch's own Adam variants."""

import copy
import math

import pytest
import torch
from conftest import DEVICES
from torch import nn

import torch_engram  # noqa: F401
from torch_engram import ops, optim
from torch_engram import reference as ref


def _has_kernel(op: str, key: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(op, key)


needs_gather = pytest.mark.skipif(
    not (_has_kernel("engram::multihead_gather", "CPU") or _has_kernel("engram::multihead_gather",
                                                                        "CompositeExplicitAutograd"))
    or not _has_kernel("engram::multihead_gather_backward_sparse", "CPU"),
    reason="multihead_gather CPU kernels not built in this checkout")

OPMATH = {torch.float64: torch.float64, torch.float32: torch.float32, torch.bfloat16: torch.float32,
          torch.float16: torch.float32}


def _state(num_rows, d, dtype, moment_dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    table = torch.randn(num_rows, d, generator=g).to(dtype).to(device)
    m = torch.zeros(num_rows, d, dtype=moment_dtype, device=device)
    v = torch.zeros(num_rows, d, dtype=moment_dtype, device=device)
    step = torch.zeros(num_rows, dtype=torch.int32, device=device)
    return [table, m, v, step]


def _steps(num_rows, d, n_steps, touched, grad_dtype, device, seed=1, row_dtype=torch.int64):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_steps):
        rows = torch.randperm(num_rows, generator=g)[:touched].sort().values
        grads = torch.randn(touched, d, generator=g).to(grad_dtype)
        out.append((rows.to(row_dtype).to(device), grads.to(device)))
    return out


HP = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8)


# ---------------------------------------------------------------------------------------------
# The op against its reference and against torch's Adam


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bf16_moments", [False, True])
@pytest.mark.parametrize("f32_grads", [False, True])
@pytest.mark.parametrize("row_dtype", [torch.int64, torch.int32])
def test_op_matches_reference(device, dtype, bf16_moments, f32_grads, row_dtype):
    R, D = 64, 33
    mdt = torch.bfloat16 if bf16_moments else OPMATH[dtype]
    gdt = torch.float32 if f32_grads else dtype
    got = _state(R, D, dtype, mdt, device)
    want = [t.clone() for t in got]
    for rows, grads in _steps(R, D, 5, 24, gdt, device, row_dtype=row_dtype):
        ops.sparse_adam_step(*got, rows, grads, weight_decay=0.05, **HP)
        ref.sparse_adam_step(*want, rows, grads, weight_decay=0.05, **HP)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 and not bf16_moments else None
    for name, a, b in zip(["table", "exp_avg", "exp_avg_sq"], got[:3], want[:3]):
        if tol is None:
            # One rounding of the stored dtype apart at most (FMA or lerp order in torch's kernels).
            eps = torch.finfo(a.dtype).eps
            torch.testing.assert_close(a, b, rtol=2 * eps, atol=1e-6, msg=name)
        else:
            torch.testing.assert_close(a, b, **tol, msg=name)
    assert torch.equal(got[3], want[3])


def _per_row_adamw(table0, steps, lr, betas, eps, weight_decay, dtype):
    """Textbook dense AdamW applied to each row on its own, stepping only when the row is touched:
    the lazy semantics spelled out with torch.optim.AdamW itself."""
    rows_params = [nn.Parameter(table0[r].clone().to(dtype)) for r in range(table0.shape[0])]
    opts = [torch.optim.AdamW([p], lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, foreach=False)
            for p in rows_params]
    for rows, grads in steps:
        for i, r in enumerate(rows.tolist()):
            rows_params[r].grad = grads[i].to(dtype).clone()
            opts[r].step()
            rows_params[r].grad = None
    return torch.stack([p.detach() for p in rows_params])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_lazy_adam_equals_dense_adamw_on_touched_rows(device, dtype, weight_decay):
    R, D = 24, 8
    table, m, v, step = _state(R, D, dtype, dtype, device)
    table0 = table.cpu().clone()
    steps = _steps(R, D, 6, 10, dtype, device)
    for rows, grads in steps:
        ops.sparse_adam_step(table, m, v, step, rows, grads, 1e-2, 0.9, 0.999, 1e-8, weight_decay)
    want = _per_row_adamw(table0, [(r.cpu(), g.cpu()) for r, g in steps], 1e-2, (0.9, 0.999), 1e-8,
                          weight_decay, dtype)
    tol = dict(rtol=1e-12, atol=1e-14) if dtype == torch.float64 else dict(rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(table.cpu(), want, **tol)
    counts = torch.zeros(R, dtype=torch.int32)
    for rows, _ in steps:
        counts[rows.cpu()] += 1
    assert torch.equal(step.cpu(), counts)
    never = counts == 0
    assert never.any() and torch.equal(table.cpu()[never], table0[never])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_every_row_every_step_equals_torch_adamw(device, dtype):
    R, D = 16, 12
    table, m, v, step = _state(R, D, dtype, dtype, device)
    p = nn.Parameter(table.clone())
    opt = torch.optim.AdamW([p], lr=3e-3, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.2)
    g = torch.Generator().manual_seed(3)
    rows = torch.arange(R, device=device)
    for _ in range(7):
        grads = torch.randn(R, D, generator=g).to(dtype).to(device)
        p.grad = grads.clone()
        opt.step()
        ops.sparse_adam_step(table, m, v, step, rows, grads, 3e-3, 0.8, 0.99, 1e-6, 0.2)
    tol = dict(rtol=1e-12, atol=1e-14) if dtype == torch.float64 else dict(rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(table, p.detach(), **tol)
    torch.testing.assert_close(m, opt.state[p]["exp_avg"], **tol)
    torch.testing.assert_close(v, opt.state[p]["exp_avg_sq"], **tol)


def test_sparse_table_adam_matches_torch_sparse_adam():
    """torch.optim.SparseAdam counts steps globally and puts eps outside the bias correction; with
    the same rows touched at every step the step counts agree, and for |g| >> eps so do the eps
    conventions. Gradients come from nn.Embedding(sparse=True), the usual sparse COO source."""
    torch.manual_seed(0)
    emb_a = nn.Embedding(40, 6, sparse=True)
    emb_b = copy.deepcopy(emb_a)
    opt_a = torch.optim.SparseAdam(emb_a.parameters(), lr=1e-2)
    opt_b = optim.SparseTableAdam(emb_b.parameters(), lr=1e-2)
    ids = torch.tensor([[3, 7, 7, 19], [25, 3, 0, 39]])  # the same rows every step
    for i in range(6):
        w = torch.randn(4, 6)
        for emb, opt in ((emb_a, opt_a), (emb_b, opt_b)):
            opt.zero_grad()
            (emb(ids) * w * (i + 1)).sum().backward()
            opt.step()
    torch.testing.assert_close(emb_b.weight, emb_a.weight, rtol=1e-6, atol=1e-6)
    touched = torch.zeros(40, dtype=torch.bool)
    touched[ids.unique()] = True
    assert torch.equal(opt_b.state[emb_b.weight]["row_step"], torch.where(touched, 6, 0).int())


@pytest.mark.parametrize("device", DEVICES)
def test_bias_correction_counts_each_rows_own_updates(device):
    """A row first touched late takes a first update of lr * sign(g) (up to eps), as Adam's first
    step does; a global step count would make it up to ~3.2x lr (the choice made in library.cpp)."""
    R, D, lr = 4, 8, 1e-3
    table, m, v, step = _state(R, D, torch.float64, torch.float64, device)
    before = table.clone()
    g = torch.Generator().manual_seed(0)
    for _ in range(500):
        g0 = torch.randn(1, D, generator=g, dtype=torch.float64).to(device)
        ops.sparse_adam_step(table, m, v, step, torch.tensor([0], device=device), g0, lr, 0.9, 0.999, 1e-12,
                             0.0)
    grad = torch.randn(1, D, generator=g, dtype=torch.float64).to(device)
    ops.sparse_adam_step(table, m, v, step, torch.tensor([0, 2], device=device), torch.cat([grad, grad]), lr,
                         0.9, 0.999, 1e-12, 0.0)
    torch.testing.assert_close(before[2] - table[2], lr * grad[0].sign(), rtol=1e-9, atol=0)
    assert step.tolist() == [501, 0, 1, 0]
    # What per-row counting avoids: with a global count t the first update of a new row is
    # lr * (1 - beta1) / sqrt((1 - beta2) / (1 - beta2^t)), ~2x lr at t = 500, ~3.2x from t ~ 5000.
    for t, factor in ((501, 1.9), (10_000, 3.1)):
        assert lr * (1 - 0.9) / math.sqrt((1 - 0.999) / (1 - 0.999**t)) > factor * lr


@pytest.mark.parametrize("device", DEVICES)
def test_untouched_rows_bitwise_unchanged_and_empty_update(device):
    table, m, v, step = _state(32, 5, torch.float32, torch.float32, device)
    ops.sparse_adam_step(table, m, v, step, torch.tensor([1, 2, 30], device=device),
                         torch.ones(3, 5, device=device), 0.1, 0.9, 0.999, 1e-8, 0.5)
    snap = [t.clone() for t in (table, m, v, step)]
    rows = torch.tensor([2, 7], device=device)
    ops.sparse_adam_step(table, m, v, step, rows, torch.randn(2, 5, device=device), 0.1, 0.9, 0.999, 1e-8,
                         0.5)
    keep = torch.ones(32, dtype=torch.bool, device=device)
    keep[rows] = False
    for a, b in zip((table, m, v, step), snap):
        assert torch.equal(a[keep], b[keep])
        assert not torch.equal(a[~keep], b[~keep])
    ops.sparse_adam_step(table, m, v, step, torch.empty(0, dtype=torch.long, device=device),
                         torch.empty(0, 5, device=device), 0.1, 0.9, 0.999, 1e-8, 0.5)
    assert torch.equal(step[keep], snap[3][keep])


def test_version_counters_and_grad_mode():
    table = nn.Parameter(torch.randn(8, 4))
    m, v = torch.zeros(8, 4), torch.zeros(8, 4)
    step = torch.zeros(8, dtype=torch.int32)
    args = (m, v, step, torch.tensor([1, 3]), torch.randn(2, 4), 0.1, 0.9, 0.999, 1e-8, 0.0)
    with pytest.raises(RuntimeError, match="not differentiable; call it under torch.no_grad"):
        ops.sparse_adam_step(table, *args)
    before = [t._version for t in (table, m, v, step)]
    with torch.no_grad():
        ops.sparse_adam_step(table, *args)
    assert all(t._version > b for t, b in zip((table, m, v, step), before))
    # A backward that saved the table before the update must refuse to run after it.
    x = torch.randn(4, requires_grad=True)
    y = table * x
    with torch.no_grad():
        ops.sparse_adam_step(table, *args)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


def test_opcheck():
    table, m, v, step = _state(16, 8, torch.float32, torch.float32, "cpu")
    args = (table, m, v, step, torch.tensor([0, 5, 9]), torch.randn(3, 8), 0.01, 0.9, 0.999, 1e-8, 0.0)
    torch.library.opcheck(torch.ops.engram.sparse_adam_step.default, args)


def test_torch_compile_fullgraph():
    def update(table, m, v, step, rows, grads):
        torch.ops.engram.sparse_adam_step(table, m, v, step, rows, grads, 0.01, 0.9, 0.999, 1e-8, 0.1)
        return table.sum()

    a = _state(16, 8, torch.float32, torch.float32, "cpu")
    b = [t.clone() for t in a]
    rows, grads = torch.tensor([2, 4, 15]), torch.randn(3, 8)
    compiled = torch.compile(update, fullgraph=True, backend="aot_eager")
    for _ in range(2):
        compiled(*a, rows, grads)
        update(*b, rows, grads)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_fake_tensor_propagation():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        table, m, v, step = _state(16, 8, torch.float32, torch.float32, "cpu")
        assert torch.ops.engram.sparse_adam_step(table, m, v, step, torch.tensor([1]), torch.randn(1, 8), 0.1,
                                                 0.9, 0.999, 1e-8, 0.0) is None
        with pytest.raises(Exception, match="grads must be"):
            torch.ops.engram.sparse_adam_step(table, m, v, step, torch.tensor([1]), torch.randn(2, 8), 0.1,
                                              0.9, 0.999, 1e-8, 0.0)


BAD = [
    (lambda a: a.update(rows=torch.tensor([3, 3])), "strictly increasing"),
    (lambda a: a.update(rows=torch.tensor([4, 2])), "strictly increasing"),
    (lambda a: a.update(rows=torch.tensor([1, 16])), r"rows must lie in \[0, num_rows=16\), got 16"),
    (lambda a: a.update(rows=torch.tensor([-1, 2])), r"rows must lie in \[0, num_rows=16\), got -1"),
    (lambda a: a.update(rows=torch.tensor([[1, 2]]), grads=torch.ones(2, 8)), r"rows must be \[U\]"),
    (lambda a: a.update(rows=torch.tensor([1.0, 2.0])), "rows must be int64 or int32"),
    (lambda a: a.update(grads=torch.ones(2, 7)), r"grads must be \[U=2, d_head=8\]"),
    (lambda a: a.update(grads=torch.ones(2, 8, dtype=torch.float64)), "grads must be Float"),
    (lambda a: a.update(table=torch.ones(16, 8, dtype=torch.int32)), "table must be float32"),
    (lambda a: a.update(table=torch.ones(8, 16).t()), "table must be contiguous"),
    (lambda a: a.update(table=torch.ones(16, 8, 1)), r"table must be \[num_rows, d_head\]"),
    (lambda a: a.update(m=torch.zeros(16, 9)), "exp_avg and exp_avg_sq must have the table's shape"),
    (lambda a: a.update(m=torch.zeros(16, 8, dtype=torch.float16), v=torch.zeros(16, 8, dtype=torch.float16)),
     r"must be Float \(the maths dtype of a Float table\) or bfloat16"),
    (lambda a: a.update(m=torch.zeros(16, 8, dtype=torch.bfloat16)), "must share a dtype"),
    (lambda a: a.update(step=torch.zeros(16, dtype=torch.int64)), "row_step must be int32"),
    (lambda a: a.update(step=torch.zeros(15, dtype=torch.int32)), r"row_step must be \[num_rows=16\]"),
    (lambda a: a.update(lr=-1.0), "lr must be finite and >= 0"),
    (lambda a: a.update(lr=float("nan")), "lr must be finite and >= 0"),
    (lambda a: a.update(beta1=1.0), r"beta1 must lie in \[0, 1\)"),
    (lambda a: a.update(beta2=-0.1), r"beta2 must lie in \[0, 1\)"),
    (lambda a: a.update(eps=-1e-8), "eps must be finite and >= 0"),
    (lambda a: a.update(wd=-0.1), "weight_decay must be finite and >= 0"),
]


@pytest.mark.parametrize("mutate,match", BAD)
def test_bad_inputs_raise_and_leave_state_alone(mutate, match):
    table, m, v, step = _state(16, 8, torch.float32, torch.float32, "cpu")
    a = dict(table=table, m=m, v=v, step=step, rows=torch.tensor([1, 4]), grads=torch.ones(2, 8), lr=0.1,
             beta1=0.9, beta2=0.999, eps=1e-8, wd=0.0)
    mutate(a)
    snap = [t.clone() for t in (table, m, v, step)]
    with pytest.raises(RuntimeError, match=match):
        torch.ops.engram.sparse_adam_step(a["table"], a["m"], a["v"], a["step"], a["rows"], a["grads"],
                                          a["lr"], a["beta1"], a["beta2"], a["eps"], a["wd"])
    for x, y in zip((table, m, v, step), snap):
        assert torch.equal(x, y)


# ---------------------------------------------------------------------------------------------
# SparseTableAdam


def test_dense_and_sparse_grads_give_the_same_update():
    torch.manual_seed(0)
    emb_d = nn.Embedding(50, 4)
    emb_s = nn.Embedding(50, 4, sparse=True)
    emb_s.load_state_dict(emb_d.state_dict())
    opt_d = optim.SparseTableAdam(emb_d.parameters(), lr=0.05, weight_decay=0.1)
    opt_s = optim.SparseTableAdam(emb_s.parameters(), lr=0.05, weight_decay=0.1)
    for _ in range(4):
        ids = torch.randint(0, 50, (3, 7))
        w = torch.randn(3, 7, 4)
        for emb, opt in ((emb_d, opt_d), (emb_s, opt_s)):
            opt.zero_grad()
            (emb(ids) * w).sum().backward()
            opt.step()
    # torch sums repeated ids in a different order for dense and sparse embedding gradients.
    torch.testing.assert_close(emb_d.weight, emb_s.weight, rtol=1e-6, atol=1e-7)
    for k in ("exp_avg", "exp_avg_sq", "row_step", "step"):
        torch.testing.assert_close(opt_d.state[emb_d.weight][k], opt_s.state[emb_s.weight][k], rtol=1e-6,
                                   atol=1e-9)


def test_row_gradient_forms():
    dense = torch.zeros(10, 4)
    dense[[2, 7]] = torch.tensor([[1.0, 0, 0, 0], [0, 0, -2.0, 0]])
    dense[4, 1] = -0.0  # numerically zero, non-zero bits
    for g in (dense, dense.to(torch.bfloat16), dense[:, :3]):  # int64-word scans, and the plain one
        rows, vals = optim.row_gradient(g, chunk_rows=3)
        assert rows.tolist() == [2, 7] and torch.equal(vals, g[[2, 7]])
    # Uncoalesced: row 7 twice, rows out of order.
    sparse = torch.sparse_coo_tensor(torch.tensor([[7, 2, 7]]), torch.ones(3, 3), (10, 3),
                                     check_invariants=True)
    rows, vals = optim.row_gradient(sparse)
    assert rows.tolist() == [2, 7] and vals.tolist() == [[1, 1, 1], [2, 2, 2]]
    sorted_unflagged = torch.sparse_coo_tensor(torch.tensor([[2, 7]]), torch.ones(2, 3), (10, 3),
                                               check_invariants=True)
    assert not sorted_unflagged.is_coalesced()  # as AccumulateGrad hands over multihead_gather's gradient
    rows, vals = optim.row_gradient(sorted_unflagged)
    assert rows.tolist() == [2, 7] and vals.tolist() == [[1, 1, 1], [1, 1, 1]]
    with pytest.raises(ValueError, match="sparse_dim=1 and dense_dim=1"):
        optim.row_gradient(torch.zeros(10, 3).to_sparse())
    with pytest.raises(ValueError, match=r"must be \[num_rows, d_head\]"):
        optim.row_gradient(torch.zeros(10, 3, 2))


@pytest.mark.parametrize("table_dtype,moment_dtype,want", [
    (torch.bfloat16, None, torch.float32), (torch.float32, None, torch.float32),
    (torch.float64, None, torch.float64), (torch.float32, torch.bfloat16, torch.bfloat16)])
def test_state_dtypes_survive_state_dict_round_trip(table_dtype, moment_dtype, want):
    p = nn.Parameter(torch.randn(30, 4, dtype=table_dtype))
    opt = optim.SparseTableAdam([p], lr=0.1, moment_dtype=moment_dtype)
    p.grad = torch.randn(30, 4, dtype=table_dtype)
    opt.step()
    assert opt.state[p]["exp_avg"].dtype == want and opt.state[p]["row_step"].dtype == torch.int32
    sd = copy.deepcopy(opt.state_dict())
    p2 = nn.Parameter(p.detach().clone())
    opt2 = optim.SparseTableAdam([p2], lr=0.1, moment_dtype=moment_dtype)
    opt2.load_state_dict(sd)  # torch.optim would cast the moments to the table's dtype
    for k, t in opt.state[p].items():
        assert t.dtype == opt2.state[p2][k].dtype and torch.equal(t, opt2.state[p2][k])


def test_optimizer_rejects_bad_settings():
    p = nn.Parameter(torch.randn(4, 4))
    with pytest.raises(ValueError, match="lr must be >= 0"):
        optim.SparseTableAdam([p], lr=-1)
    with pytest.raises(ValueError, match="betas must lie in"):
        optim.SparseTableAdam([p], betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="moment_dtype must be"):
        optim.SparseTableAdam([p], moment_dtype=torch.float16)
    with pytest.raises(ValueError, match="state_alloc must be 'on_touch' or 'eager'"):
        optim.SparseTableAdam([p], state_alloc="lazy")
    with pytest.raises(ValueError, match=r"tables must be \[num_rows, d_head\]"):
        optim.SparseTableAdam([nn.Parameter(torch.randn(4))])
    opt = optim.SparseTableAdam([p])
    with pytest.raises(ValueError, match="is not one of this optimizer's parameters"):
        opt.apply_rows(nn.Parameter(torch.randn(4, 4)), torch.tensor([0]), torch.ones(1, 4))


def _rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


@pytest.mark.skipif(not hasattr(__import__("mmap"), "MAP_ANONYMOUS"), reason="needs anonymous mmap")
def test_state_memory_is_committed_only_for_touched_rows():
    rows, d = 1 << 20, 64  # 256 MiB per float32 moment
    table = nn.Parameter(optim._zeros_on_touch((rows, d), torch.float32, torch.device("cpu")))
    opt = optim.SparseTableAdam([table], lr=0.1)
    before = _rss_bytes()
    idx = torch.randint(0, rows, (200,)).unique()
    with torch.no_grad():
        opt.apply_rows(table, idx, torch.ones(idx.numel(), d))
    grown = _rss_bytes() - before
    assert opt.state[table]["exp_avg"].shape == (rows, d)
    assert grown < 32 << 20, f"state committed {grown / 2**20:.1f} MiB for 200 rows"
    assert opt.state[table]["exp_avg"][idx].ne(0).all() and opt.state[table]["exp_avg"].sum() != 0
    # State larger than the machine's memory is only address space until touched.
    with open("/proc/meminfo") as f:
        total = int(next(line for line in f if line.startswith("MemTotal:")).split()[1]) * 1024
    huge = optim._zeros_on_touch((total // 128, 64), torch.float32, torch.device("cpu"))  # 2x MemTotal
    huge[12345] = 1.0
    assert huge[12345].sum() == 64 and huge[-1].sum() == 0
    del huge
    eager_table = nn.Parameter(torch.zeros(rows, d))
    eager = optim.SparseTableAdam([eager_table], lr=0.1, state_alloc="eager")
    with torch.no_grad():
        eager.apply_rows(eager_table, idx, torch.ones(idx.numel(), d))
    assert torch.equal(eager_table, table)
    for k, v in opt.state[table].items():
        assert torch.equal(eager.state[eager_table][k], v)


# ---------------------------------------------------------------------------------------------
# Parameter split and the recipe


class EngramToy(nn.Module):
    def __init__(self, rows=40, d=4, table_grad="dense"):
        super().__init__()
        self.table = nn.Parameter(torch.randn(rows, d))
        self.proj = nn.Linear(2 * d, 3)
        self.table_grad = table_grad


def test_split_and_recipe():
    model = nn.Sequential(EngramToy(), nn.Linear(3, 3))
    extra = nn.Parameter(torch.randn(5, 2))
    optim.mark_table(extra)
    model.register_parameter("extra_table", extra)
    frozen = nn.Parameter(torch.randn(2), requires_grad=False)
    model.register_parameter("frozen", frozen)
    tables, rest = optim.split_table_parameters(model)
    assert [n for n, _ in tables] == ["extra_table", "0.table"]
    assert "frozen" in [n for n, _ in rest] and "0.proj.weight" in [n for n, _ in rest]
    table_opt, rest_opt = optim.make_optimizers(model, base_lr=1e-3, weight_decay=0.1)
    assert isinstance(table_opt, optim.SparseTableAdam) and isinstance(rest_opt, torch.optim.AdamW)
    (tg,), (rg,) = table_opt.param_groups, rest_opt.param_groups
    assert tg["lr"] == pytest.approx(5e-3) and tg["weight_decay"] == 0.0
    assert rg["lr"] == 1e-3 and rg["weight_decay"] == 0.1
    assert {id(p) for p in tg["params"]} == {id(extra), id(model[0].table)}
    assert all(p is not frozen for p in rg["params"]) and len(rg["params"]) == 4
    seen = []
    _, custom = optim.make_optimizers(model, 1e-3, 0.1, table_lr_mult=2.0,
                                      optimizer_factory=lambda groups: seen.append(groups) or
                                      torch.optim.SGD(groups, lr=1.0))
    assert isinstance(custom, torch.optim.SGD) and seen[0][0]["lr"] == 1e-3


def test_attach_fused_adam():
    model = nn.ModuleList([EngramToy(table_grad="fused"), EngramToy(table_grad="sparse"),
                           EngramToy(table_grad="fused")])
    opt = optim.attach_fused_adam(model, lr=0.01)
    assert model[0]._fused_state is opt and model[2]._fused_state is opt
    assert not hasattr(model[1], "_fused_state")
    assert [len(g["params"]) for g in opt.param_groups] == [2]
    table_opt, _ = optim.make_optimizers(model, 1e-3)
    assert model[0]._fused_state is table_opt and len(table_opt.param_groups[0]["params"]) == 3
    with pytest.raises(ValueError, match="no module with table_grad='fused'"):
        optim.attach_fused_adam(nn.Linear(2, 2))


# ---------------------------------------------------------------------------------------------
# Dense, sparse and fused modes on a tiny model (gather + linear)


class _Tiny(nn.Module):
    def __init__(self, mode, rows=97, d_head=8, heads=3, dtype=torch.float32):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.table = nn.Parameter(torch.randn(rows, d_head, generator=g, dtype=dtype))
        optim.mark_table(self.table, mode)
        self.head = nn.Linear(heads * d_head, 1, dtype=dtype)
        with torch.no_grad():
            self.head.weight.copy_(torch.randn(1, heads * d_head, generator=g, dtype=dtype))
            self.head.bias.zero_()
        self.table_grad = mode
        self._fused_state = None

    def forward(self, rows):
        if self.table_grad == "fused":
            e = optim.fused_multihead_gather(self.table, rows, self._fused_state)
        else:
            e = ops.multihead_gather(self.table, rows, sparse_grad=self.table_grad == "sparse")
        return self.head(e).squeeze(-1)


def _batch(step, rows=97, heads=3):
    g = torch.Generator().manual_seed(100 + step)
    ids = torch.randint(0, rows, (4, 6, heads), generator=g)
    target = torch.randn(4, 6, generator=g)
    return ids, target


def _train(mode, steps=5, dtype=torch.float32):
    model = _Tiny(mode, dtype=dtype)
    table_opt, rest_opt = optim.make_optimizers(model, base_lr=1e-2, weight_decay=0.01)
    for s in range(steps):
        ids, target = _batch(s)
        loss = (model(ids) - target.to(dtype)).square().mean()
        table_opt.zero_grad()
        rest_opt.zero_grad()
        loss.backward()
        table_opt.step()
        rest_opt.step()
    return model, table_opt


@needs_gather
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dense_sparse_fused_train_to_the_same_weights(dtype):
    models = {mode: _train(mode, dtype=dtype) for mode in ("dense", "sparse", "fused")}
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
    base, base_opt = models["dense"]
    assert not torch.equal(base.table, _Tiny("dense", dtype=dtype).table)
    for mode in ("sparse", "fused"):
        model, opt = models[mode]
        torch.testing.assert_close(model.table, base.table, **tol)
        torch.testing.assert_close(model.head.weight, base.head.weight, **tol)
        assert torch.equal(opt.state[model.table]["row_step"], base_opt.state[base.table]["row_step"])
    assert models["fused"][0].table.grad is None


@needs_gather
def test_touched_row_gradients_equal_the_reference():
    ids, target = _batch(0)
    ref_model = _Tiny("dense", dtype=torch.float64)
    e = ref_model.table[ids].flatten(-2)
    (ref_model.head(e).squeeze(-1) - target.double()).square().mean().backward()
    want = ref_model.table.grad
    touched = ids.unique()

    sparse = _Tiny("sparse", dtype=torch.float64)
    (sparse(ids) - target.double()).square().mean().backward()
    assert sparse.table.grad.is_sparse
    rows, values = optim.row_gradient(sparse.table.grad)  # what SparseTableAdam consumes
    assert torch.equal(rows, touched)
    torch.testing.assert_close(values, want[touched], rtol=1e-12, atol=1e-12)

    class Recorder(optim.FusedTableAdam):
        def apply_rows(self, table, rows, grads):
            self.seen = (rows.clone(), grads.clone())
            super().apply_rows(table, rows, grads)

    fused = _Tiny("fused", dtype=torch.float64)
    fused._fused_state = Recorder([fused.table], lr=0.1)
    (fused(ids) - target.double()).square().mean().backward()
    rows, grads = fused._fused_state.seen
    assert torch.equal(rows, touched)
    torch.testing.assert_close(grads, want[touched], rtol=1e-12, atol=1e-12)


@needs_gather
def test_fused_applies_one_update_per_backward():
    model = _Tiny("fused")
    opt = optim.FusedTableAdam([model.table], lr=0.1)
    ids, _ = _batch(0)
    for _ in range(3):  # gradient accumulation: three micro-batches, three updates
        model(ids).sum().backward()
    touched = ids.unique()
    assert torch.equal(opt.state[model.table]["row_step"][touched],
                       torch.full((touched.numel(),), 3, dtype=torch.int32))
    assert model.table.grad is None
    before = model.table.detach().clone()
    opt.step()  # nothing left to do for a fused table
    assert torch.equal(model.table, before)
    with torch.no_grad():  # evaluation: a plain gather, no update
        model(ids)
    assert torch.equal(model.table, before)


@needs_gather
def test_fused_gather_needs_an_optimizer_holding_the_table():
    table = nn.Parameter(torch.randn(10, 4))
    with pytest.raises(RuntimeError, match="no optimizer holds this table"):
        optim.fused_multihead_gather(table, torch.zeros(2, 1, dtype=torch.long))
    other = optim.FusedTableAdam([nn.Parameter(torch.randn(10, 4))])
    with pytest.raises(ValueError, match="is not one of this optimizer's parameters"):
        optim.fused_multihead_gather(table, torch.zeros(2, 1, dtype=torch.long), other)
    opt = optim.FusedTableAdam([table], lr=0.1)  # found through the table when not passed
    optim.fused_multihead_gather(table, torch.tensor([[1], [3]])).sum().backward()
    assert opt.state[table]["row_step"].tolist() == [0, 1, 0, 1, 0, 0, 0, 0, 0, 0]


@needs_gather
def test_fused_mode_under_torch_compile():
    eager, compiled = _Tiny("fused"), _Tiny("fused")
    opts = [optim.FusedTableAdam([m.table], lr=0.05) for m in (eager, compiled)]
    step = torch.compile(lambda m, ids: m(ids).square().sum(), backend="aot_eager")
    for s in range(2):
        ids, _ = _batch(s)
        eager(ids).square().sum().backward()
        step(compiled, ids).backward()
    torch.testing.assert_close(compiled.table, eager.table, rtol=1e-6, atol=1e-7)
    assert torch.equal(opts[1].state[compiled.table]["row_step"], opts[0].state[eager.table]["row_step"])


@needs_gather
def test_engram_modules_train_alike_in_all_three_modes():
    import torch_engram as te

    cfg = te.EngramConfig(engram_vocab_size=(211, 307), max_ngram_size=3, n_embed_per_ngram=8,
                          n_head_per_ngram=2, layer_ids=(1, 3), pad_id=0, compressed_vocab_size=50)

    def train(mode):
        torch.manual_seed(0)
        hasher = te.NgramHasher(cfg)
        model = nn.ModuleList([te.Engram(cfg, layer, 16, hasher=hasher, table_grad=mode, dtype=torch.float64)
                               for layer in cfg.layer_ids])
        table_opt, rest_opt = optim.make_optimizers(model, base_lr=1e-2, weight_decay=0.1)
        assert len(table_opt.param_groups[0]["params"]) == 2
        g = torch.Generator().manual_seed(1)
        for _ in range(3):
            ids = torch.randint(0, 50, (2, 9), generator=g)
            hidden = torch.randn(2, 9, 16, generator=g, dtype=torch.float64)
            for o in (table_opt, rest_opt):
                o.zero_grad()
            sum((m(hidden, input_ids=ids) * hidden).sum() for m in model).backward()
            for o in (table_opt, rest_opt):
                o.step()
        return model

    dense = train("dense")
    for mode in ("sparse", "fused"):
        other = train(mode)
        for (name, a), (_, b) in zip(dense.named_parameters(), other.named_parameters()):
            torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12, msg=f"{mode}: {name}")
    torch.manual_seed(0)
    untrained = te.Engram(cfg, 1, 16, hasher=te.NgramHasher(cfg), dtype=torch.float64)
    assert not torch.equal(untrained.table, dense[0].table)  # the comparison above compared trained tables
