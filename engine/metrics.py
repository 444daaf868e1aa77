"""Task metrics on generated text: exact match, accuracy, macro F1, JSON record/field matches.

Every metric takes predictions and references (lists of str) and returns a float in [0, 1].
Text is compared after ``normalize`` (surrounding whitespace stripped, inner runs of whitespace
collapsed), so a trailing newline or a leading space never decides a score.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence

from ember import EmberError


def normalize(text: str) -> str:
    return " ".join(text.split())


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    _check(predictions, references)
    pairs = zip(predictions, references, strict=True)
    return sum(normalize(p) == normalize(r) for p, r in pairs) / len(references)


def accuracy(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Label accuracy: exact match of normalized, case-folded labels."""
    _check(predictions, references)
    return sum(normalize(p).casefold() == normalize(r).casefold()
               for p, r in zip(predictions, references, strict=True)) / len(references)


def macro_f1(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Macro F1 of text labels (normalized, case-folded) as scikit-learn's
    ``f1_score(average="macro")`` computes it: averaged over every label that is a reference or
    a prediction, so a prediction outside the reference labels is a miss for its reference's
    label and a label of F1 0 in the average (it was left out of the average)."""
    _check(predictions, references)
    preds = [normalize(p).casefold() for p in predictions]
    refs = [normalize(r).casefold() for r in references]
    return _mean_f1(sorted(set(refs) | set(preds)), preds, refs)


def class_macro_f1(predictions: Sequence[int], references: Sequence[int]) -> float:
    """Macro F1 of a classifier's class indices as scikit-learn's ``f1_score(average="macro")``
    computes it: averaged over every class that is a reference or a prediction (a class the
    head predicts but the split never holds counts, with F1 0)."""
    _check(predictions, references)
    return _mean_f1(sorted(set(references) | set(predictions)), predictions, references)


def _mean_f1(labels, preds, refs) -> float:
    scores = []
    for label in labels:
        tp = sum(p == label and r == label for p, r in zip(preds, refs, strict=True))
        fp = sum(p == label and r != label for p, r in zip(preds, refs, strict=True))
        fn = sum(p != label and r == label for p, r in zip(preds, refs, strict=True))
        scores.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return sum(scores) / len(scores)


def _json(text: str):
    try:
        return json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        return None


def _same(a, b) -> bool:
    """JSON equality: a boolean is not a number (Python's ``True == 1``, ``False == 0.0``)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(map(_same, a, b))
    return a == b


def json_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    """The prediction parses as JSON and equals the reference's JSON (key order and spacing
    free)."""
    _check(predictions, references)
    hits = 0
    for p, r in zip(predictions, references, strict=True):
        ref = _json(r)
        if ref is None:
            raise EmberError(f"json_match: reference is not JSON: {r[:80]!r}")
        hits += _same(_json(p), ref)
    return hits / len(references)


def field_accuracy(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Mean over records of the fraction of reference fields the prediction got right (an
    unparsable prediction gets none)."""
    _check(predictions, references)
    total = 0.0
    for p, r in zip(predictions, references, strict=True):
        ref = _json(r)
        if not isinstance(ref, dict) or not ref:
            raise EmberError(f"field_accuracy: reference is not a JSON object: {r[:80]!r}")
        pred = _json(p)
        if isinstance(pred, dict):
            total += sum(k in pred and _same(pred[k], v) for k, v in ref.items()) / len(ref)
    return total / len(references)


METRICS: dict[str, Callable[[Sequence[str], Sequence[str]], float]] = {
    "exact_match": exact_match,
    "accuracy": accuracy,
    "f1": macro_f1,
    "macro_f1": macro_f1,
    "json_match": json_match,
    "field_accuracy": field_accuracy,
}


# Scores of one-output heads (``engine/reward.py``), computed on numbers, not text: a reward
# model's pair accuracy and mean margin, a regression head's errors and correlation.
HEAD_SCORES = ("margin", "mse", "rmse", "pearson")
LOWER_IS_BETTER = ("val_loss", "perplexity", "mse", "rmse")  # early stopping's "auto" mode


def compute(names: Sequence[str], predictions: Sequence[str], references: Sequence[str]
            ) -> dict[str, float]:
    unknown = [n for n in names if n not in METRICS]
    if unknown:
        raise EmberError(f"unknown metric {unknown[0]!r}; known: {', '.join(METRICS)}")
    return {n: METRICS[n](predictions, references) for n in names}


def perplexity(mean_loss: float) -> float:
    """exp(loss), inf instead of an overflow."""
    return math.exp(mean_loss) if mean_loss < 700 else math.inf


def _check(predictions: Sequence[str], references: Sequence[str]) -> None:
    if len(predictions) != len(references):
        raise EmberError(f"{len(predictions)} predictions for {len(references)} references")
    if not references:
        raise EmberError("no examples to score")
