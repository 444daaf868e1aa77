"""Autoregressive generation with a KV cache: greedy, temperature, top-h, top-k, top-p and min-p
sampling, repetition penalty (transformers' logits processors, in transformers' order).

Batches are left-padded: every prompt ends at the same column, so each decode step appends one
column for all rows. Padded keys are hidden with ``key_mask`` and positions count real tokens only
(``cumsum(mask) - 1``), so a padded row computes exactly what it would alone. A row stops at any of
``eos_token_ids`` (or when ``should_stop`` says so); finished rows are frozen and the loop ends when
every row has finished or ``max_new_tokens`` is reached.

LongRoPE (Phi-3.5, Phi-4-mini) has a short and a long frequency table; like transformers
generating one sequence, a row's forward uses the long one once the position it feeds reaches
``original_max_position_embeddings``. For phi3, transformers then drops the KV cache and recomputes
it from every token so far, so all keys use the long table from there on (``Phi3ForCausalLM
.prepare_inputs_for_generation``); Ember does the same in one re-prefill pass of the batch (the
other rows recompute what they had). Other families (Llama, Qwen, Mistral with LongRoPE) keep the
keys cached under the short table, as transformers does. The table is chosen per row, so a row in
a batch still computes what it would alone (transformers' batched generate decides for the whole
batch, from padded lengths). A draft pass never straddles the switch (its tail is cut at it, and
that row drafts no more), so drafting still gives exactly greedy decoding's tokens; nor does one
pass ``max_position_embeddings`` under dynamic NTK RoPE, whose base grows with a forward's last
position (one token per pass past it, as greedy decoding feeds them).

Two levels:
- ``generate_ids(model, prompt_ids, ...)``: token ids in, generated ids out (the stop token is not
  included). This is what evaluation code calls.
- ``generate(model, tokenizer, prompts, ...)``: text in (optionally through the chat template),
  decoded completions out, with optional stop strings.

``generate_ids`` and its loop live in ``ember.models.generate_loop``, re-exported here.
"""

from __future__ import annotations

import operator
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

from ember import EmberError
from ember.models.generate_loop import _is_index, generate_ids
from ember.models.generation_config import (  # noqa: F401  (generate's API, re-exported)
    HF_SAMPLING_DEFAULTS,
    Knobs,
    check_sampling,
    knob_defaults,
    sampling_defaults,
    token_ban_defaults,
    unapplied_settings,
    unsupported_options,
)
from ember.models.sampling import (  # noqa: F401  (generate's API, re-exported)
    penalize_repetition,
    sample_next,
    warp_logits,
)
from ember.models.token_bans import _is_real
from ember.models.tokenizer import generation_ids
from ember.models.transformer import Transformer


def _as_messages(prompt, chat: bool) -> list[dict] | None:
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}] if chat else None
    if isinstance(prompt, Sequence) and all(isinstance(m, dict) for m in prompt):
        return list(prompt)
    raise EmberError("each prompt must be a str or a conversation (a list of {'role', 'content'} "
                     f"dicts), got {type(prompt).__name__}")


def encode_prompts(tokenizer, prompts: Sequence, chat: bool = False,
                   template_kwargs: Mapping | None = None) -> list[list[int]]:
    """Token ids per prompt: conversations (and plain strings when ``chat``) go through the chat
    template with the generation prompt, or, when the last message is the assistant's (a
    prefilled answer), ending inside it to be continued (transformers' text-generation pipeline
    does the same); plain text gets the tokenizer's own special tokens. ``template_kwargs``:
    template variables (``enable_thinking``, ``tools``), as ``apply_chat_template(**kwargs)``."""
    if not isinstance(template_kwargs, Mapping | None) or set(template_kwargs or ()) & {
            "add_generation_prompt", "continue_final_message", "tokenize", "return_dict"}:
        raise EmberError(f"template_kwargs must be a dict of chat template variables (e.g. "
                         f"{{'enable_thinking': False}}), got {template_kwargs!r}")
    kw = dict(template_kwargs or {})
    out = []
    for p in prompts:
        messages = _as_messages(p, chat)
        if messages is None:
            out.append(tokenizer.encode(p, add_special_tokens=True))
        elif messages and messages[-1].get("role") == "assistant":
            out.append(tokenizer.apply_chat_template(messages, continue_final_message=True,
                                                     tokenize=True, return_dict=False, **kw))
        else:  # return_dict=False: transformers 5 returns a BatchEncoding by default
            out.append(tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                     tokenize=True, return_dict=False, **kw))
    return out


def config_stop_ids(model: Transformer) -> list[int]:
    """``eos_token_id`` (one id or a list) of the generation_config.json the model was loaded
    with; [] without one. EmberError for one that is not a token id (transformers' generate()
    fails on it: a TypeError making its tensor); a negative id, which no token matches, is
    warned about as transformers warns."""
    gen = getattr(model, "hf_generation_config", None)
    eos = gen.get("eos_token_id") if isinstance(gen, dict) else None
    if eos is None:
        return []
    ids = eos if isinstance(eos, list) else [eos]
    where = getattr(model, "hf_generation_config_path", None) or "generation_config.json"
    if any(isinstance(i, bool) or not _is_index(i) for i in ids):
        raise EmberError(f"{where}: eos_token_id = {eos!r} is invalid (it must be a token id or "
                         "a list of them); transformers' generate() fails on it too: fix it in "
                         "that file")
    ids = [operator.index(i) for i in ids]
    if any(i < 0 for i in ids):
        warnings.warn(f"{where}: eos_token_id = {eos!r} holds a negative id, which no token "
                      "matches: generation stops at the tokenizer's eos only (transformers "
                      "warns too)", stacklevel=3)
    return [i for i in ids if i >= 0]


def stop_and_pad_ids(model: Transformer, tokenizer) -> tuple[list[int], int | None]:
    """(the ids generation stops at, the pad id): the tokenizer's end-of-turn / eos ids and the
    stop ids of the model folder's generation_config.json, which transformers' generate stops at
    (Llama 3's [<|end_of_text|>, <|eom_id|>, <|eot_id|>]), checked (``config_stop_ids``)."""
    eos, pad = generation_ids(tokenizer)
    return sorted(set(eos) | set(config_stop_ids(model))), pad


def generate(model: Transformer, tokenizer, prompts: str | Sequence, *,
             max_new_tokens: int = 256, temperature: float = 0.0, seed: int | None = None,
             stop_strings: Sequence[str] | None = None, chat: bool = False,
             template_kwargs: Mapping | None = None, num_return_sequences: int = 1,
             **options: Any) -> list[str]:
    """Completions (list[str], one per prompt) for a prompt or a list of prompts.

    ``chat=True`` wraps each string as a user message and renders the model's chat template; a
    prompt given as a list of message dicts always goes through the template, with
    ``template_kwargs`` as its variables (``{"enable_thinking": False}``, ``tools``), as
    transformers' ``apply_chat_template(**kwargs)`` passes them. Generation stops at
    the tokenizer's ``eos_token_ids``, at the ``eos_token_id`` list of the generation_config.json
    the model was loaded with (as transformers' generate) and, if given, right before the first
    stop string (cut from the returned text, with any part of it begun in the prompt; a stop
    string that is a special token, e.g. ``<|im_end|>``, stops generation there and is not in
    the text, special tokens being skipped).

    ``options``: the logits processors and warpers (``generation_config.Knobs``).
    ``top_p``, ``top_k``, ``min_p``, ``repetition_penalty``, ``min_new_tokens`` (no stop token
    before that many new tokens) and ``no_repeat_ngram_size`` left None are the model's
    generation_config.json's, else transformers' defaults (``sampling_defaults``: top_k 50 when
    sampling), as transformers' ``generate()`` takes them; sampling itself is only ever asked
    for with ``temperature`` > 0 (the file's do_sample and temperature are not used).

    The other knobs (``min_length``, ``bad_words_ids``, ``suppress_tokens``,
    ``begin_suppress_tokens``, ``forced_eos_token_id``, ``forced_bos_token_id``,
    ``sequence_bias``, ``exponential_decay_length_penalty``, ``renormalize_logits``,
    ``typical_p``, ``epsilon_cutoff``, ``eta_cutoff``, ``top_h``) left None are the
    generation_config.json's too (``generate_ids`` says what each does).
    ``num_return_sequences`` (sampling only): that many answers per prompt, a prompt's
    together, as transformers returns them.

    Several prompts sample together from one generator seeded with ``seed`` (as transformers'
    batched ``generate``): a prompt's text depends on the prompts beside it (``ember generate``
    seeds one generator per prompt instead, ``generate_ids(..., generators=...)``)."""
    names = Knobs().as_dict()
    hf_options = {k: v for k, v in options.items() if k not in names}
    if hf_options:
        raise EmberError(unsupported_options(hf_options))
    # the file's warpers are checked only when sampling, as transformers builds them then only
    sampling = _is_real(temperature) and temperature > 0  # (a numpy float too)
    knobs = knob_defaults(model, sampling=sampling, **options)
    unapplied = unapplied_settings(model)
    if unapplied:  # said, as the CLI says it: transformers' generate() applies them
        warnings.warn(unapplied, stacklevel=2)
    if isinstance(num_return_sequences, bool) or not isinstance(
            num_return_sequences, int) or num_return_sequences < 1:
        raise EmberError(f"num_return_sequences must be an int >= 1, got "
                         f"{num_return_sequences!r}")
    if num_return_sequences > 1 and temperature == 0:  # transformers refuses it too
        raise EmberError("num_return_sequences > 1 needs sampling (temperature > 0): greedy "
                         "decoding gives the same answer each time")
    if isinstance(prompts, str) or (
            isinstance(prompts, Sequence) and prompts and isinstance(prompts[0], dict)):
        prompts = [prompts]
    if isinstance(stop_strings, str):
        raise EmberError("stop_strings must be a list of strings, not a single str")
    stops = [s for s in (stop_strings or []) if s]
    ids = encode_prompts(tokenizer, list(prompts), chat, template_kwargs)
    # transformers' order: each prompt's num_return_sequences answers together
    ids = [p for p in ids for _ in range(num_return_sequences)]
    should_stop = None
    spanned: set[int] = set()  # rows stopped by a stop string begun in the prompt
    if stops:
        # decode only a tail long enough to hold any stop string: a token is at least one byte
        # (byte-level and byte-fallback vocabularies spell rare characters byte by byte)
        tail = max(len(s.encode("utf-8")) for s in stops) + 4

        def should_stop(row: int, gen: list[int]) -> bool:
            # with and without special tokens: a stop string may name one ("<|im_end|>", as
            # transformers' stop_strings match token strings), hidden in the returned text. The
            # prompt's last tokens come first, as transformers matches the whole sequence's end:
            # a stop string may begin in the prompt, but must end in the generated tokens.
            head = ids[row][len(ids[row]) - max(0, tail - len(gen)):] if len(gen) < tail else []
            for skip in (True, False):
                before = len(tokenizer.decode(head, skip_special_tokens=skip)) if head else 0
                text = tokenizer.decode(head + gen[-tail:], skip_special_tokens=skip)
                for s in stops:
                    at = text.find(s, max(0, before - len(s) + 1))
                    if at >= 0:
                        if at < before:
                            spanned.add(row)
                        return True
            return False

    # an Ember or a transformers tokenizer's stop ids, and the model's generation_config.json's
    eos, pad = stop_and_pad_ids(model, tokenizer)
    gen = generate_ids(model, ids, max_new_tokens=max_new_tokens, temperature=temperature,
                       seed=seed, eos_token_ids=eos, pad_token_id=pad,
                       should_stop=should_stop, **knobs)
    texts = [tokenizer.decode(g, skip_special_tokens=True) for g in gen]
    if stops:
        # a stop string begun in the prompt leaves nothing before it in the completion
        texts = ["" if i in spanned else t[:min([t.find(s) for s in stops if s in t] or [len(t)])]
                 for i, t in enumerate(texts)]
    return texts
