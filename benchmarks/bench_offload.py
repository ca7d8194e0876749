"""Tables beyond device memory on the CPU: a host- or file-placed EngramTable computing on a row
cache (torch_engram.offload), against the same table on the device, on real text (the built-in
corpus, hashed with the official demo layout), side by side in one run:

  layer  the Engram layer step (forward + backward + fused update; demo table of layer 1,
         10,344,164 x 64 float32, partial_rowwise_adam) with placement device, and file + cache with
         prefetch on and off, cold (the first steps: every row read from the file and initialised)
         and warm (after the cache has seen the stream); median step times and the overhead;
  big    a table twice this machine's RAM (48 GiB of bfloat16 rows in a sparse file) trained for a
         few steps: step time and peak RSS;
  hits   the cache's hit rate against its size, LRU and LFU, on the hashed stream;
  model  (for a GPU: --parts model --device cuda) the sweep's transformer with one Engram layer
         whose bfloat16 table (--model-table-gib, default 30 GiB) lives in pinned host memory
         behind a device cache, against the same table in device memory: median step times of
         inference (forward) and training (forward + backward + fused update + AdamW of the rest),
         the next batch prefetched on a side stream. On the CPU it runs the same code with the
         cache in RAM (a smoke run with a small table).

    python benchmarks/bench_offload.py [--parts layer,big,hits] [--tokens 1024] [--dir /tmp]
    python benchmarks/bench_offload.py --parts model --device cuda [--json out.json]
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))

import torch_engram as te
from torch_engram import EngramTable
from torch_engram.experiment.corpus import default_tokenizer, encode_documents, load_documents, tile


def rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def stream_rows(config, tokens_per_step: int, steps: int) -> list[torch.Tensor]:
    """Rows of layer 1 for `steps` consecutive batches [B, T, H] of the hashed built-in corpus."""
    tok = default_tokenizer()
    comp = te.build_compression(tok)
    hasher = te.NgramHasher(config, lut=comp.lut)
    ids = encode_documents(tok, load_documents()).ids
    T = min(512, tokens_per_step)
    B = tokens_per_step // T
    batches = tile(ids, steps * B * T).view(steps, B, T)
    return [hasher(b)[0] for b in batches]


def layer_part(args, config, rows):
    D, M = args.hidden, args.hc_mult
    B, T, _ = rows[0].shape
    x = torch.randn(B, T, M, D, requires_grad=True)
    results = {}
    cache = args.cache_rows
    torch.manual_seed(0)
    device_mod = te.Engram(config, config.layer_ids[0], D, hc_mult=M)
    # The file tables start from the device table's values (every record written: no lazy
    # initialisation in the timed steps), except "lazy", whose rows are initialised on first fetch.
    start = {k: v.clone() for k, v in device_mod.state_dict().items()}
    for name, options, prefetch in [
        ("device", None, False),
        ("host, prefetch", dict(placement="host", cache_rows=cache), True),
        ("host, no prefetch", dict(placement="host", cache_rows=cache), False),
        ("file, prefetch", dict(placement="file", cache_rows=cache), True),
        ("file lazy, prefetch", dict(placement="file", cache_rows=cache), True),
    ]:
        if options is None:
            mod = device_mod
        else:
            if options["placement"] == "file":
                options["path"] = os.path.join(args.dir, "engram_bench_layer.bin")
            mod = te.Engram(config, config.layer_ids[0], D, hc_mult=M, table_options=options)
            if "lazy" not in name:
                mod.load_state_dict(start)
                if options["placement"] == "file":
                    os.sync()  # the 5 GB just written reach the disk before timing, not during
        params = list(mod.parameters())
        times = []
        for s, r in enumerate(rows):
            for p in params:
                p.grad = None
            x.grad = None
            t0 = time.perf_counter()
            out = mod(x, rows=r)
            if prefetch and s + 1 < len(rows):
                mod.prefetch(rows=rows[s + 1])
            out.backward(torch.ones_like(out))
            times.append(time.perf_counter() - t0)
        n_cold = args.cold_steps
        results[name] = dict(
            cold=statistics.median(times[:n_cold]),
            warm=statistics.median(times[-args.warm_steps :]),
            stats=mod.table.cache_stats(),
        )
        if mod is device_mod:
            device_mod = None
        del mod
        if options is not None and "path" in options:
            os.remove(options["path"])
    base = results["device"]["warm"]
    print(f"\n## layer step, {B * T} tokens, D={D}, M={M}, cache {cache:,} rows")
    print(f"{'placement':<20} {'cold ms':>9} {'warm ms':>9} {'warm overhead':>14} {'hit rate (all steps)':>21}")
    for name, r in results.items():
        st = r["stats"]
        hr = st["hits"] / max(st["hits"] + st["misses"], 1) if st else float("nan")
        print(
            f"{name:<20} {1e3 * r['cold']:>9.1f} {1e3 * r['warm']:>9.1f} {100 * (r['warm'] / base - 1):>13.1f}% "
            f"{100 * hr:>20.1f}%"
        )


def big_part(args):
    d_head = 64
    num_rows = 48 * 2**30 // (2 * d_head)
    path = os.path.join(args.dir, "engram_bench_big.bin")
    t0 = time.perf_counter()
    table = EngramTable(
        num_rows,
        d_head,
        dtype=torch.bfloat16,
        stochastic_rounding=False,
        optimizer="rowwise_adagrad",
        placement="file",
        path=path,
        cache_rows=args.big_cache_rows,
    )
    created = time.perf_counter() - t0
    H = 16
    proj = torch.nn.Linear(H * d_head, 1, dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    times = []
    for _ in range(args.big_steps):
        rows = (torch.rand(args.tokens, H, generator=g) ** 2 * num_rows).long().clamp_(max=num_rows - 1)
        t0 = time.perf_counter()
        e = table(rows)
        proj(e).float().square().mean().backward()
        times.append(time.perf_counter() - t0)
    table.flush()
    disk = os.stat(path).st_blocks * 512
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    print(
        f"\n## a table twice the RAM: {num_rows:,} x {d_head} bfloat16 rows + rowwise_adagrad state "
        f"({os.path.getsize(path) / 2**30:.1f} GiB sparse file; RAM {ram / 2**30:.1f} GiB)"
    )
    print(
        f"created in {created:.2f} s; {args.big_steps} steps of {args.tokens} x {H} lookups: median "
        f"{1e3 * statistics.median(times):.1f} ms (first {1e3 * times[0]:.1f} ms); peak RSS {rss_gb():.2f} GiB; "
        f"disk used {disk / 2**30:.2f} GiB; cache {args.big_cache_rows:,} rows; {table.cache_stats()}"
    )
    del table
    os.remove(path)


def hits_part(args, rows):
    half = len(rows) // 2
    print(
        f"\n## hit rate against cache size: unique rows per step, over the second half of {len(rows)} steps "
        f"({len(rows) * rows[0][..., 0].numel():,} tokens; the first half warms the cache)"
    )
    print(f"{'cache rows':>11} {'LRU':>7} {'LFU':>7}")
    num_rows = int(max(int(r.max()) for r in rows)) + 1
    for cache in args.hit_sizes:
        rates = []
        for policy in ("lru", "lfu"):
            t = EngramTable(num_rows, 1, placement="host", cache_rows=cache, cache_policy=policy, optimizer="sgd")
            with torch.no_grad():
                for s, r in enumerate(rows):
                    if s == half:
                        before = t.cache_stats()
                    t(r)
            st = t.cache_stats()
            hits, misses = st["hits"] - before["hits"], st["misses"] - before["misses"]
            rates.append(hits / (hits + misses))
        print(f"{cache:>11,} {100 * rates[0]:>6.1f}% {100 * rates[1]:>6.1f}%")


def model_part(args, on_row=lambda rows: None) -> list[dict]:
    from torch_engram.experiment.models import ModelConfig, TransformerLM

    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    d_head, heads = 64, 8
    per_table = max(1000, int(args.model_table_gib * 2**30 / (d_head * 2) / (2 * heads)))
    ecfg = te.EngramConfig(
        engram_vocab_size=(per_table, per_table),
        n_embed_per_ngram=heads * d_head,
        n_head_per_ngram=heads,
        layer_ids=(1,),
        compressed_vocab_size=None,
        proj_bias=False,
    )
    tok = default_tokenizer()
    comp = te.build_compression(tok)
    B, T = args.model_batch, args.model_seq
    cfg = ModelConfig(
        vocab_size=tok.get_vocab_size(),
        d_model=args.model_d,
        n_layers=4,
        n_heads=8,
        max_seq_len=T,
        n_routed_experts=16,
        top_k=2,
        d_expert=args.model_d // 2,
        d_shared=args.model_d,
        engram=ecfg,
    )
    ids = encode_documents(tok, load_documents()).ids
    steps = args.model_steps
    ids = tile(ids, (steps + 1) * B * (T + 1)).view(steps + 1, B, T + 1)
    batches = [b.to(dev) for b in ids]
    rows_total = 2 * heads * per_table
    print(
        f"model  {dev}: one Engram table {rows_total:,} x {d_head} bf16 = {rows_total * d_head * 2 / 2**30:.1f} GiB, "
        f"cache {args.model_cache_rows:,} rows, batch {B} x {T}",
        flush=True,
    )

    def sync():
        if cuda:
            torch.cuda.synchronize(dev)

    out = []
    base: dict[str, float] = {}
    for placement in ("device", "host"):
        opts = dict(dtype=torch.bfloat16)
        if placement == "host":
            opts |= dict(placement="host", cache_rows=args.model_cache_rows)
        t0 = time.perf_counter()
        torch.manual_seed(0)
        with torch.device(dev):
            model = TransformerLM(cfg, lut=comp.lut.to(dev), table_optimizer="rowwise_adagrad", table_options=opts)
        sync()
        build_s = time.perf_counter() - t0
        dense = [p for n, p in model.named_parameters() if ".table." not in n]
        opt = torch.optim.AdamW(dense, lr=1e-4, fused=cuda)
        amp = torch.autocast(dev.type, dtype=torch.bfloat16)
        for mode in ("inference", "training"):
            times = []
            for s, b in enumerate(batches[:-1]):
                sync()
                t0 = time.perf_counter()
                with amp:
                    if mode == "inference":
                        with torch.no_grad():
                            model(b[:, :-1])
                            if placement == "host":
                                model.prefetch(batches[s + 1][:, :-1])
                    else:
                        res = model(b[:, :-1], targets=b[:, 1:])
                        if placement == "host":
                            model.prefetch(batches[s + 1][:, :-1])
                        res.loss.backward()
                        opt.step()
                        opt.zero_grad(set_to_none=True)
                sync()
                times.append(time.perf_counter() - t0)
            warm = statistics.median(times[min(args.model_warmup, len(times) - 1) :])
            row = dict(placement=placement, mode=mode, warm_ms=warm * 1e3, first_ms=times[0] * 1e3, build_s=build_s)
            if placement == "device":
                base[mode] = warm
            else:
                row["overhead"] = warm / base[mode] - 1
                row |= model.engram_modules()[0].table.cache_stats()
            out.append(row)
            on_row(out)  # written after every measurement: a run cut short keeps what it measured
            more = f"  overhead {row['overhead']:+.2%}" if "overhead" in row else ""
            print(
                f"model  {placement:<6} {mode:<9} warm {warm * 1e3:8.2f} ms  first {times[0] * 1e3:8.1f} ms  "
                f"built in {build_s:.1f} s{more}",
                flush=True,
            )
        del model, opt, dense
        if cuda:
            torch.cuda.empty_cache()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--parts", default="layer,big,hits")
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--hc-mult", type=int, default=4)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--cold-steps", type=int, default=5)
    ap.add_argument("--warm-steps", type=int, default=15)
    ap.add_argument("--cache-rows", type=int, default=200_000)
    ap.add_argument("--big-cache-rows", type=int, default=200_000)
    ap.add_argument("--big-steps", type=int, default=20)
    ap.add_argument("--hit-steps", type=int, default=400)
    ap.add_argument(
        "--hit-sizes", type=lambda s: [int(v) for v in s.split(",")], default=[100_000, 1_000_000, 3_000_000]
    )
    ap.add_argument("--dir", default=tempfile.gettempdir(), help="where the file tables go")
    ap.add_argument("--device", default="cpu", help="the model part's device (cuda for the GPU benchmark)")
    ap.add_argument("--model-table-gib", type=float, default=30.0)
    ap.add_argument("--model-cache-rows", type=int, default=4_000_000)
    ap.add_argument("--model-batch", type=int, default=8)
    ap.add_argument("--model-seq", type=int, default=2048)
    ap.add_argument("--model-d", type=int, default=1024)
    ap.add_argument("--model-steps", type=int, default=20)
    ap.add_argument("--model-warmup", type=int, default=5)
    ap.add_argument("--json", default=None, help="write the model part's figures here")
    args = ap.parse_args()
    parts = set(args.parts.split(","))
    if "model" in parts:
        import json

        def write(rows):
            if args.json:
                Path(args.json).write_text(json.dumps(dict(date=time.strftime("%Y-%m-%d %H:%M"), rows=rows), indent=1))

        model_part(args, write)
        parts.discard("model")
        if not parts:
            return
    print(
        f"# offload, CPU, {torch.get_num_threads()} threads, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}; "
        f"demo layout, layer 1"
    )
    config = te.EngramConfig.official_demo(compressed_vocab_size=None)
    if "layer" in parts:
        layer_part(args, config, stream_rows(config, args.tokens, args.steps))
    if "hits" in parts:
        hits_part(args, stream_rows(config, args.tokens, args.hit_steps))
    if "big" in parts:
        big_part(args)


if __name__ == "__main__":
    main()
