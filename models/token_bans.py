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
    """The tokens each row may not generate next; ``active`` is False when nothing is set.

    The fixed bans (suppress_tokens, one-token bad words, the stop ids held back by min_length /
    min_new_tokens, begin_suppress_tokens, forced_eos_token_id) are id tensors made once on the
    logits' device, so a step sends nothing to it for them; the bans that depend on a row's
    tokens (no_repeat_ngram_size, longer bad words) are dict lookups on the host, one per row
    and bad-word length, and reach the device as one small (2, n) index tensor, only on a step
    that bans something."""

    def __init__(self, prompts: list[list[int]], vocab: int, stop_ids: Iterable[int], *,
                 min_new_tokens: int = 0, no_repeat_ngram_size: int = 0,
                 bad_words_ids: Sequence[Sequence[int]] | None = None,
                 suppress_tokens: Sequence[int] | None = None,
                 begin_suppress_tokens: Sequence[int] | None = None, min_length: int = 0,
                 forced_eos_token_id: int | Sequence[int] | None = None,
                 max_new_tokens: int = 0) -> None:
        self.vocab, self.n = vocab, no_repeat_ngram_size
        stops = sorted({t for t in stop_ids if 0 <= t < vocab})
        # per prompt: new tokens before a stop id may come (min_length counts the prompt)
        self.min_new = [max(min_new_tokens, min_length - len(p)) if stops else 0
                        for p in prompts]
        forced = ([] if forced_eos_token_id is None else [forced_eos_token_id]
                  if isinstance(forced_eos_token_id, numbers.Integral) else forced_eos_token_id)
        forced = set(_id_list("forced_eos_token_id", forced, vocab))
        self.last = max_new_tokens - 1  # the step forced_eos_token_id is forced at
        always = set(_id_list("suppress_tokens", suppress_tokens or (), vocab))
        begin = set(_id_list("begin_suppress_tokens", begin_suppress_tokens or (), vocab))
        if isinstance(bad_words_ids, (str, bytes)) or not isinstance(
                bad_words_ids or (), Iterable):
            raise EmberError(f"bad_words_ids must be a list of token-id lists, got "
                             f"{bad_words_ids!r}")
        # bad words of several tokens: their first tokens' count -> those tokens -> last tokens
        self.heads: dict[int, dict[tuple[int, ...], list[int]]] = {}
        for i, w in enumerate(bad_words_ids or ()):
            w = _id_list(f"bad_words_ids[{i}]", w, vocab)
            if not w:
                raise EmberError(f"bad_words_ids[{i}] is empty: give the token ids of a word")
            if len(w) > 1:
                lasts = self.heads.setdefault(len(w) - 1, {}).setdefault(tuple(w[:-1]), [])
                if w[-1] not in lasts:
                    lasts.append(w[-1])
            elif w[0] not in stops:  # transformers never bans a stop id as a bad word
                always.add(w[0])
        # host id lists; ``_on`` makes them tensors on the logits' device once
        self._ids = {"always": sorted(always), "begin": sorted(begin), "eos": stops,
                     "forced": sorted(forced - always), "forced0": sorted(forced - always - begin)}
        self._dev: dict[str, torch.Tensor] | None = None
        self.active = bool(always or begin or forced or self.n or self.heads
                           or max(self.min_new, default=0) > 0)
        need_history = bool(self.n or self.heads)
        self.history = [list(p) for p in prompts] if need_history else None
        # no_repeat_ngram_size N: each (N-1)-gram of a row's tokens -> the tokens that followed it
        self.grams = [self._ngrams(p) for p in prompts] if self.n else None

    def _ngrams(self, ids: list[int]) -> dict[tuple[int, ...], list[int]]:
        grams: dict[tuple[int, ...], list[int]] = {}
        for i in range(len(ids) - self.n + 1):
            grams.setdefault(tuple(ids[i:i + self.n - 1]), []).append(ids[i + self.n - 1])
        return grams

    def add(self, row: int, token: int) -> None:
        """``token`` was generated for prompt ``row``."""
        if self.history is None:
            return
        ids = self.history[row]
        ids.append(token)
        if self.grams is not None and len(ids) >= self.n:
            self.grams[row].setdefault(tuple(ids[len(ids) - self.n:-1]), []).append(token)

    def _on(self, device: torch.device) -> dict[str, torch.Tensor]:
        if self._dev is None or next(iter(self._dev.values())).device != device:
            self._dev = {k: torch.tensor(v, dtype=torch.long, device=device)
                         for k, v in self._ids.items()}
        return self._dev

    def apply(self, logits: torch.Tensor, rows: list[int], n_out: list[int]) -> torch.Tensor:
        """``logits`` (len(rows), V) processed in transformers' order, in place (``rows``: each
        batch row's prompt, ``n_out``: how many tokens it generated so far)."""
        dev, ninf = self._on(logits.device), float("-inf")

        def ban(name: str, sel: list[bool]) -> None:
            ids = dev[name]
            if not ids.numel() or not any(sel):
                return
            if all(sel):
                logits.index_fill_(1, ids, ninf)
            else:  # a row at a time: a row selector would be a copy to the device
                for b in (b for b, s in enumerate(sel) if s):
                    logits[b].index_fill_(0, ids, ninf)

        ban("always", [True] * len(rows))
        ban("begin", [k == 0 for k in n_out])
        ban("eos", [k < self.min_new[r] for r, k in zip(rows, n_out, strict=True)])
        if self.history is not None:
            at_b: list[int] = []
            at_t: list[int] = []
            for b, r in enumerate(rows):
                ids = self.history[r]
                if self.grams is not None and len(ids) >= self.n:
                    got = self.grams[r].get(tuple(ids[len(ids) - self.n + 1:]), ())
                    at_b += [b] * len(got)
                    at_t += got
                for n, heads in self.heads.items():
                    if n <= len(ids):
                        got = heads.get(tuple(ids[len(ids) - n:]), ())
                        at_b += [b] * len(got)
                        at_t += got
            if at_b:  # one small copy; duplicates are fine (each writes -inf)
                at = torch.tensor([at_b, at_t], dtype=torch.long).to(logits.device)
                logits[at[0], at[1]] = ninf
        if self._ids["forced"] or self._ids["forced0"]:
            for b, k in enumerate(n_out):
                if k == self.last:  # ForcedEOS: 0 for those ids, -inf for all others, then
                    # SuppressTokens / AtBegin, which come after it in transformers' list
                    logits[b] = ninf
                    logits[b].index_fill_(0, dev["forced0" if k == 0 else "forced"], 0.0)
        return logits
