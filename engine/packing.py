"""Tokenized examples and padding-free batches: ``Example``, ``collate`` into one packed
sequence (``Batch``: documents delimited by ``cu_seqlens``, positions restarting per document),
``pad_batch`` for the classic (B, T) layout, and ``PackedBatches``: seeded, resumable epochs of
batches of at most ``tokens_per_batch`` tokens (best-fit or greedy bins), split across ranks.

Labels are pre-shifted (``labels[t]`` is what position ``t`` predicts, or ``IGNORE``), and the last
position of every example is ``IGNORE``, so packed documents never predict across a boundary.
Reading JSONL into examples is ``ember.engine.data``, which re-exports every public name here.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import random
from dataclasses import dataclass
from itertools import accumulate
from typing import TYPE_CHECKING

import torch

from ember import EmberError

if TYPE_CHECKING:
    from ember.engine.data import DataConfig

IGNORE = -100


def _one_of(name: str, value, allowed) -> None:
    if value not in allowed:
        raise EmberError(f"data.{name} must be one of {', '.join(map(repr, allowed))}, "
                         f"got {value!r}")


@dataclass(eq=False)
class Example:
    input_ids: list[int]
    labels: list[int]  # pre-shifted, IGNORE where there is no loss
    source: str  # "path:line"
    prompt_len: int = 0  # leading tokens that are the generation prompt (0 for plain text)
    reference: str | None = None  # completion / final assistant text, for generation metrics
    key: str = ""  # content hash: splits depend on the line's content, not its position
    # Lengths of the documents packed together in this example (a DPO pair: chosen, rejected);
    # empty: one document. They stay in one batch, each its own document in ``cu_seqlens``.
    parts: tuple[int, ...] = ()
    group: int = 0  # which training file it came from (data.mix, per-source validation)
    value: float = 0.0  # a number per example: a reward pair's margin, a regression target
    desirable: bool | None = None  # KTO's label of an unpaired completion (engine/kto.py)
    # The reference model's summed answer log-prob of each document, when precomputed
    # (``[dpo]`` / ``[kto]`` ``precompute_ref_log_probs``: engine/preference_objectives.py)
    ref_logps: tuple[float, ...] | None = None
    # Token 0's own label (its id where the line's loss covers it: text lines, loss_on = "all"),
    # which no position of the example predicts; a prompt-tuned model's last virtual token does
    # (PEFT puts -100 for the virtual tokens in front of labels that include token 0).
    first_label: int = IGNORE
    # The generation prompt's ids where the chat template renders them otherwise than the
    # training context input_ids[:prompt_len] (``_Encoder.generation_prompt``); None: the same
    generation_prompt: list[int] | None = None

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def prompt_ids(self) -> list[int]:
        """The prompt generation metrics complete: the conversation up to the answer as
        ``apply_chat_template(..., add_generation_prompt=True)`` renders it."""
        if self.generation_prompt is not None:
            return self.generation_prompt
        return self.input_ids[:self.prompt_len]

    @property
    def num_loss_tokens(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE)

    @property
    def doc_lengths(self) -> tuple[int, ...]:
        return self.parts or (len(self),)


@dataclass
class Batch:
    """One packed, padding-free sequence: B == 1, documents delimited by ``cu_seqlens``."""

    input_ids: torch.Tensor  # (1, T) long
    labels: torch.Tensor  # (1, T) long, pre-shifted, IGNORE where no loss
    position_ids: torch.Tensor  # (1, T) long, restarting at 0 per document
    cu_seqlens: torch.Tensor  # (num_docs + 1,) int32
    max_seqlen: int
    num_loss_tokens: int
    num_docs: int
    values: torch.Tensor | None = None  # (examples,) float32: each example's ``value``
    desirable: torch.Tensor | None = None  # (num_docs,) bool: KTO's labels (engine/kto.py)
    ref_sums: torch.Tensor | None = None  # (num_docs,) float32: precomputed reference log-probs
    first_labels: torch.Tensor | None = None  # (num_docs,) long: each document's ``first_label``

    @property
    def num_first_labels(self) -> int:
        """Documents whose token 0 has a label (a prompt-tuned model's extra loss terms)."""
        return 0 if self.first_labels is None else int((self.first_labels != IGNORE).sum())

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[1]

    def to(self, device, non_blocking: bool = True) -> Batch:
        return Batch(*(t.to(device, non_blocking=non_blocking) for t in (
            self.input_ids, self.labels, self.position_ids, self.cu_seqlens)),
            self.max_seqlen, self.num_loss_tokens, self.num_docs,
            None if self.values is None else self.values.to(device, non_blocking=non_blocking),
            None if self.desirable is None else self.desirable.to(device),
            None if self.ref_sums is None else self.ref_sums.to(device),
            None if self.first_labels is None else self.first_labels.to(device))


def collate(examples: list[Example]) -> Batch:
    ids = [t for e in examples for t in e.input_ids]
    labels = [t for e in examples for t in e.labels]
    lens = [n for e in examples for n in e.doc_lengths]
    pos = [p for n in lens for p in range(n)]
    desirable = None
    if any(e.desirable is not None for e in examples):  # KTO: one label per (one-document) example
        desirable = torch.tensor([bool(e.desirable) for e in examples])
    ref_sums = None  # only when every document has its reference log-prob (else computed live)
    if all(e.ref_logps is not None for e in examples):
        ref_sums = torch.tensor([x for e in examples for x in e.ref_logps], dtype=torch.float32)
    first = [e.first_label if not e.parts else IGNORE for e in examples for _ in e.doc_lengths]
    return Batch(torch.tensor([ids]), torch.tensor([labels]), torch.tensor([pos]),
                 torch.tensor([0, *accumulate(lens)], dtype=torch.int32), max(lens),
                 sum(1 for t in labels if t != IGNORE), len(lens),
                 torch.tensor([e.value for e in examples], dtype=torch.float32), desirable,
                 ref_sums, torch.tensor(first, dtype=torch.long))


@dataclass
class PaddedBatch:
    input_ids: torch.Tensor  # (B, T)
    labels: torch.Tensor  # (B, T), IGNORE on padding
    attention_mask: torch.Tensor  # (B, T) long, 1 = real token
    position_ids: torch.Tensor  # (B, T), 0 at each row's first real token
    num_loss_tokens: int


def pad_batch(examples: list[Example], pad_id: int, side: str = "right") -> PaddedBatch:
    """A (B, T) batch with padding, for callers that want the classic layout (HF comparisons,
    left-padded generation). One row per document, in ``collate``'s order: a pair's chosen and
    rejected (``Example.parts``) get a row each, so they never attend to each other."""
    _one_of("side", side, ("right", "left"))
    if not examples:
        raise EmberError("pad_batch: no examples to batch")
    docs = []  # (input_ids, labels) of each document
    for e in examples:
        start = 0
        for n in e.doc_lengths:
            docs.append((list(e.input_ids[start:start + n]), list(e.labels[start:start + n])))
            start += n
    T = max(len(d) for d, _ in docs)
    ids, labels, mask, pos = [], [], [], []
    cat = (lambda a, b: b + a) if side == "left" else (lambda a, b: a + b)
    for d, lab in docs:
        n, p = len(d), T - len(d)
        ids.append(cat(d, [pad_id] * p))
        labels.append(cat(lab, [IGNORE] * p))
        mask.append(cat([1] * n, [0] * p))
        pos.append(cat(list(range(n)), [0] * p))
    return PaddedBatch(torch.tensor(ids), torch.tensor(labels), torch.tensor(mask),
                       torch.tensor(pos), sum(e.num_loss_tokens for e in examples))


def _best_fit(order: list[int], lengths: list[int], capacity: int) -> list[list[int]]:
    """Best-fit decreasing: longest first, each into the fullest bin it fits (ties: ``order``)."""
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # sorted (room left, bin id)
    for i in sorted(order, key=lambda i: -lengths[i]):  # stable: equal lengths keep `order`
        j = bisect.bisect_left(free, (lengths[i], -1))
        if j < len(free):
            room, b = free.pop(j)
        else:
            room, b = capacity, len(bins)
            bins.append([])
        bins[b].append(i)
        bisect.insort(free, (room - lengths[i], b))
    return bins


def _greedy(order: list[int], lengths: list[int], capacity: int) -> list[list[int]]:
    bins, cur, used = [], [], 0
    for i in order:
        if used + lengths[i] > capacity:
            bins.append(cur)
            cur, used = [], 0
        cur.append(i)
        used += lengths[i]
    return bins + ([cur] if cur else [])


class PackedBatches:
    """Epochs of packed batches of at most ``tokens_per_batch`` tokens, deterministic by seed.

    Iterating yields the rest of the current epoch, then moves to the next epoch, so after a
    ``load_state_dict`` the next batches are exactly those an uninterrupted run would have seen.
    Under torchrun every rank follows this one-process stream and takes its share of each
    optimizer step's batches (``ember.engine.distributed.step_share``).
    """

    def __init__(self, examples: list[Example], tokens_per_batch: int, *, seed: int = 0,
                 order: str = "shuffle", packing: str = "best_fit",
                 mix: tuple[float, ...] = ()):
        _one_of("order", order, ("shuffle", "length", "file"))
        _one_of("packing", packing, ("best_fit", "greedy"))
        if not examples:
            raise EmberError("no examples to batch")
        self.examples = examples
        self.lengths = [len(e) for e in examples]
        if max(self.lengths) > tokens_per_batch:
            longest = examples[self.lengths.index(max(self.lengths))]
            pair = (f": {' + '.join(map(str, longest.parts))} tokens, a pair's documents go in "
                    "one batch together, so tokens_per_batch should be at least 2 x max_seq_len"
                    if len(longest.parts) > 1 else "")
            raise EmberError(f"tokens_per_batch ({tokens_per_batch}) is smaller than the longest "
                             f"example ({max(self.lengths)} tokens{pair}); raise it or lower "
                             "max_seq_len")
        self.tokens_per_batch, self.seed, self.order, self.packing = (
            tokens_per_batch, seed, order, packing)
        # data.mix: each epoch draws its examples from the sources (Example.group) by weight.
        self.mix = tuple(mix)
        self._members = None
        if self.mix:
            self._members = [[] for _ in self.mix]
            for i, e in enumerate(examples):
                self._members[e.group].append(i)
            empty = [g for g, m in enumerate(self._members) if not m]
            if empty:
                raise EmberError(f"data.mix: training source {empty[0]} has no examples")
        self.epoch, self.position = 0, 0
        self._cache: tuple[int, list[list[int]]] | None = None
        h = hashlib.blake2b(digest_size=16)
        # (0, 1: the rank and world size batches were once split by; kept so that
        # checkpoints still resume)
        h.update(json.dumps([self.lengths, tokens_per_batch, seed, order, packing, 0,
                             1]).encode())
        for e in examples:
            h.update(e.key.encode())
        if self.mix:  # (unmixed fingerprints stay as they were: old checkpoints still resume)
            h.update(json.dumps([self.mix, [e.group for e in examples]]).encode())
        self.fingerprint = h.hexdigest()

    @classmethod
    def from_config(cls, examples: list[Example], cfg: DataConfig, **kw) -> PackedBatches:
        return cls(examples, cfg.tokens_per_batch, seed=cfg.seed, order=cfg.order,
                   packing=cfg.packing, mix=cfg.mix, **kw)

    def plan(self, epoch: int) -> list[list[int]]:
        """Example indices of every batch of ``epoch``."""
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1]
        bins = self._bins(epoch)
        self._cache = (epoch, bins)
        return bins

    def _bins(self, epoch: int) -> list[list[int]]:
        rng = random.Random(f"{self.seed}:{epoch}")  # str seeds hash stably across runs
        order = list(range(len(self.examples)))
        if self.mix:
            from ember.engine.mixing import epoch_indices

            order = sorted(epoch_indices(self._members, self.mix, self.seed, epoch))
        if self.order == "shuffle":
            rng.shuffle(order)
        elif self.order == "length":
            order.sort(key=self.lengths.__getitem__)
        if self.packing == "greedy":
            bins = _greedy(order, self.lengths, self.tokens_per_batch)
        else:
            bins = _best_fit(order, self.lengths, self.tokens_per_batch)
            if self.order == "shuffle":
                rng.shuffle(bins)
            elif self.order == "length":
                bins.sort(key=lambda b: (max(self.lengths[i] for i in b), b))
            else:
                for b in bins:
                    b.sort()
                bins.sort()
        return bins

    def __len__(self) -> int:
        """Batches in the current epoch (it can vary by a few between epochs)."""
        return len(self.plan(self.epoch))

    def total_batches(self, epochs: int) -> int:
        return sum(len(self.plan(e)) for e in range(epochs))

    def __iter__(self):
        for idx in self.indices():
            yield self.collate(idx)

    def indices(self):
        """The example indices of each batch ``__iter__`` yields (the same position moves), for
        a caller that collates only some of them (a rank's share of a step, ``step_share``)."""
        plan = self.plan(self.epoch)
        while self.position < len(plan):
            idx = plan[self.position]
            self.position += 1
            yield idx
        self.epoch, self.position = self.epoch + 1, 0

    def collate(self, idx: list[int]):
        return collate([self.examples[i] for i in idx])

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "fingerprint": self.fingerprint}

    def load_state_dict(self, state: dict) -> None:
        if state.get("fingerprint") != self.fingerprint:
            raise EmberError("the dataset or batching settings differ from the checkpoint's, so "
                             "the run cannot resume at the same batch; resume with the same data "
                             "and data.* settings")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
