"""Label inference of a classification run (``classification_data.infer_labels``) on many rows:
one streaming pass over the training files, the same order rule (sorted names, ``0..max``
indices) as on a few."""

from __future__ import annotations

import json
import tracemalloc

import pytest

from ember import EmberError
from ember.engine.classification_data import infer_labels


def test_infer_labels_order_across_files_is_sorted_not_first_seen(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text("".join(json.dumps({"text": "t", "label": n}) + "\n" for n in ("pos", "neg")))
    b.write_text(json.dumps({"text": "t", "label": "neu"}) + "\n")
    assert infer_labels([a, b]) == infer_labels([b, a]) == ("neg", "neu", "pos")
    a.write_text("".join(json.dumps({"text": "t", "label": i}) + "\n" for i in (3, 1)))
    b.write_text(json.dumps({"text": "t", "label": 0}) + "\n")
    assert infer_labels([a, b]) == ("0", "1", "2", "3")  # 0..max, 2 in no row
    b.write_text(json.dumps({"text": "t", "label": "x"}) + "\n")  # the mix is seen across files
    with pytest.raises(EmberError, match="mix names and indices"):
        infer_labels([a, b])


def test_infer_labels_streams_the_file(tmp_path):
    """Only the distinct labels are kept: the peak is far below the file's lines as a list
    (before: ~120 MB of Python objects for 1M short rows; here 20k rows, ~2 MB of lines)."""
    path = tmp_path / "big.jsonl"
    rows = (
        json.dumps({"text": f"row {i} of a longer review text", "label": f"c{i % 3}"})
        for i in range(20_000)
    )
    path.write_text("\n".join(rows) + "\n")
    tracemalloc.start()
    try:
        labels = infer_labels([path])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert labels == ("c0", "c1", "c2")
    assert peak < 512 * 1024, peak


def test_sparse_integer_labels_are_refused_not_made_into_a_huge_head(tmp_path):
    """Integer labels are class indices (classes "0" .. max). Ids such as 1001 and 20000002 made
    20,000,003 classes (a 1.4 GB label tuple after 48 s, then a head too big to allocate), where
    transformers' run_classification takes the 2 sorted distinct values. Now an error that says
    how to name them; a few classes missing from the training data still count."""
    path = tmp_path / "ids.jsonl"
    path.write_text("".join(json.dumps({"text": "t", "label": i}) + "\n" for i in (1001, 20000002)))
    with pytest.raises(EmberError, match=r"up to 20000002 but only 2 distinct.*as strings"):
        infer_labels([path])
    path.write_text("".join(json.dumps({"text": "t", "label": i}) + "\n" for i in (0, 3, 3)))
    assert infer_labels([path]) == ("0", "1", "2", "3")  # 1 and 2 absent from train: kept


def test_empty_string_labels_are_named_as_such(tmp_path):
    """An empty label was counted as a "string" among the values that are "neither class names
    (strings) nor indices": the error contradicted itself."""
    path = tmp_path / "e.jsonl"
    path.write_text("".join(json.dumps({"text": "t", "label": v}) + "\n" for v in ("", "", "x")))
    with pytest.raises(EmberError, match=r"\(2 empty string\) are neither"):
        infer_labels([path])
