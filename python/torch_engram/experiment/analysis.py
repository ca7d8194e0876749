"""What the memory does, in models the sweep saved (`python -m torch_engram.analyze`):

  gate        the text token by token, coloured by each Engram layer's gate value alpha (and
              branch when hc_mult > 1), high alpha red, low white, as in the paper's figure: a PNG
              and a self-contained HTML page, with a legend and the per-layer mean; prints the
              tokens with the highest alpha;
  gate-stats  the mean alpha of held-out tokens by how often their bigram occurs in training;
  logit-lens  every block's hidden state decoded through the final norm and LM head: the KL
              divergence of the final output from it, per block, for the model and a baseline, on
              held-out text (PNG + CSV);
  cka         the linear CKA between the blocks of two models on the same tokens (heat map PNG +
              CSV), and for each block of the first the block of the second it matches best.

Held-out text: the sweep's own validation documents (the same corpus cap, split and seed as the
run that trained the model), or --text-file.
"""

from __future__ import annotations

import argparse
import csv
import html
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from .models import load_model


# ---- inputs -------------------------------------------------------------------------------------
def held_out_ids(tokenizer, extra: dict, n_tokens: int, text_file: str | None = None) -> torch.Tensor:
    """n_tokens ids of held-out text: text_file, or the validation documents of the sweep run
    described by `extra` (saved with the model), each followed by <eos>."""
    from . import corpus

    if text_file:
        docs = [Path(text_file).read_text(encoding="utf-8")]
    else:
        preset = extra.get("preset", {})
        docs = corpus.load_documents(max_bytes=preset.get("max_bytes"))
        _, docs = corpus.split_train_val(docs, val_fraction=preset.get("val_fraction", 0.05), seed=0)
    return corpus.tile(corpus.encode_documents(tokenizer, docs).ids, n_tokens)


def _chunks(ids: torch.Tensor, seq_len: int) -> torch.Tensor:
    n = ids.numel() // seq_len * seq_len
    if n == 0:
        raise SystemExit(f"analyze: need at least {seq_len} tokens of text, got {ids.numel()}")
    return ids[:n].view(-1, seq_len)


@torch.no_grad()
def gate_values(model, ids: torch.Tensor) -> dict[int, torch.Tensor]:
    """{block index: alpha [T, M]} of each Engram layer for one sequence ids [T]."""
    engrams = {b.layer_id: b.engram for b in model.blocks if b.engram is not None}
    for e in engrams.values():
        e.capture_gate = True
    try:
        model(ids.view(1, -1))
        return {i: e.last_gate[0].float() for i, e in engrams.items()}
    finally:
        for e in engrams.values():
            e.capture_gate, e.last_gate = False, None


@torch.no_grad()
def hidden_states(model, ids: torch.Tensor) -> list[torch.Tensor]:
    """[n_layers + 1] tensors [B * T, D]: the embedding and every block's output (branches
    averaged when hc_mult > 1, as the LM head reads them), for ids [B, T]."""
    out: list[torch.Tensor] = []

    def keep(h: torch.Tensor) -> None:
        out.append((h.mean(dim=2) if h.dim() == 4 else h).flatten(0, 1).float())

    hooks = [model.embed.register_forward_hook(lambda m, i, o: keep(o))]
    hooks += [b.register_forward_hook(lambda m, i, o: keep(o[0])) for b in model.blocks]
    try:
        model(ids)
    finally:
        for h in hooks:
            h.remove()
    return out


def logit_lens(model, ids: torch.Tensor) -> list[float]:
    """KL(final || block l) in nats per token, for the embedding (l = 0) and every block."""
    hs = hidden_states(model, ids)
    with torch.no_grad():
        logp = [F.log_softmax(model.lm_head(model.norm(h.to(model.lm_head.weight.dtype))).float(), -1) for h in hs]
    final = logp[-1]
    p = final.exp()
    return [float((p * (final - lp)).sum(-1).mean()) for lp in logp]


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA of representations x [n, d1], y [n, d2] of the same n inputs (Kornblith et al.
    2019): ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F), features centred."""
    x = x.double() - x.double().mean(0)
    y = y.double() - y.double().mean(0)
    num = (y.t() @ x).square().sum()
    den = (x.t() @ x).square().sum().sqrt() * (y.t() @ y).square().sum().sqrt()
    return float(num / den) if den > 0 else 0.0


# ---- gate heat map ------------------------------------------------------------------------------
def _token_texts(tokenizer, ids: list[int]) -> list[str]:
    # Each token's own text; byte-level pieces that are not whole characters show as the bytes'
    # replacement, which keeps one box per token.
    return [tokenizer.decode([i], skip_special_tokens=False) for i in ids]


def _rows_of(alphas: dict[int, torch.Tensor]) -> list[tuple[str, torch.Tensor]]:
    rows = []
    for layer, a in alphas.items():
        M = a.shape[1]
        for m in range(M):
            rows.append((f"block {layer}" + (f", branch {m}" if M > 1 else ""), a[:, m]))
    return rows


def token_kind(text: str, first: bool) -> str:
    """'word start' (a token that begins a word), 'continuation' (a word's later piece) or
    'other' (punctuation, digits, whitespace)."""
    core = text.lstrip(" ")
    if not core or not core[0].isalpha():
        return "other"
    return "word start" if first or text.startswith(" ") else "continuation"


def mean_by_kind(texts: list[str], a: torch.Tensor) -> dict[str, float]:
    kinds = [token_kind(t, i == 0 or texts[i - 1].endswith(("\n", " "))) for i, t in enumerate(texts)]
    out = {}
    for k in ("word start", "continuation", "other"):
        sel = [float(a[i]) for i, kk in enumerate(kinds) if kk == k]
        if sel:
            out[k] = sum(sel) / len(sel)
    return out


def gate_html(texts: list[str], rows: list[tuple[str, torch.Tensor]], title: str) -> str:
    def span(t: str, a: float) -> str:
        shown = html.escape(t).replace("\n", "&#8629;<br>")
        return f'<span style="background:rgba(220,20,20,{a:.3f})" title="alpha = {a:.3f}">{shown or "&#9633;"}</span>'

    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title>",
        "<style>body{font-family:sans-serif;max-width:60em;margin:2em auto}"
        ".text{font-family:monospace;white-space:pre-wrap;line-height:1.9;border:1px solid #ddd;padding:.6em}"
        ".legend{display:inline-block;width:16em;height:1em;vertical-align:middle;"
        "background:linear-gradient(to right,rgba(220,20,20,0),rgba(220,20,20,1))}</style></head><body>",
        f"<h2>{html.escape(title)}</h2>",
        "<p>Gate value alpha per token: 0 <span class='legend'></span> 1 (hover a token for its value).</p>",
    ]
    for name, a in rows:
        vals = a.tolist()
        kinds = ", ".join(f"{k} {v:.3f}" for k, v in mean_by_kind(texts, a).items())
        parts.append(
            f"<h3>{html.escape(name)}: mean alpha {sum(vals) / len(vals):.3f}</h3>"
            f"<p>mean by token kind: {html.escape(kinds)}</p><div class='text'>"
        )
        parts.append("".join(span(t, v) for t, v in zip(texts, vals)))
        parts.append("</div>")
    parts.append("</body></html>")
    return "\n".join(parts)


def gate_png(texts: list[str], rows: list[tuple[str, torch.Tensor]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import colormaps
    from matplotlib.colors import Normalize

    # Characters per line of a monospace font whose advance (0.6 em) fills a cell of the 12-inch
    # wide axes.
    width, fontsize = 150, 12 * 72 / 150 / 0.6
    lines, line, col = [], [], 0
    for i, t in enumerate(texts):
        t = t.replace("\n", "\u21b5")
        if col + len(t) > width and line:
            lines.append(line)
            line, col = [], 0
        line.append((i, t, col))
        col += len(t)
    lines.append(line)
    cmap, norm = colormaps["Reds"], Normalize(0.0, 1.0)
    n_lines = len(lines)
    fig_h = 0.8 + len(rows) * (0.45 + 0.24 * n_lines)
    fig, axes = plt.subplots(len(rows), 1, figsize=(12.5, fig_h), squeeze=False)
    fig.subplots_adjust(left=0.02, right=0.98)
    for ax, (name, a) in zip(axes[:, 0], rows):
        vals = a.tolist()
        ax.set_xlim(0, width)
        ax.set_ylim(n_lines, 0)
        ax.axis("off")
        ax.set_title(f"{name}: mean alpha {sum(vals) / len(vals):.3f}", loc="left", fontsize=10)
        for r, ln in enumerate(lines):
            for i, t, c in ln:
                ax.add_patch(plt.Rectangle((c, r + 0.1), len(t), 0.8, color=cmap(norm(vals[i])), lw=0))
                ax.text(c, r + 0.5, t, fontsize=fontsize, family="monospace", va="center", ha="left")
    sm = plt.cm.ScalarMappable(cmap=cmap, norm=norm)
    fig.colorbar(sm, ax=axes[:, 0].tolist(), orientation="horizontal", fraction=0.03, pad=0.02, label="gate alpha")
    fig.suptitle(title, fontsize=11)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def gate_command(args) -> dict:
    model, tok, extra = load_model(args.model)
    if model.hasher is None:
        raise SystemExit(f"analyze gate: {args.model} has no Engram layer (rho = 1?)")
    text = Path(args.text_file).read_text(encoding="utf-8") if args.text_file else args.text
    if not text:
        raise SystemExit("analyze gate: pass --text or --text-file")
    ids = tok.encode(text, add_special_tokens=False).ids[: model.cfg.max_seq_len]
    if not ids:
        raise SystemExit("analyze gate: the text encodes to no tokens")
    alphas = gate_values(model, torch.tensor(ids))
    texts = _token_texts(tok, ids)
    rows = _rows_of(alphas)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    run = extra.get("run", {})
    title = f"Engram gate, {Path(args.model).name} (rho={run.get('rho', '?')})"
    (out / "gate.html").write_text(gate_html(texts, rows, title), encoding="utf-8")
    gate_png(texts, rows, out / "gate.png", title)
    top, kinds = {}, {}
    for name, a in rows:
        order = a.argsort(descending=True)[: args.top].tolist()
        top[name] = [(texts[i], float(a[i])) for i in order]
        kinds[name] = mean_by_kind(texts, a)
        by_kind = ", ".join(f"{k} {v:.3f}" for k, v in kinds[name].items())
        print(f"{name}: mean alpha {float(a.mean()):.3f} ({by_kind}); highest:", file=sys.stderr)
        for i in order:
            ctx = "".join(texts[max(0, i - 3) : i]).replace("\n", " ")
            print(f"  {float(a[i]):.3f}  {texts[i]!r:<16} after {ctx!r}", file=sys.stderr)
    print(f"analyze gate: wrote {out / 'gate.png'} and {out / 'gate.html'}", file=sys.stderr)
    return dict(alphas=alphas, texts=texts, top=top, by_kind=kinds)


# ---- gate against n-gram frequency ---------------------------------------------------------------
BUCKETS = ((0, 0), (1, 9), (10, 99), (100, 999), (1000, None))


def _bucket_name(lo: int, hi: int | None) -> str:
    return f"{lo}+" if hi is None else (f"{lo}" if lo == hi else f"{lo}-{hi}")


def gate_by_frequency(model, tokenizer, extra: dict, max_tokens: int = 32768) -> dict:
    """Mean gate alpha of held-out tokens grouped by how often the bigram (previous token, token),
    in compressed ids, occurs in the training split of the model's sweep run: does the memory
    open for the n-grams it has seen?"""
    from . import corpus

    preset = extra.get("preset", {})
    if extra.get("text_files"):
        raise SystemExit(
            "analyze gate-stats: the model was trained on --text-files; this analysis reads the built-in corpus"
        )
    docs = corpus.load_documents(max_bytes=preset.get("max_bytes"))
    train_docs, val_docs = corpus.split_train_val(docs, val_fraction=preset.get("val_fraction", 0.05), seed=0)
    lut = model.hasher.lut if model.hasher.lut.numel() else None  # None: ids are already compressed
    V = int(lut.max()) + 1 if lut is not None else model.hasher.compressed_vocab_size

    def pairs(ids: torch.Tensor) -> torch.Tensor:
        c = lut[ids] if lut is not None else ids
        return c[:-1] * V + c[1:]

    train_pairs, counts = pairs(corpus.encode_documents(tokenizer, train_docs).ids).unique(return_counts=True)
    val = corpus.encode_documents(tokenizer, val_docs).ids[: max_tokens + 1]
    T = model.cfg.max_seq_len
    n = (val.numel() - 1) // T * T
    ids = val[1 : n + 1].view(-1, T)
    seen = pairs(val[: n + 1])  # the bigram ending at each position of ids
    idx = torch.searchsorted(train_pairs, seen).clamp(max=train_pairs.numel() - 1)
    freq = torch.where(train_pairs[idx] == seen, counts[idx], torch.zeros_like(seen))
    # The first token of each sequence has no previous token in the model's view: left out.
    inner = torch.ones(ids.shape, dtype=torch.bool)
    inner[:, 0] = False
    inner = inner.flatten()
    freq = freq[inner]
    alphas: dict[int, list[torch.Tensor]] = {}
    for row in ids:
        for layer, a in gate_values(model, row).items():
            alphas.setdefault(layer, []).append(a)
    out = {}
    for layer, parts in alphas.items():
        a = torch.cat(parts).mean(dim=1)[inner]  # branches averaged
        out[layer] = {}
        for lo, hi in BUCKETS:
            sel = (freq >= lo) & (freq <= (hi if hi is not None else freq.max()))
            if bool(sel.any()):
                out[layer][_bucket_name(lo, hi)] = (float(a[sel].mean()), int(sel.sum()))
    return out


def gate_stats_command(args) -> dict:
    model, tok, extra = load_model(args.model)
    if model.hasher is None or tok is None:
        raise SystemExit(f"analyze gate-stats: {args.model} needs Engram layers and its tokenizer")
    stats = gate_by_frequency(model, tok, extra, args.tokens)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "gate_by_frequency.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["layer", "bigram_count_in_training", "mean_alpha", "tokens"])
        for layer, b in stats.items():
            w.writerows([layer, k, f"{a:.6f}", n] for k, (a, n) in b.items())
    for layer, b in stats.items():
        print(f"block {layer}: " + "  ".join(f"{k}: {a:.3f} ({n})" for k, (a, n) in b.items()), file=sys.stderr)
    return stats


# ---- logit lens and CKA -------------------------------------------------------------------------
def _models(args):
    a = load_model(args.model)
    b = load_model(args.baseline)
    if a[1] is None or b[1] is None:
        raise SystemExit("analyze: both models must be saved with their tokenizer")
    if a[1].get_vocab() != b[1].get_vocab():
        raise SystemExit("analyze: the two models use different tokenizers; compare models of one sweep")
    return a, b


def _label(path: str, extra: dict) -> str:
    rho = extra.get("run", {}).get("rho")
    return f"{Path(path).name}" + (f" (rho={rho})" if rho is not None else "")


def logit_lens_command(args) -> dict:
    (ma, tok, ea), (mb, _, eb) = _models(args)
    T = min(ma.cfg.max_seq_len, mb.cfg.max_seq_len)
    ids = _chunks(held_out_ids(tok, ea, args.tokens, args.text_file), T)
    curves = {_label(args.model, ea): logit_lens(ma, ids), _label(args.baseline, eb): logit_lens(mb, ids)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "logit_lens.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["model", "layer", "kl_to_final_nats"])
        for name, kl in curves.items():
            w.writerows([name, i, f"{v:.6f}"] for i, v in enumerate(kl))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name, kl in curves.items():
        ax.plot(range(len(kl)), kl, marker="o", label=name)
    ax.set_xlabel("layer (0 = embedding, i = output of block i - 1)")
    ax.set_ylabel("KL(final || layer) [nats/token]")
    ax.set_yscale("log")
    ax.set_title(f"LogitLens on {ids.numel():,} held-out tokens")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "logit_lens.png", dpi=120)
    plt.close(fig)
    for name, kl in curves.items():
        print(f"{name}: " + "  ".join(f"L{i} {v:.3f}" for i, v in enumerate(kl)), file=sys.stderr)
    return curves


def cka_command(args) -> dict:
    (ma, tok, ea), (mb, _, eb) = _models(args)
    T = min(ma.cfg.max_seq_len, mb.cfg.max_seq_len)
    ids = _chunks(held_out_ids(tok, ea, args.tokens, args.text_file), T)
    ha, hb = hidden_states(ma, ids), hidden_states(mb, ids)
    m = torch.tensor([[linear_cka(x, y) for y in hb] for x in ha])
    best = m.argmax(dim=1).tolist()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    la, lb = _label(args.model, ea), _label(args.baseline, eb)
    with open(out / "cka.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["layer_a", *[f"b{j}" for j in range(len(hb))], "best_b"])
        for i, row in enumerate(m.tolist()):
            w.writerow([i, *[f"{v:.6f}" for v in row], best[i]])
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4.6))
    im = ax.imshow(m.numpy(), origin="lower", cmap="viridis", vmin=0, vmax=1)
    ax.plot(best, range(len(best)), "r.", ms=9, label="best match")
    ax.set_xlabel(f"layer of {lb}")
    ax.set_ylabel(f"layer of {la}")
    ax.set_title("linear CKA (0 = embedding)")
    ax.legend(fontsize=8, loc="upper left")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(out / "cka.png", dpi=120)
    plt.close(fig)
    for i, j in enumerate(best):
        print(f"{la} layer {i} ~ {lb} layer {j} (CKA {float(m[i, j]):.3f})", file=sys.stderr)
    return dict(matrix=m, best=best)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m torch_engram.analyze",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", required=True)
    g = sub.add_parser("gate", help="gate heat map of a text (PNG + HTML)")
    g.add_argument("--model", required=True, help="a saved model directory (the sweep's OUT/models/...)")
    g.add_argument("--text", default=None)
    g.add_argument("--text-file", default=None)
    g.add_argument("--top", type=int, default=10, help="tokens printed per layer")
    g.add_argument("--out", default="results/analysis/gate")
    st = sub.add_parser("gate-stats", help="mean gate alpha by the training frequency of each token's bigram")
    st.add_argument("--model", required=True)
    st.add_argument("--tokens", type=int, default=32768, help="held-out tokens")
    st.add_argument("--out", default="results/analysis/gate-stats")
    for name, helptext in (("logit-lens", "KL to the final output per layer"), ("cka", "linear CKA between layers")):
        c = sub.add_parser(name, help=helptext)
        c.add_argument("--model", required=True)
        c.add_argument("--baseline", required=True, help="another saved model of the same sweep (e.g. rho = 1)")
        c.add_argument("--tokens", type=int, default=16384, help="held-out tokens")
        c.add_argument("--text-file", default=None, help="held-out text instead of the sweep's validation split")
        c.add_argument("--out", default=f"results/analysis/{name}")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    torch.manual_seed(0)
    if args.command == "gate":
        return gate_command(args)
    if args.command == "gate-stats":
        return gate_stats_command(args)
    if args.command == "logit-lens":
        return logit_lens_command(args)
    return cka_command(args)
