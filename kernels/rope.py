"""Rotary position embedding, half-rotation layout (Llama, Mistral, Qwen, Gemma).

For x (B, T, H, D) split in halves x1 = x[..., :D/2], x2 = x[..., D/2:]:
    out1 = x1 * cos - x2 * sin,   out2 = x2 * cos + x1 * sin
cos/sin: (B or 1, T, D/2), fp32 (from ``rope_cos_sin``; fp16/bf16 are accepted and upcast), or
transformers' (B or 1, T, D) tables (``cat(freqs, freqs)``: equal halves, checked; the first half is
used). A partial-rotary table in transformers' layout, (.., R) with R < D, cannot be told from ours
and must be halved by the caller.
Partial rotary (Phi-4-mini): cos/sin (B or 1, T, R/2) with an even R < D rotate x[..., :R] as
above and pass x[..., R:] through unchanged. Output in x.dtype. q (B, T, H, D) and k (B, T, K, D)
may differ in head count (GQA) and dtype.

Triton path: one program per token (b, t) rotates all q heads and all k heads of that token, so
cos/sin are read once per token. q/k may have any strides (they are usually ``.view``s of a linear
output) as long as the last dim is contiguous (a copy is made otherwise); outputs are new contiguous
tensors (partial rotary: the kernel rotates the x[..., :R] views and the untouched tail is
concatenated after, so D itself may be odd: Phi's head_dim 5 with R = 2). Any even R is
accepted: the half-dim block is the next power of two and its tail is masked (D = 80, 96).
Backward is the same rotation by -sin (a rotation's transpose): it saves only cos/sin. cos/sin get
no gradient on the Triton path (they are position tables; pass them detached).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from ember.kernels import _dispatch
from ember.kernels._dispatch import check_dtype, check_tensors, use_triton


def _rotate_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    d2 = cos.shape[-1]
    xf = x[..., :2 * d2].float()
    x1, x2 = xf[..., :d2], xf[..., d2:]
    c, s = cos[:, :, None, :].float(), sin[:, :, None, :].float()  # (B, T, 1, R/2)
    out = torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1).to(x.dtype)
    return out if 2 * d2 == x.shape[-1] else torch.cat([out, x[..., 2 * d2:]], dim=-1)


def apply_rope_ref(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                   sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The spec of ``apply_rope``: q (B, T, H, D), k (B, T, K, D) fp32/fp16/bf16, cos/sin
    (B or 1, T, R/2); math in fp32, outputs in q's / k's dtype. Plain autograd (also through
    cos/sin)."""
    return _rotate_ref(q, cos, sin), _rotate_ref(k, cos, sin)


@triton.jit
def _rope_rotate_heads(X, OUT, x_off, out_off, n_heads, stride_xh, stride_oh, c, s, half, d,
                       dmask, BLOCK_H: tl.constexpr):
    for h0 in range(0, n_heads, BLOCK_H):
        h = h0 + tl.arange(0, BLOCK_H)
        mask = (h < n_heads)[:, None] & dmask[None, :]
        px = X + x_off + h[:, None] * stride_xh + d[None, :]
        x1 = tl.load(px, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(px + half, mask=mask, other=0.0).to(tl.float32)
        po = OUT + out_off + h[:, None] * stride_oh + d[None, :]
        tl.store(po, (x1 * c - x2 * s).to(OUT.dtype.element_ty), mask=mask)
        tl.store(po + half, (x2 * c + x1 * s).to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _rope_kernel(Q, K, QO, KO, COS, SIN, T, HQ, HK, half,
                 stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh,
                 stride_qob, stride_qot, stride_qoh, stride_kob, stride_kot, stride_koh,
                 stride_cb, stride_ct,
                 BACKWARD: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr,
                 BLOCK_D: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    b = pid // T
    t = pid % T
    d = tl.arange(0, BLOCK_D)
    dmask = d < half
    cs_off = b * stride_cb + t * stride_ct + d
    c = tl.load(COS + cs_off, mask=dmask, other=0.0).to(tl.float32)[None, :]
    s = tl.load(SIN + cs_off, mask=dmask, other=0.0).to(tl.float32)[None, :]
    if BACKWARD:
        s = -s
    _rope_rotate_heads(Q, QO, b * stride_qb + t * stride_qt, b * stride_qob + t * stride_qot,
                       HQ, stride_qh, stride_qoh, c, s, half, d, dmask, BLOCK_HQ)
    _rope_rotate_heads(K, KO, b * stride_kb + t * stride_kt, b * stride_kob + t * stride_kot,
                       HK, stride_kh, stride_koh, c, s, half, d, dmask, BLOCK_HK)


def _spec(dt: str, backward: bool, block_hq: int, block_hk: int, block_d: int,
          cs: str = "fp32") -> tuple:
    sig = {"Q": f"*{dt}", "K": f"*{dt}", "QO": f"*{dt}", "KO": f"*{dt}", "COS": f"*{cs}",
           "SIN": f"*{cs}", "T": "i32", "HQ": "i32", "HK": "i32", "half": "i32"}
    for name in ("q", "k", "qo", "ko"):
        sig.update({f"stride_{name}b": "i64", f"stride_{name}t": "i32", f"stride_{name}h": "i32"})
    sig.update({"stride_cb": "i32", "stride_ct": "i32", "BACKWARD": "constexpr",
                "BLOCK_HQ": "constexpr", "BLOCK_HK": "constexpr", "BLOCK_D": "constexpr"})
    return (_rope_kernel, sig, {"BACKWARD": backward, "BLOCK_HQ": block_hq, "BLOCK_HK": block_hk,
                                "BLOCK_D": block_d})


# _rope_rotate_heads is compiled through _rope_kernel, which calls it. The bf16 cos/sin are what
# transformers' rotary embedding hands over (the HF backend).
COMPILE_SPECS = [_spec("fp32", False, 16, 16, 64), _spec("bf16", True, 32, 8, 64),
                 _spec("bf16", False, 32, 8, 64, cs="bf16")]


def _last_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _rope(q, k, cos, sin, backward: bool):
    b, t, hq, d = q.shape
    hk = k.shape[2]
    qo = torch.empty((b, t, hq, d), device=q.device, dtype=q.dtype)
    ko = torch.empty((b, t, hk, d), device=k.device, dtype=k.dtype)
    if b * t == 0:
        return qo, ko
    half = d // 2
    block_d = triton.next_power_of_2(half)
    # Heads per loop step: all of them up to ~4K elements per half, separately for q and k so
    # that k's few heads (GQA) do not run in a block sized for q's.
    block_hq = max(1, min(triton.next_power_of_2(hq), 4096 // block_d))
    block_hk = max(1, min(triton.next_power_of_2(hk), 4096 // block_d))
    num_warps = 8 if block_hq * block_d >= 2048 else 4
    stride_cb = 0 if cos.shape[0] == 1 else cos.stride(0)
    _rope_kernel[(b * t,)](
        q, k, qo, ko, cos, sin, t, hq, hk, half,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        qo.stride(0), qo.stride(1), qo.stride(2), ko.stride(0), ko.stride(1), ko.stride(2),
        stride_cb, cos.stride(1),
        BACKWARD=backward, BLOCK_HQ=block_hq, BLOCK_HK=block_hk, BLOCK_D=block_d,
        num_warps=num_warps)
    return qo, ko


class _Rope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _rope(q, k, cos, sin, backward=False)

    @staticmethod
    @once_differentiable
    def backward(ctx, dqo, dko):
        if ctx.needs_input_grad[2] or ctx.needs_input_grad[3]:
            raise RuntimeError("apply_rope: the Triton path gives no gradient for cos/sin")
        cos, sin = ctx.saved_tensors
        dq, dk = _rope(_last_contiguous(dqo), _last_contiguous(dko), cos, sin, backward=True)
        return (dq if ctx.needs_input_grad[0] else None,
                dk if ctx.needs_input_grad[1] else None, None, None)


def _from_full_width(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' tables (``LlamaRotaryEmbedding``: (B, T, D), the D/2 frequencies repeated
    twice) as ours (B, T, D/2): the first halves, after checking the halves are equal (a host read
    on CPU, an asynchronous assert on CUDA, on meta/fake tensors and under torch.compile). A
    width of D cannot be ours (R/2 <= D/2)."""
    d2 = cos.shape[-1] // 2
    msg = ("apply_rope: cos/sin of width D must be transformers' layout, two equal halves "
           "(cat(freqs, freqs)); pass (B or 1, T, R/2) tables otherwise")
    for t in (cos, sin):
        first, second = t[..., :d2], t[..., d2:]
        if t.is_cuda or _dispatch.no_host_values(t):
            torch._assert_async((first == second).all(), msg)
        elif not torch.equal(first, second):
            raise ValueError(msg)
    return cos[..., :d2], sin[..., :d2]


def apply_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *,
               impl: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q (B, T, H, D) and k (B, T, K, D) by cos/sin (B or 1, T, R/2); returns (q', k').
    R = D rotates every dim; an even R < D only the first R (partial rotary). transformers'
    full-width tables (B or 1, T, D) (the halves repeated) are accepted too. q, k fp32/fp16/bf16
    (outputs in their dtypes, new contiguous tensors), cos/sin fp32 (fp16/bf16 upcast), any D
    (an odd D with R < D only); half-rotation layout (x1 = x[..., :R/2], x2 = x[..., R/2:R])."""
    check_tensors("apply_rope", q=q, k=k, cos=cos, sin=sin)
    if q.dim() != 4 or k.dim() != 4 or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"apply_rope: q, k must be (B, T, H, D) with the same D; got "
                         f"{tuple(q.shape)} and {tuple(k.shape)}")
    if q.shape[:2] != k.shape[:2]:
        raise ValueError(f"apply_rope: q and k must share (B, T); got {tuple(q.shape)} and "
                         f"{tuple(k.shape)}")
    # an odd D has no full-width table (transformers' Phi: an even R < D, e.g. D = 5, R = 2)
    if (cos.dim() == 3 and cos.shape == sin.shape and cos.shape[-1] == q.shape[-1]
            and q.shape[-1] % 2 == 0):
        cos, sin = _from_full_width(cos, sin)
    if (cos.dim() != 3 or cos.shape != sin.shape or not 0 < cos.shape[-1] <= q.shape[-1] // 2
            or cos.shape[1] != q.shape[1] or cos.shape[0] not in (1, q.shape[0])):
        raise ValueError(f"apply_rope: cos/sin must be (B or 1, T, R/2) = ({q.shape[0]} or 1, "
                         f"{q.shape[1]}, R/2) with 0 < R <= D = {q.shape[-1]}; got "
                         f"{tuple(cos.shape)} and {tuple(sin.shape)}")
    for name, t in (("q", q), ("k", k), ("cos", cos), ("sin", sin)):
        check_dtype("apply_rope", name, t)
        if t.device != q.device:
            raise ValueError(f"apply_rope: {name} is on {t.device} but q on {q.device}")
    if use_triton(q, impl, "apply_rope"):
        if torch.is_grad_enabled() and (cos.requires_grad or sin.requires_grad):
            raise ValueError("apply_rope: the Triton path does not differentiate through cos/sin; "
                             "pass cos.detach(), sin.detach() or use impl='ref'")
        r = 2 * cos.shape[-1]
        with _dispatch.device_guard(q):
            qr, kr = _Rope.apply(_last_contiguous(q[..., :r]), _last_contiguous(k[..., :r]),
                                 _last_contiguous(cos), _last_contiguous(sin))
        if r == q.shape[-1]:
            return qr, kr
        return torch.cat([qr, q[..., r:]], dim=-1), torch.cat([kr, k[..., r:]], dim=-1)
    return apply_rope_ref(q, k, cos, sin)
