"""Rows beyond the compute device: the record store and row cache of host- and file-placed
EngramTables (docs/SPEC.md section 3).

A table with placement "host" or "file" keeps every row in a *store*: one record per row, the
weight and its optimizer state side by side (one fetch brings both), in host memory or in a
memory-mapped file that can be larger than RAM (created sparse: never-written rows take no disk
and no memory, and are initialised on their first fetch from the table's seed). The step computes
on a *cache* of `cache_rows` slots: the EngramTable's own weight and state tensors, sized
[cache_rows, ...] instead of [num_rows, ...]. Each lookup goes through the C++ op
`_row_cache_fetch`, which maps rows to slots, evicts (LRU or LFU) with write-back, and fills;
`prefetch(rows)` runs the same op for a later step on a background thread while the current one
computes.

Hazards and how they are excluded: the cache is the only copy of the rows it holds (a row is
read from the store only when it is not cached, and was written back when evicted), and the
slots of the steps still in flight are pinned: every fetch stamps its slots, and only slots whose
stamp is older than the previous step's can be evicted. A step's rows stay pinned through its
backward (where the fused update writes them) even while the next step's prefetch runs, as long
as that backward runs before the second forward after it (every usual training loop).
"""

from __future__ import annotations

import contextvars
import errno
import os
import threading

import torch

from . import _C  # noqa: F401  (registers torch.ops.engram.*)
from .table import madvise, zeros_on_touch

CACHE_POLICIES = ("lru", "lfu")
_MADV_RANDOM = 1  # Linux


def _align(n: int, a: int) -> int:
    return (n + a - 1) // a * a


class RowStore:
    """The records of one table and the bookkeeping of its cache.

    fields: the cache tensors ([S, ...] each; the weight first), in record order. The record of
    row r holds, at 8-byte aligned offsets, each field's row, then one flag byte (0: never
    written, the row is initialised on its first fetch)."""

    def __init__(
        self,
        num_rows: int,
        fields: list[torch.Tensor],
        *,
        placement: str,
        path: str | None,
        policy: str,
        init_std: float,
        seed: int,
    ):
        if policy not in CACHE_POLICIES:
            raise ValueError(f"EngramTable: cache_policy must be one of {CACHE_POLICIES}, got {policy!r}")
        S = fields[0].shape[0]
        self.num_rows, self.num_slots = num_rows, S
        self.fields = fields
        self.policy = policy
        self.init_std, self.seed = float(init_std), int(seed)
        offsets, off = [], 0
        for f in fields:
            off = _align(off, 8)
            offsets.append(off)
            off += (f.numel() // S) * f.element_size() if S else 0
        self.flag_offset = off
        self.record_bytes = _align(off + 1, 8)
        self.field_offsets = offsets
        self.placement, self.path = placement, path
        self.device = dev = fields[0].device
        nbytes = num_rows * self.record_bytes
        if dev.type == "cuda" and placement != "host":
            raise ValueError("EngramTable: a CUDA row cache serves placement='host' for now (rows in pinned memory)")
        if dev.type not in ("cpu", "cuda"):
            raise ValueError(f"EngramTable: a row cache lives on the CPU or a CUDA device, got {dev}")
        if placement == "file":
            if path is None:
                raise ValueError("EngramTable: placement='file' needs path= (the file that holds the rows)")
            # A sparse file: creating a table larger than RAM writes nothing, and never-written
            # records read as zeros (flag 0) without taking disk or memory.
            # The file is created, or emptied: a table's rows come back through load_state_dict.
            with open(path, "wb") as fh:
                fh.truncate(nbytes)
            self.records = torch.from_file(path, shared=True, size=nbytes, dtype=torch.uint8)
            # Rows are read at random, and the kernel's default readahead turns each page fault
            # into a fault on a large window (measured: 3.3 ms per fault of a sparse file, 6 us
            # with the advice).
            madvise(self.records, _MADV_RANDOM, os.sysconf("SC_PAGE_SIZE"))
        elif placement == "host" and dev.type == "cuda":
            # Pinned, so the cache kernels read and write the records over the bus, no staging.
            self.records = torch.zeros(nbytes, dtype=torch.uint8, device="cpu", pin_memory=True)
        elif placement == "host":
            self.records = zeros_on_touch((nbytes,), torch.uint8, "cpu")
        else:
            raise ValueError(f"RowStore: placement must be 'host' or 'file', got {placement!r}")
        self.records = self.records.view(num_rows, self.record_bytes)
        # The bookkeeping lives with the cache.
        self.slot_of_row = (
            zeros_on_touch((num_rows,), torch.int32, "cpu")
            if dev.type == "cpu"
            else torch.zeros(num_rows, dtype=torch.int32, device=dev)
        )
        self.slot_row = torch.full((S,), -1, dtype=torch.int64, device=dev)
        self.slot_meta = torch.zeros(S, 2, dtype=torch.int64, device=dev)
        self.slot_meta[:, 0] = -1
        self.lru_links = torch.full((S + 1, 2), S, dtype=torch.int64, device=dev)  # empty list: the sentinel alone
        self.stats = torch.zeros(4, dtype=torch.int64, device=dev)  # hits, misses, evictions, bytes moved
        self._side_stream = torch.cuda.Stream(dev) if dev.type == "cuda" else None
        self._prefetch_event = None
        self.stamp = 0
        self.held_from: int | None = None  # slots fetched since this stamp stay pinned (see hold)
        self.written = False  # whether any record may be non-zero (a fresh store is all zeros)
        self._prefetch: threading.Thread | None = None
        self._prefetch_error: BaseException | None = None
        self._prefetched_stamp: int | None = None

    # ---- the per-step work ------------------------------------------------------------------
    def _fetch(self, rows: torch.Tensor, stamp: int) -> torch.Tensor:
        self.written = True
        return torch.ops.engram._row_cache_fetch(
            rows,
            self.slot_of_row,
            self.slot_row,
            self.slot_meta,
            self.lru_links,
            self.records,
            self.fields,
            self.field_offsets,
            stamp,
            self._keep_from(stamp),
            self.policy,
            self.stats,
            self.flag_offset,
            self.init_std,
            self.seed,
        )

    def _keep_from(self, stamp: int) -> int:
        # Pinned: the slots of this step and of the one before it (whose backward may still be
        # running), and every slot fetched since a hold began.
        keep = stamp - 1
        return keep if self.held_from is None else min(keep, self.held_from)

    def hold(self) -> None:
        """Pin every slot fetched from the current stamp on until release(): a sparse or dense
        gradient names cache slots, so they must keep their rows until the update (gradient
        accumulation over several forwards included)."""
        if self.held_from is None:
            self.held_from = self.stamp

    def release(self) -> None:
        self.held_from = None

    def fetch(self, rows: torch.Tensor) -> torch.Tensor:
        """Slots of rows [..., H] for the step about to run (waits for its prefetch)."""
        self.wait()
        self.stamp = self._prefetched_stamp if self._prefetched_stamp is not None else self.stamp + 1
        self._prefetched_stamp = None
        return self._fetch(rows.detach().to(self.device), self.stamp).to(rows.device)

    def prefetch(self, rows: torch.Tensor) -> None:
        """Bring the rows of the next step into the cache on a background thread, or a side stream
        for a CUDA cache (returns at once); the next fetch waits for it. One prefetch at a time: a
        second one waits for the first. Prefetch the rows the next forward will look up: other rows
        stay pinned with them (three steps' rows instead of two)."""
        self.wait()
        stamp = self.stamp + 1
        rows = rows.detach().to(self.device)
        if self._side_stream is not None:
            # CUDA: the fetch is queued on a side stream after everything queued so far (the
            # current step's fetch included); the next fetch's stream waits for it. No host sync.
            main = torch.cuda.current_stream(self.device)
            self._side_stream.wait_stream(main)
            with torch.cuda.stream(self._side_stream):
                self._fetch(rows, stamp)
                rows.record_stream(self._side_stream)
            self._prefetch_event = torch.cuda.Event()
            self._prefetch_event.record(self._side_stream)
            self._prefetched_stamp = stamp
            return

        def run():
            try:
                self._fetch(rows, stamp)
            except BaseException as e:  # re-raised by wait() on the caller's thread
                self._prefetch_error = e

        self._prefetched_stamp = stamp
        self._prefetch = threading.Thread(target=run, name="engram-prefetch", daemon=True)
        self._prefetch.start()

    def wait(self) -> None:
        if self._prefetch_event is not None:
            torch.cuda.current_stream(self.device).wait_event(self._prefetch_event)
            self._prefetch_event = None
        if self._prefetch is not None:
            self._prefetch.join()
            self._prefetch = None
        if self._prefetch_error is not None:
            err, self._prefetch_error = self._prefetch_error, None
            self._prefetched_stamp = None
            raise err

    def flush(self) -> None:
        """Write every cached row back to its record."""
        self.wait()
        torch.ops.engram._row_cache_flush(
            self.slot_row, self.records, self.fields, self.field_offsets, self.flag_offset
        )
        self._sync()  # the records are read on the host next

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()

    def reset(self) -> None:
        """Every row back to never written (initialised again on its first fetch)."""
        self.invalidate()
        if self.written:  # a fresh store already reads as zeros: touch nothing
            self.records[:, self.flag_offset] = 0
        self.written = False

    def invalidate(self) -> None:
        """Forget the cache (after the records were replaced, e.g. by a load)."""
        self.wait()
        self._sync()  # no cache kernel may still read the records about to change
        held = self.slot_row[self.slot_row >= 0]
        self.slot_of_row[held] = 0
        self.slot_row.fill_(-1)
        self.slot_meta[:, 0] = -1
        self.slot_meta[:, 1] = 0
        self.lru_links.fill_(self.num_slots)

    # ---- whole-table views of the records ---------------------------------------------------
    def field_view(self, i: int, num_cols_shape: tuple[int, ...]) -> torch.Tensor:
        """Field i of every record as a [num_rows, ...] tensor (a strided view of the records)."""
        f = self.fields[i]
        es = f.element_size()
        width = (f.numel() // self.num_slots) * es
        raw = self.records[:, self.field_offsets[i] : self.field_offsets[i] + width]
        v = raw.view(f.dtype) if width else raw[:, :0].view(f.dtype)
        return v.reshape(self.num_rows, *num_cols_shape) if num_cols_shape != v.shape[1:] else v

    def initialized(self) -> torch.Tensor:
        return self.records[:, self.flag_offset]

    def statistics(self) -> dict[str, int]:
        self.wait()  # a prefetch still running adds to the counters
        hits, misses, evictions, moved = (int(v) for v in self.stats.tolist())
        return dict(hits=hits, misses=misses, evictions=evictions, bytes_moved=moved)


# ---- file tables in checkpoints: copies of the record file, holes kept ---------------------------
# Set by torch_engram.checkpoint while it saves or loads: file-placed tables then put a copy of
# their record file next to the checkpoint (save) or read one back (load) instead of passing the
# whole table through memory. {"mode": "save", "dir", "base", "token", "written": [names]} or
# {"mode": "load", "dir", "keys": the saved state_dict's keys}.
CHECKPOINT_FILES: contextvars.ContextVar[dict | None] = contextvars.ContextVar("engram_checkpoint_files", default=None)


def store_layout(store: RowStore, names: list[str]) -> dict:
    """The record layout of a store whose fields are `names` (checked on load)."""
    return dict(
        num_rows=store.num_rows,
        record_bytes=store.record_bytes,
        flag_offset=store.flag_offset,
        fields=[
            [n, str(f.dtype), list(f.shape[1:]), off] for n, f, off in zip(names, store.fields, store.field_offsets)
        ],
    )


_NO_COPY_RANGE = {errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL, errno.EPERM}


def _copy_range(i: int, o: int, start: int, end: int) -> None:
    """Bytes [start, end) of fd i to the same offsets of fd o: copy_file_range where the
    filesystems allow it (in-kernel, no user copy), else reads and writes."""
    pos = start
    while pos < end:
        try:
            n = os.copy_file_range(i, o, end - pos, pos, pos)
        except OSError as e:
            if e.errno not in _NO_COPY_RANGE:
                raise
            n = 0
            while pos < end:  # across filesystems, or a filesystem without it
                buf = os.pread(i, min(end - pos, 1 << 24), pos)
                if not buf:
                    raise OSError(f"copy_sparse: the source ended early at byte {pos}") from None
                if buf.count(0) != len(buf):  # all-zero blocks stay holes
                    os.pwrite(o, buf, pos)
                pos += len(buf)
            return
        if n == 0:
            raise OSError(f"copy_sparse: the source ended early at byte {pos}")
        pos += n


def copy_sparse(src: str, dst: str, size: int) -> int:
    """Make `dst` a copy of the first `size` bytes of `src`, copying only its data extents (holes,
    the never-written rows of a sparse table, stay holes in dst); dst is emptied first (it may be
    memory-mapped: its pages then read the new content) and fsynced. A source shorter than `size`
    is refused before dst is touched. Returns the bytes copied."""
    have = os.path.getsize(src)
    if have < size:
        raise ValueError(f"copy_sparse: {src} holds {have} bytes, {size} expected (a truncated file?)")
    copied = 0
    with open(src, "rb") as fs, open(dst, "r+b" if os.path.exists(dst) else "w+b") as fd:
        fd.truncate(0)
        fd.truncate(size)
        i, o = fs.fileno(), fd.fileno()
        off = 0
        while off < size:
            try:
                start = os.lseek(i, off, os.SEEK_DATA)
            except OSError as e:
                if e.errno == errno.ENXIO:  # no data after off
                    break
                raise
            if start >= size:
                break
            end = min(os.lseek(i, start, os.SEEK_HOLE), size)
            _copy_range(i, o, start, end)
            copied += end - start
            off = end
        fd.flush()
        os.fsync(o)
    return copied


def same_layout(a: dict, b: dict) -> bool:
    """Whether two store_layout entries describe the same records (the file name aside)."""
    return {k: v for k, v in a.items() if k != "file"} == {k: v for k, v in b.items() if k != "file"}
