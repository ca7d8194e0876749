"""EngramConfig: every hyperparameter of an Engram model's hashing and layers, with presets."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace


@dataclass(frozen=True)
class EngramConfig:
    """Engram hyperparameters, named as in docs/SPEC.md and the official demo.

    engram_vocab_size: nominal rows per table for each order 2..N (the prime search starts here).
    max_ngram_size: N, the largest n-gram order hashed (orders 2..N).
    n_embed_per_ngram: width of one order's embedding, split over n_head_per_ngram heads.
    layer_ids: block indices (0-based) that carry an Engram layer; they also seed the multipliers.
    pad_id: raw tokenizer id used before the sequence start (compressed through the LUT).
    compressed_vocab_size: V', the compressed vocabulary size; None means "take it from the LUT".
    gate_eps: RMSNorm eps of the gate; None is PyTorch's default (the dtype's machine epsilon),
        as in the official demo. conv_eps: eps of the short-conv RMSNorm.
    use_conv: the paper/demo form Y = U + SiLU(Conv(RMSNorm(U))); False is the V4.1 form.
    proj_bias: bias on the key/value projections (demo: True, V4.1: False).
    """

    engram_vocab_size: tuple[int, ...] = (129280 * 5, 129280 * 5)
    max_ngram_size: int = 3
    n_embed_per_ngram: int = 512
    n_head_per_ngram: int = 8
    layer_ids: tuple[int, ...] = (1, 15)
    pad_id: int = 2
    seed: int = 0
    compressed_vocab_size: int | None = None
    kernel_size: int = 4
    use_conv: bool = True
    proj_bias: bool = True
    gate_eps: float | None = None
    conv_eps: float = 1e-5

    def __post_init__(self) -> None:
        object.__setattr__(self, "engram_vocab_size", tuple(int(v) for v in self.engram_vocab_size))
        object.__setattr__(self, "layer_ids", tuple(int(v) for v in self.layer_ids))
        self.validate()

    # Derived sizes (docs/SPEC.md symbols).
    @property
    def num_orders(self) -> int:
        return self.max_ngram_size - 1

    @property
    def num_heads(self) -> int:
        """H = (N - 1) * K lookups per token per layer."""
        return self.num_orders * self.n_head_per_ngram

    @property
    def d_head(self) -> int:
        return self.n_embed_per_ngram // self.n_head_per_ngram

    @property
    def d_mem(self) -> int:
        return self.num_heads * self.d_head

    @property
    def dilation(self) -> int:
        """Short-conv dilation: the official code uses max_ngram_size."""
        return self.max_ngram_size

    def validate(self) -> None:
        def fail(name: str, expected: str, got) -> None:
            raise ValueError(f"EngramConfig: {name} must be {expected}, got {got!r}")

        if self.max_ngram_size < 2:
            fail("max_ngram_size", ">= 2", self.max_ngram_size)
        if len(self.engram_vocab_size) != self.num_orders:
            fail(
                "engram_vocab_size",
                f"one size per order 2..{self.max_ngram_size} ({self.num_orders} entries)",
                self.engram_vocab_size,
            )
        if any(v < 2 for v in self.engram_vocab_size):
            fail("engram_vocab_size", "entries >= 2", self.engram_vocab_size)
        if self.n_head_per_ngram < 1:
            fail("n_head_per_ngram", ">= 1", self.n_head_per_ngram)
        if self.n_embed_per_ngram < 1 or self.n_embed_per_ngram % self.n_head_per_ngram:
            fail(
                "n_embed_per_ngram",
                f"a positive multiple of n_head_per_ngram={self.n_head_per_ngram}",
                self.n_embed_per_ngram,
            )
        if not self.layer_ids:
            fail("layer_ids", "non-empty", self.layer_ids)
        if len(set(self.layer_ids)) != len(self.layer_ids) or min(self.layer_ids) < 0:
            fail("layer_ids", "distinct non-negative block indices", self.layer_ids)
        if self.pad_id < 0:
            fail("pad_id", ">= 0", self.pad_id)
        if self.seed < 0:
            fail("seed", ">= 0", self.seed)
        if self.compressed_vocab_size is not None and self.compressed_vocab_size < 1:
            fail("compressed_vocab_size", ">= 1 or None", self.compressed_vocab_size)
        if self.kernel_size < 1:
            fail("kernel_size", ">= 1", self.kernel_size)
        if self.gate_eps is not None and not self.gate_eps >= 0:
            fail("gate_eps", ">= 0 or None", self.gate_eps)
        if not self.conv_eps >= 0:
            fail("conv_eps", ">= 0", self.conv_eps)

    def replace(self, **changes) -> EngramConfig:
        return replace(self, **changes)

    def to_dict(self) -> dict:
        return asdict(self)

    # Presets -------------------------------------------------------------------------------
    @classmethod
    def official_demo(cls, **overrides) -> EngramConfig:
        """deepseek-ai/Engram engram_demo_v1.py: orders 2-3, 8 heads, d_head 64, blocks 1 and 15."""
        return cls(**overrides)

    @classmethod
    def paper_27b(cls, **overrides) -> EngramConfig:
        """Paper Engram-27B: orders 2-3, 8 heads, d_head 80, 2,262,400 rows per table."""
        base = dict(engram_vocab_size=(2262400, 2262400), n_embed_per_ngram=640, layer_ids=(1, 14))
        return cls(**{**base, **overrides})

    @classmethod
    def v41_flash(cls, **overrides) -> EngramConfig:
        """DeepSeek-V4.1-Flash: orders 2-4, 8 heads, d_head 256, 16M rows per table, no conv,
        no projection bias, gate eps 1e-20, compressed vocabulary 99,092."""
        base = dict(
            engram_vocab_size=(16_000_000,) * 3,
            max_ngram_size=4,
            n_embed_per_ngram=2048,
            layer_ids=(1, 14),
            compressed_vocab_size=99_092,
            use_conv=False,
            proj_bias=False,
            gate_eps=1e-20,
        )
        return cls(**{**base, **overrides})


PRESETS = {
    "demo": EngramConfig.official_demo,
    "paper-27b": EngramConfig.paper_27b,
    "v4.1-flash": EngramConfig.v41_flash,
}
