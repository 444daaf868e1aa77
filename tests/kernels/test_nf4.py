"""NF4 against bitsandbytes (the oracle, on CPU): our quantization equals bnb's byte for byte
(packed codes, absmax, nested absmax, offset, maps), and bnb-quantized tensors dequantize
bit-identically with ours, reference and Triton (interpreter); then nf4_linear against its
reference under the numerics rule (the fused few-row kernels: test_nf4_matmul.py)."""

from __future__ import annotations

import pytest
import torch

from ember.kernels.lora import lora_linear
from ember.kernels.nf4 import (
    NF4State,
    NF4Weight,
    dynamic_map,
    nf4_dequantize,
    nf4_dequantize_ref,
    nf4_linear,
    nf4_linear_ref,
    nf4_quantize,
)
from tests.numerics import assert_close_to_ref, grads

bnbf = pytest.importorskip("bitsandbytes.functional")

IMPLS = ("ref", "triton")


def _bnb(w, double_quant, blocksize=64):
    return bnbf.quantize_4bit(w, blocksize=blocksize, quant_type="nf4",
                              compress_statistics=double_quant)


def _assert_same_as_bnb(packed, state: NF4State, pb, sb):
    assert torch.equal(packed, pb), "packed codes differ from bitsandbytes"
    assert torch.equal(state.absmax, sb.absmax)
    assert torch.equal(state.code, sb.code)
    assert state.shape == sb.shape and state.dtype == sb.dtype
    assert state.blocksize == sb.blocksize
    assert state.nested == sb.nested
    if sb.nested:
        assert torch.equal(state.nested_absmax, sb.state2.absmax)
        assert torch.equal(state.nested_code, sb.state2.code)
        assert state.offset == sb.offset.item()
        assert state.nested_blocksize == sb.state2.blocksize


def test_dynamic_map_is_bnbs():
    assert torch.equal(dynamic_map(), bnbf.create_dynamic_map())


# (shape, dtype, blocksize): tail blocks (numel % blocksize), odd numel (a pad nibble), 1-D, and a
# weight long enough for two nested blocks of 256 absmax values.
CASES = [
    ((130, 70), torch.float32, 64),
    ((33, 7), torch.bfloat16, 64),
    ((96, 200), torch.float32, 64),
    ((5, 41), torch.float16, 128),
    ((1001,), torch.float32, 32),
    ((48, 64), torch.bfloat16, 256),
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("shape,dtype,blocksize", CASES)
def test_quantize_matches_bnb_byte_for_byte(shape, dtype, blocksize, double_quant, impl):
    w = (torch.randn(shape) * torch.rand(shape[0], *([1] * (len(shape) - 1))) * 3).to(dtype)
    pb, sb = _bnb(w, double_quant, blocksize)
    packed, state = nf4_quantize(w, blocksize, double_quant, impl=impl)
    _assert_same_as_bnb(packed, state, pb, sb)


@pytest.mark.parametrize("impl", IMPLS)
def test_quantize_edge_blocks_match_bnb(impl):
    """All-zero blocks, a constant tensor (all absmax equal: the nested block is all zero), huge
    and tiny magnitudes, exact ties at +-absmax."""
    w = torch.randn(40, 96)
    w[3] = 0.0
    w[7, :64] = 0.0
    w[9] *= 1e30
    w[11] *= 1e-30
    w[13] = torch.linspace(-2, 2, 96)
    for t in (w, torch.full((8, 64), 0.37), torch.zeros(64, 2)):
        for dq in (True, False):
            pb, sb = _bnb(t, dq)
            packed, state = nf4_quantize(t, 64, dq, impl=impl)
            _assert_same_as_bnb(packed, state, pb, sb)
            assert torch.equal(nf4_dequantize(packed, state, impl=impl).view(-1),
                               bnbf.dequantize_4bit(pb, sb).view(-1))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("shape,dtype,blocksize", CASES)
def test_dequantize_bit_identical_to_bnb(poisoned, shape, dtype, blocksize, double_quant, impl):
    """bnb quantizes; we dequantize bnb's own state in its dtype (bnb returns 1-D as (1, n))."""
    w = torch.randn(shape).to(dtype)
    pb, sb = _bnb(w, double_quant, blocksize)
    state = NF4State(sb.absmax, sb.shape, sb.dtype, sb.blocksize, sb.code,
                     sb.offset.item() if sb.nested else None,
                     sb.state2.absmax if sb.nested else None,
                     sb.state2.code if sb.nested else None)
    out = nf4_dequantize(pb, state, impl=impl)
    ref = bnbf.dequantize_4bit(pb, sb)
    assert out.dtype == dtype and out.shape == shape
    assert torch.equal(out.view(-1), ref.view(-1))


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_triton_dequantize_equals_reference_in_every_dtype(poisoned, out_dtype):
    """One fp32 product rounded once (RNE): the kernel's hand-rounded bf16 included."""
    w = NF4Weight.quantize(torch.randn(72, 136) * 5)
    ref = nf4_dequantize_ref(w.packed, w.state, out_dtype)
    assert torch.equal(w.dequantize(out_dtype, impl="triton"), ref)
    assert torch.equal(ref, nf4_dequantize_ref(w.packed, w.state).to(out_dtype))


def test_nf4_weight_object():
    w = torch.randn(24, 64)
    q = NF4Weight.quantize(w, 64, True, impl="ref")
    assert q.shape == w.shape and q.dtype == w.dtype and q.numel() == w.numel()
    assert q.device == w.device and q.to("cpu").shape == w.shape
    assert "NF4Weight(shape=(24, 64)" in repr(q)
    err = (q.dequantize() - w).abs().max() / w.abs().max()
    assert 0 < err < 0.2  # 4-bit: coarse but close


def test_bad_inputs_raise_clear_errors():
    w = torch.randn(8, 64)
    with pytest.raises(ValueError, match="blocksize"):
        nf4_quantize(w, 48)
    with pytest.raises(ValueError, match="dtype"):
        nf4_quantize(w.to(torch.int32))
    packed, state = nf4_quantize(w)
    with pytest.raises(ValueError, match="ceil"):
        nf4_dequantize(packed[:-1], state)
    with pytest.raises(ValueError, match="dtype"):
        nf4_dequantize(packed, state, torch.int8)
    with pytest.raises(ValueError, match="does not match"):
        nf4_linear(torch.randn(3, 32), NF4Weight(packed, state))
    # A bias that is not (out,): the fused few-row kernels read past its end (silently wrong
    # outputs), the dequant path broadcast-failed inside addmm.
    for m in (3, 40):
        for impl in ("triton", "ref"):
            with pytest.raises(ValueError, match="bias must be \\(8,\\)"):
                nf4_linear(torch.randn(m, 64), NF4Weight(packed, state), torch.randn(7),
                           impl=impl)


def _linear_case(m, n, k, dtype, bias, blocksize=64):
    wq = NF4Weight.quantize(torch.randn(n, k) * 0.05, blocksize)
    x32 = torch.randn(m, k)
    b32 = torch.randn(n) if bias else None
    return wq, x32, b32


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("m", [3, 7, 37])  # gemv, fused tensor-core, dequant + matmul
def test_nf4_linear_forward_and_grads(m, dtype):
    wq, x32, b32 = _linear_case(m, 48, 128, dtype, True)
    dy32 = torch.randn(m, 48)

    def run(x, b, dy, impl):
        x, b = x.detach().requires_grad_(), b.detach().requires_grad_()
        y = nf4_linear(x.view(1, m, -1), wq, b, impl=impl)
        return (y, *grads(y, (x, b), dy.view(1, m, -1)))

    out = run(x32.to(dtype), b32.to(dtype), dy32.to(dtype), "triton")
    lowp = run(x32.to(dtype), b32.to(dtype), dy32.to(dtype), "ref")
    ref32 = run(x32, b32, dy32, "ref")
    for name, o, r, g in zip(("y", "dx", "dbias"), out, lowp, ref32, strict=True):
        assert_close_to_ref(f"nf4_linear.{name}", o, r, g)


# ------------------------------------------------------------------------------------------ GPU
@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(4096, 4096), (14336, 4096), (1000, 333)])
def test_gpu_quantize_dequantize_exact(shape):
    w = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
    p_ref, s_ref = nf4_quantize(w, impl="ref")
    p, s = nf4_quantize(w, impl="triton")
    assert torch.equal(p, p_ref) and torch.equal(s.absmax, s_ref.absmax)
    assert torch.equal(s.nested_absmax, s_ref.nested_absmax) and s.offset == s_ref.offset
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        assert torch.equal(nf4_dequantize(p, s, dtype, impl="triton"),
                           nf4_dequantize_ref(p, s, dtype))
    if shape == (1000, 333):  # bitsandbytes' CPU quantizer agrees with ours on the GPU (without
        # double quant: its offset is a torch mean, whose last bit depends on the device)
        pb, sb = _bnb(w.cpu(), False)
        p, s = nf4_quantize(w, double_quant=False, impl="triton")
        assert torch.equal(p.cpu(), pb) and torch.equal(s.absmax.cpu(), sb.absmax)


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 8, 16, 100])
@pytest.mark.parametrize("n,k", [(4096, 4096), (14336, 4096), (4096, 14336)])
def test_gpu_nf4_linear_bf16(m, n, k):
    wq = NF4Weight.quantize(torch.randn(n, k, device="cuda") * 0.02)
    x32 = torch.randn(m, k, device="cuda")
    b32 = torch.randn(n, device="cuda")
    x, b = x32.bfloat16(), b32.bfloat16()
    assert_close_to_ref("nf4_linear", nf4_linear(x, wq, b), nf4_linear_ref(x, wq, b),
                        nf4_linear_ref(x32, wq, b32))


@pytest.mark.parametrize("impl", IMPLS)
def test_non_finite_and_overflowing_weights_raise_subnormal_match_bnb(impl):
    """inf / NaN weights have no code (bnb writes garbage; we crashed with an IndexError deep in
    the double quantization): a clear error. Finite weights near fp32's max overflow the double
    quantization's absmax mean (bnb returns NaN weights): a clear error naming the way out, and
    double_quant=False still matches bnb. Subnormal weights (1 / absmax2 = inf, zeros become
    NaN) match bnb's nested codes instead of crashing."""
    for bad in (float("inf"), float("-inf"), float("nan")):
        w = torch.randn(4, 64)
        w[1, 3] = bad
        # bnb: the bad value's block dequantizes to inf/NaN, with double quantization (an inf/NaN
        # offset) every block does: no usable weight, so Ember refuses.
        assert torch.isfinite(bnbf.dequantize_4bit(*_bnb(w, False))).sum() == 3 * 64
        assert not torch.isfinite(bnbf.dequantize_4bit(*_bnb(w, True))).any()
        for double_quant in (False, True):
            with pytest.raises(ValueError, match="inf or NaN"):
                nf4_quantize(w, 64, double_quant, impl=impl)
    huge = torch.randn(4, 64).clamp(-3, 3) * 1e38
    pb, sb = _bnb(huge, True)
    assert not torch.isfinite(bnbf.dequantize_4bit(pb, sb)).all()  # bnb's silent NaNs
    with pytest.raises(ValueError, match="double_quant=False"):
        nf4_quantize(huge, 64, True, impl=impl)
    packed, state = nf4_quantize(huge, 64, False, impl=impl)
    _assert_same_as_bnb(packed, state, *_bnb(huge, False))
    tiny = torch.randn(8, 64) * 1e-40
    packed, state = nf4_quantize(tiny, 64, True, impl=impl)
    _assert_same_as_bnb(packed, state, *_bnb(tiny, True))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("double_quant", [True, False])
def test_bnb_quant_state_is_accepted_where_a_state_is_expected(impl, double_quant):
    """bnb's own QuantState, its as_dict() and as_dict(packed=True) (the form a checkpoint holds),
    and bnb-packed bytes stored as bf16 (``quant_storage``) dequantize bit for bit like bnb; they
    used to fail with an AttributeError ('QuantState' object has no attribute 'numel')."""
    w = torch.randn(3, 5, 41).half()  # 3-D, odd numel, a partial last block
    pb, sb = _bnb(w, double_quant)
    ref = bnbf.dequantize_4bit(pb, sb)
    for state in (sb, sb.as_dict(), sb.as_dict(packed=True)):
        out = nf4_dequantize(pb, state, impl=impl)
        assert out.dtype == torch.float16 and torch.equal(out, ref)
        assert torch.equal(NF4Weight(pb, state).dequantize(impl=impl), ref)
    p16, s16 = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4",
                                  compress_statistics=double_quant, quant_storage=torch.bfloat16)
    assert torch.equal(nf4_dequantize(p16, s16, impl=impl), bnbf.dequantize_4bit(p16, s16))
    with pytest.raises(ValueError, match="NF4State .* or a bitsandbytes QuantState"):
        nf4_dequantize(pb, [sb.absmax, sb.code], impl=impl)
    with pytest.raises(ValueError, match="absmax"):  # too few blocks: read past absmax's end
        nf4_dequantize(pb, {**sb.as_dict(), "absmax": sb.absmax[:-1]}, impl=impl)


@pytest.mark.parametrize("impl", IMPLS)
def test_bnb_linear4bit_weight_works_in_nf4_linear_and_lora_linear(impl):
    """A bnb ``Linear4bit.weight`` (Params4bit: packed bytes + quant_state) is an NF4 weight:
    nf4_linear equals bnb's own Linear4bit forward, and lora_linear takes it as its base (it
    used to be read as a dense (n/2, 1) tensor: 'x (2, 64) does not match weight (256, 1)')."""
    bnb = pytest.importorskip("bitsandbytes")
    lin = bnb.nn.Linear4bit(64, 8, bias=True, quant_type="nf4", compute_dtype=torch.float32)
    lin.weight = bnb.nn.Params4bit(torch.randn(8, 64), requires_grad=False, quant_type="nf4")
    lin = lin.to("cpu")
    x = torch.randn(2, 3, 64)
    with torch.no_grad():
        want = lin(x)
    got = nf4_linear(x, lin.weight, lin.bias, impl=impl)
    assert got.shape == want.shape
    assert_close_to_ref("nf4_linear", got, want, want)
    A, B = torch.randn(4, 64), torch.randn(8, 4)
    want = want + 0.5 * (x @ A.t()) @ B.t()
    assert_close_to_ref("lora_linear", lora_linear(x, lin.weight, A, B, 0.5, lin.bias, impl=impl),
                        want, want)


def test_double_quant_offset_is_the_same_at_any_cpu_thread_count():
    """The offset (mean of the block absmax) of a weight with more than 32K blocks: torch splits
    that CPU reduction across threads and its fp32 last bits followed the thread count (a 16.7M
    weight: 0.0500207059 on 1 thread, 0.0500207096 on 2), so a QLoRA run resumed under torchrun
    (one thread per process) met other 8-bit codes. One thread, as bnb on one thread."""
    from ember.kernels.nf4 import _quantize_absmax

    absmax = torch.rand(262144, generator=torch.Generator().manual_seed(0)) * 0.1
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        want = absmax.mean().item()
        got = []
        for threads in (1, 2, 4):
            torch.set_num_threads(threads)
            got.append(_quantize_absmax(absmax)[2])
            assert torch.get_num_threads() == threads  # given back
    finally:
        torch.set_num_threads(before)
    assert got == [want] * 3
