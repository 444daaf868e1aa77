"""RMSNorm Triton kernel vs rms_norm_ref: every output and gradient, under the interpreter on CPU
(fp32, fp16, bf16 within the interpreter's 1-ulp truncation) and the full dtype matrix on CUDA."""

from __future__ import annotations

import sys

import pytest
import torch

from ember.kernels.rms_norm import rms_norm, rms_norm_ref
from tests.numerics import assert_close_to_ref, grads


def _run(x, w, dy, eps, offset, impl):
    x, w = x.detach().requires_grad_(), w.detach().requires_grad_()
    y = rms_norm(x, w, eps, offset, impl=impl)
    dx, dw = grads(y, (x, w), dy)
    return y, dx, dw


def _check(shape, dtype, wdtype, offset, device, make_x=None):
    d = shape[-1]
    x32 = torch.randn(shape, device=device) * 3 + 0.5
    w32 = torch.randn(d, device=device) * 0.5 + (0.0 if offset else 1.0)
    dy32 = torch.randn(shape, device=device)
    x, w, dy = x32.to(dtype), w32.to(wdtype), dy32.to(dtype)
    if make_x is not None:
        x = make_x(x)
    eps = 1e-5
    out = _run(x, w, dy, eps, offset, "triton")
    lowp = _run(x, w, dy, eps, offset, "ref")
    ref32 = _run(x.float(), w.float(), dy.float(), eps, offset, "ref")
    for name, o, r, g in zip(("y", "dx", "dw"), out, lowp, ref32, strict=True):
        assert o.dtype == r.dtype, f"{name}: dtype {o.dtype} != reference's {r.dtype}"
        assert_close_to_ref(name, o, r, g)
    return out, lowp


@pytest.mark.parametrize("shape,offset", [((3, 37, 96), 0.0), ((3, 37, 96), 1.0), ((5, 3000), 0.0),
                                          ((64, 128), 1.0)])
def test_fp32(shape, offset, poisoned):
    _check(shape, torch.float32, torch.float32, offset, "cpu")


def test_fp16_input_fp32_weight(poisoned):
    # The model's case: low-precision activations, fp32 norm weight (dw comes back in fp32).
    _check((4, 29, 80), torch.float16, torch.float32, 1.0, "cpu")


@pytest.mark.parametrize("looped", [False, True])
def test_bf16_within_interpreter_truncation(looped, monkeypatch, poisoned):
    """The interpreter truncates fp32->bf16 stores (no rounding), so compare against the bf16
    reference with a 1-ulp allowance; the real bf16 rule runs in test_gpu_dtype_matrix."""
    d = 203 if looped else 96
    if looped:  # the looped kernels, as in test_looped_path_for_wide_rows
        mod = sys.modules["ember.kernels.rms_norm"]
        monkeypatch.setattr(mod, "_MAX_D", 64)
        monkeypatch.setattr(mod, "_LOOP_BLOCK_N", 32)
    x = torch.randn(4, 33, d).bfloat16()
    w = torch.randn(d).bfloat16()
    dy = torch.randn(4, 33, d).bfloat16()
    out = _run(x, w, dy, 1e-6, 1.0, "triton")
    ref = _run(x, w, dy, 1e-6, 1.0, "ref")
    for name, o, r in zip(("y", "dx", "dw"), out, ref, strict=True):
        o, r = o.double(), r.double()
        mag = torch.maximum(o.abs(), r.abs()).clamp_min(1e-30)
        ulp = torch.exp2(torch.floor(torch.log2(mag)) - 7)  # bf16 has 8 significant bits
        excess = ((o - r).abs() - ulp - 1e-6 * r.abs().max()).max().item()
        assert torch.isfinite(o).all() and excess <= 0, f"{name}: off by more than 1 bf16 ulp"


def test_strided_rows_and_noncontiguous_last_dim(poisoned):
    # Strided rows (a slice of a wider buffer) are read in place; a strided last dim is copied.
    _check((40, 72), torch.float32, torch.float32, 0.0, "cpu",
           make_x=lambda x: torch.cat([x, torch.randn(40, 8)], 1)[:, :72])
    _check((72, 40), torch.float32, torch.float32, 0.0, "cpu",
           make_x=lambda x: x.t().contiguous().t())


def test_strided_weight(poisoned):
    # A weight that is a strided view (every other element of a buffer) was read as if dense.
    x = torch.randn(5, 127)
    w = (torch.randn(254) * 0.5 + 1.0)[::2].requires_grad_()
    dy = torch.randn(5, 127)
    out = _run(x, w, dy, 1e-6, 0.0, "triton")
    ref = _run(x, w.contiguous(), dy, 1e-6, 0.0, "ref")
    for name, o, r in zip(("y", "dx", "dw"), out, ref, strict=True):
        assert_close_to_ref(name, o, r, r)


def test_only_weight_or_only_input_grad(poisoned):
    x = torch.randn(6, 48)
    w = torch.randn(48, requires_grad=True)
    y = rms_norm(x, w, impl="triton")
    (dw,) = torch.autograd.grad(y.sum(), w)
    (dw_ref,) = torch.autograd.grad(rms_norm_ref(x, w).sum(), w)
    assert_close_to_ref("dw", dw, dw_ref, dw_ref)
    xg = x.clone().requires_grad_()
    (dx,) = torch.autograd.grad(rms_norm(xg, w.detach(), impl="triton").sum(), xg)
    (dx_ref,) = torch.autograd.grad(rms_norm_ref(xg, w.detach()).sum(), xg)
    assert_close_to_ref("dx", dx, dx_ref, dx_ref)


def test_bad_inputs():
    x = torch.randn(4, 16)
    with pytest.raises(ValueError, match="weight shape"):
        rms_norm(x, torch.ones(8))
    with pytest.raises(ValueError, match="weight shape"):
        rms_norm(x, torch.ones(2, 16))
    with pytest.raises(ValueError, match="dtype"):
        rms_norm(x.to(torch.int32), torch.ones(16))
    with pytest.raises(ValueError, match="eps"):
        rms_norm(x, torch.ones(16), eps=0.0)
    with pytest.raises(ValueError, match="eps must be > 0 and finite"):  # was an all-zero output
        rms_norm(x, torch.ones(16), eps=float("inf"))
    with pytest.raises(ValueError, match="impl"):
        rms_norm(x, torch.ones(16), impl="cuda")


@pytest.mark.parametrize("dtype,offset", [(torch.float32, 0.0), (torch.float32, 1.0),
                                          (torch.float16, 1.0)])
def test_looped_path_for_wide_rows(dtype, offset, monkeypatch, poisoned):
    """Rows wider than one block (_MAX_D) take the looped kernels; the limits are lowered so a
    small, non-power-of-2 D (and a row count that leaves a partial slab) walks several chunks."""
    mod = sys.modules["ember.kernels.rms_norm"]  # the package re-exports the function

    monkeypatch.setattr(mod, "_MAX_D", 64)
    monkeypatch.setattr(mod, "_LOOP_BLOCK_N", 32)

    def one_block(n):
        raise AssertionError("the one-block kernels were chosen above _MAX_D")

    monkeypatch.setattr(mod, "_blocks", one_block)
    _check((7, 203), dtype, torch.float32, offset, "cpu")
    # Strided rows (a slice of a wider buffer) are read in place by the looped kernels too.
    _check((6, 65), dtype, dtype, offset, "cpu",
           make_x=lambda x: torch.cat([x, torch.randn(6, 9).to(dtype)], 1)[:, :65])


def test_row_wider_than_one_block(poisoned):
    # D > 65536 used to raise "use impl='ref'" on the GPU: now the looped kernels take it.
    _check((3, 70001), torch.float32, torch.float32, 1.0, "cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape,offset,wdtype", [
    ((2, 4096, 4096), 0.0, "x"), ((8192, 3584), 1.0, torch.float32),
    ((2, 1024, 32, 128), 0.0, "x"), ((1000, 5120), 0.0, torch.float32),
    ((64, 131072 + 7), 1.0, torch.float32)])
def test_gpu_dtype_matrix(dtype, shape, offset, wdtype, poisoned):
    _check(shape, dtype, dtype if wdtype == "x" else wdtype, offset, "cuda")
