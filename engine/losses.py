"""Training losses on packed batches: SFT cross-entropy, distillation (KL to a teacher), DPO.

SFT. The output head runs only on positions that have a label (``labels != -100``: the answer
tokens), through the fused ``linear_cross_entropy``, so prompt tokens never produce logits.
The summed loss is divided by the number of loss tokens of the *whole accumulated batch*
(``num_loss_tokens``), so summing the micro-batch losses of one optimizer step gives exactly the
token-mean loss of all its examples in one batch, whatever the split into micro-batches.

Distillation. ``T^2 * KL(softmax(t / T) || softmax(s / T))`` per answer token (Hinton et al.),
summed and divided like the SFT loss; the teacher's logits are computed without gradients.

DPO (Rafailov et al., sigmoid loss). ``-log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r)))``
with sequence log-probabilities summed over each document's answer tokens; the reference is the
same model with its LoRA adapters switched off (``adapters_disabled``).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ember import EmberError
from ember.kernels import linear_cross_entropy
from ember.models.lora import lora_modules
from ember.models.prompt_tuning import prompt_packed

IGNORE = -100


def _hidden(model, batch) -> torch.Tensor:
    """Final hidden states (T, D) of a packed batch (a prompt-tuned model's virtual tokens go in
    front of every document; only the batch's own positions come back)."""
    ids, pos, cu, max_len, real = prompt_packed(model, batch.input_ids, batch.position_ids,
                                                batch.cu_seqlens, batch.max_seqlen)
    h = model.hidden_states(ids, pos, cu_seqlens=cu, max_seqlen=max_len)  # (1, T', D)
    h = h.reshape(-1, h.shape[-1])
    return h if real is None else h.index_select(0, real)


def _head(model, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, W) for the fused head (``model.head_operands``: a LoRA on the head included)."""
    x, w = model.head_operands(h)
    # Under autocast the hidden states are bf16 while the head may be fp32; the fused op wants one
    # dtype, and the cast stays differentiable for full fine-tuning.
    return x, (w if w.dtype == x.dtype else w.to(x.dtype))


def answer_positions(labels: torch.Tensor) -> torch.Tensor:
    """Indices (N,) of the positions that carry a label, in a (1, T) or (T,) labels tensor."""
    return (labels.reshape(-1) != IGNORE).nonzero().squeeze(1)


def _answer_hidden(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(positions (N,), hidden states (N, D)) of the batch's answer tokens."""
    idx = answer_positions(batch.labels)
    return idx, _hidden(model, batch).index_select(0, idx)  # the head sees answer tokens only


def _ce_sum(model, h: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    if torch.is_autocast_enabled(h.device.type):
        # Full fine-tuning keeps an fp32 residual stream: run the head in the autocast dtype, as
        # every other matmul under autocast does, instead of an fp32 head GEMM.
        h = h.to(torch.get_autocast_dtype(h.device.type))
    return linear_cross_entropy(*_head(model, h), labels, reduction="sum",
                                softcap=model.cfg.final_softcap)


def sft_loss(model, batch, num_loss_tokens: int) -> torch.Tensor:
    """Summed cross-entropy over the batch's answer tokens / ``num_loss_tokens`` (fp32 scalar)."""
    if num_loss_tokens < 1:
        raise EmberError("sft_loss: num_loss_tokens must be >= 1 (a batch with nothing to learn)")
    idx, h = _answer_hidden(model, batch)
    return _ce_sum(model, h, batch.labels.reshape(-1).index_select(0, idx)) / num_loss_tokens


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
    ``num_loss_tokens``, from one student forward; ``alpha = 0`` gives ``sft_loss`` exactly."""
    if num_loss_tokens < 1:
        raise EmberError("distillation: num_loss_tokens must be >= 1")
    idx, h = _answer_hidden(model, batch)
    sft = _ce_sum(model, h, batch.labels.reshape(-1).index_select(0, idx)) / num_loss_tokens
    with torch.no_grad():
        t_logits = teacher.logits(_hidden(teacher, batch).index_select(0, idx))
    kd = kl_div_from_logits(model.logits(h), t_logits, temperature) / num_loss_tokens
    return alpha * kd + (1 - alpha) * sft, kd.detach(), sft.detach()


def sequence_logprobs(model, batch) -> torch.Tensor:
    """Sum of log p(label) over each document's answer tokens: (num_docs,) fp32."""
    idx = answer_positions(batch.labels)
    h = _hidden(model, batch).index_select(0, idx)
    labels = batch.labels.reshape(-1).index_select(0, idx)
    token_lp = -linear_cross_entropy(*_head(model, h), labels, reduction="none",
                                     softcap=model.cfg.final_softcap)  # (N,)
    # Document of each answer position: how many boundaries lie at or before it.
    doc = torch.bucketize(idx, batch.cu_seqlens[1:].to(idx.device, torch.long), right=True)
    n_docs = batch.cu_seqlens.numel() - 1
    return token_lp.new_zeros(n_docs).index_add(0, doc, token_lp)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float = 0.1, label_smoothing: float = 0.0
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean loss, chosen rewards, rejected rewards) from per-pair sequence log-probabilities;
    ``label_smoothing`` > 0 is the conservative DPO of Mitchell (2023)."""
    if not beta > 0:
        raise EmberError(f"dpo beta must be > 0, got {beta}")
    if not 0 <= label_smoothing < 0.5:
        raise EmberError(f"dpo label_smoothing must be in [0, 0.5), got {label_smoothing}")
    chosen = beta * (policy_chosen - ref_chosen.detach())
    rejected = beta * (policy_rejected - ref_rejected.detach())
    margin = chosen - rejected
    loss = (-(1 - label_smoothing) * F.logsigmoid(margin)
            - label_smoothing * F.logsigmoid(-margin))
    return loss.mean(), chosen.detach(), rejected.detach()


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
