"""Multiple-choice evaluation (engine/choices.py, ember eval on question/choices/answer lines).
Oracle: transformers' model on the same folder, log-probabilities summed over each choice's tokens
of lm-eval's requests (``_lmeval_pair``: lm-eval 0.4.13's ``TemplateLM._encode_pair`` and
``loglikelihood``); lm-eval itself gives the same numbers (tools/check_lmeval.py)."""

from __future__ import annotations

import json

import pytest
import torch

from ember import EmberError
from ember.engine.choices import choice_metrics, load_choices, score_choices
from ember.engine.cli import main
from ember.engine.data import DataConfig
from ember.models.loading import load_pretrained
from tests.engine._tiny import make_tiny_model, write_jsonl
from tests.engine.test_cli_chat import chat_model  # noqa: F401  (fixture)

ROWS = [
    {"question": "say red dog ->", "choices": ["red", "blue", "green dog"], "answer": 0},
    {"prompt": "say blue cat -> ", "choices": ["blue", "cat"], "answer": "cat"},
    {"question": "colors:\n", "choices": [" red", "blue blue blue", "a", "dog"], "answer": 3},
]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("mc") / "model", seed=4)


@pytest.fixture(scope="module")
def base_tok(base):
    from ember.models.tokenizer import load_tokenizer

    return load_tokenizer(base)


def _hf_sums(folder, pairs) -> list[float]:
    """Summed log p(continuation | context) per (context ids, continuation ids) from
    transformers' model."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    out = []
    for ctx, cont in pairs:
        ids = torch.tensor([ctx + cont])
        with torch.no_grad():
            lp = hf(ids).logits[0].float().log_softmax(-1)
        out.append(sum(float(lp[len(ctx) - 1 + j, t]) for j, t in enumerate(cont)))
    return out


def _lmeval_pair(tok, context: str, continuation: str, special: bool = True):
    """lm-eval's (context ids, continuation ids): an empty context is BOS (else EOS); otherwise
    the context's trailing whitespace moves into the continuation, which is the tokens of the
    whole text past the context's."""
    if not context:
        ids = tok.encode(continuation, add_special_tokens=False)
        prefix = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        return ([prefix], ids) if ids[0] != prefix else (ids[:1], ids[1:])
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    ctx = tok.encode(context, add_special_tokens=special)
    whole = tok.encode(context + continuation, add_special_tokens=special)
    assert whole[:len(ctx)] == ctx
    return ctx, whole[len(ctx):]


def _raw_pairs(tok, row):
    """lm-eval's pairs for (question, target_delimiter + choice); Ember's default delimiter is
    " " but none after a question ending with whitespace or before a choice starting with it."""
    q = row.get("question", row.get("prompt"))
    for c in row["choices"]:
        yield _lmeval_pair(tok, q, _sep(row, c) + c)


def _sep(row, choice: str) -> str:
    q = row.get("question", row.get("prompt"))
    return row.get("target_delimiter",
                   "" if not q or q[-1].isspace() or choice[0].isspace() else " ")


def test_scores_match_transformers(base, tmp_path, capsys):
    model, tok = load_pretrained(base, "float32", "cpu")
    path = write_jsonl(tmp_path / "mc.jsonl", ROWS)
    cfg = DataConfig(use_chat_template=False, tokens_per_batch=64, max_seq_len=64)
    examples, questions, rep = load_choices(path, cfg, tok)
    assert [q.answer for q in questions] == [0, 1, 3] and rep.examples == 3
    got = score_choices(model, examples, 64, "cpu")
    pairs = [p for r in ROWS for p in _raw_pairs(tok, r)]
    want = _hf_sums(base, pairs)
    torch.testing.assert_close(torch.cat(got), torch.tensor(want), rtol=1e-4, atol=1e-4)
    # the CLI reports the metrics of those scores
    capsys.readouterr()
    assert main(["eval", str(base), "--raw", "--data", path, "--device", "cpu"]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    split, at = [], 0
    for r in ROWS:
        split.append(torch.tensor(want[at:at + len(r["choices"])]))
        at += len(r["choices"])
    assert row == {"data": path, "examples": 3, **choice_metrics(split, questions)}


def test_target_delimiter_and_an_empty_question_are_lm_evals(base, tmp_path):
    """A line's target_delimiter is put verbatim, as lm-eval's task setting (its default " "
    after "colors:\n" scores "\n red", Ember's default "\nred"); an empty question is scored
    after EOS, lm-eval's prefix token for a tokenizer without BOS (Ember left the first token of
    the choice unscored: 0.0 for a one-token choice)."""
    model, tok = load_pretrained(base, "float32", "cpu")
    rows = [{"question": "colors:\n", "choices": ["red", " blue"], "answer": 0,
             "target_delimiter": " "},
            {"question": "say red", "choices": ["dog", " cat"], "answer": 0,
             "target_delimiter": ""},
            {"question": "say red ", "choices": ["dog", "cat"], "answer": 0,
             "target_delimiter": "\n"},
            {"question": "", "choices": ["red", "blue dog"], "answer": 1},
            {"question": "", "choices": ["red", "blue dog"], "answer": 1,
             "target_delimiter": " "}]
    path = write_jsonl(tmp_path / "mc.jsonl", rows)
    examples, _, _ = load_choices(path, DataConfig(use_chat_template=False), tok)
    got = torch.cat(score_choices(model, examples, 256, "cpu"))
    pairs = [p for r in rows for p in _raw_pairs(tok, r)]
    assert pairs[0][1] == tok.encode("\n red", add_special_tokens=False)
    assert [ctx for ctx, _ in pairs[6:]] == [[tok.eos_token_id]] * 4
    torch.testing.assert_close(got, torch.tensor(_hf_sums(base, pairs)), rtol=1e-4, atol=1e-4)


def test_mutual_info_is_lm_evals(base, tmp_path, capsys):
    """choice_accuracy_mutual_info (lm-eval's acc_mutual_info, asked for with --metrics): the
    choice's log-likelihood less that of lm-eval's ("", delimiter + choice) request, the
    choice after EOS alone here (no BOS)."""
    model, tok = load_pretrained(base, "float32", "cpu")
    path = write_jsonl(tmp_path / "mc.jsonl", ROWS)
    cfg = DataConfig(use_chat_template=False)
    examples, questions, _ = load_choices(path, cfg, tok, mutual_info=True)
    got = score_choices(model, examples, 256, "cpu")
    hits = 0
    for r, q, g in zip(ROWS, questions, got, strict=True):
        cond = _hf_sums(base, list(_raw_pairs(tok, r)))
        alone = _hf_sums(base, [_lmeval_pair(tok, "", _sep(r, c) + c) for c in r["choices"]])
        torch.testing.assert_close(g, torch.tensor(cond + alone), rtol=1e-4, atol=1e-4)
        hits += int(torch.tensor(cond).sub(torch.tensor(alone)).argmax()) == q.answer
    want = {**choice_metrics([g[:len(q.chars)] for g, q in zip(got, questions, strict=True)],
                             questions), "choice_accuracy_mutual_info": hits / 3}
    assert choice_metrics(got, questions) == want
    capsys.readouterr()
    assert main(["eval", str(base), "--raw", "--data", path, "--device", "cpu", "--metrics",
                 "choice_accuracy_mutual_info"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == {
        "data": path, "examples": 3, **want}


def test_chat_models_score_the_assistant_answer(chat_model, tmp_path):  # noqa: F811
    model, tok = load_pretrained(chat_model, "float32", "cpu")
    rows = ROWS[:2]
    path = write_jsonl(tmp_path / "mc.jsonl", rows)
    examples, _, _ = load_choices(path, DataConfig(system_prompt="S"), tok)
    got = torch.cat(score_choices(model, examples, 32, "cpu"))  # one question per batch
    pairs = []
    for r in rows:
        q = r.get("question", r.get("prompt"))
        text = tok.apply_chat_template([{"role": "system", "content": "S"},
                                        {"role": "user", "content": q}],
                                       add_generation_prompt=True, tokenize=False)
        # lm-eval (apply_chat_template, add_bos_token=False): no delimiter, and the generation
        # prompt's trailing "\n" moves into the continuation (it was not scored: -7.9 to -8.9
        # apart from lm-eval's log-likelihoods on tools/check_lmeval.py's model)
        pairs += [_lmeval_pair(tok, text, c, special=False) for c in r["choices"]]
    torch.testing.assert_close(got, torch.tensor(_hf_sums(chat_model, pairs)), rtol=1e-4,
                               atol=1e-4)


def test_accuracy_and_length_normalized_accuracy():
    from ember.engine.choices import Question

    scores = [torch.tensor([-10.0, -12.0]), torch.tensor([-3.0, -1.0, -2.0])]
    qs = [Question(1, (2, 20)), Question(1, (1, 1, 1))]
    # question 1: the sum prefers choice 0, per character choice 1 (-5 vs -0.6)
    assert choice_metrics(scores, qs) == {"choice_accuracy": 0.5, "choice_accuracy_norm": 1.0}


def test_long_questions_lose_context_from_the_left(base, tmp_path):
    """As lm-eval: the model's input is (context + continuation)[-(max_length + 1):][:-1], the
    continuation's last token being no input (Ember fitted max_seq_len tokens with it: one
    context token fewer than lm-eval: -5.8346 for "red" here, lm-eval -5.7645)."""
    model, tok = load_pretrained(base, "float32", "cpu")
    row = {"question": "say red dog -> " * 20, "choices": ["red", "blue dog"], "answer": 0}
    path = write_jsonl(tmp_path / "long.jsonl", [row])
    cfg = DataConfig(use_chat_template=False, max_seq_len=12, tokens_per_batch=64)
    (ex,), _, rep = load_choices(path, cfg, tok)
    assert rep.truncated == 1 and ex.parts == (12, 12)
    cut = []
    for (ctx, cont), n, at in zip(_raw_pairs(tok, row), ex.parts, (0, ex.parts[0]), strict=True):
        assert ex.input_ids[at:at + n] == (ctx + cont)[-13:][:-1]
        cut.append((ctx[len(ctx) + len(cont) - 13:], cont))
    got = torch.cat(score_choices(model, [ex], 64, "cpu"))
    torch.testing.assert_close(got, torch.tensor(_hf_sums(base, cut)), rtol=1e-4, atol=1e-4)
    with pytest.raises(EmberError, match="no usable questions"):
        load_choices(path, DataConfig(use_chat_template=False, max_seq_len=12,
                                      truncation="drop", bad_lines="skip"), tok)


@pytest.mark.parametrize("row, message", [
    ({"question": "q", "choices": ["a", "b"]}, "missing ['answer']"),
    ({"choices": ["a", "b"], "answer": 0}, "missing ['question']"),
    ({"question": "q", "choices": ["a"], "answer": 0}, "two or more non-empty strings"),
    ({"question": "q", "choices": ["a", "b"], "answer": 2}, "out of range for 2 choices"),
    ({"question": "q", "choices": ["a", "b"], "answer": "c"}, "'c' is not one of the choices"),
    ({"question": "q", "choices": ["a", "b"], "answer": True}, "index of the right choice"),
    ({"question": "q", "choices": ["a", "b"], "answer": 0, "target_delimiter": 1},
     "'target_delimiter' must be a string"),
])
def test_bad_lines_say_what_is_wrong(base_tok, tmp_path, row, message):
    tok = base_tok
    path = write_jsonl(tmp_path / "bad.jsonl", [ROWS[0], row])
    with pytest.raises(EmberError, match=r"bad\.jsonl:2: ") as e:
        load_choices(path, DataConfig(use_chat_template=False, bad_lines="error"), tok)
    assert message in str(e.value)
    _, qs, rep = load_choices(path, DataConfig(use_chat_template=False, bad_lines="skip"), tok)
    assert len(qs) == 1 and rep.bad_lines == 1


def test_a_number_past_pythons_json_digit_limit_is_a_bad_line(base_tok, tmp_path):
    """json.loads refuses an integer of more digits than Python converts with a plain ValueError
    (the oracle below): a first line holding one crashed the file's sniffing (is_choice_file),
    a later one the loading; now the first is not a choice record and the later a bad line."""
    import sys

    from ember.engine.choices import is_choice_file

    big = "7" * (sys.get_int_max_str_digits() + 1)
    bad = '{"question": "q", "choices": ["a", "b"], "answer": 0, "id": ' + big + "}"
    with pytest.raises(ValueError):
        json.loads(bad)
    first, later = tmp_path / "first.jsonl", tmp_path / "later.jsonl"
    first.write_text(bad + "\n")
    later.write_text(json.dumps(ROWS[0]) + "\n" + bad + "\n")
    assert not is_choice_file(first) and is_choice_file(later)
    _, qs, rep = load_choices(later, DataConfig(use_chat_template=False), base_tok)
    assert len(qs) == 1 and rep.bad_lines == 1
    assert rep.problems[0].startswith(f"{later}:2: invalid JSON: a number of more than")


def test_cli_refuses_generation_metrics_on_a_choice_file(base, tmp_path, capsys):
    path = write_jsonl(tmp_path / "mc.jsonl", ROWS[:1])
    assert main(["eval", str(base), "--raw", "--data", path, "--metrics", "exact_match"]) == 2
    assert "multiple-choice file" in capsys.readouterr().err


def test_training_reports_choice_accuracy_and_can_stop_on_it(tiny, tmp_path):
    """eval.choices in a real run: the kind of answer the data teaches (words of the prompt)
    against letters the data never has after the arrow; scored before and during training,
    logged, usable for early stopping. The final score equals scoring the run's final model
    directly."""
    from ember.engine.state import load_run_model
    from ember.engine.trainer import train
    from tests.engine._tiny import quiet, rows_of, tiny_config, tiny_rows

    rows = [{"question": r["prompt"], "choices": [w, r["completion"].strip()], "answer": 1}
            for r, w in zip(tiny_rows(12, seed=7), ["xq", "zz kv", "vq", "jjj"] * 3,
                            strict=True)]
    path = write_jsonl(tmp_path / "mc.jsonl", rows)
    cfg = tiny_config(tiny, tmp_path / "run", "max_steps=16", "optim.lr=5e-3",
                      "eval.every_steps=8", "eval.metrics=[]", f'eval.choices="{path}"',
                      "data.use_chat_template=false")
    train(cfg, echo=quiet, progress=False)
    evals = [r for r in rows_of(tmp_path / "run") if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [0, 8, 16]
    assert max(r["choice_accuracy"] for r in evals[1:]) > evals[0]["choice_accuracy"]
    model, tok, run_cfg = load_run_model(tmp_path / "run", "cpu")
    examples, questions, _ = load_choices(path, run_cfg.data, tok)
    final = choice_metrics(score_choices(model, examples, 128, "cpu"), questions)
    assert final == {k: evals[-1][k] for k in final}
    # early stopping on it: an lr too small to move the score by min_delta stops after patience
    cfg = tiny_config(tiny, tmp_path / "es", "max_steps=20", "optim.lr=1e-9",
                      "eval.every_steps=2", "eval.metrics=[]", f'eval.choices="{path}"',
                      'eval.early_stopping="choice_accuracy"', "eval.patience=2",
                      "eval.min_delta=0.1", "data.use_chat_template=false")
    res = train(cfg, echo=quiet, progress=False)
    assert res.stopped_early and res.steps == 4


def test_choices_config_errors(tiny, tmp_path):
    from tests.engine._tiny import tiny_config

    with pytest.raises(EmberError, match="eval.early_stopping must be one of"):
        tiny_config(tiny, tmp_path / "x", 'eval.early_stopping="choice_accuracy"')
    path = write_jsonl(tmp_path / "mc.jsonl", ROWS)
    with pytest.raises(EmberError, match="eval.choices scores answers with the LM head"):
        tiny_config(tiny, tmp_path / "h", 'head.type="classification"', 'method="full"',
                    f'eval.choices="{path}"')
