"""The public kernels as another tool calls them: arguments our own model never passes (a softmax
scale <= 0, 0-d tensor hyperparameters, non-bool flags, lists where tensors go). Each must give
the oracle's answer (plain PyTorch written from the op's math, bitsandbytes' float arithmetic) or
a ValueError naming the argument, never a silently different result or an error from deep inside
(an InterpreterError, an AttributeError)."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

import ember.kernels as K


def _attention_oracle(q, k, v, scale):
    """Causal attention in fp64 with an explicit mask, from the math (B, T, H, D)."""
    qd, kd, vd = (t.double().transpose(1, 2) for t in (q, k, v))
    s = qd @ kd.transpose(-1, -2) * scale
    t = s.shape[-1]
    keep = torch.ones(t, t, dtype=torch.bool).tril()
    p = torch.softmax(s.masked_fill(~keep, float("-inf")), dim=-1)
    return (p @ vd).transpose(1, 2)


@pytest.mark.parametrize("impl", ["ref", "triton"])
@pytest.mark.parametrize("scale", [0.0, -0.5])
def test_causal_attention_with_a_non_positive_scale_matches_the_math(impl, scale):
    """softmax_scale <= 0 is finite and allowed (a uniform average at 0); torch's CPU flash SDPA
    kernel, the reference's fast path, answered NaN for every row before the last under
    is_causal (its masked -inf times the scale); the math and the Triton path are finite."""
    q, k, v = (torch.randn(1, 5, 2, 8) for _ in range(3))
    out = K.flash_attention(q, k, v, softmax_scale=scale, impl=impl)
    want = _attention_oracle(q, k, v, scale)
    assert torch.isfinite(out).all(), f"{impl}: NaN/inf rows for softmax_scale={scale}"
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)
    # packed documents take the same per-document path
    cu = torch.tensor([0, 2, 5], dtype=torch.int32)
    packed = K.flash_attention(q[0], k[0], v[0], cu_seqlens=cu, softmax_scale=scale, impl=impl)
    want = torch.cat(
        [
            _attention_oracle(t[None, a:b], u[None, a:b], w[None, a:b], scale)[0]
            for a, b in ((0, 2), (2, 5))
            for t, u, w in [(q[0], k[0], v[0])]
        ]
    )
    torch.testing.assert_close(packed.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", ["ref", "triton"])
@pytest.mark.parametrize("causal", [None, "no", 2])
def test_attention_causal_must_be_a_bool(impl, causal):
    """causal="no" was bool("no") = True on the Triton path (silently causal) and a TypeError from
    inside SDPA on the reference."""
    q = torch.randn(1, 4, 2, 8)
    with pytest.raises(ValueError, match="causal must be"):
        K.flash_attention(q, q, q, causal=causal, impl=impl)


@pytest.mark.parametrize("impl", ["ref", "triton"])
def test_attention_on_two_devices_is_a_value_error(impl):
    q = torch.randn(1, 4, 2, 8)
    k = torch.randn(1, 4, 2, 8, device="meta")
    with pytest.raises(ValueError, match="same device"):
        K.flash_attention(q, k, k, impl=impl)


def _adamw_tensors(n=300, seed=0):
    g = torch.Generator().manual_seed(seed)
    nb = -(-n // 256)
    return [
        torch.randn(n, generator=g),
        torch.randn(n, generator=g),
        torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g),
        torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g),
        torch.rand(nb, generator=g),
        torch.rand(nb, generator=g) * 1e-2,
    ]


@pytest.mark.parametrize("impl", ["ref", "triton"])
@pytest.mark.parametrize("name", ["lr", "beta1", "beta2", "eps", "weight_decay", "step"])
def test_adamw8bit_takes_zero_dim_tensor_hyperparameters_as_floats(impl, name):
    """torch.optim keeps ``step`` (and may keep ``lr``) as 0-d tensors. The Triton launcher
    passed them to the kernel as pointers (an InterpreterError; on a GPU, a compile error), and
    the reference did the bias corrections in fp32 instead of bitsandbytes' Python floats."""
    hp = dict(step=3, lr=1e-3, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1)
    value = torch.tensor(hp[name])  # fp32 (int64 for step): the oracle takes its value
    got, want = _adamw_tensors(), _adamw_tensors()
    K.adamw8bit_step(*got, **{**hp, name: value}, impl=impl)
    # the same op with the Python number (the reference equals bitsandbytes bit for bit there,
    # test_adamw8bit.py; the kernel may differ from it in a parameter's last bit)
    K.adamw8bit_step(*want, **{**hp, name: value.item()}, impl=impl)
    for a, b, what in zip(
        got, want, ("p", "grad", "state1", "state2", "absmax1", "absmax2"), strict=True
    ):
        assert torch.equal(a, b), f"{what} differs with a tensor {name}"


@pytest.mark.parametrize("impl", ["ref", "triton"])
def test_adamw8bit_refuses_bad_hyperparameters(impl):
    ts = _adamw_tensors()
    for kw, match in (
        (dict(weight_decay=math.nan), "weight_decay"),
        (dict(lr=torch.ones(2)), "lr"),
        (dict(step=True), "step"),
    ):
        with pytest.raises(ValueError, match=match):
            K.adamw8bit_step(*ts, **{**dict(step=1, lr=1e-3), **kw}, impl=impl)


@pytest.mark.parametrize("impl", ["ref", "triton"])
def test_non_tensor_optional_arguments_are_named(impl):
    """Lists where an optional tensor goes: a ValueError naming it, not an AttributeError."""
    x, w, a, b = torch.randn(3, 64), torch.randn(5, 64), torch.randn(2, 64), torch.randn(5, 2)
    nf4 = K.NF4Weight.quantize(w)
    calls = [
        ("lora_x", lambda: K.lora_linear(x, w, a, b, 1.0, lora_x=[1.0] * 64, impl=impl)),
        ("bias 0", lambda: K.lora_linear(x, w, a, b, 1.0, [0.0] * 5, impl=impl)),
        ("bias", lambda: K.nf4_linear(x, nf4, [0.0] * 5, impl=impl)),
        ("scale", lambda: K.lora_linear(x, w, a, b, None, impl=impl)),
    ]
    for name, call in calls:
        with pytest.raises(ValueError, match=name):
            call()


@pytest.mark.parametrize("impl", ["ref", "triton"])
def test_nf4_blocksize_is_an_integer(impl):
    """64.0 passed ``in BLOCKSIZES`` and crashed in torch.empty; a 0-d tensor crashed the Triton
    launcher and, on the reference, ended up as a tensor in the state (and its JSON). An integer
    tensor is read as its value, as bitsandbytes' int arguments would be."""
    w = torch.randn(8, 64)
    with pytest.raises(ValueError, match="blocksize"):
        K.nf4_quantize(w, 64.0, impl=impl)
    packed, state = K.nf4_quantize(w, torch.tensor(64), impl=impl)
    want_packed, want_state = K.nf4_quantize(w, 64, impl=impl)
    assert type(state.blocksize) is int and state.blocksize == 64
    assert torch.equal(packed, want_packed) and torch.equal(state.absmax, want_state.absmax)


@pytest.mark.parametrize("impl", ["ref", "triton"])
def test_attention_document_ids_and_offsets_are_checked(impl):
    """v shaped unlike k under seq_idx failed in a reshape ("shape '[6, 2, 8]' is invalid"); a
    meta/fake seq_idx (shape inference) in its host read ("Cannot copy out of meta tensor");
    bool cu_seqlens ([False, True]) were taken as the offsets [0, 1]."""
    q = torch.randn(1, 6, 2, 8)
    ids = torch.zeros(1, 6, dtype=torch.long)
    with pytest.raises(ValueError, match="seq_idx"):
        K.flash_attention(q, q, torch.randn(1, 5, 2, 8), seq_idx=ids, impl=impl)
    with pytest.raises(ValueError, match="cu_seqlens and max_seqlen"):
        K.flash_attention(q, q, q, seq_idx=ids.to("meta"), impl=impl)
    with pytest.raises(ValueError, match="cu_seqlens must be"):
        K.flash_attention(
            q[0, :2], q[0, :2], q[0, :2], cu_seqlens=torch.tensor([False, True]), impl=impl
        )


@pytest.mark.parametrize("impl", ["ref", "triton"])
def test_attention_under_autocast_takes_mixed_dtypes_as_sdpa_does(impl):
    """Under torch.autocast SDPA takes an fp32 q with bf16 k/v (it casts all three), as Ember's
    other matmul ops do; flash_attention refused them ("dtypes differ") before casting."""
    q = torch.randn(1, 5, 2, 16, requires_grad=True)
    k, v = (torch.randn(1, 5, 2, 16, dtype=torch.bfloat16) for _ in range(2))
    with torch.autocast("cpu", torch.bfloat16):
        out = K.flash_attention(q, k, v, impl=impl)
        want = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
        ).transpose(1, 2)
    assert out.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), want.float(), rtol=2e-2, atol=2e-2)
    out.float().sum().backward()
    assert q.grad is not None and q.grad.dtype == torch.float32


@pytest.mark.parametrize("impl", ["ref", "triton"])
@pytest.mark.parametrize("double_quant", [False, True])
def test_nf4_state_with_column_shaped_absmax_dequantizes_as_flat(impl, double_quant):
    """absmax stored (blocks, 1) (a checkpoint's column vector; likewise the code and the nested
    tensors) holds the same values as (blocks,): the Triton path read them flat, the reference
    broadcast absmax to (blocks, blocks, blocksize) and returned a wrong weight (max error 1.5)."""
    w = torch.randn(8, 64)
    packed, state = K.nf4_quantize(w, 64, double_quant)
    want = K.nf4_dequantize(packed, state, impl=impl)
    col = {"absmax": state.absmax.reshape(-1, 1), "code": state.code.reshape(-1, 1)}
    if double_quant:
        col["nested_absmax"] = state.nested_absmax.reshape(-1, 1)
        col["nested_code"] = state.nested_code.reshape(-1, 1)
    got = K.nf4_dequantize(packed, dataclasses.replace(state, **col), impl=impl)
    assert torch.equal(got, want)
    x = torch.randn(3, 64)
    y = K.nf4_linear(x, K.NF4Weight(packed, dataclasses.replace(state, **col)), impl=impl)
    assert torch.equal(y, K.nf4_linear(x, K.NF4Weight(packed, state), impl=impl))


@pytest.mark.parametrize("impl", ["ref", "triton"])
def test_lora_scale_takes_any_zero_d_number(impl):
    """A NumPy scalar or 0-d array as scale (a config value read through NumPy) worked before the
    argument checks and then raised "scale must be one number or 1 numbers"; it is one number,
    as a Python float or a 0-d tensor is. Bools, strings and None stay refused."""
    x, w, a, b = torch.randn(3, 64), torch.randn(5, 64), torch.randn(2, 64), torch.randn(5, 2)
    want = K.lora_linear(x, w, a, b, 0.5, impl=impl)
    for scale in (np.float32(0.5), np.array(0.5), np.float64(0.5), torch.tensor(0.5)):
        assert torch.equal(K.lora_linear(x, w, a, b, scale, impl=impl), want), repr(scale)
    for scale in (True, np.bool_(True), "0.5", None, np.array([0.5, 0.5])):
        with pytest.raises(ValueError, match=r"scale must be one number, got"):
            K.lora_linear(x, w, a, b, scale, impl=impl)
