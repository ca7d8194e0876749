"""EngramTable: one Engram layer's concatenated table as one object.

It owns the weight [num_rows, d_head], how it learns (gradient mode, optimizer, the optimizer's
state), where its rows live (placement) and its checkpoint (weight and state in its state_dict,
restored bit for bit). `Engram` composes one; a user who wants only the memory uses it alone:

    table = EngramTable(num_rows, d_head, optimizer="adam", lr=2e-3)
    e = table(rows)              # [..., H] -> [..., H * d_head]
    loss.backward()              # grad="fused": the rows and their state are updated here

Gradient modes:
* "fused" (default): the update runs inside backward (the multihead_gather_fused op: sort the
  lookups, sum each row's gradient in a fixed order, update row and state in one pass). No
  gradient tensor of the table exists, `weight.grad` stays None, and `step()` has nothing to do.
  Each backward pass is one update: gradient accumulation over k micro-batches gives k updates
  of a fused table (the dense and sparse modes give one, with the summed gradient), and a table
  looked up twice in one forward is updated twice.
* "sparse": backward leaves a coalesced sparse COO `weight.grad` holding only the touched rows;
  `step()` applies the table's optimizer to them (or bring your own, e.g. torch.optim.SparseAdam).
* "dense": an ordinary dense `weight.grad`; `step()` updates the rows looked up since the
  gradient was last reset (the table records them in forward, so no table-sized scan of the
  gradient is needed), or bring your own optimizer for the dense gradient.

The three modes apply the same update for the same gradients (tests check it bit for bit).
Fused tables have no `.grad`, so gradient clipping and GradScaler never see them (as FBGEMM's
fused tables): clip the rest of the model, and do not train fused float16 tables under a
GradScaler (the scaled gradient would reach the update; bfloat16 autocast needs no scaler).

Optimizers (state per row, d = d_head, fp32 state): "adam" (lazy, per-row bias correction;
8d + 4 bytes), "partial_rowwise_adam" (full first moment, one second moment per row; 4d + 8),
"rowwise_adagrad" (one accumulator per row; 4) and "sgd" (0). `state_dtype=torch.bfloat16`
halves the [R, d] moments. bfloat16 weights round stochastically by default (deterministic given
`seed`): with round-to-nearest, updates under half a bfloat16 ulp would vanish.
"""

from __future__ import annotations

import math
import mmap
import os
import platform
import sys

import torch
from torch import nn

from . import _C  # noqa: F401  (registers torch.ops.engram.*)

GRAD_MODES = ("fused", "sparse", "dense")
OPTIMIZERS = ("adam", "partial_rowwise_adam", "rowwise_adagrad", "sgd")
PLACEMENTS = ("device", "host", "file", "sharded")
STORAGES = ("native", "fp8")

# Python exposes MAP_NORESERVE only from 3.13; Linux uses 0x4000 on x86, ARM and RISC-V.
_MAP_NORESERVE = getattr(
    mmap,
    "MAP_NORESERVE",
    0x4000
    if sys.platform == "linux"
    and platform.machine() in ("x86_64", "AMD64", "i686", "aarch64", "arm64", "armv7l", "riscv64")
    else 0,
)


def zeros_on_touch(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str | None) -> torch.Tensor:
    """Zeros whose host memory is committed only when written.

    torch.zeros writes every byte, so the Adam moments of a 10^8-row table would take their full
    size at once although a step touches ~10^5 rows. An anonymous mmap is zero-filled by the kernel
    page by page on first write: the state of untouched rows costs address space, not memory
    (page granularity, 4 KiB = 16 rows of 64 float32). Huge pages are refused for the mapping,
    since one touched row would commit 2 MiB. Elsewhere (CUDA, meta, small states) torch.zeros.
    """
    device = torch.device(device if device is not None else "cpu")
    numel = math.prod(shape)
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    if device.type != "cpu" or nbytes < (1 << 20) or not hasattr(mmap, "MAP_ANONYMOUS"):
        return torch.zeros(shape, dtype=dtype, device=device)
    # No swap reservation: the state may be larger than memory (only touched rows must fit).
    buf = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_NORESERVE)
    if hasattr(mmap, "MADV_NOHUGEPAGE"):
        buf.madvise(mmap.MADV_NOHUGEPAGE)
    return torch.frombuffer(buf, dtype=dtype, count=numel).view(shape)  # keeps `buf` alive


_HUGE_PAGE = 2 << 20
_MADV_HUGEPAGE = 14  # Linux


def madvise(t: torch.Tensor, advice: int, align: int) -> bool:
    """madvise(advice) on the `align`-aligned interior of a CPU tensor's memory (Linux; advice
    only: False and nothing changes where it cannot be given)."""
    if t.device.type != "cpu" or sys.platform != "linux" or t.numel() == 0:
        return False
    try:
        import ctypes

        start = t.data_ptr()
        end = start + t.numel() * t.element_size()
        lo = (start + align - 1) // align * align
        hi = end // align * align
        libc = ctypes.CDLL(None, use_errno=True)
        return hi > lo and libc.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), advice) == 0
    except (OSError, AttributeError):
        return False


def advise_huge_pages(t: torch.Tensor) -> bool:
    """Ask Linux to back a large CPU tensor with transparent huge pages (madvise MADV_HUGEPAGE,
    before its pages are first touched). A table is read at random rows: with 4 KiB pages nearly
    every lookup of a multi-GB table misses the TLB, with 2 MiB pages most hit. Returns whether
    the advice was given; where it cannot be (other OS, THP off, ENGRAM_HUGE_PAGES=0), nothing
    changes."""
    if t.numel() * t.element_size() < 16 * _HUGE_PAGE:
        return False
    if os.environ.get("ENGRAM_HUGE_PAGES", "1") == "0":  # opt out (e.g. to measure without)
        return False
    return madvise(t, _MADV_HUGEPAGE, _HUGE_PAGE)


def state_bytes_per_row(optimizer: str, d_head: int, state_dtype: torch.dtype = torch.float32) -> int:
    """Optimizer state bytes of one row (docs/SPEC.md section 7; measured by benchmarks/bench_table.py)."""
    moment = torch.empty((), dtype=state_dtype).element_size()
    return {
        "adam": 2 * d_head * moment + 4,
        "partial_rowwise_adam": d_head * moment + 4 + 4,
        "rowwise_adagrad": 4,
        "sgd": 0,
    }[optimizer]


def _checkpoint_files(table: EngramTable, prefix: str) -> dict | None:
    """The checkpoint's file context for a file-placed table (see offload.CHECKPOINT_FILES): when
    saving, always; when loading, only if the checkpoint holds this table as a record file."""
    if table.placement != "file":
        return None
    from .offload import CHECKPOINT_FILES

    files = CHECKPOINT_FILES.get()
    if files is None or (files["mode"] == "load" and prefix + "records" not in files["keys"]):
        return None
    return files


class EngramTable(nn.Module):
    """A trainable table [num_rows, d_head] looked up H rows per token (see the module docstring).

    Args:
        num_rows, d_head: the table's shape (all H hashed tables of a layer, concatenated).
        grad: "fused" | "sparse" | "dense".
        optimizer: "partial_rowwise_adam" (default: the lowest loss in the quick sweep of every
            table optimizer, docs/SWEEP.md, with half of Adam's state) | "adam" (the paper's) |
            "rowwise_adagrad" | "sgd".
        lr, betas, eps, weight_decay: the optimizer's settings (decoupled weight decay, applied to a
            row only when it is updated). `torch_engram.optim.make_optimizers` sets lr to 5x the
            base learning rate and weight_decay to 0 (the Engram recipe).
        state_dtype: dtype of the [R, d_head] moments: None (float32; float64 for float64 tables)
            or torch.bfloat16. Row-wise state is always the maths dtype.
        stochastic_rounding: round bfloat16 weights stochastically (default: True for bfloat16).
        seed: seed of the stochastic rounding (the result depends on it, not on thread counts).
        state_alloc: "on_touch" (CPU state takes memory only for rows already updated) or "eager".
        init_std: the weight starts as N(0, init_std^2).
        init: initialise the weight now (False: left uninitialised for an owner that calls
            reset_parameters itself, as Engram does, so the table is not filled twice).
        placement: "device" (rows in the compute device's memory), "host" (rows in host memory) or
            "file" (rows in a memory-mapped file at `path`, which may be larger than RAM); the last
            two compute on a cache of `cache_rows` rows (torch_engram.offload), evicting with
            `cache_policy` ("lru" or "lfu"). With grad="sparse" or "dense" the gradient is over
            cache slots, and the slots looked up since the last step() stay pinned until the next
            one (the cache must hold them all): update with the table's own step().
        process_group, shard_grad: for placement="sharded" (rows over the ranks of the group,
            torch_engram.sharded): "mean" (default) divides the summed row gradients of the ranks
            by the world size, as DDP averages dense gradients of per-rank mean losses; "sum"
            keeps the sum (the gradient of the sum of the ranks' losses).
        storage: "native" (the weight in `dtype`) or "fp8": E4M3 values with one E8M0 scale per
            32 values (`weight` float8_e4m3fn [num_rows, d_head] and `weight_scale`
            float8_e8m0fnu [num_rows, d_head / 32], the DeepSeek-V4.1 layout; torch_engram.fp8),
            read by a gather that dequantises into `dtype` (float32 or bfloat16). FP8 tables are
            inference storage: frozen, no optimizer state, placement "device". A trained table
            converts with quantize_fp8_().
    """

    def __init__(
        self,
        num_rows: int,
        d_head: int,
        *,
        grad: str = "fused",
        optimizer: str = "partial_rowwise_adam",
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        state_dtype: torch.dtype | None = None,
        stochastic_rounding: bool | None = None,
        seed: int = 0,
        state_alloc: str = "on_touch",
        init_std: float = 1.0,
        init: bool = True,
        placement: str = "device",
        cache_rows: int | None = None,
        cache_policy: str = "lfu",
        path: str | None = None,
        storage: str = "native",
        process_group=None,
        shard_grad: str = "mean",
        device=None,
        dtype=None,
    ):
        super().__init__()
        if storage not in STORAGES:
            raise ValueError(f"EngramTable: storage must be one of {STORAGES}, got {storage!r}")
        if storage == "fp8" and placement != "device":
            raise ValueError(f"EngramTable: storage='fp8' needs placement='device', got {placement!r}")
        if num_rows < 1 or d_head < 1:
            raise ValueError(f"EngramTable: num_rows and d_head must be >= 1, got {num_rows} and {d_head}")
        if grad not in GRAD_MODES:
            raise ValueError(f"EngramTable: grad must be one of {GRAD_MODES}, got {grad!r}")
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"EngramTable: optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
        if placement not in PLACEMENTS:
            raise ValueError(f"EngramTable: placement must be one of {PLACEMENTS}, got {placement!r}")
        if state_alloc not in ("on_touch", "eager"):
            raise ValueError(f"EngramTable: state_alloc must be 'on_touch' or 'eager', got {state_alloc!r}")
        if seed < 0:
            raise ValueError(f"EngramTable: seed must be >= 0, got {seed}")
        cached = placement in ("host", "file")
        if cached:
            if cache_rows is None or not 1 <= cache_rows <= num_rows:
                raise ValueError(
                    f"EngramTable: placement={placement!r} needs cache_rows in [1, num_rows={num_rows}], "
                    f"got {cache_rows}"
                )
        elif cache_rows is not None or path is not None:
            raise ValueError("EngramTable: cache_rows and path are for placement='host' or 'file'")
        full_rows = num_rows
        shard = None
        if placement == "sharded":
            from .sharded import make_shard

            if grad != "fused" or storage != "native":
                raise ValueError(
                    f"EngramTable: placement='sharded' trains with grad='fused' and native storage for now, "
                    f"got grad={grad!r}, storage={storage!r}"
                )
            if shard_grad not in ("mean", "sum"):
                raise ValueError(f"EngramTable: shard_grad must be 'mean' or 'sum', got {shard_grad!r}")
            shard = make_shard(num_rows, process_group)
            num_rows = shard.rows  # the tensors below are this rank's shard
        if cached:
            num_rows = cache_rows  # the tensors below are the cache; the store holds every row
        fp8 = storage == "fp8"
        # An FP8 table's native weight and state are never used: built on the meta device, so
        # nothing of their size is allocated before the FP8 tensors replace them.
        weight = torch.empty(num_rows, d_head, device="meta" if fp8 else device, dtype=dtype)
        advise_huge_pages(weight)  # before reset_parameters first touches the pages
        if weight.dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
            raise ValueError(f"EngramTable: dtype must be float32, bfloat16, float16 or float64, got {weight.dtype}")
        maths = torch.float64 if weight.dtype == torch.float64 else torch.float32
        if state_dtype not in (None, maths, torch.bfloat16):
            raise ValueError(f"EngramTable: state_dtype must be None, {maths} or torch.bfloat16, got {state_dtype}")
        if stochastic_rounding is None:
            stochastic_rounding = weight.dtype == torch.bfloat16
        if stochastic_rounding and weight.dtype != torch.bfloat16:
            raise ValueError(f"EngramTable: stochastic_rounding is for bfloat16 weights, got {weight.dtype}")
        self.num_rows, self.d_head = full_rows, d_head
        self.grad_mode = grad
        self.optimizer = optimizer
        self.placement = placement
        self.init_std = init_std
        self.stochastic_rounding = stochastic_rounding
        self.state_dtype = state_dtype
        self.seed = seed
        self.weight = nn.Parameter(weight)
        # Read by the kernels at every update: a CPU tensor, not a buffer, since it must stay on the
        # host when the table moves, and a learning-rate schedule writes it in place without
        # retracing. Settings, not state: like torch.optim's lr they are saved by the optimizer
        # (TableOptimizer's param groups), while the state_dict holds weight and optimizer state.
        self.hparams = torch.zeros(5, dtype=torch.float64, device="cpu")
        self.set_hparams(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        dev = weight.device
        zeros = zeros_on_touch if state_alloc == "on_touch" else (lambda s, dt, d: torch.zeros(s, dtype=dt, device=d))
        mdt = state_dtype or maths
        R, D = num_rows, d_head
        empty = (0,)
        shapes = {
            "adam": ((R, D), (R, D), (R,)),
            "partial_rowwise_adam": ((R, D), (R,), (R,)),
            "rowwise_adagrad": ((R,), empty, empty),
            "sgd": (empty, empty, empty),
        }[optimizer]
        dtypes = {
            "adam": (mdt, mdt),
            "partial_rowwise_adam": (mdt, maths),
            "rowwise_adagrad": (maths, maths),
            "sgd": (maths, maths),
        }[optimizer]
        self.register_buffer("momentum1", zeros(shapes[0], dtypes[0], dev))
        self.register_buffer("momentum2", zeros(shapes[1], dtypes[1], dev))
        self.register_buffer("row_step", zeros(shapes[2], torch.int32, dev))
        self.register_buffer("step_count", torch.zeros(1, dtype=torch.int64, device=dev))
        self._pending_rows: list[torch.Tensor] = []
        self._store = None
        self._shard = shard
        self.shard_grad = shard_grad
        # Cumulative lookups and unique rows of this rank, and those owned by other ranks.
        self.shard_stats = dict(lookups=0, remote_lookups=0, unique=0, remote_unique=0)
        if shard is not None:
            # The global row of each local row: stochastic rounding draws its bits for it, so the
            # shards round as the whole table would.
            # A buffer (not saved) so that it follows the table to its device.
            self.register_buffer(
                "_shard_row_ids", torch.arange(shard.start, shard.start + shard.rows, device=dev), persistent=False
            )
        self.storage = "native"
        if fp8:
            real = torch.empty(0, device=device).device
            self.step_count = torch.zeros(1, dtype=torch.int64, device=real)
            self._to_fp8(None, real)
            if init:
                self.reset_parameters()
        elif cached:
            from .offload import RowStore

            with torch.no_grad():
                self.weight.zero_()  # cache slots hold no row yet
            fields = [t for t in (self.weight.data, self.momentum1, self.momentum2, self.row_step) if t.numel()]
            self._store = RowStore(
                full_rows, fields, placement=placement, path=path, policy=cache_policy, init_std=init_std, seed=seed
            )
        elif init:
            self.reset_parameters()

    # ---- settings ---------------------------------------------------------------------------
    def set_hparams(
        self,
        *,
        lr: float | None = None,
        betas: tuple[float, float] | None = None,
        eps: float | None = None,
        weight_decay: float | None = None,
    ) -> None:
        """Change the optimizer's settings; they apply from the next update on."""
        h = self.hparams.tolist()
        if lr is not None:
            h[0] = float(lr)
        if betas is not None:
            h[1], h[2] = float(betas[0]), float(betas[1])
        if eps is not None:
            h[3] = float(eps)
        if weight_decay is not None:
            h[4] = float(weight_decay)
        if not (math.isfinite(h[0]) and h[0] >= 0):
            raise ValueError(f"EngramTable: lr must be finite and >= 0, got {h[0]}")
        if not (0 <= h[1] < 1 and 0 <= h[2] < 1):
            raise ValueError(f"EngramTable: betas must lie in [0, 1), got ({h[1]}, {h[2]})")
        if not (math.isfinite(h[3]) and h[3] >= 0):
            raise ValueError(f"EngramTable: eps must be finite and >= 0, got {h[3]}")
        if not (math.isfinite(h[4]) and h[4] >= 0):
            raise ValueError(f"EngramTable: weight_decay must be finite and >= 0, got {h[4]}")
        with torch.no_grad():
            self.hparams.copy_(torch.tensor(h, dtype=torch.float64, device="cpu"))

    @property
    def lr(self) -> float:
        return float(self.hparams[0])

    @lr.setter
    def lr(self, value: float) -> None:
        self.set_hparams(lr=value)

    @property
    def weight_decay(self) -> float:
        return float(self.hparams[4])

    # ---- FP8 storage --------------------------------------------------------------------------
    @torch.no_grad()
    def quantize_fp8_(self) -> EngramTable:
        """Convert this table to FP8 storage in place (E4M3 values, one E8M0 scale per 32 values;
        torch_engram.fp8.quantize_fp8), dropping the optimizer state: the table is frozen from
        here on and gathers dequantised rows in its former dtype (float32 or bfloat16)."""
        if self.storage == "fp8":
            return self
        if self._store is not None:
            raise ValueError("EngramTable.quantize_fp8_: FP8 storage needs placement='device'")
        from .fp8 import quantize_fp8

        self._check_fp8()
        self._to_fp8(quantize_fp8(self.weight.detach()))
        return self

    def _check_fp8(self) -> None:
        from .fp8 import BLOCK

        if self.weight.dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(
                f"EngramTable: an FP8 table gathers into float32 or bfloat16, got dtype {self.weight.dtype}"
            )
        if self.d_head % BLOCK:
            raise ValueError(
                f"EngramTable: an FP8 table needs d_head % {BLOCK} == 0 (a scale per {BLOCK} values), got {self.d_head}"
            )

    def _to_fp8(self, quantized: tuple[torch.Tensor, torch.Tensor] | None, device=None) -> None:
        from .fp8 import BLOCK

        self._check_fp8()
        w = self.weight
        dev = device if device is not None else w.device
        if quantized is None:
            values = torch.zeros(w.shape, dtype=torch.float8_e4m3fn, device=dev)
            scale = torch.full((w.shape[0], self.d_head // BLOCK), 127, dtype=torch.uint8, device=dev)
            quantized = values, scale.view(torch.float8_e8m0fnu)
        self.out_dtype = w.dtype
        self.weight = nn.Parameter(quantized[0], requires_grad=False)
        self.register_buffer("weight_scale", quantized[1])
        for name in ("momentum1", "momentum2"):
            setattr(self, name, torch.zeros(0, dtype=torch.float32, device=dev))
        self.row_step = torch.zeros(0, dtype=torch.int32, device=dev)
        self.stochastic_rounding = False
        self.storage = "fp8"

    def reset_parameters(self) -> None:
        """Weight N(0, init_std^2); optimizer state zero (every row as if never updated). Rows of a
        cached placement are initialised lazily, on their first fetch, from the table's seed."""
        if self.storage == "fp8":
            from .fp8 import quantize_fp8

            if self.weight.device.type == "meta":
                return  # built to be assigned a checkpoint's tensors
            with torch.no_grad():
                chunk = max(1, (1 << 22) // self.d_head)  # no float32 copy of the whole table
                for start in range(0, self.weight.shape[0], chunk):
                    rows = self.weight[start : start + chunk]
                    x = torch.randn(rows.shape, device=rows.device) * self.init_std
                    values, scale = quantize_fp8(x)
                    rows.copy_(values)
                    self.weight_scale[start : start + chunk].copy_(scale)
            return
        if self._store is not None:
            with torch.no_grad():
                self._store.init_std = float(self.init_std)  # init_std may have changed since
                self._store.reset()
                self.step_count.zero_()
            return
        with torch.no_grad():
            if self._shard is not None:
                from .sharded import init_shard_

                init_shard_(self.weight, self._shard.start, self.init_std, self.seed)  # whatever the world size
            else:
                nn.init.normal_(self.weight, mean=0.0, std=self.init_std)
            # Only updates (which count themselves in step_count) and loads write the state; a
            # state never updated is still zero, and writing it would commit every page of
            # zero-on-touch memory.
            if self.step_count.device.type != "meta" and int(self.step_count) != 0:
                for b in (self.momentum1, self.momentum2, self.row_step, self.step_count):
                    if b.numel():
                        b.zero_()
        self._pending_rows.clear()

    def _apply(self, fn, recurse=True):
        # Module casts (.double(), .bfloat16(), .half(), .to(dtype)) convert every floating
        # buffer; the optimizer state keeps the maths dtype of the new weight (or bfloat16 moments
        # when state_dtype asked for them), as the kernels require.
        if self.storage == "fp8":
            # FP8 bytes are not floats to convert (a cast would drop the scales): they only move,
            # as their uint8 views; the gather's output dtype follows a cast.
            self.weight.data = self.weight.data.view(torch.uint8)
            self.weight_scale = self.weight_scale.view(torch.uint8)
            probe = fn(torch.zeros((), dtype=self.out_dtype))
            try:
                out = super()._apply(fn, recurse)
            finally:
                self.weight.data = self.weight.data.view(torch.float8_e4m3fn)
                self.weight_scale = self.weight_scale.view(torch.float8_e8m0fnu)
            if probe.dtype in (torch.float32, torch.bfloat16):
                self.out_dtype = probe.dtype
            return out
        out = super()._apply(fn, recurse)
        maths = torch.float64 if self.weight.dtype == torch.float64 else torch.float32
        moment = torch.bfloat16 if self.state_dtype == torch.bfloat16 else maths
        full = self.optimizer in ("adam", "partial_rowwise_adam")
        want = {"momentum1": moment if full else maths, "momentum2": moment if self.optimizer == "adam" else maths}
        for name, dtype in want.items():
            b = getattr(self, name)
            if b.dtype != dtype:
                setattr(self, name, b.to(dtype))
        if self.weight.dtype != torch.bfloat16:
            self.stochastic_rounding = False  # it rounds to bfloat16 only
        return out

    # ---- lookup -----------------------------------------------------------------------------
    def _rounding_seed(self) -> int:
        return self.seed if self.stochastic_rounding else -1

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        """e[..., H * d_head]: the rows named by rows[..., H], concatenated head-minor."""
        w = self.weight
        if self._shard is not None:
            from .sharded import sharded_gather

            return sharded_gather(self, rows)
        if self.storage == "fp8":
            if torch.is_grad_enabled() and w.requires_grad:
                raise RuntimeError(
                    "EngramTable: FP8 tables are inference storage and do not train; train in float32 or "
                    "bfloat16 and convert with quantize_fp8_()"
                )
            return torch.ops.engram.multihead_gather_fp8(w, self.weight_scale, rows, self.out_dtype)
        if self._store is not None:
            rows = self._store.fetch(rows)  # cached placements: the step works on cache slots
            if self.grad_mode != "fused" and torch.is_grad_enabled() and w.requires_grad:
                self._store.hold()  # the gradient names these slots: pinned until step()
        if self.grad_mode == "fused":
            if torch.is_grad_enabled() and w.requires_grad:
                return torch.ops.engram.multihead_gather_fused(
                    w,
                    rows,
                    self.momentum1,
                    self.momentum2,
                    self.row_step,
                    self.step_count,
                    self.hparams,
                    self.optimizer,
                    self._rounding_seed(),
                    self._store.slot_row if self._store is not None else None,
                )
            return torch.ops.engram.multihead_gather(w, rows, False)
        if self.grad_mode == "dense" and torch.is_grad_enabled() and w.requires_grad:
            # The rows step() will update: those looked up since the gradient was last reset. Kept
            # until step() (a zero_grad() between forward and backward is a common loop order), and
            # dropped at the first lookup after the gradient was set to None, so they stay bounded
            # when another optimizer drives the dense gradient with zero_grad(set_to_none=True).
            # (A backward hook would be exact but breaks compiled graphs.)
            if w.grad is None:
                self._pending_rows.clear()
            self._pending_rows.append(rows.detach())
        return torch.ops.engram.multihead_gather(w, rows, self.grad_mode == "sparse")

    # ---- the update of the sparse and dense modes ------------------------------------------
    def _gradient_rows(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        g = self.weight.grad
        if g is None:
            return None
        if g.layout == torch.sparse_coo:
            if g.sparse_dim() != 1 or g.dense_dim() != 1:
                raise ValueError(
                    "EngramTable.step: a sparse weight gradient must have sparse_dim=1 and "
                    f"dense_dim=1, got sparse_dim={g.sparse_dim()}, dense_dim={g.dense_dim()}"
                )
            rows = g._indices()[0]
            # AccumulateGrad rebuilds a sparse .grad without its is_coalesced flag, so the sorted
            # unique rows of the backward arrive flagged uncoalesced; coalescing again would sort
            # and sum for nothing. Rows strictly increasing are coalesced.
            if rows.numel() > 1 and not bool((rows[1:] > rows[:-1]).all()):
                g = g.coalesce()
                rows = g._indices()[0]
            return rows, g._values()
        if not self._pending_rows:
            raise RuntimeError(
                "EngramTable.step: a dense weight gradient is set but no lookup was recorded since the "
                "gradient was last reset; grad='dense' updates the rows this table looked up in forward"
            )
        rows = torch.unique(torch.cat([r.reshape(-1).to(torch.int64) for r in self._pending_rows]))
        self._pending_rows.clear()
        return rows, g.index_select(0, rows)

    @torch.no_grad()
    def step(self) -> None:
        """Apply the optimizer to the gradient of the sparse and dense modes (fused: nothing to do)."""
        if self.grad_mode == "fused" or self.storage == "fp8":
            return
        got = self._gradient_rows()
        if got is None:
            return
        rows, values = got
        torch.ops.engram.table_update(
            self.weight,
            self.momentum1,
            self.momentum2,
            self.row_step,
            self.step_count,
            rows,
            values,
            self.hparams,
            self.optimizer,
            self._rounding_seed(),
            self._store.slot_row if self._store is not None else None,
        )
        if self._store is not None:
            self._store.release()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.weight.grad = None

    # ---- cached placements (host, file) ---------------------------------------------------
    def prefetch(self, rows: torch.Tensor) -> None:
        """Start bringing the rows of the next step into the cache (a background thread), while
        the current step computes; the next forward waits for it. No-op for placement='device'."""
        if self._store is not None:
            self._store.prefetch(rows)

    def flush(self) -> None:
        """Write every cached row and its state back to the host or file store."""
        if self._store is not None:
            self._store.flush()

    def cache_stats(self) -> dict[str, int]:
        """Cumulative hits, misses and evictions (unique rows per fetch) and bytes moved between
        store and cache; empty for placement='device'."""
        return self._store.statistics() if self._store is not None else {}

    _STATE = ("weight", "momentum1", "momentum2", "row_step")

    def _store_views(self) -> dict[str, torch.Tensor]:
        """The whole table of a cached placement as views of its records: name -> [num_rows, ...]."""
        views, i = {}, 0
        for name in self._STATE:
            t = getattr(self, name)
            if t.numel() == 0:
                continue
            views[name] = self._store.field_view(i, tuple(t.shape[1:]))
            i += 1
        return views

    def _store_field_names(self) -> list[str]:
        return [n for n in self._STATE if getattr(self, n).numel()]

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        if self._store is None:
            return super()._save_to_state_dict(destination, prefix, keep_vars)
        files = _checkpoint_files(self, prefix)
        if files is not None:
            # Inside save_checkpoint/load_checkpoint: the records as a file next to the checkpoint
            # (written here when saving; only described when loading), never the table in memory.
            from .offload import copy_sparse, store_layout

            entry = store_layout(self._store, self._store_field_names())
            if files["mode"] == "save":
                self._store.flush()
                name = f"{files['base']}.{files['token']}.{len(files['written'])}.rows"
                copy_sparse(self._store.path, os.path.join(files["dir"], name), self._store.records.numel())
                files["written"].append(name)
                entry["file"] = name
            destination[prefix + "records"] = entry
            destination[prefix + "step_count"] = self.step_count if keep_vars else self.step_count.detach()
            return
        # The whole table: every cached row written back, then each field of the records copied
        # out whole (the layout of a device table, so checkpoints move between placements; rows
        # never written read as zeros and are flagged 0 in row_initialized). This materialises the
        # table in memory; save_checkpoint streams a file table's records instead (see above).
        self._store.flush()
        views = self._store_views()
        for name in self._STATE:
            t = getattr(self, name)
            destination[prefix + name] = views[name].contiguous() if name in views else t.detach()
        destination[prefix + "row_initialized"] = self._store.initialized().contiguous()
        destination[prefix + "step_count"] = self.step_count if keep_vars else self.step_count.detach()

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        if self._store is None:
            return super()._load_from_state_dict(
                state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
            )
        if prefix + "records" in state_dict:
            return self._load_records_file(state_dict, prefix, missing_keys, error_msgs)
        views = self._store_views()
        names = [*self._STATE, "step_count"]
        for name in names:
            if prefix + name not in state_dict:
                missing_keys.append(prefix + name)
        if any(k in missing_keys for k in (prefix + n for n in names)):
            return
        for name in self._STATE:
            want = views[name] if name in views else getattr(self, name)
            got = state_dict[prefix + name]
            if tuple(got.shape) != tuple(want.shape) or got.dtype != want.dtype:
                error_msgs.append(
                    f"size mismatch for {prefix + name}: copying {tuple(got.shape)} {got.dtype} into "
                    f"{tuple(want.shape)} {want.dtype}"
                )
        if error_msgs:
            return
        with torch.no_grad():
            self._store.invalidate()
            for name, v in views.items():
                v.copy_(state_dict[prefix + name])
            flags = state_dict.get(prefix + "row_initialized")
            self._store.initialized().copy_(flags if flags is not None else torch.ones((), dtype=torch.uint8))
            self._store.written = True
            self.step_count.copy_(state_dict[prefix + "step_count"])

    def _load_records_file(self, state_dict, prefix, missing_keys, error_msgs) -> None:
        from .offload import CHECKPOINT_FILES, copy_sparse, same_layout, store_layout

        saved = state_dict[prefix + "records"]
        files = CHECKPOINT_FILES.get()
        if self.placement != "file" or files is None or files["mode"] != "load":
            error_msgs.append(
                f"{prefix}records: the checkpoint holds a file table's record file; load it with "
                "torch_engram.checkpoint.load_checkpoint into an EngramTable with placement='file'"
            )
            return
        own = store_layout(self._store, self._store_field_names())
        if not same_layout(saved, own):
            error_msgs.append(f"{prefix}records: the saved record layout {saved} differs from this table's {own}")
            return
        if prefix + "step_count" not in state_dict:
            missing_keys.append(prefix + "step_count")
            return
        src = os.path.join(files["dir"], saved["file"])
        with torch.no_grad():
            self._store.invalidate()
            copy_sparse(src, self._store.path, self._store.records.numel())
            self._store.written = True
            self.step_count.copy_(state_dict[prefix + "step_count"])

    def extra_repr(self) -> str:
        return (
            f"{self.num_rows}, {self.d_head}, grad={self.grad_mode!r}, optimizer={self.optimizer!r}, "
            f"lr={self.lr:g}, dtype={self.weight.dtype}, placement={self.placement!r}"
            + (f", storage='fp8', out_dtype={self.out_dtype}" if self.storage == "fp8" else "")
        )
