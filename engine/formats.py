"""Line formats: detecting a file's format and turning one JSON object into a validated record.

Records, as ``ember.engine.data`` encodes them:
    text                 str
    prompt_completion    (prompt, completion); TRL's conversational form (both message arrays)
                         a ``Chat`` whose prompt assistant messages have weight 0
    alpaca               ``Alpaca`` (prompt, completion, system, ...): ``instruction`` and ``input``
                         joined by a blank line, ``output`` the completion
    messages, sharegpt   ``Chat``: a list of messages (dicts with ``role`` and ``content``, plus
                         ``tool_calls`` / ``tool_call_id`` / ``name`` when given) and ``tools``
    preference           ``ember.engine.preference.Pair``

What each input shape becomes:
    ShareGPT ``{"conversations": [{"from", "value"}]}``: ``from`` human/user -> user, gpt/assistant
        -> assistant, system -> system, tool/observation -> tool; a top-level ``system`` string
        becomes the first message. LLaMA-Factory's tool use: a ``function_call`` turn (its value
        the JSON of one call ``{"name", "arguments"}`` or a list of them) is an assistant message
        calling those tools, and ``tools`` may be the JSON text of the schemas.
    OpenAI content parts ``"content": [{"type": "text", "text": ...}]``: the text parts joined
        with newlines for a template that takes string content (as vLLM does), the parts as given
        for one that loops over content (Gemma 3; ``models.chat_template.TextParts``); any other
        part (image_url, input_audio, file) is refused: Ember trains text-only models.
    Tool use: ``tool_calls`` of an assistant message go to the template as given (transformers'
        shape, ``{"type": "function", "function": {"name", "arguments"}}``), except that
        ``arguments`` given as a JSON string (OpenAI's shape) is decoded to an object: templates
        ``tojson`` the arguments, and a string would be trained as a quoted, escaped string; a
        template that reads them as text (Qwen3, DeepSeek, Mistral) gets the string as given
        (``models.chat_template.JSONArguments``); ``""`` is a call without arguments: ``{}``
        decoded, ``""`` as text (Mistral's templates write ``{}`` for it). Which one a template
        gets is decided by reading it (``takes_argument_text``), not per call: a template that
        tests ``is mapping`` gets the decoded object where transformers passes the string.
        ``tools`` (a line's JSON schemas, or their JSON text as TRL reads it) are passed to the
        template as ``tools``.
    TRL's vision lines (a non-empty ``images`` list, or an ``image``) are refused, as image
        content parts are.
    OpenAI's ``"weight": 0`` on an assistant message: the turn is context, not trained (1: trained,
        the default).
Every problem raises ``_Bad(kind, why)``, which the reader reports as ``file:line: why``.
"""

from __future__ import annotations

import json
import sys
from typing import NamedTuple

from ember.models.chat_template import JSONArguments, TextParts

# "developer": OpenAI's name for system instructions to its newer models; it goes to the template
# as given, as transformers passes it (most templates render any role by its name).
ROLES = ("system", "developer", "user", "assistant", "tool")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                  "assistant": "assistant", "tool": "tool", "observation": "tool"}
# Alpaca's own prompt (Stanford alpaca train.py), used when the tokenizer has no chat template.
ALPACA_PREAMBLE = ("Below is an instruction that describes a task. Write a response that "
                   "appropriately completes the request.")
ALPACA_PREAMBLE_INPUT = ("Below is an instruction that describes a task, paired with an input "
                         "that provides further context. Write a response that appropriately "
                         "completes the request.")
_KEYS = {"messages": ("messages",), "sharegpt": ("conversations",),
         "preference": ("chosen", "rejected"), "prompt_completion": ("prompt", "completion"),
         "alpaca": ("instruction",), "text": ("text",)}
# Passed to the template when present; the reasoning of an assistant turn under any of the
# names transformers knows (models/chat_template.py gives it to the template under each).
_MESSAGE_KEYS = ("tool_calls", "tool_call_id", "name", "reasoning_content", "thinking",
                 "reasoning")


class _Bad(Exception):
    def __init__(self, kind: str, why: str):
        super().__init__(why)
        self.kind, self.why = kind, why


class Chat(list):
    """Messages, the JSON schemas of the tools the conversation may call (or None), and a line's
    own template variables (TRL's ``chat_template_kwargs``, e.g. ``enable_thinking``; or None)."""

    def __init__(self, messages=(), tools: list | None = None,
                 template_kwargs: dict | None = None):
        super().__init__(messages)
        self.tools, self.template_kwargs = tools, template_kwargs


_JSON_TYPES = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number",
               float: "number", type(None): "null"}


def _type_name(v) -> str:
    return _JSON_TYPES.get(type(v), type(v).__name__)


def _get_str(obj: dict, key: str) -> str:
    if key not in obj:
        raise _Bad("missing field", f"missing field {key!r} (keys present: {sorted(obj)})")
    v = obj[key]
    if not isinstance(v, str):
        raise _Bad("wrong type", f"field {key!r} must be a string, got {_type_name(v)}")
    return v


def detect(obj: dict) -> str | None:
    """The format of a line, from its keys; None when no format's keys are there. A line with
    both "chosen" and "rejected" is a preference pair whatever else it holds (UltraFeedback-
    binarized also carries "messages", the chosen conversation for SFT: data.format =
    "messages" trains on that)."""
    if "chosen" in obj and "rejected" in obj:
        return "preference"
    return next((fmt for fmt, ks in _KEYS.items() if any(k in obj for k in ks)), None)


def parse(obj: dict, fmt: str):
    """The record of one line in ``fmt``, validated; raises _Bad with the reason."""
    check_no_images(obj)
    if fmt == "text":
        text = _get_str(obj, "text")
        if not text.strip():
            raise _Bad("empty text", "empty text")
        return text
    if fmt in ("prompt_completion", "alpaca"):
        if fmt == "prompt_completion" and _kto_label(obj):
            raise _Bad("kto line", "a KTO line (a completion labelled true/false): set "
                                   "objective = \"kto\" to train on it")
        if fmt == "prompt_completion" and "completion" not in obj:
            _not_prompt_completion(obj)
        if fmt == "prompt_completion" and isinstance(obj.get("prompt"), list):
            return _chat_prompt_completion(obj)
        rec = _alpaca(obj) if fmt == "alpaca" else (_get_str(obj, "prompt"),
                                                     _get_str(obj, "completion"))
        if not rec[1].strip():
            raise _Bad("empty completion", "empty " + ("output" if fmt == "alpaca" else
                                                       "completion"))
        return rec
    if fmt == "preference":  # strings or chat messages: ember.engine.preference
        from ember.engine.preference import parse_pair

        return parse_pair(obj)
    tools = parse_tools(obj)
    msgs = _sharegpt(obj) if fmt == "sharegpt" else obj.get("messages")
    if "messages" not in obj and fmt == "messages":
        raise _Bad("missing field", f"missing field 'messages' (keys present: {sorted(obj)})")
    return Chat(parse_messages(msgs, "conversations" if fmt == "sharegpt" else "messages"),
                tools, parse_template_kwargs(obj))


def _not_prompt_completion(obj: dict) -> None:
    """Refuse TRL's dataset types that have a prompt but no completion, naming the type."""
    if "completions" in obj and "labels" in obj:
        raise _Bad("missing field", "missing field 'completion': a stepwise-supervision line "
                                    "(TRL's PRM format: prompt, completions, labels), which "
                                    "Ember does not train; give prompt/completion lines")
    if isinstance(obj.get("prompt"), (str, list)) and not obj.keys() & {"chosen", "rejected",
                                                                          "label"}:
        raise _Bad("missing field", f"missing field 'completion' (keys present: {sorted(obj)}): "
                                    "name the answer field 'completion'; a prompt-only line "
                                    "(TRL's format for online methods such as GRPO) has nothing "
                                    "to learn from")


def check_no_images(obj: dict) -> None:
    """Refuse a vision line (TRL's ``"images"`` list or ``"image"``): trained without its images,
    the text would speak of pictures the model never sees."""
    for key in ("images", "image"):
        if obj.get(key) not in (None, [], ""):
            raise _Bad("not text", f"field {key!r} holds images: Ember trains text-only models, "
                                   f"which cannot take them; drop the field (or the line)")


def _kto_label(obj: dict) -> bool:
    label = obj.get("label")
    return isinstance(label, bool) or isinstance(label, str) and label.strip().lower() in (
        "true", "false")


def _chat_prompt_completion(obj: dict) -> Chat:
    """TRL's conversational prompt-completion line ``{"prompt": [messages], "completion":
    [messages]}``: one conversation, prompt then completion, as TRL's SFT renders it; the loss is
    on the completion's assistant messages only (the prompt's are context: weight 0)."""
    if not isinstance(obj.get("completion"), list):
        raise _Bad("wrong type", "prompt and completion must be both strings or both message "
                                 f"arrays, got array and {_type_name(obj.get('completion'))}")
    prompt = parse_messages(obj["prompt"], "prompt")
    completion = parse_messages(obj["completion"], "completion")
    if not any(m["role"] == "assistant" for m in completion):
        raise _Bad("no assistant", "completion has no assistant message: nothing to learn "
                                   f"(roles {[m['role'] for m in completion]})")
    return Chat([{**m, "weight": 0} if m["role"] == "assistant" else m for m in prompt]
                + completion, parse_tools(obj), parse_template_kwargs(obj))


def parse_tools(obj: dict) -> list[dict] | None:
    """A line's ``tools`` (the JSON schemas of the tools its conversation may call), validated;
    None when absent, null or an empty string. The schemas may be one JSON string, in any format,
    as TRL's SFT and DPO trainers decode them (Hugging Face datasets store them so; LLaMA-Factory's
    ShareGPT). An empty list stays one: transformers passes ``tools=[]`` to the template, which
    Llama 3.x's and Mistral's templates render (``tools is not none``: a tool-use header with no
    tools), so TRL trains those tokens for a dataset's rows without tools."""
    tools = obj.get("tools")
    if isinstance(tools, str):
        tools = _json_value(tools, "field 'tools'") if tools.strip() else None
    if tools is not None and not (isinstance(tools, list)
                                  and all(isinstance(t, dict) for t in tools)):
        raise _Bad("wrong type", f"field 'tools' must be an array of tool schemas (objects), got "
                                 f"{_type_name(tools)}")
    return tools


# apply_chat_template's own arguments, which a line's template variables cannot set
_RENDER_ARGS = ("add_generation_prompt", "tokenize", "chat_template", "tools",
                "continue_final_message", "return_dict", "return_assistant_tokens_mask",
                "conversation", "messages", "padding", "truncation", "max_length",
                "return_tensors", "tokenizer_kwargs")


def parse_template_kwargs(obj: dict) -> dict | None:
    """A line's ``chat_template_kwargs`` (variables for its chat template, as TRL passes them to
    ``apply_chat_template``: ``{"enable_thinking": false}``), validated; None when absent."""
    kw = obj.get("chat_template_kwargs")
    if isinstance(kw, str):  # a CSV cell, or a dataset that stores it as JSON text
        kw = _json_value(kw, "field 'chat_template_kwargs'") if kw.strip() else None
    if kw is not None and not isinstance(kw, dict):
        raise _Bad("wrong type", "field 'chat_template_kwargs' must be an object of template "
                                 f"variables, got {_type_name(kw)}")
    # documents: TRL passes the kwargs to apply_chat_template whole, so they render (Granite's
    # and Command R's RAG turns); checked as transformers checks them
    bad = sorted(set(kw or ()) & set(_RENDER_ARGS))
    docs = (kw or {}).get("documents")
    odd = [d for d in docs if not isinstance(d, dict)] if isinstance(docs, list) else [docs]
    if docs is not None and odd:
        held = (f"an array holding {_type_name(odd[0])}" if isinstance(docs, list)
                else _type_name(docs))
        raise _Bad("wrong type", "field 'chat_template_kwargs': 'documents' must be an array of "
                                 f"objects (e.g. {{\"title\": ..., \"text\": ...}}), got {held}")
    if bad:
        raise _Bad("wrong type", f"field 'chat_template_kwargs' sets {bad}, which are "
                                 "apply_chat_template's own arguments, not template variables "
                                 "(give tools as the line's 'tools' field)")
    return kw or None


class Alpaca(NamedTuple):
    prompt: str  # instruction and input, joined by a blank line
    completion: str
    system: str | None
    instruction: str
    input: str


def _alpaca(obj: dict) -> Alpaca:
    instruction, output = _get_str(obj, "instruction"), _get_str(obj, "output")
    extra, system = obj.get("input"), obj.get("system")  # null: not given (0 or [] is an error)
    for k, v in (("input", extra), ("system", system)):
        if v is not None and not isinstance(v, str):
            raise _Bad("wrong type", f"field {k!r} must be a string, got {_type_name(v)}")
    extra, system = extra or "", system or None
    if not (instruction.strip() or extra.strip()):
        raise _Bad("empty prompt", "empty instruction and input")
    prompt = "\n\n".join(s for s in (instruction, extra) if s)
    return Alpaca(prompt, output, system, instruction, extra)


def alpaca_prompt(rec: Alpaca) -> str:
    """Stanford Alpaca's prompt (for a tokenizer without a chat template); a ``system`` field
    replaces its preamble."""
    if rec.input:
        return (f"{rec.system or ALPACA_PREAMBLE_INPUT}\n\n### Instruction:\n{rec.instruction}"
                f"\n\n### Input:\n{rec.input}\n\n### Response:\n")
    return (f"{rec.system or ALPACA_PREAMBLE}\n\n### Instruction:\n{rec.instruction}\n\n"
            "### Response:\n")


def _sharegpt(obj: dict) -> list:
    convs = obj.get("conversations")
    if not isinstance(convs, list) or not convs:
        raise _Bad("wrong type", "field 'conversations' must be a non-empty array of "
                                 f"{{from, value}} objects, got {_type_name(convs)}"
                   + (" (empty)" if convs == [] else ""))
    out = []
    system = obj.get("system")
    if system is not None and not isinstance(system, str):
        raise _Bad("wrong type", f"field 'system' must be a string, got {_type_name(system)}")
    if system:
        out.append({"role": "system", "content": system})
    for i, m in enumerate(convs):
        if not isinstance(m, dict):
            raise _Bad("wrong type", f"conversations[{i}] must be an object, got {_type_name(m)}")
        if "from" not in m and "role" in m:  # some ShareGPT exports use role/content inside
            out.append(m)
            continue
        for k in ("from", "value"):
            if k not in m:
                raise _Bad("missing field", f"conversations[{i}] has no {k!r}")
            if not isinstance(m[k], str):
                raise _Bad("wrong type", f"conversations[{i}].{k} must be a string, got "
                                         f"{_type_name(m[k])}")
        if m["from"] == "function_call":  # LLaMA-Factory: the assistant calls tools
            calls = _json_value(m["value"], f"conversations[{i}].value")
            calls = calls if isinstance(calls, list) else [calls]
            out.append({"role": "assistant", "content": None, "tool_calls": [
                {"type": "function", "function": c} for c in calls]})
            continue
        role = SHAREGPT_ROLES.get(m["from"])
        if role is None:
            raise _Bad("unknown role", f"unknown speaker {m['from']!r} in conversations[{i}] "
                                       f"(expected {', '.join(SHAREGPT_ROLES)}, "
                                       "function_call)")
        out.append({"role": role, "content": m["value"],
                    **{k: m[k] for k in _MESSAGE_KEYS if k in m}})
    return out


def _json_value(text: str, where: str):
    try:
        return json.loads(text)
    except ValueError as e:  # a JSONDecodeError, or an integer past Python's digit limit
        raise _Bad("wrong type", f"{where} must be JSON text here: {json_problem(e)}") from None


def json_problem(e: ValueError) -> str:
    """What Python's ``json.loads`` refused: a syntax error (where), or an integer of more digits
    than Python converts (a plain ValueError, not a JSONDecodeError), which the data can give as
    a string instead."""
    if isinstance(e, json.JSONDecodeError):
        return f"{e.msg} at character {e.pos}"
    return (f"a number of more than {sys.get_int_max_str_digits()} digits, more than Python's "
            "json reads; write it as a string")


def _content(c, where: str) -> str:
    """A message's text: a string, or OpenAI content parts whose text parts are joined."""
    if isinstance(c, str):
        return c
    if not isinstance(c, list):
        raise _Bad("wrong type", f"{where}.content must be a string or an array of content "
                                 f"parts, got {_type_name(c)}")
    texts = []
    for j, part in enumerate(c):
        kind = part.get("type") if isinstance(part, dict) else None
        if not isinstance(part, dict) or not isinstance(kind, str):
            raise _Bad("wrong type", f"{where}.content[{j}] must be a {{type, ...}} object, got "
                                     + (_type_name(part) if not isinstance(part, dict)
                                        else f"keys {sorted(part)}"))
        if kind != "text":
            raise _Bad("not text", f"{where}.content[{j}] is a {kind!r} part: Ember trains "
                                   "text-only models, which cannot take it; drop the part "
                                   "(or the line)")
        if not isinstance(part.get("text"), str):
            raise _Bad("wrong type", f"{where}.content[{j}].text must be a string, got "
                                     f"{_type_name(part.get('text'))}")
        texts.append(part["text"])
    return TextParts(texts)


def _tool_calls(calls, where: str) -> list:
    if not isinstance(calls, list) or not calls:
        raise _Bad("wrong type", f"{where}.tool_calls must be a non-empty array, got "
                                 f"{_type_name(calls)}" + (" (empty)" if calls == [] else ""))
    out = []
    for j, call in enumerate(calls):
        fn = call.get("function") if isinstance(call, dict) else None
        w = f"{where}.tool_calls[{j}]"
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise _Bad("wrong type", f"{w} must be {{\"type\": \"function\", \"function\": "
                                     "{\"name\": ..., \"arguments\": {...}}}")
        args = fn.get("arguments", {})
        if isinstance(args, str):  # OpenAI's shape: the arguments as a JSON text
            try:
                decoded = json.loads(args) if args.strip() else {}  # "": no arguments
            except ValueError as e:
                raise _Bad("wrong type", f"{w}.function.arguments is a string that is not "
                                         f"JSON: {json_problem(e)}") from None
            # (a JSON array or number is refused below, not made a dict of its pairs)
            args = JSONArguments(args) if isinstance(decoded, dict) else decoded
        if not isinstance(args, dict):
            raise _Bad("wrong type", f"{w}.function.arguments must be an object, got "
                                     f"{_type_name(args)}")
        out.append({**call, "function": {**fn, "arguments": args}})
    return out


def parse_messages(msgs, field: str = "messages") -> list[dict]:
    """Validated messages of ``msgs``; problems are named after ``field``."""
    if not isinstance(msgs, list) or not msgs:
        raise _Bad("wrong type", f"field {field!r} must be a non-empty array of "
                                 f"{{role, content}} objects, got {_type_name(msgs)}"
                   + (" (empty)" if msgs == [] else ""))
    out = []
    for i, m in enumerate(msgs):
        where = f"{field}[{i}]"
        if not isinstance(m, dict):
            raise _Bad("wrong type", f"{where} must be an object, got {_type_name(m)}")
        if "role" not in m:
            raise _Bad("missing field", f"{where} has no 'role'")
        role = m["role"]
        if not isinstance(role, str):
            raise _Bad("wrong type", f"{where}.role must be a string, got {_type_name(role)}")
        if role not in ROLES:
            raise _Bad("unknown role", f"unknown role {role!r} in {where} (expected "
                                       f"{', '.join(ROLES)})")
        # null (and no calls, []) is what OpenAI / vLLM dumps write for a field not used: as
        # transformers drops None keys, so a template sees none
        calls = _tool_calls(m["tool_calls"], where) if m.get("tool_calls") not in (None, []) \
            else None
        if calls and role != "assistant":
            raise _Bad("wrong type", f"{where} has tool_calls but role {role!r}: only assistant "
                                     "messages call tools")
        if "content" not in m and not calls:
            raise _Bad("missing field", f"{where} has no 'content'")
        content = m.get("content")
        if content is not None or not calls:  # an assistant message that only calls tools
            content = _content(content, where)
        if role == "assistant" and not calls and not content.strip():
            raise _Bad("empty completion", f"empty assistant message in {where}")
        msg = {"role": role, "content": content}
        for k in _MESSAGE_KEYS[1:]:
            if m.get(k) is not None:
                if not isinstance(m[k], str):
                    raise _Bad("wrong type", f"{where}.{k} must be a string, got "
                                             f"{_type_name(m[k])}")
                msg[k] = m[k]
        if calls:
            msg["tool_calls"] = calls
        weight = m.get("weight")  # OpenAI's fine-tuning format: 0 leaves the turn untrained
        if weight is not None:
            if role != "assistant" or isinstance(weight, bool) or weight not in (0, 1):
                raise _Bad("wrong type", f"{where}.weight must be 0 or 1 on an assistant message "
                                         f"(OpenAI's fine-tuning format), got {weight!r} on a "
                                         f"{role} message")
            msg["weight"] = int(weight)
        out.append(msg)
    return out


def json_object(line: str) -> dict:
    """The JSON object of one line; raises _Bad with the reason."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        if line.lstrip(" \t").startswith("\ufeff"):
            # json.loads and pyarrow (datasets' JSON reader) refuse it too
            raise _Bad("invalid JSON", "invalid JSON: the line starts with a UTF-8 byte-order "
                                       "mark (BOM), as when files saved with one are joined "
                                       "with `cat`; remove it (only a file's first line may "
                                       "have one)") from None
        raise _Bad("invalid JSON", f"invalid JSON: {e.msg} (column {e.colno})") from None
    except ValueError as e:
        raise _Bad("invalid JSON", f"invalid JSON: {json_problem(e)}") from None
    except RecursionError:
        raise _Bad("invalid JSON", "invalid JSON: nested too deeply") from None
    if not isinstance(obj, dict):
        raise _Bad("wrong type", f"expected a JSON object, got {_type_name(obj)}")
    return obj


def turn_end(full: str, start: int, upto: str, content) -> int | None:
    """Where an assistant turn that starts at ``start`` in ``full`` ends: after the first
    ``content`` there and the text that closes the turn in ``upto`` (the conversation rendered up
    to that turn; none when it ends with the content); None when that text is not there or
    another turn's close comes first."""
    if not isinstance(content, str):
        return None
    if "</think>" in content and content not in full[start:]:
        # Qwen3's and DeepSeek-R1's templates keep an earlier turn's answer after its reasoning
        content = content.rsplit("</think>", 1)[-1].strip()
    if not content.strip() or content not in upto:
        return None
    close = upto[upto.rindex(content) + len(content):]
    at = full.find(content, start)
    # (no close: a template that ends a turn with its content, GLM-4.5's, ends it there)
    if at < 0 or close.strip() and close.strip() in full[start:at] or not full.startswith(
            close, at + len(content)):
        return None
    return at + len(content) + len(close)


def turn_tail_end(full: str, start: int, body: str) -> int | None:
    """Where an assistant turn that starts at ``start`` in ``full`` ends, when ``body`` (the turn
    as rendered last) is the turn with text in front that the template drops once later
    messages follow (Qwen3's empty think block before a tool call without content): after the
    longest end of ``body`` that ``full`` has at ``start``; None when there is none."""
    for k in range(len(body)):
        if full.startswith(body[k:], start):
            return start + len(body) - k if body[k:].strip() else None
    return None


def shared_opening(pre: str, upto: str, before: str) -> str:
    """The generation prompt ``pre`` cut to what the turn rendered in ``upto`` shares with it,
    when the prompt opens more than the training render writes (DeepSeek-R1's
    ``<｜Assistant｜><think>\\n``, whose turns render ``<｜Assistant｜>answer``); ``pre`` itself
    when they part before the prompt (``before``: the conversation rendered without one)."""
    k = next((j for j, (a, b) in enumerate(zip(pre, upto, strict=False)) if a != b),
             min(len(pre), len(upto)))
    return pre[:k] if k > len(before) and pre.startswith(before) else pre


def turn_start(full: str, pos: int, pre: str, before) -> int | None:
    """Where an assistant turn starts in ``full`` (at or after ``pos``): after the message
    ``before`` it and the text that opens the turn in ``pre`` (the conversation up to that turn
    rendered with the generation prompt); None when that text is not there."""
    if not isinstance(before, str) or not before.strip() or before not in pre:
        return None
    opener = pre[pre.rindex(before) + len(before):]
    at = full.find(before, pos)
    if at < 0 or not opener.strip() or not full.startswith(opener, at + len(before)):
        return None
    return at + len(before) + len(opener)
