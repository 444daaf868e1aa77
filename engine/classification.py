"""Sequence classification runs (``[head] type = "classification"``): data, loss, evaluation.

The model is the run's decoder with a ``score`` head pooled at each document's last non-pad token
(``ember.models.heads``, transformers' ``*ForSequenceClassification`` rule); the LM head is
dropped. Every method trains the head: ``full`` (with ``freeze`` / ``train_layers``; ``train_layers
= []`` trains the head alone: a linear probe), ``lora`` (the head trains whole next to the
adapters, as PEFT's ``modules_to_save``), and QLoRA.

Data lines: ``{"text": ..., "label": ...}`` (tokenized as ``tokenizer(text)`` does, special
tokens included, no EOS appended) or ``{"messages": [...], "label": ...}`` (rendered with the chat
template). ``label`` is a class name or an index into ``head.labels``; when ``head.labels`` is
empty the names are those of ``model.name`` if it is an HF classifier folder, else the sorted
distinct labels of the training files (indices: ``"0" .. "n-1"``), written into the resolved
config so evaluation and export agree. A missing, mistyped or unknown
label is a bad line (``file:line: reason``, counted and reported, or an error with
``data.bad_lines = "error"``). Trailing pad tokens are stripped, so each document's last token is
where the head pools (and where its class index is stored: ``Example.labels[-1]``). Label
inference and the labelled reader live in ``engine/classification_data.py``.

Loss: cross-entropy of the class logits, summed over the documents of a micro-batch and divided
by the documents of the whole optimizer step (the trainer's weight), so gradient accumulation and
processes give the per-document mean of one big batch, like ``losses.sft_loss`` per token.

One-output heads (``"reward"``, ``"regression"``) build on this module: ``engine/reward.py``.

Evaluation: ``val_loss`` on the validation split; ``eval.metrics`` (``accuracy``, ``macro_f1``,
``f1``, ``exact_match``; default with a head: accuracy and macro_f1) from the argmax of the head
on the test split (validation when there is none), computed on class indices (macro F1 as
scikit-learn's, over the reference and predicted classes); one forward
pass per packed batch, no generation. Under torchrun each rank scores every N-th batch
(``evaluation.scored_batches``) and the results are gathered.
"""

from __future__ import annotations

import contextlib
import fnmatch
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from ember import EmberError
from ember.engine import metrics as M
from ember.engine.classification_data import (  # noqa: F401  (importable from here, as before)
    _ClassReader,
    infer_labels,
    load_labelled,
    load_labelled_datasets,
    read_head_file,
    strip_pad,
)
from ember.engine.data import DataConfig, DataReport, Datasets, Example
from ember.engine.distributed import DistInfo
from ember.engine.evaluation import GenerationResult, scored_batches
from ember.engine.objectives import SFT
from ember.models.heads import add_classification_head, classify, is_classifier, name_pad_token
from ember.models.loading import read_config

if TYPE_CHECKING:
    from ember.engine.config import TrainConfig

HEAD_TYPES = ("classification", "reward", "regression")
LABEL_METRICS = ("accuracy", "macro_f1", "f1", "exact_match")
DEFAULT_METRICS = ("accuracy", "macro_f1")


@dataclass(frozen=True, kw_only=True)
class HeadConfig:
    # "classification" | "reward" (one output, trained on preference pairs) | "regression" (one
    # output, MSE on numeric labels) | None (a language model); engine/reward.py for the last two
    type: str | None = None
    labels: tuple[str, ...] = ()  # class names in index order; empty: from data.train, sorted
    label_field: str = "label"  # the JSONL field holding each line's class (regression: number)
    # reward: + coefficient * mean((r_chosen + r_rejected)^2) (TRL's center_rewards_coefficient)
    center_rewards_coefficient: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "labels", (self.labels,) if isinstance(self.labels, str) else tuple(self.labels)
        )
        if self.type is not None and self.type not in HEAD_TYPES:
            raise EmberError(f"head.type must be one of {', '.join(map(repr, HEAD_TYPES))} or "
                             f"left out, got {self.type!r}")
        if self.labels and self.type in ("reward", "regression"):
            raise EmberError(f"head.labels names classes; a {self.type} head has one output: "
                             "remove head.labels")
        if self.labels and (
            len(self.labels) < 2
            or len(set(self.labels)) != len(self.labels)
            or not all(self.labels)
        ):
            raise EmberError(
                f"head.labels must be at least two distinct non-empty names, got "
                f"{list(self.labels)}"
            )
        if not self.label_field:
            raise EmberError('head.label_field must be a field name, e.g. "label"')
        c = self.center_rewards_coefficient
        if not c >= 0 or (c and self.type != "reward"):
            raise EmberError(f"head.center_rewards_coefficient must be >= 0 and applies to "
                             f'head.type = "reward" only, got {c!r}')


def check_config(cfg: TrainConfig) -> None:
    """Refuse what a classification run cannot do (called by ``TrainConfig``)."""
    if cfg.head.type is None:
        if cfg.head.labels:
            raise EmberError(
                'head.labels is set but head.type is not: add head.type = "classification"'
            )
        if bad := [m for m in cfg.eval.metrics if m in M.HEAD_SCORES]:
            raise EmberError(f"eval.metrics {bad} score a reward or regression head: set "
                             'head.type = "reward" or "regression", or remove them')
        return
    if cfg.objective != "sft":
        raise EmberError(
            f"objective = {cfg.objective!r} with a {cfg.head.type} head is not "
            "supported: the head has its own loss; leave objective out (\"sft\")"
        )
    if cfg.method == "prompt":
        raise EmberError(
            f'method = "prompt" with a {cfg.head.type} head is not supported: use '
            'method = "lora" (the head trains with the adapters) or "full" '
            "(train_layers = [] trains the head alone)"
        )
    if cfg.task.name is not None:
        raise EmberError(
            "[task] generates prompt/completion data, not labelled lines; give "
            '{"text", "label"} files (a reward head: preference pairs) in data.train'
        )
    if cfg.eval.choices is not None:
        raise EmberError("eval.choices scores answers with the LM head, which a classifier "
                         "does not have: remove eval.choices")
    if cfg.head.type != "classification":
        from ember.engine.reward import check_one_output

        return check_one_output(cfg)
    if cfg.eval.early_stopping == "perplexity":
        raise EmberError(
            'eval.early_stopping = "perplexity" does not apply to a classifier; '
            'use "val_loss", "accuracy" or "macro_f1"'
        )
    bad = [m for m in cfg.eval.metrics if m not in LABEL_METRICS]
    if bad:
        raise EmberError(
            f"eval.metrics {bad} do not apply to a classifier; use {', '.join(LABEL_METRICS)}"
        )


def resolve_head(cfg: TrainConfig) -> TrainConfig:
    """Labels, when not given: an HF classifier's (``model.name``), else inferred from
    data.train; accuracy and macro_f1 as the default metrics. The resolved config records both."""
    if cfg.head.type is None:
        return cfg
    if cfg.head.type != "classification":  # one output: no labels; its own default metrics
        from ember.engine.reward import default_metrics

        return cfg.replace(eval=default_metrics(cfg))
    head = cfg.head
    if not head.labels:
        labels = model_labels(cfg.model.name)  # fine-tuning an HF classifier: its labels
        if labels is not None and len(labels) == 1:
            raise EmberError(f"{cfg.model.name} has one output (num_labels = 1): set head.type = "
                             '"reward" or "regression" to fine-tune it')
        if labels is None and not cfg.data.train:
            raise EmberError("data.train is empty: give one or more JSONL files")
        labels = labels or infer_labels(cfg.data.train, head.label_field)
        head = replace(head, labels=labels)
    ev = cfg.eval
    if ev.metrics == ("exact_match",):  # EvalConfig's default, for generation
        ev = replace(ev, metrics=DEFAULT_METRICS)
    return cfg.replace(head=head, eval=ev)


def pad_id(model_cfg, tokenizer) -> int | None:
    """The pad id a classifier pools around: the model's, else the tokenizer's pad, else EOS."""
    for v in (
        model_cfg.pad_token_id,
        getattr(tokenizer, "pad_token_id", None),
        getattr(tokenizer, "eos_token_id", None),
    ):
        if v is not None:
            return v
    return None


def attach_head(model, cfg: TrainConfig, tokenizer):
    """The run's classification head on a freshly loaded model (before LoRA / freezing); a model
    that is already a classifier (an HF folder) keeps its head, which must have the run's
    labels. A classifier without ``[head]`` is refused: it has no LM head to train."""
    if cfg.head.type is None:
        if is_classifier(model):
            raise EmberError(
                f"{cfg.model.name} is a sequence classifier (labels {list(model.cfg.labels)}): "
                'set head.type = "classification" (one output: "reward" or "regression") to '
                "fine-tune it"
            )
        return model
    labels = cfg.head.labels
    if cfg.head.type != "classification":  # one output, named as the HF folder names it
        one = model.cfg.labels
        labels = one if one is not None and len(one) == 1 else ("LABEL_0",)
    add_classification_head(
        model, labels, pad_token_id=pad_id(model.cfg, tokenizer), seed=cfg.seed
    )
    problem = "regression" if cfg.head.type == "regression" else None
    model.cfg = model.cfg.replace(problem_type=problem if len(labels) == 1 else None)
    name_pad_token(tokenizer, model.cfg.pad_token_id)
    if cfg.method == "lora":  # a head trained on a frozen (low-precision) base stays fp32
        model.score.float()
    return model


def model_labels(name: str) -> tuple[str, ...] | None:
    """The labels of an HF classifier folder (``model.name``), or None."""
    folder = Path(name)
    if not (folder / "config.json").is_file():
        return None
    try:
        return read_config(folder).labels
    except EmberError:
        return None  # loading the model reports what is wrong with it


def train_head(model, cfg: TrainConfig) -> None:
    """The head trains with every method, unless a freeze pattern names it."""
    frozen = any(fnmatch.fnmatchcase("score.weight", p) for p in cfg.freeze)
    model.score.weight.requires_grad_(not frozen)


# --- loss and evaluation -------------------------------------------------------------------------


def doc_targets(batch) -> torch.Tensor:
    """The class index of every document of a packed batch (stored at its last position)."""
    last = batch.cu_seqlens[1:].to(batch.labels.device, torch.long) - 1
    return batch.labels.reshape(-1).index_select(0, last)


def classification_loss(model, batch, num_docs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed cross-entropy over the batch's documents / ``num_docs``, logits (docs, L))."""
    if num_docs < 1:
        raise EmberError("classification_loss: num_docs must be >= 1")
    logits = classify(
        model,
        batch.input_ids,
        batch.position_ids,
        cu_seqlens=batch.cu_seqlens,
        max_seqlen=batch.max_seqlen,
    )
    loss = F.cross_entropy(logits.float(), doc_targets(batch), reduction="sum")
    return loss / num_docs, logits


def predict(
    model, examples: list[Example], tokens_per_batch: int, device, autocast=contextlib.nullcontext,
    max_batches: int | None = None, info: DistInfo | None = None,
) -> tuple[list[int], float]:
    """(argmax class of every example scored, in order; their mean cross-entropy). The examples
    are packed in file order; ``max_batches``: only the first that many batches. Under torchrun
    (``info``) each rank scores its share of the batches and every rank gets all results."""

    def classes_and_loss(batch):  # (classes, summed loss) of one batch
        loss, logits = classification_loss(model, batch, 1)
        return logits.argmax(-1).tolist(), float(loss)

    scored = scored_batches(model, examples, max(tokens_per_batch, max(map(len, examples))),
                            device, classes_and_loss, autocast, max_batches, info)
    preds = [c for classes, _ in scored for c in classes]
    return preds, sum(loss for _, loss in scored) / len(preds)


def label_scores(
    model,
    tokenizer,
    examples: list[Example],
    metric_names,
    tokens_per_batch: int,
    device,
    autocast=contextlib.nullcontext,
    max_examples: int | None = None,
    show: int = 0,
    info: DistInfo | None = None,
) -> GenerationResult:
    """``metric_names`` on the argmax labels of ``examples``, plus ``loss`` (mean cross-entropy);
    under torchrun (``info``) the batches are shared out (``predict``)."""
    if max_examples is not None:
        examples = examples[:max_examples]
    t0 = time.perf_counter()
    preds, loss = predict(model, examples, tokens_per_batch, device, autocast, info=info)
    # Scored on class indices: label names that differ only in case or spacing stay distinct.
    refs = [e.labels[-1] for e in examples]
    scores = M.compute(metric_names, [str(p) for p in preds], [str(r) for r in refs])
    scores.update({n: M.class_macro_f1(preds, refs) for n in ("f1", "macro_f1") if n in scores})
    pred_names = [model.cfg.labels[p] for p in preds]
    refs = [e.reference for e in examples]  # the label names, for the samples
    samples = [
        (tokenizer.decode(e.input_ids, skip_special_tokens=False), p, r)
        for e, p, r in list(zip(examples, pred_names, refs, strict=True))[:show]
    ]
    return GenerationResult(
        {**scores, "loss": loss}, samples, time.perf_counter() - t0, len(examples)
    )


def eval_classifier(
    model,
    tokenizer,
    data,
    data_cfg: DataConfig,
    metrics: str | None = None,
    field: str = "label",
    max_examples: int | None = None,
) -> tuple[dict, DataReport]:
    """``ember eval`` of a classifier: (loss and label metrics, report) on a labelled JSONL file.
    ``metrics``: comma-separated names (default accuracy and macro_f1)."""
    from ember.engine.runtime import autocast_for

    names = [m for m in (metrics or "").split(",") if m] or list(DEFAULT_METRICS)
    bad = [m for m in names if m not in LABEL_METRICS]
    if bad:
        raise EmberError(
            f"--metrics {bad} do not apply to a classifier; use {', '.join(LABEL_METRICS)}"
        )
    examples, report = load_labelled(
        data, data_cfg, tokenizer, model.cfg.labels, field, model.cfg.pad_token_id
    )
    device = str(next(model.parameters()).device)
    bf16 = device.startswith("cuda") and torch.cuda.is_bf16_supported()  # as ember eval does
    autocast = autocast_for(device, "bf16" if bf16 else "fp32")
    res = label_scores(
        model,
        tokenizer,
        examples,
        names,
        data_cfg.tokens_per_batch,
        device,
        autocast,
        max_examples,
    )
    return {"data": str(data), "examples": res.examples, **res.scores}, report


class Classification(SFT):
    """The objective of a run with ``[head] type = "classification"``."""

    name = "classification"

    def __init__(self, cfg: TrainConfig, info: DistInfo | None = None):
        super().__init__(info)
        self.head, self.tokens = cfg.head, cfg.data.tokens_per_batch
        self.pad = None

    def loss(self, model, batch, denom: int) -> torch.Tensor:
        return classification_loss(model, batch, denom)[0]

    def check_task_split(self, model, examples: list[Example], ev) -> None:
        pass  # every labelled example is scored

    def check_model(self, model, tokenizer) -> None:
        if not is_classifier(model):
            raise EmberError("internal error: a classification run without a head")
        self.pad = model.cfg.pad_token_id

    def load_datasets(self, cfg: DataConfig, tokenizer) -> Datasets:
        return load_labelled_datasets(
            cfg, tokenizer, self.head.labels, self.head.label_field, self.pad
        )

    def check_data(self, ds: Datasets) -> None:
        pass  # every example came through the labelled reader

    def val_scores(
        self,
        model,
        examples: list[Example],
        tokens_per_batch: int,
        device,
        autocast,
        max_batches: int | None,
    ) -> dict[str, float]:
        _, loss = predict(model, examples, tokens_per_batch, device, autocast, max_batches,
                          self.info)
        return {"val_loss": loss}

    def task_eval(
        self, model, tokenizer, examples: list[Example], ev, autocast
    ) -> GenerationResult:
        res = label_scores(
            model,
            tokenizer,
            examples,
            ev.metrics,
            self.tokens,
            next(model.parameters()).device,
            autocast,
            ev.max_examples,
            ev.show,
            self.info,
        )
        res.scores.pop("loss")  # the test split's loss is not val_loss
        return res
