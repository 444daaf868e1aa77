"""Evaluation: validation loss / perplexity on packed batches, and task metrics by generation.

Generation metrics: each example's prompt (the conversation up to the answer as transformers'
``apply_chat_template(..., add_generation_prompt=True)`` renders it, which vLLM, lm-eval's chat
mode and ``ember generate`` feed: ``Example.prompt_ids``; a plain prompt's tokens as in training)
is completed greedily in batches of similar prompt lengths (left-padded, every row stops
at EOS), decoded, and scored against the example's reference completion with
``ember.engine.metrics``. The reference's own tokens are passed to ``generate_ids`` as a
speculative draft: the output is exactly greedy decoding's, but where the model agrees with the
reference a row costs one forward pass instead of one per token (a fine-tuned model evaluates at
close to the cost of its prompts). A reasoning model's generation is scored by its answer, the
text after its think block, against the reference's (``ember.engine.reasoning``,
``eval.think_end``).

Under torchrun both are shared out (``info``): each rank takes every N-th validation batch
(``eval_batches``) or example, and as a sharded model's forward is a collective, a rank with less
to do makes forward calls that count for nothing (a repeated batch; one-token passes while the
others still decode). Loss sums are all-reduced and predictions gathered, so every rank gets the
one-process scores.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from ember import EmberError
from ember.engine import metrics as M
from ember.engine.data import Batch, Example, PackedBatches, collate
from ember.engine.distributed import (
    DistInfo,
    all_gather_objects,
    all_reduce_sums,
    any_rank,
    eval_share,
)
from ember.engine.losses import sft_loss, sft_loss_tokens
from ember.engine.reasoning import answer_text, generated_answer, resolve_think_end
from ember.models.generate import (
    Knobs,
    config_stop_ids,
    generate_ids,
    knob_defaults,
    stop_and_pad_ids,
)
from ember.models.prompt_tuning import num_virtual_tokens, virtual_ids
from ember.models.token_bans import TokenBans

PREFIX_DECIDABLE = {"exact_match"}


def _cleans_up(tokenizer) -> bool:
    """Whether decoding may delete spaces a shorter prefix's text ended with (transformers'
    ``clean_up_tokenization``: "Hello ." -> "Hello."): an Ember tokenizer says, a transformers
    one is taken at its ``clean_up_tokenization_spaces``."""
    own = getattr(tokenizer, "_cleans_up", None)
    if callable(own):
        return bool(own())
    return bool(getattr(tokenizer, "clean_up_tokenization_spaces", False))


def _diverged(text: str, ref_normalized: str, spaces_may_go: bool = False) -> bool:
    """True when no continuation of ``text`` can normalize to the reference: normalizing an
    extension keeps ``normalize(text)`` as its prefix. ``spaces_may_go``: the decoder's clean-up
    may delete any space of ``text`` once more tokens follow (it only ever deletes spaces), so
    only the text without spaces must be a prefix of the reference's."""
    text = text.rstrip("\ufffd")  # a multi-byte character still being decoded
    if spaces_may_go:
        return not "".join(ref_normalized.split()).startswith("".join(text.split()))
    norm = M.normalize(text)
    return not ref_normalized.startswith(norm) or (
        text[-1:].isspace() and len(norm) < len(ref_normalized)
        and not ref_normalized[len(norm)].isspace() and norm != "")


@dataclass
class GenerationResult:
    scores: dict[str, float]
    samples: list[tuple[str, str, str]] = field(default_factory=list)  # (prompt, pred, ref)
    seconds: float = 0.0
    examples: int = 0
    # The samples' predictions as scored, where a think block was cut from them (``pred``: the
    # whole generation, reasoning included); empty when generations are scored whole
    answers: list[str] = field(default_factory=list)
    unclosed: int = 0  # generations still in their think block at max_new_tokens: no answer


def eval_plan(examples: list[Example], tokens_per_batch: int) -> list[list[int]]:
    """The evaluation batches as lists of example indices: file order, packed greedily."""
    return PackedBatches(examples, tokens_per_batch, order="file", packing="greedy").plan(0)


def eval_batches(examples: list[Example], tokens_per_batch: int, max_batches: int | None = None,
                 info: DistInfo | None = None, keep: Callable[[Batch], bool] | None = None
                 ) -> Iterator[tuple[int | None, Batch]]:
    """This process's share of the evaluation batches, as (index, batch) pairs. The batches are
    the examples in file order, packed greedily, the first ``max_batches`` of them, less those
    ``keep`` rejects, and ``index`` is the batch's place among them; under torchrun (``info``)
    rank r takes batches r, r + N, ... and, when it has fewer than another rank, ends with a
    repeat of the first batch that must not count (``index`` None): a sharded model's forward
    is a collective, so every rank makes as many (``distributed.eval_share``). Sum what counts
    and all-reduce the sums (or gather the results by index)."""
    batches = [collate([examples[i] for i in idx])
               for idx in eval_plan(examples, tokens_per_batch)[:max_batches]]
    if keep is not None:
        batches = [b for b in batches if keep(b)]
    for i in eval_share(len(batches), info or DistInfo()):
        yield i, batches[0 if i is None else i]


@torch.no_grad()
def scored_batches(model, examples: list[Example], tokens_per_batch: int, device,
                   fn: Callable[[Batch], Any], autocast=contextlib.nullcontext,
                   max_batches: int | None = None, info: DistInfo | None = None) -> list:
    """``fn(batch)`` (a picklable result; the batch on ``device``, under ``autocast``, the model
    in eval mode) for every batch of ``eval_batches``, in file order. Under torchrun each rank
    computes its share and every rank gets all results."""
    info = info or DistInfo()
    was_training = model.training
    model.eval()
    mine = {}
    try:
        for i, batch in eval_batches(examples, tokens_per_batch, max_batches, info):
            with autocast():
                out = fn(batch.to(device))
            if i is not None:  # a batch only run along counts for nothing
                mine[i] = out
    finally:
        model.train(was_training)
    scored = {i: r for part in all_gather_objects(mine, info) for i, r in part.items()}
    return [scored[i] for i in sorted(scored)]


@torch.no_grad()
def validation_loss(model, examples: list[Example], tokens_per_batch: int, device,
                    autocast=contextlib.nullcontext, max_batches: int | None = None,
                    info: DistInfo | None = None) -> tuple[float, int]:
    """(mean loss per answer token, answer tokens) over ``examples``; under torchrun (``info``)
    each rank scores its share of the batches (``eval_batches``) and the sums are all-reduced,
    so every rank gets the one-process value."""
    info = info or DistInfo()
    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0
    prompt_tuned = num_virtual_tokens(model) > 0  # token 0 of text lines is a loss term too
    try:
        for i, batch in eval_batches(examples, tokens_per_batch, max_batches, info,
                                     keep=lambda b: b.num_loss_tokens > 0):
            n = sft_loss_tokens(batch, prompt_tuned)
            with autocast():
                loss = sft_loss(model, batch.to(device), n)
            if i is not None:
                total += float(loss) * n
                tokens += n
    finally:
        model.train(was_training)
    total, tokens = all_reduce_sums([total, tokens], info)
    if tokens == 0:
        raise EmberError("validation set has no answer tokens to score")
    return total / tokens, int(tokens)


def generation_examples(model, examples: list[Example], max_new_tokens: int,
                        max_examples: int | None = None, metric_names=(),
                        think_end: str | None = "auto") -> list[Example]:
    """The examples generation metrics score: those with a prompt and a reference answer, the
    first ``max_examples``; EmberError when there are none, when a prompt and
    ``max_new_tokens`` do not fit the model's context, or when one of ``metric_names`` cannot
    score a reference (json_match of a reference that is not JSON, after its think block is
    cut as ``think_end``, ``eval.think_end``, says), naming its line."""
    return _checked_examples(model, examples, max_new_tokens, max_examples, metric_names,
                             think_end)[0]


def _checked_examples(model, examples: list[Example], max_new_tokens: int,
                      max_examples: int | None, metric_names, think_end: str | None = "auto"
                      ) -> tuple[list[Example], dict]:
    """``generation_examples`` and the greedy knobs (``knob_defaults``) it checked, so that
    ``generation_eval`` decodes with the very knobs checked rather than building them twice."""
    if max_new_tokens < 1:  # every prediction would be empty: a score of nothing
        raise EmberError(f"generation metrics need max_new_tokens >= 1, got {max_new_tokens}; "
                         "to skip them give none (eval.metrics = [])")
    if max_examples is not None and max_examples < 1:
        raise EmberError(f"max_examples must be >= 1, got {max_examples}; to skip generation "
                         "metrics give none (eval.metrics = [])")
    usable = [e for e in examples if e.prompt_len > 0 and e.reference is not None]
    if not usable:
        raise EmberError("generation metrics need prompt/completion or messages examples (a "
                         "prompt and a reference answer); this split has none: set eval.metrics "
                         "= [] or give such a file")
    usable = usable[:max_examples]
    M.check_names(metric_names)  # an unknown name: said now, not after generating
    # (without the tokenizer "auto" only finds the marker in references: those it cuts)
    end = resolve_think_end(think_end, None, [e.reference for e in usable])
    for e in usable:
        for name in metric_names:
            why = M.reference_error(name, e.reference if end is None
                                    else answer_text(e.reference, end))
            if why is not None:
                raise EmberError(f"{e.source}: {why}")
    model_cfg = getattr(model, "cfg", None)
    # prompt tuning's virtual tokens take context too; dynamic NTK RoPE has no limit to pass
    first_longest = max(usable, key=lambda e: len(e.prompt_ids))
    longest = len(first_longest.prompt_ids) + len(virtual_ids(model))
    rs = getattr(model_cfg, "rope_scaling", None)
    if model_cfg is not None and not (rs is not None and rs.kind == "dynamic") and (
            longest + max_new_tokens > model_cfg.max_position_embeddings):
        # Checked here, on every rank, rather than by generate_ids on the rank holding the prompt
        raise EmberError(f"{first_longest.source}: an evaluation prompt of {longest} tokens + "
                         f"eval.max_new_tokens ({max_new_tokens}) exceeds the model's context of "
                         f"{model_cfg.max_position_embeddings} tokens; lower "
                         "eval.max_new_tokens (ember eval: --max-new-tokens) or "
                         "data.max_seq_len, or shorten that prompt")
    greedy = knob_defaults(model)  # (its warpers act only when sampling)
    if model_cfg is not None:
        # the generation_config.json's processors as generate_ids takes them: a value
        # transformers refuses (a repetition_penalty of 0) said now, not at the first evaluation
        bans = Knobs.of(greedy).bans()
        TokenBans([[0]], model_cfg.vocab_size, (), max_new_tokens=max_new_tokens, **bans)
    with warnings.catch_warnings():  # (a negative stop id is warned about as it generates)
        warnings.simplefilter("ignore")
        config_stop_ids(model)  # its stop ids: one transformers fails on is refused now too
    return usable, greedy


def generation_eval(model, tokenizer, examples: list[Example], metric_names, *,
                    max_new_tokens: int = 64, batch_size: int = 64, autocast=contextlib.nullcontext,
                    max_examples: int | None = None, show: int = 0,
                    info: DistInfo | None = None, think_end: str | None = "auto"
                    ) -> GenerationResult:
    """Greedy completions of every example's prompt, scored against its reference; with a
    think-end marker (``think_end``: ``eval.think_end``, ``ember.engine.reasoning``) the
    answers after the think blocks are scored, of the generation and of the reference. Under
    torchrun (``info``) each rank completes a share of the examples (every N-th by prompt
    length, ``distributed.eval_share``) in as many batches as the others, decoding in lock step
    (``generate_ids``' ``sync``: a sharded forward is a collective); the predictions are
    gathered and every rank scores all of them."""
    if batch_size < 1:
        raise EmberError(f"the generation batch size must be >= 1, got {batch_size}")
    usable, greedy = _checked_examples(model, examples, max_new_tokens, max_examples,
                                       metric_names, think_end)
    end = resolve_think_end(think_end, tokenizer, [e.reference for e in usable])
    info = info or DistInfo()
    sync = None if not info.distributed else (lambda flag: any_rank(flag, info))
    t0 = time.perf_counter()
    # the tokenizer's and the generation_config.json's, checked, as ``generate()`` stops
    eos, pad = stop_and_pad_ids(model, tokenizer)
    order = sorted(range(len(usable)), key=lambda i: len(usable[i].prompt_ids))
    share = eval_share(len(order), info)  # the same length on every rank, so as many batches
    mine = [order[i] for i in share if i is not None]
    # Exact match is decided as soon as a row's text leaves its reference: stop that row there
    # (a base model that never says the answer costs a few decode steps, not max_new_tokens).
    # Not with think blocks cut: a later think-end marker starts the answer over.
    decidable = set(metric_names) <= PREFIX_DECIDABLE and end is None
    spaces_may_go = _cleans_up(tokenizer)
    # (generation, answer scored: None when its think block never closed)
    preds: list[tuple[str, str | None]] = [("", "")] * len(usable)
    # transformers' generate(do_sample=False) applies the generation_config.json's
    # repetition_penalty (Qwen2.5-Instruct's 1.05), no_repeat_ngram_size, min_new_tokens,
    # bad_words_ids... to greedy decoding; drafts are verified against plain greedy choices
    # only, so with any of them each token takes its own pass
    plain = not Knobs.of(greedy).processors_on()
    was_training = model.training
    model.eval()
    try:
        for a in range(0, len(share), batch_size):
            idx = mine[a:a + batch_size]  # empty: only lock-step passes
            prompts = [usable[i].prompt_ids for i in idx]
            # The reference answer's tokens as a speculative draft: greedy output unchanged, but a
            # model that has learned the task answers a whole row in one pass.
            drafts = None if not plain else [usable[i].input_ids[usable[i].prompt_len:]
                                                for i in idx]
            should_stop = None
            if decidable:
                refs = [M.normalize(usable[i].reference) for i in idx]

                def should_stop(row, ids, refs=refs):
                    return _diverged(tokenizer.decode(ids, skip_special_tokens=True), refs[row],
                                     spaces_may_go)
            with autocast():
                out = generate_ids(model, prompts, max_new_tokens=max_new_tokens,
                                   eos_token_ids=eos, pad_token_id=pad, should_stop=should_stop,
                                   drafts=drafts, sync=sync, **greedy)
            for i, ids in zip(idx, out, strict=True):
                text = tokenizer.decode(ids, skip_special_tokens=True)
                preds[i] = (text, text if end is None else
                            generated_answer(tokenizer, usable[i].prompt_ids, ids, end))
    finally:
        model.train(was_training)
    if info.distributed:
        for part in all_gather_objects({i: preds[i] for i in mine}, info):
            for i, p in part.items():
                preds[i] = p
    refs = [e.reference if end is None else answer_text(e.reference, end) for e in usable]
    scores = M.compute(metric_names, [a or "" for _, a in preds], refs)
    samples = [(tokenizer.decode(e.prompt_ids, skip_special_tokens=False), p[0], r)
               for e, p, r in list(zip(usable, preds, refs, strict=True))[:show]]
    answers = [] if end is None else [a or "" for _, a in preds[:show]]
    return GenerationResult(scores, samples, time.perf_counter() - t0, len(usable), answers,
                            sum(a is None for _, a in preds))
