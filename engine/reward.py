"""One-output heads: reward models (``[head] type = "reward"``) and regression (``"regression"``).

Both are the classifier of ``engine/classification.py`` with ONE output (transformers'
``AutoModelForSequenceClassification(num_labels=1)``), pooled at each document's last non-pad
token; methods, checkpoints, resume, torchrun and export are the classifier's.

Reward (TRL's ``RewardTrainer``): data are the preference lines DPO reads
(``engine/preference.py``: ``{"prompt", "chosen", "rejected"}`` strings, TRL's chat form, or
chosen/rejected conversations sharing a prompt), read and rendered by the same reader; each
document's trailing pad tokens are stripped (the head pools at the last token, as transformers
does around pads). A line may carry a ``"margin"`` number (default 0). With ``r`` the head's
output, each pair's loss is

    -log sigmoid(r_chosen - r_rejected - margin) + c * (r_chosen + r_rejected)^2

(``c``: ``head.center_rewards_coefficient``, default 0), averaged over the pairs of the whole
optimizer step (the trainer divides every micro-batch's sum by the step's pairs), which is TRL's
batch mean for one batch and gradient-accumulation invariant. Metrics: ``accuracy`` (the
fraction of pairs with r_chosen > r_rejected, ties count as wrong, as TRL) and ``margin`` (mean
r_chosen - r_rejected), per step and at evaluations (``val_loss``, ``val_accuracy``,
``val_margin`` on the validation split; ``eval.metrics`` on the test split, else validation).

Regression (transformers' ``problem_type="regression"``): ``{"text" | "messages", "label":
number}`` lines (``head.label_field``); the loss is the squared error summed over a micro-batch's
documents / the documents of the step: the step's MSE. A missing, non-numeric (string, bool,
list), NaN or infinite label is a bad line. Metrics ``mse``, ``rmse``, ``pearson`` (NaN when
either side is constant); early stopping minimizes mse / rmse (``metrics.LOWER_IS_BETTER``).
Export writes ``problem_type = "regression"`` so transformers computes the same MSE.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import replace
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from ember import EmberError
from ember.engine.classification import Classification
from ember.engine.classification_data import (
    _ClassReader,
    load_labelled_datasets,
    read_head_file,
    strip_pad,
)
from ember.engine.data import IGNORE, DataConfig, Datasets, Example, _Bad, _Reader, _type_name
from ember.engine.distributed import DistInfo
from ember.engine.evaluation import GenerationResult, scored_batches
from ember.models.heads import classify

if TYPE_CHECKING:
    from ember.engine.config import EvalConfig, TrainConfig

REWARD_METRICS = ("accuracy", "margin")
REGRESSION_METRICS = ("mse", "rmse", "pearson")
METRICS = {"reward": REWARD_METRICS, "regression": REGRESSION_METRICS}


def check_one_output(cfg: TrainConfig) -> None:
    """The reward / regression part of ``classification.check_config``."""
    kind, ev = cfg.head.type, cfg.eval
    allowed = METRICS[kind]
    bad = [m for m in ev.metrics if m not in allowed]
    if bad and ev.metrics != ("exact_match",):  # EvalConfig's default: replaced by resolve
        raise EmberError(f"eval.metrics {bad} do not apply to a {kind} head; use "
                         f"{', '.join(allowed)}")
    if ev.early_stopping == "perplexity":
        raise EmberError(f'eval.early_stopping = "perplexity" does not apply to a {kind} head; '
                         f'use "val_loss" or one of {", ".join(allowed)} (in eval.metrics)')


def default_metrics(cfg: TrainConfig) -> EvalConfig:
    ev = cfg.eval
    return replace(ev, metrics=METRICS[cfg.head.type]) if ev.metrics == ("exact_match",) else ev


def _number(obj: dict, field: str, required: bool) -> float:
    """``obj[field]`` as a finite float; 0.0 when absent and not required; else _Bad."""
    if field not in obj:
        if not required:
            return 0.0
        raise _Bad("missing field", f"missing field {field!r} (keys present: {sorted(obj)})")
    v = obj[field]
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise _Bad("wrong type", f"field {field!r} must be a number, got {_type_name(v)}")
    try:
        x = float(v)
    except OverflowError:
        x = math.inf
    if not math.isfinite(x):
        raise _Bad("not finite", f"field {field!r} must be a finite number, got {v!r}")
    return x


class _PairReader(_Reader):
    """Preference lines as DPO reads and renders them; each document's trailing pads stripped,
    its last position labelled 0 (one "loss token" per document), the line's margin kept."""

    def __init__(self, path, cfg: DataConfig, tokenizer, pad: int | None):
        super().__init__(path, cfg, tokenizer)
        self.pad, self.margin = pad, 0.0

    def record(self, line: str):
        rec = super().record(line)  # fixes self.fmt on the first line
        if self.fmt != "preference":
            raise EmberError(f'{self.path}: a reward head trains on preference lines {{"prompt", '
                             f'"chosen", "rejected"}} (or chosen/rejected conversations), not '
                             f"{self.fmt} lines")
        self.margin = _number(json.loads(line), "margin", required=False)
        return rec

    def example(self, lineno: int, raw: bytes) -> Example | None:
        ex = super().example(lineno, raw)
        if ex is None:
            return None
        docs, start = [], 0
        for n in ex.parts:
            docs.append(strip_pad(ex.input_ids[start:start + n], self.pad))
            start += n
            if not docs[-1]:
                self.bad(lineno, "empty text", "no tokens besides padding")
                return None
        labels = [t for d in docs for t in [IGNORE] * (len(d) - 1) + [0]]
        return Example([t for d in docs for t in d], labels, ex.source, 0, ex.reference, ex.key,
                       parts=tuple(len(d) for d in docs), value=self.margin)


class _ValueReader(_ClassReader):
    """``{"text" | "messages", <field>: number}`` lines: the classifier's reader, the number kept
    as ``Example.value`` instead of a class."""

    def _label(self, obj: dict) -> int:
        self.value = _number(obj, self.field, required=True)
        return 0

    def example(self, lineno: int, raw: bytes) -> Example | None:
        ex = super().example(lineno, raw)
        if ex is not None:
            ex.value, ex.reference = self.value, repr(self.value)
        return ex


def load_pairs(path, cfg: DataConfig, tokenizer, pad: int | None = None):
    """(examples, DataReport) of one preference file for a reward head."""
    return read_head_file(path, lambda p: _PairReader(p, cfg, tokenizer, pad), " (reward)")


def load_values(path, cfg: DataConfig, tokenizer, field: str = "label", pad: int | None = None):
    """(examples, DataReport) of one file of numeric labels for a regression head."""
    return read_head_file(
        path, lambda p: _ValueReader(p, cfg, tokenizer, ("LABEL_0",), field, pad), f" + {field}"
    )


# --- losses and scores ---------------------------------------------------------------------------


def reward_losses(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor,
                  center: float = 0.0) -> torch.Tensor:
    """(P,) TRL RewardTrainer's loss per pair (module docstring); the mean is TRL's loss."""
    losses = -F.logsigmoid(chosen - rejected - margin)
    return losses + center * (chosen + rejected) ** 2 if center else losses


def head_outputs(model, batch) -> torch.Tensor:
    """(documents,) fp32: the one-output head on every document of a packed batch."""
    out = classify(model, batch.input_ids, batch.position_ids, cu_seqlens=batch.cu_seqlens,
                   max_seqlen=batch.max_seqlen)
    return out[:, 0].float()


def score_documents(model, examples: list[Example], tokens_per_batch: int, device,
                    autocast=contextlib.nullcontext, max_batches: int | None = None,
                    info: DistInfo | None = None) -> list[float]:
    """The head's output on every document of ``examples`` (file order; the first
    ``max_batches`` batches only); under torchrun each rank scores its share of the batches and
    every rank gets all results (as ``classification.predict``)."""
    scored = scored_batches(model, examples, max(tokens_per_batch, max(map(len, examples))),
                            device, lambda b: head_outputs(model, b).tolist(), autocast,
                            max_batches, info)
    return [x for outs in scored for x in outs]


def reward_scores(rewards: list[float], examples: list[Example], center: float = 0.0
                  ) -> dict[str, float]:
    """loss, accuracy and margin (float64) of the pairs whose rewards are given (chosen,
    rejected, chosen, ...: the first len(rewards) / 2 examples)."""
    r = torch.tensor(rewards, dtype=torch.float64)
    c, rj = r[0::2], r[1::2]
    m = torch.tensor([e.value for e in examples[:len(c)]], dtype=torch.float64)
    return {"loss": float(reward_losses(c, rj, m, center).mean()),
            "accuracy": float((c > rj).double().mean()), "margin": float((c - rj).mean())}


def regression_scores(preds: list[float], examples: list[Example]) -> dict[str, float]:
    """loss (= mse), mse, rmse and pearson (float64) of the first len(preds) examples."""
    p = torch.tensor(preds, dtype=torch.float64)
    y = torch.tensor([e.value for e in examples[:len(p)]], dtype=torch.float64)
    mse = float(((p - y) ** 2).mean())
    dp, dy = p - p.mean(), y - y.mean()
    den = float(dp.norm() * dy.norm())
    pearson = float((dp * dy).sum()) / den if den > 0 else math.nan
    return {"loss": mse, "mse": mse, "rmse": math.sqrt(mse), "pearson": pearson}


# --- objectives ----------------------------------------------------------------------------------


class _OneOutput(Classification):
    def __init__(self, cfg: TrainConfig, info: DistInfo | None = None):
        super().__init__(cfg, info)
        self.last_val = None  # (examples, scores) of the last whole validation pass

    def check_data(self, ds: Datasets) -> None:
        pass  # every example came through the head's reader

    def _scores(self, model, examples, tokens_per_batch, device, autocast, max_batches):
        raise NotImplementedError

    def val_scores(self, model, examples: list[Example], tokens_per_batch: int, device,
                   autocast, max_batches: int | None) -> dict[str, float]:
        scores = self._scores(model, examples, tokens_per_batch, device, autocast, max_batches)
        self.last_val = (examples, scores) if max_batches is None else None
        return {f"val_{k}": v for k, v in scores.items() if k not in ("mse",)}

    def task_eval(self, model, tokenizer, examples: list[Example], ev, autocast
                  ) -> GenerationResult:
        t0 = time.perf_counter()
        examples = examples[:ev.max_examples]
        last, self.last_val = self.last_val, None
        if last is not None and last[0] == examples:  # no test split: the same evaluation's
            scores = last[1]  # validation pass, just made (the trainer calls them in a row)
        else:
            scores = self._scores(model, examples, self.tokens,
                                  next(model.parameters()).device, autocast, None)
        return GenerationResult({m: scores[m] for m in ev.metrics}, [],
                                time.perf_counter() - t0, len(examples))


class RewardHead(_OneOutput):
    """The objective of a run with ``[head] type = "reward"``."""

    name = "reward"
    pairs = True

    def __init__(self, cfg: TrainConfig, info: DistInfo | None = None):
        super().__init__(cfg, info)
        self.center = cfg.head.center_rewards_coefficient

    def weight(self, batch) -> int:
        return batch.num_docs // 2

    def loss(self, model, batch, denom: int) -> torch.Tensor:
        r = head_outputs(model, batch)
        c, rj = r[0::2], r[1::2]
        losses = reward_losses(c, rj, batch.values.to(r.device), self.center)
        d = (c - rj).detach()
        self._add(pairs=d.numel(), accuracy=float((d > 0).sum()), margin=float(d.sum()))
        return losses.sum() / denom

    def _finish(self, sums: dict[str, float]) -> dict[str, float]:
        n = max(sums.pop("pairs", 0.0), 1.0)
        return {k: v / n for k, v in sums.items()}

    def load_datasets(self, cfg: DataConfig, tokenizer) -> Datasets:
        return load_labelled_datasets(
            cfg, tokenizer, (), load=lambda p: load_pairs(p, cfg, tokenizer, self.pad))

    def _scores(self, model, examples, tokens_per_batch, device, autocast, max_batches):
        rewards = score_documents(model, examples, tokens_per_batch, device, autocast,
                                  max_batches, self.info)
        return reward_scores(rewards, examples, self.center)


class RegressionHead(_OneOutput):
    """The objective of a run with ``[head] type = "regression"``."""

    name = "regression"

    def loss(self, model, batch, denom: int) -> torch.Tensor:
        pred = head_outputs(model, batch)
        return ((pred - batch.values.to(pred.device)) ** 2).sum() / denom

    def load_datasets(self, cfg: DataConfig, tokenizer) -> Datasets:
        field = self.head.label_field
        return load_labelled_datasets(
            cfg, tokenizer, (), load=lambda p: load_values(p, cfg, tokenizer, field, self.pad))

    def _scores(self, model, examples, tokens_per_batch, device, autocast, max_batches):
        preds = score_documents(model, examples, tokens_per_batch, device, autocast,
                                max_batches, self.info)
        return regression_scores(preds, examples)


HEAD_OBJECTIVES = {"reward": RewardHead, "regression": RegressionHead}


def eval_one_output(model, tokenizer, data, data_cfg: DataConfig, kind: str,
                    metrics: str | None = None, field: str = "label",
                    max_examples: int | None = None, center: float = 0.0):
    """``ember eval`` of a reward (``kind`` "reward": preference pairs) or regression head:
    (scores, report). ``metrics``: comma-separated names (default all of the kind's);
    ``center``: a reward run's center_rewards_coefficient (in the loss)."""
    from ember.engine.runtime import autocast_for

    allowed = METRICS[kind]
    names = [m for m in (metrics or "").split(",") if m] or list(allowed)
    bad = [m for m in names if m not in allowed]
    if bad:
        raise EmberError(f"--metrics {bad} do not apply to a {kind} head; use "
                         f"{', '.join(allowed)}")
    pad = model.cfg.pad_token_id
    examples, report = (load_pairs(data, data_cfg, tokenizer, pad) if kind == "reward" else
                        load_values(data, data_cfg, tokenizer, field, pad))
    examples = examples[:max_examples]
    device = str(next(model.parameters()).device)
    bf16 = device.startswith("cuda") and torch.cuda.is_bf16_supported()  # as ember eval does
    out = score_documents(model, examples, data_cfg.tokens_per_batch, device,
                          autocast_for(device, "bf16" if bf16 else "fp32"))
    scores = (reward_scores(out, examples, center) if kind == "reward" else
              regression_scores(out, examples))
    return {"data": str(data), "examples": len(examples), "loss": scores["loss"],
            **{m: scores[m] for m in names}}, report
