"""EngramTable and the table optimizer ops: every optimizer against its float64 reference (one
step and many), the fused backward against the sparse path bit for bit, stochastic rounding,
the three gradient modes, gradient accumulation, clipping, checkpoints and torch.compile."""

import pytest
import torch
from torch import nn

import torch_engram as te
from conftest import DEVICES, HAS_PROC, one_layer_config, rss_mib
from torch_engram import optim
from torch_engram import reference as ref
from torch_engram.table import OPTIMIZERS, EngramTable, state_bytes_per_row

HP = dict(lr=0.05, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.01)


def hparams(lr=0.05, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.01):
    return torch.tensor([lr, betas[0], betas[1], eps, weight_decay], dtype=torch.float64)


def state(optimizer, R, D, device, dtype=torch.float32, state_dtype=None):
    t = EngramTable(
        R, D, optimizer=optimizer, device=device, dtype=dtype, state_dtype=state_dtype, stochastic_rounding=False
    )
    return t


def state_tensors(t):
    return [t.weight.detach(), t.momentum1, t.momentum2, t.row_step, t.step_count]


def clone_state(t):
    return [x.detach().clone() for x in state_tensors(t)]


TOL = {
    torch.float32: dict(rtol=1e-5, atol=1e-6),
    torch.float64: dict(rtol=1e-12, atol=1e-13),
    torch.bfloat16: dict(rtol=2e-2, atol=1e-2),
    torch.float16: dict(rtol=2e-3, atol=1e-3),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_table_update_matches_float64_reference_over_many_steps(device, optimizer, dtype):
    torch.manual_seed(0)
    R, D = 40, 12
    t = state(optimizer, R, D, device, dtype)
    want = [x.clone().double() if x.is_floating_point() else x.clone() for x in clone_state(t)]
    got = state_tensors(t)
    hp = hparams(**HP)
    for s in range(6):
        rows = torch.randperm(R)[: 9 + s].sort().values.to(device)
        grads = torch.randn(rows.numel(), D, device=device, dtype=dtype) * (1 + s)
        with torch.no_grad():
            te.ops.table_update(*got, rows.int() if s % 2 else rows, grads, hp, optimizer)
        ref.table_update(*want, rows, grads.double(), hp, optimizer)
        # Compare against the float64 oracle each step (state included), then follow the kernel's
        # rounded values so errors do not compound across steps.
        for a, b in zip(got, want):
            torch.testing.assert_close(a.double() if a.is_floating_point() else a, b, **TOL[dtype])
        want = [x.clone().double() if x.is_floating_point() else x.clone() for x in got]
    assert int(t.step_count) == 6


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_one_step_from_zero_state(device, optimizer):
    R, D = 6, 4
    t = state(optimizer, R, D, device, torch.float64)
    w0 = t.weight.detach().clone()
    rows = torch.tensor([1, 4], device=device)
    g = torch.tensor([[1.0, -2.0, 0.5, 0.0], [3.0, 3.0, -3.0, 3.0]], device=device, dtype=torch.float64)
    with torch.no_grad():
        te.ops.table_update(*state_tensors(t), rows, g, hparams(lr=0.1, weight_decay=0.0), optimizer)
    w = t.weight.detach()
    step = w0[rows] - w[rows]
    if optimizer == "adam":  # the first Adam step is lr * sign(g) (zero gradients stay)
        torch.testing.assert_close(step, 0.1 * g.sign(), rtol=0, atol=1e-6)
    elif optimizer == "partial_rowwise_adam":  # lr * g / rms(g of the row)
        rms = g.square().mean(1, keepdim=True).sqrt()
        torch.testing.assert_close(step, 0.1 * g / rms, rtol=1e-6, atol=1e-6)
    elif optimizer == "rowwise_adagrad":
        rms = g.square().mean(1, keepdim=True).sqrt()
        torch.testing.assert_close(step, 0.1 * g / rms, rtol=1e-6, atol=1e-6)
    else:
        torch.testing.assert_close(step, 0.1 * g)
    others = torch.tensor([0, 2, 3, 5], device=device)
    assert torch.equal(w[others], w0[others])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_fused_backward_equals_sparse_backward_then_update(device, optimizer, dtype):
    torch.manual_seed(1)
    R, D, H = 50, 8, 3
    a = state(optimizer, R, D, device, dtype)
    b = state(optimizer, R, D, device, dtype)
    b.load_state_dict(a.state_dict())
    hp = hparams(**HP)
    for _s in range(3):
        rows = torch.randint(0, R, (4, 7, H), device=device)
        grad_e = torch.randn(4, 7, H * D, device=device, dtype=dtype)
        with torch.no_grad():
            torch.ops.engram._multihead_gather_fused_update(grad_e, rows, *state_tensors(a), hp, optimizer, -1)
            unique, sums = torch.ops.engram._multihead_gather_backward_sparse(
                grad_e.float() if dtype != torch.float64 else grad_e, rows
            )
            te.ops.table_update(*state_tensors(b), unique, sums, hp, optimizer)
    for x, y in zip(state_tensors(a), state_tensors(b)):
        if device == "cuda" and optimizer in ("partial_rowwise_adam", "rowwise_adagrad"):
            torch.testing.assert_close(x, y)  # the GPU's warp reduction of mean(g^2) is its own order
        else:
            assert torch.equal(x, y)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_fused_reference(device, optimizer):
    torch.manual_seed(2)
    R, D, H = 30, 6, 2
    t = state(optimizer, R, D, device, torch.float64)
    want = clone_state(t)
    rows = torch.randint(0, R, (3, 5, H), device=device)
    grad_e = torch.randn(3, 5, H * D, device=device, dtype=torch.float64)
    with torch.no_grad():
        torch.ops.engram._multihead_gather_fused_update(grad_e, rows, *state_tensors(t), hparams(**HP), optimizer, -1)
    ref.multihead_gather_fused_update(grad_e, rows, *want, hparams(**HP), optimizer)
    for a, b in zip(state_tensors(t), want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("state_dtype", [None, torch.bfloat16])
def test_bf16_state_and_stochastic_rounding(device, state_dtype):
    torch.manual_seed(3)
    R, D = 64, 32

    def run(seed):
        t = EngramTable(
            R, D, optimizer="adam", dtype=torch.bfloat16, state_dtype=state_dtype, seed=seed, device=device, lr=1e-3
        )
        torch.manual_seed(0)
        t.reset_parameters()
        for _s in range(5):
            rows = torch.arange(0, R, 2, device=device)
            g = torch.randn(rows.numel(), D, device=device)
            with torch.no_grad():
                te.ops.table_update(*state_tensors(t), rows, g, t.hparams, "adam", t.seed)
        return t

    a, b, c = run(7), run(7), run(8)
    assert a.momentum1.dtype == (state_dtype or torch.float32)
    assert torch.equal(a.weight, b.weight)  # deterministic given the seed
    assert not torch.equal(a.weight, c.weight)  # and the seed matters
    torch.manual_seed(0)
    init = EngramTable(R, D, dtype=torch.bfloat16, device=device).weight.detach()
    assert torch.equal(a.weight.detach()[1::2], init[1::2])  # rows never listed never move
    assert not torch.equal(a.weight.detach()[::2], init[::2])


def test_stochastic_rounding_matches_reference_and_is_unbiased():
    torch.manual_seed(4)
    R, D = 16, 64
    t = EngramTable(R, D, optimizer="sgd", dtype=torch.bfloat16, seed=11, lr=1.0, weight_decay=0.0)
    with torch.no_grad():
        t.weight.fill_(1.0)
    want = clone_state(t)
    rows = torch.arange(R)
    # A step of 1/8 bfloat16 ulp at 1.0: round-to-nearest would never move the weight.
    g = torch.full((R, D), -(2.0**-7) / 8)
    with torch.no_grad():
        te.ops.table_update(*state_tensors(t), rows, g, t.hparams, "sgd", t.seed)
    ref.table_update(*want, rows, g, t.hparams, "sgd", seed=11, maths=torch.float32)
    assert torch.equal(t.weight.detach(), want[0])
    moved = (t.weight.detach().float() - 1.0) / 2.0**-7
    assert 0.05 < float(moved.mean()) < 0.2  # E = 1/8 of an ulp
    rtn = EngramTable(R, D, optimizer="sgd", dtype=torch.bfloat16, stochastic_rounding=False, lr=1.0)
    with torch.no_grad():
        rtn.weight.fill_(1.0)
        te.ops.table_update(*state_tensors(rtn), rows, g, rtn.hparams, "sgd", -1)
    assert torch.equal(rtn.weight.detach(), torch.ones(R, D, dtype=torch.bfloat16))


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_state_bytes_per_row(optimizer):
    R, D = 1000, 64
    t = EngramTable(R, D, optimizer=optimizer, state_alloc="eager")
    nbytes = sum(b.numel() * b.element_size() for b in (t.momentum1, t.momentum2, t.row_step))
    assert nbytes == R * state_bytes_per_row(optimizer, D)
    assert state_bytes_per_row("adam", 64) / state_bytes_per_row("rowwise_adagrad", 64) > 60


# ---- the module and its training path ----------------------------------------------------------
class Net(nn.Module):
    def __init__(self, grad="fused", optimizer="adam", R=200, D=8, H=3, dtype=torch.float32, device="cpu"):
        super().__init__()
        self.table = EngramTable(R, D, grad=grad, optimizer=optimizer, dtype=dtype, device=device, seed=1)
        self.head = nn.Linear(H * D, 1, dtype=dtype, device=device)

    def forward(self, rows):
        return self.head(self.table(rows)).squeeze(-1)


def batch(step, R=200, H=3, device="cpu"):
    g = torch.Generator().manual_seed(step)
    rows = torch.randint(0, R, (4, 9, H), generator=g)
    return rows.to(device), torch.randn(4, 9, generator=g).to(device)


def train(model, opts, steps, start=0, device="cpu", micro=1):
    losses = []
    for s in range(start, start + steps):
        for o in opts:
            o.zero_grad()
        for k in range(micro):
            rows, y = batch(s * micro + k, device=device)
            loss = (model(rows) - y).square().mean()
            loss.backward()
            losses.append(loss.item())
        for o in opts:
            o.step()
    return losses


def fresh(grad="fused", optimizer="adam", device="cpu", **kw):
    torch.manual_seed(0)
    model = Net(grad, optimizer, device=device, **kw)
    return model, [o for o in optim.make_optimizers(model, base_lr=1e-2, weight_decay=0.1) if o is not None]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_three_gradient_modes_train_identically(device, optimizer):
    results = {}
    for grad in ("fused", "sparse", "dense"):
        model, opts = fresh(grad, optimizer, device)
        losses = train(model, opts, 4, device=device)
        results[grad] = (losses, [v.clone() for v in model.state_dict().values()])
        if grad == "fused":
            assert model.table.weight.grad is None  # no gradient tensor of the table, ever
    for grad in ("sparse", "dense"):
        assert results[grad][0] == results["fused"][0]
        assert all(torch.equal(a, b) for a, b in zip(results[grad][1], results["fused"][1]))


def test_recipe_lr_and_scheduler_reach_the_fused_update():
    model, (table_opt, rest_opt) = fresh()
    assert model.table.lr == pytest.approx(5e-2) and model.table.weight_decay == 0.0
    assert rest_opt.param_groups[0]["weight_decay"] == 0.1
    sched = torch.optim.lr_scheduler.LambdaLR(table_opt, lambda s: 0.5**s)
    sched.step()
    assert model.table.lr == pytest.approx(2.5e-2)
    model.table.set_hparams(lr=0.0)  # lr 0: a fused backward changes no weight
    before = model.table.weight.detach().clone()
    rows, y = batch(0)
    (model(rows) - y).square().mean().backward()
    assert torch.equal(model.table.weight, before) and int(model.table.step_count) == 1


def test_gradient_accumulation_semantics():
    # fused: each backward is an update; sparse/dense: one update with the summed gradient.
    fused, fused_opts = fresh("fused")
    train(fused, fused_opts, 2, micro=2)
    assert int(fused.table.step_count) == 4
    sparse, sparse_opts = fresh("sparse")
    train(sparse, sparse_opts, 2, micro=2)
    assert int(sparse.table.step_count) == 2
    # Dense accumulates the same summed gradient: the same single update, bit for bit.
    dense, dense_opts = fresh("dense")
    train(dense, dense_opts, 2, micro=2)
    assert int(dense.table.step_count) == 2 and torch.equal(dense.table.weight, sparse.table.weight)
    assert not torch.equal(fused.table.weight, sparse.table.weight)


def test_table_looked_up_twice_and_frozen_table():
    t = EngramTable(50, 4, lr=0.1)
    rows = torch.randint(0, 50, (2, 3, 2))
    (t(rows).sum() + t(rows).square().sum()).backward()  # two lookups: two updates, no version error
    assert int(t.step_count) == 2
    t.weight.requires_grad_(False)
    before = t.weight.detach().clone()
    with torch.enable_grad():
        x = torch.ones(1, requires_grad=True)
        (t(rows).sum() * x).backward()
    assert torch.equal(t.weight, before) and int(t.step_count) == 2


def test_clipping_sees_only_the_rest_of_the_model():
    def clipped(model_params):
        model, _opts = fresh()
        rows, y = batch(0)
        (model(rows) - y).square().mean().mul(100).backward()
        norm = torch.nn.utils.clip_grad_norm_(model_params(model), 0.1)
        return norm, [p.grad.clone() for p in model.head.parameters()]

    n_all, g_all = clipped(lambda m: m.parameters())
    n_rest, g_rest = clipped(lambda m: m.head.parameters())
    assert torch.equal(n_all, n_rest) and all(torch.equal(a, b) for a, b in zip(g_all, g_rest))
    assert float(n_all) > 0.1  # it did clip


def test_state_dict_round_trip_bitwise(tmp_path):
    model, opts = fresh(optimizer="partial_rowwise_adam")
    train(model, opts, 3)
    torch.save({"model": model.state_dict(), "opts": [o.state_dict() for o in opts]}, tmp_path / "t.pt")
    want = train(model, opts, 2, start=3)
    model2, opts2 = fresh(optimizer="partial_rowwise_adam")
    saved = torch.load(tmp_path / "t.pt", weights_only=True)
    model2.load_state_dict(saved["model"])
    for o, s in zip(opts2, saved["opts"]):
        o.load_state_dict(s)
    assert train(model2, opts2, 2, start=3) == want
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), model2.state_dict().values()))
    other = Net(optimizer="rowwise_adagrad")
    with pytest.raises(RuntimeError, match="size mismatch"):
        other.load_state_dict(model.state_dict())


def test_compile_fullgraph_fused_equals_eager_bitwise():
    torch._dynamo.reset()
    eager, eager_opts = fresh()
    comp, comp_opts = fresh()
    step_model = torch.compile(comp, fullgraph=True)
    for s in range(3):
        rows, y = batch(s)
        for o in eager_opts + comp_opts:
            o.zero_grad()
        (eager(rows) - y).square().mean().backward()
        (step_model(rows) - y).square().mean().backward()
        for o in eager_opts + comp_opts:
            o.step()
    for (k, a), b in zip(eager.state_dict().items(), comp.state_dict().values()):
        assert torch.equal(a, b), k
    assert int(comp.table.step_count) == 3


def test_engram_layer_compiles_with_fused_table():
    cfg = one_layer_config()
    torch.manual_seed(0)
    a = te.Engram(cfg, 1, 16, hasher=te.NgramHasher(cfg))
    b = te.Engram(cfg, 1, 16, hasher=te.NgramHasher(cfg))
    b.load_state_dict(a.state_dict())
    compiled = torch.compile(b, fullgraph=True, backend="aot_eager")
    ids = torch.randint(0, 50, (2, 9))
    hidden = torch.randn(2, 9, 16)
    for _ in range(2):
        a(hidden, input_ids=ids).square().sum().backward()
        compiled(hidden, input_ids=ids).square().sum().backward()
    assert torch.equal(a.table.weight, b.table.weight) and torch.equal(a.table.momentum1, b.table.momentum1)
    assert a.table.weight.grad is None and int(b.table.step_count) == 2


# ---- op contracts and errors -------------------------------------------------------------------
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_opcheck(optimizer):
    t = state(optimizer, 20, 4, "cpu")
    rows = torch.randint(0, 20, (3, 2))
    grad_e = torch.randn(3, 8)
    hp = hparams(**HP)
    torch.library.opcheck(
        torch.ops.engram.table_update.default,
        (*clone_state(t), torch.tensor([1, 5, 7]), torch.randn(3, 4), hp, optimizer, -1),
    )
    torch.library.opcheck(
        torch.ops.engram._multihead_gather_fused_update.default, (grad_e, rows, *clone_state(t), hp, optimizer, -1)
    )
    w = t.weight.detach().clone()
    torch.library.opcheck(
        torch.ops.engram.multihead_gather_fused.default,
        (w, rows, *clone_state(t)[1:], hp, optimizer, -1),
        test_utils=("test_schema", "test_faketensor"),
    )


def test_errors():
    t = state("adam", 10, 4, "cpu")
    s = clone_state(t)
    hp = hparams()
    rows, g = torch.tensor([1, 3]), torch.randn(2, 4)
    with torch.no_grad():
        with pytest.raises(RuntimeError, match="optimizer must be one of"):
            te.ops.table_update(*s, rows, g, hp, "lamb")
        with pytest.raises(RuntimeError, match=r"momentum2 must have shape \[10\] for optimizer 'partial_rowwise"):
            te.ops.table_update(*s, rows, g, hp, "partial_rowwise_adam")
        with pytest.raises(RuntimeError, match="rows must be strictly increasing"):
            te.ops.table_update(*s, torch.tensor([3, 1]), g, hp, "adam")
        with pytest.raises(RuntimeError, match=r"rows must lie in \[0, num_rows=10\)"):
            te.ops.table_update(*s, torch.tensor([1, 10]), g, hp, "adam")
        with pytest.raises(RuntimeError, match="hparams must be a float64 CPU tensor"):
            te.ops.table_update(*s, rows, g, hp.float(), "adam")
        with pytest.raises(RuntimeError, match=r"beta1 must lie in \[0, 1\)"):
            te.ops.table_update(*s, rows, g, hparams(betas=(1.0, 0.9)), "adam")
        with pytest.raises(RuntimeError, match=r"stochastic rounding .* is for bfloat16 weights"):
            te.ops.table_update(*s, rows, g, hp, "adam", 3)
        with pytest.raises(RuntimeError, match=r"grads must be \[U=2, d_head=4\]"):
            te.ops.table_update(*s, rows, torch.randn(2, 5), hp, "adam")
        with pytest.raises(RuntimeError, match=r"rows must lie in \[0, 10\)"):
            torch.ops.engram._multihead_gather_fused_update(torch.randn(1, 4), torch.tensor([[12]]), *s, hp, "adam", -1)
    before = clone_state(t)
    with pytest.raises(RuntimeError, match="not differentiable"):
        te.ops.table_update(t.weight, *s[1:], rows, g, hp, "adam")  # grad mode on, weight requires grad
    assert all(torch.equal(a, b) for a, b in zip(clone_state(t), before))
    for kw, msg in [
        (dict(grad="lazy"), "grad must be one of"),
        (dict(optimizer="lamb"), "optimizer must be one of"),
        (dict(placement="ring"), "placement must be one of"),
        (dict(lr=-1.0), "lr must be finite"),
        (dict(stochastic_rounding=True), "stochastic_rounding is for bfloat16"),
        (dict(state_dtype=torch.float16), "state_dtype must be"),
    ]:
        with pytest.raises(ValueError, match=msg):
            EngramTable(10, 4, **kw)
    sparse = EngramTable(10, 4, grad="dense")
    sparse.weight.grad = torch.zeros(10, 4)
    with pytest.raises(RuntimeError, match="no lookup was recorded"):
        sparse.step()
    sparse.zero_grad()
    sparse(torch.tensor([[1, 2]])).sum().backward()
    sparse.step()
    assert int(sparse.step_count) == 1 and not sparse._pending_rows


@pytest.mark.skipif(not HAS_PROC, reason="needs Linux /proc")
def test_on_touch_state_takes_no_memory_until_rows_are_updated():
    # 2M x 64 float32: the weight (488 MiB) is written by its init, the Adam state (977 MiB) must
    # not be: a fresh table's state is zero without touching a page.
    before = rss_mib()
    t = EngramTable(2_000_000, 64, optimizer="adam")
    grown = rss_mib() - before
    assert grown < 488 + 120, grown
    t(torch.randint(0, 2_000_000, (64, 4))).sum().backward()  # 256 rows: a few pages of state
    assert rss_mib() - before < 488 + 130
    t.reset_parameters()  # after updates the state is reset (and written) again
    assert int(t.step_count) == 0 and float(t.momentum1.abs().max()) == 0.0


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_module_casts_keep_the_state_dtypes(optimizer):
    t = EngramTable(50, 4, optimizer=optimizer)
    rows = torch.randint(0, 50, (3, 2))
    t.double()
    assert t.weight.dtype == torch.float64 and all(b.dtype == torch.float64 for b in (t.momentum1, t.momentum2))
    t(rows).sum().backward()
    t.bfloat16()  # bfloat16 weights keep float32 state (the maths dtype)
    assert t.weight.dtype == torch.bfloat16 and all(b.dtype == torch.float32 for b in (t.momentum1, t.momentum2))
    t(rows).sum().backward()
    assert int(t.step_count) == 2
    b = EngramTable(50, 4, optimizer=optimizer, dtype=torch.bfloat16, state_dtype=torch.bfloat16).float()
    if optimizer in ("adam", "partial_rowwise_adam"):
        assert b.momentum1.dtype == torch.bfloat16  # asked for: kept
    b(rows).sum().backward()


def test_fused_update_under_create_graph():
    t = EngramTable(30, 4, lr=0.1)
    before = t.weight.detach().clone()
    x = torch.ones(1, requires_grad=True)
    (t(torch.tensor([[1, 2]])).sum() * x).backward(create_graph=True)
    assert int(t.step_count) == 1 and not torch.equal(t.weight, before) and x.grad is not None
