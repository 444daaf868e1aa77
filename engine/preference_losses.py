"""Preference losses on per-pair sequence log-probabilities, with TRL's definitions.

Every function takes one value per pair for the chosen and the rejected answer and returns
``PairLosses``: the loss of each pair (the objective averages them over the pairs of a step) and
the rewards TRL logs (``rewards/chosen``, ``rewards/rejected``; detached). ``s`` is the sigmoid,
``e`` the label smoothing.

DPO (``dpo_loss``; TRL 1.16 ``DPOTrainer`` ``loss_type``), on the log-ratios to the reference
``c = pi_c - ref_c``, ``r = pi_r - ref_r`` of the summed answer log-probs, the margin
``h = f(c) - f(r)`` (``f`` the identity unless ``f_divergence`` says otherwise, below), ``z =
beta h``; rewards ``beta * (pi - ref)``:

    sigmoid       -(1 - e) log s(z) - e log s(-z)          Rafailov et al. 2023; e > 0: the
                                                           conservative DPO of Mitchell 2023
                                                           (TRL 0.x; TRL 1.x ignores e here,
                                                           so e = 0 is TRL 1.x's loss)
    robust        (-(1 - e) log s(z) + e log s(-z)) / (1 - 2e)   Chowdhury et al. 2024: an
                                                           unbiased loss when a fraction e of
                                                           the labels is flipped (e in (0, .5))
    hinge         relu(1 - z)                              SLiC (Zhao et al. 2023)
    ipo           (h' - 1 / (2 beta))^2                    Azar et al. 2023, eq. 17 (beta is
                                                           the paper's tau)
    sigmoid_norm  -log s(beta h')                          DPO on per-token means
    exo_pair      s(z) (log s(z) - log(1 - e))             EXO (Ji et al. 2024, eq. 16; e > 0,
                  + s(-z) (log s(-z) - log e)              the paper's 1e-3)
    nca_pair      -log s(beta c) - log s(-beta c) / 2 - log s(-beta r) / 2     NCA (Chen 2024)
    bco_pair      -log s(beta c) - log s(-beta r)          BCO on pairs (TRL 1.16 keeps no
                                                           running reward mean: TRL 0.x's
                                                           shift by it is gone)
    sppo_hard     (c - 1 / (2 beta))^2 + (r + 1 / (2 beta))^2     SPPO, hard probabilities
    aot           the sigmoid loss (with e) of sort(pi_c - pi_r) - sort(ref_c - ref_r)
    aot_unpaired  the sigmoid loss (with e) of sort(c) - sort(r)   AOT (Melnyk et al. 2024): the
                                                           sorts are over the pairs of one
                                                           batch (TRL's device batch, Ember's
                                                           micro-batch), so a pair's term
                                                           depends on its batch
    apo_zero      1 - s(beta c) + s(beta r)                APO (D'Oosterlinck et al. 2024) eq. 7
    apo_down      s(beta c) + 1 - s(beta (c - r))          APO eq. 8
    discopop      (1 - m) (-log s(z)) + m exp(-z),         DiscoPOP (Chan Lu et al. 2024,
                  m = s(z / tau)                           eq. 5; tau ``discopop_tau``)

``h'`` (ipo, sigmoid_norm) is ``f(c) / n_c - f(r) / n_r``, the scores divided by the answers'
token counts, as TRL divides them. ``f_divergence`` (f-DPO, Wang et al. 2023) is TRL's
``f_divergence_type``: ``reverse_kl`` f(x) = x; ``forward_kl`` 1 - exp(-x); ``js_divergence``
log 2 + log s(x); ``alpha_divergence`` (exp((a - 1) x) - 1) / (a - 1) (``f_alpha``, exp's
argument clamped at 80, at 11 in fp16; a = 1 is reverse_kl). Only the loss types built on ``h``
take one (sigmoid, sigmoid_norm, hinge, ipo, exo_pair, robust, discopop; TRL refuses the rest).
Several loss types with weights (MPO: TRL's ``loss_weights``) add up per pair. The rewards are
always those of the summed log-probs, IPO's too (TRL logs ``beta * (pi - ref)`` for every loss).
LD-DPO (``ld_token_weights``, TRL's ``ld_alpha``) sums each answer's tokens past the length the
pair's answers share times alpha, in the policy's and the reference's log-probs (rewards and
logps metrics too; the NLL term and the token counts stay plain). WPO (``wpo_pair_weights``,
TRL's ``use_weighting``) multiplies each pair's loss by its weight, no gradient through it.

ORPO (``orpo_loss``; Hong et al. 2024, TRL ``ORPOTrainer``) on per-token *mean* log-probs ``a``:
``log_odds(a) = a - log(1 - exp(a))``, loss ``-beta log s(log_odds(a_c) - log_odds(a_r))`` (beta
is the paper's lambda) plus the chosen answers' NLL (added by the objective), rewards
``beta * a``. ``log(1 - exp(a))`` is ``log1mexp``: accurate for every a <= 0 and with finite
gradients (TRL 1.16 branches the same way but is -inf at a = 0; TRL 0.x wrote ``log1p(-exp(a))``).

SimPO (``simpo_loss``; Meng et al. 2024, TRL ``CPOTrainer`` ``loss_type="simpo"``) on mean
log-probs: ``x = beta (a_c - a_r) - gamma``, loss ``-(1 - e) log s(x) - e log s(-x)``, rewards
``beta * a``. ``gamma`` is TRL's ``simpo_gamma`` (the target margin; SimPO's own code writes it
as ``gamma_beta_ratio = gamma / beta``). AlphaPO (Gupta et al. 2025; TRL ``CPOConfig.alpha``):
with ``alpha`` != 0 each ``a`` is first replaced by ``(1 - p^-alpha) / alpha`` with ``p = exp(a)``,
in the margin and the rewards (alpha -> 0 gives ``a`` back).

CPO (``cpo_loss``; Xu et al. 2024, TRL ``CPOTrainer``) is reference-free: on the answers'
log-probs ``x`` (summed for sigmoid and hinge, per-token means for ipo and simpo, as TRL takes
them), ``m = x_c - x_r``: ``sigmoid`` ``-(1 - e) log s(beta m) - e log s(-beta m)`` (CPO's eq. 3),
``hinge`` ``relu(1 - beta m)``, ``ipo`` ``(m - 1 / (2 beta))^2``, ``simpo`` SimPO's loss above;
rewards ``beta * x``; ``alpha`` != 0 replaces each ``x`` by AlphaPO's ``(1 - exp(x)^-alpha) /
alpha`` first (every loss type, as TRL). The objective adds ``cpo_alpha`` times the chosen
answers' NLL (CPO's behaviour-cloning term).

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

DPO_LOSS_TYPES = ("sigmoid", "robust", "hinge", "ipo", "sigmoid_norm", "exo_pair", "nca_pair",
                  "bco_pair", "sppo_hard", "aot", "aot_unpaired", "apo_zero", "apo_down",
                  "discopop")
# the loss types that take label_smoothing, the ones divided per token, those with an f-divergence
SMOOTHED = ("sigmoid", "robust", "exo_pair", "aot", "aot_unpaired")
PER_TOKEN = ("ipo", "sigmoid_norm")
F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
F_DIVERGENCE_LOSS_TYPES = ("sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust",
                           "discopop")
CPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "simpo")
CPO_MEAN_LOSS_TYPES = ("ipo", "simpo")  # on per-token mean log-probs (TRL's average_log_prob)
KTO_LOSS_TYPES = ("kto", "apo_zero_unpaired")
_LN2 = math.log(2.0)


class PairLosses(NamedTuple):
    losses: torch.Tensor  # (P,) fp32, one per pair
    chosen: torch.Tensor  # (P,) rewards of the chosen answers (detached)
    rejected: torch.Tensor  # (P,) rewards of the rejected answers (detached)


def _smoothed(x: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """``-(1 - e) log s(x) - e log s(-x)``: the logistic loss with label smoothing e."""
    return -(1 - label_smoothing) * F.logsigmoid(x) - label_smoothing * F.logsigmoid(-x)


def _names(names) -> str:
    return ", ".join(map(repr, names))


def f_scores(logratio: torch.Tensor, f_divergence: str = "reverse_kl", f_alpha: float = 0.5
             ) -> torch.Tensor:
    """f'(exp(x)) of the log-ratios x: what the margin of DPO under an f-divergence subtracts
    (module docstring; TRL 1.16 ``_compute_loss``'s chosen/rejected scores)."""
    if f_divergence == "reverse_kl" or (f_divergence == "alpha_divergence"
                                        and abs(f_alpha - 1.0) < 1e-6):
        return logratio
    if f_divergence == "forward_kl":
        return 1 - torch.exp(-logratio)
    if f_divergence == "js_divergence":
        return _LN2 + F.logsigmoid(logratio)
    if f_divergence != "alpha_divergence":
        raise EmberError(f"dpo f_divergence must be one of {_names(F_DIVERGENCES)}, got "
                         f"{f_divergence!r}")
    t = (f_alpha - 1.0) * logratio
    top = 11.0 if t.dtype == torch.float16 else 80.0  # exp stays finite in the input's dtype
    return (torch.exp(t.float().clamp(max=top)) - 1.0).to(t.dtype) / (f_alpha - 1.0)


_ARG_NAMES = {"f_divergence_type": "f_divergence", "f_alpha_divergence_coef": "f_alpha"}


def check_dpo(types: tuple[str, ...], beta: float, label_smoothing: float = 0.0,
              f_divergence: str = "reverse_kl", f_alpha: float = 0.5,
              discopop_tau: float = 0.05, loss_weights: tuple[float, ...] | None = None, *,
              toml: bool = False) -> None:
    """DPO's settings, one rule for ``[dpo]`` (``toml``: the messages name its keys, ``dpo.beta``;
    ``types`` may hold "sft", the NLL term) and ``dpo_loss``'s arguments (``dpo beta``,
    ``dpo f_divergence``)."""
    def k(name: str) -> str:
        return f"dpo.{name}" if toml else f"dpo {_ARG_NAMES.get(name, name)}"

    if not types:
        raise EmberError(f"{k('loss_type')} must name at least one loss type")
    allowed = (*DPO_LOSS_TYPES, "sft") if toml else DPO_LOSS_TYPES
    for t in types:
        if t not in allowed:
            raise EmberError(f"{k('loss_type')} must be one of {_names(allowed)} (or a list of "
                             f"them), got {t!r}")
    if not beta > 0:
        raise EmberError(f"{k('beta')} must be > 0, got {beta}")
    if not 0 <= label_smoothing < 0.5:
        raise EmberError(f"{k('label_smoothing')} must be in [0, 0.5), got {label_smoothing}")
    w = loss_weights
    if w is not None and len(w) != len(types):
        raise EmberError(f"{k('loss_weights')} must have one weight per {k('loss_type')} entry: "
                         f"{len(w)} weights for {len(types)} loss types")
    if w is not None and not all(x >= 0 and math.isfinite(x) for x in w):
        raise EmberError(f"{k('loss_weights')} must be finite and >= 0, got {list(w)}")
    e = k("label_smoothing")
    if "robust" in types and label_smoothing == 0:
        raise EmberError(f"{k('loss_type')} = \"robust\" needs {e} in (0, 0.5): the fraction of "
                         "preference labels assumed flipped (with 0 it is plain sigmoid DPO)")
    if "exo_pair" in types and label_smoothing == 0:
        raise EmberError(f"{k('loss_type')} = \"exo_pair\" needs {e} in (0, 0.5): EXO's "
                         "epsilon (the paper recommends 1e-3)")
    pair = [t for t in types if t != "sft"]
    if label_smoothing and not set(pair) & set(SMOOTHED):
        raise EmberError(f"{e} applies to loss_type {_names(SMOOTHED)}, not "
                         f"{_names(pair or types)}: drop it")
    if label_smoothing and "sigmoid" in pair and len(set(pair) & set(SMOOTHED)) > 1:
        raise EmberError(f"{e} with loss_type \"sigmoid\" and another loss type that takes it: "
                         "Ember's \"sigmoid\" with label_smoothing is conservative DPO (TRL "
                         "0.x), where TRL 1.x's ignores it; run them apart or drop \"sigmoid\"")
    f = k("f_divergence_type")
    if f_divergence not in F_DIVERGENCES:
        raise EmberError(f"{f} must be one of {_names(F_DIVERGENCES)}, got {f_divergence!r}")
    if f_divergence != "reverse_kl" and not set(pair) <= set(F_DIVERGENCE_LOSS_TYPES):
        bad = sorted(set(pair) - set(F_DIVERGENCE_LOSS_TYPES))
        sft = " (and 'sft')" if toml else ""
        raise EmberError(f"{f} = {f_divergence!r} applies to loss_type "
                         f"{_names(F_DIVERGENCE_LOSS_TYPES)}{sft}, not {_names(bad)}: "
                         "their losses are not on the chosen-rejected reward margin, where "
                         f"f-DPO's log Z(x) cancels (TRL refuses them too); use {f} = "
                         "\"reverse_kl\"")
    if not math.isfinite(f_alpha):
        raise EmberError(f"{k('f_alpha_divergence_coef')} must be finite, got {f_alpha}")
    if not discopop_tau > 0:
        raise EmberError(f"{k('discopop_tau')} must be > 0, got {discopop_tau}")


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float = 0.1, label_smoothing: float = 0.0,
             loss_type: str | tuple[str, ...] = "sigmoid",
             chosen_tokens: torch.Tensor | None = None,
             rejected_tokens: torch.Tensor | None = None, *,
             loss_weights: tuple[float, ...] | None = None, f_divergence: str = "reverse_kl",
             f_alpha: float = 0.5, discopop_tau: float = 0.05,
             pair_weights: torch.Tensor | None = None) -> PairLosses:
    """DPO's per-pair losses and rewards (module docstring) from summed answer log-probabilities;
    ``loss_type`` "ipo" and "sigmoid_norm" also need each answer's token count
    (``chosen_tokens``, ``rejected_tokens``). Several loss types add up, each times its
    ``loss_weights`` entry (default 1), and then times ``pair_weights`` (P,) (WPO's weights)."""
    types = (loss_type,) if isinstance(loss_type, str) else tuple(loss_type)
    check_dpo(types, beta, label_smoothing, f_divergence, f_alpha, discopop_tau, loss_weights)
    weights = (1.0,) * len(types) if loss_weights is None else tuple(loss_weights)
    e = label_smoothing
    c = policy_chosen - ref_chosen.detach()  # log-ratios (P,)
    r = policy_rejected - ref_rejected.detach()
    fc, fr = f_scores(c, f_divergence, f_alpha), f_scores(r, f_divergence, f_alpha)
    z = beta * (fc - fr)
    if set(types) & set(PER_TOKEN):
        if chosen_tokens is None or rejected_tokens is None:
            raise EmberError(f"dpo loss_type {_names(PER_TOKEN)} need chosen_tokens and "
                             "rejected_tokens (the answers' token counts) to average the "
                             "log-ratios per token")
        h_tok = fc / chosen_tokens.clamp(min=1) - fr / rejected_tokens.clamp(min=1)
    total = torch.zeros_like(z)
    for t, w in zip(types, weights, strict=True):
        if t == "sigmoid":
            losses = _smoothed(z, e)
        elif t == "robust":
            losses = (-(1 - e) * F.logsigmoid(z) + e * F.logsigmoid(-z)) / (1 - 2 * e)
        elif t == "hinge":
            losses = torch.relu(1 - z)
        elif t == "ipo":
            losses = (h_tok - 1 / (2 * beta)) ** 2
        elif t == "sigmoid_norm":
            losses = -F.logsigmoid(beta * h_tok)
        elif t == "exo_pair":
            losses = (torch.sigmoid(z) * (F.logsigmoid(z) - math.log1p(-e))
                      + torch.sigmoid(-z) * (F.logsigmoid(-z) - math.log(e)))
        elif t == "nca_pair":
            losses = (-F.logsigmoid(beta * c) - 0.5 * F.logsigmoid(-beta * c)
                      - 0.5 * F.logsigmoid(-beta * r))
        elif t == "bco_pair":
            losses = -F.logsigmoid(beta * c) - F.logsigmoid(-beta * r)
        elif t == "sppo_hard":
            losses = (c - 0.5 / beta) ** 2 + (r + 0.5 / beta) ** 2
        elif t == "aot":  # sorted over the batch's pairs: position k pairs the k-th smallest
            delta = (torch.sort(policy_chosen - policy_rejected).values
                     - torch.sort((ref_chosen - ref_rejected).detach()).values)
            losses = _smoothed(beta * delta, e)
        elif t == "aot_unpaired":
            losses = _smoothed(beta * (torch.sort(c).values - torch.sort(r).values), e)
        elif t == "apo_zero":
            losses = 1 - torch.sigmoid(beta * c) + torch.sigmoid(beta * r)
        elif t == "apo_down":
            losses = torch.sigmoid(beta * c) + 1 - torch.sigmoid(beta * (c - r))
        else:  # discopop
            m = torch.sigmoid(z / discopop_tau)
            losses = -F.logsigmoid(z) * (1 - m) + torch.exp(-z) * m
        total = total + w * losses
    if pair_weights is not None:
        total = total * pair_weights.detach()
    return PairLosses(total, beta * c.detach(), beta * r.detach())


def ld_token_weights(doc: torch.Tensor, counts: torch.Tensor, alpha: float,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """LD-DPO's (Liu et al. 2024; TRL's ``ld_alpha``) weight of each answer token of a batch of
    pairs: 1 for the first ``min(n_c, n_r)`` answer tokens of each document (the length the
    pair's two answers share), ``alpha`` for the rest (the longer answer's excess). ``doc`` (N,)
    is each token's document, in batch order (chosen, rejected, chosen, ...: each document's
    tokens contiguous); ``counts`` (num_docs,) the answer tokens of each."""
    if not 0 <= alpha <= 1:
        raise EmberError(f"dpo ld_alpha must be in [0, 1], got {alpha}")
    n = counts.long()
    if n.numel() % 2:
        raise EmberError(f"ld_token_weights: {n.numel()} documents are not pairs")
    rank = torch.arange(doc.numel(), device=doc.device) - (n.cumsum(0) - n)[doc]
    shared = torch.minimum(n[0::2], n[1::2]).repeat_interleave(2)
    one = torch.ones(doc.numel(), dtype=dtype, device=doc.device)
    return torch.where(rank < shared[doc], one, one * alpha)


def wpo_pair_weights(tokens: torch.Tensor, log_sum_sq: torch.Tensor, doc: torch.Tensor,
                     num_docs: int) -> torch.Tensor:
    """WPO's (Zhou et al. 2024, eq. 2; TRL's ``use_weighting``) weight of each pair (P,), no
    gradient: ``w = exp(mean over the answer's tokens of (log p - log sum_v p_v^2))`` per
    document, the pair's the product of its two answers'. ``tokens``, ``log_sum_sq``, ``doc``
    (N,): the policy's per-token log-probs, ``log sum_v p_v^2`` and document, as
    ``TokenLogprobs``."""
    aligned = tokens.detach() - log_sum_sq
    sums = aligned.new_zeros(num_docs).index_add(0, doc, aligned)
    counts = torch.bincount(doc, minlength=num_docs).clamp(min=1).to(sums.dtype)
    w = torch.exp(sums / counts)
    return w[0::2] * w[1::2]


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


def _alphapo(x: torch.Tensor, alpha: float) -> torch.Tensor:
    """AlphaPO's reward shape of a log-prob x: (1 - exp(x)^-alpha) / alpha, by expm1: exact as
    alpha x -> 0 (TRL's CPOTrainer)."""
    return -torch.expm1(-alpha * x) / alpha


def simpo_loss(chosen_mean: torch.Tensor, rejected_mean: torch.Tensor, beta: float = 2.0,
               gamma: float = 0.5, label_smoothing: float = 0.0, alpha: float = 0.0
               ) -> PairLosses:
    """SimPO's (with ``alpha`` != 0 AlphaPO's) per-pair losses and rewards from per-token mean
    log-probs."""
    if not beta > 0:
        raise EmberError(f"simpo beta must be > 0, got {beta}")
    if not 0 <= label_smoothing < 0.5:
        raise EmberError(f"simpo label_smoothing must be in [0, 0.5), got {label_smoothing}")
    if alpha:
        chosen_mean, rejected_mean = _alphapo(chosen_mean, alpha), _alphapo(rejected_mean, alpha)
    losses = _smoothed(beta * (chosen_mean - rejected_mean) - gamma, label_smoothing)
    return PairLosses(losses, beta * chosen_mean.detach(), beta * rejected_mean.detach())


def cpo_loss(chosen: torch.Tensor, rejected: torch.Tensor, beta: float = 0.1,
             loss_type: str = "sigmoid", label_smoothing: float = 0.0, gamma: float = 0.5,
             alpha: float = 0.0) -> PairLosses:
    """TRL's ``CPOTrainer.cpo_loss``: the per-pair losses and rewards of ``loss_type`` from the
    answers' log-probs, summed for "sigmoid" and "hinge", per-token means for "ipo" and "simpo"
    (``CPO_MEAN_LOSS_TYPES``, as TRL's ``concatenated_forward`` averages them); ``gamma`` is
    "simpo"'s target margin, ``alpha`` != 0 AlphaPO's reward shape for every loss type."""
    if loss_type == "simpo":
        return simpo_loss(chosen, rejected, beta, gamma, label_smoothing, alpha)
    if loss_type not in CPO_LOSS_TYPES:
        raise EmberError(f"cpo loss_type must be one of {_names(CPO_LOSS_TYPES)}, got "
                         f"{loss_type!r}")
    if not beta > 0:
        raise EmberError(f"cpo beta must be > 0, got {beta}")
    if not 0 <= label_smoothing < 0.5 or (label_smoothing and loss_type != "sigmoid"):
        raise EmberError(f"cpo label_smoothing must be in [0, 0.5) and applies to loss_type "
                         f"\"sigmoid\" or \"simpo\", got {label_smoothing} with {loss_type!r}")
    if alpha:
        chosen, rejected = _alphapo(chosen, alpha), _alphapo(rejected, alpha)
    margin = chosen - rejected
    if loss_type == "sigmoid":
        losses = _smoothed(beta * margin, label_smoothing)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * margin)
    else:  # ipo: beta is the paper's tau
        losses = (margin - 1 / (2 * beta)) ** 2
    return PairLosses(losses, beta * chosen.detach(), beta * rejected.detach())


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
