"""Autoregressive generation with a KV cache: greedy, temperature, top-k and top-p sampling.

Batches are left-padded: every prompt ends at the same column, so each decode step appends one
column for all rows. Padded keys are hidden with ``key_mask`` and positions count real tokens only
(``cumsum(mask) - 1``), so a padded row computes exactly what it would alone. A row stops at any of
``eos_token_ids`` (or when ``should_stop`` says so); finished rows are frozen and the loop ends when
every row has finished or ``max_new_tokens`` is reached.

Two levels:
- ``generate_ids(model, prompt_ids, ...)``: token ids in, generated ids out (the stop token is not
  included). This is what evaluation code calls.
- ``generate(model, tokenizer, prompts, ...)``: text in (optionally through the chat template),
  decoded completions out, with optional stop strings.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch

from ember import EmberError
from ember.models.transformer import KVCache, Transformer


def _check_sampling(max_new_tokens: int, temperature: float, top_p: float, top_k: int) -> None:
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise EmberError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if temperature < 0:
        raise EmberError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if not 0 < top_p <= 1:
        raise EmberError(f"top_p must be in (0, 1], got {top_p}")
    if top_k < 0:
        raise EmberError(f"top_k must be >= 0 (0 = off), got {top_k}")


def sample_next(logits: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0,
                top_k: int = 0, generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token per row from logits (B, V): argmax when temperature == 0, else a draw from
    softmax(logits / temperature) restricted to the top-k and the top-p nucleus."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token once the tokens ranked above it cover top_p; the best one always stays
        drop = (torch.cumsum(probs, dim=-1) - probs) >= top_p
        drop[:, 0] = False
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


@torch.inference_mode()
def generate_ids(model: Transformer, prompt_ids: Sequence[Sequence[int]], *,
                 max_new_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0,
                 top_k: int = 0, seed: int | None = None, eos_token_ids: Iterable[int] = (),
                 pad_token_id: int = 0,
                 should_stop: Callable[[int, list[int]], bool] | None = None) -> list[list[int]]:
    """Generate up to ``max_new_tokens`` per prompt. Returns the new ids per row, without the
    stop token. ``should_stop(row, ids_so_far)`` may end a row early (stop strings)."""
    _check_sampling(max_new_tokens, temperature, top_p, top_k)
    prompts = [list(map(int, p)) for p in prompt_ids]
    if not prompts:
        return []
    cfg = model.cfg
    for i, p in enumerate(prompts):
        if not p:
            raise EmberError(f"prompt {i} is empty: give at least one token (e.g. BOS)")
        bad = [t for t in p if not 0 <= t < cfg.vocab_size]
        if bad:
            raise EmberError(f"prompt {i} has token ids outside the vocabulary "
                             f"[0, {cfg.vocab_size}): {bad[:5]}")
    B, L = len(prompts), max(map(len, prompts))
    if L + max_new_tokens > cfg.max_position_embeddings:
        raise EmberError(f"prompt ({L} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
                         f"model's context of {cfg.max_position_embeddings} tokens")
    if max_new_tokens == 0:
        return [[] for _ in prompts]
    weight = model.embed.weight
    device = weight.device
    ids = torch.full((B, L), pad_token_id, dtype=torch.long)
    mask = torch.zeros((B, L), dtype=torch.bool)
    for i, p in enumerate(prompts):
        ids[i, L - len(p):] = torch.tensor(p)
        mask[i, L - len(p):] = True
    ids, mask = ids.to(device), mask.to(device)
    padded = not bool(mask.all())
    positions = (mask.long().cumsum(1) - 1).clamp(min=0)  # (B, L): real tokens count from 0
    key_mask = mask if padded else None
    cache = KVCache(cfg, B, L + max_new_tokens, device, weight.dtype)
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    stop_ids = set(int(t) for t in eos_token_ids)

    hidden = model.hidden_states(ids, positions, cache=cache, key_mask=key_mask)[:, -1:]
    next_pos = positions[:, -1:] + 1  # (B, 1)
    out: list[list[int]] = [[] for _ in range(B)]
    finished = [False] * B
    for step in range(max_new_tokens):
        logits = model.logits(hidden)[:, -1].float()  # (B, V)
        tokens = sample_next(logits, temperature, top_p, top_k, generator)
        for i, t in enumerate(tokens.tolist()):
            if finished[i]:
                continue
            if t in stop_ids:
                finished[i] = True
                continue
            out[i].append(t)
            if should_stop is not None and should_stop(i, out[i]):
                finished[i] = True
        if all(finished) or step == max_new_tokens - 1:
            break
        if key_mask is not None:
            key_mask = torch.cat([key_mask, key_mask.new_ones(B, 1)], dim=1)
        hidden = model.hidden_states(tokens[:, None], next_pos, cache=cache, key_mask=key_mask)
        next_pos = next_pos + 1
    return out


def _as_messages(prompt, chat: bool) -> list[dict] | None:
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}] if chat else None
    if isinstance(prompt, Sequence) and all(isinstance(m, dict) for m in prompt):
        return list(prompt)
    raise EmberError("each prompt must be a str or a conversation (a list of {'role', 'content'} "
                     f"dicts), got {type(prompt).__name__}")


def encode_prompts(tokenizer, prompts: Sequence, chat: bool = False) -> list[list[int]]:
    """Token ids per prompt: conversations (and plain strings when ``chat``) go through the chat
    template with the generation prompt; plain text gets the tokenizer's own special tokens."""
    out = []
    for p in prompts:
        messages = _as_messages(p, chat)
        if messages is None:
            out.append(tokenizer.encode(p, add_special_tokens=True))
        else:
            out.append(tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                     tokenize=True))
    return out


def generate(model: Transformer, tokenizer, prompts: str | Sequence, *,
             max_new_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0,
             top_k: int = 0, seed: int | None = None, stop_strings: Sequence[str] | None = None,
             chat: bool = False) -> list[str]:
    """Completions (list[str], one per prompt) for a prompt or a list of prompts.

    ``chat=True`` wraps each string as a user message and renders the model's chat template; a
    prompt given as a list of message dicts always goes through the template. Generation stops at
    the tokenizer's ``eos_token_ids`` and, if given, right before the first stop string (which is
    cut from the returned text)."""
    if isinstance(prompts, str) or (
            isinstance(prompts, Sequence) and prompts and isinstance(prompts[0], dict)):
        prompts = [prompts]
    if isinstance(stop_strings, str):
        raise EmberError("stop_strings must be a list of strings, not a single str")
    stops = [s for s in (stop_strings or []) if s]
    ids = encode_prompts(tokenizer, list(prompts), chat)
    should_stop = None
    if stops:
        # decode only a tail long enough to hold any stop string (a token is >= 1 character)
        tail = max(map(len, stops)) + 4

        def should_stop(row: int, gen: list[int]) -> bool:
            text = tokenizer.decode(gen[-tail:], skip_special_tokens=True)
            return any(s in text for s in stops)

    pad = tokenizer.pad_token_id
    gen = generate_ids(model, ids, max_new_tokens=max_new_tokens, temperature=temperature,
                       top_p=top_p, top_k=top_k, seed=seed, eos_token_ids=tokenizer.eos_token_ids,
                       pad_token_id=pad if pad is not None else 0, should_stop=should_stop)
    texts = tokenizer.decode_batch(gen, skip_special_tokens=True)
    if stops:
        texts = [t[:min([t.find(s) for s in stops if s in t] or [len(t)])] for t in texts]
    return texts
