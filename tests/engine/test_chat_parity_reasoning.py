# ruff: noqa: E501  (the chat templates are copied as the models ship them, long lines included)
"""Assistant-only loss masks on reasoning models' templates, which render a turn differently
once later messages follow or open the generation prompt with more than a turn renders
(DeepSeek-R1-Distill's ``<｜Assistant｜><think>\\n``, Qwen3's think blocks). The oracle is
transformers' ``return_assistant_tokens_mask`` on the same template with its assistant text
marked by ``{% generation %}`` (a mark that changes nothing in the render: checked here);
Ember locates assistant turns without the marks."""

from __future__ import annotations

import json

import pytest
from tokenizers import Tokenizer as Backend
from tokenizers import decoders, models, pre_tokenizers, trainers

from ember.engine.data import IGNORE, DataConfig, load_examples
from ember.models.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")

# DeepSeek-R1-Distill-Qwen's template as it ships
R1_DISTILL = "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}{% set ns = namespace(is_first=false, is_tool=false, is_output_first=true, system_prompt='') %}{%- for message in messages %}{%- if message['role'] == 'system' %}{% set ns.system_prompt = message['content'] %}{%- endif %}{%- endfor %}{{bos_token}}{{ns.system_prompt}}{%- for message in messages %}{%- if message['role'] == 'user' %}{%- set ns.is_tool = false -%}{{'<｜User｜>' + message['content']}}{%- endif %}{%- if message['role'] == 'assistant' and message['content'] is none %}{%- set ns.is_tool = false -%}{%- for tool in message['tool_calls']%}{%- if not ns.is_first %}{{'<｜Assistant｜><｜tool▁calls▁begin｜><｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + tool['function']['name'] + '\\n' + '```json' + '\\n' + tool['function']['arguments'] + '\\n' + '```' + '<｜tool▁call▁end｜>'}}{%- set ns.is_first = true -%}{%- else %}{{'\\n' + '<｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + tool['function']['name'] + '\\n' + '```json' + '\\n' + tool['function']['arguments'] + '\\n' + '```' + '<｜tool▁call▁end｜>'}}{{'<｜tool▁calls▁end｜><｜end▁of▁sentence｜>'}}{%- endif %}{%- endfor %}{%- endif %}{%- if message['role'] == 'assistant' and message['content'] is not none %}{%- if ns.is_tool %}{{'<｜tool▁outputs▁end｜>' + message['content'] + '<｜end▁of▁sentence｜>'}}{%- set ns.is_tool = false -%}{%- else %}{% set content = message['content'] %}{% if '</think>' in content %}{% set content = content.split('</think>')[-1] %}{% endif %}{{'<｜Assistant｜>' + content + '<｜end▁of▁sentence｜>'}}{%- endif %}{%- endif %}{%- if message['role'] == 'tool' %}{%- set ns.is_tool = true -%}{%- if ns.is_output_first %}{{'<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>'}}{%- set ns.is_output_first = false %}{%- else %}{{'\\n<｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>'}}{%- endif %}{%- endif %}{%- endfor -%}{% if ns.is_tool %}{{'<｜tool▁outputs▁end｜>'}}{% endif %}{% if add_generation_prompt and not ns.is_tool %}{{'<｜Assistant｜><think>\\n'}}{% endif %}"
R1_DISTILL_GEN = R1_DISTILL.replace(
    "{{'<｜Assistant｜>' + content + '<｜end▁of▁sentence｜>'}}",
    "{{'<｜Assistant｜>'}}{% generation %}{{content + '<｜end▁of▁sentence｜>'}}{% endgeneration %}")

# Qwen3's template as it ships (its assistant branch is below, in QWEN3 and QWEN3_GEN)
QWEN3_HEAD = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\n\n' }}
    {%- endif %}
    {{- "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and message.content is string and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.content is string %}
        {%- set content = message.content %}
    {%- else %}
        {%- set content = '' %}
    {%- endif %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\n' + content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in content %}
                {%- set reasoning_content = content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}
                {%- set content = content.split('</think>')[-1].lstrip('\n') %}
            {%- endif %}
        {%- endif %}
"""
QWEN3_TURN = r"""        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\n<think>\n' + reasoning_content.strip('\n') + '\n</think>\n\n' + content.lstrip('\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\n' + content }}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and content) or (not loop.first) %}
                    {{- '\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
"""
QWEN3_TAIL = r"""    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\n\n</think>\n\n' }}
    {%- endif %}
{%- endif %}"""
QWEN3 = QWEN3_HEAD + QWEN3_TURN + QWEN3_TAIL
# the same text, with the header written first and the rest of the turn marked
QWEN3_GEN = QWEN3_HEAD + "        {{- '<|im_start|>' + message.role + '\\n' }}\n        {%- generation %}\n" + (
    QWEN3_TURN.replace("'<|im_start|>' + message.role + '\\n<think>\\n'", "'<think>\\n'")
    .replace("'<|im_start|>' + message.role + '\\n' + content", "content")
    .replace("{{- '<|im_end|>\\n' }}", "{{- '<|im_end|>' }}\n        {%- endgeneration %}\n        {{- '\\n' }}")
) + QWEN3_TAIL

# DeepSeek-R1's template as it ships (DeepSeek V3's tool calls: arguments joined as text)
DEEPSEEK_R1 = "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}{% set ns = namespace(is_first=false, is_tool=false, is_output_first=true, system_prompt='', is_first_sp=true) %}{%- for message in messages %}{%- if message['role'] == 'system' %}{%- if ns.is_first_sp %}{% set ns.system_prompt = ns.system_prompt + message['content'] %}{% set ns.is_first_sp = false %}{%- else %}{% set ns.system_prompt = ns.system_prompt + '\\n\\n' + message['content'] %}{%- endif %}{%- endif %}{%- endfor %}{{ bos_token }}{{ ns.system_prompt }}{%- for message in messages %}{%- if message['role'] == 'user' %}{%- set ns.is_tool = false -%}{{'<｜User｜>' + message['content']}}{%- endif %}{%- if message['role'] == 'assistant' and 'tool_calls' in message %}{%- set ns.is_tool = false -%}{%- for tool in message['tool_calls'] %}{%- if not ns.is_first %}{%- if message['content'] is none %}{{'<｜Assistant｜><｜tool▁calls▁begin｜><｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + tool['function']['name'] + '\\n' + '```json' + '\\n' + tool['function']['arguments'] + '\\n' + '```' + '<｜tool▁call▁end｜>'}}{%- else %}{{'<｜Assistant｜>' + message['content'] + '<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + tool['function']['name'] + '\\n' + '```json' + '\\n' + tool['function']['arguments'] + '\\n' + '```' + '<｜tool▁call▁end｜>'}}{%- endif %}{%- set ns.is_first = true -%}{%- else %}{{'\\n' + '<｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + tool['function']['name'] + '\\n' + '```json' + '\\n' + tool['function']['arguments'] + '\\n' + '```' + '<｜tool▁call▁end｜>'}}{%- endif %}{%- endfor %}{{'<｜tool▁calls▁end｜><｜end▁of▁sentence｜>'}}{%- endif %}{%- if message['role'] == 'assistant' and 'tool_calls' not in message %}{%- if ns.is_tool %}{{'<｜tool▁outputs▁end｜>' + message['content'] + '<｜end▁of▁sentence｜>'}}{%- set ns.is_tool = false -%}{%- else %}{% set content = message['content'] %}{% if '</think>' in content %}{% set content = content.split('</think>')[-1] %}{% endif %}{{'<｜Assistant｜>' + content + '<｜end▁of▁sentence｜>'}}{%- endif %}{%- endif %}{%- if message['role'] == 'tool' %}{%- set ns.is_tool = true -%}{%- if ns.is_output_first %}{{'<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>'}}{%- set ns.is_output_first = false %}{%- else %}{{'<｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>'}}{%- endif %}{%- endif %}{%- endfor -%}{% if ns.is_tool %}{{'<｜tool▁outputs▁end｜>'}}{% endif %}{% if add_generation_prompt and not ns.is_tool %}{{'<｜Assistant｜><think>\\n'}}{% endif %}"

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>",
            "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>"]
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
# The tool-call part of Mistral's templates (Mistral Small 3.x, Devstral, Magistral): the
# arguments through a variable, a string as given, anything else tojson'd
MISTRAL_TOOLS = (
    "{{ bos_token }}{%- for message in messages %}{%- if message['role'] == 'user' %}"
    "{{- '[INST]' + message['content'] + '[/INST]' }}{%- elif message['role'] == 'tool' %}"
    "{{- '[TOOL_RESULTS]' + message['content'] + '[/TOOL_RESULTS]' }}"
    "{%- elif message['role'] == 'assistant' and message.tool_calls %}"
    "{%- for tool in message.tool_calls %}{%- set arguments = tool.function.arguments %}"
    "{%- if arguments is not string %}{%- set arguments = arguments|tojson|safe %}"
    "{%- elif arguments == '' %}{%- set arguments = '{}' %}{%- endif %}"
    "{{- '[TOOL_CALLS]' + tool.function.name + '[ARGS]' + arguments }}{%- endfor %}"
    "{{- eos_token }}{%- elif message['role'] == 'assistant' %}{{- message['content'] + eos_token }}"
    "{%- endif %}{%- endfor %}")
SYSTEM = {"role": "system", "content": "You are terse."}
Q1, Q2 = ({"role": "user", "content": c} for c in ("What is the capital of France?", "And Italy?"))
A1 = {"role": "assistant", "content": "<think>\nIt is Paris.\n</think>\n\nParis."}
A2 = {"role": "assistant", "content": "Rome, of course."}
CALL = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
TOOL_CHAT = [Q1, {"role": "assistant", "content": "", "tool_calls": [CALL]},
             {"role": "tool", "content": '{"temp": 21}'}, {"role": "assistant", "content": "21 C."}]


@pytest.fixture(scope="module")
def backend():
    tok = Backend(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = [json.dumps(c) for c in ([SYSTEM, Q1, A1, Q2, A2], TOOL_CHAT, TOOLS)]
    tok.train_from_iterator(text * 3, trainers.BpeTrainer(
        vocab_size=500, special_tokens=SPECIALS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tok


@pytest.mark.parametrize("name, template, marked, bos, eos, chats", [
    ("r1-distill", R1_DISTILL, R1_DISTILL_GEN, "<｜begin▁of▁sentence｜>",
     "<｜end▁of▁sentence｜>", [[SYSTEM, Q1, A2], [Q1, A1, Q2, A2]]),
    ("qwen3", QWEN3, QWEN3_GEN, None, "<|im_end|>",
     [[SYSTEM, Q1, A1, Q2, A2], TOOL_CHAT, [SYSTEM, *TOOL_CHAT]]),
], ids=["r1-distill", "qwen3"])
def test_reasoning_templates_mask_as_generation_blocks(tmp_path, backend, name, template,
                                                        marked, bos, eos, chats):
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=bos,
                                              eos_token=eos, chat_template=marked)
    ours = Tokenizer(backend, bos_token=bos, eos_token=eos, chat_template=template)
    for i, messages in enumerate(chats):
        tools = TOOLS if "tool_calls" in json.dumps(messages) else None
        as_shipped = hf.apply_chat_template(messages, tools=tools, tokenize=False,
                                            chat_template=template)
        assert hf.apply_chat_template(messages, tools=tools, tokenize=False) == as_shipped
        out = hf.apply_chat_template(messages, tools=tools, tokenize=True, return_dict=True,
                                     return_assistant_tokens_mask=True)
        path = tmp_path / f"{name}{i}.jsonl"
        path.write_text(json.dumps({"messages": messages,
                                    **({"tools": tools} if tools else {})}) + "\n")
        (ex,), _ = load_examples(path, DataConfig(train=str(path), bad_lines="error"), ours)
        assert ex.input_ids == list(out["input_ids"])
        mask = [0] + [int(t != IGNORE) for t in ex.labels[:-1]]  # labels are pre-shifted
        assert mask == list(out["assistant_masks"])
        assert sum(mask) > 0


def _tool_line(tmp_path, backend, template, messages):
    """(transformers' tokenizer, its rendering, Ember's example) of one tool-call line."""
    bos = "<｜begin▁of▁sentence｜>" if template == DEEPSEEK_R1 else None
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=bos,
                                              eos_token="<|im_end|>", chat_template=template)
    ours = Tokenizer(backend, bos_token=bos, eos_token="<|im_end|>", chat_template=template)
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"messages": messages, "tools": TOOLS}) + "\n")
    (ex,), _ = load_examples(path, DataConfig(train=str(path), bad_lines="error"), ours)
    return hf, hf.apply_chat_template(messages, tools=TOOLS, tokenize=False), ex


@pytest.mark.parametrize("template", [QWEN3, DEEPSEEK_R1, MISTRAL_TOOLS],
                         ids=["qwen3", "deepseek-r1", "mistral"])
def test_openai_argument_text_goes_to_templates_that_read_text(tmp_path, backend, template):
    """OpenAI's tool-call arguments are JSON text. Ember decodes them for templates that
    ``tojson`` the arguments, but Qwen3 writes a string as given and DeepSeek joins it with
    ``+``: decoded, Qwen3's text was re-spaced and re-escaped, and DeepSeek refused every line
    (a dict joined to a str); Mistral tests ``is not string`` on a variable set to them (Ember
    missed it, and its tojson re-spaced the text). Such templates get the text, as transformers
    renders it."""
    call = {"type": "function", "function": {"name": "get_weather",
                                             "arguments": '{"city":"Z\\u00fcrich"}'}}
    messages = [Q1, {"role": "assistant", "content": "", "tool_calls": [call]},
                {"role": "tool", "content": '{"temp": 21}'}, A2]
    hf, want, ex = _tool_line(tmp_path, backend, template, messages)
    assert '{"city":"Z\\u00fcrich"}' in want
    assert ex.input_ids == hf.apply_chat_template(messages, tools=TOOLS, tokenize=True,
                                                  return_dict=False)
    assert backend.decode(ex.input_ids, skip_special_tokens=False) == want


@pytest.mark.parametrize("template", [QWEN3, DEEPSEEK_R1, MISTRAL_TOOLS],
                         ids=["qwen3", "deepseek-r1", "mistral"])
def test_openai_empty_argument_text_renders_as_transformers(tmp_path, backend, template):
    """``"arguments": ""`` (a call without arguments) was refused as "not JSON"; transformers
    passes the string ("" in Qwen3's and DeepSeek's, {} in Mistral's, which tests for it)."""
    call = {"type": "function", "function": {"name": "get_weather", "arguments": ""}}
    messages = [Q1, {"role": "assistant", "content": "", "tool_calls": [call]},
                {"role": "tool", "content": '{"temp": 21}'}, A2]
    _, want, ex = _tool_line(tmp_path, backend, template, messages)
    assert backend.decode(ex.input_ids, skip_special_tokens=False) == want
    # a template that only handles a mapping (Qwen3-Coder's items()) gets {} (no arguments)
    from ember.engine.formats import parse_messages
    args = parse_messages([messages[1]])[0]["tool_calls"][0]["function"]["arguments"]
    assert args == {} and args.text == ""


def test_argument_text_goes_to_a_template_writing_a_non_mapping_as_given(backend):
    """``{% if arguments is mapping %}{{ arguments|tojson }}{% else %}{{ arguments }}``: with
    OpenAI's JSON text transformers writes the text as given (Ember wrote the decoded object
    re-spaced); a template handling only a mapping (Qwen3-Coder's items()) still gets it."""
    from ember.engine.formats import parse_messages
    loop = ("{% for m in messages %}{% for c in m.tool_calls %}{% set a = c.function.arguments %}"
            "{% if a is mapping %}BODY{% endif %}{% endfor %}{% endfor %}")
    either = loop.replace("BODY", "{{ a|tojson }}{% else %}{{ a }}")
    pairs = loop.replace("BODY", "{% for k, v in a.items() %}{{ k }}={{ v }}{% endfor %}")
    call = {"type": "function", "function": {"name": "f", "arguments": '{"city":"Z\\u00fcrich"}'}}
    messages = [{"role": "assistant", "content": "", "tool_calls": [call]}]
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>",
                                              chat_template=either)
    ours = Tokenizer(backend, eos_token="<|im_end|>")
    parsed = parse_messages(messages)
    want = hf.apply_chat_template(messages, tokenize=False)
    assert want == '{"city":"Z\\u00fcrich"}'
    assert ours.apply_chat_template(parsed, chat_template=either) == want
    assert ours.apply_chat_template(parsed, chat_template=pairs) == "city=Zürich"


@pytest.mark.parametrize("name", ["r1-distill", "deepseek-r1", "qwen3", "qwen3.5", "glm-4.5"])
def test_eval_prompt_opens_the_think_block_as_transformers(tmp_path, backend, name):
    """DeepSeek-R1 and its distills open the generation prompt with ``<think>\\n``, which a
    turn's render does not hold: generation metrics completed ``...<｜Assistant｜>`` (the
    training context), where transformers' ``add_generation_prompt=True`` render, which vLLM
    and lm-eval's chat mode feed, ends ``<｜Assistant｜><think>\\n``. ``Example.prompt_ids`` is
    that render (SFT and KTO lines, with or without enable_thinking); training is unchanged."""
    from tests.engine import real_chat_templates as R

    template, bos, eos = {
        "r1-distill": (R1_DISTILL, "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"),
        "deepseek-r1": (DEEPSEEK_R1, "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"),
        "qwen3": (QWEN3, None, "<|im_end|>"), "qwen3.5": (R.QWEN35, None, "<|im_end|>"),
        "glm-4.5": (R.GLM45, None, "<|endoftext|>")}[name]
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=bos,
                                              eos_token=eos, chat_template=template)
    ours = Tokenizer(backend, bos_token=bos, eos_token=eos, chat_template=template)
    for messages in ([SYSTEM, Q1, A2], [Q1, A1, Q2, A2]):
        for variables in ({}, {"enable_thinking": False}):
            want = hf.apply_chat_template(messages[:-1], add_generation_prompt=True,
                                          tokenize=True, return_dict=False, **variables)
            path = tmp_path / "d.jsonl"
            kw = {"chat_template_kwargs": variables} if variables else {}
            path.write_text(json.dumps({"messages": messages, **kw}) + "\n"
                            + json.dumps({"prompt": messages[:-1], "completion": messages[-1:],
                                          "label": True, **kw}) + "\n")
            (ex,), _ = load_examples(path, DataConfig(train=str(path), bad_lines="skip"), ours)
            assert ex.prompt_ids == want
            whole = hf.apply_chat_template(messages, tokenize=True, return_dict=False,
                                           **variables)  # (GLM-4.5's: Ember's EOS after it)
            assert ex.input_ids[:len(whole)] == whole and len(ex) <= len(whole) + 1
            from ember.engine.kto import load_kto_examples

            path.write_text(path.read_text().splitlines()[1])
            (kto,), _ = load_kto_examples(path, DataConfig(train=str(path)), ours)
            assert kto.prompt_ids == want
    if name.startswith("r1") or name.startswith("deepseek"):
        assert backend.decode(want[-2:], skip_special_tokens=False) == "<think>\n"
