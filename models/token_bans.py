"""transformers' logits processors that act on token ids, per batch row of ``generate_ids``:
SequenceBias (``sequence_bias``: added to a token's logit, for a sequence of several tokens when
the next one completes it), then, after the repetition penalty, NoRepeatNGram, NoBadWords
(``bad_words_ids``), MinLength / MinNewTokensLength (no stop id before ``min_length`` tokens in
all, ``min_new_tokens`` new ones), ForcedBOSToken (``forced_bos_token_id``: the only token
allowed after a one-token prompt), ForcedEOSToken (the last token allowed is
``forced_eos_token_id``), ExponentialDecayLengthPenalty (the stop ids' logits grown by
``factor ** (new tokens - start)`` of their absolute value), SuppressTokens and
SuppressTokensAtBegin, in transformers' order.

Each row is checked against its own prompt and output (not the left padding of a batch), so a
row gets what transformers' ``generate()`` gives that prompt alone."""

from __future__ import annotations

import numbers
import operator
import warnings
from collections.abc import Iterable, Mapping, Sequence

import torch

from ember import EmberError


def _id_list(what: str, ids, vocab: int, outside_ok: bool = False) -> list[int]:
    """``ids`` as a list of ints in [0, vocab); EmberError naming ``what`` otherwise.
    ``outside_ok``: ints outside the vocabulary are dropped with a warning instead (transformers'
    SuppressTokens and SuppressTokensAtBegin ban ``isin(vocabulary, ids)``: such an id bans
    nothing there, where its other processors fail on one)."""
    if isinstance(ids, (str, bytes)) or not isinstance(ids, Iterable):
        raise EmberError(f"{what} must be a list of token ids, got {ids!r}")
    out, outside = [], []
    for t in ids:
        if isinstance(t, bool) or not isinstance(t, numbers.Integral) or (
                not outside_ok and not 0 <= t < vocab):
            raise EmberError(f"{what} holds {t!r}, not a token id of the model's vocabulary "
                             f"[0, {vocab})")
        (out if 0 <= t < vocab else outside).append(operator.index(t))
    if outside:
        warnings.warn(f"{what} holds ids outside the model's vocabulary [0, {vocab}), which ban "
                      f"nothing (transformers ignores them too): {outside[:5]}", stacklevel=4)
    return out


def _is_real(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _sequence_bias(bias, vocab: int) -> list[tuple[list[int], float]]:
    """transformers' ``sequence_bias``: ``[[ids, bias], ...]`` (generation_config.json's form)
    or ``{tuple(ids): bias}``, as (ids, bias) pairs in its order, a repeated sequence's last
    bias winning (transformers makes a dict of the list)."""
    pairs = list(bias.items()) if isinstance(bias, Mapping) else bias
    if isinstance(pairs, (str, bytes)) or not isinstance(pairs, Iterable):
        raise EmberError(f"sequence_bias must be a list of [token ids, bias] pairs, got {bias!r}")
    out: dict[tuple[int, ...], float] = {}
    for i, pair in enumerate(pairs):
        if isinstance(pair, (str, bytes)) or not isinstance(pair, Sequence) or len(pair) != 2 or (
                not _is_real(pair[1])):
            raise EmberError(f"sequence_bias[{i}] must be a [token ids, bias] pair, e.g. "
                             f"[[10, 45], -2.0], got {pair!r}")
        ids = _id_list(f"sequence_bias[{i}]", pair[0], vocab)
        if not ids:
            raise EmberError(f"sequence_bias[{i}] has no token ids")
        out[tuple(ids)] = float(pair[1])
    return [(list(k), v) for k, v in out.items()]


class TokenBans:
    """The token-id processors of each row; ``active`` is False when nothing is set.

    The fixed parts (suppress_tokens, one-token bad words and biases, the stop ids held back by
    min_length / min_new_tokens, begin_suppress_tokens, the forced tokens) are tensors made
    once on the logits' device, so a step sends nothing to it for them; the parts that depend
    on a row's tokens (no_repeat_ngram_size, longer bad words and biased sequences) are dict
    lookups on the host, one per row and sequence length, and reach the device as one small
    index tensor, only on a step where one matches."""

    def __init__(self, prompts: list[list[int]], vocab: int, stop_ids: Iterable[int], *,
                 min_new_tokens: int = 0, no_repeat_ngram_size: int = 0,
                 bad_words_ids: Sequence[Sequence[int]] | None = None,
                 suppress_tokens: Sequence[int] | None = None,
                 begin_suppress_tokens: Sequence[int] | None = None, min_length: int = 0,
                 forced_eos_token_id: int | Sequence[int] | None = None,
                 forced_bos_token_id: int | None = None,
                 sequence_bias: Sequence | Mapping | None = None,
                 exponential_decay_length_penalty: Sequence | None = None,
                 max_new_tokens: int = 0) -> None:
        self.vocab, self.n = vocab, no_repeat_ngram_size
        stops = sorted({t for t in stop_ids if 0 <= t < vocab})
        # per prompt: new tokens before a stop id may come (min_length counts the prompt)
        self.min_new = [max(min_new_tokens, min_length - len(p)) if stops else 0
                        for p in prompts]
        forced = ([] if forced_eos_token_id is None else [forced_eos_token_id]
                  if isinstance(forced_eos_token_id, numbers.Integral) else forced_eos_token_id)
        forced = _id_list("forced_eos_token_id", forced, vocab)
        self.last = max_new_tokens - 1  # the step forced_eos_token_id is forced at
        bos = [] if forced_bos_token_id is None else _id_list(
            "forced_bos_token_id", [forced_bos_token_id], vocab)
        # ForcedBOS acts where transformers' whole input is one token: a one-token prompt's
        # first step; SuppressTokensAtBegin then waits one token more
        self.bos_rows = [bool(bos) and len(p) == 1 for p in prompts]
        self.decay = None
        if exponential_decay_length_penalty is not None:
            d = exponential_decay_length_penalty
            if isinstance(d, (str, bytes)) or not isinstance(d, Sequence) or len(d) != 2 or (
                    isinstance(d[0], bool) or not isinstance(d[0], numbers.Integral)
                    or not _is_real(d[1])):
                raise EmberError("exponential_decay_length_penalty must be [start, factor] "
                                 f"(new tokens before it acts, a number), got {d!r}")
            self.decay = (int(d[0]), float(d[1]))
        suppress = _id_list("suppress_tokens", suppress_tokens or (), vocab, outside_ok=True)
        begin = _id_list("begin_suppress_tokens", begin_suppress_tokens or (), vocab,
                         outside_ok=True)
        # transformers' GenerationConfig.validate refuses it: every logit of the forced step
        # would be -inf (greedy decoding chose id 0 there, sampling failed in multinomial)
        for name, ids in (("forced_bos_token_id", bos), ("forced_eos_token_id", forced)):
            if ids and set(ids) <= set(suppress):
                raise EmberError(f"every token of {name} ({sorted(set(ids))}) is also in "
                                 "suppress_tokens: forcing a token while suppressing it leaves "
                                 "none to generate (transformers refuses it too); remove it "
                                 "from one of them (min_new_tokens keeps an early stop away)")
        if isinstance(bad_words_ids, (str, bytes)) or not isinstance(
                bad_words_ids or (), Iterable):
            raise EmberError(f"bad_words_ids must be a list of token-id lists, got "
                             f"{bad_words_ids!r}")
        # bad words of several tokens: their first tokens' count -> those tokens -> last tokens
        self.heads: dict[int, dict[tuple[int, ...], list[int]]] = {}
        bad1 = set()
        for i, w in enumerate(bad_words_ids or ()):
            w = _id_list(f"bad_words_ids[{i}]", w, vocab)
            if not w:
                raise EmberError(f"bad_words_ids[{i}] is empty: give the token ids of a word")
            if len(w) > 1:
                lasts = self.heads.setdefault(len(w) - 1, {}).setdefault(tuple(w[:-1]), [])
                if w[-1] not in lasts:
                    lasts.append(w[-1])
            elif w[0] not in stops:  # transformers never bans a stop id as a bad word
                bad1.add(w[0])
        # sequence_bias: one-token biases as a (V,) tensor; longer sequences by prefix length
        # (in transformers' order, which is the order their biases add up in)
        self.bias1: list[tuple[int, float]] = []
        self.biased: dict[int, dict[tuple[int, ...], list[tuple[int, float]]]] = {}
        for ids, v in _sequence_bias(sequence_bias, vocab) if sequence_bias is not None else ():
            if len(ids) == 1:
                self.bias1.append((ids[0], v))
            else:
                self.biased.setdefault(len(ids) - 1, {}).setdefault(tuple(ids[:-1]), []).append(
                    (ids[-1], v))
        self.has_bias = bool(self.bias1 or self.biased)
        # host id lists; ``_on`` makes them tensors on the logits' device once
        self._ids = {"bad1": sorted(bad1), "suppress": sorted(set(suppress)),
                     "begin": sorted(set(begin)), "eos": stops, "forced": forced, "bos": bos}
        self._dev: dict[str, torch.Tensor] | None = None
        self.active = bool(bad1 or suppress or begin or forced or bos or self.n or self.heads
                           or max(self.min_new, default=0) > 0 or (self.decay and stops))
        need_history = bool(self.n or self.heads or self.biased)
        self.history = [list(p) for p in prompts] if need_history else None
        # no_repeat_ngram_size N: each (N-1)-gram of a row's tokens -> the tokens that followed it
        self.grams = [self._ngrams(p) for p in prompts] if self.n else None

    def _ngrams(self, ids: list[int]) -> dict[tuple[int, ...], dict[int, None]]:
        # the followers as an ordered set: a prompt's repeats are banned once per step
        grams: dict[tuple[int, ...], dict[int, None]] = {}
        for i in range(len(ids) - self.n + 1):
            grams.setdefault(tuple(ids[i:i + self.n - 1]), {})[ids[i + self.n - 1]] = None
        return grams

    def add(self, row: int, token: int) -> None:
        """``token`` was generated for prompt ``row``."""
        if self.history is None:
            return
        ids = self.history[row]
        ids.append(token)
        if self.grams is not None and len(ids) >= self.n:
            self.grams[row].setdefault(tuple(ids[len(ids) - self.n:-1]), {})[token] = None

    def _on(self, device: torch.device) -> dict[str, torch.Tensor]:
        if self._dev is None or self._dev["eos"].device != device:
            self._dev = {k: torch.tensor(v, dtype=torch.long, device=device)
                         for k, v in self._ids.items()}
            b1 = torch.zeros(self.vocab, dtype=torch.float, device=device)
            if self.bias1:  # transformers' length_1_bias (a repeated id: its last bias)
                ids, vs = zip(*self.bias1, strict=True)
                b1[torch.tensor(ids, device=device)] = torch.tensor(vs, device=device)
            self._dev["bias1"] = b1
        return self._dev

    def bias(self, logits: torch.Tensor, rows: list[int]) -> torch.Tensor:
        """``logits`` (len(rows), V) plus ``sequence_bias`` (transformers' first processor),
        added as transformers adds it: the biases summed first, then added to the logits."""
        if not self.has_bias:
            return logits
        bias = torch.zeros_like(logits)
        bias += self._on(logits.device)["bias1"]
        at_b: list[int] = []
        at_t: list[int] = []
        vals: list[float] = []
        for n, seqs in self.biased.items():  # (biased: history is kept)
            for b, r in enumerate(rows):
                ids = self.history[r]
                for t, v in seqs.get(tuple(ids[len(ids) - n:]), ()) if n <= len(ids) else ():
                    at_b.append(b)
                    at_t.append(t)
                    vals.append(v)
        if at_b:
            at = torch.tensor([at_b, at_t], dtype=torch.long).to(logits.device)
            bias.index_put_((at[0], at[1]), torch.tensor(vals).to(logits.device), accumulate=True)
        return logits + bias

    def apply(self, logits: torch.Tensor, rows: list[int], n_out: list[int]) -> torch.Tensor:
        """``logits`` (len(rows), V) through the processors after the repetition penalty, in
        transformers' order, in place (``rows``: each batch row's prompt, ``n_out``: how many
        tokens it generated so far)."""
        dev, ninf = self._on(logits.device), float("-inf")

        def each(sel: list[bool]):
            """The rows selected: ``slice(None)`` for all of them (one op for the batch; a row
            selector would be a copy to the device), else their indices."""
            return [slice(None)] if all(sel) else [b for b, s in enumerate(sel) if s]

        def ban(name: str, sel: list[bool]) -> None:
            if dev[name].numel():
                for b in each(sel):
                    logits[b].index_fill_(-1, dev[name], ninf)

        ban("bad1", [True] * len(rows))  # NoBadWords, then NoRepeatNGram's and its longer words
        if self.history is not None and (self.n or self.heads):
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
        by_row = list(zip(rows, n_out, strict=True))
        ban("eos", [k < self.min_new[r] for r, k in by_row])
        for name, sel in (("bos", [k == 0 and self.bos_rows[r] for r, k in by_row]),
                          ("forced", [k == self.last for k in n_out])):
            if dev[name].numel():  # ForcedBOS / ForcedEOS: 0 for those ids, -inf for all others
                for b in each(sel):
                    logits[b] = ninf
                    logits[b].index_fill_(-1, dev[name], 0.0)
        if self.decay is not None and dev["eos"].numel():
            start, factor = self.decay
            for k in sorted({k for k in n_out if k > start}):
                # ExponentialDecayLengthPenalty's own arithmetic, on the stop ids' logits
                for b in each([j == k for j in n_out]):
                    s = logits[b][..., dev["eos"]]
                    penalty = torch.abs(s) * (pow(factor, k - start) - 1)
                    penalty = penalty.masked_fill(~torch.isfinite(s), 0.0)
                    logits[b][..., dev["eos"]] = s + penalty
        ban("suppress", [True] * len(rows))
        ban("begin", [k == int(self.bos_rows[r]) for r, k in by_row])
        return logits
