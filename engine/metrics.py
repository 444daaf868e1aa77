"""Task metrics on generated text: exact match, accuracy, macro F1, SQuAD's exact match and
token F1, JSON record/field matches.

Every metric takes predictions and references (lists of str) and returns a float in [0, 1],
the mean over examples except for the macro F1s:

- ``exact_match``: the text equals the reference after ``normalize`` (surrounding whitespace
  stripped, inner runs collapsed); case and punctuation count (HF evaluate's ``exact_match``
  with whitespace normalized, not SQuAD's normalized one: that is ``squad_exact_match``).
- ``accuracy``: as exact_match, case-folded (a label task's accuracy, sklearn's
  ``accuracy_score`` of the normalized labels).
- ``macro_f1`` (alias ``f1``): sklearn's ``f1_score(average="macro")`` of the normalized,
  case-folded texts as labels. Not SQuAD's token F1: that is ``squad_f1``.
- ``squad_exact_match`` / ``squad_f1``: the official SQuAD v1.1 script's exact match and
  token-overlap F1 after its ``normalize_answer`` (lower case, ASCII punctuation removed,
  articles a/an/the dropped, whitespace collapsed); an empty answer scores 0 in F1, as v1.1.
- ``json_match`` / ``field_accuracy``: see their docstrings.
"""

from __future__ import annotations

import decimal
import json
import math
import re
import string
from collections import Counter
from collections.abc import Callable, Sequence

from ember import EmberError


def normalize(text: str) -> str:
    return " ".join(text.split())


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    return _mean_equal(normalize, predictions, references)


def accuracy(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Label accuracy: exact match of normalized, case-folded labels."""
    return _mean_equal(lambda t: normalize(t).casefold(), predictions, references)


def _mean_equal(norm: Callable[[str], str], predictions: Sequence[str],
                references: Sequence[str]) -> float:
    """The fraction of predictions equal to their reference after ``norm``."""
    _check_text(predictions, references)
    pairs = zip(predictions, references, strict=True)
    return sum(norm(p) == norm(r) for p, r in pairs) / len(references)


def macro_f1(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Macro F1 of text labels (normalized, case-folded) as scikit-learn's
    ``f1_score(average="macro")`` computes it: averaged over every label that is a reference or
    a prediction, so a prediction outside the reference labels is a miss for its reference's
    label and a label of F1 0 in the average (it was left out of the average)."""
    _check_text(predictions, references)
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


_PUNCTUATION = frozenset(string.punctuation)


def squad_normalize(text: str) -> str:
    """SQuAD v1.1's ``normalize_answer``: lower case, no ASCII punctuation, no articles, single
    spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def squad_exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    """SQuAD v1.1's exact match: equal after ``squad_normalize``."""
    return _mean_equal(squad_normalize, predictions, references)


def _token_f1(prediction: str, reference: str) -> float:
    pred, ref = squad_normalize(prediction).split(), squad_normalize(reference).split()
    same = sum((Counter(pred) & Counter(ref)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)


def squad_f1(predictions: Sequence[str], references: Sequence[str]) -> float:
    """SQuAD v1.1's F1: the mean over examples of the token-overlap F1 (bags of words after
    ``squad_normalize``)."""
    _check_text(predictions, references)
    return sum(map(_token_f1, predictions, references)) / len(references)


def _json(text: str):
    """The JSON value of ``text``, None when it is not JSON to Python's ``json``: a syntax error,
    nesting past the recursion limit, or an integer of more digits than Python converts (a
    ValueError, not a JSONDecodeError: a model that repeats a digit crashed the scoring)."""
    try:
        # Fractions and exponents as exact decimals, so numbers compare by the value written
        # (a float would round 12345678901234567890.0 away from the integer 12345678901234567890).
        return json.loads(text, parse_float=decimal.Decimal)
    except (ValueError, RecursionError):  # JSONDecodeError is a ValueError
        return None


def _same(a, b) -> bool:
    """JSON equality of two values ``_json`` read. Numbers are equal when the decimal numbers
    written are (``1``, ``1.0``, ``1e0`` and ``10E-1`` match; so do ``12345678901234567890`` and
    ``12345678901234567890.0``, which fp64 would not tell apart from ...168.0); ``NaN`` matches
    ``NaN`` (the same JSON text; Python's ``nan != nan``), ``Infinity`` itself. A boolean is not
    a number (Python's ``True == 1``, ``False == 0.0``)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if _is_nan(a) or _is_nan(b):
        return _is_nan(a) and _is_nan(b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(map(_same, a, b))
    return a == b


def _is_nan(x) -> bool:
    return isinstance(x, float | decimal.Decimal) and x != x


def reference_error(name: str, reference: str) -> str | None:
    """Why metric ``name`` cannot score ``reference`` (None: it can): json_match needs a JSON
    reference, field_accuracy a JSON object with fields. Checked before generating
    (``evaluation.generation_examples``), so a bad reference costs no generation or training."""
    if name not in ("json_match", "field_accuracy"):
        return None
    ref = _json(reference)
    if name == "json_match" and ref is None:
        return (f"json_match needs JSON references, this one is not JSON: {reference[:80]!r}; "
                "fix it, or score the file without json_match")
    if name == "field_accuracy" and not (isinstance(ref, dict) and ref):
        what = "an empty JSON object" if ref == {} else "not a JSON object"
        return (f"field_accuracy scores the fields of JSON object references, this one is "
                f"{what}: {reference[:80]!r}; fix it, or use json_match (any JSON value)")
    return None


def _checked_json(name: str, reference: str):
    why = reference_error(name, reference)
    if why is not None:
        raise EmberError(why)
    return _json(reference)


def json_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    """The prediction parses as JSON and equals the reference's JSON (key order and spacing
    free; numbers by value, see ``_same``)."""
    _check_text(predictions, references)
    hits = 0
    for p, r in zip(predictions, references, strict=True):
        hits += _same(_json(p), _checked_json("json_match", r))
    return hits / len(references)


def field_accuracy(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Mean over records of the fraction of reference fields the prediction got right (equal as
    in ``json_match``; an unparsable prediction gets none)."""
    _check_text(predictions, references)
    total = 0.0
    for p, r in zip(predictions, references, strict=True):
        ref = _checked_json("field_accuracy", r)
        pred = _json(p)
        if isinstance(pred, dict):
            total += sum(k in pred and _same(pred[k], v) for k, v in ref.items()) / len(ref)
    return total / len(references)


METRICS: dict[str, Callable[[Sequence[str], Sequence[str]], float]] = {
    "exact_match": exact_match,
    "accuracy": accuracy,
    "f1": macro_f1,
    "macro_f1": macro_f1,
    "squad_exact_match": squad_exact_match,
    "squad_f1": squad_f1,
    "json_match": json_match,
    "field_accuracy": field_accuracy,
}


# Scores of one-output heads (``engine/reward.py``), computed on numbers, not text: a reward
# model's pair accuracy and mean margin, a regression head's errors and correlation.
HEAD_SCORES = ("margin", "mse", "rmse", "pearson")
LOWER_IS_BETTER = ("val_loss", "perplexity", "mse", "rmse")  # early stopping's "auto" mode


def check_names(names: Sequence[str], option: str | None = None) -> None:
    """Refuse an unknown metric name; ``option`` names the comma-separated CLI flag it came from."""
    unknown = [n for n in names if n not in METRICS]
    if unknown:
        known = (f"{option} takes {', '.join(METRICS)} (comma-separated)" if option
                 else f"known: {', '.join(METRICS)}")
        raise EmberError(f"unknown metric {unknown[0]!r}; {known}")


def compute(names: Sequence[str], predictions: Sequence[str], references: Sequence[str]
            ) -> dict[str, float]:
    check_names(names)
    return {n: METRICS[n](predictions, references) for n in names}


def perplexity(mean_loss: float) -> float:
    """exp(loss), inf instead of an overflow; NaN for a NaN loss (a diverged model)."""
    return math.inf if mean_loss >= 700 else math.exp(mean_loss)


def _check_text(predictions: Sequence[str], references: Sequence[str]) -> None:
    _check(predictions, references)
    for what, texts in (("prediction", predictions), ("reference", references)):
        for t in texts:
            if not isinstance(t, str):
                raise EmberError(f"text metrics score strings; a {what} is {type(t).__name__} "
                                 f"{t!r}: pass the texts (e.g. json.dumps(value) for JSON)")


def _check(predictions: Sequence, references: Sequence) -> None:
    if len(predictions) != len(references):
        raise EmberError(f"{len(predictions)} predictions for {len(references)} references")
    if not references:
        raise EmberError("no examples to score")
