"""ModelConfig: the shape of the reference decoder-only MoE transformer (with optional Engram)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from ...config import EngramConfig

ROUTINGS = ("softmax", "sigmoid")


def default_engram_layers(n_layers: int) -> tuple[int, ...]:
    """Block 1 and a middle block (0-based), after the paper's blocks 2 and 15 of 30 (1-based).

    Block 0 is avoided: the gate's query is the residual stream, which should have passed through at
    least one attention layer (docs/SPEC.md section 6).
    """
    if n_layers < 2:
        raise ValueError(f"default_engram_layers: n_layers must be >= 2, got {n_layers}")
    mid = n_layers // 2
    return (1,) if mid <= 1 else (1, mid)


@dataclass(frozen=True)
class ModelConfig:
    """Decoder-only transformer: token embedding, n_layers blocks, final RMSNorm, LM head.

    Each block: [Engram] -> RMSNorm -> rotary causal attention -> RMSNorm -> FFN, each added to the
    residual. The first n_dense_layers blocks use a dense SwiGLU FFN of width d_dense; the others a
    routed MoE: n_routed_experts SwiGLU experts of width d_expert, top_k per token, plus one always-on
    shared SwiGLU expert of width d_shared (0 drops it).

    hc_mult (M): number of residual branches. M = 1 is a plain residual [B, T, D]. M > 1 keeps
    [B, T, M, D] with a fixed, parameter-free mixing: attention and FFN read the mean of the branches
    and their output is added to every branch; the embedding is copied into every branch and the
    LM head reads their mean. Engram alone treats branches separately (one gate per branch).

    engram: the Engram layers' config (its layer_ids are block indices), or None for a pure MoE.
    engram_table_init_std: tables start as N(0, std^2). The official demo's nn.Embedding gives
        N(0, 1); with Adam moving a row by about the LR per update, such rows stay mostly noise
        until touched ~100 times, which a short run never reaches for most n-grams. 0.02 (the token
        embedding's std) lets a row's learned part dominate after a few updates.
    """

    vocab_size: int
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    n_dense_layers: int = 0
    d_dense: int = 512
    n_routed_experts: int = 16
    top_k: int = 2
    d_expert: int = 64
    d_shared: int = 256
    routing: str = "softmax"
    aux_loss_coef: float = 0.01
    hc_mult: int = 1
    tie_embeddings: bool = False
    engram: EngramConfig | None = None
    engram_table_init_std: float = 0.02

    def __post_init__(self) -> None:
        self.validate()

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def n_moe_layers(self) -> int:
        return self.n_layers - self.n_dense_layers

    def validate(self) -> None:
        def fail(name: str, expected: str, got) -> None:
            raise ValueError(f"ModelConfig: {name} must be {expected}, got {got!r}")

        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "max_seq_len", "hc_mult"):
            if getattr(self, name) < 1:
                fail(name, ">= 1", getattr(self, name))
        if self.d_model % self.n_heads or self.head_dim % 2:
            fail(
                "d_model",
                f"a multiple of 2 * n_heads={2 * self.n_heads} (even rotary head_dim)",
                self.d_model,
            )
        if not 0 <= self.n_dense_layers <= self.n_layers:
            fail("n_dense_layers", f"in [0, n_layers={self.n_layers}]", self.n_dense_layers)
        if self.n_dense_layers and self.d_dense < 1:
            fail("d_dense", ">= 1 when n_dense_layers > 0", self.d_dense)
        if self.n_moe_layers:
            if self.top_k < 1:
                fail("top_k", ">= 1", self.top_k)
            if self.n_routed_experts < self.top_k:
                fail("n_routed_experts", f">= top_k={self.top_k}", self.n_routed_experts)
            if self.d_expert < 1:
                fail("d_expert", ">= 1", self.d_expert)
        if self.d_shared < 0:
            fail("d_shared", ">= 0", self.d_shared)
        if self.routing not in ROUTINGS:
            fail("routing", f"one of {ROUTINGS}", self.routing)
        if self.aux_loss_coef < 0:
            fail("aux_loss_coef", ">= 0", self.aux_loss_coef)
        if not self.engram_table_init_std > 0:
            fail("engram_table_init_std", "> 0", self.engram_table_init_std)
        if self.engram is not None:
            bad = [i for i in self.engram.layer_ids if i >= self.n_layers]
            if bad:
                fail("engram.layer_ids", f"block indices < n_layers={self.n_layers}", self.engram.layer_ids)

    def replace(self, **changes) -> ModelConfig:
        return replace(self, **changes)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        d = dict(d)
        if d.get("engram") is not None:
            d["engram"] = EngramConfig(**d["engram"])
        return cls(**d)
