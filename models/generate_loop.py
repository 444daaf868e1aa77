"""``generate_ids``: the KV-cache decoding loop (token ids in, generated ids out) and the checks
and helpers of its inputs. How it batches, stops, drafts and switches LongRoPE tables is told in
``ember.models.generate``'s docstring; that module re-exports ``generate_ids`` and is where to
import it from (and where to patch it: ``generate`` looks it up there).
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

from ember import EmberError
from ember.models.generation_config import HF_SAMPLING_DEFAULTS, Knobs, check_sampling
from ember.models.prompt_tuning import virtual_ids
from ember.models.sampling import penalize_repetition, sample_next
from ember.models.token_bans import TokenBans
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
