"""Smoke run of the rho sweep (two training steps, tiny model) and its training/eval pieces."""

import csv
import importlib.util
import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from torch_engram.experiment.allocation import count_params
from torch_engram.experiment.models import ModelConfig, TransformerLM, load_model
from torch_engram.experiment.models.training import TrainConfig, evaluate, lr_factor, make_optimizers, sample_batch
from torch_engram.experiment.sweep import (
    CSV_COLUMNS,
    PRESETS,
    SweepData,
    build_parser,
    main,
    preset_from_args,
    run_sweep,
)

pytestmark = pytest.mark.usefixtures("one_thread")
V = 96


def tiny_preset(**changes):
    p = replace(
        PRESETS["quick"],
        model={
            "d_model": 32,
            "n_layers": 3,
            "n_heads": 2,
            "max_seq_len": 16,
            "n_routed_experts": 10,
            "top_k": 2,
            "d_expert": 16,
            "d_shared": 96,
            "routing": "softmax",
            "aux_loss_coef": 0.01,
        },
        engram={
            "max_ngram_size": 3,
            "n_embed_per_ngram": 8,
            "n_head_per_ngram": 2,
            "use_conv": True,
            "proj_bias": False,
            "gate_eps": None,
            "conv_eps": 1e-5,
            "seed": 0,
        },
        train=TrainConfig(steps=2, batch_size=2, seq_len=16, warmup_steps=1, eval_batch_size=4),
        rhos=(1.0, 0.8, 0.5),
        seeds=(0, 1),
    )
    return replace(p, **changes)


def synthetic_data(seed=0):
    g = torch.Generator().manual_seed(seed)
    text_ids = torch.randint(1, V, (3000,), generator=g)
    lut = torch.arange(V) * 2 // 3  # a surjective compression, as the tokenizer LUT would be
    return SweepData(
        train=text_ids[:2500],
        val=torch.cat([torch.zeros(1, dtype=torch.int64), text_ids[2500:]]),
        val_bytes=1500,
        vocab_size=V,
        lut=lut,
        pad_id=0,
        sep_id=0,
        description="synthetic",
    )


def test_two_step_sweep_writes_csv_json_png(tmp_path):
    preset = tiny_preset()
    result = run_sweep(preset, synthetic_data(), tmp_path, progress=False, label="smoke")
    with open(tmp_path / "results.csv") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == CSV_COLUMNS
        rows = list(reader)
    assert len(rows) == len(preset.rhos) * len(preset.seeds)
    assert sorted({float(r["rho"]) for r in rows}) == sorted(preset.rhos)
    for r in rows:
        assert math.isfinite(float(r["val_loss"])) and float(r["val_loss"]) > 0
        # bpb = nats / ln 2 / bytes; the stream predicts 500 tokens from 1500 bytes.
        assert float(r["val_bpb"]) == pytest.approx(float(r["val_loss"]) * 500 / math.log(2) / 1500, rel=1e-4)
        assert abs(float(r["P_tot_error"])) <= 0.01 and abs(float(r["P_act_error"])) <= 0.01
        assert int(r["steps"]) == 2 and int(r["tokens"]) == 2 * 2 * 16
        if float(r["rho"]) == 1.0:
            assert r["engram_vocab_size"] == "-" and int(r["P_engram_tables"]) == 0
        else:
            assert int(r["P_engram_tables"]) > 0
    experts = {float(r["rho"]): int(r["n_routed_experts"]) for r in rows}
    assert experts[1.0] == 10 and experts[1.0] > experts[0.8] > experts[0.5]
    saved = json.loads((tmp_path / "results.json").read_text())
    assert [s["rho"] for s in saved["summary"]] == [1.0, 0.8, 0.5]
    assert all(s["n_seeds"] == 2 for s in saved["summary"])
    assert saved["targets"]["P_tot"] == result["targets"]["P_tot"]
    png = (tmp_path / "sweep.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    # Every run's final model is saved and loads without the sweep: same validation loss.
    data = synthetic_data()
    for r in rows:
        model, _, extra = load_model(tmp_path / r["model_dir"])
        assert extra["run"]["val_loss"] == float(r["val_loss"])
        assert (model.hasher is None) == (float(r["rho"]) == 1.0)
        nats, n = evaluate(model, data.val, preset.train.seq_len, preset.train.eval_batch_size)
        assert round(nats / n, 6) == pytest.approx(float(r["val_loss"]), abs=2e-6)


def test_no_save(tmp_path):
    run_sweep(tiny_preset(rhos=(0.5,), seeds=(0,)), synthetic_data(), tmp_path, progress=False, save_models=False)
    assert not (tmp_path / "models").exists()
    with open(tmp_path / "results.csv") as f:
        assert [r["model_dir"] for r in csv.DictReader(f)] == [""]


def test_combine_equals_one_run_over_all_seeds(tmp_path):
    data = synthetic_data()
    one = run_sweep(tiny_preset(rhos=(1.0, 0.5)), data, tmp_path / "both", progress=False)
    for seed in (0, 1):
        run_sweep(tiny_preset(rhos=(1.0, 0.5), seeds=(seed,)), data, tmp_path / f"s{seed}", progress=False)
    merged = main(["--combine", str(tmp_path / "s0"), str(tmp_path / "s1"), "--out", str(tmp_path / "merged")])
    for a, b in zip(one["summary"], merged["summary"]):
        assert a["rho"] == b["rho"] and b["n_seeds"] == 2
        assert a["val_loss_mean"] == pytest.approx(b["val_loss_mean"], abs=2e-6)
        assert a["val_loss_std"] == pytest.approx(b["val_loss_std"], abs=2e-6)
    assert (tmp_path / "merged" / "sweep.png").exists()
    with pytest.raises(SystemExit, match="appears in both"):
        main(["--combine", str(tmp_path / "s0"), str(tmp_path / "both"), "--out", str(tmp_path / "bad")])


def test_cli_on_user_text_files(tmp_path):
    # The whole path: text files -> split -> BPE -> compression LUT -> allocation -> train -> eval.
    words = [
        "the",
        "quick",
        "brown",
        "fox",
        "jumps",
        "over",
        "the",
        "lazy",
        "dog",
        "while",
        "a",
        "cat",
        "naps",
        "in",
        "warm",
        "sun",
    ]
    g = torch.Generator().manual_seed(0)
    for i in range(6):
        picks = torch.randint(0, len(words), (600,), generator=g).tolist()
        (tmp_path / f"doc{i}.txt").write_text(" ".join(words[j] for j in picks) + "\n")
    out = tmp_path / "out"
    result = main(
        [
            "--text-files",
            *(str(tmp_path / f"doc{i}.txt") for i in range(6)),
            "--steps",
            "2",
            "--rhos",
            "1,0.6",
            "--batch-size",
            "2",
            "--seq-len",
            "32",
            "--out",
            str(out),
            "--no-progress",
            "--device",
            "cpu",
        ]
    )
    with open(out / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [float(r["rho"]) for r in rows] == [1.0, 0.6]
    assert all(math.isfinite(float(r["val_bpb"])) for r in rows)
    saved = json.loads((out / "results.json").read_text())
    assert saved["data"]["compressed_vocab_size"] < saved["data"]["vocab_size"]
    assert saved["total_wall_s"] >= saved["wall_s"] and "--text-files" in saved["command"]
    assert (out / "sweep.png").stat().st_size > 5000
    assert result["summary"][0]["rho"] == 1.0
    # The generation example on the sweep's Engram model (saved with its tokenizer): the same
    # tokens with the decode state as by recomputation, greedy and sampled.
    spec = importlib.util.spec_from_file_location(
        "generate_example", Path(__file__).parents[2] / "examples/generate.py"
    )
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    for extra in ([], ["--temperature", "0.9", "--top-k", "5", "--batch", "3"]):
        got = example.main(["--sweep", str(out), "--prompt", "the lazy fox", "--tokens", "12", *extra])
        assert got["same"] and len(got["tokens"][0]) == 12
    with pytest.raises(ValueError, match="d_head % 32 == 0"):  # the quick preset's d_head is 16
        example.main(["--sweep", str(out), "--fp8"])


def test_same_seed_same_batches_whatever_the_model():
    stream = torch.arange(1000)
    a = sample_batch(stream, 4, 8, torch.Generator().manual_seed(3))
    b = sample_batch(stream, 4, 8, torch.Generator().manual_seed(3))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], a[0] + 1)
    with pytest.raises(ValueError, match=r"seq_len \+ 1 = 9 tokens, got 5"):
        sample_batch(torch.arange(5), 1, 8, torch.Generator())


def test_evaluate_covers_every_position():
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=V,
        d_model=32,
        n_layers=2,
        n_heads=2,
        max_seq_len=64,
        n_routed_experts=4,
        top_k=2,
        d_expert=8,
        d_shared=16,
    )
    model = TransformerLM(cfg)
    stream = torch.randint(0, V, (50,))
    nats, n = evaluate(model, stream, seq_len=64, batch_size=4)
    assert n == 49
    with torch.no_grad():
        logits = model(stream[None, :-1]).logits[0]
    assert nats == pytest.approx(F.cross_entropy(logits, stream[1:], reduction="sum").item(), rel=1e-5)
    nats_w, n_w = evaluate(model, stream, seq_len=16, batch_size=2)  # 3 full windows + a tail of 1
    assert n_w == 49 and math.isfinite(nats_w)


def _engram_model(table_grad="fused", table_optimizer="adam"):
    from torch_engram.experiment.allocation import allocate
    from torch_engram.experiment.sweep import base_configs

    data = synthetic_data()
    base, template = base_configs(tiny_preset(), data)
    torch.manual_seed(0)
    cfg = allocate(base, 0.5, template).config
    return TransformerLM(cfg, lut=data.lut, table_grad=table_grad, table_optimizer=table_optimizer), data


@pytest.mark.parametrize("table_optimizer", ["adam", "rowwise_adagrad"])
def test_optimizer_groups_follow_the_recipe(table_optimizer):
    from torch_engram.optim import TableOptimizer

    tc = TrainConfig(lr=1e-3, table_lr_mult=5.0, weight_decay=0.1, table_optimizer=table_optimizer)
    model, _ = _engram_model(table_optimizer=table_optimizer)
    dense, tables = make_optimizers(model, tc)
    assert type(tables) is TableOptimizer and type(dense) is torch.optim.AdamW
    engrams = model.engram_modules()
    assert [g["lr"] for g in tables.param_groups] == [5e-3] * len(engrams)
    assert all(g["weight_decay"] == 0.0 for g in tables.param_groups)
    assert [e.table.lr for e in engrams] == [5e-3] * len(engrams)
    assert all(e.table.optimizer == table_optimizer for e in engrams)
    assert [p for g in tables.param_groups for p in g["params"]] == [e.table.weight for e in engrams]
    decay, no_decay = dense.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0 and decay["lr"] == 1e-3
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    n_opt = sum(p.numel() for g in dense.param_groups + tables.param_groups for p in g["params"])
    assert n_opt == sum(p.numel() for p in model.parameters())


def test_fused_sparse_and_dense_tables_train_alike():
    from torch_engram.experiment.models.training import train

    tc = TrainConfig(steps=3, batch_size=2, seq_len=16, warmup_steps=1)
    results = []
    for table_grad in ("fused", "sparse", "dense"):
        model, data = _engram_model(table_grad)
        before = [t.detach().clone() for t in model.table_parameters()]
        train(model, data.train, tc, seed=0, aux_loss_coef=0.01)
        results.append([t.detach().clone() for t in model.state_dict().values()])
        after = model.table_parameters()
        moved = [(t != b).any(dim=1) for t, b in zip(after, before)]
        # Lazy Adam: only looked-up rows move, and a short run looks up few of them.
        assert all(0 < int(m.sum()) < m.numel() for m in moved)
    # The same sums in the same order and the same update: bit for bit, weights and state.
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))


def test_lr_schedule():
    tc = TrainConfig(steps=100, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_factor(0, tc) == pytest.approx(0.1) and lr_factor(9, tc) == pytest.approx(1.0)
    assert lr_factor(10, tc) == pytest.approx(1.0) and lr_factor(100, tc) == pytest.approx(0.1)
    assert all(lr_factor(s, tc) >= lr_factor(s + 1, tc) for s in range(10, 100))


def test_cli_budget_options():
    args = build_parser().parse_args(["--preset", "quick", "--tokens", "100000", "--rhos", "1,0.5", "--seeds", "0,1"])
    p = preset_from_args(args)
    assert p.train.steps == math.ceil(100000 / p.train.tokens_per_step)
    assert p.rhos == (1.0, 0.5) and p.seeds == (0, 1)
    assert p.train.table_optimizer == "partial_rowwise_adam" and p.train.table_grad == "fused"
    p = preset_from_args(
        build_parser().parse_args(
            ["--steps", "7", "--seq-len", "300", "--table-optimizer", "rowwise_adagrad", "--table-grad", "sparse"]
        )
    )
    assert p.train.steps == 7 and p.train.seq_len == 300 and p.model["max_seq_len"] == 300
    assert p.train.table_optimizer == "rowwise_adagrad" and p.train.table_grad == "sparse"
    assert p.train.warmup_steps <= 7
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--steps", "5", "--tokens", "10"])


def test_presets_meet_the_paper_shape():
    for name, p in PRESETS.items():
        assert 1.0 in p.rhos and len(p.rhos) >= 5, name
        base = ModelConfig(vocab_size=p.tokenizer_vocab, **p.model)
        c = count_params(base)
        assert c.total / c.active > 4, name
    full = PRESETS["full"]
    c = count_params(ModelConfig(vocab_size=full.tokenizer_vocab, **full.model))
    assert 8 < c.total / c.active < 12  # the paper's P_tot / P_act ~ 10
