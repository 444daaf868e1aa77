"""ember generate / ember chat --template-kwargs: chat template variables (Qwen3's
``enable_thinking``, ``tools``) reach the template as transformers' ``apply_chat_template(**kw)``
passes them. The oracle is transformers' ``AutoTokenizer`` with Qwen3's template as it ships, on
a tiny random Qwen3 folder: the ids Ember feeds each turn equal transformers' rendering."""

from __future__ import annotations

import importlib
import io
import json
import warnings

import pytest
import torch

from ember.engine.cli import main
from tests.engine.test_chat_parity_reasoning import (
    QWEN3,
    TOOLS,
    backend,  # noqa: F401  (a fixture)
)

transformers = pytest.importorskip("transformers")

MAX_NEW = 4
NO_THINK = {"enable_thinking": False}


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory, backend):  # noqa: F811
    folder = tmp_path_factory.mktemp("qwen3")
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>",
                                               pad_token="<|endoftext|>", chat_template=QWEN3)
    torch.manual_seed(0)
    model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=512,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder, transformers.AutoTokenizer.from_pretrained(folder)


def _spy(monkeypatch):
    """(prompt ids, generated ids) of each generate_ids call the command makes."""
    mod = importlib.import_module("ember.models.generate")
    real, calls = mod.generate_ids, []

    def spy(model, ids, **kw):
        out = real(model, ids, **kw)
        calls.extend(zip([list(p) for p in ids], out, strict=True))
        return out

    monkeypatch.setattr(mod, "generate_ids", spy)
    return calls


def _main(capsys, argv) -> str:
    capsys.readouterr()
    assert main(argv) == 0, capsys.readouterr().err
    return capsys.readouterr().out


def test_generate_passes_template_variables_as_transformers(qwen3, capsys, monkeypatch):
    folder, hf = qwen3
    calls = _spy(monkeypatch)
    base = ["generate", str(folder), "--device", "cpu", "--max-new-tokens", str(MAX_NEW),
            "--prompt", "What is the capital of France?", "--prompt", "And Italy?"]
    system = [{"role": "system", "content": "Answer briefly."}]
    for kw in (NO_THINK, {"enable_thinking": True}, {"tools": TOOLS, **NO_THINK}):
        calls.clear()
        _main(capsys, [*base, "--system", system[0]["content"], "--template-kwargs",
                       json.dumps(kw)])
        want = [hf.apply_chat_template([*system, {"role": "user", "content": p}], **kw,
                                       add_generation_prompt=True, return_dict=False)
                for p in ("What is the capital of France?", "And Italy?")]
        assert [p for p, _ in calls] == want
        # the variable made a difference
        empty_think = hf.decode(want[0]).endswith("assistant\n<think>\n\n</think>\n\n")
        assert empty_think == (kw["enable_thinking"] is False)


def test_chat_passes_template_variables_every_turn(qwen3, capsys, monkeypatch):
    folder, hf = qwen3
    calls = _spy(monkeypatch)
    monkeypatch.setattr("sys.stdin", io.StringIO("What is the capital of France?\nAnd Italy?\n"))
    out = _main(capsys, ["chat", str(folder), "--device", "cpu", "--max-new-tokens",
                         str(MAX_NEW), "--template-kwargs", json.dumps(NO_THINK)])
    history = []
    for (fed, gen), line in zip(calls, ("What is the capital of France?", "And Italy?"),
                                strict=True):
        history.append({"role": "user", "content": line})
        assert fed == hf.apply_chat_template(history, enable_thinking=False,
                                             add_generation_prompt=True, return_dict=False)
        history.append({"role": "assistant", "content": hf.decode(gen, skip_special_tokens=True)})
    assert out == "".join(m["content"] + "\n" for m in history[1::2])


@pytest.mark.parametrize("value, message", [
    ("{enable_thinking: false}", "--template-kwargs is not valid JSON"),
    ('{"n": ' + "1" * 5000 + "}", "--template-kwargs is not valid JSON (Exceeds the limit"),
    ("[1]", "--template-kwargs must be a JSON object of template variables, got array"),
    ("false", "must be a JSON object of template variables, got boolean"),
    ('{"tools": {"name": "f"}}', "'tools' must be an array of tool schemas (objects), got obj"),
    ('{"x": "\\udfff"}', "--template-kwargs holds a lone surrogate U+DFFF"),
    ('{"add_generation_prompt": false}', "sets ['add_generation_prompt']: those are "
                                         "apply_chat_template's own arguments"),
])
def test_bad_template_kwargs_are_one_clear_line(qwen3, capsys, value, message):
    folder, _ = qwen3
    for cmd in ("generate", "chat"):
        argv = [cmd, str(folder / "not-loaded"), "--template-kwargs", value]
        capsys.readouterr()
        assert main([*argv, "--prompt", "hi"] if cmd == "generate" else argv) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err


def test_template_variables_need_a_chat_template(qwen3, capsys):
    folder, _ = qwen3
    capsys.readouterr()
    assert main(["generate", str(folder), "--device", "cpu", "--raw", "--prompt", "hi",
                 "--template-kwargs", json.dumps(NO_THINK)]) == 2
    assert "template variables need a chat template" in capsys.readouterr().err
    # an empty object is no variable: fine without a template
    assert main(["generate", str(folder), "--device", "cpu", "--raw", "--prompt", "hi",
                 "--max-new-tokens", "1", "--template-kwargs", "{}"]) == 0


def test_generate_prompts_from_a_file_as_transformers_renders_them(qwen3, tmp_path, capsys,
                                                                     monkeypatch):
    """--prompts FILE: a line's prompt text, its conversation (``messages``, or ``prompt`` as
    messages), its tools and chat_template_kwargs (over --template-kwargs) as transformers'
    apply_chat_template renders them; --system where the conversation has none."""
    folder, hf = qwen3
    q = {"role": "user", "content": "What is the capital of France?"}
    chat = [q, {"role": "assistant", "content": "Paris."}, {"role": "user", "content": "Italy?"}]
    own = {"role": "system", "content": "Be terse."}
    lines = [{"prompt": "And Italy?", "completion": "Rome."},
             {"messages": chat, "chat_template_kwargs": {"enable_thinking": True}},
             {"prompt": [own, q], "tools": TOOLS}]
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    calls = _spy(monkeypatch)
    system = {"role": "system", "content": "Answer briefly."}
    out = _main(capsys, ["generate", str(folder), "--device", "cpu", "--max-new-tokens",
                         str(MAX_NEW), "--prompts", str(path), "--system", system["content"],
                         "--template-kwargs", json.dumps(NO_THINK)])
    want = [hf.apply_chat_template(m, add_generation_prompt=True, return_dict=False, **kw)
            for m, kw in (([system, {"role": "user", "content": "And Italy?"}], NO_THINK),
                          ([system, *chat], {"enable_thinking": True}),
                          ([own, q], {"tools": TOOLS, **NO_THINK}))]
    assert [p for p, _ in calls] == want
    assert out == "".join(f"--- {i}\n{hf.decode(g, skip_special_tokens=True)}\n"
                          for i, (_, g) in enumerate(calls))


@pytest.mark.parametrize("text, message", [
    ('{"prompt": "hi"}\n{"question": "hi"}\n', "line 2: no 'prompt' or 'messages' field"),
    ('{"prompt": "hi"\n', "line 1: invalid JSON"),
    ('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a"}]}',
     "line 1: field 'messages' ends with an assistant message"),
    ('{"prompt": "hi", "chat_template_kwargs": [1]}', "line 1: field 'chat_template_kwargs' "
                                                       "must be an object"),
    ('{"messages": [{"role": "user", "content": "\\ud800"}]}',
     "line 1: the line holds a lone surrogate U+D800"),  # was the tokenizer's bare TypeError
    ("\n", "holds no prompts"),
    (None, "not found"),
    # plain text, a bare messages list, one message per line: say how a line is written (were
    # "invalid JSON: Expecting value", "no 'prompt' or 'messages' field (keys present: ['content',
    # 'role'])" and "a .json dataset is one array of objects" for a .jsonl file)
    ("What is 2+2?\n", "line 1: invalid JSON: Expecting value (column 1); a --prompts file holds "
                        'one JSON object per line, {"prompt": "..."} or {"messages": [...]} (plain '
                        "text: --prompt TEXT)"),
    ('[{"role": "user", "content": "hi"}]\n', "line 1: a chat message, not a prompt: write the "
                                              'conversation as one line, {"messages": [{"role": '),
    ('[{"role": "user", "content": "hi"}]\n[{"role": "user", "content": "yo"}]\n',
     'line 2 starts another JSON value: JSON Lines hold one object per line (a list of chat '
     'messages is written {"messages": [...]})'),
    ('{"role": "user", "content": "hi"}\n', "line 1: a chat message, not a prompt"),
])
def test_bad_prompt_files_are_one_clear_line(tmp_path, capsys, text, message):
    path = tmp_path / "p.jsonl"
    if text is not None:
        path.write_text(text)
    capsys.readouterr()
    assert main(["generate", str(tmp_path / "not-loaded"), "--prompts", str(path)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


def test_a_conversation_with_raw_or_without_a_template_says_what_to_do(tiny, tmp_path, capsys):
    """--raw with a conversation line is refused before the model loads, saying to drop --raw
    (was, after loading: "this model or run renders prompts as plain text (use ember
    generate)", the command in use); a model without a chat template says to give plain text."""
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "hi"}\n{"messages": [{"role": "user", "content": "hi"}]}\n')
    capsys.readouterr()
    assert main(["generate", str(tmp_path / "not-loaded"), "--raw", "--prompts", str(path)]) == 2
    err = capsys.readouterr().err
    assert err == (f"ember: error: --prompts {path} line 2: a conversation, which --raw cannot "
                   "render (--raw gives the model plain text, without its chat template): drop "
                   '--raw to render it with the chat template, or write the line as plain text, '
                   '{"prompt": "..."}\n')
    assert main(["generate", tiny["model"], "--device", "cpu", "--prompts", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"ember: error: --prompts {path} line 2: a conversation needs a chat "
                          "template, and this model renders prompts as plain text (its tokenizer "
                          "has no chat template"), err
    assert err.endswith('write the line as plain text, {"prompt": "..."}\n'), err
    assert err.count("\n") == 1
    # --system / template variables with --raw: the same, before loading (was, after loading:
    # "this model or run renders prompts as plain text")
    for extra, what in ((["--system", "s"], "--system: a system prompt needs"),
                        (["--template-kwargs", '{"x": 1}'], "--template-kwargs: template "
                                                            "variables need")):
        assert main(["generate", str(tmp_path / "not-loaded"), "--raw", "--prompt", "hi",
                     *extra]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"ember: error: {what} a chat template, which --raw leaves out "
                              "(it gives the model plain text): drop --raw, or "), err
    path.write_text(json.dumps({"prompt": "hi", "chat_template_kwargs": NO_THINK}) + "\n")
    assert main(["generate", str(tmp_path / "not-loaded"), "--raw", "--prompts", str(path)]) == 2
    assert capsys.readouterr().err.startswith(
        f"ember: error: --prompts {path} line 1: its tools / chat_template_kwargs: template "
        "variables need a chat template, which --raw leaves out")


def test_a_prompt_file_saved_with_a_bom_and_crlf_reads_as_plain(qwen3, tmp_path, capsys,
                                                                monkeypatch):
    """A first line with a UTF-8 BOM (Notepad, PowerShell's Out-File) and CRLF line ends read
    as ember train reads data files (was refused: "the line starts with a UTF-8 byte-order mark
    ... only a file's first line may have one", on the first line)."""
    folder, _ = qwen3
    lines = ['{"prompt": "What is the capital of France?"}', '{"prompt": "And Italy?"}']
    plain, bom = tmp_path / "plain.jsonl", tmp_path / "bom.jsonl"
    plain.write_text("\n".join(lines) + "\n")
    bom.write_bytes(("\ufeff" + "\r\n".join(lines) + "\r\n").encode())
    calls = _spy(monkeypatch)
    argv = ["generate", str(folder), "--device", "cpu", "--max-new-tokens", "1", "--prompts"]
    out = _main(capsys, [*argv, str(plain)])
    assert _main(capsys, [*argv, str(bom)]) == out
    assert len(calls) == 4 and calls[:2] == calls[2:]


def test_python_generate_passes_template_variables_as_transformers(qwen3, monkeypatch):
    """``ember.models.generate(..., template_kwargs=...)``: the same variables for Python
    callers (it had no way to turn Qwen3's thinking off); a keyword that is one of
    ``apply_chat_template``'s own, or a non-dict, is a clear error."""
    from ember import EmberError
    from ember.models import load_pretrained
    from ember.models.generate import generate

    folder, hf = qwen3
    model, tok = load_pretrained(str(folder), device="cpu")
    calls = _spy(monkeypatch)
    system = [{"role": "system", "content": "Answer briefly."}]
    for kw in (NO_THINK, {"tools": TOOLS, **NO_THINK}):
        calls.clear()
        generate(model, tok, [[*system, {"role": "user", "content": "Hi?"}]],
                 max_new_tokens=MAX_NEW, template_kwargs=kw)
        want = hf.apply_chat_template([*system, {"role": "user", "content": "Hi?"}], **kw,
                                      add_generation_prompt=True, return_dict=False)
        assert [p for p, _ in calls] == [want]
    assert want != hf.apply_chat_template([*system, {"role": "user", "content": "Hi?"}],
                                          add_generation_prompt=True, return_dict=False)
    for bad in ({"add_generation_prompt": False}, "enable_thinking=False"):
        with pytest.raises(EmberError, match="template_kwargs must be a dict"):
            generate(model, tok, "Hi?", chat=True, max_new_tokens=1, template_kwargs=bad)
