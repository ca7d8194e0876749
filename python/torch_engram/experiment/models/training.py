"""Training recipe for the reference model: optimizer groups, LR schedule, batches, evaluation.

Optimizer groups (the paper's recipe, docs/SPEC.md section 7, with AdamW standing in for Muon):
- Engram tables: each EngramTable's own optimizer (TrainConfig.table_optimizer:
  "partial_rowwise_adam" by default, chosen from the quick sweep of every table optimizer; "adam",
  the paper's; "rowwise_adagrad" or "sgd"), LR = table_lr_mult (5) x base LR, no weight decay,
  fused into backward by default.
- Everything else: AdamW at the base LR, weight decay on matrices (dim >= 2) only; norm gains and
  biases are not decayed.
Both follow the same schedule: linear warmup, then cosine decay to min_lr_ratio x their peak LR.
Gradient clipping applies to the dense parameters only (table rows are independent lookups).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 200
    batch_size: int = 16
    seq_len: int = 128
    lr: float = 3e-3
    table_lr_mult: float = 5.0
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    adam_eps: float = 1e-8
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    table_optimizer: str = "partial_rowwise_adam"  # an EngramTable optimizer (torch_engram.table.OPTIMIZERS)
    table_grad: str = "fused"  # "fused" (update inside backward), "sparse" (COO) or "dense"
    eval_batch_size: int = 32

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class DataParallel:
    """A data-parallel run over torch.distributed's default group (as torchrun launches it):
    every rank draws the global batch from the same generator and trains on its contiguous slice
    of batch_size / world sequences, so the run sees the batches of one process with the same
    batch size. The Engram tables are row-sharded over the ranks (EngramTable placement="sharded",
    the row gradients averaged over the ranks), the rest of the model is wrapped by DDP (dense="ddp")
    or FSDP2's fully_shard (dense="fsdp"), with the tables left out, and the MoE balance loss counts
    the routed slots of the global batch. What stays per rank: float rounding (a mean of the ranks'
    means is not the global mean bit for bit)."""

    rank: int
    world: int
    device: torch.device
    dense: str = "ddp"

    @classmethod
    def from_env(cls, device: str = "cpu", dense: str = "ddp") -> DataParallel | None:
        """None when not launched by torchrun (no WORLD_SIZE in the environment); else the default
        process group, initialised here if need be: NCCL with one GPU per rank (cuda:LOCAL_RANK) for
        a CUDA device, gloo on the CPU."""
        import os

        import torch.distributed as dist

        if "WORLD_SIZE" not in os.environ:
            return None
        if dense not in ("ddp", "fsdp"):
            raise ValueError(f"DataParallel: dense must be 'ddp' or 'fsdp', got {dense!r}")
        cuda = torch.device(device).type == "cuda"
        if not dist.is_initialized():
            dist.init_process_group("nccl" if cuda else "gloo")
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
        if cuda:
            torch.cuda.set_device(dev)
        return cls(dist.get_rank(), dist.get_world_size(), dev, dense)

    def local(self, batch: torch.Tensor) -> torch.Tensor:
        """This rank's slice of a global batch (its first dimension divides by the world size)."""
        if batch.shape[0] % self.world:
            raise ValueError(f"DataParallel: a global batch of {batch.shape[0]} does not divide by {self.world} ranks")
        n = batch.shape[0] // self.world
        return batch[self.rank * n : (self.rank + 1) * n]

    def wrap(self, model) -> torch.nn.Module:
        """The module to train: DDP(model) or, for dense="fsdp", model itself sharded in place by
        fully_shard (each block, then the root), the sharded tables left out either way."""
        import torch.distributed as dist

        from ...sharded import ddp_ignore_sharded, fsdp_ignored_params
        from ...table import EngramTable
        from .moe import MoE

        # A table of another placement would learn from this rank's rows only (its update runs in
        # backward, outside DDP's averaging), and the ranks' copies would drift apart unseen.
        local = [n for n, m in model.named_modules() if isinstance(m, EngramTable) and m.placement != "sharded"]
        if local:
            raise ValueError(
                f"DataParallel: every EngramTable must have placement='sharded', but {local} are not "
                "(build the model with table_options=dict(placement='sharded'))"
            )
        for m in model.modules():
            if isinstance(m, MoE):
                m.balance_group = dist.group.WORLD
        if self.dense == "fsdp":
            from torch.distributed.fsdp import fully_shard

            ignored = fsdp_ignored_params(model)
            for block in model.blocks:
                fully_shard(block, ignored_params=ignored)
            fully_shard(model, ignored_params=ignored)
            return model
        from torch.nn.parallel import DistributedDataParallel as DDP

        ddp_ignore_sharded(model)
        return DDP(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """The mean of a scalar over the ranks."""
        import torch.distributed as dist

        value = value.detach().clone()
        dist.all_reduce(value)
        return value / self.world


def make_optimizers(model, tc: TrainConfig) -> list[torch.optim.Optimizer]:
    """[AdamW of the rest] or [AdamW, TableOptimizer] through torch_engram.optim.make_optimizers;
    every group remembers its peak LR. AdamW decays matrices (dim >= 2) only."""
    from ...optim import make_optimizers as engram_optimizers

    def adamw(groups: list[dict]) -> torch.optim.Optimizer:
        params = groups[0]["params"]
        return torch.optim.AdamW(
            [
                {"params": [p for p in params if p.dim() >= 2], "weight_decay": tc.weight_decay},
                {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
            ],
            lr=tc.lr,
            betas=(tc.beta1, tc.beta2),
            eps=tc.adam_eps,
        )

    table_opt, rest_opt = engram_optimizers(
        model,
        tc.lr,
        tc.weight_decay,
        tc.table_lr_mult,
        optimizer_factory=adamw,
        betas=(tc.beta1, tc.beta2),
        eps=tc.adam_eps,
    )
    opts = [o for o in (rest_opt, table_opt) if o is not None]
    for opt in opts:
        for group in opt.param_groups:
            group["peak_lr"] = group["lr"]
    return opts


def lr_factor(step: int, tc: TrainConfig) -> float:
    """Linear warmup over warmup_steps, then cosine from 1 to min_lr_ratio at the last step."""
    if step < tc.warmup_steps:
        return (step + 1) / tc.warmup_steps
    span = max(1, tc.steps - tc.warmup_steps)
    progress = min(1.0, (step - tc.warmup_steps) / span)
    return tc.min_lr_ratio + (1 - tc.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def sample_batch(
    stream: torch.Tensor, batch_size: int, seq_len: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows of seq_len + 1 tokens from a 1-D token stream: (inputs, next-token targets)."""
    if stream.numel() < seq_len + 1:
        raise ValueError(
            f"sample_batch: the stream must hold >= seq_len + 1 = {seq_len + 1} tokens, got {stream.numel()}"
        )
    starts = torch.randint(0, stream.numel() - seq_len, (batch_size,), generator=generator)
    windows = torch.stack([stream[s : s + seq_len + 1] for s in starts.tolist()])
    return windows[:, :-1], windows[:, 1:]


def train(
    model,
    stream: torch.Tensor,
    tc: TrainConfig,
    seed: int,
    aux_loss_coef: float,
    device: torch.device | str = "cpu",
    autocast_dtype: torch.dtype | None = None,
    progress: Callable[[Iterable[int]], Iterable[int]] | None = None,
    dp: DataParallel | None = None,
) -> dict:
    """Train for tc.steps steps; batches are drawn from a generator seeded with `seed`, so runs with
    the same seed see the same tokens in the same order whatever the model. With dp, data parallel
    (DataParallel): the model must have been built with sharded tables if it has tables, and the
    reported losses are the global batch's."""
    device = torch.device(device)
    net = dp.wrap(model) if dp is not None else model
    opts = make_optimizers(model, tc)
    dense_params = [p for p in model.dense_parameters() if p.requires_grad]
    gen = torch.Generator().manual_seed(seed)
    model.train()
    losses = []
    steps = range(tc.steps)
    steps = progress(steps) if progress is not None else steps
    t0 = time.perf_counter()
    for step in steps:
        factor = lr_factor(step, tc)
        for opt in opts:
            for group in opt.param_groups:
                group["lr"] = group["peak_lr"] * factor
        x, y = sample_batch(stream, tc.batch_size, tc.seq_len, gen)
        if dp is not None:
            x, y = dp.local(x), dp.local(y)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            out = net(x, y)
        loss = out.loss + aux_loss_coef * out.aux_loss
        for opt in opts:
            opt.zero_grad(set_to_none=True)
        loss.backward()
        if tc.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(dense_params, tc.grad_clip)
        for opt in opts:
            opt.step()
        losses.append((dp.mean(out.loss) if dp is not None else out.loss).item())
        if hasattr(steps, "set_postfix") and (step % 10 == 0 or step == tc.steps - 1):
            steps.set_postfix(loss=f"{losses[-1]:.3f}")
    tail = losses[-max(1, len(losses) // 10) :]
    return {
        "train_loss": sum(tail) / len(tail),
        "steps": tc.steps,
        "tokens": tc.steps * tc.tokens_per_step,
        "train_s": time.perf_counter() - t0,
    }


@torch.no_grad()
def evaluate(
    model,
    stream: torch.Tensor,
    seq_len: int,
    batch_size: int,
    device: torch.device | str = "cpu",
    autocast_dtype: torch.dtype | None = None,
    dp: DataParallel | None = None,
) -> tuple[float, int]:
    """Summed next-token cross entropy (nats) over every position 1..S-1 of the stream and the count
    of predicted tokens. Windows of seq_len (+1) tokens with stride seq_len tile the stream; the
    last, shorter window is evaluated on its own, so nothing is dropped. With dp the batches are
    dealt over the ranks (every rank runs as many forwards, sharded lookups take all of them) and
    the sum is the whole stream's on every rank."""
    device = torch.device(device)
    model.eval()
    n = stream.numel() - 1
    starts = list(range(0, n, seq_len))
    full = [s for s in starts if s + seq_len <= n]
    tail = [s for s in starts if s + seq_len > n]
    total = 0.0
    groups = [full[i : i + batch_size] for i in range(0, len(full), batch_size)] + [[s] for s in tail]
    mine = groups if dp is None else groups[dp.rank :: dp.world]
    rounds = len(mine) if dp is None else -(-len(groups) // dp.world)
    for i in range(rounds):
        group = mine[i] if i < len(mine) else groups[0]  # a rank out of batches runs one unscored
        length = min(seq_len, n - group[0])
        windows = torch.stack([stream[s : s + length + 1] for s in group]).to(device)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            logits = model(windows[:, :-1]).logits
        if i < len(mine):
            total += torch.nn.functional.cross_entropy(
                logits.float().flatten(0, 1), windows[:, 1:].flatten(), reduction="sum"
            ).item()
    if dp is not None:
        import torch.distributed as dist

        t = torch.tensor([total], dtype=torch.float64, device=device)
        dist.all_reduce(t)
        total = float(t)
    model.train()
    return total, n
