"""The one numerics rule for every kernel test (flash-attention's rule).

For each output and gradient: the kernel's max-abs error against the fp32 reference must be at most
2x the max-abs error of the reference run in the test dtype, plus a small relative floor
(``floor * max|ref32|``). Two-sided: both the kernel and the low-precision reference are measured
against the same fp32 oracle.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

FLOOR = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def assert_close_to_ref(name: str, out: torch.Tensor, ref_lowp: torch.Tensor,
                        ref_fp32: torch.Tensor, *, floor: float | None = None) -> None:
    """out: kernel result; ref_lowp: the reference computed in the test dtype; ref_fp32: the
    reference computed in fp32 on fp32 copies of the same inputs."""
    assert out.shape == ref_fp32.shape, (
        f"{name}: shape {tuple(out.shape)} != {tuple(ref_fp32.shape)}")
    o, r, g = out.double(), ref_lowp.double(), ref_fp32.double()
    assert torch.isfinite(o).all(), f"{name}: kernel output has NaN/inf (unwritten or overflow)"
    if floor is None:
        floor = FLOOR.get(out.dtype, 1e-5)
    scale = g.abs().max().item() if g.numel() else 0.0
    err = (o - g).abs().max().item() if g.numel() else 0.0
    ref_err = (r - g).abs().max().item() if g.numel() else 0.0
    bound = 2 * ref_err + floor * max(scale, 1e-6)
    assert err <= bound, (f"{name}: max|kernel - ref32| = {err:.3e} > bound {bound:.3e} "
                          f"(2 x ref error {ref_err:.3e} + floor {floor:g} x scale {scale:.3e})")


def poison(*tensors: torch.Tensor) -> None:
    """Fill output buffers with NaN so that an element a kernel forgets to write is caught."""
    for t in tensors:
        t.fill_(float("nan"))


@contextlib.contextmanager
def poisoned_allocations():
    """Inside the block, float tensors from ``torch.empty`` / ``torch.empty_like`` start as NaN,
    so an element a kernel's launcher allocates but never writes shows in the results."""
    empty, empty_like = torch.empty, torch.empty_like

    def nan_empty(*args, **kwargs):
        t = empty(*args, **kwargs)
        if t.is_floating_point():
            poison(t)
        return t

    def nan_empty_like(*args, **kwargs):
        t = empty_like(*args, **kwargs)
        if t.is_floating_point():
            poison(t)
        return t

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch, "empty", nan_empty)
        mp.setattr(torch, "empty_like", nan_empty_like)
        yield


def grads(outputs, inputs, grad_out):
    """Gradients of outputs w.r.t. inputs for the upstream gradient grad_out (None-safe)."""
    return torch.autograd.grad(outputs, inputs, grad_out, allow_unused=True)
