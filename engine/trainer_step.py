"""One optimizer step of the trainer (``Trainer`` in ``engine/trainer.py`` inherits
``StepMixin``): this rank's micro-batches forward and backward, token-weighted over the whole step
and all processes, MoE's load-balancing term, gradient clipping, the non-finite guard and the
optimizer / fp16 scaler step; ``StepStats``, what a step reports.

It uses ``cfg``, ``info``, ``objective``, ``model``, ``device``, ``autocast`` and ``aux_coef``,
set by ``Trainer.run``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ember.engine.distributed import all_reduce_sums, clip_grad_norm
from ember.engine.guards import oom_guard
from ember.models.moe import collect_router_stats, load_balancing_loss

if TYPE_CHECKING:
    from ember.engine.guards import GracefulStop, NonFiniteGuard


@dataclass
class StepStats:
    loss: float  # token-mean loss of the step, all processes together
    grad_norm: float
    loss_tokens: int
    tokens: int
    applied: bool  # False: a non-finite step, skipped
    stop: bool  # a process got SIGTERM / SIGINT
    extra: dict  # the objective's metrics (distillation's KD / SFT terms, DPO's rewards)


class StepMixin:
    """The optimizer step of ``Trainer``."""

    # --- one optimizer step --------------------------------------------------------------------
    def _step(self, micro: list, step: int, opt, params, scaler, guard: NonFiniteGuard,
              signals: GracefulStop, pad: list = ()) -> StepStats:
        """One optimizer step on this rank's ``micro``-batches; ``pad``: batches for passes that
        count for nothing (a rank with fewer batches: a sharded forward is a collective)."""
        cfg, info = self.cfg, self.info
        obj = self.objective
        n_loss, n_tok, n_w, n_micro = all_reduce_sums([sum(b.num_loss_tokens for b in micro),
                                                       sum(b.num_tokens for b in micro),
                                                       sum(obj.weight(b) for b in micro),
                                                       len(micro)], info)
        n_loss, n_w = int(n_loss), int(n_w)
        act = cfg.activations
        coef = self.aux_coef
        aux_local = 0.0
        with oom_guard(batch_tokens=max(b.num_tokens for b in [*micro, *pad]),
                       seq_len=max(b.max_seqlen for b in [*micro, *pad]), device=self.device,
                       step=step, method=cfg.method, checkpointing=act.checkpointing,
                       offload=act.offload, mlp_chunk_tokens=act.mlp_chunk_tokens):
            local = 0.0
            obj.begin_step(micro, lambda xs: all_reduce_sums(xs, info), model=self.model,
                           device=self.device, autocast=self.autocast, pad=pad)
            if n_w > 0:
                # Every rank runs every micro-batch (even one without answer tokens: it adds 0):
                # a sharded forward / backward is a collective.
                for b in micro:
                    with self.autocast(), collect_router_stats(self.model) as stats:
                        loss = obj.loss(self.model, b.to(self.device), n_w)
                    local += float(loss.detach())
                    aux = load_balancing_loss(stats, self.model.cfg.num_experts) if coef else None
                    if aux is not None:
                        # MoE load balancing: one loss per micro-batch (its forwards together),
                        # the step's term the mean over its micro-batches (all processes), as TRL's
                        # SFT / DPO / KTO trainers average it; logged apart from the loss
                        loss = loss + coef * aux / n_micro
                        aux_local += float(aux.detach()) / n_micro
                    (scaler.scale(loss) if scaler else loss).backward()
                for b in pad:
                    sums = dict(obj.sums)  # its metric sums: unchanged, the same keys (reduced)
                    with self.autocast():
                        loss = obj.loss(self.model, b.to(self.device), n_w) * 0.0
                    obj.sums = {k: sums.get(k, 0.0) for k in obj.sums}
                    (scaler.scale(loss) if scaler else loss).backward()
            if scaler:
                scaler.unscale_(opt)
            norm = clip_grad_norm(params, cfg.optim.max_grad_norm or math.inf)
            extra = obj.step_metrics(lambda xs: all_reduce_sums(xs, info))
            # One collective for the loss and the stop requests, so all ranks stop together.
            total, stops, aux_all = all_reduce_sums(
                [local, float(signals.requested), aux_local], info)
            if coef:
                extra = {**extra, "router_aux_loss": aux_all}
            # fp16: a non-finite norm (of the unscaled gradients) is the step the scaler skips
            # (its unscale_ found inf/NaN): skipped and logged, counted only at a scale <= 1.
            applied = guard.check(step, total, norm,
                                  loss_scale=scaler.get_scale() if scaler else None)
            if applied:
                if scaler:
                    scaler.step(opt)
                else:
                    opt.step()
            if scaler:
                scaler.update()
            opt.zero_grad(set_to_none=True)
        return StepStats(total, norm, n_loss, int(n_tok), applied, stops > 0, extra)
