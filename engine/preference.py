"""Preference lines (``objective`` "dpo", "orpo", "simpo", "cpo"): parsing and encoding one pair.

Four shapes, as TRL's preference datasets have them:

    {"prompt": "...", "chosen": "...", "rejected": "..."}               strings
    {"chosen": "...", "rejected": "..."}                                implicit prompt (strings)
    {"prompt": [messages], "chosen": [messages], "rejected": [messages]}  explicit prompt
    {"chosen": [messages], "rejected": [messages]}                      implicit prompt
        (a string "prompt" beside them, as UltraFeedback-binarized has, is set aside: the
        conversations hold it, and TRL's ``maybe_extract_prompt`` takes it from them)

Strings are rendered like a prompt/completion pair (``ember.engine.data``); without a prompt
field the prompt is the two texts' common beginning (TRL's ``extract_prompt``). Messages are
rendered with the tokenizer's chat template: the shared prompt is ``prompt`` (explicit) or the
longest common prefix of the two conversations (implicit), and after it ``chosen`` and
``rejected`` must each be one assistant message, or assistant and tool messages from an assistant
turn to the final answer (a tool call, its result, the answer). Log-probabilities (the labels)
cover everything after the prompt, with what the template renders after the answer (its
end-of-turn token and ChatML's newline), tool results included, as TRL's DPO and KTO take the
render of prompt + answer less the prompt's; earlier assistant turns are part of the prompt.
Other shapes (a user turn after the prompt) are refused. A chat pair's ``tools`` (the JSON
schemas of the tools it may call) and ``chat_template_kwargs`` (template variables) go to the
template with both documents, as TRL passes them. That is TRL's DPO rule (objective "dpo");
"orpo", "simpo" and "cpo" tokenize as TRL's ORPO and CPO trainers (``encode_pair``'s rule "cpo":
a BOS first and an EOS after each answer, the template's tail included).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ember.engine.encoder import with_system_prompt
from ember.engine.formats import (
    Chat,
    _Bad,
    _get_str,
    _type_name,
    parse_messages,
    parse_template_kwargs,
    parse_tools,
)

_FIELDS = ("prompt", "chosen", "rejected")


@dataclass(frozen=True)
class Pair:
    prompt: str | list[dict]  # a string, or the shared messages
    chosen: str | dict | tuple  # a string, one assistant message, or a tool-using tail
    rejected: str | dict | tuple
    tools: list[dict] | None = None  # a chat pair's tool schemas, for the template (as TRL)
    template_kwargs: dict | None = None  # a chat pair's chat_template_kwargs (as TRL)

    @property
    def reference(self) -> str:
        """The chosen answer's text (generation metrics compare against it)."""
        if isinstance(self.chosen, str):
            return self.chosen
        return (self.chosen[-1] if isinstance(self.chosen, tuple) else self.chosen)["content"]


def _messages(obj: dict, key: str) -> list[dict]:
    """Validated messages of ``obj[key]``; problems are named after ``key``."""
    return parse_messages(obj[key], key)


def answer_messages(msgs: list[dict], key: str, start: int = 0) -> dict | tuple[dict, ...]:
    """What follows the shared prompt in ``msgs[start:]``: one assistant message, or (a tuple)
    assistant and tool messages from an assistant turn to the final answer (a tool call, its
    result, the answer), all of which TRL's DPO and KTO score as the completion."""
    rest = msgs[start:]
    roles = [m["role"] for m in rest]
    if roles == ["assistant"]:
        return rest[0]
    if len(rest) > 1 and roles[0] == roles[-1] == "assistant" and set(roles) <= {"assistant",
                                                                               "tool"}:
        return tuple(rest)
    raise _Bad(
        "pair shape",
        f"after the shared prompt ({start} messages) {key} must be "
        f"exactly one assistant message, got {len(rest)} messages "
        f"with roles {roles} (or assistant and tool messages from an assistant turn to the "
        "final answer: a tool call, its result, the answer)",
    )


def _implicit_prompt(chosen: str, rejected: str) -> tuple[str, str, str]:
    """(prompt, chosen, rejected) of a string pair without a prompt field (Anthropic HH's
    "\\n\\nHuman: ... \\n\\nAssistant: ..." texts), as TRL's ``extract_prompt``: the prompt is
    the text up to the first character where the two differ, less a space just before it (the
    answers keep their leading space); the answers are the rest of each."""
    for name, v in (("chosen", chosen), ("rejected", rejected)):
        if not v.strip():
            raise _Bad("empty completion", f"empty {name} completion")
    idx = 0
    for idx in range(min(len(chosen), len(rejected))):  # TRL's loop: one text a prefix of the
        if chosen[idx] != rejected[idx]:  # other leaves idx at the last common index
            if idx and chosen[idx - 1] == " ":
                idx -= 1
            break
    if chosen == rejected:
        raise _Bad("identical pair", "chosen and rejected are identical: no preference")
    if not chosen[:idx].strip():
        raise _Bad("missing field", "missing field 'prompt' (chosen and rejected share no "
                                    "beginning to take as the prompt)")
    return chosen[:idx], chosen[idx:], rejected[idx:]


def parse_pair(obj: dict) -> Pair:
    """The pair of one preference line, validated; raises _Bad with the reason."""
    for key in ("chosen", "rejected"):
        if key not in obj:
            raise _Bad("missing field", f"missing field {key!r} (keys present: {sorted(obj)})")
    chat = isinstance(obj["chosen"], list)
    tools, template_kwargs = parse_tools(obj), parse_template_kwargs(obj)
    if not chat:
        if tools or template_kwargs:  # (an empty or null column of a table is no tools)
            key = "tools" if tools else "chat_template_kwargs"
            raise _Bad("wrong type", f"field {key!r} needs chat pairs (message lists): a chat "
                                     "template renders it; string pairs have none")
        if "prompt" not in obj:
            prompt, chosen, rejected = _implicit_prompt(_get_str(obj, "chosen"),
                                                        _get_str(obj, "rejected"))
        else:
            prompt, chosen, rejected = (_get_str(obj, k) for k in ("prompt", "chosen",
                                                                   "rejected"))
        for name, v in (("chosen", chosen), ("rejected", rejected)):
            if not v.strip():
                raise _Bad("empty completion", f"empty {name} completion")
        pair = Pair(prompt, chosen, rejected)
    else:
        # UltraFeedback-binarized's layout: a string prompt beside whole conversations, which
        # hold it; TRL's maybe_extract_prompt then takes the prompt from the conversations
        explicit = isinstance(obj.get("prompt"), list)
        kinds = {k: _type_name(obj[k]) for k in ("prompt", "chosen", "rejected")
                 if k in obj and (k != "prompt" or explicit)}
        if set(kinds.values()) != {"array"}:
            raise _Bad(
                "wrong type",
                f"prompt, chosen and rejected must be all strings or all "
                f"message arrays, got {kinds}",
            )
        chosen, rejected = _messages(obj, "chosen"), _messages(obj, "rejected")
        if explicit:
            prompt = _messages(obj, "prompt")
            pair = Pair(prompt, answer_messages(chosen, "chosen"),
                        answer_messages(rejected, "rejected"))
        else:
            n = 0
            while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
                n += 1
            if chosen == rejected:
                raise _Bad("identical pair", "chosen and rejected are identical: no preference")
            if n == 0 and "prompt" in obj:  # a string prompt the conversations do not hold
                raise _Bad("wrong type", "prompt, chosen and rejected must be all strings or all "
                                         "message arrays (or a string prompt beside whole "
                                         "conversations that start with it), got "
                                         f"{ {k: _type_name(obj[k]) for k in _FIELDS} }")
            if n == 0:
                raise _Bad(
                    "pair shape",
                    "chosen and rejected share no first message, so there "
                    "is no prompt; give the prompt as a 'prompt' field",
                )
            pair = Pair(chosen[:n], answer_messages(chosen, "chosen", n),
                        answer_messages(rejected, "rejected", n))
    if pair.chosen == pair.rejected:
        raise _Bad("identical pair", "chosen and rejected are identical: no preference")
    return replace(pair, tools=tools, template_kwargs=template_kwargs)


def encode_answer(enc, prompt: str | list[dict], answer: str | dict,
                  tools: list[dict] | None = None, template_kwargs: dict | None = None) -> tuple:
    """One document, prompt then answer: (ids, target mask, prompt_len, reference) from ``enc``
    (``ember.engine.encoder._Encoder``); a message prompt's earlier assistant turns are context. A
    string prompt and answer are tokenized as one text, as TRL 1.x's DPO, KTO and reward
    trainers do (``prompt + chosen``, the answer where the tokens leave the prompt's). A
    rendered chat's answer is every token after the prompt, the template's text after the
    end-of-turn token included (ChatML's ``<|im_end|>\n``): TRL 1.x's DPO and KTO take the
    completion as the whole render less the prompt's tokens, unlike SFT's assistant mask."""
    if isinstance(prompt, str):
        ids, mask, prompt_len, reference = enc.encode("prompt_completion", (prompt, answer))
        if not enc.chat:
            return ids, mask, prompt_len, reference
    else:
        tail = list(answer) if isinstance(answer, tuple) else [answer]
        ids, mask, prompt_len, reference = enc.encode("messages", Chat([*prompt, *tail], tools,
                                                                       template_kwargs))
        if len(tail) > 1:  # the answer starts at its first assistant turn (TRL: the prompt's
            # render with the generation prompt); the tool results after it are scored too
            first, _, start, _ = enc.encode("messages", Chat([*prompt, tail[0]], tools,
                                                             template_kwargs))
            prompt_len = next((j for j in range(min(start, len(ids))) if first[j] != ids[j]),
                              min(start, len(ids)))
    if enc.cfg.loss_on != "all":  # earlier assistant turns are context, not the answer
        mask = [False] * prompt_len + [True] * (len(ids) - prompt_len)
    return ids, mask, prompt_len, reference


def answer_conversation(enc, prompt: str | list[dict], answer: str | dict | tuple,
                        tools: list[dict] | None = None,
                        template_kwargs: dict | None = None) -> Chat:
    """A prompt and answer (``encode_answer``'s) as the messages a chat template renders: the
    prompt (a string as one user message) after ``data.system_prompt``, then the answer's."""
    head = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    tail = ([{"role": "assistant", "content": answer}] if isinstance(answer, str)
            else list(answer) if isinstance(answer, tuple) else [answer])
    return with_system_prompt(enc.cfg, Chat([*head, *tail], tools, template_kwargs))


def answer_generation_prompt(enc, prompt: str | list[dict], answer: str | dict | tuple,
                             tools: list[dict] | None, template_kwargs: dict | None,
                             doc: tuple) -> list[int] | None:
    """The prompt generation metrics feed for an answer's document ``doc`` (``encode_answer``'s:
    ids, mask, prompt_len, ...): transformers' add_generation_prompt render of the conversation
    up to ``answer`` where the chat template renders it otherwise than the training context's
    prompt (``Example.generation_prompt``), else None (no template, no prompt, a plain-text
    prompt without chat)."""
    if doc[2] > 0 and enc.has_template and (enc.chat or not isinstance(prompt, str)):
        return enc.generation_prompt(answer_conversation(enc, prompt, answer, tools,
                                                         template_kwargs), doc[0][:doc[2]])
    return None


def encode_pair(enc, pair: Pair, rule: str = "dpo") -> list[tuple]:
    """Two documents, chosen then rejected: (ids, target mask, prompt_len, reference) each, from
    ``enc`` (``ember.engine.encoder._Encoder``). ``rule`` "dpo" (objective "dpo": TRL 1.x's DPO
    ``tokenize_fn``): a string pair's answers both start at the earlier of the two points where
    its texts' tokens leave the prompt's, as TRL takes the shorter common prefix for both;
    "cpo" (objectives "orpo", "simpo", "cpo"): TRL's ORPO / CPO ``tokenize_row``
    (``_encode_cpo``)."""
    if rule == "cpo":
        return _encode_cpo(enc, pair)
    docs = [encode_answer(enc, pair.prompt, a, tools=pair.tools,
                          template_kwargs=pair.template_kwargs)
            for a in (pair.chosen, pair.rejected)]
    if isinstance(pair.prompt, str) and not enc.chat and enc.cfg.loss_on != "all":
        start = min(d[2] for d in docs)
        docs = [(ids, [j >= start for j in range(len(ids))], start, ref)
                for ids, _, _, ref in docs]
    return docs


def _cpo_texts(enc, pair: Pair) -> tuple[str, str, str]:
    """(prompt, chosen, rejected) texts as TRL's ORPO and CPO trainers see them: a string pair's
    own (no chat template), else ``maybe_apply_chat_template``'s: the prompt rendered with the
    generation prompt, cut to what it shares with both whole renders, and each answer the rest
    of its render."""
    if isinstance(pair.prompt, str) and not enc.chat:
        return pair.prompt, pair.chosen, pair.rejected
    if isinstance(pair.prompt, str):  # a string pair under a chat template: one user turn
        prompt = [{"role": "user", "content": pair.prompt}]
        answers = [[{"role": "assistant", "content": a}] for a in (pair.chosen, pair.rejected)]
    else:
        prompt = list(pair.prompt)
        answers = [list(a) if isinstance(a, tuple) else [a] for a in (pair.chosen, pair.rejected)]
    chat = Chat(prompt, pair.tools, pair.template_kwargs)
    head = with_system_prompt(enc.cfg, chat)
    text = enc._render(head, True, line=chat)
    whole = [enc._render(Chat([*head, *a]), line=chat) for a in answers]
    for w in whole:  # (DeepSeek-R1's generation prompt is not in the whole render)
        text = text[:next((i for i, (x, y) in enumerate(zip(text, w, strict=False)) if x != y),
                          min(len(text), len(w)))]
    return text, whole[0][len(text):], whole[1][len(text):]


def _encode_cpo(enc, pair: Pair) -> list[tuple]:
    """TRL 1.x's ORPO and CPO (SimPO) ``tokenize_row`` (trl/experimental/{orpo,cpo}): the texts
    (``_cpo_texts``) tokenized without special tokens, each answer from the end of the prompt's
    tokens, one token earlier where the last prompt token merges with the answer
    (``build_tokenized_answer``); then the tokenizer's BOS put first where the prompt does not
    start with it (``add_bos_token_if_needed``: SmolLM2's <|im_start|> before a plain-text
    prompt too) and its EOS after an answer that does not end with it
    (``add_eos_token_if_needed``: after a ChatML answer's "<|im_end|>\n" too). Each answer's
    labels start after its own prompt."""
    prompt, *answers = _cpo_texts(enc, pair)
    bos = getattr(enc.tok, "bos_token_id", None)
    alone = enc._enc(prompt)
    docs = []
    for answer in answers:
        ids = enc._enc(prompt + answer)
        start = len(alone) - (ids[:len(alone)] != alone)
        if bos is not None and (start == 0 or ids[0] != bos):
            ids, start = [bos, *ids], start + 1
        if enc.cfg.add_eos and enc.eos is not None and (len(ids) == start or ids[-1] != enc.eos):
            ids = [*ids, enc.eos]
        if len(ids) <= start:
            raise _Bad("empty completion", "an answer renders to no tokens after the prompt")
        docs.append((ids, [j >= start for j in range(len(ids))], start, answer))
    return docs
