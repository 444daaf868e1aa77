"""Fused linear cross-entropy: loss and gradients straight from hidden states and the output
head, never materializing the (N, V) logits.

Math (per row n with label y, logits z = h W^T + b, optional softcap c):

    l_v  = c * tanh(z_v / c)            (or l_v = z_v without softcap; Gemma 2 uses c = 30)
    lse  = log sum_v exp(l_v)
    loss = lse - (1 - eps) l_y - (eps / V) sum_v l_v + z_loss * lse^2        (0 on ignored rows)
    dl_v = g * (softmax_v * (1 + 2 z_loss lse) - eps / V - (1 - eps) [v == y]) * (1 - (l_v / c)^2)

which is ``F.cross_entropy(logits, labels, label_smoothing=eps)`` plus the z-loss. Reductions:
'sum', 'none' (loss shaped like labels) and 'mean', which divides by the number of non-ignored
labels; when every label is ignored the loss is 0 and every gradient is 0 (not NaN).

Contract: hidden (..., D) and weight (V, D) of one float dtype (fp32/fp16/bf16), bias (V,) or
None, labels (...) int64/int32 in [0, V) or ``ignore_index`` (checked: ValueError on CPU, a
device-side assert on GPU, so no host sync). Logits and every reduction are fp32; the loss and
``lse`` (returned with ``return_lse=True``, shaped like labels) are fp32. Gradients flow to
hidden, weight and bias through the loss only: ``lse`` is for logging and z-loss monitoring and is
not differentiable (no gradient flows back through it). Only the gradients autograd asks for are
computed: a frozen head (LoRA) skips dweight entirely.

Paths (``impl``, see ``ember.kernels._dispatch``):

- Triton (CUDA, or the interpreter): forward tiles (rows x vocabulary) with a D-loop of
  ``tl.dot``, an online log-sum-exp per (row, vocabulary split) and an indexed dot for the label
  logit. Saved for backward: hidden, weight, bias, labels and lse (N fp32). Backward walks the
  vocabulary in chunks: recomputes each chunk's logits in a kernel that writes dlogits (input
  dtype), then dhidden (+)= dlogits @ W_chunk (Triton, fp32 accumulator) and
  dweight[chunk] = dlogits^T @ hidden (cuBLAS, each row of dweight written once, fp32 accumulation
  inside the matmul), dbias[chunk] = column sums in fp32.
  Peak extra memory (beyond the inputs and the gradients themselves) never depends on V, so it
  is independent of N x V: forward O(N) fp32 values (a few per row and vocabulary split);
  backward one (N, Vc) dlogits chunk of about 32 MiB (Vc = 32 MiB / (N x element size), at least
  512 columns), an (N, D) fp32 dhidden accumulator when hidden is not fp32 and V > Vc, and
  O(N + V) vectors. At N=8192, D=2304, V=256000 in bf16 that is 32 + 72 MiB on top of dweight
  (1125 MiB) and dhidden (36 MiB). Walking the vocabulary (not the rows) in the outer loop is
  what keeps it there: each row block of dweight is finished by one chunk, so no fp32 (V, D)
  accumulator (2.2 GiB at that shape) is ever needed; only dhidden, which is small, accumulates.
- Chunked PyTorch (``linear_cross_entropy_chunked``; the CPU path and ``impl="ref"``): the same
  math on (rows x vocabulary) chunks of logits with an online log-sum-exp, backward recomputes each
  chunk; never allocates N x V elements. With a frozen head (only hidden needs a gradient, as in
  LoRA) the forward also accumulates dhidden per unit row gradient in the same vocabulary walk
  (sum_v exp(l_v - m) W_v rescaled as the running max m moves, as flash attention accumulates its
  output) and the backward only scales it: 2 head matmuls per chunk instead of 3, an (N, D) fp32
  buffer kept in place of hidden and weight.
- ``linear_cross_entropy_ref``: the spec (full logits, ``F.cross_entropy``), the test oracle.

Limits: V < 2^31; row and column offsets are int64, so N x D and V x D may exceed 2^31. The
Triton path needs unit stride along D for hidden and weight (a copy is made otherwise).
"""

from __future__ import annotations

import torch

from ember.kernels import _dispatch
from ember.kernels._dispatch import autocast_dtype, cast_floats, no_autocast, use_triton
from ember.kernels.cross_entropy._common import make_options, validate
from ember.kernels.cross_entropy._ref import (
    _chunked,
    linear_cross_entropy_chunked,
    linear_cross_entropy_ref,
)
from ember.kernels.cross_entropy._triton import linear_cross_entropy_triton

__all__ = ["linear_cross_entropy", "linear_cross_entropy_chunked", "linear_cross_entropy_ref"]


def _unit_stride(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                         bias: torch.Tensor | None = None, ignore_index: int = -100,
                         reduction: str = "mean", label_smoothing: float = 0.0,
                         z_loss: float = 0.0, softcap: float | None = None,
                         return_lse: bool = False, impl: str | None = None):
    """Cross-entropy of ``hidden @ weight.T (+ bias)`` against labels without the logits.

    hidden (..., D), weight (V, D), labels (...): returns the fp32 loss (scalar, or shaped like
    labels for reduction='none'), and with ``return_lse=True`` also the fp32 log-sum-exp per
    token (not differentiable). See the module docstring for the math, options and memory."""
    op = "linear_cross_entropy"
    o = make_options(op, ignore_index, reduction, label_smoothing, z_loss, softcap)
    # Under torch.autocast hidden, weight and bias in its dtype, as the reference's F.linear
    # takes them; both paths then run with autocast off (see _dispatch.autocast_dtype).
    hidden, weight, bias = cast_floats(autocast_dtype(hidden), hidden, weight, bias)
    validate(op, hidden, weight, labels, bias, o.ignore_index)
    triton_path = use_triton(hidden, impl, op)
    if not triton_path or labels.numel() == 0:
        with no_autocast(hidden):
            return _chunked(hidden, weight, labels, bias, o, return_lse)
    h2 = _unit_stride(hidden.reshape(-1, hidden.shape[-1]))
    with no_autocast(hidden), _dispatch.device_guard(hidden):
        loss, lse = linear_cross_entropy_triton(h2, _unit_stride(weight),
                                                None if bias is None else bias.contiguous(),
                                                labels.reshape(-1).contiguous(), o)
    if o.reduction == "none":
        loss = loss.view(labels.shape)
    lse = lse.view(labels.shape)
    return (loss, lse) if return_lse else loss
