"""ngram_hash and NgramHasher against golden numbers and an independent NumPy transcription of
the official algorithm (docs/SPEC.md section 2)."""

import io
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import torch_engram as te
from conftest import DEVICES
from torch_engram import reference

GOLDEN = Path(__file__).resolve().parents[1] / "data" / "golden_hash.txt"


def numpy_official_rows(x, config, v_comp, primes, pad):
    """Independent transcription of the official NumPy hashing: [L, B, T, H] global rows."""
    x = np.asarray(x, dtype=np.int64)
    _B, T = x.shape
    n_max, K = config.max_ngram_size, config.n_head_per_ngram
    half = max(1, int(np.iinfo(np.int64).max // v_comp) // 2)
    out = []
    for li, layer_id in enumerate(config.layer_ids):
        g = np.random.default_rng(int(config.seed + 10007 * layer_id))
        m = g.integers(0, half, size=(n_max,), dtype=np.int64) * 2 + 1
        shifts = [x] + [
            np.pad(x, ((0, 0), (k, 0)), mode="constant", constant_values=pad)[:, :T] for k in range(1, n_max)
        ]
        cols, base = [], 0
        for n in range(2, n_max + 1):
            mix = shifts[0] * m[0]
            for k in range(1, n):
                mix = np.bitwise_xor(mix, shifts[k] * m[k])
            for j in range(K):
                p = int(primes[li][n - 2][j])
                cols.append(mix % p + base)
                base += p
        out.append(np.stack(cols, axis=2))
    return np.stack(out)


def test_demo_primes_and_rows_golden():
    primes = te.layer_primes([646400, 646400], 2, 8)
    assert primes[0][0] == [646403, 646411, 646421, 646423, 646433, 646453, 646519, 646523]
    assert primes[0][1][0] == 646537 and primes[0][1][-1] == 646619
    assert primes[1][0][0] == 646631
    layout = te.TableLayout.from_config(te.EngramConfig.official_demo())
    assert layout.rows_per_layer == (10_344_164, 10_348_242)


def test_v41_layout_golden_and_fast():
    start = time.perf_counter()
    hasher = te.NgramHasher(te.EngramConfig.v41_flash())
    elapsed = time.perf_counter() - start
    assert hasher.rows_per_layer == (384_006_168, 384_016_682)
    assert hasher.primes.shape == (2, 24)
    # A generous bound: the layout is built from 48 prime searches near 16M.
    assert elapsed < 1.0, f"building the V4.1 layout took {elapsed:.3f}s"


def test_golden_file_matches_op(cpu_kernel):
    lines = GOLDEN.read_text().splitlines()
    cases = 0
    i = 0
    while i < len(lines):
        head = lines[i]
        assert head.startswith("case ")
        p0, p1, p2, p3 = head[5:].split("|")
        vocab = [int(v) for v in p0.split()[1:]]
        n, k, v_comp, pad, seed = (int(v) for v in p1.split())
        layers = [int(v) for v in p2.split()]
        t = int(p3)
        cfg = te.EngramConfig(
            engram_vocab_size=vocab,
            max_ngram_size=n,
            n_head_per_ngram=k,
            n_embed_per_ngram=k,
            layer_ids=layers,
            compressed_vocab_size=v_comp,
            pad_id=pad,
            seed=seed,
        )
        hasher = te.NgramHasher(cfg)
        ids = torch.tensor([int(v) for v in lines[i + 1].split()[1:]]).view(-1, t)
        out = hasher(ids, out_dtype=torch.int64)
        for li in range(len(layers)):
            mult = [int(v) for v in lines[i + 2 + 2 * li].split()[1:]]
            assert hasher.multipliers[li].tolist() == mult
            rows = torch.tensor([int(v) for v in lines[i + 3 + 2 * li].split()[1:]]).view(ids.shape[0], t, -1)
            assert torch.equal(out[li], rows)
        i += 2 + 2 * len(layers)
        cases += 1
    assert cases == 6


CONFIGS = {
    "demo": te.EngramConfig.official_demo(compressed_vocab_size=129280),
    "paper-27b": te.EngramConfig.paper_27b(compressed_vocab_size=99_000),
    "v4.1": te.EngramConfig.v41_flash(),
}


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("T", [1, 2, 3, 64])
@pytest.mark.parametrize("device", DEVICES)
def test_matches_numpy_official(name, T, device):
    cfg = CONFIGS[name]
    hasher = te.NgramHasher(cfg).to(device)
    v_comp = cfg.compressed_vocab_size
    g = torch.Generator().manual_seed(T)
    ids = torch.randint(0, v_comp, (3, T), generator=g)
    ids[0, 0] = v_comp - 1  # the largest id: products must not overflow
    expected = numpy_official_rows(
        ids.numpy(),
        cfg,
        v_comp,
        te.layer_primes(cfg.engram_vocab_size, len(cfg.layer_ids), cfg.n_head_per_ngram),
        cfg.pad_id,
    )
    out = hasher(ids.to(device))
    assert out.dtype == torch.int32  # every layer here has < 2^31 rows
    assert np.array_equal(out.cpu().numpy().astype(np.int64), expected)
    assert np.array_equal(hasher(ids.to(device), out_dtype=torch.int64).cpu().numpy(), expected)
    assert torch.equal(hasher(ids.to(device).int(), out_dtype=torch.int64).cpu(), torch.from_numpy(expected))


def assert_simd_eligible(hasher):
    """The AVX-512 kernel, and dmod in the portable one, take tables whose primes lie in [2^14, 2^31)
    (and, for AVX-512, whose heads per order are a multiple of 8); other tables silently use the
    portable kernel with its Barrett reduction."""
    assert hasher.config.n_head_per_ngram % 8 == 0
    assert int(hasher.primes.min()) >= 2**14 and int(hasher.primes.max()) < 2**31


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("B, T", [(3, 1), (3, 2), (2, 5), (3, 64), (3, 1500)])
def test_cpu_kernels_match_numpy_official(name, B, T, cpu_kernel):
    # 4500 tokens exceed the parallel grain, so with several threads a range starts mid-sequence.
    cfg = CONFIGS[name]
    hasher = te.NgramHasher(cfg)
    assert_simd_eligible(hasher)
    v_comp = cfg.compressed_vocab_size
    g = torch.Generator().manual_seed(T)
    ids = torch.randint(0, v_comp, (B, T), generator=g)
    ids[0, 0] = v_comp - 1
    expected = numpy_official_rows(
        ids.numpy(),
        cfg,
        v_comp,
        te.layer_primes(cfg.engram_vocab_size, len(cfg.layer_ids), cfg.n_head_per_ngram),
        cfg.pad_id,
    )
    assert np.array_equal(hasher(ids).numpy().astype(np.int64), expected)
    assert np.array_equal(hasher(ids, out_dtype=torch.int64).numpy(), expected)
    assert np.array_equal(hasher(ids.int()).numpy().astype(np.int64), expected)  # int32 ids read as is


@pytest.mark.parametrize("out_dtype", [torch.int32, torch.int64])
def test_cpu_kernels_lut_doc_start_oov_match_reference(out_dtype, cpu_kernel):
    g = torch.Generator().manual_seed(1)
    lut = torch.randint(0, 9000, (12000,), generator=g)
    lut[:9000] = torch.randperm(9000, generator=g)
    configs = (
        te.EngramConfig.official_demo(),
        te.EngramConfig.v41_flash(compressed_vocab_size=None),
        te.EngramConfig.official_demo(n_head_per_ngram=16, n_embed_per_ngram=1024, layer_ids=(0, 3, 9)),
    )
    for cfg in configs:
        hasher = te.NgramHasher(cfg, lut=lut)
        assert_simd_eligible(hasher)
        ids = torch.randint(0, 12000, (4, 300), generator=g)
        ids[1, ::13] = -100
        ids[2, 5::17] = 12000
        doc = torch.rand(4, 300, generator=g) < 0.1
        out = hasher(ids, doc_start=doc, out_dtype=out_dtype, oov_to_pad=True)
        ref = reference.ngram_hash(
            ids,
            hasher.lut,
            hasher.num_ids,
            hasher.multipliers,
            hasher.primes,
            hasher.offsets,
            hasher._pad_id,
            doc_start=doc,
            oov_to_pad=True,
        )
        assert out.dtype == out_dtype
        assert torch.equal(out.long(), ref)


def test_cpu_kernel_env_rejects_unknown_name(monkeypatch):
    hasher = te.NgramHasher(CONFIGS["demo"])
    monkeypatch.setenv("ENGRAM_NGRAM_HASH_ISA", "sse9")
    with pytest.raises(RuntimeError, match="ENGRAM_NGRAM_HASH_ISA must be auto, portable or avx512, got 'sse9'"):
        hasher(torch.tensor([[1, 2, 3]]))
    monkeypatch.setenv("ENGRAM_NGRAM_HASH_ISA", "portable")
    assert te._C.ngram_hash_isa() == "portable"


@pytest.mark.parametrize("device", DEVICES)
def test_lut_fused_equals_precompressed(device):
    g = torch.Generator().manual_seed(0)
    lut = torch.randint(0, 500, (2000,), generator=g)
    lut[:500] = torch.arange(500)  # surjective onto 0..499
    cfg = te.EngramConfig(engram_vocab_size=(3001, 4001), layer_ids=(0, 2), pad_id=7, n_embed_per_ngram=8)
    with_lut = te.NgramHasher(cfg, lut=lut).to(device)
    assert with_lut.compressed_vocab_size == 500
    plain = te.NgramHasher(cfg.replace(compressed_vocab_size=500, pad_id=int(lut[7]))).to(device)
    ids = torch.randint(0, 2000, (4, 33), generator=g)
    assert torch.equal(with_lut(ids.to(device)), plain(lut[ids].to(device)))


@pytest.mark.parametrize("device", DEVICES)
def test_doc_start_matches_reference_and_pads(device):
    cfg = te.EngramConfig(
        engram_vocab_size=(1009, 2003, 3001),
        max_ngram_size=4,
        n_head_per_ngram=3,
        n_embed_per_ngram=6,
        layer_ids=(1,),
        compressed_vocab_size=300,
        pad_id=0,
    )
    hasher = te.NgramHasher(cfg).to(device)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, 300, (2, 40), generator=g)
    doc = torch.rand(2, 40, generator=g) < 0.15
    out = hasher(ids.to(device), doc_start=doc.to(device), out_dtype=torch.int64).cpu()
    ref = reference.ngram_hash(
        ids, None, 300, hasher.multipliers.cpu(), hasher.primes.cpu(), hasher.offsets.cpu(), 0, doc_start=doc
    )
    assert torch.equal(out, ref)
    # A document starting at t makes every n-gram at t identical to the one at sequence start
    # with the same token, i.e. all shifts read the pad id.
    ids2 = ids.clone()
    ids2[:, 0] = ids[:, 20]
    doc2 = torch.zeros_like(doc)
    doc2[:, 20] = True
    out2 = hasher(ids2.to(device), doc_start=doc2.to(device)).cpu()
    assert torch.equal(out2[:, :, 20], out2[:, :, 0])
    # Without the boundary the n-grams at 20 see their left context and differ.
    assert not torch.equal(hasher(ids2.to(device)).cpu()[:, :, 20], out2[:, :, 0])


def test_pads_before_start_equal_explicit_pad_tokens():
    cfg = te.EngramConfig(
        engram_vocab_size=(1009, 2003), layer_ids=(0,), compressed_vocab_size=50, pad_id=3, n_embed_per_ngram=8
    )
    hasher = te.NgramHasher(cfg)
    ids = torch.tensor([[5, 9, 11]])
    padded = torch.tensor([[3, 3, 5, 9, 11]])
    assert torch.equal(hasher(ids), hasher(padded)[:, :, 2:])


def test_empty_batch_and_short_sequences():
    hasher = te.NgramHasher(CONFIGS["v4.1"])
    assert hasher(torch.zeros(0, 5, dtype=torch.long)).shape == (2, 0, 5, 24)
    assert hasher(torch.zeros(2, 0, dtype=torch.long)).shape == (2, 2, 0, 24)
    assert hasher(torch.tensor([[17, 4]])).shape == (2, 1, 2, 24)  # T < N


def test_bad_input_errors():
    cfg = te.EngramConfig(engram_vocab_size=(1009, 2003), layer_ids=(0,), pad_id=1, n_embed_per_ngram=8)
    lut = torch.arange(100) % 40
    hasher = te.NgramHasher(cfg, lut=lut)
    with pytest.raises(RuntimeError, match=r"ids must lie in \[0, 100\).*got -100"):
        hasher(torch.tensor([[1, -100, 3]]))
    with pytest.raises(RuntimeError, match=r"ids must lie in \[0, 100\).*got 100 at \[0, 2\]"):
        hasher(torch.tensor([[1, 2, 100]]))
    with pytest.raises(RuntimeError, match=r"ids must lie in \[0, 100\).*got -7 at \[1, 0\]"):
        hasher(torch.tensor([[1, 2, 3], [-7, 4, 5]], dtype=torch.int32))
    with pytest.raises(RuntimeError, match="ids must be \\[batch, seq\\]"):
        hasher(torch.tensor([1, 2, 3]))
    with pytest.raises(RuntimeError, match="ids must be int64 or int32"):
        hasher(torch.tensor([[1.0, 2.0]]))
    with pytest.raises(RuntimeError, match="doc_start must be bool"):
        hasher(torch.tensor([[1, 2]]), doc_start=torch.tensor([[1, 0]]))
    with pytest.raises(RuntimeError, match="out_dtype must be int64 or int32"):
        hasher(torch.tensor([[1, 2]]), out_dtype=torch.int16)
    # The explicit option maps out-of-range ids to the (compressed) pad id.
    mapped = hasher(torch.tensor([[5, -100, 7, 100]]), oov_to_pad=True)
    assert torch.equal(mapped, hasher(torch.tensor([[5, 1, 7, 1]])))


@pytest.mark.parametrize("device", DEVICES)
def test_pad_id_and_lut_entries_are_validated(device):
    # A pad id or a LUT entry outside the compressed vocabulary would make x' * m overflow and
    # corrupt rows silently; both are refused, and oov_to_pad does not hide a bad LUT entry.
    cfg = te.EngramConfig(engram_vocab_size=(1009, 2003), layer_ids=(0,), pad_id=1, n_embed_per_ngram=8)
    hasher = te.NgramHasher(cfg, lut=torch.arange(100) % 40).to(device)
    ids = torch.tensor([[1, 2, 3]], device=device)

    def run(lut=hasher.lut, pad_id=hasher.pad_id, oov_to_pad=False):
        out = torch.ops.engram.ngram_hash(
            ids,
            lut,
            hasher.num_ids,
            hasher.multipliers,
            hasher.primes,
            hasher.offsets,
            pad_id,
            None,
            torch.int64,
            oov_to_pad,
        )
        if device == "cuda":
            torch.cuda.synchronize()
        return out

    run()
    with pytest.raises(RuntimeError, match=r"pad_id must be a compressed id in \[0, num_ids=100\), got 100"):
        run(pad_id=100)
    with pytest.raises(RuntimeError, match=r"pad_id must be a compressed id in \[0, num_ids=100\), got -1"):
        run(pad_id=-1)
    if device == "cuda":
        return  # bad LUT values trip a device-side assert, which would poison the CUDA context
    for value in (-3, 100, 2**62):
        lut = hasher.lut.clone()
        lut[2] = value
        for oov in (False, True):
            with pytest.raises(
                RuntimeError,
                match=rf"lut entries must be compressed ids in \[0, \d+\).*"
                rf"got lut\[2\] = {value} at \[0, 1\]",
            ):
                run(lut=lut, oov_to_pad=oov)
    # Without a LUT, ids are compressed ids already: their bound is num_ids, and products fit.
    lut = hasher.lut.clone()
    lut[5] = 39
    run(lut=lut)


def test_int32_output_refused_past_2_31_rows():
    cfg = te.EngramConfig(
        engram_vocab_size=(2**31 - 5, 10),
        layer_ids=(0,),
        compressed_vocab_size=10,
        pad_id=0,
        n_head_per_ngram=1,
        n_embed_per_ngram=1,
    )
    hasher = te.NgramHasher(cfg)
    assert hasher(torch.tensor([[1, 2]])).dtype == torch.int64  # chosen automatically
    with pytest.raises(RuntimeError, match="int32 needs fewer than 2\\^31 rows"):
        hasher(torch.tensor([[1, 2]]), out_dtype=torch.int32)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(max_ngram_size=1, engram_vocab_size=()), "max_ngram_size must be >= 2"),
        (dict(engram_vocab_size=(100,)), "engram_vocab_size must be one size per order"),
        (dict(n_embed_per_ngram=12, n_head_per_ngram=8), "n_embed_per_ngram must be a positive multiple"),
        (dict(layer_ids=(1, 1)), "layer_ids must be distinct"),
        (dict(layer_ids=()), "layer_ids must be non-empty"),
        (dict(pad_id=-1), "pad_id must be >= 0"),
        (dict(gate_eps=-1.0), "gate_eps must be >= 0"),
    ],
)
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        te.EngramConfig(**kwargs)


def test_hasher_needs_vocab_and_checks_pad():
    with pytest.raises(ValueError, match="compressed_vocab_size"):
        te.NgramHasher(te.EngramConfig.official_demo())
    with pytest.raises(ValueError, match="pad_id must lie in \\[0, 10\\)"):
        te.NgramHasher(te.EngramConfig.official_demo(pad_id=10), lut=torch.arange(10))


def test_state_dict_round_trip_reproduces_rows():
    lut = torch.randint(0, 300, (1000,))
    lut[:300] = torch.randperm(300)
    cfg = te.EngramConfig(engram_vocab_size=(1009, 2003), layer_ids=(0, 5), pad_id=4, n_embed_per_ngram=8, seed=9)
    src = te.NgramHasher(cfg, lut=lut)
    buf = io.BytesIO()
    torch.save(src.state_dict(), buf)
    buf.seek(0)
    dst = te.NgramHasher(cfg, lut=lut)
    dst.load_state_dict(torch.load(buf))
    assert set(src.state_dict()) == {"lut", "multipliers", "primes", "offsets", "pad_id"}
    ids = torch.randint(0, 1000, (2, 50))
    assert torch.equal(src(ids), dst(ids))


def test_torch_compile_fullgraph():
    hasher = te.NgramHasher(CONFIGS["demo"])
    ids = torch.randint(0, 129280, (2, 16))
    compiled = torch.compile(lambda x: hasher(x, out_dtype=torch.int64) + 1, fullgraph=True, backend="eager")
    assert torch.equal(compiled(ids), hasher(ids, out_dtype=torch.int64) + 1)


def test_opcheck():
    hasher = te.NgramHasher(CONFIGS["demo"])
    ids = torch.randint(0, 129280, (2, 16))
    torch.library.opcheck(
        torch.ops.engram.ngram_hash.default,
        (ids, None, 129280, hasher.multipliers, hasher.primes, hasher.offsets, 2),
        {"out_dtype": torch.int32},
    )
