"""RoPE Triton kernel vs apply_rope_ref: q/k outputs and both gradients, for the strided views the
model produces, GQA, head_dim 64/80/96/128, per-batch and broadcast cos/sin, and partial rotary
(cos/sin for the first R < D dims only)."""

from __future__ import annotations

import pytest
import torch

from ember.kernels.rope import apply_rope, apply_rope_ref
from tests.numerics import assert_close_to_ref, grads


def _cos_sin(b, t, d, device):
    ang = torch.rand(b, t, d // 2, device=device) * 50
    return ang.cos(), ang.sin()


def _run(lin, views, cos, sin, dq, dk, impl):
    """views(lin) -> (q, k): q/k are views into one leaf, as in the model (a linear output)."""
    lin = lin.detach().requires_grad_()
    q, k = views(lin)
    qo, ko = apply_rope(q, k, cos, sin, impl=impl)
    (dlin,) = grads((qo, ko), (lin,), (dq, dk))
    return qo, ko, dlin


def _check(b, t, h, kh, d, cos_b, dtype, device, layout="separate", rot=None):
    if layout == "separate":  # q_proj / k_proj outputs, .view(B, T, H, D): contiguous per tensor
        lin32 = torch.randn(b, t, (h + kh) * d, device=device)

        def views(x):
            return (x[..., : h * d].view(b, t, h, d), x[..., h * d:].view(b, t, kh, d))
    else:  # fused qkv projection: q/k are strided slices (row stride (H + 2K) * D)
        lin32 = torch.randn(b, t, (h + 2 * kh) * d, device=device)

        def views(x):
            return (x[..., : h * d].unflatten(-1, (h, d)),
                    x[..., h * d: (h + kh) * d].unflatten(-1, (kh, d)))
    cos, sin = _cos_sin(cos_b, t, rot or d, device)
    dq32, dk32 = torch.randn(b, t, h, d, device=device), torch.randn(b, t, kh, d, device=device)
    lin, dq, dk = lin32.to(dtype), dq32.to(dtype), dk32.to(dtype)
    out = _run(lin, views, cos, sin, dq, dk, "triton")
    lowp = _run(lin, views, cos, sin, dq, dk, "ref")
    ref32 = _run(lin.float(), views, cos, sin, dq.float(), dk.float(), "ref")
    for name, o, r, g in zip(("q", "k", "d_qk"), out, lowp, ref32, strict=True):
        assert o.dtype == r.dtype
        assert_close_to_ref(name, o, r, g)


@pytest.mark.parametrize("b,t,h,kh,d,cos_b,layout", [
    (2, 5, 4, 2, 80, 1, "separate"),
    (2, 3, 3, 1, 96, 2, "fused"),
    (1, 6, 2, 2, 64, 1, "fused"),
    (1, 3, 5, 1, 128, 1, "separate"),
])
def test_fp32(b, t, h, kh, d, cos_b, layout, poisoned):
    _check(b, t, h, kh, d, cos_b, torch.float32, "cpu", layout)


@pytest.mark.parametrize("b,t,h,kh,d,rot,layout", [
    (2, 5, 4, 2, 64, 48, "fused"),  # Phi-4-mini's 0.75 of a 128 head, halved
    (1, 3, 3, 1, 80, 40, "separate"),
    (2, 2, 2, 2, 32, 2, "separate"),
    (2, 3, 8, 8, 5, 2, "fused"),  # Phi's odd head_dim 5 at partial_rotary_factor 0.4
])
def test_partial_rotary(b, t, h, kh, d, rot, layout, poisoned):
    _check(b, t, h, kh, d, 1, torch.float32, "cpu", layout, rot)


def test_partial_rotary_passes_the_tail_through():
    q, k = torch.randn(2, 3, 2, 16), torch.randn(2, 3, 1, 16)
    cos, sin = _cos_sin(1, 3, 12, "cpu")
    for impl in ("triton", "ref"):
        qo, ko = apply_rope(q, k, cos, sin, impl=impl)
        assert torch.equal(qo[..., 12:], q[..., 12:]) and torch.equal(ko[..., 12:], k[..., 12:])
        full = apply_rope(q[..., :12], k[..., :12], cos, sin, impl=impl)
        assert torch.equal(qo[..., :12], full[0]) and torch.equal(ko[..., :12], full[1])


def test_fp16(poisoned):
    _check(2, 3, 2, 1, 96, 2, torch.float16, "cpu", "fused")


def test_noncontiguous_last_dim_and_one_sided_grad(poisoned):
    b, t, h, d = 1, 4, 2, 32
    base = torch.randn(b, t, d, h)
    q = base.transpose(-1, -2)  # (B, T, H, D) with stride 2 along D: copied on purpose
    k = torch.randn(b, t, 1, d, requires_grad=True)
    cos, sin = _cos_sin(1, t, d, "cpu")
    qo, ko = apply_rope(q, k, cos, sin, impl="triton")
    qr, kr = apply_rope_ref(q, k, cos, sin)
    assert_close_to_ref("q", qo, qr, qr)
    dk = torch.randn_like(ko)
    (g,) = torch.autograd.grad(ko, k, dk)
    (gr,) = torch.autograd.grad(kr, k, dk)
    assert_close_to_ref("dk", g, gr, gr)


def test_bad_inputs():
    q, k = torch.randn(1, 4, 2, 8), torch.randn(1, 4, 1, 8)
    cos, sin = _cos_sin(1, 4, 8, "cpu")
    with pytest.raises(ValueError, match="cos/sin"):  # an odd D rotates fewer dims (R < D)
        apply_rope(torch.randn(1, 4, 2, 7), torch.randn(1, 4, 1, 7), cos, sin)
    with pytest.raises(ValueError, match="same D"):
        apply_rope(q[0], k[0], cos, sin)
    with pytest.raises(ValueError, match="same D"):
        apply_rope(q, torch.randn(1, 4, 1, 6), cos, sin)
    with pytest.raises(ValueError, match="share"):
        apply_rope(q, torch.randn(1, 3, 1, 8), cos, sin)
    with pytest.raises(ValueError, match="cos/sin"):
        apply_rope(q, k, cos[:, :3], sin[:, :3])
    with pytest.raises(ValueError, match="cos/sin"):
        apply_rope(q, k, cos.expand(3, 4, 4), sin.expand(3, 4, 4))
    with pytest.raises(ValueError, match="cos/sin"):  # more rotary dims than the head has
        apply_rope(q, k, *_cos_sin(1, 4, 10, "cpu"))
    with pytest.raises(ValueError, match="dtype"):
        apply_rope(q.to(torch.int64), k, cos, sin)
    with pytest.raises(ValueError, match="cos/sin"):
        apply_rope(q, k, cos.requires_grad_(), sin, impl="triton")


@pytest.mark.parametrize("impl", ["ref", "triton"])
def test_transformers_full_width_cos_sin(impl):
    """cos/sin straight from transformers' rotary embedding, (B, T, D) with repeated halves, give
    transformers' apply_rotary_pos_emb (the oracle) and its gradients; they were refused ("cos/sin
    must be (B or 1, T, R/2)"). A width-D table whose halves differ is not transformers' layout:
    refused."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import (
        LlamaRotaryEmbedding,
        apply_rotary_pos_emb,
    )

    b, t, h, kh, d = 2, 7, 4, 2, 80
    cfg = LlamaConfig(hidden_size=h * d, num_attention_heads=h, num_key_value_heads=kh,
                      head_dim=d, rope_theta=500.0)
    q, k = torch.randn(b, t, h, d, requires_grad=True), torch.randn(b, t, kh, d, requires_grad=True)
    pos = torch.arange(t)[None] + torch.tensor([[0], [5]])
    cos, sin = LlamaRotaryEmbedding(cfg)(q, pos)
    assert cos.shape == (b, t, d)
    qo, ko = apply_rope(q, k, cos, sin, impl=impl)
    qh, kh_ = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
    dq, dk = torch.randn_like(qo), torch.randn_like(ko)
    got = (qo, ko, *grads((qo, ko), (q, k), (dq, dk)))
    want = (qh.transpose(1, 2), kh_.transpose(1, 2),
            *grads((qh.transpose(1, 2), kh_.transpose(1, 2)), (q, k), (dq, dk)))
    for name, g, w in zip(("q", "k", "dq", "dk"), got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5, msg=name)
    with pytest.raises(ValueError, match="two equal halves"):
        apply_rope(q, k, torch.rand(b, t, d), sin, impl=impl)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("b,t,h,kh,d,cos_b,layout", [
    (2, 2048, 32, 8, 128, 1, "separate"),
    (1, 4096, 28, 4, 128, 1, "fused"),
    (2, 1000, 32, 32, 80, 2, "separate"),
    (1, 1531, 16, 4, 96, 1, "fused"),
])
def test_gpu_dtype_matrix(dtype, b, t, h, kh, d, cos_b, layout, poisoned):
    _check(b, t, h, kh, d, cos_b, dtype, "cuda", layout)
