"""Preference objectives (``objective`` = ``"dpo"``, ``"orpo"``, ``"simpo"``, ``"cpo"``): data
lines {"prompt", "chosen", "rejected"} (``engine/preference.py``), each pair's chosen and rejected
documents side by side in one packed batch; the losses are in ``engine/preference_losses.py``.

``"dpo"``    against a reference: the starting model, i.e. the same model with its LoRA adapters
             switched off; with full fine-tuning a frozen copy of the starting weights; after
             ``model.init`` the earlier stage's result (a continued adapter: its loaded weights
             swapped in; ``engine/stages.py``). ``[dpo] loss_type``: TRL 1.16's (sigmoid,
             ipo, bco_pair, ...; lists of them with weights: MPO).
``"orpo"``   reference-free: NLL of the chosen answers + the odds-ratio term (``[orpo]``).
``"simpo"``  reference-free: the length-normalized margin with a target gap (``[simpo]``).
``"cpo"``    reference-free: TRL's CPOTrainer (``[cpo]``, ``engine/preference_cpo.py``): the
             chosen answers' NLL weighted cpo_alpha plus loss_type's pair loss (sigmoid, hinge on
             summed log-probs; ipo, simpo on per-token means).

ORPO, SimPO and CPO run one forward per micro-batch and build no reference (no frozen copy, no
adapters-off forward). Each pair weighs 1: pair losses are averaged over the pairs of the whole
accumulated step. An NLL term (ORPO's, DPO's / SimPO's ``sft_weight``: TRL 1.x's ``sft`` loss /
``cpo_alpha``) is the mean NLL per chosen answer token of the whole step, as TRL's token-mean
cross-entropy over the chosen answers of its batch (``begin_step`` counts those tokens, summed
over the processes); ORPO's covers each chosen document whole, its prompt's tokens too (every
next-token prediction in it), as TRL's ``ORPOTrainer`` computes it ("computed over the full
prompt and response"), where CPO / SimPO and DPO take the answers only. Metrics per step:
``reward_accuracy``, ``reward_margin``, ``chosen_reward``,
``rejected_reward`` (TRL's rewards/*), ``chosen_logps``, ``rejected_logps`` (TRL's logps/*: the
policy's answer log-probs averaged over the pairs; summed per answer for DPO, per answer token for
ORPO and SimPO, as its loss takes them for CPO), ``nll_loss`` (the NLL term's value per token),
for ORPO also ``log_odds_ratio`` and ``log_odds_chosen``; ``val_*`` of each at evaluations.
"""

from __future__ import annotations

import contextlib
import gc
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from ember import EmberError
from ember.engine.data import load_datasets, load_examples
from ember.engine.distributed import DistInfo, build_device, release, shard_frozen
from ember.engine.evaluation import eval_plan, scored_batches
from ember.engine.losses import (
    DocLogprobs,
    TokenLogprobs,
    adapters_disabled,
    answer_counts,
    answer_token_logprobs,
    doc_logprobs,
    doc_logprobs_prompt_nll,
    prompt_positions,
)
from ember.engine.objectives import SFT, record_fingerprint
from ember.engine.preference_losses import (
    CPO_MEAN_LOSS_TYPES,
    DPO_LOSS_TYPES,
    F_DIVERGENCE_LOSS_TYPES,
    F_DIVERGENCES,
    SMOOTHED,
    PairLosses,
    cpo_loss,
    dpo_loss,
    ld_token_weights,
    orpo_log_odds,
    orpo_loss,
    simpo_loss,
    wpo_pair_weights,
)
from ember.engine.reference_cache import (
    cache_key,
    cache_path,
    forward_settings,
    load_cached,
    save_cached,
)
from ember.engine.stage_reference import adapter_snapshot, adapters_swapped
from ember.engine.stages import continues_lora, frozen_start
from ember.models.lora_init import changes_base

if TYPE_CHECKING:
    from ember.engine.config import TrainConfig
    from ember.engine.data import DataConfig, Datasets, Example


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

    def __post_init__(self) -> None:
        types = _as_names(self.loss_type)
        if not types:
            raise EmberError("dpo.loss_type must name at least one loss type")
        # one name stays a string (as written, and as TRL 1.x's config takes it too)
        object.__setattr__(self, "loss_type", types[0] if len(types) == 1 else types)
        if self.loss_weights is not None:
            object.__setattr__(self, "loss_weights", tuple(self.loss_weights))
        for t in types:
            if t not in (*DPO_LOSS_TYPES, "sft"):
                raise EmberError(f"dpo.loss_type must be one of "
                                 f"{', '.join(map(repr, (*DPO_LOSS_TYPES, 'sft')))} (or a list "
                                 f"of them), got {t!r}")
        _check("dpo", self.beta, self.label_smoothing, self.sft_weight)
        w = self.loss_weights
        if w is not None and len(w) != len(types):
            raise EmberError(f"dpo.loss_weights must have one weight per dpo.loss_type entry: "
                             f"{len(w)} weights for {len(types)} loss types")
        if w is not None and not all(x >= 0 and math.isfinite(x) for x in w):
            raise EmberError(f"dpo.loss_weights must be finite and >= 0, got {list(w)}")
        if "sft" in types and self.sft_weight:
            raise EmberError("dpo.sft_weight and loss_type \"sft\" are the same NLL term: give "
                             "its weight once (loss_type \"sft\" with its loss_weights entry, or "
                             "sft_weight)")
        if "robust" in types and self.label_smoothing == 0:
            raise EmberError("dpo.loss_type = \"robust\" needs dpo.label_smoothing in (0, 0.5): "
                             "the fraction of preference labels assumed flipped (with 0 it is "
                             "plain sigmoid DPO)")
        if "exo_pair" in types and self.label_smoothing == 0:
            raise EmberError("dpo.loss_type = \"exo_pair\" needs dpo.label_smoothing in (0, 0.5): "
                             "EXO's epsilon (the paper recommends 1e-3)")
        pair = [t for t in types if t != "sft"]
        if self.label_smoothing and not set(pair) & set(SMOOTHED):
            raise EmberError(f"dpo.label_smoothing applies to loss_type "
                             f"{', '.join(f'{t!r}' for t in SMOOTHED)}, not "
                             f"{', '.join(map(repr, pair or types))}: drop it")
        if self.label_smoothing and "sigmoid" in pair and len(set(pair) & set(SMOOTHED)) > 1:
            raise EmberError("dpo.label_smoothing with loss_type \"sigmoid\" and another loss "
                             "type that takes it: Ember's \"sigmoid\" with label_smoothing is "
                             "conservative DPO (TRL 0.x), where TRL 1.x's ignores it; run them "
                             "apart or drop \"sigmoid\"")
        if self.f_divergence_type not in F_DIVERGENCES:
            raise EmberError(f"dpo.f_divergence_type must be one of "
                             f"{', '.join(map(repr, F_DIVERGENCES))}, got "
                             f"{self.f_divergence_type!r}")
        if self.f_divergence_type != "reverse_kl" and not set(pair) <= set(
                F_DIVERGENCE_LOSS_TYPES):
            bad = sorted(set(pair) - set(F_DIVERGENCE_LOSS_TYPES))
            raise EmberError(f"dpo.f_divergence_type = {self.f_divergence_type!r} applies to "
                             f"loss_type {', '.join(map(repr, F_DIVERGENCE_LOSS_TYPES))} (and "
                             f"'sft'), not {', '.join(map(repr, bad))}: their losses are not on "
                             "the chosen-rejected reward margin, where f-DPO's log Z(x) cancels "
                             "(TRL refuses them too); use f_divergence_type = \"reverse_kl\"")
        if not math.isfinite(self.f_alpha_divergence_coef):
            raise EmberError(f"dpo.f_alpha_divergence_coef must be finite, got "
                             f"{self.f_alpha_divergence_coef}")
        if not self.discopop_tau > 0:
            raise EmberError(f"dpo.discopop_tau must be > 0, got {self.discopop_tau}")
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


class _Pairs(SFT):
    """What the preference objectives share (see the module docstring)."""

    pairs = True
    mean_logps = False  # the logps metrics per answer token (TRL's ORPO and CPO log those)
    prompt_nll = False  # the NLL term covers the chosen prompts' tokens too (TRL's ORPO)
    pair_rule = "dpo"  # how pairs are tokenized (ember.engine.preference.encode_pair)

    def __init__(self, cfg: TrainConfig, info: DistInfo, nll_weight: float):
        super().__init__(info)
        if cfg.data.loss_on != "completion":
            # "all" would put the prompt's tokens into every answer's log-probability: the
            # per-token means (IPO, ORPO, SimPO), the NLL term and the rewards would all change
            raise EmberError(f"objective = \"{self.name}\" scores the answers only (TRL's "
                             "completion log-probabilities, the prompt excluded): set "
                             "data.loss_on = \"completion\"")
        self.nll_weight = nll_weight
        self.step_tokens = 0.0  # the NLL term's tokens of the step (_nll_tokens), all processes
        self._prompt_nll, self._prompt_tokens = None, 0  # set by _logprobs for _batch

    def weight(self, batch) -> int:
        return batch.num_docs // 2

    def load_datasets(self, cfg: DataConfig, tokenizer) -> Datasets:
        return load_datasets(cfg, tokenizer, partial(load_examples, pairs=self.pair_rule))

    def begin_step(self, micro: list, reduce: Callable[[list[float]], list[float]], model=None,
                   device=None, autocast=None, pad: list = ()) -> None:
        if self.nll_weight:
            local = sum(self._nll_tokens(b) for b in micro)
            self.step_tokens = reduce([local])[0]

    def _nll_tokens(self, batch) -> float:
        """The tokens the NLL term sums over in ``batch``: the chosen answers' (and with
        ``prompt_nll`` the chosen prompts')."""
        n = float(answer_counts(batch)[0::2].sum())
        if self.prompt_nll:
            n += prompt_positions(batch, _chosen_docs(batch))[0].numel()
        return n

    def _pair_losses(self, model, batch) -> tuple[PairLosses, DocLogprobs, dict[str, float]]:
        """(the pair losses, the policy's log-probs of the batch, extra metric sums)."""
        raise NotImplementedError

    def _logprobs(self, model, batch) -> DocLogprobs:
        """The policy's ``doc_logprobs`` of the batch; with ``prompt_nll`` the chosen prompts'
        summed cross-entropy and token count from the same forward are kept for ``_batch``."""
        if not self.prompt_nll:
            return doc_logprobs(model, batch)
        lp, self._prompt_nll, self._prompt_tokens = doc_logprobs_prompt_nll(
            model, batch, _chosen_docs(batch))
        return lp

    def _batch(self, model, batch) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
        """(summed pair losses, summed NLL of the chosen answers (and with ``prompt_nll`` of
        their prompts), metric sums)."""
        out, lp, extra = self._pair_losses(model, batch)
        nll = -lp.sums[0::2].sum()
        tokens = float(lp.counts[0::2].sum())
        if self.prompt_nll:
            nll, tokens = nll + self._prompt_nll, tokens + self._prompt_tokens
            self._prompt_nll = None
        logps = (lp.means if self.mean_logps else lp.sums).detach()
        sums = {"pairs": out.chosen.numel(),
                "chosen_logps": float(logps[0::2].sum()),
                "rejected_logps": float(logps[1::2].sum()),
                "reward_accuracy": float((out.chosen > out.rejected).sum()),
                "reward_margin": float((out.chosen - out.rejected).sum()),
                "chosen_reward": float(out.chosen.sum()),
                "rejected_reward": float(out.rejected.sum()),
                "nll_sum": float(nll.detach()), "chosen_tokens": tokens,
                **extra}
        return out.losses.sum(), nll, sums

    def loss(self, model, batch, denom: int) -> torch.Tensor:
        pair_sum, nll, sums = self._batch(model, batch)
        self._add(**sums)
        loss = pair_sum / denom
        if self.nll_weight:
            loss = loss + self.nll_weight * nll / max(self.step_tokens, 1.0)
        return loss

    def _finish(self, sums: dict[str, float]) -> dict[str, float]:
        n = max(sums.pop("pairs", 0.0), 1.0)
        tokens = max(sums.pop("chosen_tokens", 0.0), 1.0)
        nll = sums.pop("nll_sum", 0.0) / tokens
        out = {k: v / n for k, v in sums.items()}
        if "loss" in out:  # validation: the pairs' mean loss plus the weighted NLL
            out["loss"] += self.nll_weight * nll
        return {**out, "nll_loss": nll}

    def val_scores(self, model, examples: list[Example], tokens_per_batch: int, device,
                   autocast, max_batches: int | None) -> dict[str, float]:
        def score(batch) -> dict[str, float]:
            pair_sum, _, part = self._batch(model, batch)
            return {"loss": float(pair_sum), **part}

        sums: dict[str, float] = {}
        for part in scored_batches(model, examples, tokens_per_batch, device, score, autocast,
                                   max_batches, self.info):  # every batch's, in file order
            for k, v in part.items():
                sums[k] = sums.get(k, 0.0) + v
        return {f"val_{k}": v for k, v in self._finish(sums).items()}


def _chosen_docs(batch) -> torch.Tensor:
    """(num_docs,) bool: the chosen documents of a batch of pairs (chosen, rejected, ...)."""
    n = batch.cu_seqlens.numel() - 1
    return torch.arange(n) % 2 == 0


class Referenced:
    """The reference of DPO and KTO: the starting model, i.e. the same model with its LoRA
    adapters switched off; with full fine-tuning a frozen copy of the starting weights; after
    ``model.init`` the earlier stage's result (a continued adapter: its weights swapped in)."""

    def _init_reference(self, cfg: TrainConfig, info: DistInfo, precompute: bool) -> None:
        self.ref_model, self.ref_adapters = None, None
        self.precompute, self.released = precompute, False
        # where and under which settings a precompute is kept for a resume (reference_cache)
        self.cache_dir = cfg.out_dir
        self.cache_settings = forward_settings(cfg)
        # a continued adapter: a frozen copy of it; so for PiSSA / OLoRA's starting adapters
        # (with them off the model is the residual base, not the starting model)
        self.snapshot = continues_lora(cfg) or (cfg.method == "lora"
                                                and changes_base(cfg.lora.init))
        if cfg.method == "full":  # no adapters to switch off: a frozen copy is the reference
            ref = frozen_start(cfg, build_device(info))
            record_fingerprint(self.prints, "reference", ref, info)
            self.ref_model = shard_frozen(ref, info)

    def frozen_models(self) -> dict[str, torch.nn.Module]:
        return {} if self.ref_model is None else {"reference": self.ref_model}

    def fingerprints(self, model) -> dict[str, str]:
        prints = super().fingerprints(model)
        if self.snapshot:  # the adapter as loaded from model.init (trained: not in the base's)
            from ember.engine.state import base_fingerprint  # (state imports objectives)

            prints["reference adapter"] = base_fingerprint(model, trained=True)
        return prints

    def check_model(self, model, tokenizer) -> None:
        if self.snapshot:  # the built model holds the adapter as loaded (before any resume)
            self.ref_adapters = adapter_snapshot(model)

    def reference(self, model):
        if self.ref_model is not None:
            return contextlib.nullcontext(self.ref_model)
        if self.ref_adapters is not None:
            return adapters_swapped(model, self.ref_adapters)
        return adapters_disabled(model)

    def _scored(self, model, batch) -> DocLogprobs:
        """The log-probs a reference forward gives (DPO's LD-DPO weighs them)."""
        return doc_logprobs(model, batch)

    def needs_live_reference(self) -> bool:
        """Whether batches that carry no precomputed log-probs are scored during training."""
        return False

    def prepare(self, model, ds: Datasets, tokens_per_batch: int, device, autocast, echo, *,
                prints: dict[str, str] | None = None) -> None:
        """``precompute_ref_log_probs``: one pass of the reference (eval mode, no gradients) over
        the training and validation examples before the first step, each document's summed answer
        log-prob (``_scored``'s: LD-DPO's weighted sum) kept on its example (``Example.ref_logps``,
        carried into ``Batch.ref_sums``), so the steps and evaluations run no reference forward;
        a full fine-tune's frozen copy is then released unless live scoring still needs it (KTO's
        mismatched KL documents). With ``prints`` (the reference's weight fingerprints by role)
        the values are saved in the run directory and a resume under the same key loads them
        (``engine/reference_cache.py``)."""
        if not self.precompute:
            return
        t0 = time.perf_counter()
        splits = {"train": ds.train, "validation": ds.validation,
                  **{f"validation/{k}": v for k, v in ds.val_sources.items()}}
        key = None if prints is None else cache_key(splits, prints, self.cache_settings)
        loaded = 0
        if key is not None:
            loaded, why = load_cached(self.cache_dir, splits, key, self.info)
            if why:
                echo(f"{self.name}: saved reference log-probs do not apply ({why}): computing "
                     "them again")
        n = 0
        for examples in splits.values():
            todo = [e for e in examples if e.ref_logps is None]
            if todo:
                n += attach_ref_logps(todo, lambda b: self.ref_logprobs(model, b), model,
                                      tokens_per_batch, device, autocast, self.info)
        if n and key is not None:
            save_cached(self.cache_dir, splits, key, self.info)
        done = [f"{n} documents precomputed"] if n or not loaded else []
        if loaded:
            done.append(f"{loaded} {'' if done else 'documents '}loaded from "
                        f"{cache_path(self.cache_dir)}")
        note = ""
        if self.ref_model is not None and not self.needs_live_reference():
            self.ref_model, self.released = None, True
            gc.collect()
            note = "; the frozen reference copy is released"
        echo(f"{self.name}: reference log-probs of {' and '.join(done)} in "
             f"{time.perf_counter() - t0:.1f} s{note}")

    def ref_logprobs(self, model, batch) -> DocLogprobs:
        """The reference's ``doc_logprobs`` of a batch (no gradients): the precomputed values when
        the batch carries them (``prepare``), else one forward of the reference."""
        if batch.ref_sums is not None:
            return DocLogprobs(batch.ref_sums, answer_counts(batch).float())
        if self.released:
            raise EmberError(f"internal: a {self.name} batch has no precomputed reference "
                             "log-probs and the reference model was released")
        with torch.no_grad(), self.reference(model) as ref:
            lp = self._scored(ref, batch)
        if self.ref_model is not None:
            release(self.ref_model)
        return lp


def attach_ref_logps(examples: list[Example], score, model, tokens_per_batch: int, device,
                     autocast, info: DistInfo) -> int:
    """Set ``Example.ref_logps`` of every example from ``score(batch)`` (a ``DocLogprobs``) over
    the evaluation batches (under torchrun each process its share, all results gathered);
    returns the number of documents scored."""
    sums = scored_batches(model, examples, tokens_per_batch, device,
                          lambda b: score(b).sums.float().cpu().tolist(), autocast, info=info)
    n = 0
    for idx, row in zip(eval_plan(examples, tokens_per_batch), sums, strict=True):
        for i in idx:
            k = len(examples[i].doc_lengths)
            examples[i].ref_logps, row, n = tuple(row[:k]), row[k:], n + k
        assert not row, "documents left over: the evaluation plan changed"
    return n


class DPO(Referenced, _Pairs):
    name = "dpo"

    def __init__(self, cfg: TrainConfig, info: DistInfo):
        super().__init__(cfg, info, cfg.dpo.nll_weight)
        self.cfg = cfg.dpo
        self._init_reference(cfg, info, cfg.dpo.precompute_ref_log_probs)

    def _scored(self, model, batch) -> DocLogprobs:
        """``doc_logprobs`` of the batch, with ``ld_alpha`` (LD-DPO) the weighted sums."""
        if self.cfg.ld_alpha is None:
            return doc_logprobs(model, batch)
        tok = answer_token_logprobs(model, batch)
        return tok.doc_logprobs(self._ld_weights(tok))

    def _ld_weights(self, tok: TokenLogprobs) -> torch.Tensor:
        counts = torch.bincount(tok.doc, minlength=tok.num_docs)
        return ld_token_weights(tok.doc, counts, self.cfg.ld_alpha, tok.logps.dtype)

    def _pair_losses(self, model, batch):
        ref_lp = self.ref_logprobs(model, batch)
        c, extra, weights = self.cfg, {}, None
        if c.ld_alpha is None and not c.use_weighting:
            lp = doc_logprobs(model, batch)  # (2 * pairs,): chosen, rejected, chosen, ...
            pol = lp.sums
        else:
            tok = answer_token_logprobs(model, batch, log_sum_sq=c.use_weighting)
            lp = tok.doc_logprobs()  # the plain sums: the NLL term's (TRL's sft loss too)
            pol = lp.sums
            if c.ld_alpha is not None:  # TRL's logps/* are LD's weighted sums
                pol = tok.doc_logprobs(self._ld_weights(tok)).sums
                extra = {"chosen_logps": float(pol[0::2].detach().sum()),
                         "rejected_logps": float(pol[1::2].detach().sum())}
            if c.use_weighting:
                weights = wpo_pair_weights(tok.logps, tok.log_sum_sq, tok.doc, tok.num_docs)
        ref, n = ref_lp.sums, lp.counts
        out = dpo_loss(pol[0::2], pol[1::2], ref[0::2], ref[1::2], c.beta, c.label_smoothing,
                       c.loss_types, chosen_tokens=n[0::2], rejected_tokens=n[1::2],
                       loss_weights=c.pair_weights, f_divergence=c.f_divergence_type,
                       f_alpha=c.f_alpha_divergence_coef, discopop_tau=c.discopop_tau,
                       pair_weights=weights)
        return out, lp, extra


class ORPO(_Pairs):
    name = "orpo"
    mean_logps = True
    prompt_nll = True
    pair_rule = "cpo"  # TRL's ORPOTrainer tokenizes as its CPOTrainer

    def __init__(self, cfg: TrainConfig, info: DistInfo):
        super().__init__(cfg, info, 1.0)  # ORPO's NLL term always weighs 1
        self.cfg = cfg.orpo

    def _pair_losses(self, model, batch):
        lp = self._logprobs(model, batch)
        a = lp.means
        out = orpo_loss(a[0::2], a[1::2], self.cfg.beta)
        log_odds = orpo_log_odds(a[0::2].detach(), a[1::2].detach())
        return out, lp, {"log_odds_ratio": float(F.logsigmoid(log_odds).sum()),
                         "log_odds_chosen": float(log_odds.sum())}


class SimPO(_Pairs):
    name = "simpo"
    mean_logps = True
    pair_rule = "cpo"  # TRL's SimPO is its CPOTrainer's loss_type "simpo"

    def __init__(self, cfg: TrainConfig, info: DistInfo):
        super().__init__(cfg, info, cfg.simpo.sft_weight)
        self.cfg = cfg.simpo

    def _pair_losses(self, model, batch):
        lp = doc_logprobs(model, batch)
        a, c = lp.means, self.cfg
        return simpo_loss(a[0::2], a[1::2], c.beta, c.gamma, c.label_smoothing, c.alpha), lp, {}


class CPO(_Pairs):
    name = "cpo"
    pair_rule = "cpo"

    def __init__(self, cfg: TrainConfig, info: DistInfo):
        super().__init__(cfg, info, cfg.cpo.cpo_alpha)
        self.cfg = cfg.cpo
        # TRL's logps/* are the log-probs its loss takes: per token for ipo and simpo
        self.mean_logps = cfg.cpo.loss_type in CPO_MEAN_LOSS_TYPES

    def _pair_losses(self, model, batch):
        lp, c = doc_logprobs(model, batch), self.cfg
        x = lp.means if self.mean_logps else lp.sums
        out = cpo_loss(x[0::2], x[1::2], c.beta, c.loss_type, c.label_smoothing, c.simpo_gamma,
                       c.alpha)
        return out, lp, {}


PREFERENCE = {"dpo": DPO, "orpo": ORPO, "simpo": SimPO, "cpo": CPO}
