# ruff: noqa: E501  (the chat templates are copied as the models ship them, long lines included)
"""Chat templates: Ember renders what transformers' ``apply_chat_template`` renders (ChatML as
Qwen2.5 uses it with tools, Llama 3.1, Mistral [INST], Gemma 3, Phi-3), and the assistant-only loss mask
covers the assistant content and its end-of-turn token: the same tokens as transformers'
``return_assistant_tokens_mask`` for a template with ``{% generation %}`` blocks."""

from __future__ import annotations

import json

import pytest
from tokenizers import Tokenizer as Backend
from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

from ember import EmberError
from ember.engine.data import IGNORE, DataConfig, load_examples
from ember.engine.formats import parse
from ember.models.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")

QWEN25 = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""

LLAMA31 = r"""{{- bos_token }}
{%- if not date_string is defined %}
    {%- set date_string = "26 Jul 2024" %}
{%- endif %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\n\n" }}
{%- if tools is not none %}
    {{- "Environment: ipython\n" }}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\n" }}
{{- "Today Date: " + date_string + "\n\n" }}
{%- if tools is not none %}
    {{- "You have access to the following functions.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- set tool_call = message.tool_calls[0].function %}
        {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
        {{- '{"name": "' + tool_call.name + '", ' }}
        {{- '"parameters": ' }}
        {{- tool_call.arguments | tojson }}
        {{- "}" }}
        {{- "<|eot_id|>" }}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\n\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
"""

MISTRAL = r"""{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}
{{- bos_token }}
{%- for message in loop_messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('After the optional system message, conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {%- if message['role'] == 'user' %}
        {%- if loop.first and system_message is defined %}
            {{- ' [INST] ' + system_message + '\n\n' + message['content'] + ' [/INST]' }}
        {%- else %}
            {{- ' [INST] ' + message['content'] + ' [/INST]' }}
        {%- endif %}
    {%- elif message['role'] == 'assistant' %}
        {{- ' ' + message['content'] + eos_token}}
    {%- else %}
        {{- raise_exception('Only user and assistant roles are supported, with the exception of an initial optional system message!') }}
    {%- endif %}
{%- endfor %}
"""

GEMMA3 = r"""{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- endif -%}
    {{ '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\n'}}
{%- endif -%}
"""

PHI3 = ("{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\n' + "
        "message['content'] + '<|end|>\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\n' + "
        "message['content'] + '<|end|>\n'}}{% elif message['role'] == 'assistant' %}"
        "{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}")

# ChatML with generation blocks (as SmolLM3's and the transformers docs' templates mark them).
CHATML_GEN = ("{% for m in messages %}{% if m['role'] == 'assistant' %}"
              "{{ '<|im_start|>assistant\n' }}{% generation %}{{ m['content'] + '<|im_end|>' }}"
              "{% endgeneration %}{{ '\n' }}{% else %}{{ '<|im_start|>' + m['role'] + '\n' + "
              "m['content'] + '<|im_end|>\n' }}{% endif %}{% endfor %}"
              "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

# name: (template, bos, eos, end-of-turn token, the text an assistant turn is trained on)
TEMPLATES = {
    "qwen2.5": (QWEN25, None, "<|im_end|>", "<|im_end|>", "{}<|im_end|>"),
    "llama3.1": (LLAMA31, "<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", "{}<|eot_id|>"),
    "mistral": (MISTRAL, "<s>", "</s>", "</s>", " {}</s>"),
    "gemma3": (GEMMA3, "<bos>", "<eos>", "<end_of_turn>", "{}<end_of_turn>"),
    "phi3": (PHI3, "<s>", "<|endoftext|>", "<|end|>", "{}<|end|>"),
}
SPECIALS = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>",
            "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<bos>",
            "<eos>", "<start_of_turn>", "<end_of_turn>", "<|system|>", "<|user|>",
            "<|assistant|>", "<|end|>", "<|endoftext|>"]
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}]
SYSTEM = {"role": "system", "content": "You are terse."}
CHAT = [{"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris is the capital of France."},
        {"role": "user", "content": "And of Italy?"},
        {"role": "assistant", "content": "Rome, of course."}]
CALL = {"type": "function", "function": {"name": "get_weather",
                                         "arguments": {"city": "Paris", "unit": "C"}}}
TOOL_CHAT = [{"role": "user", "content": "Weather in Paris?"},
             {"role": "assistant", "content": "", "tool_calls": [CALL]},
             {"role": "tool", "name": "get_weather", "content": '{"temp": 21}'},
             {"role": "assistant", "content": "It is 21 degrees in Paris."}]


@pytest.fixture(scope="module")
def backend():
    tok = Backend(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = [json.dumps(c) for c in (CHAT, TOOL_CHAT, TOOLS)] + [QWEN25, LLAMA31]
    tok.train_from_iterator(text * 3, trainers.BpeTrainer(
        vocab_size=600, special_tokens=SPECIALS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tok


def _pair(backend, name, template=None):
    """(ember Tokenizer, transformers PreTrainedTokenizerFast) with the same vocabulary."""
    tpl, bos, eos, eot, _ = TEMPLATES.get(name, (template, None, "<|im_end|>", None, None))
    ours = Tokenizer(backend, bos_token=bos, eos_token=eos, chat_template=tpl,
                     extra_eos_token_ids=[backend.token_to_id(eot)] if eot else ())
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=bos,
                                              eos_token=eos, chat_template=tpl)
    return ours, hf


def _conversations(name):
    system = [] if name == "gemma3_nosys" else [SYSTEM]
    yield system + CHAT[:2], None
    yield system + CHAT, None
    if name in ("qwen2.5", "llama3.1"):  # the templates that take tool calls and tool results
        yield system + TOOL_CHAT, TOOLS
        yield TOOL_CHAT, TOOLS


def _load(tmp_path, ours, rows, **kw):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return load_examples(path, DataConfig(train=str(path), bad_lines="error", **kw), ours)


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_rendering_and_masks_match_transformers(tmp_path, backend, name):
    ours, hf = _pair(backend, name)
    turn = TEMPLATES[name][4]
    for messages, tools in _conversations(name):
        for gen in (False, True):
            want = hf.apply_chat_template(messages, tools=tools, tokenize=False,
                                          add_generation_prompt=gen)
            rec = parse({"messages": messages, **({"tools": tools} if tools else {})},
                        "messages")
            assert ours.apply_chat_template(rec, add_generation_prompt=gen,
                                            **({"tools": tools} if tools else {})) == want
        row = {"messages": messages, **({"tools": tools} if tools else {})}
        (ex,), _ = _load(tmp_path, ours, [row])
        full = hf.apply_chat_template(messages, tools=tools, tokenize=False)
        assert ex.input_ids == ours.encode(full)  # turn-by-turn tokens == the whole text's
        assert backend.decode(ex.input_ids, skip_special_tokens=False) == full
        target = backend.decode([t for t in ex.labels if t != IGNORE], skip_special_tokens=False)
        if tools:
            call = json.dumps(CALL["function"]["arguments"])
            head = ('<tool_call>\n{"name": "get_weather", "arguments": ' + call + "}\n</tool_call>"
                    if name == "qwen2.5" else '{"name": "get_weather", "parameters": ' + call + "}")
            assert target == head + turn.format("").strip() + turn.format(messages[-1]["content"])
        else:
            assert target == "".join(turn.format(m["content"]) for m in messages
                                     if m["role"] == "assistant")


def test_openai_string_arguments_render_like_objects(backend):
    ours, hf = _pair(backend, "qwen2.5")
    as_string = json.loads(json.dumps(TOOL_CHAT))
    args = as_string[1]["tool_calls"][0]["function"]
    args["arguments"] = json.dumps(args["arguments"])
    as_string[1]["content"] = None
    rec = parse({"messages": as_string, "tools": TOOLS}, "messages")
    want = hf.apply_chat_template(TOOL_CHAT, tools=TOOLS, tokenize=False)
    assert ours.apply_chat_template(rec, tools=TOOLS) == want


def test_assistant_mask_matches_generation_blocks(tmp_path, backend):
    ours, hf = _pair(backend, "chatml_gen", CHATML_GEN)
    for messages in ([SYSTEM, *CHAT], CHAT[:2]):
        out = hf.apply_chat_template(messages, tokenize=True, return_dict=True,
                                     return_assistant_tokens_mask=True)
        (ex,), _ = _load(tmp_path, ours, [{"messages": messages}])
        assert ex.input_ids == list(out["input_ids"])
        mask = [0] + [int(t != IGNORE) for t in ex.labels[:-1]]  # labels are pre-shifted
        assert mask == list(out["assistant_masks"])
        assert sum(mask) > 0


# Phi-3's template with its assistant text marked for transformers' assistant mask.
PHI3_GEN = ("{% for message in messages %}{% if message['role'] == 'assistant' %}"
            "{{ '<|assistant|>\n' }}{% generation %}{{ message['content'] + '<|end|>' }}"
            "{% endgeneration %}{{ '\n' }}{% else %}{{ '<|' + message['role'] + '|>\n' + "
            "message['content'] + '<|end|>\n' }}{% endif %}{% endfor %}"
            "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}"
            "{% endif %}")


@pytest.fixture(scope="module")
def spm_backend():
    """A Llama-2 / Mistral / Phi-3 style tokenizer.json: SentencePiece BPE whose normalizer
    prepends "▁" to every piece of text between special tokens."""
    tok = Backend(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"),
                                           normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    text = [m["content"] for m in [SYSTEM, *CHAT]] + ["[INST]", "[/INST]"]
    tok.train_from_iterator(text * 5, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", *SPECIALS], show_progress=False,
        initial_alphabet=["\n"]))
    return tok


@pytest.mark.parametrize("name", ["phi3", "mistral", "phi3_gen"])
def test_chat_is_tokenized_whole_as_transformers_does(tmp_path, spm_backend, name):
    """A turn tokenized on its own gets a "▁" (a space) that the whole text has not: the ids
    must be transformers' apply_chat_template(tokenize=True), and the mask its assistant mask."""
    tpl, bos, eos, eot, _ = TEMPLATES["phi3" if name == "phi3_gen" else name]
    tpl = PHI3_GEN if name == "phi3_gen" else tpl
    ours = Tokenizer(spm_backend, bos_token=bos, eos_token=eos, chat_template=tpl,
                     extra_eos_token_ids=[spm_backend.token_to_id(eot)])
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=spm_backend, bos_token=bos,
                                              eos_token=eos, chat_template=tpl)
    for messages in ([SYSTEM, *CHAT], CHAT[:2]):
        out = hf.apply_chat_template(messages, tokenize=True, return_dict=True,
                                     return_assistant_tokens_mask=name == "phi3_gen")
        (ex,), _ = _load(tmp_path, ours, [{"messages": messages}])
        assert ex.input_ids == list(out["input_ids"])
        if name == "phi3_gen":
            mask = [0] + [int(t != IGNORE) for t in ex.labels[:-1]]
            assert mask == list(out["assistant_masks"])
        (ex_hf,), _ = _load(tmp_path, hf, [{"messages": messages}])  # transformers' as the tokenizer
        assert ex_hf.input_ids == ex.input_ids


def _spm_with_bos(spm_backend):
    """(ember Tokenizer, transformers tokenizer) of the SPM vocabulary with a BOS-adding
    post-processor and no chat template."""
    from tokenizers import processors

    backend = Backend.from_str(spm_backend.to_str())
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", backend.token_to_id("<s>"))])
    ours = Tokenizer(backend, bos_token="<s>", eos_token="</s>")
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>",
                                              eos_token="</s>")
    return ours, hf


@pytest.mark.parametrize("completion", [" Paris.", "Paris is the capital.", "\nRome"])
def test_prompt_completion_is_tokenized_whole_as_trl_does(tmp_path, spm_backend, completion):
    """Without a chat template, prompt + completion is one text (TRL's SFT tokenizes it whole
    and trains from the end of the prompt's tokens on); encoded apart, an SPM completion gets a
    leading "▁" that the model never sees at inference."""
    ours, hf = _spm_with_bos(spm_backend)
    prompt = "What is the capital of France? Answer:"
    (ex,), _ = _load(tmp_path, ours, [{"prompt": prompt, "completion": completion}])
    want = hf(prompt + completion)["input_ids"] + [hf.eos_token_id]
    assert ex.input_ids == want
    start = len(hf(prompt)["input_ids"])  # TRL's completion mask starts here
    assert [t for t in ex.labels if t != IGNORE] == want[start:]
    assert ex.labels[:start - 1] == [IGNORE] * (start - 1)


@pytest.mark.parametrize("eos", ["<|endoftext|>", "<eos>"])
def test_end_of_turn_that_is_not_eos_ends_the_answer(tmp_path, backend, eos):
    """A tokenizer whose eos is not the template's end-of-turn token (Qwen2.5 base: eos
    <|endoftext|>, ChatML turns; Gemma 1: eos <eos>, turns end <end_of_turn>): the answer still
    ends at <|im_end|>, nothing is inserted, as transformers' assistant mask has it."""
    ours = Tokenizer(backend, eos_token=eos, chat_template=CHATML_GEN)
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=eos,
                                              chat_template=CHATML_GEN)
    for messages in ([SYSTEM, *CHAT], CHAT[:2]):
        out = hf.apply_chat_template(messages, tokenize=True, return_dict=True,
                                     return_assistant_tokens_mask=True)
        (ex,), _ = _load(tmp_path, ours, [{"messages": messages}])
        assert ex.input_ids == list(out["input_ids"])
        assert [0] + [int(t != IGNORE) for t in ex.labels[:-1]] == list(out["assistant_masks"])


# Gemma 3's template as it ships: string content, or a loop over content parts.
GEMMA3_PARTS = GEMMA3.replace("""    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- endif -%}""", """    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}""")


def test_text_parts_go_to_a_template_that_loops_over_content(tmp_path, backend):
    """OpenAI content parts: a template that loops over a message's content (Gemma 3) gets the
    parts, as transformers passes them (was: their texts joined with newlines, so two parts
    rendered "a\\nb" where transformers renders "ab"); a string-only template gets the joined
    text (transformers would render the list's repr)."""
    parts = [{"type": "text", "text": "Look at this."}, {"type": "text", "text": "  What is it?"}]
    messages = [{"role": "user", "content": parts},
                {"role": "assistant", "content": [{"type": "text", "text": "A cat."},
                                                  {"type": "text", "text": "Grey."}]}]
    assert GEMMA3_PARTS != GEMMA3
    ours = Tokenizer(backend, bos_token="<bos>", eos_token="<eos>", chat_template=GEMMA3_PARTS,
                     extra_eos_token_ids=[backend.token_to_id("<end_of_turn>")])
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<bos>",
                                              eos_token="<eos>", chat_template=GEMMA3_PARTS)
    rec = parse({"messages": messages}, "messages")
    for gen in (False, True):
        want = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
        assert ours.apply_chat_template(rec, add_generation_prompt=gen) == want
    (ex,), _ = _load(tmp_path, ours, [{"messages": messages}])
    assert ex.input_ids == list(hf.apply_chat_template(messages, tokenize=True,
                                                       return_dict=True)["input_ids"])
    target = backend.decode([t for t in ex.labels if t != IGNORE], skip_special_tokens=False)
    assert target == "A cat.Grey.<end_of_turn>"
    ours, _ = _pair(backend, "qwen2.5")
    text = ours.apply_chat_template(rec)
    assert "Look at this.\n  What is it?" in text and "'type'" not in text


def test_null_fields_of_openai_dumps_render_as_transformers(tmp_path, backend):
    """An OpenAI / vLLM response dumped as a message carries null for what it does not use
    (name, tool_call_id, reasoning_content, refusal) and no calls as [] or null: transformers
    drops None keys and the template reads [] as no calls (was: the line refused, 'tool_call_id
    must be a string, got null' / 'tool_calls must be a non-empty array')."""
    ours, hf = _pair(backend, "qwen2.5")
    messages = [{"role": "user", "content": CHAT[0]["content"], "name": None,
                 "tool_call_id": None},
                {"role": "assistant", "content": CHAT[1]["content"], "refusal": None,
                 "tool_calls": [], "reasoning_content": None, "function_call": None}]
    want = hf.apply_chat_template(messages, tokenize=False)
    assert ours.apply_chat_template(parse({"messages": messages}, "messages")) == want
    (ex,), _ = _load(tmp_path, ours, [{"messages": messages}])
    assert backend.decode(ex.input_ids, skip_special_tokens=False) == want


def test_completion_the_vocabulary_drops_still_trains_eos(tmp_path):
    """A BPE without unk drops text it cannot spell; a completion made only of it has no tokens
    of its own, so the line is the prompt's tokens and the EOS (no crash)."""
    tok = Backend(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(["hello world"] * 3, trainers.BpeTrainer(
        vocab_size=50, special_tokens=["<eos>"], show_progress=False))
    ours = Tokenizer(tok, eos_token="<eos>")
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")
    (ex,), _ = _load(tmp_path, ours, [{"prompt": "hello", "completion": "ééé"}])
    assert ex.input_ids == hf("helloééé")["input_ids"] + [hf.eos_token_id]
    assert [t for t in ex.labels if t != IGNORE] == [hf.eos_token_id]


# CHATML_GEN whose generation blocks honour OpenAI's per-message "weight" (0: not trained).
CHATML_WEIGHT = CHATML_GEN.replace(
    "{% generation %}{{ m['content'] + '<|im_end|>' }}{% endgeneration %}",
    "{% if m.get('weight', 1) %}{% generation %}{{ m['content'] + '<|im_end|>' }}"
    "{% endgeneration %}{% else %}{{ m['content'] + '<|im_end|>' }}{% endif %}")


def test_openai_weight_zero_leaves_an_assistant_turn_untrained(tmp_path, backend):
    """OpenAI's fine-tuning format: "weight": 0 on an assistant message makes it context (was:
    ignored, every assistant turn trained); the tokens are transformers' and the mask is its
    assistant mask for a template that skips weight-0 turns."""
    assert CHATML_WEIGHT != CHATML_GEN
    ours = Tokenizer(backend, eos_token="<|im_end|>", chat_template=CHATML_GEN)
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>",
                                              chat_template=CHATML_WEIGHT)
    messages = [dict(m) for m in [SYSTEM, *CHAT]]
    messages[2]["weight"], messages[4]["weight"] = 0, 1
    out = hf.apply_chat_template(messages, tokenize=True, return_dict=True,
                                 return_assistant_tokens_mask=True)
    (ex,), _ = _load(tmp_path, ours, [{"messages": messages}])
    assert ex.input_ids == list(out["input_ids"])
    assert [0] + [int(t != IGNORE) for t in ex.labels[:-1]] == list(out["assistant_masks"])
    messages[4]["weight"] = 0
    with pytest.raises(EmberError, match="every assistant message has weight 0"):
        _load(tmp_path, ours, [{"messages": messages}])
    messages[4]["weight"] = 0.5
    with pytest.raises(EmberError, match=r"messages\[4\].weight must be 0 or 1"):
        _load(tmp_path, ours, [{"messages": messages}])


def test_developer_messages_render_as_transformers(tmp_path, backend):
    """OpenAI's "developer" role (system instructions for its newer models) goes to the template
    as transformers passes it (was: 'unknown role' for every such line)."""
    ours, hf = _pair(backend, "chatml_gen", CHATML_GEN)
    messages = [{"role": "developer", "content": "Answer in one line."}, *CHAT[:2]]
    out = hf.apply_chat_template(messages, tokenize=True, return_dict=True,
                                 return_assistant_tokens_mask=True)
    (ex,), _ = _load(tmp_path, ours, [{"messages": messages}], system_prompt="Be kind.")
    assert ex.input_ids == list(out["input_ids"])  # its own instructions: no system prompt added
    assert [0] + [int(t != IGNORE) for t in ex.labels[:-1]] == list(out["assistant_masks"])


@pytest.mark.parametrize("completion", [" Paris.", "Paris is the capital."])
def test_kto_completion_is_tokenized_whole_as_trl_does(tmp_path, spm_backend, completion):
    """TRL's KTOTrainer tokenizes prompt + completion as one text and splits it at the prompt's
    length (one token earlier when the boundary token merged)."""
    from ember.engine.kto import load_kto_examples

    ours, hf = _spm_with_bos(spm_backend)
    prompt = "What is the capital of France? Answer:"
    path = tmp_path / "k.jsonl"
    path.write_text(json.dumps({"prompt": prompt, "completion": completion, "label": True}))
    (ex,), _ = load_kto_examples(path, DataConfig(train=str(path), bad_lines="error"), ours)
    p, full = hf(prompt)["input_ids"], hf(prompt + completion)["input_ids"]
    start = len(p) - (full[:len(p)] != p)  # trl.KTOTrainer's response_token_ids_start_idx
    assert ex.input_ids == full + [hf.eos_token_id]
    assert [t for t in ex.labels if t != IGNORE] == full[start:] + [hf.eos_token_id]


def test_preference_pairs_pass_their_tools_to_the_template(tmp_path, backend):
    """TRL's DPO renders a conversational pair with the line's ``tools``; Ember dropped them (the
    prompt the answers were scored after had no tool schemas). Each document is now transformers'
    apply_chat_template(prompt + answer, tools=...), and a string pair with tools is refused."""
    ours, hf = _pair(backend, "qwen2.5")
    prompt = TOOL_CHAT[:3]
    good, bad = TOOL_CHAT[3], {"role": "assistant", "content": "No idea."}
    row = {"prompt": prompt, "chosen": [good], "rejected": [bad], "tools": TOOLS}
    (ex,), _ = _load(tmp_path, ours, [row])
    n = ex.parts[0]
    for (ids, labels), answer in (((ex.input_ids[:n], ex.labels[:n]), good),
                                  ((ex.input_ids[n:], ex.labels[n:]), bad)):
        out = hf.apply_chat_template([*prompt, answer], tools=TOOLS, tokenize=True,
                                     return_dict=True)
        assert ids == out["input_ids"]
        assert "get_weather" in hf.decode(ids[:ex.prompt_len])
        target = hf.decode([t for t in labels if t != -100])
        assert target.startswith(answer["content"]), target
    with pytest.raises(EmberError, match="'tools' needs chat pairs"):
        _load(tmp_path, ours, [{"prompt": "q", "chosen": "a", "rejected": "b", "tools": TOOLS}])


@pytest.mark.parametrize("chosen,rejected", [(" Paris.", " Rome."), ("Paris is it.", "Rome")])
def test_dpo_string_pairs_are_tokenized_as_trl_1_does(tmp_path, spm_backend, chosen, rejected):
    """TRL 1.x's DPOTrainer (1.16, ``tokenize_fn``) appends the eos text to each answer,
    tokenizes prompt and prompt + answer with the tokenizer's own special tokens, and starts the
    answer where the two token lists diverge; Ember tokenized prompt and answer apart (TRL 0.x),
    which gave an SPM answer a leading "▁" the model never sees at inference."""
    ours, hf = _spm_with_bos(spm_backend)
    prompt = "What is the capital of France? Answer:"
    (ex,), _ = _load(tmp_path, ours, [{"prompt": prompt, "chosen": chosen,
                                       "rejected": rejected}])
    p = hf(text=prompt)["input_ids"]
    docs = (ex.input_ids[:ex.parts[0]], ex.labels[:ex.parts[0]]), (
        ex.input_ids[ex.parts[0]:], ex.labels[ex.parts[0]:])
    for (ids, labels), answer in zip(docs, (chosen, rejected), strict=True):
        full = hf(text=prompt + answer + hf.eos_token)["input_ids"]
        # TRL's common_prefix_length
        start = next((i for i, (a, b) in enumerate(zip(p, full, strict=False)) if a != b),
                     len(p))
        assert ids == full
        assert [t for t in labels if t != IGNORE] == full[start:]
