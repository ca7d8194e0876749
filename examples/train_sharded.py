"""The sweep's MoE transformer trained data-parallel: its Engram tables row-sharded over the ranks
(EngramTable placement="sharded"), the rest of the model under DDP or FSDP2 with the tables excluded.

    torchrun --nproc-per-node 2 examples/train_sharded.py [--steps 100]        # CPU, gloo
    torchrun --nproc-per-node 2 examples/train_sharded.py --dense fsdp         # FSDP2's fully_shard
    torchrun --nproc-per-node 2 examples/train_sharded.py --device cuda        # GPUs, NCCL

Every rank draws the same global batch and trains on its slice; the tables average the ranks' row
gradients as DDP averages the dense ones, and the MoE balance loss counts the routed slots of the
global batch, so the run follows one process with the same global batch (--nproc-per-node 1) up to
float rounding (torch_engram.experiment.models.training.DataParallel). Rank 0 prints the global
training loss every 10 steps and the validation loss at the end; --json writes them.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.distributed as dist

import torch_engram as te
from torch_engram.experiment.corpus import default_tokenizer, encode_documents, load_documents, split_train_val
from torch_engram.experiment.models import ModelConfig, TransformerLM
from torch_engram.experiment.models.training import DataParallel, evaluate, sample_batch


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--global-batch", type=int, default=16, help="sequences per step, over all ranks")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--device", default="cpu", help="cpu (gloo) or cuda (NCCL, one GPU per rank)")
    ap.add_argument("--dense", choices=["ddp", "fsdp"], default="ddp", help="how the rest of the model is parallel")
    ap.add_argument("--max-bytes", type=int, default=2_000_000, help="of the built-in corpus")
    ap.add_argument("--aux-loss-coef", type=float, default=0.01, help="MoE load balancing")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    dp = DataParallel.from_env(args.device, dense=args.dense)
    if dp is None:
        raise SystemExit("train_sharded: launch it with torchrun (see its docstring)")
    rank, world, dev = dp.rank, dp.world, dp.device
    if args.global_batch % world:
        raise SystemExit(f"train_sharded: --global-batch {args.global_batch} must divide by the {world} ranks")
    torch.set_num_threads(1)
    if rank == 0:
        tok = default_tokenizer()  # trains and caches it once; the other ranks read the cache
    dist.barrier()
    if rank != 0:
        tok = default_tokenizer()
    train_docs, val_docs = split_train_val(load_documents(max_bytes=args.max_bytes), 0.05, seed=0)
    train_ids = encode_documents(tok, train_docs).ids
    val_ids = encode_documents(tok, val_docs).ids[: 32 * args.seq_len]
    engram = te.EngramConfig(
        engram_vocab_size=(8000, 8000), n_embed_per_ngram=64, n_head_per_ngram=4, layer_ids=(1, 2), pad_id=2
    )
    cfg = ModelConfig(
        vocab_size=tok.get_vocab_size(),
        d_model=128,
        n_layers=4,
        n_heads=4,
        max_seq_len=args.seq_len,
        n_routed_experts=16,
        top_k=2,
        d_expert=64,
        d_shared=256,
        aux_loss_coef=args.aux_loss_coef,
        engram=engram,
    )
    torch.manual_seed(0)  # the same dense init on every rank; the tables' shards init by row blocks
    with torch.device(dev):
        model = TransformerLM(
            cfg, lut=te.build_compression(tok).lut.to(dev), table_options=dict(placement="sharded", lr=5 * args.lr)
        )
    net = dp.wrap(model)  # DDP(model), or model sharded in place by fully_shard
    opt = torch.optim.AdamW(model.dense_parameters(), lr=args.lr, weight_decay=0.1)
    g = torch.Generator().manual_seed(0)
    losses, t0 = [], time.perf_counter()
    for step in range(args.steps):
        x, y = sample_batch(train_ids, args.global_batch, args.seq_len, g)  # the same on every rank
        out = net(dp.local(x).to(dev), targets=dp.local(y).to(dev))
        (out.loss + cfg.aux_loss_coef * out.aux_loss).backward()
        torch.nn.utils.clip_grad_norm_(model.dense_parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(dp.mean(out.loss)))
        if rank == 0 and (step + 1) % 10 == 0:
            print(f"step {step + 1}: train loss {losses[-1]:.4f}", flush=True)
    # Every rank evaluates its share of the windows (and takes part in every sharded lookup).
    nats, n = evaluate(model, val_ids, args.seq_len, 8, device=dev, dp=dp)
    val = nats / n
    secs = time.perf_counter() - t0
    shard = model.engram_modules()[0].table._shard
    if rank == 0:
        print(
            f"{world} rank(s): validation loss {val:.4f}, final train loss {losses[-1]:.4f}, {secs:.0f} s; "
            f"rank 0 holds rows [{shard.bounds[0]}, {shard.bounds[1]}) of each table",
            flush=True,
        )
        if args.json:
            with open(args.json, "w") as f:
                json.dump(dict(world=world, dense=args.dense, losses=losses, val_loss=val, seconds=secs), f)
    dist.destroy_process_group()
    return dict(losses=losses, val_loss=val)


if __name__ == "__main__":
    main()
