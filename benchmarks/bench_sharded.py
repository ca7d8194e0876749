"""Row-sharded Engram tables on the CPU (gloo), 1, 2 and 4 ranks, real text: the sweep's transformer
with one Engram layer in block 1 (orders 2-3, 8 heads, d_head 64, 1M rows per table, 16.7M rows
in all, Adam state) trained with a fixed global batch, its tables sharded over the ranks and the
rest under DDP. Per rank: the table + state bytes it holds, the step time (median), its peak RSS,
and the bytes a step sends to other ranks (ids out, rows back, row gradients out) with the
de-duplication of lookups and without it (every lookup sent).

    python benchmarks/bench_sharded.py [--worlds 1,2,4] [--steps 12] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def worker(args) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    sys.path.insert(0, str(ROOT / "python"))
    import torch_engram as te
    from torch_engram.experiment.corpus import default_tokenizer, encode_documents, load_documents
    from torch_engram.experiment.models import ModelConfig, TransformerLM
    from torch_engram.experiment.models.training import sample_batch
    from torch_engram.sharded import ddp_ignore_sharded

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    tok = default_tokenizer()
    ids = encode_documents(tok, load_documents(max_bytes=3_000_000)).ids
    ecfg = te.EngramConfig(engram_vocab_size=(1_000_000, 1_000_000), n_embed_per_ngram=512, layer_ids=(1,), pad_id=2)
    cfg = ModelConfig(vocab_size=tok.get_vocab_size(), d_model=256, n_layers=2, n_heads=4, max_seq_len=256,
                      n_routed_experts=8, top_k=2, d_expert=128, d_shared=256, engram=ecfg)  # fmt: skip
    torch.manual_seed(0)
    model = TransformerLM(
        cfg, lut=te.build_compression(tok).lut, table_optimizer="adam", table_options=dict(placement="sharded")
    )
    ddp_ignore_sharded(model)
    ddp = DDP(model)
    opt = torch.optim.AdamW(model.dense_parameters(), lr=1e-3)
    table = model.engram_modules()[0].table
    held = sum(t.nbytes for t in (table.weight, table.momentum1, table.momentum2, table.row_step))
    g = torch.Generator().manual_seed(0)
    local = args.global_batch // world
    times = []
    for _ in range(args.steps):
        x, y = sample_batch(ids, args.global_batch, args.seq_len, g)
        x, y = x[rank * local : (rank + 1) * local], y[rank * local : (rank + 1) * local]
        dist.barrier()
        t0 = time.perf_counter()
        out = ddp(x, targets=y)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    s = table.shard_stats
    d, b = table.d_head, table.weight.element_size()
    # Per row that leaves the rank: its id out (8 B), the row back (d * b), its gradient out (d * 4).
    per_row = 8 + d * b + d * 4
    row = dict(
        rank=rank,
        world=world,
        shard_rows=table._shard.rows,
        table_state_MiB=held / 2**20,
        step_ms=statistics.median(times[2:]) * 1e3,
        peak_rss_MiB=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        sent_MiB_per_step=s["remote_unique"] * per_row / args.steps / 2**20,
        sent_MiB_per_step_no_dedup=s["remote_lookups"] * per_row / args.steps / 2**20,
        lookups_per_step=s["lookups"] / args.steps,
        unique_per_step=s["unique"] / args.steps,
    )
    rows = [None] * world
    dist.all_gather_object(rows, row)
    if rank == 0:
        Path(args.out).write_text(json.dumps(rows))
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worlds", default="1,2,4")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--global-batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--json", default=None)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    results = []
    print(f"# bench_sharded, CPU gloo, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}")
    print(f"{'ranks':>5} {'rank':>4} {'rows':>10} {'table+state MiB':>15} {'step ms':>8} {'peak RSS MiB':>12} "
          f"{'sent MiB/step':>13} {'no dedup':>9}")  # fmt: skip
    for world in (int(w) for w in args.worlds.split(",")):
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "rows.json"
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(world), __file__,
                   "--worker", "--out", str(out), "--steps", str(args.steps), "--global-batch",
                   str(args.global_batch), "--seq-len", str(args.seq_len)]  # fmt: skip
            env = {**os.environ, "OMP_NUM_THREADS": "1"}
            subprocess.run(cmd, check=True, env=env, capture_output=True)
            rows = json.loads(out.read_text())
        for r in rows:
            print(f"{world:>5} {r['rank']:>4} {r['shard_rows']:>10,} {r['table_state_MiB']:>15.1f} "
                  f"{r['step_ms']:>8.1f} {r['peak_rss_MiB']:>12.0f} {r['sent_MiB_per_step']:>13.2f} "
                  f"{r['sent_MiB_per_step_no_dedup']:>9.2f}", flush=True)  # fmt: skip
        results += rows
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
