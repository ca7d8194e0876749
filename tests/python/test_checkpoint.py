"""Atomic checkpoints: tables and their optimizer state round-trip, resuming reproduces the next
steps bit for bit on the CPU, and a failed save leaves the previous checkpoint intact."""

import os

import pytest
import torch
from torch import nn

import torch_engram  # noqa: F401
from torch_engram import EngramTable, checkpoint, optim


class Model(nn.Module):
    # 5000 x 64 float32 tables put the Adam state on the zero-on-touch (mmap) path.
    def __init__(self, rows=5000, d=64, dtype=torch.float32, grad="fused", optimizer="adam"):
        super().__init__()
        self.emb = EngramTable(rows, d, grad=grad, optimizer=optimizer, dtype=dtype, seed=5)
        self.drop = nn.Dropout(0.3)
        self.head = nn.Linear(2 * d, 1, dtype=dtype)

    def forward(self, ids):
        return self.head(self.drop(self.emb(ids.view(*ids.shape[:-1], -1, 2)))).squeeze(-1)


def _data(step, rows=5000):
    g = torch.Generator().manual_seed(step)
    return torch.randint(0, rows, (8, 16), generator=g), torch.randn(8, 8, generator=g)


def _run(model, opts, sched, start, stop):
    for s in range(start, stop):
        ids, target = _data(s)
        loss = (model(ids).float() - target).square().mean()
        for o in opts:
            o.zero_grad()
        loss.backward()
        for o in opts:
            o.step()
        sched.step()


def _fresh(dtype, grad="fused", optimizer="adam"):
    torch.manual_seed(0)
    model = Model(dtype=dtype, grad=grad, optimizer=optimizer)
    table_opt, rest_opt = optim.make_optimizers(model, base_lr=1e-3, weight_decay=0.1)
    # One schedule over both: the table's lr reaches its fused update through the param group.
    sched = torch.optim.lr_scheduler.StepLR(_Both(table_opt, rest_opt), step_size=2, gamma=0.5)
    return model, [table_opt, rest_opt], sched


class _Both(torch.optim.Optimizer):
    """Both optimizers' param groups under one scheduler."""

    def __init__(self, *opts):
        self.opts, self.defaults, self.state = opts, {}, {}

    @property
    def param_groups(self):  # read anew: loading a state_dict replaces an optimizer's groups
        return [g for o in self.opts for g in o.param_groups]


@pytest.mark.parametrize(
    "grad, optimizer", [("fused", "adam"), ("sparse", "partial_rowwise_adam"), ("dense", "rowwise_adagrad")]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_resume_is_bitwise(tmp_path, dtype, grad, optimizer):
    model, opts, sched = _fresh(dtype, grad, optimizer)
    _run(model, opts, sched, 0, 3)
    path = tmp_path / "ckpt.pt"
    checkpoint.save_checkpoint(path, model, opts, extra={"step": 3, "sched": sched.state_dict()})
    _run(model, opts, sched, 3, 6)
    want = {k: v.clone() for k, v in model.state_dict().items()}
    want_lr = [g["lr"] for g in opts[0].param_groups]

    torch.manual_seed(1234)  # the checkpoint's RNG state must win over this
    model2, opts2, sched2 = _fresh(dtype, grad, optimizer)
    extra = checkpoint.load_checkpoint(path, model2, opts2)
    sched2.load_state_dict(extra["sched"])
    assert extra["step"] == 3
    _run(model2, opts2, sched2, extra["step"], 6)
    for k, v in model2.state_dict().items():
        assert torch.equal(v, want[k]), k
    assert model2.emb.momentum1.dtype == torch.float32  # float32 state of a bfloat16 table stays float32
    assert [g["lr"] for g in opts2[0].param_groups] == want_lr and model2.emb.lr == want_lr[0]


def test_interrupted_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    model, opts, sched = _fresh(torch.float32)
    _run(model, opts, sched, 0, 2)
    path = tmp_path / "ckpt.pt"
    checkpoint.save_checkpoint(path, model, opts, extra={"step": 2})
    saved = path.read_bytes()
    _run(model, opts, sched, 2, 3)

    real_save = torch.save

    def dies_mid_write(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 partial checkpoint bytes")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", dies_mid_write)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.save_checkpoint(path, model, opts, extra={"step": 3})

    def interrupted(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save_checkpoint(path, model, opts, extra={"step": 3})
    monkeypatch.setattr(torch, "save", real_save)

    assert path.read_bytes() == saved
    assert os.listdir(tmp_path) == ["ckpt.pt"]  # no temporary file left behind
    model2, opts2, _ = _fresh(torch.float32)
    assert checkpoint.load_checkpoint(path, model2, opts2)["step"] == 2


def test_optimizer_structure_must_match(tmp_path):
    model, opts, _ = _fresh(torch.float32)
    path = tmp_path / "c.pt"
    checkpoint.save_checkpoint(path, model, {"tables": opts[0], "rest": opts[1]})
    with pytest.raises(ValueError, match="optimizers must match the saved ones"):
        checkpoint.load_checkpoint(path, model, {"tables": opts[0]})
    with pytest.raises(ValueError, match="optimizers must match the saved ones"):
        checkpoint.load_checkpoint(path, model, opts)
    checkpoint.load_checkpoint(path, model, {"rest": opts[1], "tables": opts[0]})
    checkpoint.save_checkpoint(path, model, [opts[0], None])
    with pytest.raises(ValueError, match="optimizer 1 is given but the checkpoint has none"):
        checkpoint.load_checkpoint(path, model, opts)
    torch.save({"model": {}}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="is not a torch_engram checkpoint"):
        checkpoint.load_checkpoint(tmp_path / "other.pt", model)


def test_failed_load_changes_nothing(tmp_path):
    # Another hidden size: the table matches, the head does not. Nothing may change.
    model, opts, _ = _fresh(torch.float32)
    _run(model, opts, _Sched(), 0, 2)
    checkpoint.save_checkpoint(tmp_path / "a.pt", model, opts)
    torch.manual_seed(7)
    other = Model(d=64)
    other.head = nn.Linear(2 * 64, 2)
    other_opts = [o for o in optim.make_optimizers(other, base_lr=1e-3) if o is not None]
    before = {k: v.clone() for k, v in other.state_dict().items()}
    opt_before = [o.state_dict() for o in other_opts]
    with pytest.raises(
        ValueError,
        match=r"'head.bias' is \(1,\) torch.float32 in the checkpoint but "
        r"\(2,\)",
    ):
        checkpoint.load_checkpoint(tmp_path / "a.pt", other, other_opts)
    assert all(torch.equal(v, before[k]) for k, v in other.state_dict().items())
    assert [o.state_dict()["param_groups"] for o in other_opts] == [s["param_groups"] for s in opt_before]
    # An optimizer that does not fit (another parameter count) is refused before the model changes.
    small = Model()
    small_opts = [optim.make_optimizers(small, base_lr=1e-3)[0], torch.optim.AdamW(list(small.head.parameters())[:1])]
    before = {k: v.clone() for k, v in small.state_dict().items()}
    with pytest.raises(ValueError):
        checkpoint.load_checkpoint(tmp_path / "a.pt", small, small_opts)
    assert all(torch.equal(v, before[k]) for k, v in small.state_dict().items())
    with pytest.raises(ValueError, match="missing keys"):
        checkpoint.load_checkpoint(tmp_path / "a.pt", nn.Linear(2, 2))


class _Sched:
    def step(self):
        pass


_SAVER = r"""
import sys, torch
sys.path.insert(0, sys.argv[2])
from torch_engram import EngramTable, checkpoint, optim
from torch import nn
torch.manual_seed(0)
model = nn.Sequential(EngramTable(20000, 32, seed=1), nn.Linear(64, 1))
opts = [o for o in optim.make_optimizers(model, base_lr=1e-3) if o is not None]
step = 0
while True:
    with torch.no_grad():
        model[0].weight.add_(1.0)  # every save differs from the previous one
    step += 1
    checkpoint.save_checkpoint(sys.argv[1], model, opts, extra={"step": step})
    print(step, flush=True)
"""


def test_kill_9_during_saves_leaves_a_loadable_checkpoint(tmp_path):
    # SIGKILL at random points of a stream of saves (20 trials): the file at the path is always a
    # whole checkpoint, never a torn one, and it holds the weights of the step it says.
    import random
    import signal
    import subprocess
    import sys
    import time

    from conftest import package_root

    src = package_root()
    path = tmp_path / "ckpt.pt"
    rng = random.Random(0)
    for _trial in range(20):
        proc = subprocess.Popen([sys.executable, "-c", _SAVER, str(path), src], stdout=subprocess.PIPE, text=True)
        try:
            assert proc.stdout.readline().strip() == "1"  # one complete save, then kill at a random point
            time.sleep(rng.uniform(0.0, 0.3))
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        model = nn.Sequential(EngramTable(20000, 32, seed=1), nn.Linear(64, 1))
        opts = [o for o in optim.make_optimizers(model, base_lr=1e-3) if o is not None]
        extra = checkpoint.load_checkpoint(path, model, opts)
        assert extra["step"] >= 1
        torch.manual_seed(0)
        want = EngramTable(20000, 32, seed=1).weight.detach()  # the saver's initial weights
        for _ in range(extra["step"]):
            want.add_(1.0)
        assert torch.equal(model[0].weight, want)  # the weights of exactly the step it says
        leftovers = [p.name for p in tmp_path.iterdir() if p.name != "ckpt.pt"]
        for name in leftovers:  # a killed save may leave its temporary file, never a torn target
            assert name.startswith(".ckpt.pt.") and name.endswith(".tmp")
            (tmp_path / name).unlink()
