"""The preference objectives' config sections (``[dpo]``, ``[orpo]``, ``[simpo]``; ``[cpo]`` is in
``engine/preference_cpo.py``): ``DPOConfig``, ``ORPOConfig``, ``SimPOConfig`` and their checks.
The objectives themselves are in ``engine/preference_objectives.py``, which re-exports these."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ember import EmberError
from ember.engine.preference_losses import check_dpo


def check_sync_settings(section: str, c) -> None:
    """``[dpo]`` / ``[kto]``'s TR-DPO keys (``engine/reference_sync.py``)."""
    if not 0 <= c.ref_model_mixup_alpha <= 1:
        raise EmberError(f"{section}.ref_model_mixup_alpha must be in [0, 1] (1: the reference "
                         f"becomes a copy of the policy), got {c.ref_model_mixup_alpha}")
    if isinstance(c.ref_model_sync_steps, bool) or not (
            isinstance(c.ref_model_sync_steps, int) and c.ref_model_sync_steps >= 1):
        raise EmberError(f"{section}.ref_model_sync_steps must be an integer >= 1 (optimizer "
                         f"steps), got {c.ref_model_sync_steps!r}")
    if c.sync_ref_model and c.precompute_ref_log_probs:
        raise EmberError(f"{section}.sync_ref_model with {section}.precompute_ref_log_probs: the "
                         "precomputed log-probs assume a fixed reference, and TR-DPO updates it "
                         "during training, so they would go stale (TRL refuses it too); set "
                         f"{section}.precompute_ref_log_probs = false or {section}.sync_ref_model "
                         "= false")


def check_sync(section: str, method: str) -> None:
    """EmberError unless ``<section>.sync_ref_model`` can mix the reference exactly
    (``engine/reference_sync.py``): ``TrainConfig`` checks it, before a run folder is made."""
    if method != "full":
        raise EmberError(
            f'{section}.sync_ref_model needs method = "full" (a separate frozen '
            f"copy of the model to mix into); with method = {method!r} the reference "
            "is the same model with its adapters switched off (or a snapshot of the "
            "starting adapter), and mixing the adapters' A and B apart is not mixing "
            "their product B @ A (TRL refuses PEFT models too): train with method = "
            f'"full", or set {section}.sync_ref_model = false'
        )


def _check(section: str, beta: float, label_smoothing: float, sft_weight: float) -> None:
    if not beta > 0:
        raise EmberError(f"{section}.beta must be > 0, got {beta}")
    if not 0 <= label_smoothing < 0.5:
        raise EmberError(f"{section}.label_smoothing must be in [0, 0.5), got {label_smoothing}")
    if not sft_weight >= 0:
        raise EmberError(f"{section}.sft_weight must be >= 0, got {sft_weight}")


@dataclass(frozen=True, kw_only=True)
class DPOConfig:
    beta: float = 0.1  # strength of the pull towards the reference (higher: stay closer)
    # TRL 1.16's: "sigmoid" (DPO) | "robust" (needs label_smoothing) | "hinge" (SLiC) | "ipo"
    # | "sigmoid_norm" | "exo_pair" (needs label_smoothing) | "nca_pair" | "bco_pair" |
    # "sppo_hard" | "aot" | "aot_unpaired" | "apo_zero" | "apo_down" | "discopop"; or a list of
    # them, "sft" too (MPO: ["sigmoid", "bco_pair", "sft"]), added up with loss_weights;
    # formulas in engine/preference_losses.py
    loss_type: str | tuple[str, ...] = "sigmoid"
    # one weight per loss_type entry (TRL's loss_weights; default 1 each); "sft"'s is the NLL's
    loss_weights: tuple[float, ...] | None = None
    # sigmoid: > 0 is conservative DPO (TRL 0.x; TRL 1.x ignores it there, so leave it at 0
    # for TRL 1.x's loss); robust: the assumed fraction of flipped labels; exo_pair: epsilon;
    # aot, aot_unpaired: label smoothing
    label_smoothing: float = 0.0
    # RPO: + weight * NLL per chosen answer token (TRL 1.x: loss_type ["sigmoid", "sft"] with
    # loss_weights [1, weight]; TRL 0.x's rpo_alpha)
    sft_weight: float = 0.0
    # f-DPO's divergence: "reverse_kl" (DPO) | "forward_kl" | "js_divergence" |
    # "alpha_divergence" (TRL's f_divergence_type; for the loss types on the reward margin)
    f_divergence_type: str = "reverse_kl"
    f_alpha_divergence_coef: float = 0.5  # alpha of f_divergence_type = "alpha_divergence"
    discopop_tau: float = 0.05  # loss_type "discopop"'s temperature (the paper's 0.05)
    # LD-DPO: each answer's tokens past the length the pair's two answers share count times
    # ld_alpha in [0, 1] in the policy's and the reference's log-probs (TRL's ld_alpha; unset:
    # every token counts fully, as 1)
    ld_alpha: float | None = None
    # WPO: weigh each pair's loss by exp(mean(log p - log sum p^2)) of its two answers under the
    # policy (TRL's use_weighting)
    use_weighting: bool = False
    # Score every pair with the reference once, before training (eval mode), instead of one
    # reference forward per micro-batch: fewer forwards from the second epoch on, and a full
    # fine-tune's frozen copy is freed for the run (TRL's precompute_ref_log_probs)
    precompute_ref_log_probs: bool = False
    # Turn off, for the run, the dropout its training forwards draw (lora.dropout, Phi's
    # residual/embedding dropout; model.attention_dropout stays, as TRL leaves it):
    # TRL's disable_dropout, default on
    disable_dropout: bool = True
    # TR-DPO: every ref_model_sync_steps optimizer steps the reference becomes
    # ref_model_mixup_alpha * policy + (1 - alpha) * reference (TRL's sync_ref_model; method =
    # "full" only, not with precompute_ref_log_probs; the reference is then kept in the
    # policy's weights dtype, fp32 under precision bf16: twice the memory; reference_sync.py)
    sync_ref_model: bool = False
    ref_model_mixup_alpha: float = 0.6  # TR-DPO's alpha: the policy's share of each update
    ref_model_sync_steps: int = 512  # TR-DPO's tau: optimizer steps between reference updates

    def __post_init__(self) -> None:
        check_sync_settings("dpo", self)
        types = _as_names(self.loss_type)
        check_dpo(types, self.beta, self.label_smoothing, self.f_divergence_type,
                  self.f_alpha_divergence_coef, self.discopop_tau, self.loss_weights, toml=True)
        # one name stays a string (as written, and as TRL 1.x's config takes it too)
        object.__setattr__(self, "loss_type", types[0] if len(types) == 1 else types)
        if self.loss_weights is not None:
            object.__setattr__(self, "loss_weights", tuple(self.loss_weights))
        if not self.sft_weight >= 0:
            raise EmberError(f"dpo.sft_weight must be >= 0, got {self.sft_weight}")
        if "sft" in types and self.sft_weight:
            raise EmberError("dpo.sft_weight and loss_type \"sft\" are the same NLL term: give "
                             "its weight once (loss_type \"sft\" with its loss_weights entry, or "
                             "sft_weight)")
        pair = [t for t in types if t != "sft"]
        if self.ld_alpha is not None and not 0 <= self.ld_alpha <= 1:
            raise EmberError(f"dpo.ld_alpha must be in [0, 1] (1: every token counts fully, 0: "
                             f"none past the shared length), got {self.ld_alpha}")
        if self.use_weighting and set(pair) & {"aot", "aot_unpaired"}:
            raise EmberError("dpo.use_weighting with loss_type \"aot\" / \"aot_unpaired\": "
                             "their losses sort the batch's pairs, so no loss belongs to one "
                             "pair to weigh (TRL refuses it too)")
        if self.use_weighting and self.nll_weight:
            raise EmberError("dpo.use_weighting with an NLL term (loss_type \"sft\" or "
                             "sft_weight): TRL 1.16 fails on it (it scales its expanded sft loss "
                             "in place), so there is no reference to follow; drop one")

    @property
    def loss_types(self) -> tuple[str, ...]:
        """The pair losses of ``loss_type`` ("sft", the NLL term, left out)."""
        return tuple(t for t in _as_names(self.loss_type) if t != "sft")

    @property
    def pair_weights(self) -> tuple[float, ...]:
        """``loss_weights`` of ``loss_types``."""
        types = _as_names(self.loss_type)
        w = self.loss_weights or (1.0,) * len(types)
        return tuple(x for t, x in zip(types, w, strict=True) if t != "sft")

    @property
    def nll_weight(self) -> float:
        """The NLL term's weight: ``sft_weight``, or loss_type "sft"'s ``loss_weights`` entry."""
        types = _as_names(self.loss_type)
        w = self.loss_weights or (1.0,) * len(types)
        return self.sft_weight + sum(x for t, x in zip(types, w, strict=True) if t == "sft")


def _as_names(v: str | tuple[str, ...]) -> tuple[str, ...]:
    return (v,) if isinstance(v, str) else tuple(v)


@dataclass(frozen=True, kw_only=True)
class ORPOConfig:
    beta: float = 0.1  # weight of the odds-ratio term next to the NLL (the paper's lambda)
    # Turn off, for the run, the dropout its training forwards draw (lora.dropout, Phi's
    # residual/embedding dropout; model.attention_dropout stays, as TRL leaves it):
    # TRL's disable_dropout, default on
    disable_dropout: bool = True

    def __post_init__(self) -> None:
        _check("orpo", self.beta, 0.0, 0.0)


@dataclass(frozen=True, kw_only=True)
class SimPOConfig:
    beta: float = 2.0  # scale of the per-token mean log-prob margin
    gamma: float = 0.5  # target margin (TRL's simpo_gamma; SimPO's gamma_beta_ratio = gamma/beta)
    label_smoothing: float = 0.0
    sft_weight: float = 0.0  # CPO's NLL term (TRL's cpo_alpha; TRL's default 1.0, SimPO's 0)
    # AlphaPO: != 0 scores each answer (1 - p^-alpha) / alpha, p its per-token mean probability,
    # in place of log p (TRL's CPOConfig alpha; 0: SimPO)
    alpha: float = 0.0
    # Turn off, for the run, the dropout its training forwards draw (lora.dropout, Phi's
    # residual/embedding dropout; model.attention_dropout stays, as TRL leaves it):
    # TRL's disable_dropout, default on
    disable_dropout: bool = True

    def __post_init__(self) -> None:
        _check("simpo", self.beta, self.label_smoothing, self.sft_weight)
        if not self.gamma >= 0:
            raise EmberError(f"simpo.gamma must be >= 0, got {self.gamma}")
        if not math.isfinite(self.alpha):
            raise EmberError(f"simpo.alpha must be finite, got {self.alpha}")
