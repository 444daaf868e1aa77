"""Rotary position embedding, half-rotation layout (Llama, Mistral, Qwen, Gemma).

For x (B, T, H, D) split in halves x1 = x[..., :D/2], x2 = x[..., D/2:]:
    out1 = x1 * cos - x2 * sin,   out2 = x2 * cos + x1 * sin
cos/sin: (B or 1, T, D/2) fp32 (from ``rope_cos_sin``). Output in x.dtype.
"""

from __future__ import annotations

import torch

from ember.kernels._dispatch import use_triton


def _rotate_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    d2 = x.shape[-1] // 2
    xf = x.float()
    x1, x2 = xf[..., :d2], xf[..., d2:]
    c, s = cos[:, :, None, :].float(), sin[:, :, None, :].float()  # (B, T, 1, D/2)
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1).to(x.dtype)


def apply_rope_ref(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                   sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _rotate_ref(q, cos, sin), _rotate_ref(k, cos, sin)


def apply_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *,
               impl: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    if q.dim() != 4 or k.dim() != 4 or q.shape[-1] % 2 or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"apply_rope: q, k must be (B, T, H, D) with the same even D; got "
                         f"{tuple(q.shape)} and {tuple(k.shape)}")
    if cos.shape != sin.shape or cos.shape[-1] != q.shape[-1] // 2 or cos.shape[1] != q.shape[1]:
        raise ValueError(f"apply_rope: cos/sin must be (B or 1, T, D/2) = (*, {q.shape[1]}, "
                         f"{q.shape[-1] // 2}); got {tuple(cos.shape)}")
    if use_triton(q, impl, "apply_rope"):
        raise NotImplementedError("Triton RoPE lands with the kernel groundwork")
    return apply_rope_ref(q, k, cos, sin)
