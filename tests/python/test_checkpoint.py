"""Atomic checkpoints: tables and their lazy Adam state round-trip, resuming reproduces the next
steps bit for bit on the CPU, and a failed save leaves the previous checkpoint intact."""

import os

import pytest
import torch
from torch import nn

import torch_engram  # noqa: F401
from torch_engram import checkpoint, optim
from test_optim import _Tiny, _batch, needs_gather


class Model(nn.Module):
    # 5000 x 64 float32 tables put the Adam state on the zero-on-touch (mmap) path.
    def __init__(self, rows=5000, d=64, dtype=torch.float32):
        super().__init__()
        self.emb = nn.Embedding(rows, d, sparse=True, dtype=dtype)
        optim.mark_table(self.emb.weight)
        self.drop = nn.Dropout(0.3)
        self.head = nn.Linear(d, 1, dtype=dtype)

    def forward(self, ids):
        return self.head(self.drop(self.emb(ids))).squeeze(-1)


def _data(step, rows=5000):
    g = torch.Generator().manual_seed(step)
    return torch.randint(0, rows, (8, 16), generator=g), torch.randn(8, 16, generator=g)


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


def _fresh(dtype):
    torch.manual_seed(0)
    model = Model(dtype=dtype)
    table_opt, rest_opt = optim.make_optimizers(model, base_lr=1e-3, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.StepLR(rest_opt, step_size=2, gamma=0.5)
    return model, [table_opt, rest_opt], sched


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_resume_is_bitwise(tmp_path, dtype):
    model, opts, sched = _fresh(dtype)
    _run(model, opts, sched, 0, 3)
    path = tmp_path / "ckpt.pt"
    checkpoint.save_checkpoint(path, model, opts, extra={"step": 3, "sched": sched.state_dict()})
    _run(model, opts, sched, 3, 6)
    want = {k: v.clone() for k, v in model.state_dict().items()}
    want_state = {k: v.clone() for k, v in opts[0].state[model.emb.weight].items()}

    torch.manual_seed(1234)  # the checkpoint's RNG state must win over this
    model2, opts2, sched2 = _fresh(dtype)
    extra = checkpoint.load_checkpoint(path, model2, opts2)
    sched2.load_state_dict(extra["sched"])
    assert extra["step"] == 3
    _run(model2, opts2, sched2, extra["step"], 6)
    for k, v in model2.state_dict().items():
        assert torch.equal(v, want[k]), k
    state = opts2[0].state[model2.emb.weight]
    assert state["exp_avg"].dtype == torch.float32
    for k, v in state.items():
        assert torch.equal(v, want_state[k]), k


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


@needs_gather
def test_fused_resume_is_bitwise(tmp_path):
    def fresh():
        model = _Tiny("fused")
        return model, optim.make_optimizers(model, base_lr=1e-2, weight_decay=0.01)

    def run(model, opts, start, stop):
        for s in range(start, stop):
            ids, target = _batch(s)
            for o in opts:
                o.zero_grad()
            (model(ids) - target).square().mean().backward()
            for o in opts:
                o.step()

    model, opts = fresh()
    run(model, opts, 0, 3)
    checkpoint.save_checkpoint(tmp_path / "f.pt", model, opts)
    run(model, opts, 3, 5)
    model2, opts2 = fresh()
    checkpoint.load_checkpoint(tmp_path / "f.pt", model2, opts2)
    run(model2, opts2, 3, 5)
    assert torch.equal(model2.table, model.table) and torch.equal(model2.head.weight, model.head.weight)
