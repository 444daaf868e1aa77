"""Gated MLP activations: swiglu(g, u) = silu(g) * u,  geglu(g, u) = gelu_tanh(g) * u.

gate, up: same shape (..., F), same dtype (fp32/fp16/bf16); math in fp32, output in the input dtype.
gelu_tanh(g) = 0.5 g (1 + tanh(sqrt(2/pi) (g + 0.044715 g^3))) (Gemma's approximation).

Triton path: gate/up are viewed as (M, F) rows; the last dim must be contiguous (a copy is made
otherwise) and rows may have any stride, so the halves of a fused gate_up projection work without a
copy. Backward saves gate and up only and recomputes the activation a(g):

    d_gate = dy * u * a'(g)        d_up = dy * a(g)

silu'(g) = s (1 + g (1 - s)) with s = sigmoid(g). sigmoid and tanh are built from exp (libdevice is
not available under the interpreter) of a non-positive argument, so they never overflow:
sigmoid(g) = 1/(1+e) or e/(1+e) with e = exp(-|g|);  tanh(z) = sign(z) (1-e)/(1+e), e = exp(-2|z|).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from ember.kernels import _dispatch
from ember.kernels._dispatch import check_dtype, check_tensors, use_triton


# The references use PyTorch's fused silu / tanh-gelu ops (the same functions in fp32): on CPU,
# where the model runs these, autograd then keeps one activation tensor and makes three passes in
# backward, where the written-out formulas kept three and made seven (a SwiGLU of SmolLM2's MLP,
# forward + backward: 2.6 ms against 3.7 ms at 2 threads, measured).
def swiglu_ref(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """The spec of ``swiglu``: silu(gate) * up in fp32, in gate's (..., F) shape and dtype."""
    return (F.silu(gate.float()) * up.float()).to(gate.dtype)


def geglu_ref(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """The spec of ``geglu``: gelu_tanh(gate) * up in fp32, in gate's (..., F) shape and dtype."""
    return (F.gelu(gate.float(), approximate="tanh") * up.float()).to(gate.dtype)


@triton.jit
def _tanh(z):
    e = tl.exp(-2.0 * tl.abs(z))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(z < 0, -t, t)


@triton.jit
def _act_and_grad(g, GELU: tl.constexpr, NEED_GRAD: tl.constexpr):
    """a(g) and, when NEED_GRAD, a'(g) (else 0) in fp32."""
    if GELU:
        # 0.7978845608028654 = sqrt(2 / pi)
        th = _tanh(0.7978845608028654 * (g + 0.044715 * g * g * g))
        a = 0.5 * g * (1.0 + th)
        if NEED_GRAD:
            da = 0.5 * (1.0 + th) + (0.5 * 0.7978845608028654) * g * (1.0 - th * th) * (
                1.0 + 3.0 * 0.044715 * g * g)
        else:
            da = 0.0 * g
    else:
        # sigmoid from exp(-|g|) <= 1: no overflow for very negative gates.
        e = tl.exp(-tl.abs(g))
        s = tl.where(g >= 0, 1.0 / (1.0 + e), e / (1.0 + e))
        a = g * s
        if NEED_GRAD:
            da = s * (1.0 + g * (1.0 - s))
        else:
            da = 0.0 * g
    return a, da


@triton.jit
def _glu_fwd_kernel(G, U, OUT, N, stride_g, stride_u, stride_o,
                    GELU: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < N
    g = tl.load(G + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
    a, _ = _act_and_grad(g, GELU, False)
    tl.store(OUT + row * stride_o + cols, (a * u).to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _glu_bwd_kernel(DY, G, U, DG, DU, N, stride_dy, stride_g, stride_u, stride_dg, stride_du,
                    GELU: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < N
    dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
    a, da = _act_and_grad(g, GELU, True)
    tl.store(DG + row * stride_dg + cols, (dy * u * da).to(DG.dtype.element_ty), mask=mask)
    tl.store(DU + row * stride_du + cols, (dy * a).to(DU.dtype.element_ty), mask=mask)


def _fwd_sig(dt: str) -> dict:
    return {"G": f"*{dt}", "U": f"*{dt}", "OUT": f"*{dt}", "N": "i32", "stride_g": "i32",
            "stride_u": "i32", "stride_o": "i32", "GELU": "constexpr", "BLOCK": "constexpr"}


def _bwd_sig(dt: str) -> dict:
    return {"DY": f"*{dt}", "G": f"*{dt}", "U": f"*{dt}", "DG": f"*{dt}", "DU": f"*{dt}",
            "N": "i32", "stride_dy": "i32", "stride_g": "i32", "stride_u": "i32",
            "stride_dg": "i32", "stride_du": "i32", "GELU": "constexpr", "BLOCK": "constexpr"}


# _tanh and _act_and_grad are compiled through the kernels that call them.
COMPILE_SPECS = [
    (_glu_fwd_kernel, _fwd_sig("fp32"), {"GELU": False, "BLOCK": 1024}),
    (_glu_fwd_kernel, _fwd_sig("bf16"), {"GELU": True, "BLOCK": 4096}, {"num_warps": 8}),
    (_glu_bwd_kernel, _bwd_sig("fp32"), {"GELU": True, "BLOCK": 1024}),
    (_glu_bwd_kernel, _bwd_sig("bf16"), {"GELU": False, "BLOCK": 4096}, {"num_warps": 8}),
]


def _rows(t: torch.Tensor) -> torch.Tensor:
    """t as (M, F) with unit stride along F, copying only when no such view exists."""
    # Row count spelled out: reshape(-1, 0) cannot infer it (F = 0).
    t2 = t.reshape(t.shape[:-1].numel(), t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _launch_cfg(n: int) -> tuple[int, int]:
    block = min(4096, triton.next_power_of_2(n))
    return block, 8 if block >= 2048 else 4


def _glu_fwd(g2: torch.Tensor, u2: torch.Tensor, gelu: bool) -> torch.Tensor:
    m, n = g2.shape
    out = torch.empty((m, n), device=g2.device, dtype=g2.dtype)
    if out.numel() == 0:
        return out
    block, num_warps = _launch_cfg(n)
    _glu_fwd_kernel[(m, triton.cdiv(n, block))](
        g2, u2, out, n, g2.stride(0), u2.stride(0), out.stride(0),
        GELU=gelu, BLOCK=block, num_warps=num_warps)
    return out


def _glu_bwd(dy2: torch.Tensor, g2: torch.Tensor, u2: torch.Tensor, gelu: bool):
    m, n = g2.shape
    dg = torch.empty((m, n), device=g2.device, dtype=g2.dtype)
    du = torch.empty_like(dg)
    if dg.numel() == 0:
        return dg, du
    block, num_warps = _launch_cfg(n)
    _glu_bwd_kernel[(m, triton.cdiv(n, block))](
        dy2, g2, u2, dg, du, n, dy2.stride(0), g2.stride(0), u2.stride(0), dg.stride(0),
        du.stride(0), GELU=gelu, BLOCK=block, num_warps=num_warps)
    return dg, du


class _GLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up, gelu):
        g2, u2 = _rows(gate), _rows(up)
        ctx.save_for_backward(g2, u2)
        ctx.gelu = gelu
        return _glu_fwd(g2, u2, gelu).view(gate.shape)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        g2, u2 = ctx.saved_tensors
        dg, du = _glu_bwd(_rows(dy), g2, u2, ctx.gelu)
        return (dg.view(dy.shape) if ctx.needs_input_grad[0] else None,
                du.view(dy.shape) if ctx.needs_input_grad[1] else None, None)


def _check(op: str, gate: torch.Tensor, up: torch.Tensor) -> None:
    check_tensors(op, gate=gate, up=up)
    if gate.shape != up.shape or gate.dtype != up.dtype or gate.device != up.device:
        raise ValueError(f"{op}: gate {tuple(gate.shape)} {gate.dtype} {gate.device} and up "
                         f"{tuple(up.shape)} {up.dtype} {up.device} must have the same shape, "
                         "dtype and device")
    if gate.dim() == 0:
        raise ValueError(f"{op}: gate and up must have at least one dim, got scalars")
    check_dtype(op, "gate", gate)


def swiglu(gate: torch.Tensor, up: torch.Tensor, *, impl: str | None = None) -> torch.Tensor:
    """silu(gate) * up, elementwise: gate and up (..., F) of one shape and dtype (fp32/fp16/bf16);
    math in fp32, output (..., F) in that dtype; gradients for both."""
    _check("swiglu", gate, up)
    if use_triton(gate, impl, "swiglu"):
        with _dispatch.device_guard(gate):
            return _GLU.apply(gate, up, False)
    return swiglu_ref(gate, up)


def geglu(gate: torch.Tensor, up: torch.Tensor, *, impl: str | None = None) -> torch.Tensor:
    """gelu_tanh(gate) * up, elementwise (tanh approximation, Gemma's): gate and up (..., F) of one
    shape and dtype (fp32/fp16/bf16); math in fp32, output (..., F) in that dtype."""
    _check("geglu", gate, up)
    if use_triton(gate, impl, "geglu"):
        with _dispatch.device_guard(gate):
            return _GLU.apply(gate, up, True)
    return geglu_ref(gate, up)


def glu_backward_(dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, *, gelu: bool,
                  impl: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of ``swiglu`` (``gelu=False``) / ``geglu`` written over their inputs: gate then
    holds d_gate and up holds d_up (returned). For a caller that owns gate and up and needs
    them no more (``lora_mlp``'s backward): no (M, F) buffer is allocated, where autograd would
    hold the recomputed activation and two new gradients next to gate and up. Each element is
    read before it is written by the same thread, so overwriting is safe. gate/up: the same
    shape with unit stride along F; dy: their shape."""
    op = "glu_backward_"
    _check(op, gate, up)
    if dy.shape != gate.shape or gate.stride(-1) != 1 or up.stride(-1) != 1:
        raise ValueError(f"{op}: dy {tuple(dy.shape)} must match gate/up {tuple(gate.shape)}, "
                         "and gate/up need unit stride along the last dim")
    if use_triton(gate, impl, op):
        m = gate.shape[:-1].numel()  # spelled out: view(-1, 0) cannot infer it (F = 0)
        g2, u2, dy2 = gate.view(m, gate.shape[-1]), up.view(m, up.shape[-1]), _rows(dy)
        m, n = g2.shape
        if g2.numel():
            block, num_warps = _launch_cfg(n)
            with _dispatch.device_guard(gate):
                _glu_bwd_kernel[(m, triton.cdiv(n, block))](
                    dy2, g2, u2, g2, u2, n, dy2.stride(0), g2.stride(0), u2.stride(0),
                    g2.stride(0), u2.stride(0), GELU=gelu, BLOCK=block, num_warps=num_warps)
        # Written through raw pointers: tell autograd, so a second use of a graph that saved
        # gate or up (backward with retain_graph) fails loudly instead of reading gradients.
        torch.autograd.graph.increment_version(gate)
        torch.autograd.graph.increment_version(up)
        return gate, up
    # The reference: autograd through swiglu_ref / geglu_ref, then written over the inputs.
    with torch.enable_grad():
        g, u = gate.detach().requires_grad_(), up.detach().requires_grad_()
        out = (geglu_ref if gelu else swiglu_ref)(g, u)
    dg, du = torch.autograd.grad(out, (g, u), dy)
    gate.copy_(dg)
    up.copy_(du)
    return gate, up
