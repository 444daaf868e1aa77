"""Gated MLP activations: swiglu(g, u) = silu(g) * u,  geglu(g, u) = gelu_tanh(g) * u.

gate, up: same shape (..., F), same dtype; math in fp32, output in the input dtype. Backward
recomputes the activation from gate instead of saving it.
"""

from __future__ import annotations

import math

import torch

from ember.kernels._dispatch import use_triton


def swiglu_ref(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    g = gate.float()
    return (g * torch.sigmoid(g) * up.float()).to(gate.dtype)


def geglu_ref(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    g = gate.float()
    inner = math.sqrt(2.0 / math.pi) * (g + 0.044715 * g * g * g)
    return (0.5 * g * (1.0 + torch.tanh(inner)) * up.float()).to(gate.dtype)


def _check(op: str, gate: torch.Tensor, up: torch.Tensor) -> None:
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise ValueError(f"{op}: gate {tuple(gate.shape)} {gate.dtype} and up {tuple(up.shape)} "
                         f"{up.dtype} must have the same shape and dtype")


def swiglu(gate: torch.Tensor, up: torch.Tensor, *, impl: str | None = None) -> torch.Tensor:
    _check("swiglu", gate, up)
    if use_triton(gate, impl, "swiglu"):
        raise NotImplementedError("Triton SwiGLU lands with the kernel groundwork")
    return swiglu_ref(gate, up)


def geglu(gate: torch.Tensor, up: torch.Tensor, *, impl: str | None = None) -> torch.Tensor:
    _check("geglu", gate, up)
    if use_triton(gate, impl, "geglu"):
        raise NotImplementedError("Triton GeGLU lands with the kernel groundwork")
    return geglu_ref(gate, up)
