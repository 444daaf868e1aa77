"""Pieces shared by every linear cross-entropy path: options, input checks, the per-row loss from
(lse, label logit, sum of logits), reductions and the per-row upstream gradient."""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import torch

from ember.kernels._dispatch import check_dtype, check_tensors, no_host_values

REDUCTIONS = ("mean", "sum", "none")


@dataclass(frozen=True)
class Options:
    ignore_index: int = -100
    reduction: str = "mean"
    label_smoothing: float = 0.0
    z_loss: float = 0.0
    softcap: float | None = None


def make_options(op: str, ignore_index, reduction, label_smoothing, z_loss, softcap) -> Options:
    if reduction not in REDUCTIONS:
        raise ValueError(f"{op}: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    # Any integer F.cross_entropy takes: a NumPy integer, a 0-d integer tensor (not a bool).
    index = None
    if not isinstance(ignore_index, bool) and not (
            isinstance(ignore_index, torch.Tensor) and ignore_index.dtype == torch.bool):
        try:
            index = operator.index(ignore_index)
        except TypeError:
            pass
    if index is None:
        raise ValueError(f"{op}: ignore_index must be an int, got {ignore_index!r}")
    ignore_index = index
    if not 0.0 <= float(label_smoothing) <= 1.0:
        raise ValueError(f"{op}: label_smoothing must be in [0, 1], got {label_smoothing}")
    # inf passed these checks: an inf z_loss made the loss inf, an inf softcap every logit
    # inf * tanh(0) = NaN.
    if not 0.0 <= float(z_loss) < math.inf:
        raise ValueError(f"{op}: z_loss must be >= 0 and finite, got {z_loss}")
    if softcap is not None and not 0.0 < float(softcap) < math.inf:
        raise ValueError(f"{op}: softcap must be None or > 0 and finite (Gemma 2 uses 30.0), got "
                         f"{softcap}")
    return Options(int(ignore_index), reduction, float(label_smoothing), float(z_loss),
                   None if softcap is None else float(softcap))


def validate(op: str, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
             bias: torch.Tensor | None, ignore_index: int) -> None:
    """Shapes, dtypes, devices and label range; raises ValueError saying what to change."""
    check_tensors(op, hidden=hidden, weight=weight, labels=labels)
    if bias is not None:
        check_tensors(op, bias=bias)
    check_dtype(op, "hidden", hidden)
    check_dtype(op, "weight", weight)
    if hidden.dim() < 1 or weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"{op}: expected hidden (..., D) and weight (V, D); got hidden "
                         f"{tuple(hidden.shape)} and weight {tuple(weight.shape)}")
    if weight.shape[0] == 0:
        raise ValueError(f"{op}: weight has an empty vocabulary (shape {tuple(weight.shape)})")
    if weight.shape[1] == 0:
        raise ValueError(f"{op}: hidden size D is 0 (hidden {tuple(hidden.shape)}, weight "
                         f"{tuple(weight.shape)}); the head needs D >= 1")
    if hidden.dtype != weight.dtype:
        raise ValueError(f"{op}: hidden is {hidden.dtype} but weight is {weight.dtype}; cast "
                         "hidden to the head's dtype (or the head to the hidden dtype) first")
    if labels.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{op}: labels must be int64 or int32 class indices, got {labels.dtype}")
    if tuple(labels.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"{op}: labels shape {tuple(labels.shape)} must equal hidden's leading "
                         f"shape {tuple(hidden.shape[:-1])}")
    devices = {hidden.device, weight.device, labels.device}
    if bias is not None:
        devices.add(bias.device)
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"{op}: bias must have shape ({weight.shape[0]},), got "
                             f"{tuple(bias.shape)}")
        if bias.dtype != weight.dtype:
            raise ValueError(f"{op}: bias is {bias.dtype} but weight is {weight.dtype}")
    if len(devices) != 1:
        names = sorted(map(str, devices))
        raise ValueError(f"{op}: all tensors must be on one device, got {names}")
    # A label outside [0, V) would silently give a wrong loss in the kernels. On GPU the check is
    # a device-side assert (like F.cross_entropy's): a host sync per step would stall the queue.
    v = weight.shape[0]
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= v))
    msg = (f"{op}: a label is outside [0, {v}) and is not ignore_index ({ignore_index}); fix the "
           "labels or pass the right ignore_index")
    if labels.is_cuda or no_host_values(labels):
        torch._assert_async(~bad.any(), msg)
    elif labels.numel() and bool(bad.any()):
        raise ValueError(f"{msg} (first bad label: {labels[bad].flatten()[0].item()})")


def row_loss(lse: torch.Tensor, label_logit: torch.Tensor, logit_sum: torch.Tensor | None,
             valid: torch.Tensor, vocab: int, o: Options) -> torch.Tensor:
    """Per-row loss from fp32 (N,) statistics; 0 on ignored rows.

    loss = lse - (1 - eps) * l_y - (eps / V) * sum_v l_v + z_loss * lse^2, which is PyTorch's
    label-smoothed cross-entropy plus the z-loss."""
    loss = lse - (1.0 - o.label_smoothing) * label_logit
    if o.label_smoothing:
        loss = loss - (o.label_smoothing / vocab) * logit_sum
    if o.z_loss:
        loss = loss + o.z_loss * lse * lse
    return torch.where(valid, loss, torch.zeros_like(loss))


def reduce_rows(loss: torch.Tensor, valid: torch.Tensor, reduction: str) -> torch.Tensor:
    """'mean' divides by the number of non-ignored labels; no labels gives 0, not NaN."""
    if reduction == "none":
        return loss
    total = loss.sum()
    if reduction == "sum":
        return total
    return total / valid.sum().clamp(min=1).to(total.dtype)


def row_grad(dloss: torch.Tensor, valid: torch.Tensor, reduction: str) -> torch.Tensor:
    """d(reduced loss)/d(row loss) times the upstream gradient, fp32 (N,), 0 on ignored rows."""
    dloss = dloss.float()
    if reduction == "none":
        g = dloss.reshape(-1)
    elif reduction == "sum":
        g = dloss.expand(valid.shape)
    else:
        g = (dloss / valid.sum().clamp(min=1).float()).expand(valid.shape)
    return torch.where(valid, g, torch.zeros_like(g)).contiguous()
