"""CodeLlama's fill token (<FILL_ME>) in training and evaluation data, against transformers 5's
``AutoTokenizer`` on a CodeLlama folder built at test time (``test_tokenizer_infill._load``): a
whole text holding it once is an infilling prompt, as ``tokenizer(text)`` encodes it; twice, a
bad line that names the line, whichever reader and tokenizer; a text whose tokens a loss mask or
a prompt / answer boundary follows (prompt/completion, chats, preference pairs, multiple choice)
holding it in its rendered text is a bad line."""

from __future__ import annotations

import json

import pytest
import transformers

from ember import EmberError
from ember.engine.choices import load_choices
from ember.engine.classification_data import load_labelled
from ember.engine.data import DataConfig, load_examples
from ember.engine.encoder import _Encoder
from ember.engine.formats import _Bad
from ember.engine.preference import encode_pair, parse_pair
from ember.engine.rolling import load_documents
from tests.models.test_tokenizer_infill import _load

TWO = "a<FILL_ME>b<FILL_ME>c"
CHAT = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def _cfg(**kw) -> DataConfig:
    return DataConfig(max_seq_len=128, tokens_per_batch=128, bad_lines="skip", **kw)


def _rows(tmp_path, lines: list[dict]):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    return path


@pytest.mark.parametrize(
    "text",
    ["a <FILL_ME>b", "def f(x):\n    <FILL_ME>\n    return y", "a<FILL_ME>", "a <FILL_ME>b</s>"],
)
def test_text_line_eos_goes_where_trl_puts_it(text, tmp_path):
    """TRL's SFTTrainer (``add_eos``, trl/trainer/sft_trainer.py) appends the eos *string* to a
    text that does not end with it and then tokenizes the whole: for an infilling text the eos
    is in the suffix, before ▁<MID> ([0, 500, 202, 129, 502, 129, 57, 1, 501]); Ember put it
    after (..., 57, 501, 1]). A text ending with the eos string gets none more."""
    ours, _ = _load(tmp_path / "t", {})
    (ex,), _ = load_examples(_rows(tmp_path, [{"text": text}]), _cfg(), ours)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "t")
    eos = theirs.eos_token
    assert ex.input_ids == theirs(text if text.endswith(eos) else text + eos)["input_ids"]


def test_two_fill_tokens_are_a_bad_line_for_every_reader(tmp_path):
    """Rolling perplexity and classification crashed on a line with two <FILL_ME> (an error that
    named no line); ``load_examples`` with a transformers CodeLlama tokenizer crashed with its
    bare "too many values to unpack"; each now skips the line as bad."""
    ours, _ = _load(tmp_path / "t", {})
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "t")
    with pytest.raises(ValueError, match="too many values"):
        theirs(TWO)
    path = _rows(tmp_path, [{"text": "fine text"}, {"text": TWO}])
    for tok in (ours, theirs):
        examples, rep = load_examples(path, _cfg(), tok)
        assert (len(examples), rep.bad_lines) == (1, 1)
        assert "<FILL_ME> 2 times" in "\n".join(rep.problems)
    *_, rep = load_documents(path, _cfg(), ours)
    assert rep.bad_lines == 1 and "d.jsonl:2:" in "\n".join(rep.problems)
    path = _rows(tmp_path, [{"text": "fine", "label": "x"}, {"text": TWO, "label": "y"}])
    examples, rep = load_labelled(path, _cfg(), ours, ["x", "y"])
    assert (len(examples), rep.bad_lines) == (1, 1)


def test_one_fill_token_in_a_whole_text_is_an_infilling_prompt(tmp_path):
    """Rolling perplexity and a classification text encode a document as ``tokenizer(text)``."""
    ours, theirs = _load(tmp_path / "t", {})
    text = "a <FILL_ME>b"
    (ex,), _ = load_labelled(_rows(tmp_path, [{"text": text, "label": "x"}]), _cfg(), ours, ["x"])
    assert ex.input_ids == theirs(text)["input_ids"]


def test_pairs_and_choices_refuse_the_fill_token_as_prompt_completion_does(tmp_path):
    """DPO refused a prompt with <FILL_ME>, but CPO / ORPO (which tokenize prompt and
    prompt + answer apart) and multiple choice (context and continuation) encoded it as an
    infilling prompt each, so the answer's boundary fell inside a reordered text."""
    ours, _ = _load(tmp_path / "t", {})
    enc = _Encoder(_cfg(), ours)
    pair = parse_pair({"prompt": "a <FILL_ME> b", "chosen": " c", "rejected": " d"})
    for rule in ("dpo", "cpo"):
        with pytest.raises(_Bad, match="<FILL_ME>"):
            encode_pair(enc, pair, rule)
    lines = [
        {"question": "q", "choices": ["x", "y"], "answer": 0},
        {"question": "a <FILL_ME> b", "choices": ["x", "y"], "answer": 0},
    ]
    examples, _, rep = load_choices(_rows(tmp_path, lines), _cfg(), ours)
    assert (len(examples), rep.bad_lines) == (1, 1)
    assert "<FILL_ME>" in "\n".join(rep.problems)


def test_the_rendered_chat_is_checked_not_the_record(tmp_path):
    """``_no_fill`` looked at the record only: a fill token from data.system_prompt reached
    training as literal pieces, and one in a template variable the template never renders
    refused the line."""
    ours, _ = _load(tmp_path / "t", {"chat_template": CHAT})
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    path = _rows(tmp_path, [{"messages": chat}])
    with pytest.raises(EmberError, match="d.jsonl:1: the line's text holds <FILL_ME>"):
        load_examples(path, _cfg(system_prompt="fill <FILL_ME> in"), ours)
    path = _rows(tmp_path, [{"messages": chat, "chat_template_kwargs": {"unused": "<FILL_ME>"}}])
    examples, rep = load_examples(path, _cfg(), ours)
    assert len(examples) == 1 and rep.bad_lines == 0
    with pytest.raises(EmberError, match="<FILL_ME>"):
        load_examples(
            _rows(tmp_path, [{"prompt": "a <FILL_ME>", "completion": "b"}]),
            DataConfig(max_seq_len=128, tokens_per_batch=128),
            ours,
        )


def test_a_tokenizer_without_infilling_tokens_makes_a_bad_line(tmp_path):
    """prefix_token null: transformers' tokenizer raises a ValueError on a text with <FILL_ME>,
    which crashed load_examples; Ember's an EmberError. Both: a bad line."""
    ours, _ = _load(tmp_path / "t", {"prefix_token": None})
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "t")
    path = _rows(tmp_path, [{"text": "fine"}, {"text": "a <FILL_ME>b"}])
    for tok in (ours, theirs):
        examples, rep = load_examples(path, _cfg(), tok)
        assert (len(examples), rep.bad_lines) == (1, 1), type(tok).__name__
        assert "prefix" in "\n".join(rep.problems)
