"""The allocation law (docs/SPEC.md section 8): parameter counts of a ModelConfig, and the split of a
fixed sparse budget between routed experts (rho) and Engram table slots (1 - rho).

Definitions, exactly as counted here:
- P_tot: every trainable parameter except the token embedding and the LM head (tied or not).
- P_act: parameters used per token: norms, attention, dense FFNs, routers, shared experts, top_k of
  the E routed experts in each MoE block, Engram's dense parts (key/value projections and their
  biases, gate norms, conv norm and conv weight), and the H * d_head table values each token reads
  in each Engram layer.
- P_sparse = P_tot - P_act = (E - top_k) * P_expert * L_moe + sum_l (R_l - H) * d_head, with R_l
  the (prime-adjusted) table rows of Engram layer l.
- rho = routed share of P_sparse. rho = 1: pure MoE, no Engram.

How `allocate` keeps both totals fixed while moving sparse parameters to Engram:
1. The routed expert count is E = top_k + round(rho * P_sparse / (P_expert * L_moe)).
2. Engram adds activated parameters (its dense parts and the H * d_head values read per layer) and
   fewer experts shrink the routers. Both are compensated by the width of the shared expert:
   d_shared is solved so that P_act matches the target (error <= 1.5 * D * L_moe parameters). The
   routed experts, top_k, attention and every other width are untouched. A base config needs a
   shared expert wide enough to absorb Engram's dense parameters, else `allocate` says so.
3. What is left of P_tot goes to the tables: one nominal size per order (equal across orders and
   layers), searched so that the prime-adjusted rows (TableLayout) bring P_tot closest to target.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from functools import lru_cache

from ..config import EngramConfig
from ..hashing import TableLayout
from .models.config import ModelConfig


# Analytic counts -------------------------------------------------------------------------------
def swiglu_params(d_model: int, d_hidden: int) -> int:
    return 3 * d_model * d_hidden


def engram_dense_params(ecfg: EngramConfig, d_model: int, hc_mult: int) -> int:
    """Per Engram layer: value projection and M key projections (d_mem -> D, optional bias), the
    gate's query and key RMSNorm gains (M x D each), and with the conv its RMSNorm gains (M x D)
    and depthwise weight (M x D x kernel, no bias)."""
    D, M = d_model, hc_mult
    n = (M + 1) * (ecfg.d_mem * D + (D if ecfg.proj_bias else 0))
    n += 2 * M * D
    if ecfg.use_conv:
        n += M * D + M * D * ecfg.kernel_size
    return n


@lru_cache(maxsize=4096)
def _rows_per_layer(vocab: tuple[int, ...], n_layers: int, n_head: int) -> tuple[int, ...]:
    probe = EngramConfig(
        engram_vocab_size=vocab,
        max_ngram_size=len(vocab) + 1,
        n_embed_per_ngram=n_head,
        n_head_per_ngram=n_head,
        layer_ids=tuple(range(n_layers)),
    )
    return TableLayout.from_config(probe).rows_per_layer


def engram_rows_per_layer(ecfg: EngramConfig) -> tuple[int, ...]:
    """Prime-adjusted rows of each Engram layer's concatenated table (the hasher's rows_per_layer)."""
    return _rows_per_layer(ecfg.engram_vocab_size, len(ecfg.layer_ids), ecfg.n_head_per_ngram)


@dataclass(frozen=True)
class ParamCounts:
    total: int  # P_tot
    active: int  # P_act
    routed: int  # all routed-expert parameters
    routed_inactive: int  # routed-expert parameters a token does not use
    engram_tables: int  # all table values
    engram_inactive: int  # table values a token does not read
    engram_dense: int  # projections, norms, conv of all Engram layers
    excluded: int  # token embedding + LM head (not in P_tot)

    @property
    def sparse(self) -> int:
        return self.total - self.active

    @property
    def rho(self) -> float:
        """Routed share of the sparse parameters (1.0 when there are none)."""
        return self.routed_inactive / self.sparse if self.sparse else 1.0

    def to_dict(self) -> dict:
        return {**asdict(self), "sparse": self.sparse, "rho": self.rho}

    @classmethod
    def from_parts(
        cls,
        total: int,
        routed: int,
        routed_inactive: int,
        tables: int,
        tables_read: int,
        engram_dense: int,
        excluded: int,
    ) -> ParamCounts:
        """P_act is everything but the unused routed experts and the table values not read."""
        return cls(
            total=total,
            active=total - routed_inactive - (tables - tables_read),
            routed=routed,
            routed_inactive=routed_inactive,
            engram_tables=tables,
            engram_inactive=tables - tables_read,
            engram_dense=engram_dense,
            excluded=excluded,
        )


def count_params(cfg: ModelConfig) -> ParamCounts:
    """P_tot, P_act and their parts, from the config alone (tables through TableLayout)."""
    D, L = cfg.d_model, cfg.n_layers
    dense = L * (2 * D + 4 * D * D) + D  # block norms, attention, final norm
    dense += cfg.n_dense_layers * swiglu_params(D, cfg.d_dense)
    L_moe = cfg.n_moe_layers
    E, k = cfg.n_routed_experts, cfg.top_k
    dense += L_moe * (D * E + swiglu_params(D, cfg.d_shared))  # routers + shared experts
    expert = swiglu_params(D, cfg.d_expert)
    routed = L_moe * E * expert
    routed_inactive = L_moe * (E - k) * expert
    tables = tables_read = eng_dense = 0
    if cfg.engram is not None:
        e = cfg.engram
        tables = sum(engram_rows_per_layer(e)) * e.d_head
        tables_read = len(e.layer_ids) * e.num_heads * e.d_head
        eng_dense = len(e.layer_ids) * engram_dense_params(e, D, cfg.hc_mult)
    total = dense + routed + eng_dense + tables
    excluded = cfg.vocab_size * D * (1 if cfg.tie_embeddings else 2)
    return ParamCounts.from_parts(total, routed, routed_inactive, tables, tables_read, eng_dense, excluded)


def count_model_params(model) -> ParamCounts:
    """The same counts read off a built TransformerLM's parameters (the analytic cross-check)."""
    excluded_ids = {id(model.embed.weight), id(model.lm_head.weight)}
    excluded = sum(p.numel() for p in {id(p): p for p in (model.embed.weight, model.lm_head.weight)}.values())
    total = sum(p.numel() for p in model.parameters() if id(p) not in excluded_ids)
    routed = routed_inactive = 0
    for moe in model.moe_modules():
        n = sum(p.numel() for p in moe.routed_parameters())
        routed += n
        routed_inactive += n * (moe.n_experts - moe.top_k) // moe.n_experts
    tables = tables_read = eng_dense = 0
    for eng in model.engram_modules():
        tables += eng.table.weight.numel()
        tables_read += model.cfg.engram.num_heads * model.cfg.engram.d_head
        eng_dense += sum(p.numel() for p in eng.dense_parameters())
    return ParamCounts.from_parts(total, routed, routed_inactive, tables, tables_read, eng_dense, excluded)


# Allocation ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Allocation:
    rho: float  # requested
    config: ModelConfig
    counts: ParamCounts  # realised
    target_total: int
    target_active: int

    @property
    def rho_realised(self) -> float:
        return self.counts.rho

    @property
    def total_error(self) -> float:
        return self.counts.total / self.target_total - 1.0

    @property
    def active_error(self) -> float:
        return self.counts.active / self.target_active - 1.0

    def summary(self) -> dict:
        c, e = self.config, self.config.engram
        return {
            "rho": self.rho,
            "rho_realised": self.rho_realised,
            "n_routed_experts": c.n_routed_experts,
            "top_k": c.top_k,
            "d_shared": c.d_shared,
            "engram_vocab_size": list(e.engram_vocab_size) if e else [],
            "engram_rows": list(engram_rows_per_layer(e)) if e else [],
            "P_tot": self.counts.total,
            "P_act": self.counts.active,
            "P_tot_target": self.target_total,
            "P_act_target": self.target_active,
            "P_tot_error": self.total_error,
            "P_act_error": self.active_error,
            "P_routed": self.counts.routed,
            "P_engram_tables": self.counts.engram_tables,
            "P_engram_dense": self.counts.engram_dense,
        }


def _search_vocab(num_orders: int, n_layers: int, n_head: int, target_rows: float) -> int:
    """Nominal size per order whose prime-adjusted total rows (all layers) are closest to target."""

    def rows(v: int) -> int:
        return sum(_rows_per_layer((v,) * num_orders, n_layers, n_head))

    lo, hi = 2, max(3, int(target_rows / (num_orders * n_head * n_layers)) + 2)
    while rows(hi) < target_rows:
        hi *= 2
    while lo < hi:  # smallest v with rows(v) >= target
        mid = (lo + hi) // 2
        if rows(mid) >= target_rows:
            hi = mid
        else:
            lo = mid + 1
    if lo > 2 and target_rows - rows(lo - 1) < rows(lo) - target_rows:
        return lo - 1
    return lo


def allocate(base: ModelConfig, rho: float, engram: EngramConfig | None = None, tol: float = 0.01) -> Allocation:
    """The config with base's P_tot and P_act and a routed share rho of the sparse parameters.

    base: the reference config (usually a pure MoE, rho = 1); its P_tot and P_act are the targets.
    engram: the Engram shape to use when rho < 1 (layers, orders, heads, d_head, conv...); its
        engram_vocab_size is replaced. Defaults to base.engram.
    tol: the largest relative error of realised P_tot and P_act; beyond it a ValueError says why.
    """
    if not 0.0 < rho <= 1.0:
        raise ValueError(f"allocate: rho must be in (0, 1], got {rho!r}")
    if base.n_moe_layers == 0:
        raise ValueError("allocate: base must have MoE blocks (n_dense_layers < n_layers)")
    engram = engram if engram is not None else base.engram
    if rho < 1.0 and engram is None:
        raise ValueError("allocate: rho < 1 needs an Engram config (pass engram= or set base.engram)")
    if engram is not None and max(engram.layer_ids) >= base.n_layers:
        raise ValueError(f"allocate: engram.layer_ids must be < n_layers={base.n_layers}, got {engram.layer_ids}")

    target = count_params(base)
    D, L_moe, k = base.d_model, base.n_moe_layers, base.top_k
    unit = swiglu_params(D, base.d_expert) * L_moe  # one routed expert in every MoE block
    sparse = target.sparse

    n_free = round(rho * sparse / unit)
    eng = None
    if rho < 1.0:
        n_layers, H = len(engram.layer_ids), engram.num_heads
        min_rows = sum(_rows_per_layer((2,) * engram.num_orders, n_layers, engram.n_head_per_ngram))
        min_inactive = (min_rows - n_layers * H) * engram.d_head
        n_free = min(n_free, math.floor((sparse - min_inactive) / unit))
        if n_free < 0:
            raise ValueError(
                f"allocate: the sparse budget ({sparse} params) is smaller than the smallest "
                f"Engram tables ({min_inactive} unread params)"
            )
        eng = engram.replace(engram_vocab_size=(2,) * engram.num_orders)
    E = k + n_free

    # Shared expert width absorbs Engram's activated parameters and the router change.
    probe = base.replace(n_routed_experts=E, d_shared=0, engram=eng)
    active_wo_shared = count_params(probe).active
    per_unit = swiglu_params(D, 1) * L_moe
    d_shared = round((target.active - active_wo_shared) / per_unit)
    if d_shared < 0:
        raise ValueError(
            f"allocate: cannot keep P_act={target.active} at rho={rho}: Engram's activated parameters "
            f"({count_params(probe).active - count_params(probe.replace(engram=None)).active}) exceed what "
            f"the shared experts can give up ({L_moe} x d_shared={base.d_shared}); use a wider shared "
            f"expert or a smaller Engram (n_embed_per_ngram, heads, layers)"
        )
    cfg = probe.replace(d_shared=d_shared)

    if eng is not None:
        counts = count_params(cfg)
        table_inactive = target.total - counts.active - counts.routed_inactive
        target_rows = table_inactive / eng.d_head + len(eng.layer_ids) * eng.num_heads
        v = _search_vocab(eng.num_orders, len(eng.layer_ids), eng.n_head_per_ngram, target_rows)
        cfg = cfg.replace(engram=eng.replace(engram_vocab_size=(v,) * eng.num_orders))

    out = Allocation(
        rho=rho, config=cfg, counts=count_params(cfg), target_total=target.total, target_active=target.active
    )
    if abs(out.total_error) > tol or abs(out.active_error) > tol:
        raise ValueError(
            f"allocate: realised P_tot={out.counts.total} ({out.total_error:+.2%}) and "
            f"P_act={out.counts.active} ({out.active_error:+.2%}) miss the targets "
            f"{target.total} / {target.active} by more than tol={tol:.0%} at rho={rho}"
        )
    return out
