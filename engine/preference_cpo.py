"""``[cpo]``: TRL's ``CPOConfig`` for ``objective = "cpo"`` (Contrastive Preference Optimization,
Xu et al. 2024: reference-free, the chosen answers' NLL weighted ``cpo_alpha`` plus a pair loss;
the objective is ``CPO`` in ``engine/preference_objectives.py``, the losses ``cpo_loss`` in
``engine/preference_losses.py``)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ember import EmberError
from ember.engine.preference_losses import CPO_LOSS_TYPES


@dataclass(frozen=True, kw_only=True)
class CPOConfig:
    beta: float = 0.1  # scale of the log-prob margin (ipo: the paper's tau)
    # "sigmoid" (CPO) | "hinge" (SLiC) | "ipo" | "simpo" (SimPO with the NLL term) | "alphapo"
    # (TRL's shorthand: "simpo" with cpo_alpha = 0). sigmoid and hinge take the answers' summed
    # log-probs, ipo and simpo their per-token means, as TRL's CPOTrainer
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0  # sigmoid, simpo: the assumed fraction of flipped labels
    cpo_alpha: float = 1.0  # weight of the chosen answers' NLL (CPO's behaviour-cloning term)
    simpo_gamma: float = 0.5  # loss_type "simpo": the target margin
    # AlphaPO: != 0 scores each answer (1 - p^-alpha) / alpha, p = exp(its log-prob), in place of
    # the log-prob, for every loss type (TRL's CPOConfig alpha; 0: off)
    alpha: float = 0.0
    # Turn off, for the run, the dropout its training forwards draw (lora.dropout, Phi's
    # residual/embedding dropout; model.attention_dropout stays, as TRL leaves it):
    # TRL's disable_dropout, default on
    disable_dropout: bool = True

    def __post_init__(self) -> None:
        if self.loss_type == "alphapo":
            if self.cpo_alpha not in (0.0, 1.0):
                raise EmberError(
                    f'cpo.loss_type = "alphapo" is "simpo" with cpo_alpha = 0 '
                    f"(TRL's shorthand sets it), got cpo_alpha = {self.cpo_alpha}: "
                    'use loss_type = "simpo" for SimPO with an NLL term'
                )
            object.__setattr__(self, "loss_type", "simpo")
            object.__setattr__(self, "cpo_alpha", 0.0)
        if self.loss_type not in CPO_LOSS_TYPES:
            raise EmberError(
                f"cpo.loss_type must be one of "
                f"{', '.join(map(repr, (*CPO_LOSS_TYPES, 'alphapo')))}, got "
                f"{self.loss_type!r}"
            )
        if not self.beta > 0:
            raise EmberError(f"cpo.beta must be > 0, got {self.beta}")
        if not 0 <= self.label_smoothing < 0.5:
            raise EmberError(f"cpo.label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.label_smoothing and self.loss_type not in ("sigmoid", "simpo"):
            raise EmberError(
                f'cpo.label_smoothing applies to loss_type "sigmoid" and '
                f'"simpo", not {self.loss_type!r} (TRL ignores it there): drop it'
            )
        if not (self.cpo_alpha >= 0 and math.isfinite(self.cpo_alpha)):
            raise EmberError(f"cpo.cpo_alpha must be >= 0, got {self.cpo_alpha}")
        if not self.simpo_gamma >= 0:
            raise EmberError(f"cpo.simpo_gamma must be >= 0, got {self.simpo_gamma}")
        if not math.isfinite(self.alpha):
            raise EmberError(f"cpo.alpha must be finite, got {self.alpha}")
