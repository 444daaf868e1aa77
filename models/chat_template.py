"""Chat templates: which of a model's templates applies, and rendering one as transformers 5's
``apply_chat_template`` does.

Templates are the model's own Jinja, rendered in jinja2's ``ImmutableSandboxedEnvironment`` with
transformers' conventions (trim_blocks, lstrip_blocks, ``raise_exception``, ``tojson`` without
HTML escaping, ``strftime_now``, ``{% generation %}`` blocks, special tokens as variables). The
inputs are prepared as transformers prepares them: keys whose value is None are left out of the
messages (OpenAI's ``"tool_calls": null``), a message's reasoning under any of its names
(``reasoning_content``, ``thinking``, ``reasoning``) is also given under the others, and
``continue_final_message`` cuts the text at the end of the last message. Content given as
OpenAI text parts (``TextParts``) is the parts for a template that loops over content, else
their joined text.

A model may ship several named templates (tokenizer_config.json's ``chat_template`` as a list of
``{"name", "template"}``, or ``chat_template.jinja`` plus ``additional_chat_templates/*.jinja``):
as in transformers, ``"tool_use"`` renders conversations given ``tools``, ``"default"`` the others,
and a name can be asked for (``chat_template="rag"``).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import numpy as np
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ember import EmberError

_REASONING = ("reasoning_content", "thinking", "reasoning")  # transformers' names, in its order
_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "
TEMPLATE_DIR = "additional_chat_templates"  # transformers' folder of named templates


def read_templates(cfg: Mapping, folder: Path) -> tuple[str | None, dict[str, str]]:
    """(the default template, the other named ones) of a tokenizer folder, read as transformers
    reads them: chat_template.jinja and additional_chat_templates/NAME.jinja when present, else
    tokenizer_config.json's ``chat_template`` (a string, or a list of {"name", "template"})."""
    named: dict[str, str] = {}
    if (folder / "chat_template.jinja").is_file():
        named["default"] = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    if (folder / TEMPLATE_DIR).is_dir():
        for f in sorted((folder / TEMPLATE_DIR).glob("*.jinja")):
            named[f.name.removesuffix(".jinja")] = f.read_text(encoding="utf-8")
    if not named:
        template = cfg.get("chat_template")
        if isinstance(template, list):
            named = {t.get("name"): t.get("template") for t in template
                     if isinstance(t, dict) and isinstance(t.get("name"), str)
                     and isinstance(t.get("template"), str)}
        elif isinstance(template, str):
            named["default"] = template
    return named.pop("default", None), named


def select_template(default: str | None, named: Mapping[str, str], name: str | None,
                    tools: Any) -> str:
    """transformers' ``get_chat_template``: the template named ``name`` (or ``name`` itself when
    it is a template's text), else ``tool_use`` when tools are given and the model has one, else
    the default."""
    if name is not None:
        return name if name not in named and name != "default" else (named.get(name) or default)
    if tools is not None and "tool_use" in named:
        return named["tool_use"]
    if default is not None:
        return default
    if named:
        raise EmberError(f"the tokenizer has chat templates named {sorted(named)} but no default "
                         "one; pass chat_template=<one of the names>")
    raise EmberError("this tokenizer has no chat template (tokenizer_config.json "
                     "'chat_template' / chat_template.jinja); format the prompt yourself "
                     "or use a chat model")


class TextParts(str):
    """A message's content given as OpenAI text parts: their texts joined with newlines, which a
    template that takes string content renders (vLLM's "string" format; transformers would render
    the list's repr), and the parts themselves (``.parts``), which go to a template that loops
    over content (Gemma 3, Llama 4, Mistral 3) as transformers passes them."""

    parts: tuple[str, ...]

    def __new__(cls, parts: Sequence[str]) -> TextParts:
        text = super().__new__(cls, "\n".join(parts))
        text.parts = tuple(parts)
        return text

    def __reduce__(self):  # copy and pickle rebuild it from its parts
        return TextParts, (self.parts,)


class JSONArguments(dict):
    """A tool call's arguments given as JSON text (OpenAI's shape): the decoded object, which a
    template that ``tojson``s the arguments renders once (the text would come out quoted and
    escaped), and the text itself (``.text``), which goes, as given, to a template that reads
    arguments as text (Qwen3's ``arguments is string``, DeepSeek's ``+ arguments``)."""

    text: str

    def __init__(self, text: str):
        # "" (a call without arguments, as some OpenAI-style clients write it): no arguments;
        # a template reading text gets "" as transformers gives it (Mistral's writes {})
        value = json.loads(text) if text.strip() else {}
        if not isinstance(value, dict):  # dict() would take a list of pairs as an object
            raise ValueError(f"tool call arguments must be a JSON object, got {text[:40]!r}")
        super().__init__(value)
        self.text = text

    def __reduce__(self):  # copy and pickle rebuild it from its text
        return JSONArguments, (self.text,)


def _with_argument_text(messages: list, template: str) -> list:
    """``messages`` with each JSONArguments as its text when ``template`` takes text."""
    def calls(m):
        return m.get("tool_calls") if isinstance(m, dict) and isinstance(
            m.get("tool_calls"), list) else []

    def text(call):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("arguments"), JSONArguments):
            return call
        return {**call, "function": {**fn, "arguments": fn["arguments"].text}}

    if not any(isinstance(c, dict) and isinstance(c.get("function"), dict) and isinstance(
            c["function"].get("arguments"), JSONArguments) for m in messages for c in calls(m)
               ) or not takes_argument_text(template):
        return messages
    return [{**m, "tool_calls": [text(c) for c in calls(m)]} if calls(m) else m
            for m in messages]


def _with_parts(messages: list, template: str) -> list:
    """``messages`` with each TextParts content as its list of text parts when ``template``
    loops over content."""
    if not any(isinstance(m, dict) and isinstance(m.get("content"), TextParts) for m in messages
               ) or not loops_over_content(template):
        return messages
    return [{**m, "content": [{"type": "text", "text": t} for t in m["content"].parts]}
            if isinstance(m, dict) and isinstance(m.get("content"), TextParts) else m
            for m in messages]


def render(template: str, messages: Sequence[dict], context: dict, *,
           add_generation_prompt: bool = False, continue_final_message: bool | str = False,
           generation: list[tuple[int, int]] | None = None) -> str:
    """The text ``template`` renders for ``messages`` and the variables in ``context``; the
    (start, end) characters of each ``{% generation %}`` block are appended to ``generation``
    when it is a list, found as transformers' ``return_assistant_tokens_mask`` finds them."""
    messages = None if isinstance(messages, Mapping | str) else _plain(
        _with_argument_text(_with_parts(list(messages), template), template))
    if messages is None or not all(isinstance(m, dict) for m in messages):
        raise EmberError("apply_chat_template expects a list of {'role', 'content'} dicts")
    tools = context.get("tools")
    if tools is not None and any(callable(t) and not isinstance(t, Mapping) for t in tools):
        raise EmberError("chat template tools must be JSON schemas ({'type': 'function', "
                         "'function': {...}}); Ember does not derive them from Python functions")
    if continue_final_message and add_generation_prompt:
        raise EmberError("continue_final_message and add_generation_prompt exclude each "
                         "other: continue the last message, or open a new assistant turn")
    chat = _alias_reasoning([{k: v for k, v in m.items() if v is not None} for m in messages])
    final = None
    if continue_final_message:
        final = _tag_final_message(chat, continue_final_message, template)
    try:
        text = _generate(_compile(template), generation, messages=chat,
                         add_generation_prompt=add_generation_prompt, **_plain(context))
    except (jinja2.TemplateError, TypeError, ValueError, LookupError, AttributeError) as e:
        # raise_exception() (a TemplateError with the template's text) and template bugs
        why = e if isinstance(e, jinja2.TemplateError) else f"{type(e).__name__}: {e}"
        raise EmberError(f"chat template failed: {why}") from None
    return text if final is None else _cut_at_tag(text, final)


# transformers' apply_chat_template options that are not template variables (transformers never
# passes them to the template): Ember has no such option, so a value that asks for something is
# refused rather than silently ignored.
_HF_OPTIONS = {
    "sanitize_control_tokens": "Ember does not sanitize control tokens in the messages: a "
                               "special token written in a message is encoded as that token; "
                               "remove such text from untrusted messages yourself",
    "return_assistant_tokens_mask": "Ember's training data masks the prompt itself "
                                    "(data.loss_on = 'completion', ember.engine.data)",
    "return_tensors": "Ember returns a list of token ids; convert it yourself",
    "padding": "Ember returns one list of token ids; pad it yourself",
    "truncation": "Ember returns the whole list of token ids; truncate it yourself",
    "max_length": "Ember returns the whole list of token ids; truncate it yourself",
    "tokenizer_kwargs": "Ember encodes the rendered text without special tokens, as "
                        "transformers does by default",
}


def refuse_hf_options(kwargs: dict, tokenize: bool) -> None:
    """Drop transformers' non-template options from ``kwargs``; EmberError for one that asks
    for something (``return_dict=False`` is what Ember returns anyway)."""
    for name, why in _HF_OPTIONS.items():
        if kwargs.pop(name, None):
            raise EmberError(f"apply_chat_template: {name} is a transformers option: {why}")
    if kwargs.pop("return_dict", False) and tokenize:
        raise EmberError("apply_chat_template: return_dict is a transformers option: Ember "
                         "returns the list of token ids (tokenize=True) or the text")


def _generate(compiled, generation: list | None, **variables) -> str:
    """``compiled`` rendered, tracking its generation blocks into ``generation`` (a list)."""
    if generation is None:
        return compiled.render(**variables)
    tracker = compiled.environment.extensions[_Generation.identifier]
    tracker.blocks, tracker.spans = [], generation
    try:
        for block in compiled.generate(**variables):
            tracker.blocks.append(block)
        return "".join(tracker.blocks)
    finally:
        tracker.blocks = tracker.spans = None


def _alias_reasoning(chat: list[dict]) -> list[dict]:
    """transformers 5's ``_alias_reasoning_fields``: a message's reasoning (the first of its
    names that is set) also as ``reasoning_content`` and, unless given, ``thinking``, so that a
    template reading either name sees it (Qwen3 reads reasoning_content, gpt-oss thinking)."""
    out = []
    for m in chat:
        r = next((m[k] for k in _REASONING if m.get(k) is not None), None)
        out.append(m if r is None else {"thinking": r, **m, "reasoning_content": r})
    return out


def _tag_final_message(chat: list[dict], field: bool | str, template: str) -> str:
    """Mark the end of the last message's ``field`` (transformers' continue_final_message) and
    return the text marked; the render is cut at the mark (``_cut_at_tag``)."""
    if not chat:
        raise EmberError("continue_final_message needs at least one message")
    field = field if isinstance(field, str) else "content"
    last = chat[-1]
    final = last.get(field)
    if final is None:
        raise EmberError(f"continue_final_message: the last message has no {field!r} to continue")
    fields = [f for f in _REASONING if last.get(f) == final] if field in _REASONING else [field]
    if not any(f in template for f in fields):
        raise EmberError(f"continue_final_message={field!r}: the chat template never reads it")
    if isinstance(final, list | tuple):  # content parts: continue the last text part
        part = next((p for p in reversed(final) if isinstance(p, dict) and "text" in p), None)
        if part is None:
            raise EmberError("continue_final_message: the last message has no text to continue")
        final, part["text"] = part["text"], part["text"] + _CONTINUE_TAG
    else:
        for f in fields:
            last[f] = last[f] + _CONTINUE_TAG
    return final


def _cut_at_tag(text: str, final: str) -> str:
    """The render up to the continued message's end (its trailing spaces too, where the template
    kept them), as transformers cuts it."""
    tag = _CONTINUE_TAG.strip()
    if final.strip() not in text or tag not in text:
        raise EmberError("continue_final_message: the chat template dropped part of the last "
                         "message, so there is no place to continue it")
    at = text.rindex(tag)
    return text[:at] if text[at:at + len(_CONTINUE_TAG)] == _CONTINUE_TAG else text[:at].rstrip()


def _plain(value: Any) -> Any:
    """Rebuild template inputs from plain JSON types, so the sandbox never sees an object whose
    methods it does not know are unsafe, as transformers' ``_plain_template_data`` does:
    dataclasses and pydantic models (OpenAI SDK messages and tool calls) become dicts, numpy
    scalars their values, and anything else (arrays, tensors, images in content parts) an inert
    ``"<TypeName>"`` placeholder."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    for base in (str, int, float):  # subclasses (enums) carry extra methods
        if isinstance(value, base):
            return base(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if isinstance(value, np.generic):  # np.bool_(False) must not become a truthy placeholder
        return _plain(value.item())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):  # pydantic
        return _plain(value.model_dump())
    return f"<{type(value).__name__}>"


class _Generation(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}`` marks assistant text for loss masks, as in
    transformers: it renders its body unchanged, and while ``blocks`` (the output so far) is a
    list, appends the body's (start, end) characters to ``spans``."""

    tags = {"generation"}

    def __init__(self, environment):
        super().__init__(environment)
        self.blocks: list[str] | None = None
        self.spans: list[tuple[int, int]] | None = None

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        text = caller()
        if self.blocks is not None and self.spans is not None:
            start = sum(map(len, self.blocks))
            self.spans.append((start, start + len(text)))
        return text


@lru_cache(maxsize=1)
def _env() -> ImmutableSandboxedEnvironment:
    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    def _check(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r} not allowed")

    class _Namespace(jinja2.utils.Namespace):
        def __init__(*args, **kwargs):  # namespace(self=...) works, as in jinja2
            self, attrs = args[0], dict(*args[1:], **kwargs)
            for name in attrs:
                _check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            _check(name)
            super().__setitem__(name, value)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.globals["namespace"] = _Namespace
    return env


@lru_cache(maxsize=16)
def _compile(template: str):
    try:
        return _env().from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise EmberError(f"chat template does not parse: {e}") from None


@lru_cache(maxsize=16)
def loops_over_content(template: str) -> bool:
    """Whether ``template`` loops over a message's content (``{% for part in
    message['content'] %}``, directly or through a variable set to it), so takes content parts:
    vLLM's test for the "openai" content format."""
    try:
        tree = _env().parse(template)
    except jinja2.TemplateSyntaxError:
        return False  # rendering says why

    def content(node, names=frozenset()) -> bool:
        while isinstance(node, jinja2.nodes.Filter | jinja2.nodes.Test) and node.node is not None:
            node = node.node
        return (isinstance(node, jinja2.nodes.Getitem) and isinstance(node.arg, jinja2.nodes.Const)
                and node.arg.value == "content"
                or isinstance(node, jinja2.nodes.Getattr) and node.attr == "content"
                or isinstance(node, jinja2.nodes.Name) and node.name in names)

    names = frozenset(a.target.name for a in tree.find_all(jinja2.nodes.Assign)
                      if isinstance(a.target, jinja2.nodes.Name) and content(a.node))
    return any(content(f.iter, names) for f in tree.find_all(jinja2.nodes.For))


@lru_cache(maxsize=16)
def takes_argument_text(template: str) -> bool:
    """Whether ``template`` reads a tool call's arguments as text: tests ``arguments is string``
    (Qwen3) or joins them to text with ``+`` or ``~`` (DeepSeek V3 / R1), directly or through a
    variable set to them (Mistral's ``{% set arguments = tool_call.function.arguments %}{% if
    arguments is not string %}``), or writes them as given when they are not a mapping (``{% if
    arguments is mapping %}...{% else %}{{ arguments }}``; a template handling only a mapping,
    Qwen3-Coder's, gets the decoded object)."""
    try:
        tree = _env().parse(template)
    except jinja2.TemplateSyntaxError:
        return False  # rendering says why

    def read(node) -> bool:
        return (isinstance(node, jinja2.nodes.Getattr) and node.attr == "arguments"
                or isinstance(node, jinja2.nodes.Getitem)
                and isinstance(node.arg, jinja2.nodes.Const) and node.arg.value == "arguments")

    names = frozenset(a.target.name for a in tree.find_all(jinja2.nodes.Assign)
                      if isinstance(a.target, jinja2.nodes.Name) and read(a.node))

    def arguments(node) -> bool:
        return read(node) or isinstance(node, jinja2.nodes.Name) and node.name in names

    def writes_text(i) -> bool:  # {% if arguments is mapping %}...{% else %}{{ arguments }}
        return isinstance(i.test, jinja2.nodes.Test) and i.test.name == "mapping" and arguments(
            i.test.node) and any(arguments(x) for b in i.else_ for o in ([b] if isinstance(
                b, jinja2.nodes.Output) else b.find_all(jinja2.nodes.Output)) for x in o.nodes)

    return any(t.name == "string" and arguments(t.node) for t in tree.find_all(jinja2.nodes.Test)
               ) or any(writes_text(i) for i in tree.find_all(jinja2.nodes.If)) or any(
        arguments(n.left) or arguments(n.right) for n in tree.find_all(jinja2.nodes.Add)) or any(
        arguments(x) for n in tree.find_all(jinja2.nodes.Concat) for x in n.nodes)
