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
"""

from __future__ import annotations

import operator
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch

from ember import EmberError
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
from ember.models.prompt_tuning import virtual_ids
from ember.models.sampling import (  # noqa: F401  (generate's API, re-exported)
    penalize_repetition,
    sample_next,
    warp_logits,
)
from ember.models.token_bans import TokenBans, _is_real
from ember.models.tokenizer import generation_ids
from ember.models.transformer import KVCache, Transformer


def _as_id_lists(what: str, seqs) -> list[list[int]]:
    """``seqs`` (a list of token-id lists, or a 2-D tensor) as lists of ints; EmberError for a
    flat list of ids or a non-integer id."""
    def is_seq(x) -> bool:
        return (not isinstance(x, (str, bytes)) and isinstance(x, Iterable)
                and getattr(x, "ndim", 1) != 0)

    if not is_seq(seqs):
        raise EmberError(f"{what} must be a list of token-id lists, got {type(seqs).__name__}")
    out = []
    for i, seq in enumerate(seqs):
        if not is_seq(seq):
            raise EmberError(f"{what} must be a list of token-id lists (one per prompt), got "
                             f"{type(seq).__name__} {seq!r} at {i}: wrap a single prompt as "
                             "[ids]")
        ids = []
        for t in seq:
            try:
                ids.append(operator.index(t))
            except TypeError:
                raise EmberError(f"{what} {i} has a token id that is not an integer: {t!r}"
                                 ) from None
        out.append(ids)
    return out


def _is_index(t) -> bool:
    try:
        operator.index(t)
    except TypeError:
        return False
    return True


def _check_ids(what: str, i: int, ids: list[int], vocab: int) -> None:
    bad = [t for t in ids if not 0 <= t < vocab]
    if bad:
        raise EmberError(f"{what} {i} has token ids outside the vocabulary [0, {vocab}): {bad[:5]}")


def _greedy_tokens(model: Transformer, hidden: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """argmax of the logits at every position of hidden (b, T, D) -> (b, T), in chunks of
    positions so a draft pass never holds (b, T, V) logits at once."""
    h = hidden.reshape(-1, hidden.shape[-1])
    out = torch.cat([model.logits(h[i:i + chunk]).argmax(-1) for i in range(0, h.shape[0], chunk)])
    return out.view(hidden.shape[:2])


def _idle_passes(model: Transformer, sync: Callable[[bool], bool]) -> None:
    """Lock-step decoding with nothing (left) to generate here: one-token passes, one now and one
    more for as long as ``sync`` says another process still generates."""
    dummy = torch.zeros((1, 1), dtype=torch.long, device=model.embed.weight.device)
    model.hidden_states(dummy, dummy)
    while sync(False):
        model.hidden_states(dummy, dummy)


@torch.inference_mode()
def generate_ids(model: Transformer, prompt_ids: Sequence[Sequence[int]], *,
                 max_new_tokens: int = 128, temperature: float = 0.0, seed: int | None = None,
                 eos_token_ids: Iterable[int] = (), pad_token_id: int | None = 0,
                 should_stop: Callable[[int, list[int]], bool] | None = None,
                 drafts: Sequence[Sequence[int]] | None = None,
                 sync: Callable[[bool], bool] | None = None,
                 generator: torch.Generator | None = None,
                 generators: Sequence[torch.Generator] | None = None,
                 **knobs: Any) -> list[list[int]]:
    """Generate up to ``max_new_tokens`` per prompt. Returns the new ids per row, without the
    stop token. ``should_stop(row, ids_so_far)`` may end a row early (stop strings).
    ``knobs``: the fields of ``generation_config.Knobs`` (None or left out: off), the logits
    processors and warpers below.
    ``repetition_penalty`` (greedy and sampled) and ``min_p`` act as transformers' do: the
    penalty on every token of the prompt and of the generation so far. ``min_new_tokens``: the
    stop ids are not generated before that many new tokens (transformers' MinNewTokensLength);
    ``no_repeat_ngram_size`` N: no N-gram of the prompt and output occurs twice (transformers'
    NoRepeatNGram, on each row's own tokens, as that prompt alone); ``bad_words_ids`` (token-id
    sequences never completed; a lone stop id is not banned), ``suppress_tokens`` (never
    generated) and ``begin_suppress_tokens`` (not as the first new token): transformers' NoBadWords,
    SuppressTokens and SuppressTokensAtBegin; ``min_length`` (no stop id before the prompt and
    output hold that many tokens) and ``forced_eos_token_id`` (the only token allowed as the
    ``max_new_tokens``-th): MinLength and ForcedEOSToken; ``sequence_bias`` (``[[ids, bias],
    ...]``, added before the repetition penalty), ``forced_bos_token_id`` (the first token after
    a one-token prompt) and ``exponential_decay_length_penalty`` (``[start, factor]``: the stop
    ids' logits grow by ``factor ** (new tokens - start)`` of their size) as transformers'
    SequenceBias, ForcedBOSToken and ExponentialDecayLengthPenalty (``ember.models
    .token_bans``); ``typical_p``, ``epsilon_cutoff`` and ``eta_cutoff`` (sampling) as its
    Typical, Epsilon and Eta warpers after ``min_p``, ``top_h`` (0: off) as its TopH right
    after the temperature (``ember.models.sampling``), and ``renormalize_logits`` (a log-softmax
    last) as its LogitNormalization.

    ``drafts`` (greedy only): a guessed continuation per prompt, e.g. the reference answer when
    evaluating. It is verified the way speculative decoding verifies a draft model's tokens: fed
    in one pass after the tokens generated so far, and accepted for as long as it agrees with the
    model's own argmax, plus the model's next token. The output is exactly greedy decoding's; a
    right guess just costs one pass instead of one pass per token.

    Sampling draws from ``generator`` when given, else from one seeded with ``seed``: one
    generator for the whole batch, so a row's tokens depend on the other prompts with it (as
    transformers' batched ``generate`` with a seed, whose tokens it draws, rows that stopped
    still drawn for). ``generators`` (one per prompt, instead):
    each row draws from its own alone, so a prompt samples the same tokens in any batch as it
    does alone with that generator (``ember generate`` with and without ``--stream``).

    Dynamic NTK RoPE grows its base with the longest sequence of a forward, so in a batch a row
    would see the others' lengths (transformers' batched generate does): when the batch may pass
    the context, each row is generated alone, as transformers generates that one prompt (except
    under ``sync``, whose passes must stay in lock step).

    ``sync`` (lock-step decoding, for a model whose forward is a collective, e.g. sharded across
    processes that each generate their own prompts): called after each pass with whether this
    call still has rows generating, it returns whether any process has (the caller reduces the
    flag across processes), and the passes end when it returns False. Until then a call whose
    rows have all finished, or that got no prompts at all, makes one-token passes whose output
    is dropped, so every process makes as many forward calls."""
    kn = Knobs.of(knobs)
    check_sampling(max_new_tokens, temperature,
                   **{k: getattr(kn, k) for k in HF_SAMPLING_DEFAULTS})
    warp = kn.sampling()
    prompts = _as_id_lists("prompt", prompt_ids)
    if generators is not None and (generator is not None or seed is not None
                                   or len(generators) != len(prompts)):
        raise EmberError(f"generators: give one per prompt ({len(generators)} for "
                         f"{len(prompts)} prompts), without generator or seed")
    if not prompts:
        if sync is not None and max_new_tokens > 0:
            _idle_passes(model, sync)
        return []
    cfg = model.cfg
    for i, p in enumerate(prompts):
        if not p:
            raise EmberError(f"prompt {i} is empty: give at least one token (e.g. BOS)")
        _check_ids("prompt", i, p, cfg.vocab_size)
    if drafts is not None:
        on = kn.processors_on()
        if temperature > 0 or on:
            raise EmberError("drafts are verified against plain greedy choices: use "
                             "temperature = 0, repetition_penalty = 1, min_new_tokens = 0 and "
                             "no_repeat_ngram_size = 0, without token bans or forced tokens ("
                             + ", ".join(on or ["temperature"]) + " set)")
        drafts = _as_id_lists("draft", drafts)
        if len(drafts) != len(prompts):
            raise EmberError(f"{len(drafts)} drafts for {len(prompts)} prompts: give one per "
                             "prompt (an empty list where there is no guess)")
        for i, d in enumerate(drafts):
            _check_ids("draft", i, d, cfg.vocab_size)
    B, L = len(prompts), max(map(len, prompts))
    virtual = virtual_ids(model)  # prompt tuning: trained tokens in front of every prompt
    # dynamic NTK RoPE grows its base to fit any length: its point is going past the context
    dynamic = cfg.rope_scaling is not None and cfg.rope_scaling.kind == "dynamic"
    if not dynamic and len(virtual) + L + max_new_tokens > cfg.max_position_embeddings:
        extra = f" + {len(virtual)} virtual tokens" if virtual else ""
        raise EmberError(f"prompt ({L} tokens){extra} + max_new_tokens ({max_new_tokens}) "
                         f"exceeds the model's context of {cfg.max_position_embeddings} tokens; "
                         "lower max_new_tokens (--max-new-tokens) or shorten the prompt")
    if max_new_tokens == 0:
        return [[] for _ in prompts]
    weight = model.embed.weight
    device = weight.device
    if generator is None and seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    # one id (transformers' eos_token_id may be an int) or several
    stop_ids = {operator.index(t) for t in (
        [eos_token_ids] if _is_index(eos_token_ids) else eos_token_ids or ())}
    if dynamic and B > 1 and sync is None and (
            len(virtual) + L + max_new_tokens > cfg.max_position_embeddings):
        return [generate_ids(
            model, [p], max_new_tokens=max_new_tokens, temperature=temperature,
            eos_token_ids=stop_ids, pad_token_id=pad_token_id, **kn.as_dict(),
            should_stop=None if should_stop is None else (
                lambda _, ids, i=i: should_stop(i, ids)),
            drafts=None if drafts is None else [drafts[i]], generator=generator,
            generators=None if generators is None else [generators[i]])[0]
            for i, p in enumerate(prompts)]
    if pad_token_id is None or not 0 <= pad_token_id < cfg.vocab_size:
        # padding is masked, so any id does; one outside the embedding (a tokenizer's <pad>
        # added after the model's vocabulary, a config's -1) would fail the lookup
        pad_token_id = 0
    ids = torch.full((B, L), pad_token_id, dtype=torch.long)
    mask = torch.zeros((B, L), dtype=torch.bool)
    for i, p in enumerate(prompts):
        ids[i, L - len(p):] = torch.tensor(p)
        mask[i, L - len(p):] = True
    if virtual:  # in the first columns, before the padding: positions 0..P-1 in every row
        ids = torch.cat([torch.tensor(virtual).expand(B, -1), ids], dim=1)
        mask = torch.cat([torch.ones((B, len(virtual)), dtype=torch.bool), mask], dim=1)
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.long().cumsum(1) - 1).clamp(min=0)  # (B, L): real tokens count from 0
    # Cache slots: the prompt, one per generated token, and the rejected tail of a draft pass
    # (hidden with key_mask, like padding).
    slots = ids.shape[1] + max_new_tokens + (max_new_tokens + 1 if drafts is not None else 0)
    key_mask = None if bool(mask.all()) else mask
    cache = KVCache(cfg, B, slots, device, weight.dtype)
    seen = None  # repetition penalty: the tokens of each batch row's prompt and output so far
    if kn.repetition_penalty != 1:
        seen = torch.zeros((B, cfg.vocab_size), dtype=torch.bool, device=device)
        for i, p in enumerate(prompts):
            seen[i, torch.tensor(p, device=device)] = True
    bans = TokenBans(prompts, cfg.vocab_size, stop_ids, max_new_tokens=max_new_tokens,
                     **kn.bans())

    lr = cfg.longrope
    # LongRoPE: each row's table so far (None: not LongRoPE), and for phi3 the ids and positions
    # of every cache slot, to rebuild the cache under the long table at a row's switch.
    long = None if lr is None else [
        int(p) + 1 > lr.original_max_position_embeddings for p in positions.max(1).values]
    slots_in = (ids, positions) if lr is not None and cfg.model_type == "phi3" else None

    def long_rope():
        return None if long is None else torch.tensor(long, device=device)

    hidden = model.hidden_states(ids, positions, cache=cache, key_mask=key_mask,
                                 long_rope=long_rope())[:, -1:]
    # Per batch row: the prompt it holds, whether it is still generating, the tokens it fed in
    # the last pass (the last committed token, then draft tokens) and the position of the next.
    rows = list(range(B))
    alive = [True] * B
    feeds = [[0] for _ in range(B)]  # the prompt's last token (only feeds[b][1:] is ever read)
    next_pos = positions[:, -1].tolist()
    drafting = [drafts is not None and len(d) > 0 for d in (drafts or [[]] * B)]
    out: list[list[int]] = [[] for _ in range(B)]
    at = None  # rows on the device, for a whole-batch draw
    while True:
        if hidden.shape[1] == 1:
            logits = model.logits(hidden[:, -1]).float()  # (b, V)
            logits = bans.bias(logits, rows)  # sequence_bias: transformers' first processor
            if seen is not None:
                logits = penalize_repetition(logits, seen, kn.repetition_penalty)
            if bans.active:  # transformers' order: after the repetition penalty
                logits = bans.apply(logits, rows, [len(out[r]) for r in rows])
            if generators is not None and temperature > 0:  # each row from its own generator
                preds = torch.cat([sample_next(logits[b:b + 1], temperature,
                                               generator=generators[r], **warp)
                                   for b, r in enumerate(rows)])
            elif temperature > 0 and len(rows) < B:
                # the draw over the whole batch, as transformers' batched generate draws for
                # its finished rows too: a (b, V) draw takes other random numbers per row
                full = logits.new_zeros((B, logits.shape[1]))
                if at is None:  # (the rows change only when finished ones are dropped)
                    at = torch.tensor(rows, device=device)
                full[at] = logits
                preds = sample_next(full, temperature, generator=generator, **warp)[at]
            else:
                preds = sample_next(logits, temperature, generator=generator, **warp)
            if seen is not None:  # marked on the device (a finished row's marks go unread)
                seen.scatter_(1, preds[:, None], True)
            preds = preds[:, None].tolist()
        else:  # a draft pass (greedy): a prediction after every fed token
            preds = _greedy_tokens(model, hidden).tolist()  # (b, T)
        first_slot = cache.length - hidden.shape[1]
        for b, r in enumerate(rows):
            if not alive[b]:
                continue
            j = 0
            while True:  # commit the prediction after fed token j; go on while the draft agrees
                t = preds[b][j]
                if t in stop_ids:
                    alive[b] = False
                    break
                out[r].append(t)
                bans.add(r, t)
                if drafting[r]:
                    n = len(out[r])
                    drafting[r] = n < len(drafts[r]) and drafts[r][n - 1] == t
                if (should_stop is not None and should_stop(r, out[r])) or (
                        len(out[r]) >= max_new_tokens):
                    alive[b] = False
                    break
                if j + 1 < len(feeds[b]) and feeds[b][j + 1] == t:
                    j += 1
                    continue
                break
            if j + 1 < len(feeds[b]):  # hide the rejected draft tokens from later passes
                key_mask[b, first_slot + j + 1:first_slot + len(feeds[b])] = False
            next_pos[b] += j + 1
        if not (any(alive) if sync is None else sync(any(alive))):
            break
        if not any(alive):  # other processes still generate
            _idle_passes(model, sync)
            break
        dead = alive.count(False)
        if dead and dead * 8 >= len(rows):
            # Enough rows finished that carrying them costs more than copying the cache.
            keep = [b for b in range(len(rows)) if alive[b]]
            idx = torch.tensor(keep, device=device)
            cache.select(idx)
            key_mask = key_mask.index_select(0, idx) if key_mask is not None else None
            seen = seen.index_select(0, idx) if seen is not None else None
            if slots_in is not None:
                slots_in = tuple(t.index_select(0, idx) for t in slots_in)
            long = None if long is None else [long[b] for b in keep]
            rows, next_pos = [rows[b] for b in keep], [next_pos[b] for b in keep]
            alive, at = [True] * len(keep), None
        # Next pass: each live row feeds its last token, plus what is left of its draft.
        feeds = []
        for b, r in enumerate(rows):
            if not alive[b]:
                feeds.append([])
                continue
            n = len(out[r])
            tail = drafts[r][n:max_new_tokens - 1] if drafting[r] else []
            # a pass feeds no draft past a RoPE switch: LongRoPE's short table's end, or the end
            # of dynamic NTK's unscaled one (past it the base depends on a pass's last position,
            # and greedy decoding feeds one position per pass)
            switch_at = (lr.original_max_position_embeddings if long is not None and not long[b]
                         else cfg.max_position_embeddings if dynamic else None)
            if switch_at is not None:
                cut = max(0, switch_at - 1 - next_pos[b])
                if cut < len(tail):
                    # ...and the row drafts no more: a draft fed in two passes would take more
                    # cache slots than the one draft pass they hold (every row pays a pass's T)
                    tail, drafting[r] = tail[:cut], False
            feeds.append([out[r][-1], *tail])
        T = max(map(len, feeds))
        inp = torch.full((len(rows), T), pad_token_id, dtype=torch.long)
        for b, f in enumerate(feeds):
            inp[b, :len(f)] = torch.tensor(f, dtype=torch.long)
        pos = torch.tensor(next_pos)[:, None] + torch.arange(T)[None]  # (b, T)
        if key_mask is None and (T > 1 or not all(alive)):
            key_mask = torch.ones((len(rows), cache.length), dtype=torch.bool, device=device)
        if key_mask is not None:
            new = torch.arange(T)[None] < torch.tensor(list(map(len, feeds)))[:, None]
            key_mask = torch.cat([key_mask, new.to(device)], dim=1)
        inp, pos = inp.to(device), pos.to(device)
        switch = [b for b in range(len(rows)) if long is not None and not long[b] and alive[b]
                  and next_pos[b] >= lr.original_max_position_embeddings]
        for b in switch:
            long[b] = True
        if switch and slots_in is not None:  # phi3: recompute every cached key and value
            inp, pos = torch.cat([slots_in[0], inp], 1), torch.cat([slots_in[1], pos], 1)
            cache = KVCache(cfg, len(rows), slots, device, weight.dtype)
        hidden = model.hidden_states(inp, pos, cache=cache, key_mask=key_mask,
                                     long_rope=long_rope())[:, -T:]
        if slots_in is not None and all(long):
            slots_in = None  # no row can switch any more
        elif slots_in is not None:
            slots_in = (inp, pos) if switch else (
                torch.cat([slots_in[0], inp], 1), torch.cat([slots_in[1], pos], 1))
    return out


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
