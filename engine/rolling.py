"""Rolling document perplexity, as lm-evaluation-harness's ``loglikelihood_rolling`` tasks
(wikitext) score it: ``word_perplexity``, ``byte_perplexity`` and ``bits_per_byte`` of a file of
``{"text": ...}`` lines, each line one document scored whole, however long.

A document's tokens (no special tokens) are cut into disjoint windows of ``max_len`` predicted
tokens (lm-eval's ``get_rolling_token_windows`` with ``context_len=1`` and
``make_disjoint_window``): the first window predicts the document's first ``max_len`` tokens
after BOS (else EOS, lm-eval's ``prefix_token_id``); each later one predicts the next
``max_len`` tokens (the last: those left) from an input of the ``max_len`` tokens before each,
so only its first prediction has a single token of context. The document's log-likelihood is
the sum over its windows, and over the file:

- ``word_perplexity`` = exp(-sum log-likelihood / sum words), words being
  ``len(re.split(r"\\s+", text))`` (lm-eval's ``count_words``);
- ``byte_perplexity`` = exp(-sum log-likelihood / sum UTF-8 bytes);
- ``bits_per_byte`` = -sum log-likelihood / sum bytes / ln 2.

Checked against lm-eval 0.4.13's ``HFLM.loglikelihood_rolling`` (``tools/check_lmeval.py``).
One difference: lm-eval 0.4.13 encodes the document with the tokenizer's own special tokens, so
a tokenizer that adds BOS (Llama's) has its documents start with BOS after the BOS prefix and
scores log p(BOS | BOS) as the first token; Ember scores the text's tokens after one BOS
(lm-eval's numbers with ``add_bos_token=False``). lm-eval's wikitext counts the words and bytes
of the page before its detokenizer; here, of the text scored.
"""

from __future__ import annotations

import contextlib
import math
import re
from dataclasses import replace
from pathlib import Path

from ember import EmberError
from ember.engine.data import IGNORE, DataConfig, DataReport, _Bad, _Reader, read_lines
from ember.engine.metrics import perplexity
from ember.engine.packing import Example


def rolling_windows(
    tokens: list[int], prefix: int, max_len: int
) -> list[tuple[list[int], list[int]]]:
    """(input ids, predicted ids) of each window: the last ``len(predicted)`` positions of the
    input predict them, each the token after it (lm-eval's disjoint rolling windows)."""
    if max_len < 1:
        raise EmberError(f"rolling windows need max_seq_len >= 1, got {max_len}")
    seq = [prefix, *tokens]  # seq[i + 1] == tokens[i]
    windows, done = [], 0
    while done < len(tokens):
        end = min(done + max_len, len(tokens))  # predicts tokens[done:end]
        windows.append((seq[max(0, end - max_len) : end], tokens[done:end]))
        done = end
    return windows


class _TextReader(_Reader):
    def __init__(self, path: Path, cfg: DataConfig, tokenizer):
        super().__init__(path, cfg, tokenizer)
        self.words: list[int] = []
        self.bytes: list[int] = []
        bos = getattr(tokenizer, "bos_token_id", None)
        self.prefix = bos if bos is not None else self.enc.eos
        if self.prefix is None:
            raise EmberError(
                "rolling perplexity needs a BOS or EOS token to predict a "
                "document's first token from; this tokenizer has neither"
            )

    def example(self, lineno: int, raw: bytes) -> Example | None:
        line = self.text(lineno, raw)
        if line is None:
            return None
        try:
            text = self.record(line)
            if self.fmt != "text":
                raise _Bad(
                    "not text",
                    f'rolling perplexity scores {{"text": ...}} lines, this file\'s are {self.fmt}',
                )
            doc = self.enc.text_ids(text)  # a whole document (a fill token: infilling, once)
        except _Bad as e:
            self.bad(lineno, e.kind, e.why)
            return None
        ids, labels, parts = [], [], []
        for inp, pred in rolling_windows(doc, self.prefix, self.cfg.max_seq_len):
            ids += inp
            labels += [IGNORE] * (len(inp) - len(pred)) + pred  # pre-shifted: t predicts t + 1
            parts.append(len(inp))
        self.words.append(len(re.split(r"\s+", text)))
        self.bytes.append(len(text.encode("utf-8")))
        return Example(ids, labels, self.where(lineno), 0, None, "", tuple(parts))


def load_documents(
    path: str | Path, cfg: DataConfig, tokenizer
) -> tuple[list[Example], list[int], list[int], DataReport]:
    """(one example per document, its windows as packed documents; its words; its UTF-8
    bytes; the report). ``cfg.max_seq_len`` is the window (lm-eval's ``max_length``)."""
    reader, examples = read_lines(path, lambda p: _TextReader(p, cfg, tokenizer))
    rep = reader.report
    rep.format, rep.examples = "text (rolling windows)", len(examples)
    rep.tokens = sum(len(e) for e in examples)
    rep.loss_tokens = sum(e.num_loss_tokens for e in examples)
    if not examples:
        raise EmberError(
            f"{path}: no documents to score out of {rep.lines - rep.blank_lines} "
            "lines\n" + "\n".join(f"  {p}" for p in rep.problems)
        )
    return examples, reader.words, reader.bytes, rep


def rolling_metrics(
    loglikelihoods: list[float], words: list[int], nbytes: list[int]
) -> dict[str, float]:
    """lm-eval's word_perplexity, byte_perplexity and bits_per_byte of the documents' summed
    log-likelihoods (its ``weighted_perplexity`` and ``bits_per_byte`` aggregations)."""
    if not (len(loglikelihoods) == len(words) == len(nbytes)) or not words:
        raise EmberError(f"{len(loglikelihoods)} scored documents for {len(words)} counted")
    ll = math.fsum(loglikelihoods)
    return {
        "word_perplexity": perplexity(-ll / sum(words)),
        "byte_perplexity": perplexity(-ll / sum(nbytes)),
        "bits_per_byte": -ll / sum(nbytes) / math.log(2),
    }


def rolling_eval(
    model,
    tokenizer,
    path: str | Path,
    cfg: DataConfig,
    device,
    autocast=contextlib.nullcontext,
    max_examples: int | None = None,
) -> dict[str, float]:
    """``rolling_metrics`` of the first ``max_examples`` documents of ``path``, in windows of
    ``cfg.max_seq_len`` tokens or the model's context if shorter (lm-eval's ``max_length``
    defaults to the model's context), reported as ``rolling_window``."""
    from ember.engine.choices import score_choices

    context = getattr(getattr(model, "cfg", None), "max_position_embeddings", None)
    window = min(cfg.max_seq_len, context or cfg.max_seq_len)
    examples, words, nbytes, _ = load_documents(path, replace(cfg, max_seq_len=window), tokenizer)
    examples = examples[:max_examples]
    # each window its own example, so a batch holds data.tokens_per_batch tokens however long
    # a document is; summed back per document
    windows, owner = [], []
    for d, e in enumerate(examples):
        at = 0
        for n in e.parts:
            windows.append(replace(e, input_ids=e.input_ids[at:at + n],
                                   labels=e.labels[at:at + n], parts=(n,)))
            owner.append(d)
            at += n
    sums = score_choices(model, windows, cfg.tokens_per_batch, device, autocast)
    docs = [[] for _ in examples]
    for d, s in zip(owner, sums, strict=True):
        docs[d].append(float(s.double().sum()))
    n = len(examples)
    return {
        **rolling_metrics([math.fsum(w) for w in docs], words[:n], nbytes[:n]),
        "rolling_window": window,
    }
