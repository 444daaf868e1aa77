"""SwiGLU / GeGLU Triton kernels vs their references: output and both gradients, including the
halves of a fused gate_up projection (strided rows) and rows spanning several column blocks."""

from __future__ import annotations

import pytest
import torch

from ember.kernels.swiglu import geglu, geglu_ref, glu_backward_, swiglu, swiglu_ref
from tests.numerics import assert_close_to_ref, grads

OPS = {"swiglu": swiglu, "geglu": geglu}


def _run(op, gu, fused, dy, impl):
    gu = gu.detach().requires_grad_()
    g, u = gu.chunk(2, -1) if fused else gu.unbind(0)
    y = op(g, u, impl=impl)
    (dgu,) = grads(y, (gu,), dy)
    return y, dgu


def _check(name, shape, dtype, device, fused):
    op = OPS[name]
    # Spread gate over the activation's curved region and both saturated tails.
    if fused:  # one (..., 2F) gate_up output: gate/up rows have stride 2F
        gu32 = torch.randn(*shape[:-1], 2 * shape[-1], device=device) * 4
    else:
        gu32 = torch.randn(2, *shape, device=device) * 4
    dy32 = torch.randn(shape, device=device)
    gu, dy = gu32.to(dtype), dy32.to(dtype)
    out = _run(op, gu, fused, dy, "triton")
    lowp = _run(op, gu, fused, dy, "ref")
    ref32 = _run(op, gu.float(), fused, dy.float(), "ref")
    for part, o, r, g in zip(("out", "d_gate_up"), out, lowp, ref32, strict=True):
        assert o.dtype == r.dtype
        assert_close_to_ref(f"{name}.{part}", o, r, g)


@pytest.mark.parametrize("name", ["swiglu", "geglu"])
@pytest.mark.parametrize("shape,fused", [((3, 5, 100), False), ((2, 5000), True)])
def test_fp32(name, shape, fused, poisoned):
    _check(name, shape, torch.float32, "cpu", fused)


@pytest.mark.parametrize("name", ["swiglu", "geglu"])
def test_fp16(name, poisoned):
    _check(name, (5, 300), torch.float16, "cpu", False)


def test_extreme_gate_values_stay_finite(poisoned):
    # exp(-g) overflows for g < -88 in fp32; tanh from exp must saturate, not produce inf/inf.
    g = torch.tensor([[-1e4, -100.0, -30.0, 0.0, 1e-6, 30.0, 100.0, 1e4]], requires_grad=True)
    u = torch.ones_like(g, requires_grad=True)
    for op, ref in ((swiglu, swiglu_ref), (geglu, geglu_ref)):
        y = op(g, u, impl="triton")
        dg, du = torch.autograd.grad(y.sum(), (g, u))
        yr = ref(g, u)
        dgr, dur = torch.autograd.grad(yr.sum(), (g, u))
        for part, o, r in (("out", y, yr), ("dg", dg, dgr), ("du", du, dur)):
            assert_close_to_ref(f"{op.__name__}.{part}", o, r, r)


def test_only_up_needs_grad(poisoned):
    g = torch.randn(3, 40)
    u = torch.randn(3, 40, requires_grad=True)
    (du,) = torch.autograd.grad(geglu(g, u, impl="triton").sum(), u)
    (dur,) = torch.autograd.grad(geglu_ref(g, u).sum(), u)
    assert_close_to_ref("du", du, dur, dur)


def test_references_are_the_formulas():
    # The references use torch's fused silu / tanh-gelu: checked here against the written-out
    # definitions in float64 (values, and gradients through autograd), at fp32 precision.
    g = (torch.randn(4, 257, dtype=torch.float64) * 4).requires_grad_()
    u = torch.randn(4, 257, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(4, 257, dtype=torch.float64)
    c = (2.0 / torch.pi) ** 0.5
    formulas = {swiglu_ref: lambda g, u: g * torch.sigmoid(g) * u,
                geglu_ref: lambda g, u: 0.5 * g * (1 + torch.tanh(c * (g + 0.044715 * g**3))) * u}
    for ref, formula in formulas.items():
        want = formula(g, u)
        want_g = torch.autograd.grad(want, (g, u), dy)
        g32, u32 = g.detach().float().requires_grad_(), u.detach().float().requires_grad_()
        got = ref(g32, u32)
        got_g = torch.autograd.grad(got, (g32, u32), dy.float())
        for o, w in zip((got, *got_g), (want, *want_g), strict=True):
            torch.testing.assert_close(o.double(), w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", ["triton", "ref"])
def test_zero_width(impl):
    # F = 0 (or no rows): the Triton path viewed gate as reshape(-1, 0), which cannot infer the
    # row count, and crashed; torch's own silu(g) * u returns the empty result.
    for shape in ((2, 3, 0), (0, 5)):
        g = torch.randn(shape, requires_grad=True)
        u = torch.randn(shape, requires_grad=True)
        y = swiglu(g, u, impl=impl)
        want = torch.nn.functional.silu(g) * u
        assert y.shape == want.shape
        dg, du = grads(y, (g, u), torch.ones_like(y))
        assert dg.shape == g.shape and du.shape == u.shape


@pytest.mark.parametrize("impl", ["triton", "ref"])
@pytest.mark.parametrize("gelu", [False, True])
def test_zero_width_in_place_backward(impl, gelu):
    # glu_backward_ (lora_mlp's in-place backward) with F = 0 viewed gate as view(-1, 0) on the
    # Triton path and crashed; torch's autograd of silu(g) * u / gelu(g) * u gives empty grads.
    act = (lambda t: torch.nn.functional.gelu(t, approximate="tanh")) if gelu else (
        torch.nn.functional.silu)
    for shape in ((2, 3, 0), (0, 5)):
        g = torch.randn(shape, requires_grad=True)
        u = torch.randn(shape, requires_grad=True)
        want = torch.autograd.grad(act(g) * u, (g, u), torch.ones(shape))
        got = glu_backward_(torch.ones(shape), g.detach().clone(), u.detach().clone(),
                            gelu=gelu, impl=impl)
        assert [t.shape for t in got] == [t.shape for t in want]
        assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))


@pytest.mark.parametrize("op", [swiglu, geglu])
def test_bad_inputs(op):
    g = torch.randn(4, 8)
    with pytest.raises(ValueError, match="same shape"):
        op(g, torch.randn(4, 9))
    with pytest.raises(ValueError, match="same shape"):
        op(g, g.half())
    with pytest.raises(ValueError, match="dtype"):
        op(g.int(), g.int())
    with pytest.raises(ValueError, match="scalars"):
        op(g[0, 0], g[0, 1])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ["swiglu", "geglu"])
@pytest.mark.parametrize("shape,fused", [((2, 1024, 14336), False), ((2048, 18944), True),
                                         ((3, 333, 5000), False)])
def test_gpu_dtype_matrix(dtype, name, shape, fused, poisoned):
    _check(name, shape, dtype, "cuda", fused)
