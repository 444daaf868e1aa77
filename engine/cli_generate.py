"""``ember generate`` and ``ember chat``: prompts and conversations rendered as training
rendered them (chat template variables from ``--template-kwargs``), completed with the command
line's sampling, streamed or printed (split out of ``ember.engine.cli``)."""

from __future__ import annotations

import sys

from ember import EmberError
from ember.engine.cli import DEFAULT_MAX_NEW_TOKENS, _load, _note


class _Stream:
    """Prints a row's text as its tokens arrive (``generate_ids``' ``should_stop`` hook): the
    whole prefix is decoded each time, and a tail that may be an incomplete UTF-8 character
    (decoded as U+FFFD) waits for the next token."""

    def __init__(self, tok):
        self.tok, self.shown = tok, ""

    def __call__(self, row: int, ids: list[int]) -> bool:
        text = self.tok.decode(ids, skip_special_tokens=True)
        if not text.endswith("\ufffd") and text.startswith(self.shown):
            print(text[len(self.shown):], end="", flush=True)
            self.shown = text
        return False

    def finish(self, ids: list[int]) -> str:
        text = self.tok.decode(ids, skip_special_tokens=True)
        print(text[len(self.shown):] if text.startswith(self.shown) else "\n" + text, flush=True)
        self.shown = ""
        return text


def _check_text(text: str, what: str) -> str:
    """``text`` (a command-line argument or a line of standard input, read with Python's
    surrogateescape; a JSON string), or EmberError when it holds bytes that are not UTF-8 or a
    JSON escape of a lone surrogate: the tokenizer refuses those with a bare TypeError."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        c = text[e.start]
        if "\udc80" <= c <= "\udcff":  # an undecodable byte, as surrogateescape keeps it
            raise EmberError(f"{what} is not valid UTF-8 text (byte "
                             f"{c.encode('utf-8', 'surrogateescape')!r} at character "
                             f"{e.start}); write it in UTF-8") from None
        raise EmberError(f"{what} holds a lone surrogate U+{ord(c):04X} (a JSON "
                         f"\\u{ord(c):04x} escape without its pair), which is not text") from None
    return text


def _template_kwargs(text: str | None) -> dict | None:
    """--template-kwargs: a JSON object of chat template variables (``{"enable_thinking":
    false}``, ``tools``: an array of tool schemas), given to the template as transformers'
    ``apply_chat_template(**kwargs)`` gives them; None when not given."""
    import json

    from ember.engine.formats import _RENDER_ARGS, _type_name

    if text is None:
        return None
    example = """e.g. --template-kwargs '{"enable_thinking": false}'"""
    try:
        kw = json.loads(_check_text(text, "--template-kwargs"))
        _check_text(json.dumps(kw, ensure_ascii=False), "--template-kwargs")
    except (ValueError, RecursionError) as e:  # (a number past 4300 digits, deep nesting)
        why = "nested too deeply" if isinstance(e, RecursionError) else e
        raise EmberError(f"--template-kwargs is not valid JSON ({why}): give a JSON object of "
                         f"template variables, {example}") from None
    if not isinstance(kw, dict):
        raise EmberError(f"--template-kwargs must be a JSON object of template variables, got "
                         f"{_type_name(kw)} {text!r}; {example}")
    tools = kw.get("tools")
    if tools is not None and not (isinstance(tools, list)
                                  and all(isinstance(t, dict) for t in tools)):
        raise EmberError(f"--template-kwargs: 'tools' must be an array of tool schemas "
                         f"(objects), got {_type_name(tools)} {json.dumps(tools)}")
    bad = sorted(set(kw) & set(_RENDER_ARGS) - {"tools"})
    if bad:
        raise EmberError(f"--template-kwargs sets {bad}: those are apply_chat_template's own "
                         "arguments, which ember sets itself, not template variables")
    return kw


def _generator(model, tok, a):
    """``run(prompt_ids, stream) -> new ids per prompt`` with the command line's sampling."""
    import torch

    from ember.models.generate import (
        HF_SAMPLING_DEFAULTS,
        check_sampling,
        generate_ids,
        knob_defaults,
        stop_and_pad_ids,
        unapplied_settings,
    )
    from ember.models.heads import is_classifier

    # before the first message: ember chat reports a failed answer and reads the next line
    if a.max_new_tokens is None:
        a.max_new_tokens = DEFAULT_MAX_NEW_TOKENS
    if a.max_new_tokens < 1:  # 0 printed nothing (transformers' generate refuses it too)
        raise EmberError(f"--max-new-tokens must be >= 1, got {a.max_new_tokens}")
    # knobs not given: the model's generation_config.json's, else transformers' defaults
    knobs = knob_defaults(model, sampling=a.temperature > 0, top_p=a.top_p, top_k=a.top_k,
                          min_p=a.min_p, top_h=a.top_h,
                          repetition_penalty=a.repetition_penalty,
                          min_new_tokens=a.min_new_tokens,
                          no_repeat_ngram_size=a.no_repeat_ngram_size)
    check_sampling(a.max_new_tokens, a.temperature,
                   **{k: knobs[k] for k in HF_SAMPLING_DEFAULTS})
    unapplied = unapplied_settings(model)
    if unapplied:  # stated, not silently ignored: transformers' generate() applies them
        _note(f"ember: note: {unapplied}")
    unused = [f for f, v in (("--top-p", a.top_p), ("--top-k", a.top_k), ("--min-p", a.min_p),
                             ("--top-h", a.top_h), ("--seed", a.seed)) if v is not None]
    if unused and a.temperature == 0:  # was silent (transformers: "flags are not valid")
        _note(f"ember: note: {' / '.join(unused)} only act{'s' * (len(unused) == 1)} when "
              "sampling (--temperature > 0); these answers are greedy")
    if a.seed is not None and not -2**63 <= a.seed < 2**64:  # was torch's overflow traceback
        raise EmberError(f"--seed must be a 64-bit integer (torch.Generator's seed), got {a.seed}")
    if is_classifier(model):
        raise EmberError(f"{a.model} is a sequence classifier (labels {list(model.cfg.labels)}): "
                         "it has no LM head to generate with; score text with ember eval")
    eos, pad = stop_and_pad_ids(model, tok)  # the file's stop ids checked as generate()'s
    device = model.embed.weight.device

    def run(ids: list[list[int]], stream: _Stream | None = None, first: int = 0
            ) -> list[list[int]]:
        # --seed S: prompt ``first + i`` samples from its own generator, seeded S + first + i,
        # so its text does not depend on the prompts beside it (--stream generates one at a
        # time) and is what --seed S+i gives that prompt alone
        gens = None if a.seed is None else [
            torch.Generator(device=device).manual_seed(
                a.seed if first + i == 0 else (a.seed + first + i) % 2**64)
            for i in range(len(ids))]
        return generate_ids(model, ids, max_new_tokens=a.max_new_tokens, temperature=a.temperature,
                            generators=gens, eos_token_ids=eos, pad_token_id=pad,
                            should_stop=stream, **knobs)

    return run


def _file_prompts(path: str) -> list[tuple[str | list[dict], dict, str]]:
    """--prompts FILE: (the prompt text, or the conversation to answer, the line's template
    variables: its ``tools`` and ``chat_template_kwargs``, and where it is) per example. Lines
    (or rows of a .json / .csv / .parquet file, as ``ember eval --data`` reads them) hold
    ``prompt`` (a string, or a list of messages) or ``messages``; other fields (a completion)
    are not used."""
    import json
    from pathlib import Path

    from ember.engine import hfdatasets
    from ember.engine.datafiles import check_data_path, iter_items
    from ember.engine.formats import (
        _Bad,
        parse_messages,
        parse_template_kwargs,
        parse_tools,
    )

    if not hfdatasets.exists(str(path)):
        raise EmberError(f"--prompts {path} not found (a relative path is taken from the "
                         f"current folder, {Path.cwd()})")
    file = Path(hfdatasets.with_split(str(path), "test", "--prompts"))  # as ember eval --data
    check_data_path(file)
    out = []
    for n, raw in enumerate(iter_items(file), 1):
        try:
            try:
                # a first line's BOM (Notepad, PowerShell) as ember train's data reader takes it
                line = (raw.decode("utf-8-sig" if n == 1 else "utf-8") if isinstance(raw, bytes)
                        else raw)
            except UnicodeDecodeError as e:
                raise _Bad("not UTF-8", f"not UTF-8 text (byte {raw[e.start:e.start + 1]!r} "
                                        f"at {e.start}); write the file in UTF-8") from None
            if not line.strip():
                continue
            obj = _prompt_object(line)
            _check_text(json.dumps(obj, ensure_ascii=False), "the line")
            key = next((k for k in ("messages", "prompt") if k in obj), None)
            if key is None:
                raise _Bad("missing field", f"no 'prompt' or 'messages' field (keys present: "
                                            f"{sorted(obj)})")
            value = obj[key]
            if key == "prompt" and isinstance(value, str):
                prompt = _check_text(value, "its prompt")
            else:
                prompt = parse_messages(value, key)
                if prompt[-1]["role"] == "assistant":
                    raise _Bad("wrong type", f"field {key!r} ends with an assistant message: "
                                             "give the conversation up to the turn to answer")
            tools = parse_tools(obj)
            kw = {**(parse_template_kwargs(obj) or {}),
                  **({"tools": tools} if tools is not None else {})}
        except (_Bad, EmberError) as e:
            raise EmberError(f"--prompts {path} line {n}: {getattr(e, 'why', e)}") from None
        out.append((prompt, kw, f"--prompts {path} line {n}: "))
    if not out:
        raise EmberError(f"--prompts {path} holds no prompts: give one JSON object per line, "
                         """e.g. {"prompt": "..."} or {"messages": [...]}""")
    return out


_LINE = 'one JSON object per line, {"prompt": "..."} or {"messages": [...]}'
_CHAT_LINE = 'write the conversation as one line, {"messages": [{"role": "user", ...}, ...]}'
_TEXT_LINE = 'write the line as plain text, {"prompt": "..."}'


def _is_message(value) -> bool:
    return isinstance(value, dict) and "role" in value and not {"prompt", "messages"} & set(value)


def _prompt_object(line: str) -> dict:
    """``formats.json_object(line)`` for a --prompts line; a chat message, a bare list of them
    or plain text refused saying how a line is written."""
    import json

    from ember.engine.formats import _Bad, json_object

    try:
        obj = json_object(line)
    except _Bad as e:
        try:
            value = json.loads(line)
        except (ValueError, RecursionError):
            value = None
        if isinstance(value, list) and value and all(_is_message(m) for m in value):
            raise _Bad(e.kind, f"a bare list of chat messages: {_CHAT_LINE}") from None
        if e.kind == "invalid JSON" and not line.lstrip(" \t\ufeff").startswith(("{", "[")):
            raise _Bad(e.kind, f"{e.why}; a --prompts file holds {_LINE} (plain text: "
                               "--prompt TEXT)") from None
        raise
    if _is_message(obj):  # (also each item of a one-line list, read as a JSON array)
        raise _Bad("wrong type", f"a chat message, not a prompt: {_CHAT_LINE}")
    return obj


def _check_renderable(prompts, tok, data_cfg, raw: bool) -> None:
    """A conversation in ``prompts`` (``_file_prompts``') with --raw or a model that renders plain
    text is refused, naming its line, saying what to do (was render_chat's "(use ember
    generate)", the command in use). With --raw: before the model loads (``tok`` None)."""
    if all(isinstance(p, str) for p, _, _ in prompts):
        return
    if raw:
        why = ("a conversation, which --raw cannot render (--raw gives the model plain text, "
               "without its chat template): drop --raw to render it with the chat template, or ")
    else:
        from ember.engine.encoder import _Encoder

        if _Encoder(data_cfg, tok).chat:
            return
        why = ("a conversation needs a chat template, and this model renders prompts as plain "
               "text (its tokenizer has no chat template, or its run set data.use_chat_template "
               "= false): ")
    for p, _, where in prompts:
        if not isinstance(p, str):
            raise EmberError(f"{where}{why}{_TEXT_LINE}")


def _render(tok, data_cfg, prompt: str | list[dict], system: str | None, kw: dict | None):
    """The ids of one prompt (a text or a conversation to answer) with ``--system`` (a
    conversation's own system message wins) and template variables ``kw``."""
    from ember.engine.data import render_chat, render_prompt
    from ember.engine.formats import Chat

    if isinstance(prompt, str):
        return render_prompt(tok, data_cfg, prompt, system, kw or None)
    head = [] if system is None or prompt[0]["role"] in ("system", "developer") else [
        {"role": "system", "content": system}]
    return render_chat(tok, data_cfg, Chat([*head, *prompt], template_kwargs=kw or None))


def cmd_generate(a) -> None:
    """``ember generate`` (arguments ``a`` from ``ember.engine.cli.build_parser``)."""
    for i, p in enumerate(a.prompt or ()):  # before loading the model
        _check_text(p, f"--prompt {i + 1}")
    if a.system is not None:
        _check_text(a.system, "--system")
    kw = _template_kwargs(a.template_kwargs) or {}
    # a line's own template variables win over --template-kwargs
    prompts = [(p, {}, "") for p in a.prompt] if a.prompt else _file_prompts(a.prompts)
    if a.raw:  # before loading the model (was after: "this model or run renders plain text")
        plain = "a chat template, which --raw leaves out (it gives the model plain text)"
        if a.system is not None:
            raise EmberError(f"--system: a system prompt needs {plain}: drop --raw, or put the "
                             "instructions in the prompt")
        for where, variables in [("--template-kwargs: ", kw),
                                 *((f"{where}its tools / chat_template_kwargs: ", line)
                                   for _, line, where in prompts)]:
            if variables:
                raise EmberError(f"{where}template variables need {plain}: drop --raw, or "
                                 "leave them out")
        _check_renderable(prompts, None, None, raw=True)
    model, tok, data_cfg = _load(a.model, a.adapter, a.device, a.raw)
    _check_renderable(prompts, tok, data_cfg, raw=False)
    run = _generator(model, tok, a)
    ids = []
    for p, line, where in prompts:
        try:
            ids.append(_render(tok, data_cfg, p, a.system, {**kw, **line}))
        except EmberError as e:  # (the template refused the line's conversation)
            raise EmberError(f"{where}{e}") from None
    if a.stream:
        for i, p in enumerate(ids):  # one prompt at a time, each printed as it is generated
            if len(ids) > 1:
                print(f"--- {i}")
            stream = _Stream(tok)
            stream.finish(run([p], stream, first=i)[0])
        return
    for i, gen in enumerate(run(ids)):
        if len(ids) > 1:
            print(f"--- {i}")
        print(tok.decode(gen, skip_special_tokens=True))


def cmd_chat(a) -> None:
    """``ember chat``: one message per line on standard input, answers streamed."""
    from ember.engine.data import render_chat
    from ember.engine.formats import Chat

    if a.system is not None:
        _check_text(a.system, "--system")
    kw = _template_kwargs(a.template_kwargs)
    model, tok, data_cfg = _load(a.model, a.adapter, a.device)
    run = _generator(model, tok, a)
    system = [{"role": "system", "content": a.system}] if a.system is not None else []
    messages: list[dict] = []
    # fails early
    render_chat(tok, data_cfg, Chat([*system, {"role": "user", "content": "hi"}],
                                    template_kwargs=kw))
    interactive = sys.stdin.isatty()
    if interactive:
        print("ember chat: /reset starts over, /exit (or Ctrl-D) quits", file=sys.stderr)
    first = True
    while True:
        try:
            line = input("you> " if interactive else "")
        except EOFError:
            break
        # a file saved with a UTF-8 BOM piped in: the BOM is no part of the first message
        text = (line.removeprefix("\ufeff") if first else line).strip()
        first = False
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            messages.clear()
            continue
        if not text:
            continue
        try:
            _check_text(text, "this message")
        except EmberError as e:  # undecodable bytes on standard input: the chat goes on
            print(f"ember: error: {e}", file=sys.stderr)
            continue
        turn = [*messages, {"role": "user", "content": text}]
        stream = _Stream(tok)
        try:
            ids = render_chat(tok, data_cfg, Chat([*system, *turn], template_kwargs=kw))
            if interactive:
                print("assistant> ", end="", flush=True)
            answer = stream.finish(run([ids], stream)[0])
        except EmberError as e:  # e.g. the conversation outgrew the context: say so, keep going
            print(f"ember: error: {e} (/reset starts a new conversation)", file=sys.stderr)
            continue
        except KeyboardInterrupt:  # Ctrl-C stops this answer, not the conversation
            print(flush=True)
            print("ember: answer interrupted (Ctrl-D or /exit quits)", file=sys.stderr)
            answer = stream.shown  # what was printed is what the conversation goes on from
        messages = [*turn, {"role": "assistant", "content": answer}]
