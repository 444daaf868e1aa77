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

from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from ember import EmberError
from ember.engine.data import load_datasets, load_examples
from ember.engine.distributed import DistInfo
from ember.engine.evaluation import scored_batches
from ember.engine.losses import (
    DocLogprobs,
    TokenLogprobs,
    answer_counts,
    answer_token_logprobs,
    doc_logprobs,
    doc_logprobs_prompt_nll,
    prompt_positions,
)
from ember.engine.objectives import SFT
from ember.engine.preference_configs import DPOConfig, ORPOConfig, SimPOConfig
from ember.engine.preference_losses import (
    CPO_MEAN_LOSS_TYPES,
    PairLosses,
    cpo_loss,
    dpo_loss,
    ld_token_weights,
    orpo_log_odds,
    orpo_loss,
    simpo_loss,
    wpo_pair_weights,
)
from ember.engine.preference_reference import Referenced, attach_ref_logps

if TYPE_CHECKING:
    from ember.engine.config import TrainConfig
    from ember.engine.data import DataConfig, Datasets, Example

# re-exported: the configs (engine/preference_configs.py) and the reference
# (engine/preference_reference.py) were split out of this module
__all__ = ["CPO", "DPO", "ORPO", "PREFERENCE", "DPOConfig", "ORPOConfig", "Referenced",
           "SimPO", "SimPOConfig", "attach_ref_logps"]


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
        if not c.loss_types:  # loss_type "sft" alone: the NLL term only (TRL 1.16's too)
            return _nll_only(pol, ref, c.beta), lp, extra
        out = dpo_loss(pol[0::2], pol[1::2], ref[0::2], ref[1::2], c.beta, c.label_smoothing,
                       c.loss_types, chosen_tokens=n[0::2], rejected_tokens=n[1::2],
                       loss_weights=c.pair_weights, f_divergence=c.f_divergence_type,
                       f_alpha=c.f_alpha_divergence_coef, discopop_tau=c.discopop_tau,
                       pair_weights=weights)
        return out, lp, extra


def _nll_only(pol: torch.Tensor, ref: torch.Tensor, beta: float) -> PairLosses:
    """DPO's pair losses when ``loss_type`` names "sft" alone: zero (on the policy's graph, so
    a step backpropagates even with the NLL term weighted 0), and the rewards TRL logs anyway."""
    c = (pol[0::2] - ref[0::2]).detach()
    r = (pol[1::2] - ref[1::2]).detach()
    return PairLosses(pol[0::2] * 0.0, beta * c, beta * r)


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
