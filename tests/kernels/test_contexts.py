"""ember.kernels called inside torch's contexts, as other tools call them: ``torch.autocast``.

The oracle is the op's own math in plain torch (``F.linear``, SDPA, ``F.cross_entropy`` on
materialized logits, bitsandbytes' dequantization) run in the same context: under autocast the
result must come out in the dtype torch gives, with gradients reaching fp32 leaves in fp32.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from ember.kernels import (
    adamw8bit_step,
    apply_rope,
    flash_attention,
    linear_cross_entropy,
    lora_linear,
    lora_mlp,
    lora_qkv,
    nf4_linear,
)
from ember.kernels.nf4 import NF4Weight

IMPLS = ("ref", "triton")
BF16 = torch.bfloat16


def _leaves(*shapes):
    return [torch.randn(*s, requires_grad=True) for s in shapes]


def _run(fn, leaves, *, backward_inside=False):
    """fn() under CPU bf16 autocast; returns the output and the leaves' gradients."""
    for t in leaves:
        t.grad = None
    with torch.autocast("cpu", dtype=BF16):
        out = fn()
        if backward_inside:
            out.float().pow(2).sum().backward()
    if not backward_inside:
        out.float().pow(2).sum().backward()
    return out.detach(), [t.grad for t in leaves]


def _assert_matches(got, want, leaves, rel):
    (out, grads), (ref, ref_grads) = got, want
    assert out.dtype == ref.dtype, f"output dtype {out.dtype}, torch gives {ref.dtype}"
    assert out.shape == ref.shape
    scale = ref.float().abs().max().item()
    assert (out.float() - ref.float()).abs().max().item() <= rel * scale
    for i, (g, r, leaf) in enumerate(zip(grads, ref_grads, leaves, strict=True)):
        assert g is not None and g.dtype == leaf.dtype == torch.float32, f"grad {i}: {g}"
        assert (g - r).abs().max().item() <= rel * r.abs().max().item(), f"grad {i}"


@pytest.mark.parametrize("backward_inside", [False, True])
@pytest.mark.parametrize("impl", IMPLS)
def test_lora_under_autocast_matches_torch(impl, backward_inside):
    """fp32 leaves (x, base weight, A, B, bias) under CPU bf16 autocast: torch's F.linear gives a
    bf16 output and fp32 gradients. The fused Triton path crashed ('self and mat2 must have the
    same dtype, but got BFloat16 and Float'): its autograd.Function saw fp32 inputs and mixed
    them with the bf16 products autocast made inside it."""
    torch.manual_seed(0)
    leaves = x, w, a, b, bias = _leaves((2, 3, 32), (24, 32), (4, 32), (24, 4), (24,))

    def oracle():
        return F.linear(x, w, bias) + 0.5 * F.linear(F.linear(x, a), b)

    want = _run(oracle, leaves)
    got = _run(lambda: lora_linear(x, w, a, b, 0.5, bias, impl=impl), leaves,
               backward_inside=backward_inside)
    _assert_matches(got, want, leaves, 3e-2)
    qkv = _run(lambda: lora_qkv(x, [w] * 3, [a] * 3, [b] * 3, 0.5, [bias] * 3, impl=impl)[1],
               leaves, backward_inside=backward_inside)
    _assert_matches(qkv, want, leaves, 3e-2)


@pytest.mark.parametrize("impl", IMPLS)
def test_lora_mlp_under_autocast_matches_torch(impl):
    torch.manual_seed(0)
    leaves = x, wg, wu, wd, ag, au, ad, bg, bu, bd = _leaves(
        (5, 16), (24, 16), (24, 16), (16, 24), (2, 16), (2, 16), (2, 24), (24, 2), (24, 2),
        (16, 2))

    def lin(t, w, a, b):
        return F.linear(t, w) + 2.0 * F.linear(F.linear(t, a), b)

    def oracle():
        h = F.silu(lin(x, wg, ag, bg).float()) * lin(x, wu, au, bu).float()
        return lin(h.to(BF16), wd, ad, bd)

    want = _run(oracle, leaves)
    got = _run(lambda: lora_mlp(x, [wg, wu, wd], [ag, au, ad], [bg, bu, bd], 2.0, impl=impl),
               leaves)
    _assert_matches(got, want, leaves, 3e-2)


@pytest.mark.parametrize("impl", IMPLS)
def test_nf4_linear_under_autocast_matches_bitsandbytes(impl):
    """Under autocast the output is bf16 whichever matmul path runs; the fused small-M kernels
    (taken for K a multiple of the blocksize) answered in fp32 where the dequant path gave bf16."""
    bnbf = pytest.importorskip("bitsandbytes.functional")
    torch.manual_seed(0)
    packed, state = bnbf.quantize_4bit(torch.randn(24, 128), blocksize=64, quant_type="nf4")
    dense = bnbf.dequantize_4bit(packed, state)
    leaves = x, bias = _leaves((3, 128), (24,))
    want = _run(lambda: F.linear(x, dense, bias), leaves)
    got = _run(lambda: nf4_linear(x, NF4Weight(packed, state), bias, impl=impl), leaves)
    _assert_matches(got, want, leaves, 3e-2)


@pytest.mark.parametrize("impl", IMPLS)
def test_flash_attention_under_autocast_matches_sdpa(impl):
    """SDPA under autocast answers in bf16; the Triton path answered in fp32."""
    torch.manual_seed(0)
    leaves = q, k, v = _leaves((1, 6, 2, 16), (1, 6, 2, 16), (1, 6, 2, 16))

    def oracle():
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                              v.transpose(1, 2), is_causal=True).transpose(1, 2)

    want = _run(oracle, leaves)
    got = _run(lambda: flash_attention(q, k, v, impl=impl), leaves)
    _assert_matches(got, want, leaves, 5e-2)


@pytest.mark.parametrize("impl,rel", [("ref", 1e-5), ("triton", 3e-2)])
def test_linear_cross_entropy_under_autocast_matches_torch(impl, rel):
    """The oracle: F.cross_entropy of F.linear's bf16 logits. The chunked path (CPU default)
    recomputed its logits in fp32 in backward (autocast is off there) against a forward lse of
    bf16 logits: gradients 1% off the oracle where the same math gives them exactly. A bf16
    hidden with an fp32 head (F.linear casts both) was refused as a dtype mismatch."""
    torch.manual_seed(0)
    leaves = h, w = _leaves((5, 16), (300, 16))
    labels = torch.randint(0, 300, (5,))
    want = _run(lambda: F.cross_entropy(F.linear(h, w), labels), leaves)
    got = _run(lambda: linear_cross_entropy(h, w, labels, impl=impl), leaves)
    _assert_matches(got, want, leaves, rel)
    frozen = w.detach()  # a frozen head takes another chunked path (dhidden built in forward)
    want = _run(lambda: F.cross_entropy(F.linear(h, frozen), labels), [h])
    got = _run(lambda: linear_cross_entropy(h, frozen, labels, impl=impl), [h])
    _assert_matches(got, want, [h], 3e-2)  # its dhidden is fp32 until one final rounding
    hb = torch.randn(5, 16).to(BF16).requires_grad_()
    want = _run(lambda: F.cross_entropy(F.linear(hb, w), labels), [w])
    got = _run(lambda: linear_cross_entropy(hb, w, labels, impl=impl), [w])
    _assert_matches(got, want, [w], 3e-2)  # dweight rounded to bf16 by both, not identically


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_linear_cross_entropy_infers_shapes_on_meta_and_fake_tensors(reduction):
    """Shape inference, as F.cross_entropy does it: the CPU label-range check read the labels on
    the host ('Tensor.item() cannot be called on meta tensors', DataDependentOutputException
    under FakeTensorMode)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    for ctx in (torch.device("meta"), FakeTensorMode()):
        with ctx:
            h, w = torch.randn(2, 3, 16), torch.randn(50, 16)
            labels = torch.zeros(2, 3, dtype=torch.long)
            want = F.cross_entropy(F.linear(h, w).transpose(1, 2), labels, reduction=reduction)
            loss, lse = linear_cross_entropy(h, w, labels, reduction=reduction, return_lse=True)
        assert loss.shape == want.shape and loss.dtype == torch.float32
        assert lse.shape == labels.shape


@pytest.mark.parametrize("frozen_head", [False, True])
def test_linear_cross_entropy_compiles_with_fullgraph(frozen_head):
    """torch.compile(fullgraph=True) of a loss function, as a compiled training step holds it:
    the label check was a graph break (an error under fullgraph), and the frozen-head path's
    nonzero() crashed inside dynamo (PendingUnbackedSymbolNotFound). A bad label still fails."""
    torch.manual_seed(0)
    h = torch.randn(6, 16, requires_grad=True)
    w = torch.randn(50, 16, requires_grad=not frozen_head)
    labels = torch.randint(0, 50, (6,))
    labels[2] = -100
    F.cross_entropy(F.linear(h, w), labels).backward()
    want = [t.grad for t in (h, w) if t.requires_grad]
    h.grad = w.grad = None
    torch._dynamo.reset()
    step = torch.compile(lambda y: linear_cross_entropy(h, w, y), backend="aot_eager",
                         fullgraph=True)
    loss = step(labels)
    loss.backward()
    assert torch.allclose(loss, F.cross_entropy(F.linear(h, w), labels), atol=1e-5)
    for g, r in zip([t.grad for t in (h, w) if t.requires_grad], want, strict=True):
        assert torch.allclose(g, r, atol=1e-5)
    labels[0] = 50
    with pytest.raises(RuntimeError, match="outside"):
        step(labels)


@pytest.mark.parametrize("impl", IMPLS)
def test_adamw8bit_step_is_an_in_place_update_autograd_sees(impl):
    """Like torch.optim.AdamW's step: a graph that saved p (backward with retain_graph, then a
    step, then backward again) fails loudly; the Triton kernel wrote p through raw pointers and
    the second backward silently used the stepped values. Outside no_grad both paths refuse
    (the reference failed deep inside with a leaf in-place error, the Triton path went on)."""
    torch.manual_seed(0)
    tp = torch.nn.Parameter(torch.randn(300))
    tloss = (tp * tp).sum()
    tp.grad = torch.randn(300)
    torch.optim.AdamW([tp], lr=1e-2).step()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        tloss.backward()
    p = torch.nn.Parameter(torch.randn(300))
    loss = (p * p).sum()
    states = (torch.zeros(300, dtype=torch.uint8), torch.zeros(300, dtype=torch.uint8),
              torch.zeros(2), torch.zeros(2))
    with torch.no_grad():
        adamw8bit_step(p, torch.randn(300), *states, step=1, lr=1e-2, impl=impl)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
    with pytest.raises(ValueError, match="torch.no_grad"):
        adamw8bit_step(p, torch.randn(300), *states, step=2, lr=1e-2, impl=impl)


def test_apply_rope_with_transformers_tables_compiles_with_fullgraph():
    """transformers' (B, T, D) rotary tables, as an HF model under torch.compile(fullgraph=True)
    passes them: the check that their halves are equal read them on the host ('Data dependent
    operator' under fullgraph). Oracle: transformers' apply_rotary_pos_emb."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import (
        LlamaRotaryEmbedding,
        apply_rotary_pos_emb,
    )

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2)
    q, k = torch.randn(2, 5, 4, 16), torch.randn(2, 5, 2, 16)
    cos, sin = LlamaRotaryEmbedding(cfg)(q, torch.arange(5)[None].expand(2, 5))
    want = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
    torch._dynamo.reset()
    step = torch.compile(apply_rope, backend="aot_eager", fullgraph=True)
    for got, ref in zip(step(q, k, cos, sin), want, strict=True):
        assert torch.allclose(got, ref.transpose(1, 2), atol=1e-5)
    with torch.device("meta"):
        q2, k2 = apply_rope(q.to("meta"), k.to("meta"), cos.to("meta"), sin.to("meta"))
    assert q2.shape == q.shape and k2.shape == k.shape


def test_lora_mlp_second_backward_says_why_or_matches_torch():
    """backward(retain_graph=True) twice: the fused path overwrites its saved activations, so the
    second backward must fail saying so (it failed with autograd's bare 'modified by an inplace
    operation ... is at version 2'); under activation checkpointing it recomputes them and must
    give torch's gradients both times. Oracle: the same MLP in plain torch."""
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    x, wg, wu, wd, ag, au, ad, bg, bu, bd = _leaves(
        (3, 16), (12, 16), (12, 16), (16, 12), (2, 16), (2, 16), (2, 12), (12, 2), (12, 2),
        (16, 2))

    def lin(t, w, a, b):
        return F.linear(t, w) + 2.0 * F.linear(F.linear(t, a), b)

    want = lin(F.silu(lin(x, wg, ag, bg)) * lin(x, wu, au, bu), wd, ad, bd).pow(2).sum()
    (want_gx,) = torch.autograd.grad(want, x)

    def fused():
        return lora_mlp(x, [wg, wu, wd], [ag, au, ad], [bg, bu, bd], 2.0, impl="triton")

    loss = fused().pow(2).sum()
    (gx,) = torch.autograd.grad(loss, x, retain_graph=True)
    assert torch.allclose(gx, want_gx, rtol=1e-4, atol=1e-4)
    with pytest.raises(RuntimeError, match="retain_graph=True"):
        torch.autograd.grad(loss, x)
    loss = checkpoint(lambda: fused().pow(2).sum(), use_reentrant=False)
    for _ in range(2):
        (gx,) = torch.autograd.grad(loss, x, retain_graph=True)
        assert torch.allclose(gx, want_gx, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("double_quant", [False, True])
def test_nf4_quantize_compiles_with_fullgraph(double_quant):
    """nf4_quantize under torch.compile(fullgraph=True), as a compiled init/load step would call
    it: the inf/NaN check read w on the host ("Data-dependent branching" under fullgraph); with
    double_quant=True so did the absmax-overflow check, the offset's .item() and building the
    8-bit map (a tensor's tolist()). Oracle: bitsandbytes' quantize_4bit, byte for byte (the
    traced offset is a 0-d tensor of the same value); a NaN weight still fails."""
    bnbf = pytest.importorskip("bitsandbytes.functional")
    from ember.kernels import nf4_dequantize, nf4_quantize
    from ember.models.nf4_storage import nf4_layout

    torch.manual_seed(0)
    w = torch.randn(48, 40)  # 1920 values: 30 blocks of 64
    pb, sb = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4",
                                compress_statistics=double_quant)
    torch._dynamo.reset()
    step = torch.compile(lambda w: nf4_quantize(w, 64, double_quant, impl="ref"),
                         backend="aot_eager", fullgraph=True)
    packed, state = step(w)
    assert torch.equal(packed, pb) and torch.equal(state.absmax, sb.absmax)
    if double_quant:
        assert torch.equal(state.nested_absmax, sb.state2.absmax)
        assert float(state.offset) == sb.offset.item()
        assert json.loads(state.quant_state_json())["nested_offset"] == sb.offset.item()
        layout = nf4_layout(NF4Weight(packed, state))  # Python values only: no tensor
        assert type(layout.offset) is float and layout.offset == sb.offset.item()
    assert torch.equal(nf4_dequantize(packed, state), bnbf.dequantize_4bit(pb, sb))
    if double_quant:  # bnb: NaN weights; traced, the overflow check is an assert
        with pytest.raises(RuntimeError, match="double_quant=False"):
            step(w.clamp(-3, 3) * 1e38)
    w[3, 5] = float("nan")
    with pytest.raises(RuntimeError, match="inf or NaN"):
        step(w)


@pytest.mark.parametrize("kw", [dict(causal=True), dict(causal=False, window=3, softcap=2.0)],
                         ids=["causal", "window_softcap"])
def test_varlen_flash_attention_compiles_with_fullgraph(kw):
    """Packed documents (cu_seqlens) under torch.compile(fullgraph=True), as a compiled training
    step on packed batches holds them: the cu_seqlens check and the reference's per-document
    split read cu_seqlens on the host ("Could not guard on data-dependent expression"). Same
    output and gradients as eager, which stays the per-document split; bad offsets still fail.
    Oracle: SDPA on each document alone."""
    torch.manual_seed(0)
    lens = [4, 0, 7, 1]
    q, k, v = _leaves((12, 4, 8), (12, 2, 8), (12, 2, 8))
    cu = torch.tensor([0, 4, 4, 11, 12], dtype=torch.int32)
    torch._dynamo.reset()
    step = torch.compile(lambda q, k, v, cu: flash_attention(q, k, v, cu_seqlens=cu, **kw),
                         backend="aot_eager", fullgraph=True)
    out = step(q, k, v, cu)
    grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    want = flash_attention(q, k, v, cu_seqlens=cu, **kw)
    assert torch.allclose(out, want, atol=1e-5)
    want_grads = torch.autograd.grad(want, (q, k, v), torch.ones_like(want))
    for g, r in zip(grads, want_grads, strict=True):
        assert torch.allclose(g, r, atol=1e-5)
    if not kw.get("softcap"):
        doc = q[4:11].detach()[None].transpose(1, 2)
        kd, vd = (t[4:11].detach()[None].transpose(1, 2) for t in (k, v))
        sdpa = F.scaled_dot_product_attention(doc, kd, vd, is_causal=True, enable_gqa=True)
        assert torch.allclose(out[4:11], sdpa[0].transpose(0, 1), atol=1e-5)
    assert sum(lens) == q.shape[0]
    with pytest.raises(RuntimeError, match="cu_seqlens"):
        step(q, k, v, torch.tensor([0, 4, 3, 11, 12], dtype=torch.int32))


def test_varlen_flash_attention_on_fake_tensors_asks_for_max_seqlen():
    """Shape inference (FakeTensorMode, as torch.compile runs an op) of a packed call: the
    reference path needs no host read now; the Triton path needs max_seqlen (its grid size) and
    says so, where it failed reading cu_seqlens (or, past that, with a TypeError on None)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q, k, v = torch.randn(12, 4, 8), torch.randn(12, 2, 8), torch.randn(12, 2, 8)
        cu = torch.tensor([0, 4, 12], dtype=torch.int32)
        assert flash_attention(q, k, v, cu_seqlens=cu, impl="ref").shape == q.shape
        with pytest.raises(ValueError, match="pass max_seqlen"):
            flash_attention(q, k, v, cu_seqlens=cu, impl="triton")
