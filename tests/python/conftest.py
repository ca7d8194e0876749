"""Test setup: import torch_engram from this checkout (or, with ENGRAM_TEST_PACKAGE=installed,
the installed package; with ENGRAM_TEST_PACKAGE=DIR, the package under DIR), and a device list
where CUDA cases are collected everywhere and skip with a reason when no GPU is visible."""

import os
import sys
from pathlib import Path

import pytest
import torch

_package = os.environ.get("ENGRAM_TEST_PACKAGE", "")
if _package != "installed":
    sys.path.insert(0, _package or str(Path(__file__).resolve().parents[2] / "python"))


def package_root() -> str:
    """The directory holding the torch_engram under test (for subprocesses' sys.path): the
    checkout's python/, or the site-packages it was installed into."""
    import torch_engram

    return str(Path(torch_engram.__file__).resolve().parents[1])


DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible")),
]

# (atol, rtol) of an op against the float64 reference on the same (rounded) inputs; atol is
# relative to the largest reference magnitude. CUDA reduces over D in another order than the CPU.
TOL = {
    torch.float64: (1e-12, 1e-12),
    torch.float32: (2e-6, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1e-2, 1e-2),
}
CUDA_TOL = {**TOL, torch.float32: (4e-6, 2e-5)}


def assert_close(actual, expected, dtype, loosen=1.0, tol=TOL):
    atol, rtol = (loosen * t for t in tol[dtype])
    expected = expected.double().cpu()
    scale = max(expected.abs().max().item(), 1.0) if expected.numel() else 1.0
    torch.testing.assert_close(actual.double().cpu(), expected, atol=atol * scale, rtol=rtol)


def _weight_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def gate_inputs(lead, M, D, dtype, device="cpu", seed=0, w_dtype=None):
    """hidden [..., M, D], keys [..., M, D], value [..., D] in `dtype`, and the RMSNorm weight
    [M, D] in float32 (float64 for float64 inputs) unless `w_dtype` says otherwise."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, M, D, generator=g, dtype=torch.float64)
    k = torch.randn(*lead, M, D, generator=g, dtype=torch.float64)
    v = torch.randn(*lead, D, generator=g, dtype=torch.float64)
    w = 1 + 0.5 * torch.randn(M, D, generator=g, dtype=torch.float64)
    w_dtype = w_dtype or _weight_dtype(dtype)
    return [x.to(device, dtype), k.to(device, dtype), v.to(device, dtype), w.to(device, w_dtype)]


def conv_inputs(B, T, M, D, K, dtype, device="cpu", seed=0):
    """The conv input [B, T, M, D], its RMSNorm weight [M, D] and depthwise weight [M * D, K]."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(B, T, M, D, generator=g, dtype=torch.float64)
    nw = 1 + 0.3 * torch.randn(M, D, generator=g, dtype=torch.float64)
    cw = 0.5 * torch.randn(M * D, K, generator=g, dtype=torch.float64)
    w_dtype = _weight_dtype(dtype)
    return [u.to(device, dtype), nw.to(device, w_dtype), cw.to(device, w_dtype)]


def kv_of(k, v):
    """The fused K/V layout [..., (M + 1) * D] the gate op reads (keys, then the value)."""
    from torch_engram import ops

    return ops.gate_kv(k, v)


def gate(x, k, v, w, eps):
    """engram_gate on separate keys and value (differentiable in each through the concatenation)."""
    from torch_engram import ops

    return ops.engram_gate(x, kv_of(k, v), w, eps)


def one_layer_config():
    """A small Engram config of one layer (orders 2-3, 2 heads each, d_head 4, 50 compressed ids)."""
    from torch_engram import EngramConfig

    return EngramConfig(
        engram_vocab_size=(211, 307),
        max_ngram_size=3,
        n_embed_per_ngram=8,
        n_head_per_ngram=2,
        layer_ids=(1,),
        pad_id=0,
        compressed_vocab_size=50,
    )


def tiny_lm_config(vocab: int, engram_changes: dict | None = None, **changes):
    """A ModelConfig of a few thousand parameters with Engram in blocks 1 and 2 (orders 2-3, two
    heads of 4 per order, tables of 31 and 37 rows per head); `changes` override its fields."""
    from torch_engram.config import EngramConfig
    from torch_engram.experiment.models import ModelConfig

    engram = EngramConfig(
        **{
            "engram_vocab_size": (31, 37),
            "n_embed_per_ngram": 8,
            "n_head_per_ngram": 2,
            "layer_ids": (1, 2),
            "pad_id": 0,
            "compressed_vocab_size": vocab,
            **(engram_changes or {}),
        }
    )
    base = {
        "vocab_size": vocab,
        "d_model": 16,
        "n_layers": 3,
        "n_heads": 2,
        "max_seq_len": 32,
        "n_routed_experts": 6,
        "top_k": 2,
        "d_expert": 8,
        "d_shared": 16,
        "engram": engram,
    }
    return ModelConfig(**{**base, **changes})


def rss_mib() -> float:
    """Resident set size of this process (Linux /proc)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


HAS_PROC = os.path.exists("/proc/self/statm")


@pytest.fixture
def one_thread():
    # Tiny ops on a shared 2-core machine: one thread avoids OpenMP oversubscription stalls.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def deterministic():
    prev, warn = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(prev, warn_only=warn)


@pytest.fixture
def nondeterministic(monkeypatch):
    """The atomic dense backward: requested with ENGRAM_GATHER_BACKWARD=atomic, outside
    deterministic mode (the sorted path is the default)."""
    prev, warn = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(False)
    monkeypatch.setenv("ENGRAM_GATHER_BACKWARD", "atomic")
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(prev, warn_only=warn)


@pytest.fixture(params=["portable", "avx512"])
def cpu_kernel(request, monkeypatch):
    """One CPU ngram_hash kernel, forced through ENGRAM_NGRAM_HASH_ISA (a cap, read at each call);
    kernels this CPU lacks are skipped."""
    from torch_engram import _C

    monkeypatch.setenv("ENGRAM_NGRAM_HASH_ISA", request.param)
    if _C.ngram_hash_isa() != request.param:
        pytest.skip(f"this CPU has no {request.param} ngram_hash kernel")
    return request.param


# Real text: Python's own documentation, always installed, and byte-level BPEs trained on it
# offline (once per session: training takes seconds).
@pytest.fixture(scope="session")
def small_docs():
    from torch_engram.experiment.corpus import load_documents

    return load_documents(["pydoc_topics"])


@pytest.fixture(scope="session")
def small_bpe(small_docs):
    from torch_engram.experiment.corpus import train_bpe_tokenizer

    return train_bpe_tokenizer(small_docs, vocab_size=1024)


@pytest.fixture(scope="session")
def bpe(small_docs):
    from torch_engram.experiment.corpus import train_bpe_tokenizer

    return train_bpe_tokenizer(small_docs, vocab_size=2048)


@pytest.fixture(scope="session")
def comp(bpe):
    from torch_engram.tokenizer import build_compression

    return build_compression(bpe)
