"""python -m torch_engram.analyze on saved models: the gate heat map (PNG + HTML), LogitLens and
CKA, with checks of what the figures must show (alpha in (0, 1), zero KL at the last layer, CKA of a
model with itself the identity's best match)."""

import csv

import pytest
import torch

import torch_engram as te
from torch_engram.experiment import analysis
from torch_engram.experiment.models import ModelConfig, TransformerLM, save_model

pytestmark = pytest.mark.usefixtures("one_thread")
PRESET = {"max_bytes": 400_000, "val_fraction": 0.1}  # the corpus share the "sweep" used


@pytest.fixture(scope="module")
def saved(tmp_path_factory, small_bpe, small_docs):
    from torch_engram.tokenizer import build_compression

    d = tmp_path_factory.mktemp("models")
    lut = build_compression(small_bpe).lut
    V = small_bpe.get_vocab_size()
    engram = te.EngramConfig(
        engram_vocab_size=(997, 1009), n_embed_per_ngram=16, n_head_per_ngram=2, layer_ids=(1, 2), pad_id=2
    )
    base = dict(vocab_size=V, d_model=32, n_layers=3, n_heads=2, max_seq_len=64, n_routed_experts=4, top_k=2,
                d_expert=16, d_shared=32)  # fmt: skip
    torch.manual_seed(0)
    eng = TransformerLM(ModelConfig(**base, hc_mult=2, engram=engram), lut=lut)
    with torch.no_grad():
        for e in eng.engram_modules():
            e.kv_proj.weight.normal_(std=0.3)  # a spread of gate values
    moe = TransformerLM(ModelConfig(**base))
    save_model(d / "engram", eng, small_bpe, extra={"run": {"rho": 0.8}, "preset": PRESET})
    save_model(d / "moe", moe, small_bpe, extra={"run": {"rho": 1.0}})
    text = d / "held_out.txt"
    text.write_text(small_docs[1][:6000])
    return d, text


def test_gate_heat_map(saved, tmp_path):
    d, _ = saved
    out = tmp_path / "gate"
    got = analysis.main(
        ["gate", "--model", str(d / "engram"), "--text", "Alexander the Great and the Milky Way.", "--out", str(out)]
    )
    assert sorted(got["alphas"]) == [1, 2]
    T = len(got["texts"])
    for a in got["alphas"].values():
        assert a.shape == (T, 2) and bool(((a > 0) & (a < 1)).all())
        assert float(a.std()) > 0.01  # the figure has something to show
    page = (out / "gate.html").read_text()
    assert page.count("<span style=") == 4 * T  # 2 layers x 2 branches, every token
    assert "block 2, branch 1: mean alpha" in page
    assert (out / "gate.png").read_bytes()[:4] == b"\x89PNG"
    # The top tokens are the highest alphas, in order.
    top = got["top"]["block 1, branch 0"]
    assert [v for _, v in top] == sorted((v for _, v in top), reverse=True)
    assert top[0][1] == pytest.approx(float(got["alphas"][1][:, 0].max()))
    with pytest.raises(SystemExit, match="no Engram layer"):
        analysis.main(["gate", "--model", str(d / "moe"), "--text", "x", "--out", str(out)])


def test_gate_values_equal_the_reference_gate(saved):
    # The captured alpha is the gate of the layer's own inputs: the reference gate of the hidden
    # stream and the key projection the layer computed.
    from torch_engram import reference
    from torch_engram.experiment.models import load_model

    d, _ = saved
    model, tok, _ = load_model(d / "engram")
    ids = torch.tensor(tok.encode("def f(x): return x + 1").ids)
    e = model.engram_modules()[0]
    seen = {}
    e.register_forward_pre_hook(lambda m, args: seen.update(hidden=args[0]) or None)
    e.kv_proj.register_forward_hook(lambda m, i, o: seen.update(kv=o) or None)
    alphas = analysis.gate_values(model, ids)
    assert e.capture_gate is False and e.last_gate is None  # switched off again
    M, D = 2, 32
    key = seen["kv"][..., : M * D].unflatten(-1, (M, D))
    ones = torch.ones(*key.shape[:-2], D)
    want = reference.engram_gate(seen["hidden"], key, ones, e.gate_gain(), torch.finfo(torch.float32).eps)[..., 0]
    torch.testing.assert_close(alphas[1], want[0], atol=1e-5, rtol=1e-5)


def test_logit_lens_and_cka(saved, tmp_path):
    d, text = saved
    common = ["--model", str(d / "engram"), "--baseline", str(d / "moe"), "--text-file", str(text), "--tokens", "1024"]
    curves = analysis.main(["logit-lens", *common, "--out", str(tmp_path / "ll")])
    assert len(curves) == 2
    for kl in curves.values():
        assert len(kl) == 4 and kl[-1] == pytest.approx(0.0, abs=1e-6) and min(kl) >= -1e-6
    with open(tmp_path / "ll" / "logit_lens.csv") as f:
        assert len(list(csv.DictReader(f))) == 8
    assert (tmp_path / "ll" / "logit_lens.png").exists()
    res = analysis.main(["cka", *common, "--out", str(tmp_path / "cka")])
    m = res["matrix"]
    assert m.shape == (4, 4) and bool(((m >= 0) & (m <= 1 + 1e-9)).all())
    assert (tmp_path / "cka" / "cka.png").exists()
    # A model against itself: CKA 1 on the diagonal, every layer its own best match.
    self_common = ["--model", str(d / "engram"), "--baseline", str(d / "engram"), "--text-file", str(text)]
    same = analysis.main(["cka", *self_common, "--tokens", "1024", "--out", str(tmp_path / "self")])
    assert torch.allclose(same["matrix"].diagonal(), torch.ones(4, dtype=same["matrix"].dtype), atol=1e-9)
    assert same["best"] == [0, 1, 2, 3]


def test_linear_cka_properties():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 16, generator=g)
    q, _ = torch.linalg.qr(torch.randn(16, 16, generator=g))
    assert analysis.linear_cka(x, x @ q * 3.0) == pytest.approx(1.0)  # rotation and scale invariant
    assert analysis.linear_cka(x, torch.randn(200, 16, generator=g)) < 0.3


def test_gate_by_bigram_frequency(saved, tmp_path):
    d, _ = saved
    stats = analysis.main(["gate-stats", "--model", str(d / "engram"), "--tokens", "2048", "--out", str(tmp_path)])
    assert sorted(stats) == [1, 2]
    for buckets in stats.values():
        assert set(buckets) <= {"0", "1-9", "10-99", "100-999", "1000+"} and len(buckets) >= 3
        assert sum(n for _, n in buckets.values()) == 2048 // 64 * 63  # sequences of 64, the first token out
        assert all(0 < a < 1 for a, _ in buckets.values())
    with open(tmp_path / "gate_by_frequency.csv") as f:
        assert len(list(csv.DictReader(f))) == sum(len(b) for b in stats.values())
