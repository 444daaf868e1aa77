"""transformers' logits processors that ban tokens (set their logits to -inf), per batch row of
``generate_ids``: MinLength / MinNewTokensLength (no stop id before ``min_length`` tokens in
all, ``min_new_tokens`` new ones), NoRepeatNGram, NoBadWords (``bad_words_ids``), ForcedEOSToken
(the last token allowed is ``forced_eos_token_id``), SuppressTokens and SuppressTokensAtBegin.

Each row is checked against its own prompt and output (not the left padding of a batch), so a
row gets what transformers' ``generate()`` gives that prompt alone."""

from __future__ import annotations

import numbers
import operator
from collections.abc import Iterable, Sequence

import torch

from ember import EmberError


def _id_list(what: str, ids, vocab: int) -> list[int]:
    """``ids`` as a list of ints in [0, vocab); EmberError naming ``what`` otherwise."""
    if isinstance(ids, (str, bytes)) or not isinstance(ids, Iterable):
        raise EmberError(f"{what} must be a list of token ids, got {ids!r}")
    out = []
    for t in ids:
        if isinstance(t, bool) or not isinstance(t, numbers.Integral) or not 0 <= t < vocab:
            raise EmberError(f"{what} holds {t!r}, not a token id of the model's vocabulary "
                             f"[0, {vocab})")
        out.append(operator.index(t))
    return out


class TokenBans:
    """The tokens each row may not generate next; ``active`` is False when nothing is set."""

    def __init__(self, prompts: list[list[int]], vocab: int, stop_ids: Iterable[int], *,
                 min_new_tokens: int = 0, no_repeat_ngram_size: int = 0,
                 bad_words_ids: Sequence[Sequence[int]] | None = None,
                 suppress_tokens: Sequence[int] | None = None,
                 begin_suppress_tokens: Sequence[int] | None = None, min_length: int = 0,
                 forced_eos_token_id: int | Sequence[int] | None = None,
                 max_new_tokens: int = 0) -> None:
        self.vocab, self.n = vocab, no_repeat_ngram_size
        # per prompt: new tokens before a stop id may come (min_length counts the prompt)
        self.min_new = [max(min_new_tokens, min_length - len(p)) for p in prompts]
        forced = ([] if forced_eos_token_id is None else [forced_eos_token_id]
                  if isinstance(forced_eos_token_id, numbers.Integral) else forced_eos_token_id)
        self.forced = torch.zeros(vocab, dtype=torch.bool)
        self.forced[_id_list("forced_eos_token_id", forced, vocab)] = True
        self.last = max_new_tokens - 1  # the step forced_eos_token_id is forced at
        stops = sorted(t for t in stop_ids if 0 <= t < vocab)
        self.eos = torch.zeros(vocab, dtype=torch.bool)
        self.eos[stops] = True
        self.always = torch.zeros(vocab, dtype=torch.bool)
        self.always[_id_list("suppress_tokens", suppress_tokens or (), vocab)] = True
        self.begin = torch.zeros(vocab, dtype=torch.bool)
        self.begin[_id_list("begin_suppress_tokens", begin_suppress_tokens or (), vocab)] = True
        if isinstance(bad_words_ids, (str, bytes)) or not isinstance(
                bad_words_ids or (), Iterable):
            raise EmberError(f"bad_words_ids must be a list of token-id lists, got "
                             f"{bad_words_ids!r}")
        self.seqs: dict[tuple[int, ...], set[int]] = {}  # a bad word's first tokens -> its last
        for i, w in enumerate(bad_words_ids or ()):
            w = _id_list(f"bad_words_ids[{i}]", w, vocab)
            if not w:
                raise EmberError(f"bad_words_ids[{i}] is empty: give the token ids of a word")
            if len(w) > 1:
                self.seqs.setdefault(tuple(w[:-1]), set()).add(w[-1])
            elif w[0] not in stops:  # transformers never bans a stop id as a bad word
                self.always[w[0]] = True
        self.active = bool(stops and max(self.min_new, default=0) > 0 or self.n or self.seqs
                           or self.always.any() or self.begin.any() or self.forced.any())
        need_history = bool(self.n or self.seqs)
        self.history = [list(p) for p in prompts] if need_history else None
        # no_repeat_ngram_size N: each (N-1)-gram of a row's tokens -> the tokens that followed it
        self.grams = [self._ngrams(p) for p in prompts] if self.n else None

    def _ngrams(self, ids: list[int]) -> dict[tuple[int, ...], set[int]]:
        grams: dict[tuple[int, ...], set[int]] = {}
        for i in range(len(ids) - self.n + 1):
            grams.setdefault(tuple(ids[i:i + self.n - 1]), set()).add(ids[i + self.n - 1])
        return grams

    def add(self, row: int, token: int) -> None:
        """``token`` was generated for prompt ``row``."""
        if self.history is None:
            return
        ids = self.history[row]
        ids.append(token)
        if self.grams is not None and len(ids) >= self.n:
            self.grams[row].setdefault(tuple(ids[len(ids) - self.n:-1]), set()).add(token)

    def apply(self, logits: torch.Tensor, rows: list[int], n_out: list[int]) -> torch.Tensor:
        """``logits`` (len(rows), V) processed in transformers' order (``rows``: each batch
        row's prompt, ``n_out``: how many tokens it generated so far)."""
        logits = logits.masked_fill(self._mask(rows, n_out).to(logits.device), float("-inf"))
        if self.forced.any():
            for b, k in enumerate(n_out):
                if k == self.last:  # ForcedEOS: 0 for those ids, -inf for all others, then
                    # SuppressTokens / AtBegin, which come after it in transformers' list
                    late = self.always | self.begin if k == 0 else self.always
                    keep = (self.forced & ~late).to(logits.device)
                    logits[b] = torch.where(keep, 0.0, float("-inf"))
        return logits

    def _mask(self, rows: list[int], n_out: list[int]) -> torch.Tensor:
        """(len(rows), V) bool: the banned tokens of each batch row."""
        m = self.always.expand(len(rows), -1).clone()
        for b, (r, k) in enumerate(zip(rows, n_out, strict=True)):
            if k == 0:
                m[b] |= self.begin
            if k < self.min_new[r]:
                m[b] |= self.eos
            ids = None if self.history is None else self.history[r]
            if self.grams is not None and len(ids) >= self.n:
                m[b, list(self.grams[r].get(tuple(ids[len(ids) - self.n + 1:]), ()))] = True
            for head, last in self.seqs.items():
                if len(head) <= len(ids) and tuple(ids[len(ids) - len(head):]) == head:
                    m[b, list(last)] = True
        return m
