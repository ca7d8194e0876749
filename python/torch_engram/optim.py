"""Optimizers for Engram tables far larger than memory (ENGRAM.md section 7).

Three ways to train a table, all with the same lazy row-wise Adam (the `sparse_adam_step` op):

* "dense": the table gets an ordinary dense .grad; `SparseTableAdam` updates the rows whose
  gradient is not all zero. Needs a table-sized gradient.
* "sparse": `multihead_gather(..., sparse_grad=True)` gives a coalesced sparse COO .grad holding
  only the touched rows; `SparseTableAdam.step()` updates them.
* "fused": `fused_multihead_gather` applies the update inside the backward pass, right after the
  row-sparse gradient is formed; no table gradient ever exists, and `step()` has nothing left to
  do for that table.

Semantics (identical in the three modes): lazy Adam, i.e. only rows present in a step's gradient
move; their moments decay and their (decoupled, AdamW) weight decay applies only then. Bias
correction uses each row's own update count (`row_step`), not the global step: Engram rows are
Zipfian, most are rare, and a global count would give a row first touched at step 10^4 a first
update of about 3x lr instead of lr (the FBGEMM "row-wise bias correction" choice).

The recipe of the paper (Adam at 5x the base learning rate, no weight decay, for tables; the user's
optimizer for the rest) is `make_optimizers`.
"""

from __future__ import annotations

import mmap
import platform
import sys
import weakref
from collections.abc import Callable, Iterable

import torch
import torch.utils.weak
from torch import nn
from torch.autograd.function import once_differentiable

from . import _C  # noqa: F401  (registers torch.ops.engram.*)

TABLE_ATTR = "_engram_table"
# Optional per-table flag naming its gradient mode when no Engram module carries it.
TABLE_GRAD_ATTR = "_engram_table_grad"
TABLE_GRAD_MODES = ("dense", "sparse", "fused")


def mark_table(param: nn.Parameter, table_grad: str | None = None) -> nn.Parameter:
    """Flag a parameter as an Engram-style table (rows updated lazily by SparseTableAdam)."""
    if table_grad is not None and table_grad not in TABLE_GRAD_MODES:
        raise ValueError(f"mark_table: table_grad must be one of {TABLE_GRAD_MODES}, got {table_grad!r}")
    setattr(param, TABLE_ATTR, True)
    if table_grad is not None:
        setattr(param, TABLE_GRAD_ATTR, table_grad)
    return param


def is_table(param: torch.Tensor, module: nn.Module | None = None, name: str | None = None) -> bool:
    """A table is a parameter flagged with `_engram_table = True` (Engram does this for its
    `table`), or a parameter named `table` of a module whose class name starts with "Engram"."""
    if getattr(param, TABLE_ATTR, False):
        return True
    return module is not None and name == "table" and type(module).__name__.startswith("Engram")


# ---------------------------------------------------------------------------------------------
# State allocation


# Python exposes MAP_NORESERVE only from 3.13; Linux uses 0x4000 on x86, ARM and RISC-V.
_MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000 if sys.platform == "linux" and platform.machine() in (
    "x86_64", "AMD64", "i686", "aarch64", "arm64", "armv7l", "riscv64") else 0)


def _zeros_on_touch(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Zeros whose host memory is only committed when written.

    torch.zeros writes every byte, so the Adam moments of a 10^8-row table would take their full
    size at the first step although a step touches ~10^5 rows. An anonymous mmap is zero-filled by
    the kernel page by page on first write: the moments of untouched rows cost address space, not
    memory (page granularity, 4 KiB = 16 rows of 64 float32). Huge pages are refused for the
    mapping, since one touched row would commit 2 MiB. Elsewhere (CUDA, small states) torch.zeros.
    Touching more state than memory holds ends in the OOM killer, not in an allocation error.
    """
    device = torch.device(device)
    numel = 1
    for s in shape:
        numel *= s
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    if device.type != "cpu" or nbytes < (1 << 20) or not hasattr(mmap, "MAP_ANONYMOUS"):
        return torch.zeros(shape, dtype=dtype, device=device)
    # No swap reservation: the state may be larger than memory (that is the point); the kernel's
    # heuristic overcommit check would refuse a mapping larger than RAM + swap outright.
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_NORESERVE
    buf = mmap.mmap(-1, nbytes, flags=flags)
    if hasattr(mmap, "MADV_NOHUGEPAGE"):
        buf.madvise(mmap.MADV_NOHUGEPAGE)
    # frombuffer keeps `buf` alive for as long as the tensor's storage lives.
    return torch.frombuffer(buf, dtype=dtype, count=numel).view(shape)


def _zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.zeros(shape, dtype=dtype, device=device)


class _KeepAsIs:
    """Shields a state tensor from Optimizer.load_state_dict, which casts floating state to the
    parameter's dtype (it would turn float32 moments of a bfloat16 table into bfloat16)."""

    __slots__ = ("value",)

    def __init__(self, value):
        self.value = value


# ---------------------------------------------------------------------------------------------
# Row gradients


def row_gradient(grad: torch.Tensor, chunk_rows: int = 1 << 20) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows [U] int64 strictly increasing, values [U, d_head]) of a table gradient.

    A sparse COO gradient must have one sparse and one dense dimension (as from an embedding or
    multihead_gather with sparse_grad=True); it is coalesced unless its rows are already strictly
    increasing. A dense gradient gives
    the rows with any non-zero entry: a touched row whose gradient is exactly zero is then
    indistinguishable from an untouched one and is skipped (the sparse paths would decay its
    moments). Dense rows are scanned in chunks to bound the temporaries.
    """
    if grad.layout == torch.sparse_coo:
        if grad.sparse_dim() != 1 or grad.dense_dim() != 1:
            raise ValueError("SparseTableAdam: a sparse table gradient must have sparse_dim=1 and "
                             "dense_dim=1 ([num_rows] sparse x [d_head] dense), got "
                             f"sparse_dim={grad.sparse_dim()}, dense_dim={grad.dense_dim()}")
        rows = grad._indices()[0]
        # torch's AccumulateGrad rebuilds a sparse .grad without its is_coalesced flag, so the
        # sorted unique rows of multihead_gather arrive flagged uncoalesced; coalesce() would sort
        # and sum again (0.2 s for 80k bfloat16 rows). Strictly increasing rows are coalesced.
        if not grad.is_coalesced() and rows.numel() > 1 and not bool((rows[1:] > rows[:-1]).all()):
            grad = grad.coalesce()
            rows = grad._indices()[0]
        return rows, grad._values()
    if grad.layout != torch.strided:
        raise ValueError("SparseTableAdam: table gradients must be dense or sparse COO, got layout "
                         f"{grad.layout}")
    if grad.dim() != 2:
        raise ValueError("SparseTableAdam: a table gradient must be [num_rows, d_head], got "
                         f"{tuple(grad.shape)}")
    # The scan reads the whole table-sized gradient: read it as int64 words where the layout allows
    # (several times faster than a floating-point compare), which flags every row with a non-zero
    # bit; the few candidates are then checked numerically, so rows of -0.0 do not count.
    row_bytes = grad.shape[1] * grad.element_size()
    wide = grad.is_contiguous() and row_bytes % 8 == 0 and grad.data_ptr() % 8 == 0
    parts = []
    for s in range(0, grad.shape[0], chunk_rows):
        chunk = grad[s:s + chunk_rows]
        hit = chunk.view(torch.int64).any(dim=1) if wide else chunk.ne(0).any(dim=1)
        parts.append(torch.nonzero(hit).squeeze(1).add_(s))
    rows = torch.cat(parts) if parts else torch.empty(0, dtype=torch.long, device=grad.device)
    values = grad.index_select(0, rows)
    if wide:
        keep = values.ne(0).any(dim=1)
        rows, values = rows[keep], values[keep]
    return rows, values


# ---------------------------------------------------------------------------------------------
# Optimizers

# Which optimizer holds a table, for fused_multihead_gather calls that do not name one.
_TABLE_OWNER = torch.utils.weak.WeakTensorKeyDictionary()


class SparseTableAdam(torch.optim.Optimizer):
    """Lazy row-wise Adam for embedding tables [num_rows, d_head] (see the module docstring).

    Args:
        params: tables (2-D parameters) or param groups.
        lr, betas, eps: as torch.optim.Adam. weight_decay: decoupled (AdamW), applied to a row only
            when it is updated. The Engram recipe uses 0.
        moment_dtype: dtype of exp_avg / exp_avg_sq. None: float32 (float64 for float64 tables).
            torch.bfloat16 halves the state; note that round-to-nearest bfloat16 cannot represent a
            (1 - beta2) = 0.1% change of exp_avg_sq, which then moves only when g^2 differs from it
            by more than ~0.4%.
        state_alloc: "on_touch" (default): CPU state is zero-on-touch, so only pages holding updated
            rows take memory, and each first touch of a page costs a page fault (a few us) during
            the update; state larger than memory works as long as the touched part fits. "eager":
            torch.zeros, the whole state committed (and faulted in) at the first step.

    State per table: exp_avg, exp_avg_sq [num_rows, d_head]; row_step int32 [num_rows] (each row's
    update count, which sets its bias correction); step (updates applied to the table).

    Gradients may be dense or sparse COO (see `row_gradient`). A table can also be updated inside
    backward by `fused_multihead_gather`; such a table has no .grad and `step()` skips it.
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, moment_dtype: torch.dtype | None = None,
                 state_alloc: str = "on_touch"):
        if not 0.0 <= lr:
            raise ValueError(f"SparseTableAdam: lr must be >= 0, got {lr}")
        if not 0.0 <= eps:
            raise ValueError(f"SparseTableAdam: eps must be >= 0, got {eps}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"SparseTableAdam: betas must lie in [0, 1), got {betas}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"SparseTableAdam: weight_decay must be >= 0, got {weight_decay}")
        if moment_dtype not in (None, torch.float32, torch.float64, torch.bfloat16):
            raise ValueError(f"SparseTableAdam: moment_dtype must be None, float32, float64 or bfloat16, "
                             f"got {moment_dtype}")
        if state_alloc not in ("on_touch", "eager"):
            raise ValueError(f"SparseTableAdam: state_alloc must be 'on_touch' or 'eager', "
                             f"got {state_alloc!r}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        moment_dtype=moment_dtype, state_alloc=state_alloc)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        for p in self.param_groups[-1]["params"]:
            if p.dim() != 2:
                raise ValueError("SparseTableAdam: tables must be [num_rows, d_head], got a parameter of "
                                 f"shape {tuple(p.shape)}")
            _TABLE_OWNER[p] = weakref.ref(self)

    def _group_of(self, table: torch.Tensor) -> dict:
        for group in self.param_groups:
            for p in group["params"]:
                if p is table:
                    return group
        shape = ", ".join(map(str, table.shape))
        raise ValueError(f"{type(self).__name__}: the table [{shape}] is not one of this optimizer's "
                         "parameters")

    def _state_of(self, p: torch.Tensor, group: dict) -> dict:
        state = self.state[p]
        if not state:
            mdt = group["moment_dtype"] or (torch.float64 if p.dtype == torch.float64 else torch.float32)
            zeros = _zeros_on_touch if group.get("state_alloc", "on_touch") == "on_touch" else _zeros
            state["step"] = torch.tensor(0, dtype=torch.int64)
            state["exp_avg"] = zeros(tuple(p.shape), mdt, p.device)
            state["exp_avg_sq"] = zeros(tuple(p.shape), mdt, p.device)
            state["row_step"] = zeros((p.shape[0],), torch.int32, p.device)
        return state

    @torch.no_grad()
    def apply_rows(self, table: torch.Tensor, rows: torch.Tensor, grads: torch.Tensor) -> None:
        """One lazy Adam update of table[rows] with grads [U, d_head] now; rows strictly increasing."""
        self._apply(table, self._group_of(table), rows, grads)

    def _apply(self, p: torch.Tensor, group: dict, rows: torch.Tensor, grads: torch.Tensor) -> None:
        state = self._state_of(p, group)
        beta1, beta2 = group["betas"]
        torch.ops.engram.sparse_adam_step(p, state["exp_avg"], state["exp_avg_sq"], state["row_step"], rows,
                                          grads, float(group["lr"]), beta1, beta2, group["eps"],
                                          group["weight_decay"])
        state["step"] += 1

    @torch.no_grad()
    def step(self, closure: Callable | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                rows, values = row_gradient(p.grad)
                self._apply(p, group, rows, values)
        return loss

    def load_state_dict(self, state_dict: dict) -> None:
        # Keep the saved dtypes (float32 moments of a bfloat16 table stay float32); only move to
        # the parameter's device.
        shielded = dict(state_dict)
        shielded["state"] = {k: {n: _KeepAsIs(v) if isinstance(v, torch.Tensor) else v for n, v in s.items()}
                             for k, s in state_dict["state"].items()}
        super().load_state_dict(shielded)
        for p, s in self.state.items():
            for n, v in list(s.items()):
                if isinstance(v, _KeepAsIs):
                    v = v.value
                    s[n] = v if n == "step" else v.to(p.device)


class FusedTableAdam(SparseTableAdam):
    """SparseTableAdam as the state holder of fused tables: `fused_multihead_gather` calls
    `apply_rows` from inside backward. `step()` only acts on tables that also received an ordinary
    .grad, so calling it every iteration (e.g. for LR schedulers) is harmless. Its state_dict
    holds exp_avg, exp_avg_sq, row_step and step of every fused table.

    Each backward pass through a fused gather applies one update. With gradient accumulation over
    k micro-batches a fused table therefore takes k updates per optimizer step (each with its own
    micro-batch gradient), where the dense and sparse modes take one with the summed gradient; a
    table gathered twice in one forward also takes two updates. Global gradient-norm clipping and
    GradScaler unscaling never see fused table gradients, and nothing else may read the table
    between its fused update and the end of backward (an op that saved it raises on the version
    counter).
    """


# ---------------------------------------------------------------------------------------------
# Fused gather


def _gather(table: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    return torch.ops.engram.multihead_gather(table, rows, False)


def _gather_backward_sparse(grad_e: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.ops.engram.multihead_gather_backward_sparse(grad_e, rows)


class _FusedTableGather(torch.autograd.Function):
    """multihead_gather whose backward updates the table in place and returns no gradient for it."""

    @staticmethod
    def forward(ctx, table, rows, optimizer):
        ctx.save_for_backward(rows)
        # The table is held, not saved: saving would make the in-place update trip the version check.
        ctx.table = table
        ctx.optimizer = optimizer
        return _gather(table, rows)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_e):
        (rows,) = ctx.saved_tensors
        unique_rows, grads = _gather_backward_sparse(grad_e, rows)
        ctx.optimizer.apply_rows(ctx.table, unique_rows, grads)
        return None, None, None


# The backward mutates a parameter through a Python object, which graph capture cannot express:
# under torch.compile the fused gather runs eagerly (a graph break) and the rest is compiled.
@torch.compiler.disable
def fused_multihead_gather(table: torch.Tensor, rows: torch.Tensor,
                           optimizer_state: SparseTableAdam | None = None) -> torch.Tensor:
    """multihead_gather(table, rows) whose backward applies `optimizer_state`'s lazy Adam update to
    the touched rows of `table` at once (FusedTableAdam; any SparseTableAdam holding the table
    works). None: the optimizer that holds `table`. Without grad mode, or for a table that does not
    require grad, this is a plain gather. See FusedTableAdam for gradient accumulation. Not
    capturable by torch.compile(fullgraph=True); ordinary torch.compile runs it eagerly.
    """
    if not (torch.is_grad_enabled() and table.requires_grad):
        return _gather(table, rows)
    if optimizer_state is None:
        ref = _TABLE_OWNER.get(table)
        optimizer_state = ref() if ref is not None else None
        if optimizer_state is None:
            raise RuntimeError("fused_multihead_gather: no optimizer holds this table; build one "
                               "(FusedTableAdam([table]), make_optimizers or attach_fused_adam) or pass it")
    optimizer_state._group_of(table)  # fail in forward, not in the middle of backward
    return _FusedTableGather.apply(table, rows, optimizer_state)


# ---------------------------------------------------------------------------------------------
# Parameter split and the Engram recipe


NamedParams = list[tuple[str, nn.Parameter]]


def split_table_parameters(model: nn.Module) -> tuple[NamedParams, NamedParams]:
    """(tables, rest) as (qualified name, parameter) lists; each parameter appears once."""
    tables, rest, seen = [], [], set()
    for mod_name, module in model.named_modules():
        for name, p in module.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            full = f"{mod_name}.{name}" if mod_name else name
            (tables if is_table(p, module, name) else rest).append((full, p))
    return tables, rest


def table_param_groups(model: nn.Module, base_lr: float, weight_decay: float = 0.0,
                       table_lr_mult: float = 5.0) -> tuple[list[dict], list[dict]]:
    """(table groups, other groups) of the Engram recipe: tables at table_lr_mult * base_lr with no
    weight decay; the rest at base_lr with `weight_decay`. Parameters with requires_grad=False are
    left out; an empty side is an empty list."""
    tables, rest = split_table_parameters(model)
    tables = [p for _, p in tables if p.requires_grad]
    rest = [p for _, p in rest if p.requires_grad]
    table_groups = [dict(params=tables, lr=base_lr * table_lr_mult, weight_decay=0.0)] if tables else []
    rest_groups = [dict(params=rest, lr=base_lr, weight_decay=weight_decay)] if rest else []
    return table_groups, rest_groups


def _table_grad_mode(module: nn.Module, param: nn.Parameter) -> str:
    mode = getattr(param, TABLE_GRAD_ATTR, None)
    return mode if mode is not None else getattr(module, "table_grad", "dense")


def make_optimizers(model: nn.Module, base_lr: float, weight_decay: float = 0.0, table_lr_mult: float = 5.0,
                    *,
                    optimizer_factory: Callable[[list[dict]], torch.optim.Optimizer] | None = None,
                    betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                    table_betas: tuple[float, float] | None = None, table_eps: float | None = None,
                    moment_dtype: torch.dtype | None = None, state_alloc: str = "on_touch",
                    ) -> tuple[SparseTableAdam | None, torch.optim.Optimizer | None]:
    """(table optimizer, optimizer of the rest) for the Engram recipe (ENGRAM.md section 7).

    Tables (see `is_table`) go to one FusedTableAdam at table_lr_mult * base_lr without weight
    decay; it also serves every fused-mode Engram module in `model` (attached as its fused state),
    so one state_dict covers all tables. The rest goes to `optimizer_factory(param_groups)` (each
    group has lr and weight_decay set), by default AdamW(betas, eps). Either is None when it has
    no parameters.
    """
    table_groups, rest_groups = table_param_groups(model, base_lr, weight_decay, table_lr_mult)
    table_opt = None
    if table_groups:
        table_opt = FusedTableAdam(table_groups, lr=base_lr * table_lr_mult, betas=table_betas or betas,
                                   eps=eps if table_eps is None else table_eps, weight_decay=0.0,
                                   moment_dtype=moment_dtype, state_alloc=state_alloc)
        attach_fused_adam(model, table_opt)
    rest_opt = None
    if rest_groups:
        if optimizer_factory is None:
            rest_opt = torch.optim.AdamW(rest_groups, lr=base_lr, betas=betas, eps=eps,
                                         weight_decay=weight_decay)
        else:
            rest_opt = optimizer_factory(rest_groups)
    return table_opt, rest_opt


def attach_fused_adam(model: nn.Module, optimizer: SparseTableAdam | None = None,
                      **adam_kwargs) -> SparseTableAdam:
    """Make `optimizer` (default: a new FusedTableAdam(**adam_kwargs)) the fused state of every
    module in `model` whose table_grad is "fused" (its `_fused_state`, read by Engram.gather).
    Tables it does not hold yet are added as a new param group. Returns the optimizer."""
    fused = [m for m in model.modules() if isinstance(getattr(m, "table", None), nn.Parameter)
             and _table_grad_mode(m, m.table) == "fused"]
    if optimizer is None:
        if not fused:
            raise ValueError("attach_fused_adam: the model has no module with table_grad='fused'")
        optimizer = FusedTableAdam([m.table for m in fused], **adam_kwargs)
    elif adam_kwargs:
        raise ValueError("attach_fused_adam: pass either an optimizer or its settings, not both")
    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    missing = [m.table for m in fused if id(m.table) not in held]
    if missing:
        optimizer.add_param_group(dict(params=missing))
    for m in fused:
        m._fused_state = optimizer
    return optimizer
