"""Text metrics against their reference definitions: scikit-learn's ``f1_score(average="macro")``
and ``accuracy_score`` (written out from sklearn's documentation when sklearn is not installed)."""

from __future__ import annotations

import math

import pytest

from ember.engine import metrics as M


def sklearn_macro_f1(y_true: list[str], y_pred: list[str]) -> float:
    """sklearn.metrics.f1_score(y_true, y_pred, average="macro"), zero_division=0: the labels
    are ``unique_labels(y_true, y_pred)`` (a label only ever predicted counts); per label
    precision tp / (tp + fp), recall tp / (tp + fn) (0 where the denominator is 0), F1 the
    harmonic mean (0 where precision + recall is 0); the unweighted mean over the labels."""
    try:
        from sklearn.metrics import f1_score
    except ImportError:
        scores = []
        for label in sorted(set(y_true) | set(y_pred)):
            tp = sum(t == label and p == label for t, p in zip(y_true, y_pred, strict=True))
            n_pred = sum(p == label for p in y_pred)
            n_true = sum(t == label for t in y_true)
            precision = tp / n_pred if n_pred else 0.0
            recall = tp / n_true if n_true else 0.0
            scores.append(0.0 if precision + recall == 0
                          else 2 * precision * recall / (precision + recall))
        return sum(scores) / len(scores)
    return float(f1_score(y_true, y_pred, average="macro", zero_division=0))


CASES = [
    (["a", "b", "b"], ["a", "b", "c"]),  # "c" only predicted: a label of F1 0 in the average
    (["a"], ["x"]),
    (["pos", "pos", "pos"], ["pos", "pos", "pos"]),  # one class only
    (["pos", "pos", "neg", "neu"], ["neg", "neg", "neg", "other"]),
    (["cat", "dog"], ["cat", "cat"]),
]


@pytest.mark.parametrize(("refs", "preds"), CASES)
def test_macro_f1_is_sklearns_macro_f1(refs, preds):
    """Labels seen only in predictions enter the average with F1 0, as in sklearn (Ember
    averaged over the reference labels only: 0.833 for the first case, sklearn 0.556)."""
    want = sklearn_macro_f1(refs, preds)
    assert M.compute(["macro_f1", "f1"], preds, refs) == {
        "macro_f1": pytest.approx(want, abs=1e-12), "f1": pytest.approx(want, abs=1e-12)}
    # text labels are compared normalized and case-folded, the same labels to sklearn
    spaced = [f"  {p.upper()}\n" for p in preds]
    assert M.macro_f1(spaced, refs) == pytest.approx(want, abs=1e-12)
    ints = {s: i for i, s in enumerate(sorted(set(refs) | set(preds)))}
    assert M.class_macro_f1([ints[p] for p in preds], [ints[r] for r in refs]) == pytest.approx(
        want, abs=1e-12)


# The official SQuAD v1.1 evaluation script (evaluate-v1.1.py), verbatim but for names.
def squad_normalize_answer(s):
    import re
    import string

    def remove_articles(text):
        return re.sub(r"\b(a|an|the)\b", " ", text)

    def white_space_fix(text):
        return " ".join(text.split())

    def remove_punc(text):
        exclude = set(string.punctuation)
        return "".join(ch for ch in text if ch not in exclude)

    def lower(text):
        return text.lower()

    return white_space_fix(remove_articles(remove_punc(lower(s))))


def squad_f1_score(prediction, ground_truth):
    from collections import Counter

    prediction_tokens = squad_normalize_answer(prediction).split()
    ground_truth_tokens = squad_normalize_answer(ground_truth).split()
    common = Counter(prediction_tokens) & Counter(ground_truth_tokens)
    num_same = sum(common.values())
    if num_same == 0:
        return 0
    precision = 1.0 * num_same / len(prediction_tokens)
    recall = 1.0 * num_same / len(ground_truth_tokens)
    return (2 * precision * recall) / (precision + recall)


def squad_exact_match_score(prediction, ground_truth):
    return squad_normalize_answer(prediction) == squad_normalize_answer(ground_truth)


SQUAD_PAIRS = [  # (prediction, reference)
    ("The Eiffel Tower!", "eiffel tower"), ("  Paris\n", "paris."), ("an apple a day", "apple day"),
    ("theater", "the ater"), ("", ""), ("   ", "Paris"), ("Paris", ""), ("1,000", "1000"),
    ("3.14 meters", "3 14 meters"), ("Paris…", "Paris"), ("«Paris»", "Paris"),
    ("the the cat cat", "cat"), ("cat dog dog", "dog cat mouse"), ("ÉCOLE", "école"),
    ("New York-based", "new yorkbased"), ("A", "a"), ("Los Angeles, CA", "los angeles"),
]


def test_squad_metrics_are_the_official_v1_1_script():
    """squad_exact_match and squad_f1 against the official SQuAD v1.1 script's functions, on
    case, punctuation (ASCII only, as the script: '…' and '«»' stay), articles (whole words
    only), numbers, empty and whitespace-only answers (F1 0, as v1.1), repeated tokens."""
    preds, refs = zip(*SQUAD_PAIRS, strict=True)
    want_em = sum(map(squad_exact_match_score, preds, refs)) / len(refs)
    want_f1 = sum(map(squad_f1_score, preds, refs)) / len(refs)
    got = M.compute(["squad_exact_match", "squad_f1"], preds, refs)
    assert got == {"squad_exact_match": pytest.approx(want_em, abs=1e-12),
                   "squad_f1": pytest.approx(want_f1, abs=1e-12)}
    for p, r in SQUAD_PAIRS:  # example by example
        assert M.squad_normalize(p) == squad_normalize_answer(p)
        assert M.squad_f1([p], [r]) == pytest.approx(squad_f1_score(p, r), abs=1e-12), (p, r)
        assert M.squad_exact_match([p], [r]) == float(squad_exact_match_score(p, r)), (p, r)
    # the plain exact_match counts case and punctuation (whitespace only is normalized)
    assert M.exact_match(["The Eiffel Tower!", " eiffel  tower "], ["eiffel tower"] * 2) == 0.5


def test_json_metrics_score_what_python_json_cannot_read_as_a_miss():
    """A prediction Python's json.loads refuses is a miss, whatever the exception: a run of
    digits longer than int conversion allows raised ValueError (not JSONDecodeError) out of
    the scoring, as did one nested past the recursion limit before; a reference json.loads
    refuses is not JSON."""
    import json
    import sys

    huge = "7" * (sys.get_int_max_str_digits() + 1)
    for text in (huge, '{"a": ' + huge + "}", "[" * 100_000):
        with pytest.raises((ValueError, RecursionError)):
            json.loads(text)  # the oracle refuses it
    preds = [huge, '{"a": ' + huge + "}", "[" * 100_000, '{"a": 1}']
    refs = ['{"a": 1}'] * 4
    assert M.compute(["json_match", "field_accuracy"], preds, refs) == {
        "json_match": 0.25, "field_accuracy": 0.25}
    assert "not JSON" in M.reference_error("json_match", huge)


@pytest.mark.parametrize("pred,ref,hit", [
    ("NaN", "NaN", True),  # NaN != NaN in Python: was never a match
    ('{"a": [NaN, 1]}', '{"a": [NaN, 1.0]}', True),
    ("12345678901234567890.0", "12345678901234567890", True),  # fp64 rounds the float: was a miss
    ("12345678901234567891", "12345678901234567890.0", False),
    ("[1, 0.1, 10E-1]", "[1.0, 0.10, 1]", True),
    ("Infinity", "Infinity", True),
    ("1e400", "Infinity", False),  # a finite number, not infinity
    ("0.1", "0.1000000000000000055511151231257827", False),  # float(...) equal, values not
    ("true", "1", False),
])
def test_json_numbers_match_by_the_value_written(pred, ref, hit):
    """The same JSON number written two ways matches, as the decimals Python's json reads with
    ``parse_float=Decimal`` compare (and NaN matches NaN): the oracle is that reading."""
    import json
    from decimal import Decimal

    def value(text):
        return json.loads(text, parse_float=Decimal, parse_constant=Decimal)

    def same(a, b):  # Decimal('NaN') != Decimal('NaN'): the written text is what matches
        if isinstance(a, list):
            return len(a) == len(b) and all(map(same, a, b))
        if isinstance(a, dict):
            return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
        if isinstance(a, Decimal) and a.is_nan():
            return isinstance(b, Decimal) and b.is_nan()
        if isinstance(a, bool) or isinstance(b, bool):  # JSON's true is not the number 1
            return type(a) is type(b) and a == b
        return a == b

    assert same(value(pred), value(ref)) == hit
    assert M.json_match([pred], [ref]) == float(hit)
    assert M.field_accuracy(['{"x": ' + pred + "}"], ['{"x": ' + ref + "}"]) == float(hit)


@pytest.mark.parametrize("name", sorted(M.METRICS))
def test_text_metrics_refuse_non_strings_clearly(name):
    """A number or None for a text used to raise AttributeError / TypeError from inside the
    metric ('int' object has no attribute 'split')."""
    text = '{"a": 1}'
    with pytest.raises(M.EmberError, match="a reference is int 1"):
        M.compute([name], [text], [1])
    with pytest.raises(M.EmberError, match="a prediction is NoneType None"):
        M.compute([name], [None], [text])
    assert M.compute([name], [text], [text])[name] == 1.0


def test_perplexity_of_a_nan_loss_is_nan():
    """exp(loss) as transformers' run_clm reports it: a NaN val loss (a diverged model) gives a
    NaN perplexity, not inf (which reads as an overflow of a finite loss); a huge loss is inf."""
    assert math.isnan(M.perplexity(float("nan")))
    assert M.perplexity(800.0) == math.inf and M.perplexity(float("inf")) == math.inf
    assert M.perplexity(1.0) == math.exp(1.0)
