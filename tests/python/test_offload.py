"""Host- and file-placed EngramTables: training through the row cache (eviction, write-back,
prefetch on a background thread) gives the same losses, weights and optimizer state, bit for
bit, as the same training with the table on the device; adversarial cache schedules; sparse
file creation; lazy initialisation; checkpoints."""

import os
import time

import pytest
import torch

import torch_engram as te
from conftest import one_layer_config
from torch_engram import EngramTable, checkpoint

R, D, H = 4000, 16, 4


def zipf_rows(step, n=48, power=3.0):
    g = torch.Generator().manual_seed(1000 + step)
    return (torch.rand(n, H, generator=g) ** power * R).long().clamp_(max=R - 1)


def tables(placement, tmp_path, cache_rows, policy="lru", **kw):
    torch.manual_seed(0)
    ref = EngramTable(R, D, lr=0.05, **kw)
    path = str(tmp_path / "table.bin") if placement == "file" else None
    t = EngramTable(R, D, lr=0.05, placement=placement, cache_rows=cache_rows, path=path, cache_policy=policy, **kw)
    t.load_state_dict(ref.state_dict())
    return ref, t


def train(table, schedule, prefetch=False, dtype=torch.float32, micro=1):
    # grad="sparse"/"dense": the table's own step() after every `micro` backward passes.
    torch.manual_seed(1)
    proj = torch.nn.Linear(H * D, 1, dtype=dtype)
    losses = []
    for s, rows in enumerate(schedule):
        e = table(rows)
        if prefetch and s + 1 < len(schedule):
            table.prefetch(schedule[s + 1])
        loss = proj(e).square().mean()
        loss.backward()
        losses.append(loss.item())
        if table.grad_mode != "fused" and (s + 1) % micro == 0:
            table.step()
            table.zero_grad()
    return losses, {k: v.clone() for k, v in table.state_dict().items()}


def assert_same_training(ref, t, schedule, prefetch, dtype=torch.float32, micro=1):
    l_ref, s_ref = train(ref, schedule, dtype=dtype, micro=micro)
    l_t, s_t = train(t, schedule, prefetch=prefetch, dtype=dtype, micro=micro)
    assert l_t == l_ref
    for k in ("weight", "momentum1", "momentum2", "row_step", "step_count"):
        assert torch.equal(s_t[k], s_ref[k]), k


@pytest.mark.parametrize("optimizer", ["adam", "partial_rowwise_adam", "rowwise_adagrad", "sgd"])
@pytest.mark.parametrize("placement", ["host", "file"])
@pytest.mark.parametrize("prefetch", [False, True])
def test_cached_training_equals_device_training_bitwise(tmp_path, optimizer, placement, prefetch):
    # 60 Zipf steps, a cache far smaller than the rows touched: thousands of evictions.
    ref, t = tables(placement, tmp_path, cache_rows=400, optimizer=optimizer)
    schedule = [zipf_rows(s) for s in range(60)]
    assert_same_training(ref, t, schedule, prefetch)
    stats = t.cache_stats()
    assert stats["evictions"] > 1000 and stats["hits"] > 0
    assert stats["misses"] > stats["evictions"]  # the first misses filled free slots


@pytest.mark.parametrize("grad", ["sparse", "dense"])
@pytest.mark.parametrize("placement", ["host", "file"])
@pytest.mark.parametrize("micro", [1, 3])
def test_sparse_and_dense_gradients_over_cache_slots(tmp_path, grad, placement, micro):
    # The gradient names cache slots; the slots of every forward since the last step() stay
    # pinned, so accumulating 3 micro-batches before the update is exact too.
    for dtype, sr in ((torch.float32, None), (torch.bfloat16, True)):
        ref, t = tables(
            placement, tmp_path, cache_rows=700, grad=grad, optimizer="adam", dtype=dtype, stochastic_rounding=sr
        )
        assert_same_training(ref, t, [zipf_rows(s) for s in range(30)], prefetch=True, dtype=dtype, micro=micro)
        assert t.cache_stats()["evictions"] > 0


@pytest.mark.parametrize("policy", ["lru", "lfu"])
def test_bfloat16_and_both_policies(tmp_path, policy):
    ref, t = tables("host", tmp_path, cache_rows=400, policy=policy, dtype=torch.bfloat16, stochastic_rounding=False)
    assert_same_training(ref, t, [zipf_rows(s) for s in range(40)], prefetch=True, dtype=torch.bfloat16)


@pytest.mark.parametrize("placement", ["host", "file"])
def test_bfloat16_stochastic_rounding_is_keyed_by_table_row(tmp_path, placement):
    # The fused update draws its rounding bits for the row a slot holds (row_ids), so a cached
    # bfloat16 table rounds exactly as the same table on the device.
    ref, t = tables(placement, tmp_path, cache_rows=400, dtype=torch.bfloat16, optimizer="adam")
    assert t.stochastic_rounding and ref.stochastic_rounding
    assert_same_training(ref, t, [zipf_rows(s) for s in range(40)], prefetch=True, dtype=torch.bfloat16)


def test_adversarial_schedules(tmp_path):
    # The same rows in every step (updated in step t, read in step t + 1), rows that are all misses
    # (disjoint steps), and a cache exactly as large as two steps' unique rows (the pinned set).
    same = [torch.arange(40).view(10, H)] * 6
    disjoint = [torch.arange(40 * s, 40 * (s + 1)).view(10, H) for s in range(6)]
    mixed = [same[0], disjoint[1], same[0], disjoint[3], disjoint[4], same[0]]
    schedule = same + disjoint + mixed
    for prefetch in (False, True):
        ref, t = tables("host", tmp_path, cache_rows=120, optimizer="adam")  # 3 steps of 40 rows
        assert_same_training(ref, t, schedule, prefetch)
        ref, t = tables("file", tmp_path, cache_rows=80 if not prefetch else 120, optimizer="adam")
        assert_same_training(ref, t, schedule, prefetch)


def test_a_cache_too_small_for_the_pinned_rows_says_so(tmp_path):
    _, t = tables("host", tmp_path, cache_rows=50)
    t(torch.arange(40).view(10, H)).sum().backward()
    with pytest.raises(RuntimeError, match=r"too small for this step.*raise cache_rows"):
        t(torch.arange(40, 80).view(10, H))  # 40 new rows, only 10 slots are not pinned
    # The failed fetch changed nothing: the next fetch of the cached rows is all hits.
    before = t.cache_stats()
    t(torch.arange(40).view(10, H))
    assert t.cache_stats()["misses"] == before["misses"]


def test_file_table_larger_than_ram_is_created_sparse(tmp_path):
    # 48 GiB of bfloat16 rows (d_head 64 and Adam state: 392 bytes a record) on a 24 GiB machine:
    # nothing is written, and the file takes no disk until rows are.
    rows = 48 * 2**30 // 128
    t0 = time.perf_counter()
    t = EngramTable(
        rows,
        64,
        dtype=torch.bfloat16,
        stochastic_rounding=False,
        placement="file",
        path=str(tmp_path / "big.bin"),
        cache_rows=4096,
        optimizer="adam",
    )
    assert time.perf_counter() - t0 < 10
    st = os.stat(tmp_path / "big.bin")
    assert st.st_size >= 48 * 2**30 and st.st_blocks * 512 < 2**20
    e = t(torch.tensor([[0, rows - 1, 12345, 7]]))
    e.float().square().sum().backward()
    assert os.stat(tmp_path / "big.bin").st_blocks * 512 < 2**24


def test_lazy_initialisation_depends_on_the_seed_only(tmp_path):
    a = EngramTable(R, D, placement="host", cache_rows=64, seed=3)
    b = EngramTable(R, D, placement="file", path=str(tmp_path / "b.bin"), cache_rows=64, seed=3)
    c = EngramTable(R, D, placement="host", cache_rows=64, seed=4)
    with torch.no_grad():
        ea = a(torch.tensor([[5, 9, 3000, 1]]))
        b(torch.tensor([[3000, 2, 2, 2]]))  # another order of first fetches
        eb = b(torch.tensor([[5, 9, 3000, 1]]))
        ec = c(torch.tensor([[5, 9, 3000, 1]]))
    assert torch.equal(ea, eb) and not torch.equal(ea, ec)
    assert 0.5 < float(ea.std()) < 1.5  # N(0, init_std^2)


def test_checkpoint_round_trip_of_a_file_table(tmp_path):
    _, t = tables("file", tmp_path, cache_rows=400, optimizer="adam")
    train(t, [zipf_rows(s) for s in range(10)])
    checkpoint.save_checkpoint(tmp_path / "ckpt.pt", torch.nn.ModuleDict({"t": t}))
    expect = {k: v.clone() for k, v in t.state_dict().items()}
    train(t, [zipf_rows(s) for s in range(10, 15)])  # move on, then restore
    u = EngramTable(R, D, lr=0.05, optimizer="adam", placement="file", path=str(tmp_path / "u.bin"), cache_rows=400)
    checkpoint.load_checkpoint(tmp_path / "ckpt.pt", torch.nn.ModuleDict({"t": u}))
    got = u.state_dict()
    for k, v in expect.items():
        assert torch.equal(got[k], v), k


def test_checkpoint_of_a_large_sparse_file_table_streams_its_records(tmp_path):
    # A 1 GiB file table of which a few thousand rows were trained: the checkpoint holds its
    # record file as a sparse copy next to it (a few MB of disk, never the table in memory), and
    # a later save replaces it; it loads back bit for bit into a file table.
    big = 2**30 // (D * 4 * 3)  # weight + Adam moments per row: 1 GiB of records
    kw = dict(lr=0.05, optimizer="adam", placement="file", cache_rows=400)
    t = EngramTable(big, D, path=str(tmp_path / "t.bin"), **kw)
    train(t, [zipf_rows(s) * (big // R) for s in range(6)])
    ckpt = tmp_path / "ckpt.pt"
    checkpoint.save_checkpoint(ckpt, torch.nn.ModuleDict({"t": t}))
    rows_files = sorted(p for p in tmp_path.iterdir() if p.name.endswith(".rows"))
    assert len(rows_files) == 1
    st = rows_files[0].stat()
    assert st.st_size >= 2**30 and st.st_blocks * 512 < 64 * 2**20  # sparse: holes stay holes
    assert ckpt.stat().st_size < 2**20  # the payload only names the file
    looked = zipf_rows(99) * (big // R)
    with torch.no_grad():
        want = t(looked)
    train(t, [zipf_rows(s) * (big // R) for s in range(6, 8)])
    checkpoint.save_checkpoint(ckpt, torch.nn.ModuleDict({"t": t}))
    now = sorted(p for p in tmp_path.iterdir() if p.name.endswith(".rows"))
    assert len(now) == 1 and now != rows_files  # the previous checkpoint's file is gone
    with torch.no_grad():
        want2 = t(looked)
    assert not torch.equal(want2, want)
    state = {k: t.state_dict()[k].clone() for k in ("momentum1", "row_step", "step_count")}
    train(t, [zipf_rows(s) * (big // R) for s in range(8, 9)])  # move on, then restore
    u = EngramTable(big, D, path=str(tmp_path / "u.bin"), **kw)
    checkpoint.load_checkpoint(ckpt, torch.nn.ModuleDict({"t": u}))
    with torch.no_grad():
        assert torch.equal(u(looked), want2)
    got = u.state_dict()
    for k, v in state.items():
        assert torch.equal(got[k], v), k
    # Into a table of another placement or layout: a clear error, nothing changed.
    dev = EngramTable(big // 64, D, optimizer="adam")
    with pytest.raises(ValueError, match="missing keys"):
        checkpoint.load_checkpoint(ckpt, torch.nn.ModuleDict({"t": dev}))
    other = EngramTable(
        big, D, lr=0.05, optimizer="sgd", placement="file", cache_rows=400, path=str(tmp_path / "o.bin")
    )
    with pytest.raises(ValueError, match="record layout"):
        checkpoint.load_checkpoint(ckpt, torch.nn.ModuleDict({"t": other}))
    for p in now:
        p.unlink()
    with pytest.raises(ValueError, match="which is missing next to"):
        checkpoint.load_checkpoint(ckpt, torch.nn.ModuleDict({"t": u}))


def test_engram_layer_with_a_host_table_and_prefetch():
    torch.manual_seed(0)
    cfg = one_layer_config()
    hasher = te.NgramHasher(cfg)
    dev = te.Engram(cfg, 1, 16, hasher=hasher)
    host = te.Engram(cfg, 1, 16, hasher=hasher, table_options=dict(placement="host", cache_rows=512))
    host.load_state_dict(dev.state_dict())
    ids = [torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(s)) for s in range(4)]
    x = torch.randn(2, 12, 16)
    for s in range(4):
        outs = []
        for mod in (dev, host):
            out = mod(x, input_ids=ids[s])
            if mod is host and s + 1 < 4:
                mod.prefetch(ids[s + 1])
            out.square().sum().backward()
            outs.append(out)
        assert torch.equal(outs[0], outs[1])
    assert torch.equal(dev.state_dict()["table.weight"], host.state_dict()["table.weight"])


def test_cached_placements_reject_what_they_do_not_support(tmp_path):
    with pytest.raises(ValueError, match="cache_rows"):
        EngramTable(R, D, placement="host")
    with pytest.raises(ValueError, match="path="):
        EngramTable(R, D, placement="file", cache_rows=10)
    with pytest.raises(ValueError, match="cache_policy"):
        EngramTable(R, D, placement="host", cache_rows=10, cache_policy="fifo")


_TRAINER = r"""
import sys, torch
sys.path.insert(0, sys.argv[2])
from torch import nn
from torch_engram import EngramTable, checkpoint

R, D, H = 4000, 16, 4


def batch(step):
    g = torch.Generator().manual_seed(1000 + step)
    return (torch.rand(48, H, generator=g) ** 3 * R).long().clamp_(max=R - 1)


def train_step(table, step):
    coef = torch.linspace(-1, 1, H * D)
    (table(batch(step)) * coef).square().mean().backward()


def fresh(placement, path=None):
    torch.manual_seed(0)
    init = EngramTable(R, D, lr=0.05, optimizer="adam")
    if placement == "device":
        return init
    t = EngramTable(R, D, lr=0.05, optimizer="adam", placement="file", path=path, cache_rows=400)
    t.load_state_dict(init.state_dict())
    return t


if __name__ == "__main__":
    table = fresh("file", sys.argv[3])
    model = nn.ModuleDict({"t": table})
    for step in range(1, 10_000):
        train_step(table, step)
        if step % 2 == 0:
            checkpoint.save_checkpoint(sys.argv[1], model, extra={"step": step})
            print(step, flush=True)
"""


def test_kill_9_during_file_table_training_resumes_exactly(tmp_path):
    # SIGKILL at random points of training and saving a file table (20 trials): the last checkpoint
    # loads, and resuming from it gives, bit for bit, the uninterrupted run's table and state.
    import random
    import signal
    import subprocess
    import sys
    import time

    from conftest import package_root

    helpers: dict = {}
    exec(compile(_TRAINER, "trainer", "exec"), helpers)  # the same data and steps as the child
    ckpt = tmp_path / "ckpt.pt"
    rng = random.Random(0)
    for trial in range(20):
        proc = subprocess.Popen(
            [sys.executable, "-c", _TRAINER, str(ckpt), package_root(), str(tmp_path / "live.bin")],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert proc.stdout.readline().strip() == "2"  # one checkpoint, then kill at a random point
            time.sleep(rng.uniform(0.0, 0.4))
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        resumed = helpers["fresh"]("file", str(tmp_path / f"resumed{trial}.bin"))
        extra = checkpoint.load_checkpoint(ckpt, torch.nn.ModuleDict({"t": resumed}))
        k = extra["step"]
        assert k >= 2 and k % 2 == 0
        for step in range(k + 1, k + 4):
            helpers["train_step"](resumed, step)
        ref = helpers["fresh"]("device")
        for step in range(1, k + 4):
            helpers["train_step"](ref, step)
        got, want = resumed.state_dict(), ref.state_dict()
        for name in ("weight", "momentum1", "momentum2", "row_step", "step_count"):
            assert torch.equal(got[name], want[name]), (trial, k, name)
        os.remove(tmp_path / f"resumed{trial}.bin")
        for p in tmp_path.iterdir():  # a killed save may leave its temporary file
            if p.name.startswith(".ckpt.pt.") and p.name.endswith(".tmp"):
                p.unlink()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible")
@pytest.mark.parametrize("grad", ["fused", "sparse"])
@pytest.mark.parametrize("prefetch", [False, True])
def test_cuda_cache_of_a_pinned_host_table_equals_the_device_table(grad, prefetch):
    # The cache and its bookkeeping on the GPU, the records in pinned host memory read and written
    # by the cache kernels; prefetch on a side stream.
    torch.manual_seed(0)
    kw = dict(lr=0.05, optimizer="adam", grad=grad, device="cuda")
    ref = EngramTable(R, D, **kw)
    t = EngramTable(R, D, placement="host", cache_rows=400, **kw)
    t.load_state_dict(ref.state_dict())
    assert t._store.records.is_pinned() and t.weight.is_cuda
    schedule = [zipf_rows(s).cuda() for s in range(40)]
    for table in (ref, t):
        torch.manual_seed(1)
        proj = torch.nn.Linear(H * D, 1, device="cuda")
        table.losses = []
        for s, rows in enumerate(schedule):
            e = table(rows)
            if prefetch and s + 1 < len(schedule):
                table.prefetch(schedule[s + 1])
            loss = proj(e).square().mean()
            loss.backward()
            table.losses.append(loss.item())
            if grad != "fused":
                table.step()
                table.zero_grad()
    assert t.losses == ref.losses
    got, want = t.state_dict(), ref.state_dict()
    for k in ("weight", "momentum1", "momentum2", "row_step", "step_count"):
        assert torch.equal(got[k].cpu(), want[k].cpu()), k
    assert t.cache_stats()["evictions"] > 0
