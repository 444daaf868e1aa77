"""RMSNorm: y = x / sqrt(mean(x^2) + eps) * (offset + w).

Contract: x (..., D) any float dtype, last dim contiguous; weight (D,). Statistics in fp32, output in
x.dtype. ``offset=1.0`` gives Gemma's ``(1 + w)``. Backward gives dx and dw.
"""

from __future__ import annotations

import torch

from ember.kernels._dispatch import use_triton


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6,
                 offset: float = 0.0) -> torch.Tensor:
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (y * (offset + weight.float())).to(x.dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, offset: float = 0.0, *,
             impl: str | None = None) -> torch.Tensor:
    if x.shape[-1] != weight.shape[-1] or weight.dim() != 1:
        raise ValueError(f"rms_norm: weight shape {tuple(weight.shape)} does not match x's last "
                         f"dim {x.shape[-1]}")
    if use_triton(x, impl, "rms_norm"):
        raise NotImplementedError("Triton RMSNorm lands with the kernel groundwork")
    return rms_norm_ref(x, weight, eps, offset)
