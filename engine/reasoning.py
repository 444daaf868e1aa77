"""Reasoning models' answers for generation metrics: the text after the think block.

A reasoning model (DeepSeek-R1 and its distills, whose generation prompt ends ``<think>\\n``;
Qwen3, which opens ``<think>`` itself) writes its reasoning before its answer, so scoring the
whole generation against a reference fails exact_match and json_match on every row. As
lm-eval 0.4.13's ``think_end_token`` (``postprocess_generated_text``): everything up to and
including the last think-end marker is dropped and the rest left-stripped, before the metrics.
A generation whose think block is still open at its end (no marker after a ``<think>`` the
prompt or the generation opened: it ran out of tokens while reasoning) has no answer, ``""``:
vLLM's ``deepseek_r1`` / ``qwen3`` reasoning parsers' content (None), where lm-eval would score
the reasoning itself. A generation that never opened one (``enable_thinking: false``, whose
prompt closes the block; a model that answered directly) is all answer.

References are cut the same way: a ``messages`` line's answer ``"<think>\\n...\\n</think>\\n\\n
Paris."`` is scored as ``"Paris."``, what DeepSeek-R1's template trains (it renders
``content.split('</think>')[-1]``) and Qwen3's renders after the block.

``eval.think_end``: ``"auto"`` is ``"</think>"`` when the tokenizer's chat template mentions it,
its vocabulary has it as one token, or a reference holds it, else gpt-oss's final channel
``<|channel|>final<|message|>`` when the template has it (its analysis channel, the reasoning,
opens the block); ``""`` turns this off; any other string is the marker (the opening marker is
taken as it without its first ``/``: ``◁/think▷`` -> ``◁think▷``).
"""

from __future__ import annotations

from collections.abc import Sequence

THINK_END = "</think>"
# gpt-oss (harmony): the analysis channel is the reasoning, the final channel the answer
HARMONY_FINAL, HARMONY_ANALYSIS = "<|channel|>final<|message|>", "<|channel|>analysis<|message|>"


def _templates(tokenizer) -> list[str]:
    own = getattr(tokenizer, "chat_template", None)
    named = getattr(tokenizer, "chat_templates", None) or {}
    if isinstance(own, dict):  # (a transformers tokenizer may hold its named templates here)
        return [t for t in own.values() if isinstance(t, str)]
    return [t for t in (own, *named.values()) if isinstance(t, str)]


def token_id(tokenizer, token: str) -> int | None:
    """The id of ``token`` when the vocabulary has it as one token (an Ember or a transformers
    tokenizer), else None."""
    own = getattr(tokenizer, "token_to_id", None)
    if callable(own):
        return own(token)
    vocab = getattr(tokenizer, "get_vocab", None)
    return vocab().get(token) if callable(vocab) else None


def resolve_think_end(
    setting: str | None, tokenizer=None, references: Sequence[str] = ()
) -> str | None:
    """The think-end marker that ``setting`` (``eval.think_end``) means for this tokenizer and
    these references (module docstring), None when answers are scored whole."""
    if not setting:
        return None
    if setting != "auto":
        return setting
    if any(THINK_END in r for r in references if isinstance(r, str)):
        return THINK_END
    templates = [] if tokenizer is None else _templates(tokenizer)
    if any(THINK_END in t for t in templates) or (
        tokenizer is not None and token_id(tokenizer, THINK_END) is not None
    ):
        return THINK_END
    if any(HARMONY_FINAL in t for t in templates):
        return HARMONY_FINAL
    return None


def think_start(end: str) -> str | None:
    """The opening marker of a think block that ``end`` closes (``</think>`` -> ``<think>``;
    gpt-oss's final channel -> its analysis channel), None when ``end`` has no ``/`` to drop."""
    if end == HARMONY_FINAL:
        return HARMONY_ANALYSIS
    return end.replace("/", "", 1) if "/" in end else None


def answer_text(text: str, end: str) -> str:
    """A reference (or any text) without its reasoning: after the last ``end``, left-stripped,
    as lm-eval's ``postprocess_generated_text``; ``text`` itself without the marker."""
    return text.split(end)[-1].lstrip() if end in text else text


def _marker_ids(tokenizer, end: str) -> list[int]:
    """The tokens of ``end``: its id when it is one token, else its encoding (special tokens in
    it as themselves: gpt-oss's ``<|channel|>final<|message|>``)."""
    one = token_id(tokenizer, end)
    if one is not None:
        return [one]
    try:
        return list(tokenizer.encode(end, add_special_tokens=False))
    except (TypeError, ValueError):  # a tokenizer without that keyword: the text only
        return []


def generated_answer(
    tokenizer, prompt_ids: Sequence[int], ids: Sequence[int], end: str
) -> str | None:
    """The answer in generated ``ids`` (a completion of ``prompt_ids``): after the last ``end``
    (by its tokens where the generation has them, so a marker the tokenizer counts as special
    and decoding skips still counts, as lm-eval's integer think_end_token; else in the text),
    left-stripped; None (no answer: score ``""``) when the think block is still open, opened by
    the prompt (R1's ``<think>\\n``) or the generation; the whole text when no block was
    opened."""
    ids, marker = list(ids), _marker_ids(tokenizer, end)
    n = len(marker)
    last = next((k for k in range(len(ids) - n, -1, -1) if n and ids[k : k + n] == marker), None)
    if last is not None:
        after = tokenizer.decode(ids[last + n :], skip_special_tokens=True)
        return answer_text(after, end).lstrip()
    text = tokenizer.decode(ids, skip_special_tokens=True)
    if end in text:
        return answer_text(text, end)
    start = think_start(end)
    if start is None:  # no way to tell an open block: lm-eval's whole text
        return text
    full = tokenizer.decode(ids, skip_special_tokens=False)
    prompt = tokenizer.decode(list(prompt_ids), skip_special_tokens=False)
    opened = start in full or prompt.rfind(start) > prompt.rfind(end)
    return None if opened else text
