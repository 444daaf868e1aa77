# ruff: noqa: E501  (the marks are edits of templates copied as the models ship them)
"""Chat templates of the models users fine-tune, as they ship (``real_chat_templates``): Llama
3.2, Mistral Nemo and Small 3.2, Gemma 2, Phi-3.5, Phi-4, OLMo 2, Granite 3.3 and SmolLM3.
Ember renders what transformers' ``apply_chat_template`` renders (plain chats, system messages,
tools with tool calls and results, the generation prompt, ``continue_final_message``, template
variables, a pinned ``strftime_now``), a template's ``raise_exception`` is a clear EmberError, and
the assistant-only loss mask is transformers' ``return_assistant_tokens_mask`` on the same
template with each answer (its content and end-of-turn token) marked ``{% generation %}``."""

from __future__ import annotations

import datetime
import json

import pytest
from tokenizers import Tokenizer as Backend
from tokenizers import decoders, models, pre_tokenizers, trainers

import ember.models.chat_template as ember_chat_template
from ember import EmberError
from ember.engine.data import IGNORE, DataConfig, load_examples
from ember.engine.formats import parse
from ember.models.tokenizer import Tokenizer
from tests.engine import real_chat_templates as R
from tests.engine.test_chat_parity import CHAT, SYSTEM, TOOLS

transformers = pytest.importorskip("transformers")
hf_chat = pytest.importorskip("transformers.utils.chat_template_utils")


def _marked(template: str, *pairs: tuple[str, str]) -> str:
    for old, new in pairs:
        assert template.count(old) == 1, old
        template = template.replace(old, new)
    return template


GEN, END = "{% generation %}", "{% endgeneration %}"
# each template with its answers (content and end-of-turn token) marked for transformers' mask
MARKED = {
    "llama3.2": _marked(R.LLAMA32, (
        "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}",
        "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}{% if message.role == 'assistant' %}" + GEN
        + "{{- message['content'] | trim + '<|eot_id|>' }}" + END + "{% else %}{{- message['content'] | trim + '<|eot_id|>' }}{% endif %}"), (
        "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}\n", "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}\n" + GEN), (
        "{{- \"<|eot_id|>\" }}\n    {%- elif message.role == \"tool\"", "{{- \"<|eot_id|>\" }}" + END + "\n    {%- elif message.role == \"tool\"")),
    "nemo": _marked(R.MISTRAL_NEMO, ("{{- message[\"content\"] + eos_token}}", GEN + "{{- message[\"content\"] + eos_token}}" + END), (
        "{{- \"[TOOL_CALLS][\" }}", GEN + "{{- \"[TOOL_CALLS][\" }}"), (
        "{{- \"]\" + eos_token }}\n            {%- endif %}\n        {%- endfor %}", "{{- \"]\" + eos_token }}\n            {%- endif %}\n        {%- endfor %}" + END)),
    "gemma2": _marked(R.GEMMA2, (
        "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}",
        "{{ '<start_of_turn>' + role + '\n' }}{% if role == 'model' %}" + GEN + "{{ message['content'] | trim + '<end_of_turn>' }}" + END
        + "{{ '\n' }}{% else %}{{ message['content'] | trim + '<end_of_turn>\n' }}{% endif %}")),
    "phi3.5": _marked(R.PHI35, ("{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}",
                                "{{'<|assistant|>\n'}}" + GEN + "{{message['content'] + '<|end|>'}}" + END + "{{'\n'}}")),
    "phi4": _marked(R.PHI4, ("{{'<|im_start|>assistant<|im_sep|>' + message['content'] + '<|im_end|>'}}",
                             "{{'<|im_start|>assistant<|im_sep|>'}}" + GEN + "{{message['content'] + '<|im_end|>'}}" + END)),
    "olmo2": _marked(R.OLMO2, ("{{ '<|assistant|>\n'  + message['content'] + eos_token + '\n' }}",
                               "{{ '<|assistant|>\n' }}" + GEN + "{{ message['content'] + eos_token }}" + END + "{{ '\n' }}"), (
        "{{ '<|assistant|>\n'  + message['content'] + eos_token }}", "{{ '<|assistant|>\n' }}" + GEN + "{{ message['content'] + eos_token }}" + END)),
    "granite": _marked(R.GRANITE33, (
        "{{- '<|start_of_role|>' + message['role'] + '<|end_of_role|>' + message['content'] + '<|end_of_text|>\n' }}",
        "{{- '<|start_of_role|>' + message['role'] + '<|end_of_role|>' }}{%- if message['role'] == 'assistant' %}" + GEN
        + "{{- message['content'] + '<|end_of_text|>' }}" + END + "{{- '\n' }}{%- else %}{{- message['content'] + '<|end_of_text|>\n' }}{%- endif %}")),
    "smollm3": _marked(R.SMOLLM3, (
        "{{ \"<|im_start|>assistant\\n\" + content.lstrip(\"\\n\") + \"<|im_end|>\\n\" }}",
        "{{ \"<|im_start|>assistant\\n\" }}" + GEN + "{{ content.lstrip(\"\\n\") + \"<|im_end|>\" }}" + END + "{{ \"\\n\" }}"), (
        "{{ \"<|im_start|>assistant\\n\" + \"<think>\\n\\n</think>\\n\" + content.lstrip(\"\\n\") + \"<|im_end|>\\n\" }}",
        "{{ \"<|im_start|>assistant\\n\" + \"<think>\\n\\n</think>\\n\" }}" + GEN + "{{ content.lstrip(\"\\n\") + \"<|im_end|>\" }}" + END + "{{ \"\\n\" }}")),
    "small3.2": _marked(R.MISTRAL_SMALL32, (
        "{%- elif message['content'] is string %}\n            {{- message['content'] + eos_token }}",
        "{%- elif message['content'] is string %}\n            " + GEN + "{{- message['content'] + eos_token }}" + END), (
        "{%- if message.get('tool_calls') %}\n            {%- for tool_call", "{%- if message.get('tool_calls') %}" + GEN + "\n            {%- for tool_call"), (
        "{%- endfor %}\n            {{- eos_token }}\n        {%- elif", "{%- endfor %}\n            {{- eos_token }}" + END + "\n        {%- elif")),
}
# name: (template, bos, eos, end-of-turn tokens besides eos as generation_config.json lists them)
TEMPLATES = {
    "llama3.2": (R.LLAMA32, "<|begin_of_text|>", "<|eot_id|>", ["<|end_of_text|>"]),
    "nemo": (R.MISTRAL_NEMO, "<s>", "</s>", []),
    "gemma2": (R.GEMMA2, "<bos>", "<eos>", ["<end_of_turn>"]),
    "phi3.5": (R.PHI35, "<s>", "<|endoftext|>", ["<|end|>"]),
    "phi4": (R.PHI4, "<|endoftext|>", "<|im_end|>", []),
    "olmo2": (R.OLMO2, "<|endoftext|>", "<|endoftext|>", []),
    "granite": (R.GRANITE33, "<|end_of_text|>", "<|end_of_text|>", []),
    "smollm3": (R.SMOLLM3, None, "<|im_end|>", []),
    "small3.2": (R.MISTRAL_SMALL32, "<s>", "</s>", []),
}
SPECIALS = sorted({t for _, bos, eos, eot in TEMPLATES.values() for t in (bos, eos, *eot) if t} | {
    "<|start_header_id|>", "<|end_header_id|>", "<start_of_turn>", "<|system|>", "<|user|>",
    "<|assistant|>", "<|im_start|>", "<|im_sep|>", "<|start_of_role|>", "<|end_of_role|>",
    "[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_CALLS]",
    "[TOOL_RESULTS]", "[/TOOL_RESULTS]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[CALL_ID]",
    "[ARGS]", "[TOOL_CONTENT]", "<think>", "</think>"})
CALL = {"id": "call12345", "type": "function",  # Mistral's templates want 9-character ids
        "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
TOOL_CHAT = [{"role": "user", "content": "Weather in Paris?"},
             {"role": "assistant", "content": "", "tool_calls": [CALL]},
             {"role": "tool", "tool_call_id": "call12345", "name": "get_weather",
              "content": '{"temp": 21}'},
             {"role": "assistant", "content": "It is 21 degrees in Paris."}]
DOCUMENTS = [{"doc_id": 1, "title": "Paris", "text": "Paris is the capital of France."},
             {"doc_id": 2, "title": "Rome", "text": "Rome is the capital of Italy."}]
NO_SYSTEM = {"gemma2"}  # its template raises on a system message
ALTERNATE = {"gemma2", "nemo", "small3.2"}  # the templates that want a user message first
DATED = {"llama3.2", "granite", "small3.2"}  # the templates that call strftime_now
TOOL_CALLS = {"llama3.2", "nemo", "small3.2"}  # the templates that render tool calls
# template variables each model documents
VARIABLES = {"llama3.2": [{"date_string": "01 Jan 2025"}],
             "smollm3": [{"enable_thinking": False}],
             "granite": [{"controls": {"length": "short"}},
                         {"documents": DOCUMENTS, "controls": {"citations": True}}]}


class _Date(datetime.datetime):
    @classmethod
    def now(cls, tz=None):
        return cls(2026, 11, 5, 9, 30)


@pytest.fixture(autouse=True)
def pinned_date(monkeypatch):
    """``strftime_now`` (Llama 3.2, Granite, Mistral Small) reads the same day in both."""
    monkeypatch.setattr(hf_chat, "datetime", _Date)
    monkeypatch.setattr(ember_chat_template, "datetime", _Date)


@pytest.fixture(scope="module")
def backend():
    tok = Backend(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = [json.dumps(c) for c in (CHAT, TOOL_CHAT, TOOLS, DOCUMENTS)]
    tok.train_from_iterator(text * 3, trainers.BpeTrainer(
        vocab_size=500, special_tokens=SPECIALS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tok


def _pair(backend, name, template=None):
    """(Ember's tokenizer, transformers' with ``template`` or the model's own) of ``name``."""
    tpl, bos, eos, eot = TEMPLATES[name]
    ours = Tokenizer(backend, bos_token=bos, eos_token=eos, chat_template=tpl,
                     extra_eos_token_ids=[backend.token_to_id(t) for t in eot])
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=bos,
                                              eos_token=eos, chat_template=template or tpl)
    return ours, hf


def _conversations(name):
    """(messages, tools, template variables) that ``name``'s template renders."""
    system = [] if name in NO_SYSTEM else [SYSTEM]
    yield system + CHAT, None, {}
    yield CHAT[:2], None, {}
    if name not in NO_SYSTEM:
        yield [SYSTEM, *TOOL_CHAT], TOOLS, {}
    if name in TOOL_CALLS:  # earlier turns that the tools' place renders otherwise (Mistral)
        yield [*CHAT, *TOOL_CHAT], TOOLS, {}
    if name not in ALTERNATE:  # a greeting
        yield [{"role": "assistant", "content": "Hello! How can I help?"}, *CHAT], None, {}
    for variables in VARIABLES.get(name, ()):
        yield CHAT, None, variables


def _load(tmp_path, ours, messages, tools=None, variables=None):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"messages": messages, **({"tools": tools} if tools else {}),
                                **({"chat_template_kwargs": variables} if variables else {})}))
    (ex,), _ = load_examples(path, DataConfig(train=str(path), bad_lines="error",
                                              max_seq_len=4096), ours)
    return ex


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_rendering_matches_transformers(backend, name):
    ours, hf = _pair(backend, name)
    for messages, tools, variables in _conversations(name):
        line = {"messages": messages, **({"tools": tools} if tools else {})}
        for gen in (False, True):
            prompt = messages[:-1] if gen else messages
            want = hf.apply_chat_template(prompt, tools=tools, tokenize=False,
                                          add_generation_prompt=gen, **variables)
            got = ours.apply_chat_template(parse({**line, "messages": prompt}, "messages"),
                                           add_generation_prompt=gen, tools=tools, **variables)
            assert got == want
        if name in DATED and messages[0]["role"] != "system" and "date_string" not in variables:
            assert "2026" in want  # strftime_now's pinned day
        want = hf.apply_chat_template(messages, tools=tools, tokenize=False,
                                      continue_final_message=True, **variables)
        assert ours.apply_chat_template(parse(line, "messages"), tools=tools,
                                        continue_final_message=True, **variables) == want


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_assistant_mask_matches_generation_blocks(tmp_path, backend, name):
    """Multi-turn, tool-call and tool-result turns, template variables: Ember's tokens are
    transformers' and its trained tokens are the marked template's assistant mask."""
    ours, hf = _pair(backend, name, MARKED[name])
    _, plain = _pair(backend, name)
    for messages, tools, variables in _conversations(name):
        if tools and name not in TOOL_CALLS:
            continue  # (the template drops tool calls: an empty answer, nothing to compare)
        assert hf.apply_chat_template(messages, tools=tools, tokenize=False, **variables) == (
            plain.apply_chat_template(messages, tools=tools, tokenize=False, **variables))
        out = hf.apply_chat_template(messages, tools=tools, tokenize=True, return_dict=True,
                                     return_assistant_tokens_mask=True, **variables)
        ex = _load(tmp_path, ours, messages, tools, variables)
        assert ex.input_ids == list(out["input_ids"])
        mask = [0] + [int(t != IGNORE) for t in ex.labels[:-1]]  # labels are pre-shifted
        assert mask == list(out["assistant_masks"]), backend.decode(
            [t for t in ex.labels if t != IGNORE], skip_special_tokens=False)


@pytest.mark.parametrize("name, messages, kwargs, why", [
    ("gemma2", [SYSTEM, *CHAT], {}, "System role not supported"),
    ("gemma2", CHAT[1:], {}, "Conversation roles must alternate"),
    ("nemo", [TOOL_CHAT[0], {**TOOL_CHAT[1], "tool_calls": [{**CALL, "id": "call1"}]}],
     {"tools": TOOLS}, "Tool call IDs should be alphanumeric strings with length 9"),
    ("small3.2", [*TOOL_CHAT[:2], {**TOOL_CHAT[2], "tool_call_id": "c1"}], {"tools": TOOLS},
     "Tool call IDs should be alphanumeric strings with length 9"),
    ("llama3.2", [TOOL_CHAT[0], {**TOOL_CHAT[1], "tool_calls": [CALL, CALL]}], {"tools": TOOLS},
     "This model only supports single tool-calls"),
], ids=["gemma2-system", "gemma2-order", "nemo-call-id", "small3.2-result-id", "llama3.2-calls"])
def test_template_errors_are_clear(tmp_path, backend, name, messages, kwargs, why):
    """A template's raise_exception() is transformers' TemplateError with the template's words;
    Ember's is an EmberError with them (rendering) and a line's error (training data)."""
    ours, hf = _pair(backend, name)
    with pytest.raises(Exception, match=why) as hf_error:
        hf.apply_chat_template(messages, tokenize=False, **kwargs)
    assert "TemplateError" in type(hf_error.value).__name__
    with pytest.raises(EmberError, match=f"chat template failed: {why}"):
        ours.apply_chat_template(parse({"messages": messages}, "messages"), **kwargs)
    with pytest.raises(EmberError, match=f"d.jsonl:1: .*{why}"):
        _load(tmp_path, ours, messages, kwargs.get("tools"))


def test_documents_of_a_line_reach_the_template(tmp_path, backend):
    """TRL passes a line's ``chat_template_kwargs`` to apply_chat_template whole, so
    ``documents`` there render (Granite's RAG turns); Ember refused every such line as setting
    one of apply_chat_template's own arguments. A value that is not a list of objects is the
    line's error, as transformers refuses it."""
    ours, hf = _pair(backend, "granite", MARKED["granite"])
    ex = _load(tmp_path, ours, CHAT, variables={"documents": DOCUMENTS})
    out = hf.apply_chat_template(CHAT, documents=DOCUMENTS, tokenize=True, return_dict=True,
                                 return_assistant_tokens_mask=True)
    assert ex.input_ids == list(out["input_ids"])
    assert DOCUMENTS[1]["text"] in backend.decode(ex.input_ids)
    assert [0] + [int(t != IGNORE) for t in ex.labels[:-1]] == list(out["assistant_masks"])
    with pytest.raises(TypeError, match="Documents should be a list of dicts"):
        hf.apply_chat_template(CHAT, documents=["Paris is the capital."], tokenize=False)
    with pytest.raises(EmberError, match="d.jsonl:1: .*'documents' must be an array of objects"):
        _load(tmp_path, ours, CHAT, variables={"documents": ["Paris is the capital."]})


QWEN35_GEN = _marked(R.QWEN35, (
    """        {%- if loop.index0 > ns.last_query_index %}
            {{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content + '\\n</think>\\n\\n' + content }}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\\n' + content }}
        {%- endif %}""",
    """        {%- if loop.index0 > ns.last_query_index %}
            {{- '<|im_start|>' + message.role + '\\n<think>\\n' }}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\\n' }}
        {%- endif %}
        {%- generation %}
        {%- if loop.index0 > ns.last_query_index %}
            {{- reasoning_content + '\\n</think>\\n\\n' + content }}
        {%- else %}
            {{- content }}
        {%- endif %}"""), (
    """        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}""",
    """        {{- '<|im_end|>' }}
        {%- endgeneration %}
        {{- '\\n' }}
    {%- elif message.role == "tool" %}"""))


def test_turns_whose_prompt_opens_a_think_block_are_found(tmp_path, backend):
    """Qwen3.5's generation prompt opens a think block (``<|im_start|>assistant\\n<think>\\n``)
    that an earlier turn, once a later question follows, renders without
    (``<|im_start|>assistant\\nParis...``): Ember refused every multi-turn line ("does not render
    this conversation turn by turn"). The turn now starts where the prompt and the conversation
    part; the mask is the marked template's (history turns: content and <|im_end|>; the last
    query's: its reasoning, answer and <|im_end|>, after the prompt's ``<think>\\n``)."""
    ours = Tokenizer(backend, eos_token="<|im_end|>", chat_template=R.QWEN35)
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>",
                                              chat_template=QWEN35_GEN)
    think = [CHAT[0], {**CHAT[1], "reasoning_content": "France is asked."}, CHAT[2],
             {**CHAT[3], "reasoning_content": "Italy now."}]
    tool_think = [*TOOL_CHAT[:3], {**TOOL_CHAT[3], "reasoning_content": "It is warm."}]
    for messages, tools in (([SYSTEM, *CHAT], None), (think, None), (think + think, None),
                            ([*CHAT, *TOOL_CHAT], TOOLS), (tool_think, TOOLS)):
        assert hf.apply_chat_template(messages, tools=tools, tokenize=False) == (
            hf.apply_chat_template(messages, tools=tools, tokenize=False,
                                   chat_template=R.QWEN35))
        out = hf.apply_chat_template(messages, tools=tools, tokenize=True, return_dict=True,
                                     return_assistant_tokens_mask=True)
        ex = _load(tmp_path, ours, messages, tools)
        assert ex.input_ids == list(out["input_ids"])
        mask = [0] + [int(t != IGNORE) for t in ex.labels[:-1]]
        assert mask == list(out["assistant_masks"]), backend.decode(
            [t for t in ex.labels if t != IGNORE], skip_special_tokens=False)


def test_gpt_oss_turns_with_reasoning_are_found(tmp_path):
    """gpt-oss renders an answer's analysis only in the last turn and ends the last answer with
    <|return|> (its EOS), an earlier one with <|end|>: a line whose earlier answers carry
    ``thinking`` was refused. Tokens are transformers'; each answer trains from its channel on
    (after the prompt's ``<|start|>assistant``), the last one through <|return|>."""
    specials = ["<|start|>", "<|message|>", "<|channel|>", "<|end|>", "<|return|>", "<|call|>"]
    tok = Backend(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([json.dumps(CHAT)] * 3, trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    ours = Tokenizer(tok, eos_token="<|return|>", chat_template=R.GPT_OSS,
                     extra_eos_token_ids=[tok.token_to_id("<|call|>")])
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|return|>",
                                              chat_template=R.GPT_OSS)
    messages = [CHAT[0], {**CHAT[1], "thinking": "France is asked."}, CHAT[2],
                {**CHAT[3], "thinking": "Italy now."}]
    ex = _load(tmp_path, ours, messages)
    assert ex.input_ids == hf.apply_chat_template(messages, tokenize=True, return_dict=False)
    trained, run = [], []
    for t in ex.labels:
        if t == IGNORE and run:
            trained, run = [*trained, tok.decode(run, skip_special_tokens=False)], []
        elif t != IGNORE:
            run.append(t)
    assert trained == ["<|channel|>final<|message|>Paris is the capital of France.",
                       "<|channel|>analysis<|message|>Italy now.<|end|><|start|>assistant"
                       "<|channel|>final<|message|>Rome, of course.<|return|>"]


GLM45_GEN = _marked(R.GLM45, (
    "{%- if loop.index0 > ns.last_user_index and reasoning_content -%}",
    "{%- generation -%}\n{%- if loop.index0 > ns.last_user_index and reasoning_content -%}"), (
    "</tool_call>{% endfor %}\n{% endif %}\n", "</tool_call>{% endfor %}\n{% endif %}{%- endgeneration -%}\n"))


def test_turns_without_an_end_of_turn_are_found(tmp_path, backend):
    """GLM-4.5 ends an answer with its text (the next message's role token follows) and drops
    an earlier answer's reasoning: a line whose earlier answers carry reasoning was refused
    ("does not render this conversation turn by turn"). Tokens and mask are transformers' on the
    template with each answer marked after ``<|assistant|>``, and Ember's EOS after the last."""
    ours = Tokenizer(backend, eos_token="<|endoftext|>", chat_template=R.GLM45)
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>",
                                              chat_template=GLM45_GEN)
    think = [CHAT[0], {**CHAT[1], "reasoning_content": "France is asked."}, CHAT[2],
             {**CHAT[3], "reasoning_content": "Italy now."}]
    tool_think = [*TOOL_CHAT[:3], {**TOOL_CHAT[3], "reasoning_content": "It is warm."}]
    for messages, tools in ((think, None), ([SYSTEM, *think, *think], None),
                            (tool_think, TOOLS)):
        assert hf.apply_chat_template(messages, tools=tools, tokenize=False) == (
            hf.apply_chat_template(messages, tools=tools, tokenize=False, chat_template=R.GLM45))
        out = hf.apply_chat_template(messages, tools=tools, tokenize=True, return_dict=True,
                                     return_assistant_tokens_mask=True)
        ex = _load(tmp_path, ours, messages, tools)
        assert ex.input_ids == [*out["input_ids"], hf.eos_token_id]
        mask = [0] + [int(t != IGNORE) for t in ex.labels[:-1]]
        assert mask == [*out["assistant_masks"], 1], backend.decode(
            [t for t in ex.labels if t != IGNORE], skip_special_tokens=False)


@pytest.mark.parametrize("name", ["phi4", "llama3.2"])
def test_tool_calls_a_template_drops_are_reported(tmp_path, backend, name):
    """Phi-4's template writes only an assistant message's content: a tool-call turn trains its
    end of turn alone (as TRL trains it). The render says so (transformers' render of the
    conversation without the calls is the same text) and the data report notes it; Llama
    3.2's template renders the calls, and no note is made."""
    ours, hf = _pair(backend, name)
    messages = [SYSTEM, *TOOL_CHAT]
    bare = [{k: v for k, v in m.items() if k != "tool_calls"} for m in messages]
    render = (hf.apply_chat_template(m, tools=TOOLS, tokenize=False) for m in (messages, bare))
    drops = next(render) == next(render)
    assert drops == (name == "phi4")
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"messages": messages, "tools": TOOLS}) + "\n"
                    + json.dumps({"messages": CHAT}) + "\n")
    _, rep = load_examples(path, DataConfig(train=str(path), bad_lines="error",
                                            max_seq_len=4096), ours)
    assert rep.tool_calls_dropped == drops
    assert ("1 conversations hold tool calls that the chat template does not render"
            in rep.summary()) == drops


def _pair_line(messages, tools, variables):
    """A DPO line of ``messages``: the prompt, the last answer chosen, another rejected."""
    return {"prompt": messages[:-1], "chosen": [messages[-1]],
            "rejected": [{"role": "assistant", "content": "No idea."}],
            **({"tools": tools} if tools else {}),
            **({"chat_template_kwargs": variables} if variables else {})}


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_eval_prompt_is_transformers_generation_prompt(tmp_path, backend, name):
    """Generation metrics complete ``Example.prompt_ids``: transformers' ``apply_chat_template(
    conversation up to the answer, add_generation_prompt=True)`` ids, which vLLM and lm-eval's
    chat mode feed. Ember fed the training context (the whole render up to the answer), which
    differs for Mistral Nemo (the system message is written in the last user turn only when
    that turn ends the conversation: the prompt lacked it) and Granite with controls (written in
    the generation prompt only); the training tokens stay the whole render's. DPO pairs (the
    chosen half) and data.system_prompt alike."""
    ours, hf = _pair(backend, name)
    for messages, tools, variables in _conversations(name):
        want = hf.apply_chat_template(messages[:-1], tools=tools, add_generation_prompt=True,
                                      tokenize=True, return_dict=False, **variables)
        ex = _load(tmp_path, ours, messages, tools, variables)
        assert ex.prompt_ids == want
        assert ex.input_ids == hf.apply_chat_template(messages, tools=tools, tokenize=True,
                                                      return_dict=False, **variables)
        if messages[0]["role"] == "user" or messages[0] == SYSTEM:
            path = tmp_path / "p.jsonl"
            path.write_text(json.dumps(_pair_line(messages, tools, variables)))
            (pair,), _ = load_examples(path, DataConfig(train=str(path), bad_lines="error",
                                                        max_seq_len=4096), ours)
            assert pair.prompt_ids == want
    if name not in NO_SYSTEM:  # data.system_prompt goes where the line's system message would
        path = tmp_path / "s.jsonl"
        path.write_text(json.dumps({"prompt": CHAT[0]["content"], "completion": "Paris."}))
        (ex,), _ = load_examples(path, DataConfig(train=str(path), system_prompt="Be terse.",
                                                  max_seq_len=4096), ours)
        assert ex.prompt_ids == hf.apply_chat_template(
            [{"role": "system", "content": "Be terse."}, CHAT[0]], add_generation_prompt=True,
            tokenize=True, return_dict=False)


def test_eval_prompt_is_cut_as_the_training_context(tmp_path, backend):
    """A line over data.max_seq_len (truncate_left) loses the same prompt tokens, after the
    BOS, from the generation prompt as from its training context."""
    ours, hf = _pair(backend, "nemo")
    messages = [SYSTEM, *CHAT]
    whole = hf.apply_chat_template(messages, tokenize=True, return_dict=False)
    want = hf.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=True,
                                  return_dict=False)
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"messages": messages}))
    (ex,), _ = load_examples(path, DataConfig(train=str(path), max_seq_len=len(whole) - 5),
                             ours)
    assert ex.input_ids == whole[:1] + whole[6:]
    assert ex.prompt_ids == want[:1] + want[6:]
