"""Fused linear cross-entropy: loss from hidden states and the output head without logits.

(placeholder reference, replaced by the fused-CE issue's chunked reference and Triton kernels)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ember.kernels._dispatch import use_triton


def linear_cross_entropy_ref(hidden, weight, labels, *, bias=None, ignore_index=-100,
                             reduction="mean", label_smoothing=0.0, z_loss=0.0, softcap=None,
                             return_lse=False):
    logits = F.linear(hidden, weight, bias).float()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    loss = F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="none",
                           label_smoothing=label_smoothing)
    lse = torch.logsumexp(logits, -1)
    if z_loss:
        loss = loss + z_loss * lse.pow(2) * (labels != ignore_index)
    if reduction == "sum":
        loss = loss.sum()
    elif reduction == "mean":
        loss = loss.sum() / (labels != ignore_index).sum().clamp(min=1)
    return (loss, lse) if return_lse else loss


def linear_cross_entropy(hidden, weight, labels, *, bias=None, ignore_index=-100, reduction="mean",
                         label_smoothing=0.0, z_loss=0.0, softcap=None, return_lse=False,
                         impl=None):
    if use_triton(hidden, impl, "linear_cross_entropy"):
        raise NotImplementedError("Triton fused CE lands with the fused-CE issue")
    return linear_cross_entropy_ref(hidden, weight, labels, bias=bias, ignore_index=ignore_index,
                                    reduction=reduction, label_smoothing=label_smoothing,
                                    z_loss=z_loss, softcap=softcap, return_lse=return_lse)
