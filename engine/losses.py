"""Training losses on packed batches: SFT cross-entropy, distillation (KL to a teacher), and the
per-document answer log-probabilities of preference pairs.

SFT. The output head runs only on positions that have a label (``labels != -100``: the answer
tokens), through the fused ``linear_cross_entropy``, so prompt tokens never produce logits.
The summed loss is divided by the number of loss tokens of the *whole accumulated batch*
(``num_loss_tokens``), so summing the micro-batch losses of one optimizer step gives exactly the
token-mean loss of all its examples in one batch, whatever the split into micro-batches.

Distillation. ``T^2 * KL(softmax(t / T) || softmax(s / T))`` per answer token (Hinton et al.),
summed and divided like the SFT loss; the teacher's logits are computed without gradients.

Preference pairs. ``doc_logprobs``: each document's answer log-probability (summed, and its
token count for per-token means) from one forward; the losses built on them are in
``engine/preference_losses.py``. A LoRA model's reference is the same model with its adapters
switched off (``adapters_disabled``).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ember import EmberError
from ember.kernels import linear_cross_entropy
from ember.models.lora import lora_modules
from ember.models.prompt_tuning import num_virtual_tokens, prompt_packed

IGNORE = -100


def _hidden(model, batch, first: torch.Tensor | None = None) -> torch.Tensor:
    """Final hidden states (T, D) of a packed batch (a prompt-tuned model's virtual tokens go in
    front of every document; only the batch's own positions come back). With ``first`` (the
    indices of some documents), the hidden states of those documents' last virtual tokens
    (which predict their token 0) follow: (T + len(first), D)."""
    ids, pos, cu, max_len, real = prompt_packed(model, batch.input_ids, batch.position_ids,
                                                batch.cu_seqlens, batch.max_seqlen)
    h = model.hidden_states(ids, pos, cu_seqlens=cu, max_seqlen=max_len)  # (1, T', D)
    h = h.reshape(-1, h.shape[-1])
    if real is None:
        return h
    if first is not None and first.numel():  # a document's prompt ends just before its token 0
        starts = batch.cu_seqlens[:-1].to(real.device, torch.long).index_select(0, first)
        real = torch.cat([real, real.index_select(0, starts) - 1])
    return h.index_select(0, real)


def _head(model, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, W) for the fused head (``model.head_operands``: a LoRA on the head included)."""
    x, w = model.head_operands(h)
    # Under autocast the hidden states are bf16 while the head may be fp32; the fused op wants one
    # dtype, and the cast stays differentiable for full fine-tuning.
    return x, (w if w.dtype == x.dtype else w.to(x.dtype))


def _head_bias(model, h: torch.Tensor) -> torch.Tensor | None:
    """The head's bias (Phi's lm_head.bias) in the fused op's dtype, or None."""
    b = getattr(model, "output_bias", None)
    return None if b is None else b.to(h.dtype)


def answer_positions(labels: torch.Tensor) -> torch.Tensor:
    """Indices (N,) of the positions that carry a label, in a (1, T) or (T,) labels tensor."""
    return (labels.reshape(-1) != IGNORE).nonzero().squeeze(1)


def _ce_sum(model, h: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    if torch.is_autocast_enabled(h.device.type):
        # Full fine-tuning keeps an fp32 residual stream: run the head in the autocast dtype, as
        # every other matmul under autocast does, instead of an fp32 head GEMM.
        h = h.to(torch.get_autocast_dtype(h.device.type))
    return linear_cross_entropy(*_head(model, h), labels, bias=_head_bias(model, h),
                                reduction="sum", softcap=model.cfg.final_softcap)


def _first_docs(model, batch) -> torch.Tensor | None:
    """Documents whose token 0 is a loss term: a prompt-tuned model's last virtual token predicts
    it where the line's loss covers token 0 (text lines), as PEFT's -100-prefixed labels do."""
    if num_virtual_tokens(model) == 0 or not batch.num_first_labels:
        return None
    return (batch.first_labels != IGNORE).nonzero().squeeze(1)


def sft_loss_tokens(batch, prompt_tuned: bool) -> int:
    """The loss terms ``sft_loss`` sums over ``batch``: its answer tokens, plus (a prompt-tuned
    model: ``num_virtual_tokens(model) > 0``) the token 0 of each document whose loss covers it."""
    return batch.num_loss_tokens + (batch.num_first_labels if prompt_tuned else 0)


def sft_loss(model, batch, num_loss_tokens: int) -> torch.Tensor:
    """Summed cross-entropy over the batch's answer tokens / ``num_loss_tokens`` (fp32 scalar);
    a prompt-tuned model also scores token 0 of text documents (``sft_loss_tokens``)."""
    if num_loss_tokens < 1:
        raise EmberError("sft_loss: num_loss_tokens must be >= 1 (a batch with nothing to learn)")
    _, h, labels = _sft_terms(model, batch)
    return _ce_sum(model, h, labels) / num_loss_tokens


def _sft_terms(model, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(answer positions idx (N,), hidden states (N + F, D), labels (N + F,)) of the loss terms
    ``sft_loss`` sums, from one forward: the N answer tokens first, then (a prompt-tuned model,
    ``_first_docs``) the F documents' token 0 predicted by the last virtual token."""
    first = _first_docs(model, batch)
    idx = answer_positions(batch.labels)
    labels = batch.labels.reshape(-1).index_select(0, idx)
    if first is None:
        return idx, _hidden(model, batch).index_select(0, idx), labels
    T = batch.labels.numel()
    rows = torch.cat([idx, T + torch.arange(first.numel(), device=idx.device)])
    h = _hidden(model, batch, first).index_select(0, rows)  # (T + F, D) -> (N + F, D)
    return idx, h, torch.cat([labels, batch.first_labels.index_select(0, first)])


def kl_div_from_logits(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0,
                       chunk: int = 1024) -> torch.Tensor:
    """Sum over rows of ``T^2 * KL(softmax(teacher/T) || softmax(student/T))`` (fp32 scalar).
    Rows go in chunks whose softmaxes are recomputed in backward (memory O(chunk x V))."""
    if student.shape != teacher.shape:
        raise EmberError(f"distillation: student logits {tuple(student.shape)} and teacher "
                         f"logits {tuple(teacher.shape)} differ (same tokenizer/vocabulary?)")
    if not temperature > 0:
        raise EmberError(f"distillation temperature must be > 0, got {temperature}")

    def part(s, t):
        log_p = F.log_softmax(t.float() / temperature, dim=-1)
        log_q = F.log_softmax(s.float() / temperature, dim=-1)
        return (log_p.exp() * (log_p - log_q)).sum()

    total = student.new_zeros((), dtype=torch.float32)
    for a in range(0, student.shape[0], chunk):
        s, t = student[a:a + chunk], teacher[a:a + chunk].detach()
        total = total + (checkpoint(part, s, t, use_reentrant=False) if s.requires_grad
                         else part(s, t))
    return total * temperature ** 2


def distillation_loss(model, teacher, batch, num_loss_tokens: int, temperature: float = 2.0
                      ) -> torch.Tensor:
    """KL of the student to ``teacher`` on the batch's answer tokens / ``num_loss_tokens``."""
    idx = answer_positions(batch.labels)
    h = _hidden(model, batch).index_select(0, idx)
    student = model.logits(h)
    with torch.no_grad():
        t_logits = teacher.logits(_hidden(teacher, batch).index_select(0, idx))
    return kl_div_from_logits(student, t_logits, temperature) / num_loss_tokens


def distill_sft_loss(model, teacher, batch, num_loss_tokens: int, temperature: float,
                     alpha: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(``alpha * KD + (1 - alpha) * SFT``, KD, SFT), each summed over the batch's answer tokens /
    ``num_loss_tokens``, from one student forward; ``alpha = 0`` gives ``sft_loss`` exactly (a
    prompt-tuned student's token 0 terms included: SFT only, the teacher has no prompt to predict
    token 0 from)."""
    if num_loss_tokens < 1:
        raise EmberError("distillation: num_loss_tokens must be >= 1")
    idx, h_sft, labels = _sft_terms(model, batch)
    h = h_sft[:idx.numel()]  # the answer tokens, which the teacher scores too
    sft = _ce_sum(model, h_sft, labels) / num_loss_tokens
    with torch.no_grad():
        t_logits = teacher.logits(_hidden(teacher, batch).index_select(0, idx))
    kd = kl_div_from_logits(model.logits(h), t_logits, temperature) / num_loss_tokens
    return alpha * kd + (1 - alpha) * sft, kd.detach(), sft.detach()


class DocLogprobs(NamedTuple):
    """Per document of a packed batch: the summed log p(label) over its answer tokens and how
    many answer tokens it has."""

    sums: torch.Tensor  # (num_docs,) fp32
    counts: torch.Tensor  # (num_docs,) fp32

    @property
    def means(self) -> torch.Tensor:
        """(num_docs,) log-probability per answer token (TRL's ``average_log_prob``)."""
        return self.sums / self.counts.clamp(min=1)


def _answer_docs(batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(answer positions (N,), the document of each (N,))."""
    idx = answer_positions(batch.labels)
    # Document of each answer position: how many boundaries lie at or before it.
    return idx, torch.bucketize(idx, batch.cu_seqlens[1:].to(idx.device, torch.long), right=True)


def answer_counts(batch) -> torch.Tensor:
    """(num_docs,) long: the answer tokens of each document of a packed batch."""
    _, doc = _answer_docs(batch)
    return torch.bincount(doc, minlength=batch.cu_seqlens.numel() - 1)


def prompt_positions(batch, docs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(positions (M,), the token each predicts (M,)) of the prompt tokens of the documents
    ``docs`` ((num_docs,) bool) of a packed batch: every position without a label that has a
    next token in its own document. With the answer positions they are all of a document's
    next-token predictions (its length - 1)."""
    ids = batch.input_ids.reshape(-1)
    pos = torch.arange(ids.numel(), device=ids.device)
    ends = batch.cu_seqlens[1:].to(ids.device, torch.long)
    doc = torch.bucketize(pos, ends, right=True)
    keep = ((batch.labels.reshape(-1) == IGNORE) & docs.to(ids.device)[doc]
            & (pos + 1 < ends[doc]))
    idx = keep.nonzero().squeeze(1)
    return idx, ids.index_select(0, idx + 1)


def doc_logprobs(model, batch) -> DocLogprobs:
    """Each document's summed answer log-probability and answer token count, from one forward
    whose head runs on the answer tokens only."""
    return _doc_logprobs(model, batch, None)[0]


def doc_logprobs_prompt_nll(model, batch, prompt_docs: torch.Tensor
                            ) -> tuple[DocLogprobs, torch.Tensor, int]:
    """``doc_logprobs`` and, from the same forward, the summed cross-entropy of the prompt
    tokens of the documents ``prompt_docs`` ((num_docs,) bool; ``prompt_positions``) and their
    count: ORPO's NLL covers the chosen document whole, prompt included, as TRL's
    ``ORPOTrainer`` computes it."""
    return _doc_logprobs(model, batch, prompt_docs)


def _doc_logprobs(model, batch, prompt_docs: torch.Tensor | None
                  ) -> tuple[DocLogprobs, torch.Tensor | None, int]:
    token_lp, _, doc, n_extra = _token_logprobs(model, batch, prompt_docs)
    n = token_lp.numel() - n_extra
    lp = TokenLogprobs(token_lp[:n], doc, batch.cu_seqlens.numel() - 1).doc_logprobs()
    if prompt_docs is None:
        return lp, None, 0
    return lp, -token_lp[n:].sum(), n_extra


def _token_logprobs(
    model,
    batch,
    prompt_docs: torch.Tensor | None = None,
    log_sum_sq: bool = False,
    chunk: int = 256,
):
    """log p(label) of the answer tokens (then of the prompt tokens of ``prompt_docs``, if
    given), from one forward whose head runs on those tokens only: (log-probs, ``log sum_v
    p_v^2`` of each (``log_sum_sq``; else None), the answer tokens' documents, the number of
    prompt tokens)."""
    idx, doc = _answer_docs(batch)
    labels = batch.labels.reshape(-1).index_select(0, idx)
    rows = idx
    if prompt_docs is not None:
        extra, extra_labels = prompt_positions(batch, prompt_docs)
        rows, labels = torch.cat([idx, extra]), torch.cat([labels, extra_labels])
    h = _hidden(model, batch).index_select(0, rows)
    # One head output for both: a LoRA on the head draws its dropout mask once, here
    x, w = _head(model, h)
    bias = _head_bias(model, h)
    token_lp = -linear_cross_entropy(
        x, w, labels, bias=bias, reduction="none", softcap=model.cfg.final_softcap
    )  # (N+M,)
    lss = _log_sum_sq(x, w, bias, model.cfg.final_softcap, chunk) if log_sum_sq else None
    return token_lp, lss, doc, rows.numel() - idx.numel()


def _log_sum_sq(
    x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, softcap: float | None, chunk: int
) -> torch.Tensor:
    """``log sum_v p_v^2`` (N,) of the logits ``x W^T + b`` (after ``softcap``), fp32, no
    gradient, ``chunk`` rows at a time (memory O(chunk x V))."""
    parts = []
    with torch.no_grad():
        for xs in x.detach().split(chunk):
            z = F.linear(xs, w, bias).float()  # (n, V)
            if softcap is not None:
                z = softcap * torch.tanh(z / softcap)
            parts.append(torch.logsumexp(2 * z, -1) - 2 * torch.logsumexp(z, -1))
    return torch.cat(parts) if parts else x.new_zeros(0, dtype=torch.float32)


class TokenLogprobs(NamedTuple):
    """The answer tokens of a packed batch, in batch order: log p(label) of each (N,), the
    document of each (N,), the batch's documents, and (``answer_token_logprobs(...,
    log_sum_sq=True)``) ``log sum_v p_v^2`` of each one's next-token distribution (N,), no
    gradient (WPO's alignment term, TRL's ``log_sum_sq_probs``)."""

    logps: torch.Tensor
    doc: torch.Tensor
    num_docs: int
    log_sum_sq: torch.Tensor | None = None

    def doc_logprobs(self, weights: torch.Tensor | None = None) -> DocLogprobs:
        """Per document the summed log-probs (each token times ``weights`` (N,) if given) and
        the answer token count (unweighted)."""
        lp = self.logps if weights is None else self.logps * weights
        sums = lp.new_zeros(self.num_docs).index_add(0, self.doc, lp)
        return DocLogprobs(sums, torch.bincount(self.doc, minlength=self.num_docs).to(sums.dtype))


def answer_token_logprobs(
    model, batch, log_sum_sq: bool = False, chunk: int = 256
) -> TokenLogprobs:
    """``doc_logprobs``'s per-token values, from one forward whose head runs on the answer tokens
    only; with ``log_sum_sq`` also ``log sum_v p_v^2`` per answer token, without gradients, from
    the same head output as the log-probs (one LoRA dropout mask on the head, as TRL's fused
    head computes both from one logits tile; after the final softcap), ``chunk`` tokens' logits
    at a time."""
    token_lp, lss, doc, _ = _token_logprobs(model, batch, log_sum_sq=log_sum_sq, chunk=chunk)
    return TokenLogprobs(token_lp, doc, batch.cu_seqlens.numel() - 1, lss)


def sequence_logprobs(model, batch) -> torch.Tensor:
    """Sum of log p(label) over each document's answer tokens: (num_docs,) fp32."""
    return doc_logprobs(model, batch).sums


@contextmanager
def adapters_disabled(model):
    """The base model inside the block: every LoRA update is scaled by 0 (exact: x + 0 = x)."""
    mods = list(lora_modules(model).values())
    if not mods:
        raise EmberError("adapters_disabled: the model has no LoRA adapters, so it has no "
                         "separate reference; DPO with full fine-tuning needs a reference model")
    scales = [m.scale for m in mods]
    for m in mods:
        m.scale = 0.0
    try:
        yield model
    finally:
        for m, s in zip(mods, scales, strict=True):
            m.scale = s
