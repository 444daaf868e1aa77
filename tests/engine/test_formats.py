"""Formats users bring: Alpaca, ShareGPT, OpenAI content parts, tool calls, .json arrays: each is
the same example as its Ember equivalent (prompt/completion or messages), bad items name file,
line or array index, and the reason."""

from __future__ import annotations

import json

import pytest
from tokenizers import Tokenizer as Backend
from tokenizers import decoders, models, pre_tokenizers, trainers

from ember import EmberError
from ember.engine.data import IGNORE, DataConfig, load_examples
from ember.engine.formats import ALPACA_PREAMBLE, ALPACA_PREAMBLE_INPUT
from ember.models.tokenizer import Tokenizer

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] or '' }}"
          "{% for c in m.tool_calls or [] %}<tool_call>{{ c.function | tojson }}</tool_call>"
          "{% endfor %}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
WORDS = ["What is the capital of France?", "Paris is the capital of France.", "Translate",
         "Bonjour le monde", "Hello world", "You are terse.", "get_weather", "Weather in Paris"]


def chat_backend() -> Backend:
    """A tiny byte-level BPE trained on WORDS (also used by test_datafiles)."""
    tok = Backend(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(WORDS * 3, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<pad>", "<s>", "<|im_start|>", "<|im_end|>"],
        show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tok


@pytest.fixture(scope="module")
def backend():
    return chat_backend()


@pytest.fixture(scope="module")
def tok(backend):
    return Tokenizer(backend, eos_token="<|im_end|>", chat_template=CHATML)


def _load(tmp_path, rows, tok, name="d.jsonl", **kw):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) if name.endswith("l")
                    else json.dumps(rows, indent=1))
    return load_examples(path, DataConfig(train=str(path), **kw), tok)


def _text(tok, ids) -> str:
    return tok.backend.decode(list(ids), skip_special_tokens=False)


def _targets(tok, ex) -> str:
    return _text(tok, [t for t in ex.labels if t != IGNORE])


def test_alpaca_is_a_prompt_completion_pair(tmp_path, tok, backend):
    rows = [{"instruction": "Translate", "input": "Bonjour le monde", "output": "Hello world"},
            {"instruction": "What is the capital of France?", "input": "", "output": "Paris."},
            {"instruction": "Translate", "input": "Bonjour", "output": "Hello",
             "system": "Be terse."}]
    examples, rep = _load(tmp_path, rows, tok)
    assert rep.format == "alpaca" and rep.examples == 3
    pc = [{"prompt": "Translate\n\nBonjour le monde", "completion": "Hello world"},
          {"prompt": "What is the capital of France?", "completion": "Paris."}]
    same, _ = _load(tmp_path, pc, tok)
    assert [e.input_ids for e in examples[:2]] == [e.input_ids for e in same]
    assert [e.labels for e in examples[:2]] == [e.labels for e in same]
    assert _targets(tok, examples[0]) == "Hello world<|im_end|>"
    assert _text(tok, examples[2].input_ids).startswith("<|im_start|>system\nBe terse.<|im_end|>")
    # The line's system wins over data.system_prompt, which fills in for the others.
    ex, _ = _load(tmp_path, rows, tok, system_prompt="Default.")
    assert "Default." in _text(tok, ex[0].input_ids) and "Default." not in _text(
        tok, ex[2].input_ids)
    # Without a chat template: Stanford Alpaca's prompt.
    plain = Tokenizer(backend, eos_token="<|im_end|>")
    ex, _ = _load(tmp_path, rows[:2], plain)
    assert _text(tok, ex[0].input_ids[:ex[0].prompt_len]) == (
        f"{ALPACA_PREAMBLE_INPUT}\n\n### Instruction:\nTranslate\n\n### Input:\nBonjour le monde"
        "\n\n### Response:\n")
    assert _text(tok, ex[1].input_ids[:ex[1].prompt_len]) == (
        f"{ALPACA_PREAMBLE}\n\n### Instruction:\nWhat is the capital of France?\n\n### Response:\n")
    assert _targets(tok, ex[0]) == "Hello world<|im_end|>"


def test_sharegpt_and_content_parts_are_messages(tmp_path, tok):
    msgs = [{"role": "system", "content": "You are terse."},
            {"role": "user", "content": "What is the capital of France?"},
            {"role": "assistant", "content": "Paris is the capital of France."},
            {"role": "user", "content": "Hello world"}, {"role": "assistant", "content": "Hi"}]
    (want,), _ = _load(tmp_path, [{"messages": msgs}], tok)
    who = {"system": "system", "user": "human", "assistant": "gpt"}
    share = {"conversations": [{"from": who[m["role"]], "value": m["content"]} for m in msgs]}
    (ex,), rep = _load(tmp_path, [share], tok)
    assert rep.format == "sharegpt"
    assert (ex.input_ids, ex.labels, ex.reference) == (want.input_ids, want.labels, "Hi")
    top_system = {"system": "You are terse.", "conversations": share["conversations"][1:]}
    (ex,), _ = _load(tmp_path, [top_system], tok, format="sharegpt")
    assert ex.input_ids == want.input_ids
    parts = [{**m, "content": [{"type": "text", "text": w} for w in m["content"].split(" ", 1)]}
             for m in msgs]
    (ex,), _ = _load(tmp_path, [{"messages": parts}], tok)
    joined = [{**m, "content": m["content"].replace(" ", "\n", 1)} for m in msgs]
    (want,), _ = _load(tmp_path, [{"messages": joined}], tok)
    assert ex.input_ids == want.input_ids and ex.labels == want.labels


@pytest.mark.parametrize("key", ["reasoning_content", "thinking", "reasoning"])
def test_assistant_reasoning_reaches_the_template_and_the_loss(tmp_path, backend, key):
    """A Qwen3-style template renders an assistant turn's reasoning before its answer; the
    reasoning is part of what the model learns to write, under any of transformers' names."""
    think = CHATML.replace("{{ m['content'] or '' }}",
                           "{% if m.reasoning_content %}<think>{{ m.reasoning_content }}</think>"
                           "{% endif %}{{ m['content'] or '' }}")
    tok = Tokenizer(backend, eos_token="<|im_end|>", chat_template=think)
    msgs = [{"role": "user", "content": "Translate"},
            {"role": "assistant", key: "Bonjour le monde", "content": "Hello world"}]
    (ex,), _ = _load(tmp_path, [{"messages": msgs}], tok)
    assert _targets(tok, ex) == "<think>Bonjour le monde</think>Hello world<|im_end|>"
    bad = [msgs[0], {**msgs[1], key: 3}]
    with pytest.raises(EmberError, match=f"{key} must be a string"):
        _load(tmp_path, [{"messages": bad}], tok)


def test_tool_turns_train_only_the_assistant(tmp_path, tok):
    call = {"type": "function", "id": "c1",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    msgs = [{"role": "user", "content": "Weather in Paris"},
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "c1", "content": "21 C"},
            {"role": "assistant", "content": "21 degrees."}]
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]
    (ex,), _ = _load(tmp_path, [{"messages": msgs, "tools": tools}], tok)
    assert _targets(tok, ex) == ('<tool_call>{"name": "get_weather", "arguments": {"city": '
                                 '"Paris"}}</tool_call><|im_end|>21 degrees.<|im_end|>')
    assert "<|im_start|>tool\n21 C<|im_end|>" in _text(tok, ex.input_ids)
    # LLaMA-Factory's ShareGPT shape of the same conversation: function_call / observation
    # turns and the tool schemas as JSON text
    share = {"conversations": [
        {"from": "human", "value": "Weather in Paris"},
        {"from": "function_call", "value": '{"name": "get_weather", "arguments": {"city": '
                                           '"Paris"}}'},
        {"from": "observation", "value": "21 C"}, {"from": "gpt", "value": "21 degrees."}],
        "tools": json.dumps(tools)}
    unnamed = [{k: v for k, v in m.items() if k != "tool_call_id"} for m in msgs]
    unnamed[1] = {**msgs[1], "tool_calls": [{"type": "function", "function": call["function"]}]}
    (want,), _ = _load(tmp_path, [{"messages": unnamed, "tools": tools}], tok)
    (ex,), rep = _load(tmp_path, [share], tok)
    assert rep.format == "sharegpt"
    assert (ex.input_ids, ex.labels) == (want.input_ids, want.labels)


BAD = [
    ({"instruction": "Translate", "input": 3, "output": "x"}, "field 'input' must be a string"),
    ({"instruction": "", "output": "x"}, "empty instruction and input"),
    ({"instruction": "Translate", "output": " "}, "empty output"),
    # a falsy non-string was read as "not given" (input 0 dropped silently)
    ({"instruction": "Add one", "input": 0, "output": "1"}, "field 'input' must be a string"),
    ({"instruction": "Add one", "output": "1", "system": False}, "field 'system' must be a"),
    ({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "x"}],
      "system": 0}, "field 'system' must be a string, got number"),
    ({"conversations": [{"from": "human", "value": "hi"}, {"from": "bot", "value": "yo"}]},
     "unknown speaker 'bot' in conversations[1] (expected system, human, user, gpt"),
    ({"conversations": [{"from": "human"}]}, "conversations[0] has no 'value'"),
    ({"conversations": [{"from": "human", "value": "hi"}, {"from": "function_call",
                                                          "value": "get_weather(Paris)"}]},
     "conversations[1].value must be JSON text here"),
    ({"conversations": []}, "field 'conversations' must be a non-empty array"),
    ({"messages": [{"role": "user", "content": [
        {"type": "text", "text": "What is this?"},
        {"type": "image_url", "image_url": {"url": "x.png"}}]}]},
     "messages[0].content[1] is a 'image_url' part: Ember trains text-only models"),
    ({"messages": [{"role": "user", "content": [{"text": "hi"}]}]},
     "messages[0].content[0] must be a {type, ...} object"),
    ({"messages": [{"role": "assistant", "content": None, "tool_calls": [{"name": "f"}]}]},
     "messages[0].tool_calls[0] must be"),
    ({"messages": [{"role": "assistant", "tool_calls": [
        {"function": {"name": "f", "arguments": "{oops"}}]}]},
     "messages[0].tool_calls[0].function.arguments is a string that is not JSON"),
    # JSON text of an array (of pairs) or a number: refused as the decoded value is, not made
    # an object by dict() ({"city": "Paris"} from '[["city", "Paris"]]', a TypeError from '5')
    ({"messages": [{"role": "assistant", "tool_calls": [
        {"function": {"name": "f", "arguments": '[["city", "Paris"]]'}}]}]},
     "messages[0].tool_calls[0].function.arguments must be an object, got array"),
    ({"messages": [{"role": "assistant", "tool_calls": [
        {"function": {"name": "f", "arguments": "5"}}]}]},
     "messages[0].tool_calls[0].function.arguments must be an object, got"),
    ({"messages": [{"role": "user", "content": "x", "tool_calls": [
        {"function": {"name": "f", "arguments": {}}}]}]}, "only assistant messages call tools"),
    ({"messages": [{"role": "user", "content": "x"}], "tools": {"f": 1}},
     "field 'tools' must be an array"),
]


@pytest.mark.parametrize(("row", "why"), BAD, ids=[w[:30] for _, w in BAD])
def test_bad_lines_name_file_line_and_reason(tmp_path, tok, row, why):
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"}]}
    if "instruction" in row:
        good = {"instruction": "Translate", "output": "x"}
    elif "conversations" in row:
        good = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "x"}]}
    _, rep = _load(tmp_path, [good, row], tok)
    assert rep.bad_lines == 1 and rep.problems[0].startswith(f"{tmp_path / 'd.jsonl'}:2: ")
    assert why in rep.problems[0], rep.problems[0]


def test_json_arrays(tmp_path, tok):
    rows = [{"instruction": "Translate", "input": "Bonjour le monde", "output": "Hello world"},
            {"instruction": "Translate", "output": 7},
            {"instruction": "Hello world", "output": "Bonjour le monde"}]
    examples, rep = _load(tmp_path, rows, tok, name="d.json")
    assert rep.examples == 2 and rep.lines == 3 and rep.format == "alpaca"
    assert rep.problems == [f"{tmp_path / 'd.json'}[1]: field 'output' must be a string, got "
                            "number"]
    assert [e.source for e in examples] == [f"{tmp_path / 'd.json'}[{i}]" for i in (0, 2)]
    with pytest.raises(EmberError, match=r"d\.json\[1\]: field 'output' must be a string(.|\n)*"
                                         r"fix the item"):
        _load(tmp_path, rows, tok, name="d.json", bad_lines="error")
    # Many datasets are JSONL named .json; a broken array names the place.
    (tmp_path / "l.json").write_text("".join(json.dumps(r) + "\n" for r in rows[::2]))
    assert len(load_examples(tmp_path / "l.json", DataConfig(), tok)[0]) == 2
    (tmp_path / "b.json").write_text('[{"text": "Hello world"},\n {"text": }]')
    with pytest.raises(EmberError, match=r"b\.json: invalid JSON: Expecting value \(line 2 "):
        load_examples(tmp_path / "b.json", DataConfig(), tok)
    (tmp_path / "e.json").write_text("[]")
    with pytest.raises(EmberError, match="the file is empty"):
        load_examples(tmp_path / "e.json", DataConfig(), tok)


def test_numbers_past_pythons_json_digit_limit_are_bad_lines(tmp_path, tok):
    """Python's json refuses an integer of more digits than it converts with a ValueError that
    is not a JSONDecodeError: it raised out of loading (a traceback, no file:line) from a line,
    a tool call's arguments text, a ShareGPT function_call and a .json array; now the line is
    reported as bad (the array's file named), saying to write the number as a string."""
    import sys

    big = "7" * (sys.get_int_max_str_digits() + 1)
    with pytest.raises(ValueError):
        json.loads(big)  # the oracle refuses it
    call = json.dumps([{"type": "function", "function": {"name": "f",
                                                         "arguments": '{"a": ' + big + "}"}}])
    lines = {
        "line": ('{"prompt": "Hello", "completion": " world"}',
                 '{"prompt": "Hello", "completion": " world", "n": ' + big + "}"),
        "arguments": ('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", '
                      '"content": "x"}]}',
                      '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", '
                      '"content": null, "tool_calls": ' + call + "}]}"),
        "function_call": ('{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", '
                          '"value": "x"}]}',
                          '{"conversations": [{"from": "human", "value": "hi"}, {"from": '
                          '"function_call", "value": ' + json.dumps(
                              '{"name": "f", "arguments": {"a": ' + big + "}}") + "}]}"),
    }
    for name, (good, bad) in lines.items():
        path = tmp_path / f"{name}.jsonl"
        path.write_text(f"{good}\n{bad}\n")
        examples, rep = load_examples(path, DataConfig(train=str(path)), tok)
        assert len(examples) == 1 and rep.bad_lines == 1, name
        assert rep.problems[0].startswith(f"{path}:2: ") and "write it as a string" in (
            rep.problems[0]), rep.problems[0]
    array = tmp_path / "a.json"
    array.write_text("[" + lines["line"][0] + ", " + lines["line"][1] + "]")
    with pytest.raises(EmberError, match=f"{array}: invalid JSON: a number of more than"):
        load_examples(array, DataConfig(train=str(array)), tok)
