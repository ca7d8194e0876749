"""Row-sharded EngramTables on torch.distributed (gloo, 2 and 4 processes on the CPU): the forward
equals the single-process table bit for bit, 20 training steps with the same global batch equal
single-process training, and bad ids on one rank fail every rank with a clear error, in bounded
time."""

import subprocess
import sys

import pytest
import torch

from conftest import package_root, tiny_lm_config
from torch_engram import EngramTable
from torch_engram.sharded import init_shard_, shard_bounds

R, D, H, B, STEPS = 1003, 8, 4, 6, 20  # 1003 rows: uneven shards on 2 and 4 ranks

_WORKER = r"""
import sys, torch
import torch.distributed as dist
sys.path.insert(0, sys.argv[1])
from torch_engram import EngramTable

rank, world, init, out, mode = int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5], sys.argv[6]
R, D, H, B, STEPS = 1003, 8, 4, 6, 20
dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
torch.set_num_threads(1)


def batch(step):
    g = torch.Generator().manual_seed(100 + step)
    return (torch.rand(world * B, H, generator=g) ** 3 * R).long().clamp_(max=R - 1)


coef = torch.linspace(-1, 1, H * D)
opt, _, reduce = sys.argv[7].partition(":")
t = EngramTable(R, D, optimizer=opt, lr=0.05, placement="sharded", init_std=0.5, seed=3, shard_grad=reduce or "sum")
res = {"start": t._shard.start, "rows": t._shard.rows, "init": t.weight.detach().clone()}
try:
    if mode.startswith("save") or mode.startswith("load"):
        from torch_engram import sharded
        ckpt = sys.argv[8]
        if mode.startswith("load"):
            sharded.dcp_load(torch.nn.ModuleDict({"t": t}), ckpt)
        else:
            for step in range(3):
                (t(batch(step)[rank * B : (rank + 1) * B]) * coef).square().sum().backward()
        if mode in ("save", "load+save"):
            sharded.dcp_save(torch.nn.ModuleDict({"t": t}), sys.argv[9] if mode == "load+save" else ckpt)
        res |= {"weight": t.weight.detach(), "m1": t.momentum1, "m2": t.momentum2, "row_step": t.row_step,
                "step": t.step_count}
    elif mode == "bad":
        rows = batch(0)[rank * B : (rank + 1) * B]
        if rank == 1:
            rows[2, 1] = R  # out of range on one rank only
        t(rows)
    else:
        for step in range(STEPS):
            e = t(batch(step)[rank * B : (rank + 1) * B])
            if step == 0:
                res["e0"] = e.detach().clone()
            (e * coef).square().sum().backward()
        res |= {"weight": t.weight.detach(), "m1": t.momentum1, "m2": t.momentum2, "row_step": t.row_step,
                "step": t.step_count}
except RuntimeError as exc:
    res["error"] = str(exc)
torch.save(res, out)
dist.destroy_process_group()
# The results are written: leave without the interpreter's teardown, where a gloo or checkpoint
# thread of torch still alive now and then aborts the process (std::terminate of a joinable thread).
import os
os._exit(0)
"""


def run_ranks(tmp_path, world, mode="train", optimizer="adam", extra=()):
    init = tmp_path / f"init-{mode}-{world}"

    def args(r):
        out = str(tmp_path / f"out{r}.pt")
        return [sys.executable, "-c", _WORKER, package_root(), str(r), str(world), str(init), out, mode, optimizer,
                *extra]  # fmt: skip

    procs = [subprocess.Popen(args(r), stderr=subprocess.PIPE, text=True) for r in range(world)]
    for p in procs:
        try:
            _, err = p.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise AssertionError("a rank hung") from None
        assert p.returncode == 0, err[-2000:]
    return [torch.load(tmp_path / f"out{r}.pt") for r in range(world)]


def reference(world, optimizer="adam"):
    optimizer, _, reduce = optimizer.partition(":")
    torch.manual_seed(0)
    t = EngramTable(R, D, optimizer=optimizer, lr=0.05, init_std=0.5, seed=3)
    init_shard_(t.weight.data, 0, 0.5, 3)  # the sharded init, whole
    coef = torch.linspace(-1, 1, H * D)
    e0 = None
    for step in range(STEPS):
        g = torch.Generator().manual_seed(100 + step)
        rows = (torch.rand(world * B, H, generator=g) ** 3 * R).long().clamp_(max=R - 1)
        e = t(rows)
        if step == 0:
            e0 = e.detach().clone()
        # The sum over ranks of their losses ("sum"), or its mean over the ranks ("mean").
        ((e * coef).square().sum() / (world if reduce == "mean" else 1)).backward()
    return t, e0


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("optimizer", ["adam", "rowwise_adagrad", "sgd:mean"])
def test_sharded_training_equals_one_process(tmp_path, world, optimizer):
    outs = run_ranks(tmp_path, world, optimizer=optimizer)
    ref, e0 = reference(world, optimizer)
    bounds = shard_bounds(R, world)
    init = torch.empty(R, D)
    init_shard_(init, 0, 0.5, 3)
    for r, o in enumerate(outs):
        lo, hi = bounds[r], bounds[r + 1]
        assert (o["start"], o["rows"]) == (lo, hi - lo)
        assert torch.equal(o["init"], init[lo:hi])  # the init does not depend on the world size
        assert torch.equal(o["e0"], e0[r * B : (r + 1) * B])  # forward: bit for bit
        assert int(o["step"]) == STEPS
        # After 20 updates: equal within float rounding. A row's gradient is summed per rank, then
        # over ranks ((a + b) + (c + d) instead of ((a + b) + c) + d), so the last bits may differ.
        torch.testing.assert_close(o["weight"], ref.weight.detach()[lo:hi], atol=1e-7, rtol=1e-6)
        if optimizer != "sgd:mean":
            torch.testing.assert_close(o["m1"], ref.momentum1[lo:hi], atol=1e-6, rtol=1e-5)
        if optimizer == "adam":
            torch.testing.assert_close(o["m2"], ref.momentum2[lo:hi], atol=1e-7, rtol=1e-5)
            assert torch.equal(o["row_step"], ref.row_step[lo:hi])
    moved = torch.cat([o["weight"] for o in outs]) - init
    assert float(moved.abs().max()) > 1e-3  # the tables did train


def test_bad_rows_on_one_rank_fail_every_rank(tmp_path):
    outs = run_ranks(tmp_path, 2, mode="bad")
    for o in outs:
        assert "rows must lie in [0, 1003), but rank(s) [1] got rows outside" in o["error"]
    assert "this rank's rows hold 1003" in outs[1]["error"]


def test_sharded_needs_a_process_group():
    with pytest.raises(ValueError, match="init_process_group"):
        EngramTable(R, D, placement="sharded")


def test_checkpoints_reshard_from_4_to_2_to_1_and_back(tmp_path):
    # torch.distributed.checkpoint: saved on 4 ranks (after 3 updates), loaded on 2 and on 1, saved
    # again on 1 and loaded back on 4: every shard's weight and Adam state bit for bit.
    a, b = str(tmp_path / "ckpt4"), str(tmp_path / "ckpt1")
    four = run_ranks(tmp_path, 4, "save", extra=(a,))
    whole = {k: torch.cat([o[k] for o in four]) for k in ("weight", "m1", "m2", "row_step")}
    for world, mode, extra in ((2, "load", (a,)), (1, "load+save", (a, b)), (4, "load", (b,))):
        outs = run_ranks(tmp_path, world, mode, extra=extra)
        bounds = shard_bounds(R, world)
        for r, o in enumerate(outs):
            lo, hi = bounds[r], bounds[r + 1]
            for k in whole:
                assert torch.equal(o[k], whole[k][lo:hi]), (world, r, k)
            assert int(o["step"]) == 3


@pytest.mark.parametrize("dense", ["ddp", "fsdp"])
def test_data_parallel_example_follows_one_process(tmp_path, dense):
    # examples/train_sharded.py under torchrun: 2 ranks (sharded tables; the rest under DDP or
    # FSDP2, the MoE balance loss over the global batch) follow one process with the same global
    # batch, up to float rounding.
    import json
    import os
    from pathlib import Path

    script = Path(__file__).parents[2] / "examples" / "train_sharded.py"
    env = {**os.environ, "PYTHONPATH": package_root() + os.pathsep + os.environ.get("PYTHONPATH", "")}
    got = {}
    for n in (1, 2):
        out = tmp_path / f"run{n}.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n), str(script),
               "--steps", "6", "--dense", dense, "--max-bytes", "400000", "--json", str(out)]  # fmt: skip
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr[-3000:]
        got[n] = json.loads(out.read_text())
    assert got[2]["world"] == 2 and got[2]["dense"] == dense
    # MoE routing turns the rounding differences of the reductions into small jumps: 1e-3 of ~9.
    torch.testing.assert_close(torch.tensor(got[2]["losses"]), torch.tensor(got[1]["losses"]), atol=1e-3, rtol=0)
    assert abs(got[2]["val_loss"] - got[1]["val_loss"]) < 1e-2  # after the jumps add up over 6 steps
    assert got[1]["losses"][-1] < got[1]["losses"][0]


def test_sweep_under_torchrun_follows_one_process(tmp_path):
    # `torchrun --nproc-per-node 2 -m torch_engram.sweep` (tables sharded, the rest under DDP) gives
    # the curve of one process with the same global batch (--nproc-per-node 1), and its saved
    # models are whole: the tables of both runs' models agree row for row.
    import csv
    import os
    from pydoc_data.topics import topics

    from torch_engram.experiment.models import load_model

    texts = tmp_path / "texts"
    texts.mkdir()
    for name in sorted(topics)[:40]:
        (texts / f"{name}.txt").write_text(topics[name])
    env = {**os.environ, "PYTHONPATH": package_root() + os.pathsep + os.environ.get("PYTHONPATH", "")}
    runs = {}
    for n in (1, 2):
        out = tmp_path / f"sweep{n}"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n), "-m", "torch_engram.sweep",
               "--text-files", str(texts), "--rhos", "1,0.6", "--steps", "4", "--batch-size", "4",
               "--seq-len", "32", "--no-progress", "--out", str(out)]  # fmt: skip
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, res.stderr[-3000:]
        with open(out / "results.csv") as f:
            runs[n] = list(csv.DictReader(f))
    assert [r["rho"] for r in runs[2]] == ["1.0", "0.6"]
    for one, two in zip(runs[1], runs[2]):
        assert one["engram_rows"] == two["engram_rows"] and one["tokens"] == two["tokens"]
        assert abs(float(one["val_loss"]) - float(two["val_loss"])) < 2e-3, (one, two)
        assert abs(float(one["train_loss"]) - float(two["train_loss"])) < 2e-3, (one, two)
    m1, _, _ = load_model(tmp_path / "sweep1" / runs[1][1]["model_dir"])
    m2, _, _ = load_model(tmp_path / "sweep2" / runs[2][1]["model_dir"])
    s1, s2 = m1.state_dict(), m2.state_dict()
    tables = [k for k in s1 if k.endswith("table.weight")]
    assert tables and s1.keys() == s2.keys()
    for k in tables:
        assert s1[k].shape == s2[k].shape
        torch.testing.assert_close(s2[k], s1[k], atol=1e-4, rtol=0)


def test_data_parallel_refuses_tables_that_are_not_sharded():
    # Their fused updates would see one rank's rows only and the copies would drift apart.
    from torch_engram.experiment.models import TransformerLM
    from torch_engram.experiment.models.training import DataParallel

    cfg = tiny_lm_config(64)
    model = TransformerLM(cfg)
    with pytest.raises(ValueError, match="placement='sharded'"):
        DataParallel(rank=0, world=2, device=torch.device("cpu")).wrap(model)
