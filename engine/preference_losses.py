"""Preference losses on per-pair sequence log-probabilities, with TRL's definitions.

Every function takes one value per pair for the chosen and the rejected answer and returns
``PairLosses``: the loss of each pair (the objective averages them over the pairs of a step) and
the rewards TRL logs (``rewards/chosen``, ``rewards/rejected``; detached). ``s`` is the sigmoid,
``e`` the label smoothing.

DPO (``dpo_loss``; TRL ``DPOTrainer`` ``loss_type``), on the margin of the log-ratios to the
reference ``h = (pi_c - ref_c) - (pi_r - ref_r)``; rewards ``beta * (pi - ref)``:

    sigmoid  -(1 - e) log s(beta h) - e log s(-beta h)       Rafailov et al. 2023; e > 0: the
                                                             conservative DPO of Mitchell 2023
                                                             (TRL 0.x; TRL 1.x ignores e here,
                                                             so e = 0 is TRL 1.x's loss)
    robust   (-(1 - e) log s(beta h) + e log s(-beta h)) / (1 - 2e)   Chowdhury et al. 2024: an
                                                             unbiased loss when a fraction e of
                                                             the labels is flipped (e in (0, .5))
    hinge    relu(1 - beta h)                                SLiC (Zhao et al. 2023)
    ipo      (h - 1 / (2 beta))^2                            Azar et al. 2023, eq. 17 (beta is
                                                             the paper's tau)

IPO's log-ratios are averaged per answer token (TRL divides each answer's summed log-ratio by
its token count for ``loss_type="ipo"``); the others are summed. The rewards are always those of
the summed log-probs, IPO's too (TRL logs ``beta * (pi - ref)`` of the sums for every loss type).

ORPO (``orpo_loss``; Hong et al. 2024, TRL ``ORPOTrainer``) on per-token *mean* log-probs ``a``:
``log_odds(a) = a - log(1 - exp(a))``, loss ``-beta log s(log_odds(a_c) - log_odds(a_r))`` (beta
is the paper's lambda) plus the chosen answers' NLL (added by the objective), rewards
``beta * a``. ``log(1 - exp(a))`` is ``log1mexp``: accurate for every a <= 0 and with finite
gradients (TRL 1.16 branches the same way but is -inf at a = 0; TRL 0.x wrote ``log1p(-exp(a))``).

SimPO (``simpo_loss``; Meng et al. 2024, TRL ``CPOTrainer`` ``loss_type="simpo"``) on mean
log-probs: ``x = beta (a_c - a_r) - gamma``, loss ``-(1 - e) log s(x) - e log s(-x)``, rewards
``beta * a``. ``gamma`` is TRL's ``simpo_gamma`` (the target margin; SimPO's own code writes it
as ``gamma_beta_ratio = gamma / beta``).

KTO (``kto_loss``; Ethayarajh et al. 2024, TRL ``KTOTrainer``) on unpaired completions, each
desirable or not, with summed log-probs: ``r = pi - ref``, ``z = max(KL, 0)`` (detached; the
estimate from mismatched pairs, ``engine/kto.py``), desirable ``w_d (1 - s(beta (r - z)))``,
undesirable ``w_u (1 - s(beta (z - r)))``; rewards ``beta * r``. ``apo_zero_unpaired``
(D'Oosterlinck et al. 2024, eq. 7 unpaired): no KL term, desirable ``w_d (1 - s(beta r))``,
undesirable ``w_u s(beta r)``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ember import EmberError

DPO_LOSS_TYPES = ("sigmoid", "robust", "hinge", "ipo")
KTO_LOSS_TYPES = ("kto", "apo_zero_unpaired")
_LN2 = math.log(2.0)


class PairLosses(NamedTuple):
    losses: torch.Tensor  # (P,) fp32, one per pair
    chosen: torch.Tensor  # (P,) rewards of the chosen answers (detached)
    rejected: torch.Tensor  # (P,) rewards of the rejected answers (detached)


def _smoothed(x: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """``-(1 - e) log s(x) - e log s(-x)``: the logistic loss with label smoothing e."""
    return -(1 - label_smoothing) * F.logsigmoid(x) - label_smoothing * F.logsigmoid(-x)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float = 0.1, label_smoothing: float = 0.0,
             loss_type: str = "sigmoid", chosen_tokens: torch.Tensor | None = None,
             rejected_tokens: torch.Tensor | None = None) -> PairLosses:
    """DPO's per-pair losses and rewards (module docstring) from summed answer log-probabilities;
    ``loss_type="ipo"`` also needs each answer's token count (``chosen_tokens``,
    ``rejected_tokens``), by which it divides the log-ratios."""
    if not beta > 0:
        raise EmberError(f"dpo beta must be > 0, got {beta}")
    if loss_type not in DPO_LOSS_TYPES:
        raise EmberError(f"dpo loss_type must be one of {', '.join(map(repr, DPO_LOSS_TYPES))}, "
                         f"got {loss_type!r}")
    if not 0 <= label_smoothing < 0.5:
        raise EmberError(f"dpo label_smoothing must be in [0, 0.5), got {label_smoothing}")
    if label_smoothing and loss_type not in ("sigmoid", "robust"):
        raise EmberError(f"dpo label_smoothing applies to loss_type 'sigmoid' and 'robust', "
                         f"not {loss_type!r}")
    chosen = policy_chosen - ref_chosen.detach()
    rejected = policy_rejected - ref_rejected.detach()
    h = chosen - rejected
    if loss_type == "ipo":
        if chosen_tokens is None or rejected_tokens is None:
            raise EmberError("dpo loss_type 'ipo' needs chosen_tokens and rejected_tokens (the "
                             "answers' token counts) to average the log-ratios per token")
        h = chosen / chosen_tokens.clamp(min=1) - rejected / rejected_tokens.clamp(min=1)
    if loss_type == "sigmoid":
        losses = _smoothed(beta * h, label_smoothing)
    elif loss_type == "robust":
        e = label_smoothing
        losses = (-(1 - e) * F.logsigmoid(beta * h) + e * F.logsigmoid(-beta * h)) / (1 - 2 * e)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * h)
    else:
        losses = (h - 1 / (2 * beta)) ** 2
    return PairLosses(losses, beta * chosen.detach(), beta * rejected.detach())


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for x <= 0 (Maechler 2012): ``log(-expm1(x))`` above -log 2,
    ``log1p(-exp(x))`` below, each branch fed only its own range so that neither gives NaN
    gradients. x is clamped to at most -eps of its dtype (a log-probability of 0 would give
    -inf and an infinite gradient)."""
    x = x.clamp(max=-torch.finfo(x.dtype).eps)
    near = torch.log(-torch.expm1(x.clamp(min=-_LN2)))
    far = torch.log1p(-torch.exp(x.clamp(max=-_LN2)))
    return torch.where(x > -_LN2, near, far)


def orpo_log_odds(chosen_mean: torch.Tensor, rejected_mean: torch.Tensor) -> torch.Tensor:
    """(P,) ``log_odds(a_c) - log_odds(a_r)`` of per-token mean log-probs (TRL's ``log_odds``)."""
    return (chosen_mean - log1mexp(chosen_mean)) - (rejected_mean - log1mexp(rejected_mean))


def orpo_loss(chosen_mean: torch.Tensor, rejected_mean: torch.Tensor, beta: float = 0.1
              ) -> PairLosses:
    """ORPO's odds-ratio term per pair, ``-beta log s(log odds ratio)`` (the NLL of the chosen
    answers is added by the objective: it is a token mean over the whole step)."""
    if not beta > 0:
        raise EmberError(f"orpo beta must be > 0, got {beta}")
    losses = -beta * F.logsigmoid(orpo_log_odds(chosen_mean, rejected_mean))
    return PairLosses(losses, beta * chosen_mean.detach(), beta * rejected_mean.detach())


def simpo_loss(chosen_mean: torch.Tensor, rejected_mean: torch.Tensor, beta: float = 2.0,
               gamma: float = 0.5, label_smoothing: float = 0.0) -> PairLosses:
    """SimPO's per-pair losses and rewards from per-token mean log-probs."""
    if not beta > 0:
        raise EmberError(f"simpo beta must be > 0, got {beta}")
    if not 0 <= label_smoothing < 0.5:
        raise EmberError(f"simpo label_smoothing must be in [0, 0.5), got {label_smoothing}")
    losses = _smoothed(beta * (chosen_mean - rejected_mean) - gamma, label_smoothing)
    return PairLosses(losses, beta * chosen_mean.detach(), beta * rejected_mean.detach())


class UnpairedLosses(NamedTuple):
    losses: torch.Tensor  # (N,) fp32, one per completion, weighted (desirable_weight, ...)
    rewards: torch.Tensor  # (N,) beta * (policy - reference), detached


def kto_loss(policy: torch.Tensor, reference: torch.Tensor, desirable: torch.Tensor,
             kl: float | torch.Tensor = 0.0, beta: float = 0.1, desirable_weight: float = 1.0,
             undesirable_weight: float = 1.0, loss_type: str = "kto") -> UnpairedLosses:
    """KTO's per-completion losses and rewards (module docstring) from summed log-probs of the
    policy and the reference, ``desirable`` (N,) bool, and ``kl`` the batch's raw KL estimate
    (clamped at 0 and detached here; unused by ``apo_zero_unpaired``)."""
    if not beta > 0:
        raise EmberError(f"kto beta must be > 0, got {beta}")
    if loss_type not in KTO_LOSS_TYPES:
        raise EmberError(f"kto loss_type must be one of {', '.join(map(repr, KTO_LOSS_TYPES))}, "
                         f"got {loss_type!r}")
    r = policy - reference.detach()
    z = torch.as_tensor(kl, dtype=r.dtype, device=r.device).detach().clamp(min=0)
    if loss_type == "apo_zero_unpaired":
        z = torch.zeros_like(z)
    good = 1 - torch.sigmoid(beta * (r - z))
    bad = torch.sigmoid(beta * r) if loss_type == "apo_zero_unpaired" else (
        1 - torch.sigmoid(beta * (z - r)))
    losses = torch.where(desirable, desirable_weight * good, undesirable_weight * bad)
    return UnpairedLosses(losses, beta * r.detach())
