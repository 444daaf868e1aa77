"""Mixture-of-experts MLP (Mixtral, Qwen2-MoE, Qwen3-MoE) and its load-balancing loss.

Routing, as transformers computes it: router logits ``gate(x)`` (N, E); ``p = softmax(logits)``
in fp32; the ``k`` largest ``p`` pick the experts; their weights are those ``p``, divided by their
sum iff ``cfg.norm_topk_prob`` (Mixtral always renormalizes: that is the softmax over the chosen
logits), cast to the compute dtype. Each expert is Ember's ``MLP`` (gate/up/down projections), so
LoRA, NF4 and name-based targeting wrap ``experts.E.gate_proj`` like any other projection (and the
fused ``lora_mlp`` runs per expert). Tokens are dispatched per expert: one gather sorts the
(token, choice) pairs by expert, each expert computes only its contiguous rows (never the whole
batch), one index_add scatters the weighted outputs back; an expert no token chose gets zero
gradients (not None), so every rank of a sharded model reduces the same tensors. Qwen2-MoE's
shared expert runs on every token, scaled by ``sigmoid(shared_expert_gate(x))``.

Load balancing (Switch Transformer eq. 4-6, transformers' ``load_balancing_loss_func``): over the
tokens of one forward and all sparse layers together, ``E * sum_e f_e * P_e`` where ``f_e`` is the
share of top-k assignments that went to expert e (summed over the k choices: sum_e f_e = k) and
``P_e`` the mean router probability of e. Both are sums over tokens divided by the token count,
so each MoE module adds per-token sums to ``router_stats`` (a list set by ``collect_router_stats``)
and the loss is formed at the end: token-chunked MLP branches (``engine/activation.py``) give the
same loss as one pass. Only forwards with gradients enabled record (a frozen reference or
teacher forward under ``no_grad`` does not count). Every token of the forward counts: Ember's
training batches are packed without padding, which is transformers' result with no attention
mask (or an all-ones one).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn as nn

from ember.models.config import ModelConfig


class MoE(nn.Module):
    """Sparse MLP: ``gate`` (router, no bias), ``experts`` (ModuleList of MLPs) and, with
    ``cfg.shared_expert_intermediate_size``, ``shared_expert`` / ``shared_expert_gate``.
    ``make_mlp(width)`` builds one expert (the decoder's ``MLP``)."""

    def __init__(self, cfg: ModelConfig, make_mlp: Callable[[int], nn.Module]):
        super().__init__()
        self.num_experts, self.top_k = cfg.num_experts, cfg.num_experts_per_tok
        self.norm_topk_prob = cfg.norm_topk_prob
        self.gate = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False)
        self.experts = nn.ModuleList(make_mlp(cfg.moe_intermediate_size)
                                     for _ in range(cfg.num_experts))
        if cfg.shared_expert_intermediate_size:
            self.shared_expert = make_mlp(cfg.shared_expert_intermediate_size)
            self.shared_expert_gate = nn.Linear(cfg.hidden_size, 1, bias=False)
        self.router_stats: list | None = None  # set by collect_router_stats

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(router logits (N, E), chosen experts (N, k) int64, their weights (N, k) x.dtype)."""
        logits = self.gate(x)  # (N, E)
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        weights, chosen = torch.topk(probs, self.top_k, dim=-1)  # (N, k)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        if self.router_stats is not None and torch.is_grad_enabled():
            self.router_stats.append(_stats(probs, chosen, self.num_experts))
        return logits, chosen, weights.to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # (N, D)
        _, chosen, weights = self.route(x)
        flat = chosen.reshape(-1)  # (N * k,): token n's j-th choice at n * k + j
        order = torch.argsort(flat, stable=True)
        tokens = order // self.top_k  # (N * k,) token of each assignment, grouped by expert
        w = weights.reshape(-1).index_select(0, order)[:, None]  # (N * k, 1)
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()
        xs = x.index_select(0, tokens)  # (N * k, D): one gather, each expert's rows contiguous
        hs, idle, start = [], [], 0
        for e, n in enumerate(counts):
            if n:
                hs.append(self.experts[e](xs[start:start + n]))  # (n, D)
                start += n
            elif torch.is_grad_enabled():
                # An expert no token chose still joins the graph with zero gradients: FSDP2
                # reduce-scatters the gradients of a block's parameters together, and a rank
                # whose expert had no gradient (None) would disagree with one where it had tokens.
                idle += [p.sum() for p in self.experts[e].parameters() if p.requires_grad]
        out = torch.zeros_like(x)
        if hs:  # (no tokens at all: nothing to scatter)
            out = out.index_add_(0, tokens, torch.cat(hs) * w)  # one scatter
        if idle:
            out = out + 0.0 * torch.stack(idle).sum().to(out.dtype)
        if hasattr(self, "shared_expert"):
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out.reshape(shape)


def _stats(probs: torch.Tensor, chosen: torch.Tensor, num_experts: int) -> torch.Tensor:
    """(2 * E + 1,) fp32: top-k assignments per expert (no gradient), router probabilities summed
    over the tokens (differentiable), and the token count."""
    counts = torch.zeros(num_experts, dtype=torch.float32, device=probs.device)
    counts = counts.index_add(0, chosen.reshape(-1),
                              torch.ones(chosen.numel(), dtype=torch.float32,
                                         device=probs.device))
    n = torch.full((1,), probs.shape[0], dtype=torch.float32, device=probs.device)
    return torch.cat([counts, probs.sum(0), n])


@contextmanager
def collect_router_stats(model: nn.Module) -> Iterator[list]:
    """Within the block, every MoE module of ``model`` appends its per-forward sums to the list
    yielded (input of ``load_balancing_loss``); outside it, nothing is recorded."""
    stats: list = []
    mods = [m for m in model.modules() if isinstance(m, MoE)]
    for m in mods:
        m.router_stats = stats
    try:
        yield stats
    finally:
        for m in mods:
            m.router_stats = None


def load_balancing_loss(stats: list, num_experts: int) -> torch.Tensor | None:
    """transformers' ``load_balancing_loss_func`` (without the coefficient) from recorded sums;
    None when nothing was recorded."""
    if not stats:
        return None
    total = torch.stack(stats).sum(0)  # (2 * E + 1,)
    counts, probs, n = total[:num_experts], total[num_experts:-1], total[-1]
    return num_experts * torch.sum((counts / n) * (probs / n))


def has_moe(model: nn.Module) -> bool:
    return any(isinstance(m, MoE) for m in model.modules())


__all__ = ["MoE", "collect_router_stats", "has_moe", "load_balancing_loss"]
