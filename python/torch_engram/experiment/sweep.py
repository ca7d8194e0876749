"""The rho allocation sweep (docs/SPEC.md section 8) at small scale: one model per rho with the same
P_tot and P_act, data, token budget, hyperparameters and seeds; held-out loss and bits per byte.

    python -m torch_engram.sweep --preset quick            # CPU, minutes
    python -m torch_engram.sweep --preset full --device cuda
    torchrun --nproc-per-node 2 -m torch_engram.sweep ...  # data parallel (gloo, or NCCL on GPUs)

Writes results.csv, results.json and sweep.png (validation loss vs rho) to --out. Under torchrun
every model trains data-parallel (training.DataParallel: the same global batches, tables sharded
over the ranks, the rest under DDP), which follows one process with the same global batch
(`torchrun --nproc-per-node 1`) up to float rounding; rank 0 writes the outputs.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import EngramConfig
from ..sharded import full_state_dict
from .allocation import Allocation, allocate, count_params
from .models.config import ModelConfig, default_engram_layers
from .models.saving import save_model
from .models.training import DataParallel, TrainConfig, evaluate, train
from .models.transformer import TransformerLM

PAPER_OPTIMUM = (0.75, 0.80)


# Presets ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Preset:
    """Everything a sweep fixes: the base (rho = 1) model, the Engram shape, data and training."""

    model: dict  # ModelConfig fields except vocab_size and engram
    engram: dict  # EngramConfig fields except engram_vocab_size, layer_ids and pad_id
    engram_layers: tuple[int, ...] | None  # None: default_engram_layers(n_layers)
    train: TrainConfig
    rhos: tuple[float, ...]
    seeds: tuple[int, ...]
    tokenizer_vocab: int  # BPE vocabulary trained on the training split (when no --tokenizer)
    val_fraction: float
    max_val_tokens: int  # validation keeps whole documents up to this many tokens (0: all)
    max_bytes: int | None  # cap on the corpus size read (None: everything)
    threads: int | None = None  # torch CPU threads unless --threads says (None: torch's default)
    notes: str = ""


PRESETS: dict[str, Preset] = {
    # 2-core CPU, about 6 minutes for 6 rhos. P_tot/P_act ~ 4.4 (the paper uses ~10; a wider
    # expert pool is too slow here). Engram: orders 2-3, 4 heads per order, d_head 16.
    "quick": Preset(
        model={
            "d_model": 128,
            "n_layers": 4,
            "n_heads": 4,
            "max_seq_len": 128,
            "n_routed_experts": 32,
            "top_k": 2,
            "d_expert": 64,
            "d_shared": 256,
            "routing": "softmax",
            "aux_loss_coef": 0.01,
        },
        engram={
            "max_ngram_size": 3,
            "n_embed_per_ngram": 64,
            "n_head_per_ngram": 4,
            "use_conv": True,
            "proj_bias": False,
            "gate_eps": None,
            "conv_eps": 1e-5,
            "seed": 0,
        },
        engram_layers=None,
        train=TrainConfig(steps=200, batch_size=16, seq_len=128, lr=3e-3, warmup_steps=20),
        # One thread: on a shared 2-core machine, two OpenMP threads stall (5-10x slower) as soon
        # as anything else runs; alone they would be ~1.5x faster. --threads 2 to try.
        # Down to 0.1, so that both sides of the U are in reach (docs/SWEEP.md).
        rhos=(1.0, 0.8, 0.6, 0.4, 0.2, 0.1),
        seeds=(0,),
        tokenizer_vocab=2048,
        val_fraction=0.05,
        max_val_tokens=32768,
        max_bytes=6_000_000,
        threads=1,
        notes="2-core CPU, ~10 min",
    ),
    # One GPU. P_tot ~ 10 x P_act as in the paper: 8 blocks of D = 512, 80 experts of width 256,
    # top-4, shared expert 512; Engram orders 2-3, 8 heads per order, d_head 32.
    "full": Preset(
        model={
            "d_model": 512,
            "n_layers": 8,
            "n_heads": 8,
            "max_seq_len": 512,
            "n_routed_experts": 80,
            "top_k": 4,
            "d_expert": 256,
            "d_shared": 512,
            "routing": "softmax",
            "aux_loss_coef": 0.01,
        },
        engram={
            "max_ngram_size": 3,
            "n_embed_per_ngram": 256,
            "n_head_per_ngram": 8,
            "use_conv": True,
            "proj_bias": False,
            "gate_eps": None,
            "conv_eps": 1e-5,
            "seed": 0,
        },
        engram_layers=None,
        train=TrainConfig(steps=4000, batch_size=32, seq_len=512, lr=1.5e-3, warmup_steps=200, table_grad="fused"),
        rhos=(1.0, 0.9, 0.8, 0.7, 0.6, 0.4),
        seeds=(0, 1),
        tokenizer_vocab=16384,
        val_fraction=0.02,
        max_val_tokens=1_000_000,
        max_bytes=None,
        notes="one GPU",
    ),
}


# Data ------------------------------------------------------------------------------------------
@dataclass
class SweepData:
    train: torch.Tensor  # int64 token stream, each document followed by <eos>
    val: torch.Tensor  # int64 token stream, starting with <eos> so that every text token is predicted
    val_bytes: int  # UTF-8 bytes of the validation documents (for bits per byte)
    vocab_size: int  # model vocabulary = tokenizer length
    lut: torch.Tensor  # tokenizer-compression LUT (docs/SPEC.md section 1)
    pad_id: int  # raw id hashed before the sequence start
    sep_id: int
    description: str = ""
    info: dict = field(default_factory=dict)
    tokenizer: object = None  # the tokenizers.Tokenizer, saved with each model


def prepare_data(preset: Preset, text_files=None, tokenizer=None, seed: int = 0) -> SweepData:
    """Documents (the built-in offline corpus, or --text-files) -> split by whole documents ->
    tokenizer (a byte-level BPE trained on the training split, unless given) -> compression LUT ->
    token streams. The validation stream is cut to preset.max_val_tokens whole documents."""
    from ..tokenizer import build_compression
    from . import corpus

    if text_files:
        docs = corpus.load_text_files(text_files, max_bytes=preset.max_bytes)
        source = f"{len(text_files)} text file(s)"
    else:
        docs = corpus.load_documents(max_bytes=preset.max_bytes)
        source = f"built-in corpus ({', '.join(corpus.available_sources())})"
    if len(docs) < 2:
        raise SystemExit(
            f"sweep: need at least 2 documents to split into train/val, got {len(docs)} "
            "(give several files, or a directory of files)"
        )
    train_docs, val_docs = corpus.split_train_val(docs, val_fraction=preset.val_fraction, seed=seed)
    if tokenizer is None:
        tok = corpus.train_bpe_tokenizer(train_docs, vocab_size=preset.tokenizer_vocab)
        tok_desc = f"byte-level BPE trained on the training split (vocab {preset.tokenizer_vocab})"
    elif tokenizer == "default":
        tok, tok_desc = corpus.default_tokenizer(vocab_size=preset.tokenizer_vocab), "default tokenizer"
    else:
        from tokenizers import Tokenizer

        tok, tok_desc = Tokenizer.from_file(str(tokenizer)), str(tokenizer)
    eos = tok.token_to_id("<eos>")
    pad = tok.token_to_id("<pad>")
    if eos is None:
        raise SystemExit("sweep: the tokenizer needs an '<eos>' token to separate documents")
    pad = eos if pad is None else pad
    if preset.max_val_tokens:
        kept, total = [], 0
        for d, n in zip(val_docs, (len(e.ids) + 1 for e in tok.encode_batch(val_docs, add_special_tokens=False))):
            if kept and total + n > preset.max_val_tokens:
                break
            kept.append(d)
            total += n
        val_docs = kept
    compression = build_compression(tok)
    train_stream = corpus.encode_documents(tok, train_docs, eos_id=eos)
    val_stream = corpus.encode_documents(tok, val_docs, eos_id=eos)
    val_ids = torch.cat([torch.tensor([eos], dtype=torch.int64), val_stream.ids])
    vocab = tok.get_vocab_size(with_added_tokens=True)
    return SweepData(
        train=train_stream.ids,
        val=val_ids,
        val_bytes=val_stream.num_bytes,
        vocab_size=vocab,
        lut=compression.lut,
        pad_id=pad,
        sep_id=eos,
        tokenizer=tok,
        description=f"{source}: {len(train_docs)} train / {len(val_docs)} val documents; {tok_desc}",
        info={
            "train_tokens": train_stream.ids.numel(),
            "val_tokens": val_ids.numel(),
            "val_bytes": val_stream.num_bytes,
            "vocab_size": vocab,
            "compressed_vocab_size": compression.num_compressed,
            "compression_ratio": round(compression.ratio, 4),
        },
    )


# Sweep -----------------------------------------------------------------------------------------
CSV_COLUMNS = [
    "rho",
    "rho_realised",
    "seed",
    "n_routed_experts",
    "top_k",
    "d_shared",
    "engram_vocab_size",
    "engram_rows",
    "P_tot",
    "P_act",
    "P_tot_error",
    "P_act_error",
    "P_routed",
    "P_engram_tables",
    "P_engram_dense",
    "steps",
    "tokens",
    "train_loss",
    "val_loss",
    "val_bpb",
    "train_s",
    "wall_s",
    "model_dir",
]


def base_configs(preset: Preset, data: SweepData) -> tuple[ModelConfig, EngramConfig]:
    base = ModelConfig(vocab_size=data.vocab_size, **preset.model)
    layers = preset.engram_layers or default_engram_layers(base.n_layers)
    template = EngramConfig(
        engram_vocab_size=(2,) * (preset.engram["max_ngram_size"] - 1),
        layer_ids=layers,
        pad_id=data.pad_id,
        **preset.engram,
    )
    return base, template


def summarise(rows: list[dict]) -> list[dict]:
    """Per rho: mean and sample standard deviation over seeds."""
    out = []
    for rho in sorted({r["rho"] for r in rows}, reverse=True):
        sel = [r for r in rows if r["rho"] == rho]
        entry = {"rho": rho, "rho_realised": sel[0]["rho_realised"], "n_seeds": len(sel)}
        for key in ("val_loss", "val_bpb", "train_loss"):
            vals = [r[key] for r in sel]
            entry[f"{key}_mean"] = statistics.fmean(vals)
            entry[f"{key}_std"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
        out.append(entry)
    return out


def plot(summary: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    ax.axvspan(*PAPER_OPTIMUM, color="tab:orange", alpha=0.2, label="paper optimum (rho 0.75-0.80)")
    xs = [s["rho_realised"] for s in summary]
    ys = [s["val_loss_mean"] for s in summary]
    es = [s["val_loss_std"] for s in summary]
    ax.errorbar(xs, ys, yerr=es, marker="o", capsize=4, color="tab:blue", label="validation loss")
    base = [s for s in summary if s["rho"] == 1.0]
    if base:
        ax.axhline(base[0]["val_loss_mean"], color="gray", ls="--", lw=1, label="pure MoE (rho = 1)")
    ax.set_xlabel("rho (share of sparse parameters in routed experts)")
    ax.set_ylabel("validation loss (nats / token)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _bar(iterable, total=None, desc=None, leave=True, enabled=True):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, leave=leave, dynamic_ncols=True)


def run_sweep(
    preset: Preset,
    data: SweepData,
    out_dir: Path,
    device: str = "cpu",
    engram_factory=None,
    autocast_dtype: torch.dtype | None = None,
    progress: bool = True,
    label: str = "",
    save_models: bool = True,
    dp: DataParallel | None = None,
) -> dict:
    """Train and evaluate every (rho, seed) model of the preset; results.csv/.json and sweep.png
    go to out_dir, and with save_models each final model to out_dir/models/rho<rho>_seed<seed>
    (torch_engram.experiment.models.load_model reads it back). With dp every rank calls this; the
    models train data-parallel and rank 0 writes (a saved model is whole, as one process saves it)."""
    t_start = time.perf_counter()
    writer = dp is None or dp.rank == 0
    progress = progress and writer
    if dp is not None and engram_factory is not None:
        raise ValueError("run_sweep: data parallel builds its own (sharded) Engram tables; pass no engram_factory")
    if writer:
        out_dir.mkdir(parents=True, exist_ok=True)
    base, template = base_configs(preset, data)
    target = count_params(base)
    allocs: list[Allocation] = [allocate(base, rho, template) for rho in preset.rhos]
    if progress:
        print(f"[sweep] {data.description}; {data.info}", file=sys.stderr)
        print(
            f"[sweep] targets: P_tot={target.total:,} P_act={target.active:,} "
            f"(ratio {target.total / target.active:.2f})",
            file=sys.stderr,
        )
        for a in allocs:
            s = a.summary()
            print(
                f"[sweep] rho={a.rho:.3f} (realised {s['rho_realised']:.3f}): "
                f"E={s['n_routed_experts']} d_shared={s['d_shared']} engram_vocab={s['engram_vocab_size']} "
                f"tables={s['P_engram_tables']:,} P_tot={s['P_tot']:,} ({s['P_tot_error']:+.3%}) "
                f"P_act={s['P_act']:,} ({s['P_act_error']:+.3%})",
                file=sys.stderr,
            )

    rows: list[dict] = []
    result = {
        "label": label,
        "preset": {k: v for k, v in preset.__dict__.items() if k != "train"},
        "train": preset.train.to_dict(),
        "data": {"description": data.description, **data.info},
        "device": device,
        "world_size": dp.world if dp is not None else 1,
        "torch": torch.__version__,
        "platform": platform.platform(),
        "threads": torch.get_num_threads(),
        "base_config": base.to_dict(),
        "targets": {"P_tot": target.total, "P_act": target.active},
        "allocations": [a.summary() | {"config": a.config.to_dict()} for a in allocs],
    }
    runs = [(seed, a) for seed in preset.seeds for a in allocs]
    for seed, a in _bar(runs, desc="sweep", enabled=progress):
        t0 = time.perf_counter()
        torch.manual_seed(seed)
        model = TransformerLM(
            a.config,
            lut=data.lut if a.config.engram is not None else None,
            engram_factory=engram_factory,
            table_grad=preset.train.table_grad,
            table_optimizer=preset.train.table_optimizer,
            table_options=dict(placement="sharded") if dp is not None and a.config.engram is not None else None,
        ).to(device)
        desc = f"rho={a.rho:.2f} seed={seed}"
        steps_bar = (
            (lambda it, desc=desc: _bar(it, total=preset.train.steps, desc=desc, leave=False)) if progress else None
        )
        tr = train(
            model,
            data.train,
            preset.train,
            seed=seed,
            aux_loss_coef=a.config.aux_loss_coef,
            device=device,
            autocast_dtype=autocast_dtype,
            progress=steps_bar,
            dp=dp,
        )
        nats, n = evaluate(
            model,
            data.val,
            preset.train.seq_len,
            preset.train.eval_batch_size,
            device=device,
            autocast_dtype=autocast_dtype,
            dp=dp,
        )
        s = a.summary()
        row = {
            "rho": a.rho,
            "rho_realised": round(s["rho_realised"], 6),
            "seed": seed,
            "n_routed_experts": s["n_routed_experts"],
            "top_k": s["top_k"],
            "d_shared": s["d_shared"],
            "engram_vocab_size": "x".join(map(str, s["engram_vocab_size"])) or "-",
            "engram_rows": sum(s["engram_rows"]),
            "P_tot": s["P_tot"],
            "P_act": s["P_act"],
            "P_tot_error": round(s["P_tot_error"], 6),
            "P_act_error": round(s["P_act_error"], 6),
            "P_routed": s["P_routed"],
            "P_engram_tables": s["P_engram_tables"],
            "P_engram_dense": s["P_engram_dense"],
            "steps": tr["steps"],
            "tokens": tr["tokens"],
            "train_loss": round(tr["train_loss"], 6),
            "val_loss": round(nats / n, 6),
            "val_bpb": round(nats / math.log(2) / max(data.val_bytes, 1), 6),
            "train_s": round(tr["train_s"], 2),
            "wall_s": round(time.perf_counter() - t0, 2),
        }
        if save_models:
            path = out_dir / "models" / model_dir_name(a.rho, seed)
            state = None if dp is None else full_state_dict(model)  # every rank sends its shards
            if writer:
                save_model(path, model, data.tokenizer, extra={"run": row, "preset": result["preset"]}, state=state)
            row["model_dir"] = str(path.relative_to(out_dir))
        rows.append(row)
        if progress:
            print(
                f"[sweep] rho={a.rho:.2f} seed={seed}: val_loss={row['val_loss']:.4f} "
                f"bpb={row['val_bpb']:.4f} ({row['wall_s']:.0f} s)",
                file=sys.stderr,
            )
        if writer:
            _write(out_dir, rows, result | {"runs": rows, "summary": summarise(rows)})
        del model

    result |= {"runs": rows, "summary": summarise(rows), "wall_s": round(time.perf_counter() - t_start, 1)}
    if not writer:
        return result
    _write(out_dir, rows, result)
    t = preset.train
    title = (
        f"{label or 'sweep'}: P_tot={target.total / 1e6:.2f}M, P_act={target.active / 1e6:.2f}M, "
        f"{t.steps} steps x {t.tokens_per_step} tokens, seeds {list(preset.seeds)}"
    )
    plot(result["summary"], out_dir / "sweep.png", title)
    return result


def model_dir_name(rho: float, seed: int) -> str:
    return f"rho{rho:.3f}_seed{seed}"


def _write(out_dir: Path, rows: list[dict], result: dict) -> None:
    with open(out_dir / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS, restval="")
        w.writeheader()
        w.writerows(rows)
    (out_dir / "results.json").write_text(json.dumps(result, indent=2, default=str))


# CLI -------------------------------------------------------------------------------------------
def _floats(s: str) -> tuple[float, ...]:
    return tuple(float(x) for x in s.split(",") if x.strip())


def _ints(s: str) -> tuple[int, ...]:
    return tuple(int(x) for x in s.split(",") if x.strip())


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m torch_engram.sweep",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--preset", choices=sorted(PRESETS), default="quick")
    p.add_argument("--rhos", type=_floats, help="comma-separated rho values in (0, 1], e.g. 1,0.8,0.6")
    p.add_argument("--seeds", type=_ints, help="comma-separated seeds, e.g. 0,1,2")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--steps", type=int, help="training steps per model")
    budget.add_argument("--tokens", type=int, help="training tokens per model (rounded up to whole steps)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--seq-len", type=int)
    p.add_argument("--lr", type=float, help="base (backbone) learning rate; tables use 5x")
    p.add_argument(
        "--table-optimizer",
        choices=["adam", "partial_rowwise_adam", "rowwise_adagrad", "sgd"],
        help="the Engram tables' optimizer (torch_engram.table; default partial_rowwise_adam, chosen from this sweep)",
    )
    p.add_argument(
        "--table-grad",
        choices=["fused", "sparse", "dense"],
        help="how Engram tables learn: fused into backward (default), sparse or dense gradients",
    )
    p.add_argument("--text-files", nargs="+", help="your own UTF-8 text files instead of the built-in corpus")
    p.add_argument(
        "--tokenizer",
        help="a tokenizers JSON file, or 'default'; else a BPE is trained on the training split",
    )
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (cuda when available)")
    p.add_argument(
        "--amp",
        choices=["auto", "off", "bf16"],
        default="auto",
        help="autocast dtype; auto = bf16 on CUDA, off on CPU",
    )
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--out", default="results/sweep", help="output directory (default results/sweep)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--no-save", action="store_true", help="do not save the trained models (OUT/models/...)")
    p.add_argument(
        "--combine",
        nargs="+",
        metavar="DIR",
        help="train nothing: merge the results.csv of earlier runs (e.g. one seed each) into "
        "--out, with error bars over all their seeds",
    )
    return p


def preset_from_args(args) -> Preset:
    from dataclasses import replace

    preset = PRESETS[args.preset]
    tc = preset.train
    changes = {
        k: v
        for k, v in (
            ("batch_size", args.batch_size),
            ("seq_len", args.seq_len),
            ("lr", args.lr),
            ("table_optimizer", args.table_optimizer),
            ("table_grad", args.table_grad),
        )
        if v is not None
    }
    tc = replace(tc, **changes)
    if args.tokens is not None:
        tc = replace(tc, steps=max(1, math.ceil(args.tokens / tc.tokens_per_step)))
    elif args.steps is not None:
        tc = replace(tc, steps=args.steps)
    tc = replace(tc, warmup_steps=min(tc.warmup_steps, max(1, tc.steps // 10)))
    model = dict(preset.model)
    model["max_seq_len"] = max(model["max_seq_len"], tc.seq_len)
    return replace(preset, train=tc, model=model, rhos=args.rhos or preset.rhos, seeds=args.seeds or preset.seeds)


def combine(dirs, out_dir: Path) -> dict:
    """One results.csv / results.json / sweep.png from several sweep outputs (same preset, other
    seeds). Refuses runs whose allocation differs at equal rho, or a (rho, seed) seen twice."""
    numeric = {c for c in CSV_COLUMNS if c not in ("engram_vocab_size", "model_dir")}
    rows, seen, meta = [], {}, []
    for d in map(Path, dirs):
        meta.append(json.loads((d / "results.json").read_text()))
        with open(d / "results.csv", newline="") as f:
            raw_rows = list(csv.DictReader(f))
        for r in raw_rows:
            r = {
                k: (v if k not in numeric else (int(v) if v.lstrip("-").isdigit() else float(v))) for k, v in r.items()
            }
            if r.get("model_dir"):
                r["model_dir"] = str(d / r["model_dir"])  # the model stays where its run saved it
            key = (r["rho"], r["seed"])
            if key in seen:
                raise SystemExit(f"--combine: rho={r['rho']} seed={r['seed']} appears in both {seen[key]} and {d}")
            seen[key] = d
            rows.append(r)
    for rho in {r["rho"] for r in rows}:
        shapes = {
            (r["n_routed_experts"], r["d_shared"], r["engram_vocab_size"], r["steps"], r["tokens"])
            for r in rows
            if r["rho"] == rho
        }
        if len(shapes) > 1:
            raise SystemExit(f"--combine: the runs disagree on the model or budget at rho={rho}: {sorted(shapes)}")
    rows.sort(key=lambda r: (-r["rho"], r["seed"]))
    out_dir.mkdir(parents=True, exist_ok=True)
    result = {
        "combined_from": [str(d) for d in dirs],
        "label": meta[0].get("label", ""),
        "targets": meta[0]["targets"],
        "train": meta[0]["train"],
        "runs": rows,
        "summary": summarise(rows),
    }
    _write(out_dir, rows, result)
    t = meta[0]["train"]
    seeds = sorted({r["seed"] for r in rows})
    title = (
        f"{result['label'] or 'sweep'}: P_tot={result['targets']['P_tot'] / 1e6:.2f}M, "
        f"P_act={result['targets']['P_act'] / 1e6:.2f}M, {t['steps']} steps x "
        f"{t['batch_size'] * t['seq_len']} tokens, seeds {seeds}"
    )
    plot(result["summary"], out_dir / "sweep.png", title)
    return result


def main(argv=None) -> dict:
    t0 = time.perf_counter()
    args = build_parser().parse_args(argv)
    if args.combine and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise SystemExit("sweep: --combine trains nothing; run it in one process, not under torchrun")
    if args.combine:
        result = combine(args.combine, Path(args.out))
        for s in result["summary"]:
            print(
                f"rho={s['rho']:.2f}  val_loss={s['val_loss_mean']:.4f} +- {s['val_loss_std']:.4f}  "
                f"bpb={s['val_bpb_mean']:.4f}  ({s['n_seeds']} seeds)"
            )
        return result
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dp = DataParallel.from_env(device)  # under torchrun
    if dp is not None:
        device = str(dp.device)
    writer = dp is None or dp.rank == 0
    threads = args.threads or (PRESETS[args.preset].threads if device == "cpu" else None)
    if threads:
        torch.set_num_threads(threads)
    amp = {"off": None, "bf16": torch.bfloat16}.get(args.amp, torch.bfloat16 if device.startswith("cuda") else None)
    preset = preset_from_args(args)
    bad = [r for r in preset.rhos if not 0.0 < r <= 1.0]
    if bad:
        raise SystemExit(f"--rhos: every rho must lie in (0, 1], got {bad}")
    if dp is not None and preset.train.batch_size % dp.world:
        raise SystemExit(f"sweep: --batch-size {preset.train.batch_size} must divide by the {dp.world} ranks")
    data = None
    if writer:
        data = prepare_data(preset, text_files=args.text_files, tokenizer=args.tokenizer, seed=0)
    if dp is not None:
        import torch.distributed as dist

        # Rank 0 prepares the data (its tokenizer is trained once) and hands it to the others.
        box = [data]
        dist.broadcast_object_list(box, src=0)
        data = box[0]
    data_s = time.perf_counter() - t0
    out = Path(args.out)
    result = run_sweep(
        preset,
        data,
        out,
        device=device,
        autocast_dtype=amp,
        progress=not args.no_progress,
        label=args.preset,
        save_models=not args.no_save,
        dp=dp,
    )
    if dp is not None:
        import torch.distributed as dist

        dist.barrier()  # rank 0 has written every model
        if not writer:
            dist.destroy_process_group()
            return result
    launcher = f"torchrun --nproc-per-node {dp.world}" if dp is not None else "python"
    result |= {
        "data_s": round(data_s, 1),
        "total_wall_s": round(time.perf_counter() - t0, 1),
        "command": " ".join([f"{launcher} -m torch_engram.sweep", *(argv if argv is not None else sys.argv[1:])]),
    }
    (out / "results.json").write_text(json.dumps(result, indent=2, default=str))
    print(
        f"[sweep] done in {result['total_wall_s']:.0f} s (data {data_s:.0f} s) -> {out}/results.csv, "
        "results.json, sweep.png",
        file=sys.stderr,
    )
    for s in result["summary"]:
        print(
            f"rho={s['rho']:.2f} (realised {s['rho_realised']:.3f})  val_loss={s['val_loss_mean']:.4f}"
            f" +- {s['val_loss_std']:.4f}  bpb={s['val_bpb_mean']:.4f}"
        )
    if dp is not None:
        dist.destroy_process_group()
    return result


if __name__ == "__main__":
    main()
