"""Rolling document perplexity (engine/rolling.py; ember eval on {"text"} lines). Oracles:
lm-eval 0.4.13's window rule (``_lmeval_windows``, its ``get_rolling_token_windows`` with
``context_len=1`` and ``make_disjoint_window``, copied), its metric aggregations, and
transformers' log-probabilities; lm-eval itself gives the same numbers (tools/check_lmeval.py)."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

from ember.engine.choices import score_choices
from ember.engine.cli import main
from ember.engine.data import DataConfig
from ember.engine.rolling import load_documents, rolling_metrics, rolling_windows
from ember.models.loading import load_pretrained
from tests.engine._tiny import make_tiny_model, write_jsonl

DOCS = ["say red dog", "say red dog -> red " * 6 + "blue cat é", "  one two\n\nthree  "]


def _lmeval_windows(token_list, prefix_token, max_seq_len):
    """lm_eval.utils.get_rolling_token_windows(context_len=1) + make_disjoint_window, as
    (context, continuation) pairs."""
    pred_len, predicted = max_seq_len, 0
    first = min(max_seq_len, len(token_list))
    out = [([prefix_token] + token_list[: first - 1], token_list[:first])]
    predicted += first
    while predicted < len(token_list):
        n = min(len(token_list) - predicted, pred_len)
        end = predicted + n
        out.append((token_list[end - max_seq_len - 1 : end - 1], token_list[end - n : end]))
        predicted += n
    return [(a[: len(a) - (len(b) - 1)], b) for a, b in out]


@pytest.mark.parametrize("n, window", [(1, 1), (1, 4), (7, 1), (7, 3), (9, 3), (10, 4), (4, 4)])
def test_windows_are_lm_evals(n, window):
    tokens = list(range(100, 100 + n))
    ours = rolling_windows(tokens, 7, window)
    want = _lmeval_windows(tokens, 7, window)
    # lm-eval's model input: (context + continuation)[-(max_len + 1):][:-1]
    assert [(inp, pred) for inp, pred in ours] == [
        ((c + p)[-(window + 1) :][:-1], p) for c, p in want
    ]
    assert sum((p for _, p in ours), []) == tokens and all(len(i) <= window for i, _ in ours)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("roll") / "model", seed=5)


def test_documents_score_whole_in_windows(base, tmp_path, capsys):
    """Each document's log-likelihood is lm-eval's: transformers' log-probabilities of every
    token, the first after EOS (no BOS here), over 5-token windows; the metrics are lm-eval's
    weighted_perplexity (words, bytes) and bits_per_byte."""
    from transformers import AutoModelForCausalLM

    model, tok = load_pretrained(base, "float32", "cpu")
    path = write_jsonl(tmp_path / "docs.jsonl", [{"text": d} for d in DOCS])
    examples, words, nbytes, rep = load_documents(path, DataConfig(max_seq_len=5), tok)
    assert rep.examples == 3 and words == [3, 33, 5] and nbytes == [11, 125, 18]
    got = [float(s.double().sum()) for s in score_choices(model, examples, 64, "cpu")]
    hf = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    want = []
    for d in DOCS:
        total = 0.0
        for ctx, cont in _lmeval_windows(
            tok.encode(d, add_special_tokens=False), tok.eos_token_id, 5
        ):
            inp = (ctx + cont)[-6:][:-1]
            with torch.no_grad():
                lp = hf(torch.tensor([inp])).logits[0].log_softmax(-1)
            total += sum(float(lp[len(inp) - len(cont) + j, t]) for j, t in enumerate(cont))
        want.append(total)
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=1e-5, atol=1e-4)
    ll = sum(want)
    m = rolling_metrics(got, words, nbytes)
    assert words == [len(re.split(r"\s+", d)) for d in DOCS]  # lm-eval's count_words
    assert m["word_perplexity"] == pytest.approx(math.exp(-ll / 41), rel=1e-5)
    assert m["byte_perplexity"] == pytest.approx(math.exp(-ll / 154), rel=1e-5)
    assert m["bits_per_byte"] == pytest.approx(-ll / 154 / math.log(2), rel=1e-5)
    # ember eval on a text file adds them to loss and perplexity, in the model's context (256)
    # when data.max_seq_len (2048) is longer
    capsys.readouterr()
    assert main(["eval", str(base), "--raw", "--data", path, "--device", "cpu"]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["rolling_window"] == 256 and {"loss", "perplexity"} <= row.keys()
    whole = load_documents(path, DataConfig(max_seq_len=256), tok)[0]
    full = rolling_metrics(
        [float(s.double().sum()) for s in score_choices(model, whole, 512, "cpu")], words, nbytes
    )
    for k, v in full.items():
        assert row[k] == pytest.approx(v, rel=1e-5)


def test_a_file_of_other_lines_is_refused(base, tmp_path):
    from ember import EmberError

    _, tok = load_pretrained(base, "float32", "cpu")
    path = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "a", "completion": "b"}])
    with pytest.raises(EmberError, match=r"rolling perplexity scores \{\"text\""):
        load_documents(path, DataConfig(bad_lines="error"), tok)
