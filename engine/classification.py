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
where the head pools (and where its class index is stored: ``Example.labels[-1]``).

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
import hashlib
import json
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from ember import EmberError
from ember.engine import metrics as M
from ember.engine.data import (
    IGNORE,
    DataConfig,
    DataReport,
    Datasets,
    Example,
    _Bad,
    _Reader,
    _type_name,
    load_datasets,
    read_lines,
    with_system_prompt,
)
from ember.engine.datafiles import iter_items
from ember.engine.distributed import DistInfo
from ember.engine.evaluation import GenerationResult, scored_batches
from ember.engine.hfdatasets import class_names, class_remap
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


def infer_labels(paths, field: str = "label") -> tuple[str, ...]:
    """datasets' ``ClassLabel`` names of ``field`` (``hfdatasets.class_names``), else the sorted
    distinct labels of the data files of any kind data.train reads (integers: ``"0" ..
    str(max)``). Lines that do not parse are left to the data loader to report."""
    if (classes := class_names(paths, field)) and len(classes) > 1:
        return classes
    names, indices, others = set(), set(), {}
    for path in paths:
        try:
            lines = list(iter_items(Path(path)))
        except OSError as e:
            raise EmberError(
                f"{path}: cannot read the training file to find the labels ({e})"
            ) from None
        for raw in lines:
            try:
                obj = json.loads(raw.decode("utf-8-sig"))
            except (ValueError, RecursionError):  # (a number past json's digit limit too)
                continue
            v = obj.get(field) if isinstance(obj, dict) else None
            if isinstance(v, str) and v:
                names.add(v)
            elif isinstance(v, int) and not isinstance(v, bool) and v >= 0:
                indices.add(v)
            elif v is not None:  # left to the reader (a bad line); named if nothing else is
                others[_type_name(v)] = others.get(_type_name(v), 0) + 1
    where = ", ".join(map(str, paths))
    if names and indices:
        raise EmberError(
            f"{where}: the {field!r} values mix names and indices; list the class "
            "names in order in [head] labels"
        )
    labels = (
        tuple(sorted(names))
        if names
        else tuple(str(i) for i in range(max(indices, default=-1) + 1))
    )
    if len(labels) < 2:
        kinds = ", ".join(f"{n} {t}" for t, n in sorted(others.items()))
        hint = (
            f"the other {field!r} values ({kinds}) are neither class names (strings) nor "
            'indices (integers >= 0): write the classes as strings (e.g. "true" / "false"), '
            'or train numeric targets with head.type = "regression"'
            + ("; each line has one class (multi-label classification is not supported)"
               if "array" in others else "")
            if others
            else "check the field name (head.label_field) or list the names in [head] labels"
        )
        raise EmberError(
            f"{where}: found {len(labels)} distinct {field!r} value(s) "
            f"{list(labels)}; a classifier needs at least two: {hint}"
        )
    return labels


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


# --- data ----------------------------------------------------------------------------------------


def strip_pad(ids: list[int], pad: int | None) -> list[int]:
    """``ids`` without trailing ``pad`` tokens (where the head pools: the last real token)."""
    n = len(ids)
    while n and ids[n - 1] == pad:
        n -= 1
    return ids[:n]


class _ClassReader(_Reader):
    def __init__(self, path: Path, cfg: DataConfig, tokenizer, labels, field: str, pad):
        super().__init__(path, cfg, tokenizer)
        self.labels, self.field, self.pad = tuple(labels), field, pad
        self.index = {name: i for i, name in enumerate(self.labels)}
        self.remap = class_remap(path, field, self.labels)  # datasets ClassLabel indices

    def _label(self, obj: dict) -> int:
        if self.field not in obj:
            raise _Bad(
                "missing field", f"missing field {self.field!r} (keys present: {sorted(obj)})"
            )
        v = self.remap(obj[self.field])
        if isinstance(v, int) and not isinstance(v, bool):
            if not 0 <= v < len(self.labels):
                raise _Bad(
                    "unknown label",
                    f"label index {v} out of range for "
                    f"{len(self.labels)} labels {list(self.labels)}",
                )
            return v
        if not isinstance(v, str):
            raise _Bad(
                "wrong type",
                f"field {self.field!r} must be a class name (string) or "
                f"index (integer), got {_type_name(v)}",
            )
        if v not in self.index:
            raise _Bad("unknown label", f"unknown label {v!r} (labels: {', '.join(self.labels)})")
        return self.index[v]

    def encode(self, line: str) -> tuple[list[int], int]:
        rec = self.record(line)  # validates text / messages; fixes self.fmt on the first line
        if self.fmt not in ("text", "messages", "sharegpt"):
            raise EmberError(
                f'{self.path}: a classification file holds {{"text", '
                f'"{self.field}"}} or {{"messages", "{self.field}"}} lines, '
                f"not {self.fmt} lines"
            )
        label = self._label(json.loads(line))
        enc = self.enc
        if self.fmt == "text":
            ids = enc._enc(rec, True)  # as tokenizer(text) for an HF classifier
        elif not enc.has_template:
            raise EmberError(
                "the messages format needs a tokenizer with a chat template; this "
                'one has none (use {"text", "label"} lines instead)'
            )
        else:
            rec = with_system_prompt(self.cfg, rec)
            ids = enc._enc(enc._render(rec))
        return ids, label

    def example(self, lineno: int, raw: bytes) -> Example | None:
        rep, where = self.report, self.where(lineno)
        line = self.text(lineno, raw)
        if line is None:
            return None
        try:
            ids, label = self.encode(line)
            ids = strip_pad(ids, self.pad)
            if not ids:
                raise _Bad("empty text", "no tokens besides padding")
        except _Bad as e:
            self.bad(lineno, e.kind, e.why)
            return None
        m = self.cfg.max_seq_len
        if len(ids) > m:
            what = f"{where}: {len(ids)} tokens > max_seq_len {m}"
            if self.cfg.truncation == "drop":
                rep.dropped_too_long += 1
                rep.note("too long", f"{what} (dropped)")
                return None
            if self.cfg.truncation == "truncate_right":
                ids = strip_pad(ids[:m], self.pad) or ids[:1]
            else:
                keep_bos = int(self._bos(ids) is not None)  # data._Reader._bos
                ids = ids[:keep_bos] + ids[len(ids) - m + keep_bos :]
            rep.truncated += 1
            rep.note("too long", f"{what} ({self.cfg.truncation.replace('_', ' ')})")
        key = hashlib.blake2b(line.strip().encode(), digest_size=16).hexdigest()
        return Example(ids, [IGNORE] * (len(ids) - 1) + [label], where, 0, self.labels[label], key)


def load_labelled(
    path, cfg: DataConfig, tokenizer, labels, field: str = "label", pad: int | None = None
):
    """(examples, DataReport) of one labelled JSONL file; bad lines as ``data.load_examples``."""
    return read_head_file(
        path, lambda p: _ClassReader(p, cfg, tokenizer, labels, field, pad), f" + {field}"
    )


def read_head_file(path, make_reader, what: str = ""):
    """(examples, DataReport) of one file read by a head's reader (``data.read_lines``); an
    empty file or one without a usable line is an error that lists the problems."""
    reader, examples = read_lines(path, make_reader)
    rep = reader.report
    rep.format = f"{reader.fmt or reader.cfg.format}{what}"
    rep.examples = len(examples)
    rep.tokens = sum(len(e) for e in examples)
    rep.loss_tokens = sum(len(e.doc_lengths) for e in examples)
    if rep.lines == rep.blank_lines:
        raise EmberError(f"{path}: the file is empty; expected one JSON object per line")
    if not examples:
        raise EmberError(
            f"{path}: no usable examples: all {rep.lines - rep.blank_lines} lines "
            "are bad or too long\n" + "\n".join(f"  {p}" for p in rep.problems)
        )
    return examples, rep


def load_labelled_datasets(
    cfg: DataConfig, tokenizer, labels, field: str = "label", pad: int | None = None, load=None
) -> Datasets:
    """Train / validation / test of a head's files; ``load(path) -> (examples, report)``
    (default: ``load_labelled``). The splits are made as ``data.load_datasets`` makes them, so
    several training files mix by ``data.mix`` and several validation files (or
    ``data.val_fraction`` of several training files) are scored per source."""
    load_file = load or (lambda p: load_labelled(p, cfg, tokenizer, labels, field, pad))
    return load_datasets(cfg, tokenizer, lambda path, _cfg, _tok: load_file(path))


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
