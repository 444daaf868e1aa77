"""Flash attention Triton kernels vs flash_attention_ref: output and dq, dk, dv under the shared
numerics rule, for every option alone and combined, odd lengths, GQA 1/4/8, packed documents and
S != T; the CPU cases run in the interpreter (small shapes), the CUDA cases at real sizes."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

from ember.kernels.attention import _attend_ref, _fwd, flash_attention, flash_attention_ref
from tests.numerics import assert_close_to_ref, grads, poisoned_allocations


def _run(q, k, v, do, impl, **kw):
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    with poisoned_allocations() if impl == "triton" else contextlib.nullcontext():
        out = flash_attention(q, k, v, impl=impl, **kw)
        return (out, *grads(out, (q, k, v), do))


def _check(q, k, v, **kw):
    """Kernel vs the reference in q.dtype and in fp32, for out, dq, dk, dv."""
    do = torch.randn(q.shape, device=q.device).to(q.dtype)
    out = _run(q, k, v, do, "triton", **kw)
    lowp = _run(q, k, v, do, "ref", **kw)
    ref32 = _run(q.float(), k.float(), v.float(), do.float(), "ref", **kw)
    for name, o, r, g in zip(("out", "dq", "dk", "dv"), out, lowp, ref32, strict=True):
        assert o.dtype == q.dtype, f"{name}: dtype {o.dtype} != {q.dtype}"
        assert_close_to_ref(name, o, r, g)


def _qkv(b, t, s, hq, hkv, d, dtype=torch.float32, device="cpu"):
    q = torch.randn(b, t, hq, d, device=device).to(dtype)
    k = torch.randn(b, s, hkv, d, device=device).to(dtype)
    v = torch.randn(b, s, hkv, d, device=device).to(dtype)
    return q, k, v


# (B, T, S, Hq, Hkv, D, options): each option alone, then combined. The interpreter runs these with
# BLOCK_M=32/BLOCK_N=16 (fwd, dq) and 16/32 (dk/dv), so T=37..129 crosses several masked and
# unmasked blocks.
CASES = {
    "causal": (1, 129, 129, 1, 1, 64, dict(causal=True)),
    "noncausal": (2, 37, 37, 2, 2, 64, dict(causal=False)),
    "gqa4": (1, 37, 37, 4, 1, 64, dict(causal=True)),
    "gqa8": (1, 21, 21, 8, 1, 32, dict(causal=True)),
    "hd80": (1, 37, 37, 2, 1, 80, dict(causal=True)),
    "scale": (1, 37, 37, 2, 2, 64, dict(causal=False, softmax_scale=0.3)),
    "window": (1, 70, 70, 2, 1, 64, dict(causal=True, window=21)),
    "window_noncausal": (1, 70, 70, 1, 1, 64, dict(causal=False, window=9)),
    "softcap": (1, 37, 37, 2, 1, 64, dict(causal=True, softcap=4.0)),
    "softcap_noncausal": (1, 37, 37, 1, 1, 64, dict(causal=False, softcap=2.0)),
    "kv_longer": (1, 19, 53, 2, 1, 64, dict(causal=True)),  # prefill after a cache
    "kv_longer_window": (1, 19, 53, 2, 1, 64, dict(causal=True, window=25)),
    "kv_shorter": (1, 40, 23, 1, 1, 64, dict(causal=True)),  # first rows see no key
    "combined": (1, 70, 70, 4, 1, 80, dict(causal=True, window=33, softcap=3.0,
                                           softmax_scale=0.2)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_padded(case):
    b, t, s, hq, hkv, d, kw = CASES[case]
    _check(*_qkv(b, t, s, hq, hkv, d), **kw)


def test_fp16_combined():
    _check(*_qkv(1, 45, 45, 4, 2, 64, torch.float16), causal=True, window=30, softcap=5.0)


def _packed(lengths, hq, hkv, d, dtype=torch.float32, device="cpu"):
    total = sum(lengths)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32,
                      device=device)
    q = torch.randn(total, hq, d, device=device).to(dtype)
    k = torch.randn(total, hkv, d, device=device).to(dtype)
    v = torch.randn(total, hkv, d, device=device).to(dtype)
    return q, k, v, cu


@pytest.mark.parametrize("kw", [dict(causal=True), dict(causal=True, window=7, softcap=3.0),
                                dict(causal=False)], ids=["causal", "window_softcap", "noncausal"])
def test_varlen(kw):
    # Documents of different lengths, one empty, one of a single token, one crossing blocks.
    q, k, v, cu = _packed([5, 37, 0, 1, 16, 24], 2, 1, 64)
    _check(q, k, v, cu_seqlens=cu, **kw)


def test_varlen_strided_cu_seqlens(poisoned):
    # cu_seqlens as a strided view: the kernels read it as a dense vector, so it used to give
    # [0, 3, 3] here (tokens 3..8 never written) or read out of bounds.
    q, k, v, _ = _packed([3, 5], 2, 1, 16)
    cu = torch.tensor([0, 3, 3, 8, 8], dtype=torch.int32)[::2]
    _check(q, k, v, cu_seqlens=cu, causal=True)


def test_int32_offset_limit(monkeypatch):
    """Token offsets inside a sequence are int32 in the kernels: a sequence whose q/k/v (or out)
    would address past 2^31 elements is refused instead of wrapping around (meta tensors: only
    shapes and strides, no memory)."""
    from ember.kernels.attention import _check_int32_offsets

    def t(shape, **kw):
        return torch.empty(shape, device="meta", **kw)

    d = 128
    ok = t((1, 131072, 32, d))  # 2^29 elements: fine
    _check_int32_offsets(ok, ok, ok, None, None)
    q = t((1, 600_000, 32, d))  # Llama-70B-like width at 600K tokens: 2.5e9 > 2^31
    kv = t((1, 600_000, 8, d))
    with pytest.raises(ValueError, match="int32 in-sequence offsets"):
        _check_int32_offsets(q, kv, kv, None, None)
    # q as a view of a fused qkv projection: its token stride is (32 + 2 * 8) * d
    fused = t((1, 400_000, 48, d))
    q, k, v = fused[:, :, :32], fused[:, :, 32:40], fused[:, :, 40:]
    with pytest.raises(ValueError, match="q spans 400000 tokens x 6144"):
        _check_int32_offsets(q, k, v, None, None)
    packed = t((400_000, 48, d))  # varlen: the longest document is what counts
    qp, kp, vp = packed[:, :32], packed[:, 32:40], packed[:, 40:]
    _check_int32_offsets(qp, kp, vp, torch.zeros(3, dtype=torch.int32), 8192)
    with pytest.raises(ValueError, match="int32"):
        _check_int32_offsets(qp, kp, vp, torch.zeros(2, dtype=torch.int32), 400_000)
    # and flash_attention runs it before launching the kernels
    import ember.kernels.attention as attention

    def refuse(*args):
        raise ValueError("int32 check ran")

    monkeypatch.setattr(attention, "_check_int32_offsets", refuse)
    with pytest.raises(ValueError, match="int32 check ran"):
        flash_attention(*_qkv(1, 4, 4, 2, 1, 16), impl="triton")


def test_varlen_documents_are_independent():
    """Changing one document's tokens must not change another document's output."""
    q, k, v, cu = _packed([9, 20, 13], 2, 1, 64)
    out = flash_attention(q, k, v, cu_seqlens=cu, max_seqlen=20, impl="triton")
    k2, v2 = k.clone(), v.clone()
    k2[9:29], v2[9:29] = torch.randn_like(k2[9:29]), torch.randn_like(v2[9:29])
    out2 = flash_attention(q, k2, v2, cu_seqlens=cu, max_seqlen=20, impl="triton")
    torch.testing.assert_close(out2[:9], out[:9], rtol=0, atol=0)
    torch.testing.assert_close(out2[29:], out[29:], rtol=0, atol=0)
    assert not torch.allclose(out2[9:29], out[9:29])


def test_strided_inputs_and_expanded_grad():
    """q/k/v as views of one fused projection (non-contiguous), a strided head dim, and the
    stride-0 upstream gradient of .sum()."""
    b, t, h, d = 1, 33, 2, 64
    fused = torch.randn(b, t, 3 * h * d, requires_grad=True)
    q, k, v = fused.view(b, t, 3, h, d).unbind(2)
    assert not q.is_contiguous()
    out = flash_attention(q, k, v, causal=True, impl="triton")
    (g,) = grads(out.sum(), (fused,), torch.ones(()))
    out_ref = flash_attention_ref(q, k, v, causal=True)
    (g_ref,) = grads(out_ref.sum(), (fused,), torch.ones(()))
    assert_close_to_ref("out", out, out_ref, out_ref)
    assert_close_to_ref("dfused", g, g_ref, g_ref)
    wide = torch.randn(b, t, h, 2 * d)[..., ::2]  # stride 2 on head_dim: copied on purpose
    out = flash_attention(wide, wide, wide, causal=False, impl="triton")
    ref = flash_attention_ref(wide, wide, wide, causal=False)
    assert_close_to_ref("out_strided_d", out, ref, ref)


@pytest.mark.parametrize("causal", [True, False])
def test_window_longer_than_every_sequence(causal):
    # window + key index overflowed int32 in the block ranges: wrong out (non-causal) and dk.
    _check(*_qkv(1, 9, 13, 2, 1, 16), causal=causal, window=2**31 - 1)
    q, k, v, cu = _packed([5, 11], 2, 1, 16)
    _check(q, k, v, cu_seqlens=cu, causal=causal, window=2**31 - 1)


@pytest.mark.parametrize("impl", ["ref", "triton"])
def test_max_seqlen_as_a_tensor_or_float(impl):
    """flash-attn callers pass max_seqlen as ``lens.max()``, a 0-d tensor: the Triton path crashed
    inside the launcher (int64) or refused with a bogus int32-overflow error (int32), and a float
    8.0 failed with a TypeError. Oracle: SDPA per document in fp64 (GQA 2:1, causal)."""
    q, k, v, cu = _packed([3, 8, 5], 4, 2, 16)
    lens = cu[1:] - cu[:-1]
    bounds = cu.tolist()
    want = torch.cat([F.scaled_dot_product_attention(
        *(t[a:b].double().transpose(0, 1) for t in (q, k, v)), is_causal=True,
        enable_gqa=True).transpose(0, 1) for a, b in zip(bounds[:-1], bounds[1:], strict=True)])
    for ms in (lens.max(), lens.max().long(), 8.0, 9, torch.tensor([8])):
        out = flash_attention(q, k, v, cu_seqlens=cu, max_seqlen=ms, impl=impl)
        torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)
    for bad, match in ((7, "shorter than the longest"), (8.5, "integer >= 1"), (0, ">= 1"),
                       (torch.tensor([8, 8]), "one-element"), (torch.tensor(8.0), "one-element")):
        with pytest.raises(ValueError, match=match):
            flash_attention(q, k, v, cu_seqlens=cu, max_seqlen=bad, impl=impl)
    with pytest.raises(ValueError, match="floating point"):
        flash_attention(q.long(), k.long(), v.long(), impl=impl, cu_seqlens=cu)


@pytest.mark.parametrize("impl", ["ref", "triton"])
def test_varlen_without_tokens_is_differentiable(impl):
    """A packed batch with no tokens: like SDPA on a zero-length sequence (the oracle), the empty
    output is part of the graph and every gradient is an empty tensor; backward used to fail
    ("element 0 of tensors does not require grad")."""
    q, k, v = (torch.randn(0, h, 16, requires_grad=True) for h in (4, 2, 2))
    ref = F.scaled_dot_product_attention(*(t[None].transpose(1, 2) for t in (q, k, v)),
                                         is_causal=True, enable_gqa=True)
    want = torch.autograd.grad(ref.sum(), (q, k, v))
    for cu in (torch.tensor([0, 0]), torch.tensor([0, 0, 0], dtype=torch.int32)):
        out = flash_attention(q, k, v, cu_seqlens=cu, impl=impl)
        assert out.shape == q.shape and out.requires_grad
        got = torch.autograd.grad(out.sum(), (q, k, v))
        assert [g.shape for g in got] == [w.shape for w in want]


def test_launch_grids_stay_within_cuda_limits(monkeypatch):
    """CUDA caps grid axes 1 and 2 at 65535 blocks (axis 0 at 2^31 - 1). Batch x heads on one
    axis could not launch for 2048 sequences x 32 heads (65536): the kernels take heads on axis 1
    and the batch on axis 2. Launches are recorded, not run (the interpreter has no limit)."""
    from ember.kernels.attention import _bwd

    grids = []

    class Record:
        def __getitem__(self, grid):
            meta = {"BLOCK_M": 16, "BLOCK_N": 16}
            return lambda *a, **k: grids.append(grid(meta) if callable(grid) else grid)

    for mod, name in ((_fwd, "_FWD_FP32"), (_bwd, "_DKDV_FP32"), (_bwd, "_DQ_FP32")):
        monkeypatch.setattr(mod, name, {d: Record() for d in getattr(mod, name)})
    monkeypatch.setattr(_bwd, "_attn_bwd_preprocess_kernel", Record())
    q, k = torch.randn(2048, 1, 32, 16), torch.randn(2048, 1, 32, 16)
    opts = dict(causal=True, scale=0.25, window=None, softcap=None, cu_seqlens=None,
                max_seqlen=None)
    out, lse = _fwd.attn_fwd(q, k, k, **opts)
    _bwd.attn_bwd(out, q, k, k, out, lse, **opts)
    assert len(grids) == 4
    for grid in grids:
        assert len(grid) <= 3 and max(grid[1:]) <= 65535, grid
        assert torch.tensor(grid).prod() >= 2048 * 32  # one program per (sequence, head) at least
    many = torch.randn(65536, 1, 1, 16)  # past what axis 2 takes: refused before any launch
    with pytest.raises(ValueError, match="at most 65535 sequences"):
        flash_attention(many, many, many, impl="triton")


def test_lse_is_the_log_sum_exp_of_the_scores():
    q, k, v = _qkv(1, 37, 37, 2, 1, 64)
    scale = 0.125
    _, lse = _fwd.attn_fwd(q, k, v, causal=True, scale=scale, window=None, softcap=None,
                           cu_seqlens=None, max_seqlen=None)
    s = torch.einsum("bthd,bshd->bhts", q, k.expand(-1, -1, 2, -1)) * scale
    s = s.masked_fill(torch.ones(37, 37, dtype=torch.bool).triu(1), float("-inf"))
    torch.testing.assert_close(lse, torch.logsumexp(s, -1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", ["ref", "triton"])
def test_nan_in_a_key_reaches_exactly_the_rows_that_see_it(impl):
    """A NaN key (a broken step) makes NaN exactly the rows that attend to it, as SDPA's causal
    path does (rows before it stay finite), so the trainer sees a non-finite loss and skips the
    step; the reference with a window or softcap turned those rows into zeros (nan_to_num).
    Other rows equal the fp64 reference on the clean keys."""
    q, k, v = _qkv(1, 13, 13, 2, 1, 16)
    i, j = torch.arange(13)[:, None], torch.arange(13)[None, :]
    keep = (j <= i) & (i - j < 4)
    want = _attend_ref(q.double(), k.double(), v.double(), True, 0.25, 4, 50.0).float()
    k[0, 5] = float("nan")
    sdpa = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)),
                                          is_causal=True, enable_gqa=True).transpose(1, 2)
    assert sdpa[0, 5:].isnan().all() and not sdpa[0, :5].isnan().any()
    out = flash_attention(q, k, v, causal=True, window=4, softcap=50.0, impl=impl)
    sees = keep[:, 5]  # rows 5..8
    assert out[0, sees].isnan().all()
    torch.testing.assert_close(out[0, ~sees], want[0, ~sees], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("impl", ["ref", "triton"])
@pytest.mark.parametrize("window", [None, 4])
def test_nan_in_a_query_makes_its_own_row_nan(impl, window):
    """A NaN query row gives a NaN output row (SDPA's math backend does; torch's CPU flash
    kernel gives a finite row, which hid a diverged q_proj from the trainer's guard in the
    reference's SDPA shortcut), the other rows unchanged."""
    q, k, v = _qkv(1, 13, 13, 4, 2, 16)
    want = flash_attention_ref(q, k, v, causal=True, window=window)
    q[0, 6, 1, 3] = float("nan")
    out = flash_attention(q, k, v, causal=True, window=window, impl=impl)
    assert out[0, 6, 1].isnan().all()
    rest = torch.ones(13, 4, dtype=torch.bool)
    rest[6, 1] = False
    torch.testing.assert_close(out[0][rest], want[0][rest], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("impl", ["ref", "triton"])
@pytest.mark.parametrize("causal", [True, False])
def test_nan_in_every_key_of_a_head_makes_its_rows_nan(impl, causal):
    """A NaN weight in k_proj puts a NaN in one dim of every key of a kv head: every row of its
    query heads is NaN (SDPA's math backend), the other heads unchanged. torch's CPU flash
    kernel (the reference's SDPA shortcut) returned finite rows for sequences under 16 tokens,
    so a packed batch of short documents gave a finite loss (and evaluation a finite val loss)
    for a diverged model."""
    q, k, v = _qkv(1, 9, 9, 4, 2, 16)
    want = flash_attention_ref(q, k, v, causal=causal)
    k[0, :, 0, 3] = float("nan")
    math_sdpa = _attend_ref(q, k, v, causal, 0.25, None, None)
    assert math_sdpa[0, :, :2].isnan().all()
    out = flash_attention(q, k, v, causal=causal, impl=impl)
    assert out[0, :, :2].isnan().all()
    torch.testing.assert_close(out[0, :, 2:], want[0, :, 2:], rtol=1e-4, atol=1e-4)
    # Varlen (packed documents, the HF backend's unpadded batches): only the poisoned document.
    cu = torch.tensor([0, 4, 9], dtype=torch.int32)
    q, k, v = (t[0] for t in _qkv(1, 9, 9, 4, 2, 16))
    k[4:, 0, 3] = float("nan")
    out = flash_attention(q, k, v, causal=causal, cu_seqlens=cu, max_seqlen=5, impl=impl)
    assert out[4:, :2].isnan().all() and torch.isfinite(out[:4]).all()
    assert torch.isfinite(out[4:, 2:]).all()


@pytest.mark.parametrize("impl", ["ref", "triton"])
@pytest.mark.parametrize("window", [None, 3])
def test_row_whose_scores_are_all_minus_inf_is_nan(impl, window):
    """An inf in q whose every visible score is -inf: softmax over only -inf is NaN (SDPA's
    math backend, ``_attend_ref``); the Triton kernel took l = 0 for a row with no key and
    wrote 0 (and zero gradients). Rows with no key at all (S < T) still give 0."""
    q, k, v = _qkv(1, 5, 5, 2, 1, 16)
    k[0, :3, 0, 3] = -k[0, :3, 0, 3].abs() - 0.1
    q[0, 2, 0, 3] = float("inf")  # row 2 sees keys 0..2: scores -inf
    want = _attend_ref(q, k, v, True, 0.25, window, None)
    assert want[0, 2, 0].isnan().all() and torch.isfinite(want[0, :2]).all()
    q.requires_grad_(True)
    out = flash_attention(q, k, v, causal=True, window=window, impl=impl)
    assert out[0, 2, 0].isnan().all() and torch.isfinite(out[0, :2]).all()
    out.sum().backward()
    assert not torch.isfinite(q.grad).all()
    q, k, v = _qkv(1, 7, 4, 2, 1, 16)  # S < T: rows 0..2 see no key
    out = flash_attention(q, k, v, causal=True, window=window, impl=impl)
    assert (out[0, :3] == 0).all() and torch.isfinite(out).all()


def test_reference_fast_path_matches_explicit_masks():
    """The SDPA shortcut in flash_attention_ref agrees with the explicit-mask oracle."""
    q, k, v = _qkv(2, 29, 29, 4, 2, 16)
    for causal in (True, False):
        fast = flash_attention_ref(q, k, v, causal=causal)
        explicit = _attend_ref(q, k, v, causal, 0.25, None, None)
        torch.testing.assert_close(fast, explicit, rtol=1e-5, atol=1e-5)


def _raises(match, *args, **kw):
    with pytest.raises(ValueError, match=match):
        flash_attention(*args, impl="triton", **kw)


def test_bad_inputs():
    q, k, v = _qkv(1, 8, 8, 4, 2, 16)
    _raises("must be \\(B, T, H, D\\)", q[0], k, v)
    _raises("do not match", q, k[..., :8], v[..., :8])
    _raises("multiple of kv heads", q[:, :, :3], k, v)
    _raises("multiple of kv heads \\(0\\)", q, k[:, :, :0], v[:, :, :0])  # was ZeroDivisionError
    _raises("dtypes differ", q, k.double(), v)
    _raises("head_dim must be >= 1", q[..., :0], k[..., :0], v[..., :0])  # was ZeroDivisionError
    _raises("window must be an integer >= 1", q, k, v, window=0)
    _raises("window must be an integer >= 1", q, k, v, window=2.5)
    _raises("softcap must be > 0", q, k, v, softcap=0.0)
    # These gave an OverflowError (inf), window=1 (True), or NaN outputs without a word.
    _raises("window must be an integer >= 1", q, k, v, window=float("inf"))
    _raises("window must be an integer >= 1", q, k, v, window=True)
    _raises("softcap must be > 0 and finite", q, k, v, softcap=float("nan"))
    _raises("softcap must be > 0 and finite", q, k, v, softcap=float("inf"))
    _raises("softmax_scale must be finite", q, k, v, softmax_scale=float("nan"))
    _raises("supported: float32", q.double(), k.double(), v.double())
    big = torch.randn(1, 4, 1, 288)
    _raises("head_dim <= 256", big, big, big)
    qp, kp, vp = q[0], k[0], v[0]
    _raises("1-D integer tensor", qp, kp, vp, cu_seqlens=torch.tensor([0.0, 8.0]))
    _raises("end at total=8", qp, kp, vp, cu_seqlens=torch.tensor([0, 5], dtype=torch.int32))
    _raises("never decrease", qp, kp, vp, cu_seqlens=torch.tensor([0, 6, 4, 8],
                                                                  dtype=torch.int32))
    _raises("shorter than the longest", qp, kp, vp,
            cu_seqlens=torch.tensor([0, 6, 8], dtype=torch.int32), max_seqlen=4)
    with pytest.raises(ValueError, match="impl must be"):
        flash_attention(q, k, v, impl="cuda")


# ------------------------------------------------------------------------- packing end to end
def _tiny_model(**overrides):
    from ember.models.config import ModelConfig
    from ember.models.transformer import Transformer

    cfg = ModelConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=16, **overrides)
    return Transformer(cfg).init_weights(std=0.2, seed=0).eval()


@pytest.mark.parametrize("impl", ["ref", "triton"])
def test_packing_end_to_end(impl, monkeypatch):
    """A packed batch (B=1, cu_seqlens, restarting positions) gives each document the logits it
    gets alone."""
    monkeypatch.setenv("EMBER_KERNELS", impl)
    model = _tiny_model(sliding_window=6, attn_softcap=20.0)
    lengths = [7, 12, 3]
    docs = [torch.randint(0, 64, (1, n)) for n in lengths]
    ids = torch.cat(docs, dim=1)
    pos = torch.cat([torch.arange(n) for n in lengths])[None]
    cu = torch.tensor([0, 7, 19, 22], dtype=torch.int32)
    with torch.no_grad():
        packed = model(ids, pos, cu_seqlens=cu, max_seqlen=12)[0]
        alone = torch.cat([model(d)[0] for d in docs])
    torch.testing.assert_close(packed, alone, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------------------- GPU
GPU_CASES = [
    (2, 1024, 1024, 16, 16, 128, dict(causal=True)),
    (2, 1000, 1000, 8, 2, 64, dict(causal=False)),
    (1, 777, 777, 8, 1, 80, dict(causal=True, window=256)),
    (1, 1024, 1024, 8, 8, 96, dict(causal=True, softcap=30.0)),
    (1, 513, 513, 8, 4, 256, dict(causal=True, window=100, softcap=20.0)),
    (2, 128, 1100, 8, 2, 128, dict(causal=True)),
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", range(len(GPU_CASES)))
def test_gpu_padded(case, dtype):
    b, t, s, hq, hkv, d, kw = GPU_CASES[case]
    _check(*_qkv(b, t, s, hq, hkv, d, dtype, "cuda"), **kw)


@pytest.mark.gpu
@pytest.mark.parametrize("d", [64, 128, 256])
def test_gpu_varlen(d):
    q, k, v, cu = _packed([1000, 17, 2048, 300, 1], 16, 4, d, torch.bfloat16, "cuda")
    _check(q, k, v, cu_seqlens=cu, max_seqlen=2048, causal=True)
    _check(q, k, v, cu_seqlens=cu, max_seqlen=2048, causal=True, window=128, softcap=30.0)
