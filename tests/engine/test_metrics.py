"""Text metrics against their reference definitions: scikit-learn's ``f1_score(average="macro")``
and ``accuracy_score`` (written out from sklearn's documentation when sklearn is not installed)."""

from __future__ import annotations

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
