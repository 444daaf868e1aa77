"""LoRA linear: y = x W^T + b + s (x_l A^T) B^T, with x_l = dropout(x) (or x); and the fused blocks
that share one input: q/k/v projections (``lora_qkv``) and the gated MLP (``lora_mlp``).

Contract: x (..., in) fp32/fp16/bf16; weight (out, in), a tensor or an ``NF4Weight``
(``ember.kernels.nf4``); A (r, in); B (out, r) (any float dtype, cast to x.dtype for the math;
LoRA weights are usually fp32 over a bf16/NF4 base); bias (out,) or None; ``lora_x`` the
dropped-out input of the LoRA path (default x). Output in x.dtype.

The fused path (CUDA, or the Triton interpreter) is a hand-written autograd.Function over cuBLAS
matmuls, with NF4 weights dequantized by the Triton kernel (or, for <= 16 rows, multiplied by the
fused dequant+matmul kernel). For G projections reading the same x (G = 1, 3 for q/k/v, 2 for
gate/up), with Acat = [A_1; ...; A_G] so that x_l is read once:
  u = x_l Acat^T (M, R = sum r_i);  y_i = x W_i^T + b_i + s_i u_i B_i^T
  g_i = s_i dy_i B_i;  dx = sum_i dy_i W_i (+ [g] Acat when x_l is x);  dx_l = [g] Acat
  dAcat = [g]^T x_l;  dB_i = s_i dy_i^T u_i;  dW_i = dy_i^T x (dense trainable W);  db_i = sum dy_i
Saved: x_l and x (inputs; x only when a dense W needs its gradient) and u (rank R). W is never
stored: an NF4 weight is dequantized again in backward into a temporary freed right after use.
``lora_mlp``: g = gate(x), up = up(x), h = act(g, up), out = down(h) with LoRA on all three; it
saves g and up but not h, which backward recomputes (one elementwise kernel) for dA_down, dB_down.
Limits: dropout on the down projection's input is not supported by ``lora_mlp`` (PEFT applies a
separate dropout there): use the unfused modules when dropout > 0.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from ember.kernels import _dispatch
from ember.kernels._dispatch import check_dtype, check_tensors, use_triton
from ember.kernels.nf4 import NF4Weight, as_nf4_weight, nf4_dequantize, nf4_mm
from ember.kernels.swiglu import geglu, geglu_ref, glu_backward_, swiglu, swiglu_ref

_ACTS = {"silu": (swiglu, swiglu_ref), "gelu_tanh": (geglu, geglu_ref)}


def _dense(weight, dtype):
    if isinstance(weight, torch.Tensor):
        return weight.to(dtype)
    return weight.dequantize(dtype, impl="ref")


def lora_linear_ref(x, weight, A, B, scale, bias=None, *, lora_x=None):
    """The spec of ``lora_linear``: x (..., in) fp32/fp16/bf16 -> (..., out) in x.dtype, unfused,
    plain autograd."""
    lx = x if lora_x is None else lora_x
    y = F.linear(x, _dense(weight, x.dtype), None if bias is None else bias.to(x.dtype))
    u = F.linear(lx, A.to(x.dtype))
    # y + scale * u B^T as one GEMM onto y (beta = 1, alpha = scale): the same values as the
    # written-out sum, without two more passes over the (tokens, out) output (about 10% of a
    # LoRA linear's forward + backward on a CPU, measured); _rows: a rank-0 adapter or no
    # outputs too
    return torch.addmm(_rows(y), _rows(u), B.to(x.dtype).t(), alpha=float(scale)).view(y.shape)


def lora_qkv_ref(x, weights, As, Bs, scale, biases=None, *, lora_x=None):
    """The spec of ``lora_qkv``: three ``lora_linear_ref`` of x (..., in) fp32/fp16/bf16, outputs
    (..., out_i) in x.dtype."""
    scales, biases = _scales(scale, 3, "lora_qkv"), biases or (None,) * 3
    return tuple(lora_linear_ref(x, w, A, B, s, b, lora_x=lora_x)
                 for w, A, B, s, b in zip(weights, As, Bs, scales, biases, strict=True))


def lora_mlp_ref(x, weights, As, Bs, scale, biases=None, *, lora_x=None, activation="silu"):
    """The spec of ``lora_mlp``: x (..., in) -> (..., out) in x.dtype, unfused, plain autograd."""
    s, b = _scales(scale, 3, "lora_mlp"), biases or (None,) * 3
    g = lora_linear_ref(x, weights[0], As[0], Bs[0], s[0], b[0], lora_x=lora_x)
    u = lora_linear_ref(x, weights[1], As[1], Bs[1], s[1], b[1], lora_x=lora_x)
    h = _ACTS[activation][1](g, u)
    return lora_linear_ref(h, weights[2], As[2], Bs[2], s[2], b[2])


# ------------------------------------------------------------------------- fused building blocks
def _base(x2, w, bias, dtype):
    """x2 @ W^T + b in dtype; NF4 through the Triton dequant (or the fused small-M kernel)."""
    if not isinstance(w, torch.Tensor):
        return nf4_mm(x2, w, bias)
    w = w.to(dtype)
    return x2 @ w.t() if bias is None else torch.addmm(bias.to(dtype), x2, w.t())


def _base_grad_into(dx, dy, w, dtype):
    """dx (+)= dy @ W, with an NF4 W dequantized into a temporary that dies here."""
    w = w.to(dtype) if isinstance(w, torch.Tensor) else nf4_dequantize(
        w.packed, w.state, dtype, impl="triton")
    return dy @ w if dx is None else dx.addmm_(dy, w)


def _group_fwd(x2, src, ws, bs, As, Bs, scales):
    dt = x2.dtype
    acat = torch.cat([A.to(dt) for A in As]) if len(As) > 1 else As[0].to(dt)
    u = src @ acat.t()  # (M, R): the only activation the LoRA path adds
    outs, off = [], 0
    for w, b, B, s in zip(ws, bs, Bs, scales, strict=True):
        r = B.shape[1]
        y = _base(x2, w, b, dt)
        outs.append(y.addmm_(u[:, off:off + r], B.to(dt).t(), alpha=s))
        off += r
    return outs, u


def _group_bwd(dys, x2, src, u, ws, bs, As, Bs, scales, need_x, need_src, need):
    """Gradients of _group_fwd. need = per-tensor flags in the order (W*, b*, A*, B*)."""
    G, dt = len(ws), dys[0].dtype
    gs = [(dy @ B.to(dt)).mul_(s) for dy, B, s in zip(dys, Bs, scales, strict=True)]
    gcat = torch.cat(gs, 1) if G > 1 else gs[0]  # (M, R)
    acat = torch.cat([A.to(dt) for A in As]) if G > 1 else As[0].to(dt)
    dx = dsrc = None
    if need_x:
        for dy, w in zip(dys, ws, strict=True):
            dx = _base_grad_into(dx, dy, w, dt)
        if src is x2:
            dx.addmm_(gcat, acat)
    if need_src and src is not x2:
        dsrc = gcat @ acat
    dws = [(dy.t() @ x2).to(w.dtype) if need[i] else None
           for i, (dy, w) in enumerate(zip(dys, ws, strict=True))]
    dbs = [dy.sum(0).to(b.dtype) if need[G + i] else None
           for i, (dy, b) in enumerate(zip(dys, bs, strict=True))]
    dacat = gcat.t() @ src if any(need[2 * G:3 * G]) else None
    das, dbs_lora, off = [], [], 0
    for i, (A, B, s, dy) in enumerate(zip(As, Bs, scales, dys, strict=True)):
        r = A.shape[0]
        das.append(dacat[off:off + r].to(A.dtype) if need[2 * G + i] else None)
        dbs_lora.append((dy.t() @ u[:, off:off + r]).mul_(s).to(B.dtype)
                        if need[3 * G + i] else None)
        off += r
    return dx, dsrc, [*dws, *dbs, *das, *dbs_lora]


def _unpack(G, meta_w, tensors):
    ws = [meta_w[i] if meta_w[i] is not None else tensors[i] for i in range(G)]
    return ws, tensors[G:2 * G], tensors[2 * G:3 * G], tensors[3 * G:4 * G]


class _LoRAGroup(torch.autograd.Function):
    """G LoRA projections of one input; tensors = (W_1..W_G (None for NF4), b*, A*, B*)."""

    @staticmethod
    def forward(ctx, x2, lx2, meta, *tensors):
        nf4s, scales = meta
        G = len(scales)
        ws, bs, As, Bs = _unpack(G, nf4s, tensors)
        src = x2 if lx2 is None else lx2
        outs, u = _group_fwd(x2, src, ws, bs, As, Bs, scales)
        dense_grad = any(ctx.needs_input_grad[3:3 + G])
        ctx.meta, ctx.has_lx = meta, lx2 is not None
        ctx.save_for_backward(x2 if dense_grad or lx2 is None else None, lx2, u, *tensors)
        return tuple(outs)

    @staticmethod
    @once_differentiable
    def backward(ctx, *dys):
        x2, lx2, u, *tensors = ctx.saved_tensors
        nf4s, scales = ctx.meta
        ws, bs, As, Bs = _unpack(len(scales), nf4s, tensors)
        src = lx2 if ctx.has_lx else x2
        if x2 is None:  # x itself was not kept: any stand-in of the right shape works for dx
            x2 = torch.empty(0, device=src.device, dtype=src.dtype)
        dx, dsrc, grads = _group_bwd(
            [dy.contiguous() for dy in dys], x2, src, u, ws, bs, As, Bs, scales,
            ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[3:])
        return (dx, dsrc, None, *grads)


class _LoRAMLP(torch.autograd.Function):
    """down(act(gate(x), up(x))) with LoRA on all three; tensors as in _LoRAGroup for G = 3."""

    @staticmethod
    def forward(ctx, x2, lx2, meta, *tensors):
        nf4s, scales, activation, impl = meta
        ws, bs, As, Bs = _unpack(3, nf4s, tensors)
        src = x2 if lx2 is None else lx2
        (g, up), u1 = _group_fwd(x2, src, ws[:2], bs[:2], As[:2], Bs[:2], scales[:2])
        h = _ACTS[activation][0](g, up, impl=impl)
        (out,), u2 = _group_fwd(h, h, ws[2:], bs[2:], As[2:], Bs[2:], scales[2:])
        dense_grad = any(ctx.needs_input_grad[3:5])
        ctx.meta, ctx.has_lx = meta, lx2 is not None
        ctx.save_for_backward(x2 if dense_grad or lx2 is None else None, lx2, u1, g, up, u2,
                              *tensors)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        try:
            x2, lx2, u1, g, up, u2, *tensors = ctx.saved_tensors
        except RuntimeError as e:  # autograd's version check names no cause a caller can act on
            if "modified by an inplace operation" not in str(e):
                raise
            raise RuntimeError(
                "lora_mlp: a tensor saved for backward was modified by an inplace operation: "
                "a second backward through the same graph (retain_graph=True) is not supported "
                "by the fused path, whose first backward overwrites its saved activations with "
                "their gradients (or an input was changed in place after the forward); use "
                "impl='ref', activation checkpointing, or run the forward again"
            ) from e
        nf4s, scales, activation, impl = ctx.meta
        ws, bs, As, Bs = _unpack(3, nf4s, tensors)
        need = ctx.needs_input_grad[3:]
        # h = act(g, up) again (cheaper than keeping an (M, F) tensor alive), for the down
        # projection's backward; then the activation's gradients overwrite g and up (saved for
        # this backward only): at most g, up, h and dh are alive, not also dg and dup.
        with torch.no_grad():
            h = _ACTS[activation][0](g, up, impl=impl)
        dh, _, grads_d = _group_bwd([dout.contiguous()], h, h, u2, ws[2:], bs[2:], As[2:],
                                    Bs[2:], scales[2:], True, False, need[2::3])
        del h
        dg, dup = glu_backward_(dh, g, up, gelu=activation == "gelu_tanh", impl=impl)
        del dh
        src = lx2 if ctx.has_lx else x2
        if x2 is None:
            x2 = torch.empty(0, device=src.device, dtype=src.dtype)
        need_gu = [f for i, f in enumerate(need) if i % 3 != 2]
        dx, dsrc, grads_gu = _group_bwd([dg, dup], x2, src, u1, ws[:2], bs[:2], As[:2], Bs[:2],
                                        scales[:2], ctx.needs_input_grad[0],
                                        ctx.needs_input_grad[1], need_gu)
        grads = []
        for kind in range(4):  # (W, b, A, B) x (gate, up, down)
            grads += [grads_gu[2 * kind], grads_gu[2 * kind + 1], grads_d[kind]]
        return (dx, dsrc, None, *grads)


# ----------------------------------------------------------------------------------- public API
def _is_bool(s) -> bool:
    return isinstance(s, bool) or "bool" in str(getattr(s, "dtype", ""))


def _scales(scale, n: int, op: str) -> tuple[float, ...]:
    """scale as n floats: one number for all (a Python or NumPy number, or anything 0-d or
    one-element: a tensor, a NumPy array), or n of them. None or a string failed inside float()
    with a TypeError that named no argument."""
    given = scale
    if isinstance(scale, int | float) or getattr(scale, "ndim", None) == 0 or (
            isinstance(scale, torch.Tensor) and scale.numel() == 1):
        scale = (scale,) * n
    try:
        out = tuple(float(s) for s in scale)
    except (TypeError, ValueError, RuntimeError):
        out = None
    if out is None or len(out) != n or any(_is_bool(s) or isinstance(s, str) for s in scale):
        want = "one number" if n == 1 else f"one number or {n} numbers (one per projection)"
        raise ValueError(f"{op}: scale must be {want}, got {given!r}")
    return out


def _check(op, x, lora_x, weights, As, Bs, biases, in_features=None):
    check_tensors(op, x=x)
    check_dtype(op, "x", x)
    if lora_x is not None:
        check_tensors(op, lora_x=lora_x)
    for i, (w, A, B, b) in enumerate(zip(weights, As, Bs, biases, strict=True)):
        check_tensors(op, **{f"A {i}": A, f"B {i}": B})
        if b is not None:
            check_tensors(op, **{f"bias {i}": b})
        if not isinstance(w, (torch.Tensor, NF4Weight)):
            raise ValueError(f"{op}: weight {i} must be a tensor, an NF4Weight or a bitsandbytes "
                             f"Params4bit, got {type(w).__name__}")
    k = x.shape[-1]
    if lora_x is not None and (lora_x.shape != x.shape or lora_x.dtype != x.dtype):
        raise ValueError(f"{op}: lora_x {tuple(lora_x.shape)} {lora_x.dtype} must match x "
                         f"{tuple(x.shape)} {x.dtype}")
    for i, (w, A, B, b) in enumerate(zip(weights, As, Bs, biases, strict=True)):
        n_in = k if in_features is None or i < len(weights) - 1 else in_features
        wshape = tuple(w.shape)
        if len(wshape) != 2 or wshape[1] != n_in:
            raise ValueError(f"{op}: weight {i} has shape {wshape}, expected (out, {n_in})")
        if A.dim() != 2 or B.dim() != 2 or A.shape[1] != n_in or B.shape != (wshape[0], A.shape[0]):
            raise ValueError(f"{op}: shapes x {tuple(x.shape)}, A {tuple(A.shape)}, B "
                             f"{tuple(B.shape)}, weight {wshape} do not chain (A is (r, in), "
                             "B is (out, r))")
        if b is not None and tuple(b.shape) != (wshape[0],):
            raise ValueError(f"{op}: bias {i} has shape {tuple(b.shape)}, expected ({wshape[0]},)")
        for name, t in ((f"weight {i}", w), (f"A {i}", A), (f"B {i}", B), (f"bias {i}", b),
                        ("lora_x", lora_x)):
            if t is None:
                continue
            if t.device != x.device:
                raise ValueError(f"{op}: x on {x.device} but {name} on {t.device}; move them to "
                                 "one device")
            if isinstance(t, torch.Tensor) and not t.is_floating_point():
                raise ValueError(f"{op}: {name} has dtype {t.dtype}; LoRA weights, biases and "
                                 "inputs must be floating point")


def _split(weights):
    """(NF4 weights or None, dense tensors or None): NF4 objects travel outside autograd."""
    nf4s = tuple(w if isinstance(w, NF4Weight) else None for w in weights)
    return nf4s, [None if isinstance(w, NF4Weight) else w for w in weights]


def _rows(t):
    # Row count spelled out: reshape(-1, 0) cannot infer it (in_features = 0).
    return None if t is None else t.reshape(t.shape[:-1].numel(), t.shape[-1])


def _autocast(x, lora_x, weights, As, Bs, biases):
    """Under torch.autocast every floating input in autocast's dtype, as ``lora_linear_ref``'s
    ``F.linear`` / ``addmm`` see them (the Functions below run with autocast off)."""
    g = len(weights)
    cast = _dispatch.autocast_dtype(x)
    x, lora_x, *rest = _dispatch.cast_floats(cast, x, lora_x, *weights, *As, *Bs, *biases)
    return x, lora_x, *(tuple(rest[i * g:(i + 1) * g]) for i in range(4))


def _group(x, weights, As, Bs, scales, biases, lora_x):
    x, lora_x, weights, As, Bs, biases = _autocast(x, lora_x, weights, As, Bs, biases)
    nf4s, dense = _split(weights)
    with _dispatch.no_autocast(x), _dispatch.device_guard(x):
        outs = _LoRAGroup.apply(_rows(x), _rows(lora_x), (nf4s, scales), *dense, *biases, *As,
                                *Bs)
    return tuple(y.view(*x.shape[:-1], y.shape[-1]) for y in outs)


def lora_linear(x, weight, A, B, scale, bias=None, *, lora_x=None, impl=None):
    """y = x W^T + b + scale (lora_x A^T) B^T.

    x (..., in) fp32/fp16/bf16; weight (out, in) a tensor, an ``NF4Weight`` or a bitsandbytes
    ``Params4bit``; A (r, in), B (out, r) and bias (out,) or None in any float dtype (cast to
    x.dtype); returns (..., out) in x.dtype. Gradients for x, A, B, bias and a dense weight that
    requires one. See the module docstring."""
    weight = as_nf4_weight(weight)
    _check("lora_linear", x, lora_x, (weight,), (A,), (B,), (bias,))
    (scale,) = _scales(scale, 1, "lora_linear")
    if use_triton(x, impl, "lora_linear"):
        return _group(x, (weight,), (A,), (B,), (scale,), (bias,), lora_x)[0]
    return lora_linear_ref(x, weight, A, B, scale, bias, lora_x=lora_x)


def lora_qkv(x: torch.Tensor, weights: Sequence, As: Sequence[torch.Tensor],
             Bs: Sequence[torch.Tensor], scale, biases: Sequence | None = None, *,
             lora_x: torch.Tensor | None = None, impl: str | None = None):
    """(q, k, v) = three ``lora_linear`` of the same x, computed with one saved x, one u and one
    LoRA-A GEMM; ``scale`` is one float or one per projection. x (..., in) fp32/fp16/bf16;
    weights[i] (out_i, in) (dense, NF4Weight or bnb Params4bit), As[i] (r_i, in), Bs[i]
    (out_i, r_i), biases[i] (out_i,) or None; outputs (..., out_i) in x.dtype."""
    biases = tuple(biases) if biases is not None else (None,) * 3
    weights = tuple(as_nf4_weight(w) for w in weights)
    if not len(weights) == len(As) == len(Bs) == len(biases) == 3:
        raise ValueError("lora_qkv: weights, As, Bs (and biases) must each hold 3 entries "
                         "(q, k, v)")
    _check("lora_qkv", x, lora_x, weights, As, Bs, biases)
    scales = _scales(scale, 3, "lora_qkv")
    if use_triton(x, impl, "lora_qkv"):
        return _group(x, tuple(weights), tuple(As), tuple(Bs), scales, biases, lora_x)
    return lora_qkv_ref(x, weights, As, Bs, scales, biases, lora_x=lora_x)


def lora_mlp(x: torch.Tensor, weights: Sequence, As: Sequence[torch.Tensor],
             Bs: Sequence[torch.Tensor], scale, biases: Sequence | None = None, *,
             lora_x: torch.Tensor | None = None, activation: str = "silu",
             impl: str | None = None) -> torch.Tensor:
    """down(act(gate(x), up(x))) with LoRA on each of (gate, up, down); act = SwiGLU ("silu") or
    GeGLU ("gelu_tanh"). ``lora_x`` is the dropped-out x for the gate/up adapters only.
    x (..., in) fp32/fp16/bf16; gate/up weights (F, in), down (out, F) (dense, NF4Weight or bnb
    Params4bit), As[i] (r_i, in_i), Bs[i] (out_i, r_i); returns (..., out) in x.dtype."""
    biases = tuple(biases) if biases is not None else (None,) * 3
    weights = tuple(as_nf4_weight(w) for w in weights)
    if not len(weights) == len(As) == len(Bs) == len(biases) == 3:
        raise ValueError("lora_mlp: weights, As, Bs (and biases) must each hold 3 entries "
                         "(gate, up, down)")
    if activation not in _ACTS:
        raise ValueError(f"lora_mlp: activation must be one of {tuple(_ACTS)}, got {activation!r}")
    if tuple(weights[0].shape) != tuple(weights[1].shape):
        raise ValueError(f"lora_mlp: gate {tuple(weights[0].shape)} and up "
                         f"{tuple(weights[1].shape)} weights must have the same shape")
    _check("lora_mlp", x, lora_x, weights, As, Bs, biases, in_features=weights[0].shape[0])
    scales = _scales(scale, 3, "lora_mlp")
    if not use_triton(x, impl, "lora_mlp"):
        return lora_mlp_ref(x, weights, As, Bs, scales, biases, lora_x=lora_x,
                            activation=activation)
    x, lora_x, weights, As, Bs, biases = _autocast(x, lora_x, weights, As, Bs, biases)
    nf4s, dense = _split(weights)
    with _dispatch.no_autocast(x), _dispatch.device_guard(x):
        out = _LoRAMLP.apply(_rows(x), _rows(lora_x), (nf4s, scales, activation, impl), *dense,
                             *biases, *As, *Bs)
    return out.view(*x.shape[:-1], out.shape[-1])
