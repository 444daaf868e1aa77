"""LoRA linear: y = x W^T + b + scale * (x_l A^T) B^T, with x_l = dropout(x) (or x).

Contract: x (..., in); weight (out, in) tensor (or an NF4 weight, see ``ember.kernels.nf4``);
A (r, in); B (out, r); bias (out,) or None; ``lora_x`` the dropped-out input for the LoRA path
(defaults to x). Output in x.dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ember.kernels._dispatch import use_triton


def _dense(weight, dtype):
    if isinstance(weight, torch.Tensor):
        return weight.to(dtype)
    return weight.dequantize(dtype)


def lora_linear_ref(x, weight, A, B, scale, bias=None, *, lora_x=None):
    lx = x if lora_x is None else lora_x
    y = F.linear(x, _dense(weight, x.dtype), bias)
    return y + scale * F.linear(F.linear(lx, A.to(x.dtype)), B.to(x.dtype))


def lora_linear(x, weight, A, B, scale, bias=None, *, lora_x=None, impl=None):
    if A.shape[1] != x.shape[-1] or B.shape[1] != A.shape[0]:
        raise ValueError(f"lora_linear: shapes x {tuple(x.shape)}, A {tuple(A.shape)}, "
                         f"B {tuple(B.shape)} do not chain (A is (r, in), B is (out, r))")
    if use_triton(x, impl, "lora_linear"):
        raise NotImplementedError("fused LoRA lands with the QLoRA issue")
    return lora_linear_ref(x, weight, A, B, scale, bias, lora_x=lora_x)
