"""The training path of a model with Engram tables: one helper builds its optimizers.

Tables are found as what they are (`EngramTable` submodules), never by tags or names. Each
table learns through its own object (its optimizer and state live in the table and its
state_dict, see torch_engram.table); `TableOptimizer` gives them the torch.optim.Optimizer face
that training loops and learning-rate schedulers expect: its param groups (one per table) write
lr, betas, eps and weight_decay through to the tables, `step()` updates sparse- and dense-mode
tables from their gradients (fused tables were already updated in backward) and `zero_grad()`
clears them. The rest of the model goes to AdamW or a user factory.

The recipe (docs/SPEC.md section 7): tables at 5x the base learning rate with no weight
decay, the rest at the base rate with the user's weight decay.

Gradient clipping and AMP: fused tables have no .grad, so `clip_grad_norm_(model.parameters())`
clips the rest of the model only, which is what FBGEMM's fused tables do too; GradScaler never
unscales (or skips) a fused update, so train fused tables in float32 or bfloat16 without a scaler.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from .table import EngramTable

_HPARAM_KEYS = ("lr", "betas", "eps", "weight_decay")


class _TableGroup(dict):
    """A param group that writes its optimizer settings through to its table, so that LR
    schedulers (which set group["lr"]) reach the fused update inside backward."""

    def __init__(self, table: EngramTable, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.table = table

    def __setitem__(self, key, value):
        super().__setitem__(key, value)
        if key in _HPARAM_KEYS:
            self.table.set_hparams(**{key: value})


def find_tables(model: nn.Module) -> list[EngramTable]:
    """The EngramTable submodules of `model` (each once), in module order."""
    seen, tables = set(), []
    for m in model.modules():
        if isinstance(m, EngramTable) and id(m) not in seen:
            seen.add(id(m))
            tables.append(m)
    return tables


class TableOptimizer(torch.optim.Optimizer):
    """The optimizer face of EngramTables (see the module docstring). Its own state_dict holds the
    param groups' settings; the tables' weights and optimizer state are in the model's state_dict.
    """

    def __init__(self, tables: Iterable[EngramTable]):
        tables = list(tables)
        if not tables:
            raise ValueError("TableOptimizer: needs at least one EngramTable")
        for t in tables:
            if not isinstance(t, EngramTable):
                raise TypeError(f"TableOptimizer: expected EngramTable modules, got {type(t).__name__}")
        self.tables = tables
        groups = [self._group_dict(t, {"params": [t.weight]}) for t in tables]
        # Defaults as torch's optimizers have them (schedulers such as OneCycleLR read them).
        h = tables[0].hparams.tolist()
        super().__init__(groups, dict(lr=h[0], betas=(h[1], h[2]), eps=h[3], weight_decay=h[4]))

    @staticmethod
    def _group_dict(table: EngramTable, base: dict) -> _TableGroup:
        h = table.hparams.tolist()
        group = _TableGroup(table, base)
        dict.update(group, lr=h[0], betas=(h[1], h[2]), eps=h[3], weight_decay=h[4])
        return group

    def add_param_group(self, param_group: dict) -> None:
        if not isinstance(param_group, _TableGroup):
            raise TypeError(
                "TableOptimizer: param groups come from EngramTables; build a new TableOptimizer for other tables"
            )
        super().add_param_group(param_group)

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        # Optimizer.load_state_dict rebuilds plain dicts; restore the write-through groups and push
        # the loaded settings to the tables.
        self.param_groups = [self._reload_group(t, g) for t, g in zip(self.tables, self.param_groups)]

    def _reload_group(self, table: EngramTable, group: dict) -> _TableGroup:
        new = _TableGroup(table)
        dict.update(new, group)
        table.set_hparams(**{k: group[k] for k in _HPARAM_KEYS if k in group})
        return new

    @torch.no_grad()
    def step(self, closure: Callable | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for t in self.tables:
            t.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for t in self.tables:
            t.zero_grad()


def make_optimizers(
    model: nn.Module,
    base_lr: float,
    weight_decay: float = 0.0,
    table_lr_mult: float = 5.0,
    *,
    optimizer_factory: Callable[[list[dict]], torch.optim.Optimizer] | None = None,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    table_betas: tuple[float, float] | None = None,
    table_eps: float | None = None,
) -> tuple[TableOptimizer | None, torch.optim.Optimizer | None]:
    """(table optimizer, optimizer of the rest) of the Engram recipe.

    Every EngramTable in `model` gets lr = table_lr_mult * base_lr, weight_decay 0 and
    `table_betas`/`table_eps` (default: `betas`/`eps`); its optimizer kind and state are the
    table's own. The other parameters that require grad go to `optimizer_factory(param_groups)`
    (one group with lr and weight_decay set), by default AdamW(betas, eps). Either side is None
    when it has nothing to train.
    """
    tables = find_tables(model)
    for t in tables:
        t.set_hparams(
            lr=base_lr * table_lr_mult,
            betas=table_betas or betas,
            eps=eps if table_eps is None else table_eps,
            weight_decay=0.0,
        )
    table_weights = {id(t.weight) for t in tables}
    rest = [p for p in model.parameters() if id(p) not in table_weights and p.requires_grad]
    table_opt = TableOptimizer(tables) if tables else None
    rest_opt = None
    if rest:
        groups = [dict(params=rest, lr=base_lr, weight_decay=weight_decay)]
        if optimizer_factory is None:
            rest_opt = torch.optim.AdamW(groups, lr=base_lr, betas=betas, eps=eps, weight_decay=weight_decay)
        else:
            rest_opt = optimizer_factory(groups)
    return table_opt, rest_opt
