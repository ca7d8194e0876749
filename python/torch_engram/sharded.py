"""Row-sharded EngramTables over torch.distributed (placement="sharded"; docs/SPEC.md section 3).

Rows are split in contiguous ranges of ceil(num_rows / W) rows over the ranks of a process group
(the last ones shorter: DTensor's Shard(0) layout); each rank holds its shard and the shard's
optimizer state, as the EngramTable's own weight and state tensors ([rows of the shard, ...]).
Checkpoints go through torch.distributed.checkpoint (dcp_save / dcp_load below), which reshards:
a checkpoint saved on 4 ranks loads on 2 or 1 and back.

Forward, on every rank: de-duplicate this rank's rows (sorted, so they are grouped by owner), send
the ids to their owners (all_to_all_single with variable splits), owners gather their rows and
send them back, and each rank expands the unique rows to its lookups. Backward: each unique row's
gradient, summed over this rank's lookups in lookup order, goes back to its owner the same way;
the owner sums the contributions in rank order and applies the table's optimizer (table_update,
with stochastic rounding keyed by the global row). Nothing of a shard's size is allocated per
step: only the unique rows travel. Every backward is one update on every rank (empty or not), so
the step counts stay equal.

Bad ids: every rank checks its rows and the ranks agree on the outcome (one all_reduce) before any
exchange, so a rank with rows out of range makes every rank raise, instead of leaving the others
waiting in a collective.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Shard:
    group: object  # the process group (None: the default group)
    rank: int
    world: int
    bounds: tuple[int, ...]  # [world + 1] row boundaries; rank i owns [bounds[i], bounds[i + 1])

    @property
    def start(self) -> int:
        return self.bounds[self.rank]

    @property
    def rows(self) -> int:
        return self.bounds[self.rank + 1] - self.bounds[self.rank]


def shard_bounds(num_rows: int, world: int) -> tuple[int, ...]:
    """Contiguous ranges of ceil(num_rows / world) rows, the last ones shorter (possibly empty):
    the layout of DTensor's Shard(0), so torch.distributed.checkpoint can reshard the tables."""
    chunk = -(-num_rows // world)
    return tuple(min(i * chunk, num_rows) for i in range(world + 1))


def make_shard(num_rows: int, group=None) -> Shard:
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("EngramTable: placement='sharded' needs torch.distributed initialised (init_process_group)")
    world = dist.get_world_size(group)
    return Shard(group, dist.get_rank(group), world, shard_bounds(num_rows, world))


def _exchange(t: torch.Tensor, send: list[int], recv: list[int], group) -> torch.Tensor:
    """all_to_all_single of the rows of t, split by `send` counts, received by `recv` counts."""
    out = t.new_empty((sum(recv), *t.shape[1:]))
    dist.all_to_all_single(out, t.contiguous(), recv, send, group=group)
    return out


def _check_rows(flat: torch.Tensor, num_rows: int, shard: Shard) -> None:
    bad = bool(((flat < 0) | (flat >= num_rows)).any()) if flat.numel() else False
    flags = torch.zeros(shard.world, dtype=torch.int64, device=flat.device)  # NCCL needs device tensors
    flags[shard.rank] = int(bad)
    dist.all_reduce(flags, group=shard.group)  # every rank learns which ranks are bad
    if int(flags.sum()):
        ranks = [i for i, f in enumerate(flags.tolist()) if f]
        mine = f": this rank's rows hold {int(flat[(flat < 0) | (flat >= num_rows)][0])}" if bad else ""
        raise RuntimeError(
            f"EngramTable (sharded): rows must lie in [0, {num_rows}), but rank(s) {ranks} got rows outside{mine}"
        )


class _ShardedGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight, rows, table):
        shard: Shard = table._shard
        flat = rows.reshape(-1).to(torch.int64)
        _check_rows(flat, table.num_rows, shard)
        uniq, inverse = torch.unique(flat, sorted=True, return_inverse=True)
        owner = torch.bucketize(uniq, torch.tensor(shard.bounds[1:], dtype=torch.int64, device=uniq.device), right=True)
        send = torch.bincount(owner, minlength=shard.world)
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=shard.group)
        send_l, recv_l = send.tolist(), recv.tolist()
        stats = table.shard_stats  # what a step moves (bench_sharded.py reads it)
        own = (flat >= shard.start) & (flat < shard.start + shard.rows)
        stats["lookups"] += flat.numel()
        stats["remote_lookups"] += flat.numel() - int(own.sum())
        stats["unique"] += uniq.numel()
        stats["remote_unique"] += uniq.numel() - send_l[shard.rank]
        asked = _exchange(uniq, send_l, recv_l, shard.group) - shard.start  # local rows of the owner
        got = _exchange(weight.detach().index_select(0, asked), recv_l, send_l, shard.group)
        ctx.table, ctx.meta = table, (rows, send_l, recv_l, asked)
        return got.index_select(0, inverse).reshape(*rows.shape[:-1], rows.shape[-1] * weight.shape[1])

    @staticmethod
    def backward(ctx, grad_e):
        table = ctx.table
        shard: Shard = table._shard
        lookups, send_l, recv_l, asked = ctx.meta
        acc = torch.float64 if table.weight.dtype == torch.float64 else torch.float32
        # Each unique row's gradient over this rank's lookups, summed in lookup order by the
        # gather's own sparse backward (sorted, not atomic: the same bits on CPU and CUDA); its
        # rows are the forward's sorted unique rows, so the sums go to the owners as the ids came.
        _, summed = torch.ops.engram._multihead_gather_backward_sparse(grad_e.to(acc), lookups)
        parts = _exchange(summed, send_l, recv_l, shard.group)
        # The owner: the contributions summed per row in rank order, one sender at a time (a
        # sender names a row at most once, so no two additions of one pass meet on a row and the
        # order holds on CUDA too); with shard_grad="mean" divided by the world size, as DDP
        # averages the dense gradients of per-rank mean losses.
        rows, where = torch.unique(asked, sorted=True, return_inverse=True)
        total = torch.zeros(rows.numel(), table.d_head, dtype=acc, device=parts.device)
        start = 0
        for n in recv_l:
            if n:
                total.index_add_(0, where[start : start + n], parts[start : start + n])
            start += n
        if table.shard_grad == "mean" and shard.world > 1:
            total /= shard.world
        with torch.no_grad():
            torch.ops.engram.table_update(
                table.weight,
                table.momentum1,
                table.momentum2,
                table.row_step,
                table.step_count,
                rows,
                total,
                table.hparams,
                table.optimizer,
                table._rounding_seed(),
                table._shard_row_ids,
            )
        return None, None, None


def sharded_gather(table, rows: torch.Tensor) -> torch.Tensor:
    """e [..., H * d_head] of global rows [..., H] from a sharded table (see the module docstring)."""
    if torch.is_grad_enabled() and table.weight.requires_grad:
        return _ShardedGather.apply(table.weight, rows, table)
    with torch.no_grad():
        return _ShardedGather.forward(_NoCtx(), table.weight, rows, table)


class _NoCtx:
    """A stand-in ctx for the forward without autograd."""


def init_shard_(weight: torch.Tensor, start: int, std: float, seed: int, block: int = 1 << 16) -> None:
    """N(0, std^2) rows that do not depend on the world size: rows come in blocks of `block`, each
    drawn from a generator seeded by (seed, block index); a shard draws the blocks it overlaps."""
    n, d = weight.shape
    first, last = start // block, (start + n - 1) // block if n else start // block - 1
    with torch.no_grad():
        for b in range(first, last + 1):
            g = torch.Generator().manual_seed(seed * 1_000_003 + b)
            vals = torch.randn(block, d, generator=g, dtype=torch.float32) * std
            lo, hi = max(start, b * block), min(start + n, (b + 1) * block)
            weight[lo - start : hi - start].copy_(vals[lo - b * block : hi - b * block])


# ---- checkpoints: torch.distributed.checkpoint, resharded -----------------------------------
# The [num_rows, ...] tensors of each optimizer (the others are empty placeholders).
_SHARDED_STATE = {
    "adam": ("weight", "momentum1", "momentum2", "row_step"),
    "partial_rowwise_adam": ("weight", "momentum1", "momentum2", "row_step"),
    "rowwise_adagrad": ("weight", "momentum1"),
    "sgd": ("weight",),
}


def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    out, acc = [], 1
    for n in reversed(shape):
        out.append(acc)
        acc *= n
    return tuple(reversed(out))


def _sharded_tables(module: torch.nn.Module):
    """(prefix, table) of every sharded EngramTable in `module`."""
    for prefix, m in module.named_modules():
        if getattr(m, "_shard", None) is not None:
            yield prefix, m


def _sharded_state(module: torch.nn.Module):
    """(state_dict key, table, tensor) of every [num_rows, ...] tensor of the sharded tables."""
    for prefix, m in _sharded_tables(module):
        for name in _SHARDED_STATE[m.optimizer]:
            yield (f"{prefix}.{name}" if prefix else name), m, getattr(m, name)


def dcp_state_dict(module: torch.nn.Module) -> dict:
    """`module`'s state_dict with every sharded table's weight and state as DTensors (Shard(0) of
    the whole table over the table's group) that share memory with the shards: what
    torch.distributed.checkpoint saves and loads in place, in any world size."""
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor import Shard as DShard

    state = module.state_dict()
    for key, m, t in _sharded_state(module):
        mesh = DeviceMesh.from_group(m._shard.group or dist.group.WORLD, m.weight.device.type)
        shape = (m.num_rows, *t.shape[1:])
        stride = _contiguous_strides(shape)
        state[key] = DTensor.from_local(t.data, mesh, [DShard(0)], run_check=False, shape=shape, stride=stride)
    return state


def dcp_save(module: torch.nn.Module, checkpoint_id) -> None:
    """Save `module` (sharded tables as their whole tables) with torch.distributed.checkpoint."""
    import torch.distributed.checkpoint as dcp

    dcp.save(dcp_state_dict(module), checkpoint_id=checkpoint_id)


def dcp_load(module: torch.nn.Module, checkpoint_id) -> None:
    """Load a dcp_save checkpoint into `module`, in place, whatever the world size it was saved with."""
    import torch.distributed.checkpoint as dcp

    state = dcp_state_dict(module)
    dcp.load(state, checkpoint_id=checkpoint_id)
    plain = {k: v for k, v in state.items() if not hasattr(v, "to_local")}
    module.load_state_dict({**module.state_dict(), **plain})


def ddp_ignore_sharded(model: torch.nn.Module) -> list[str]:
    """Tell DistributedDataParallel to leave every sharded table alone (its weight and state
    differ per rank and are updated in backward, not by gradients): call before wrapping the
    model. Returns the ignored names."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    names = []
    for prefix, m in _sharded_tables(model):
        names += [f"{prefix}.{n}" if prefix else n for n, _ in m.named_parameters(recurse=False)]
        names += [f"{prefix}.{n}" if prefix else n for n, _ in m.named_buffers(recurse=False)]
    DDP._set_params_and_buffers_to_ignore_for_model(model, names)
    return names


def fsdp_ignored_params(model: torch.nn.Module) -> set:
    """The parameters of every sharded table in `model`, for FSDP2's
    `fully_shard(..., ignored_params=...)`: FSDP2 must neither shard them again nor reduce their
    (never formed) gradients; the tables update themselves in backward."""
    return {p for _, m in _sharded_tables(model) for p in m.parameters(recurse=False)}


def full_state_dict(module: torch.nn.Module, dst: int = 0) -> dict | None:
    """`module`'s state_dict with every sharded table's weight and state gathered whole, as a
    single-process table of the same rows would hold them, on the (global) rank `dst`; None on the
    other ranks, which must all call it. For a model small enough for one host (the sweep saves its
    models so); a large one is saved as it lies with dcp_save."""
    # FSDP2's parameters are DTensors: whole ones too (a collective, in the same order everywhere).
    state = {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in module.state_dict().items()}
    mine = dist.get_rank() == dst
    for key, m, t in _sharded_state(module):
        shard = m._shard
        # gather needs equal sizes: the shorter last shards travel padded to ceil(R / W) rows.
        padded = t.detach().new_zeros((shard.bounds[1] - shard.bounds[0], *t.shape[1:]))
        padded[: t.shape[0]] = t.detach()
        parts = [torch.empty_like(padded) for _ in range(shard.world)] if mine else None
        dist.gather(padded, parts, dst=dst, group=shard.group)
        if mine:
            state[key] = torch.cat(parts)[: m.num_rows]
    return state if mine else None
