"""SwiGLU feed-forward and a top-k routed mixture of experts with a shared expert."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


class SwiGLU(nn.Module):
    """W2 (SiLU(W1 x) * W3 x): the dense FFN, the shared expert."""

    def __init__(self, d_model: int, d_hidden: int):
        super().__init__()
        self.w13 = nn.Linear(d_model, 2 * d_hidden, bias=False)
        self.w2 = nn.Linear(d_hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w13(x).chunk(2, dim=-1)
        return self.w2(F.silu(gate) * up)


class MoE(nn.Module):
    """Top-k routed SwiGLU experts plus an always-on shared expert.

    Routed experts are three stacked parameters ([E, D, d_e], [E, D, d_e], [E, d_e, D]) so that
    parameter counting and optimizer grouping see them as one block. Tokens are sorted by expert and
    each expert runs one matmul on its slice: compute is proportional to top_k, not to E.

    Routing: "softmax" (scores = softmax(logits), top-k weights renormalised) or "sigmoid"
    (DeepSeek-V3 style: scores = sigmoid(logits), top-k weights renormalised). The auxiliary
    load-balancing loss is the Switch-Transformer form E * sum_e f_e * P_e, with f_e the fraction of
    routed slots sent to expert e and P_e its mean normalised score; it is 1 under uniform routing.
    Trained data-parallel (balance_group set), f_e counts the slots of every rank, so the ranks'
    mean loss is the global batch's.
    """

    def __init__(
        self, d_model: int, n_experts: int, top_k: int, d_expert: int, d_shared: int, routing: str = "softmax"
    ):
        super().__init__()
        self.n_experts, self.top_k, self.routing = n_experts, top_k, routing
        self.router = nn.Linear(d_model, n_experts, bias=False)
        self.w1 = nn.Parameter(torch.empty(n_experts, d_model, d_expert))
        self.w3 = nn.Parameter(torch.empty(n_experts, d_model, d_expert))
        self.w2 = nn.Parameter(torch.empty(n_experts, d_expert, d_model))
        self.shared = SwiGLU(d_model, d_shared) if d_shared > 0 else None
        # A process group when the model trains data-parallel (training.DataParallel sets it): the
        # balance loss then counts the routed slots of every rank.
        self.balance_group = None

    def routed_parameters(self):
        return [self.w1, self.w3, self.w2]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [..., D] -> (y [..., D], aux_loss scalar)."""
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        logits = self.router(x).float()
        if self.routing == "softmax":
            scores = logits.softmax(dim=-1)
        else:
            scores = logits.sigmoid()
        weights, experts = scores.topk(self.top_k, dim=-1)  # [N, k]
        weights = weights / weights.sum(dim=-1, keepdim=True).clamp_min(1e-20)

        flat_experts = experts.flatten()
        order = flat_experts.argsort(stable=True)
        token_of_slot = order // self.top_k
        counts = torch.bincount(flat_experts, minlength=self.n_experts)
        xs = x.index_select(0, token_of_slot)
        outs = []
        # One host sync for the split sizes; fine for the reference model.
        for e, xe in enumerate(xs.split(counts.tolist())):
            if xe.shape[0]:
                outs.append((F.silu(xe @ self.w1[e]) * (xe @ self.w3[e])) @ self.w2[e])
        ys = torch.cat(outs) if outs else xs
        # Weighted top-k sum in fp32 (expert outputs are bf16 under autocast), back to x's dtype.
        ys = ys.float() * weights.flatten()[order].unsqueeze(-1)
        y = x.new_zeros(x.shape, dtype=torch.float32).index_add_(0, token_of_slot, ys).to(x.dtype)
        if self.shared is not None:
            y = y + self.shared(x)

        frac = counts.float() / flat_experts.numel()
        if self.balance_group is not None and self.training:
            # Data parallel: f_e over the global batch (it carries no gradient), so that the ranks'
            # mean aux loss, which DDP's gradient averaging takes, is the global batch's.
            both = torch.cat([counts.float(), counts.new_tensor([flat_experts.numel()], dtype=torch.float32)])
            dist.all_reduce(both, group=self.balance_group)
            frac = both[:-1] / both[-1]
        mean_score = (scores / scores.sum(dim=-1, keepdim=True)).mean(dim=0)
        aux = self.n_experts * (frac * mean_score).sum()
        return y.reshape(shape), aux
