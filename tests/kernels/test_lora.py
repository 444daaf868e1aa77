"""Fused LoRA (hand-written autograd over cuBLAS + Triton NF4 dequant) against the unfused
references under the numerics rule, for every output and gradient: lora_linear (dense trainable
or frozen NF4 base, with and without a separate dropout input, small-M fused kernel), lora_qkv and
lora_mlp; plus what backward keeps alive (never the dequantized weight, never h)."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from ember.kernels.lora import (
    lora_linear,
    lora_linear_ref,
    lora_mlp,
    lora_mlp_ref,
    lora_qkv,
    lora_qkv_ref,
)
from ember.kernels.nf4 import NF4Weight
from tests.numerics import assert_close_to_ref, grads

DTYPES = [torch.float32, torch.float16]


def _leaves(ts, dtype, lowp_names):
    """Fresh leaves; tensors named in lowp_names take the test dtype, the rest stay fp32 (LoRA
    adapters train in fp32 over a low-precision base)."""
    return {k: None if v is None else
            v.to(dtype if k in lowp_names else v.dtype).detach().requires_grad_()
            for k, v in ts.items()}


def _compare(name, fn, ref, ts, lowp_names, n_out, dtype):
    """Run fn / ref in dtype and ref in fp32 on the same inputs; compare outputs and grads."""
    outs32 = ref(**_leaves(ts, torch.float32, ()))
    outs32 = outs32 if isinstance(outs32, tuple) else (outs32,)
    dys32 = [torch.randn_like(o) for o in outs32]
    results = []
    for f, dt in ((fn, dtype), (ref, dtype), (ref, torch.float32)):
        leaves = _leaves(ts, dt, lowp_names)
        outs = f(**leaves)
        outs = outs if isinstance(outs, tuple) else (outs,)
        assert len(outs) == n_out
        live = {k: v for k, v in leaves.items() if v is not None}
        dys = [d.to(o.dtype) for d, o in zip(dys32, outs, strict=True)]
        gs = grads(outs, tuple(live.values()), dys)
        results.append({**{f"out{i}": o for i, o in enumerate(outs)},
                        **{f"d_{k}": g for k, g in zip(live, gs, strict=True)}})
    out, lowp, r32 = results
    for key in out:
        assert out[key] is not None, f"{name}: no gradient for {key}"
        assert out[key].dtype == lowp[key].dtype, key
        assert_close_to_ref(f"{name}.{key}", out[key], lowp[key], r32[key])


def _nf4(n, k, device, blocksize=64):
    return NF4Weight.quantize(torch.randn(n, k, device=device) * 0.05, blocksize)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("base", ["nf4", "dense"])
@pytest.mark.parametrize("dropout_input", [False, True])
@pytest.mark.parametrize("m", [37, 6])  # dequant + matmul, and the fused small-M kernel
def test_lora_linear_matches_reference(m, dropout_input, base, dtype):
    n, k, r = 80, 192, 8
    w = _nf4(n, k, "cpu") if base == "nf4" else None
    ts = {"x": torch.randn(2, m, k), "A": torch.randn(r, k) * 0.1, "B": torch.randn(n, r) * 0.1,
          "bias": torch.randn(n), "lora_x": torch.randn(2, m, k) if dropout_input else None,
          "W": torch.randn(n, k) * 0.05 if base == "dense" else None}

    def call(impl):
        def f(x, A, B, bias, lora_x, W):
            return lora_linear(x, w if W is None else W, A, B, 0.75, bias, lora_x=lora_x,
                               impl=impl)
        return f

    def ref(x, A, B, bias, lora_x, W):
        return lora_linear_ref(x, w if W is None else W, A, B, 0.75, bias, lora_x=lora_x)

    _compare("lora_linear", call("triton"), ref, ts, {"x", "bias", "lora_x", "W"}, 1, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_lora_qkv_matches_reference(dtype):
    k, r, outs = 128, 8, (96, 32, 32)
    ws = [_nf4(n, k, "cpu") for n in outs]
    ts = {"x": torch.randn(41, k), "lora_x": torch.randn(41, k),
          **{f"A{i}": torch.randn(r, k) * 0.1 for i in range(3)},
          **{f"B{i}": torch.randn(n, r) * 0.1 for i, n in enumerate(outs)},
          **{f"b{i}": torch.randn(n) for i, n in enumerate(outs)}}
    scales = (0.5, 1.0, 2.0)

    def unpack(kw):
        return ([kw[f"A{i}"] for i in range(3)], [kw[f"B{i}"] for i in range(3)],
                [kw[f"b{i}"] for i in range(3)])

    def fused(x, lora_x, **kw):
        As, Bs, bs = unpack(kw)
        return lora_qkv(x, ws, As, Bs, scales, bs, lora_x=lora_x, impl="triton")

    def ref(x, lora_x, **kw):
        As, Bs, bs = unpack(kw)
        return lora_qkv_ref(x, ws, As, Bs, scales, bs, lora_x=lora_x)

    _compare("lora_qkv", fused, ref, ts, {"x", "lora_x", "b0", "b1", "b2"}, 3, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation,dropout_input", [("silu", False), ("gelu_tanh", True)])
def test_lora_mlp_matches_reference(activation, dropout_input, dtype):
    d, f, r = 64, 96, 8
    ws = [_nf4(f, d, "cpu"), _nf4(f, d, "cpu"), _nf4(d, f, "cpu")]
    ts = {"x": torch.randn(19, d), "lora_x": torch.randn(19, d) if dropout_input else None,
          **{f"A{i}": torch.randn(r, kk) * 0.1 for i, kk in enumerate((d, d, f))},
          **{f"B{i}": torch.randn(n, r) * 0.1 for i, n in enumerate((f, f, d))}}

    def unpack(kw):
        return [kw[f"A{i}"] for i in range(3)], [kw[f"B{i}"] for i in range(3)]

    def fused(x, lora_x, **kw):
        return lora_mlp(x, ws, *unpack(kw), 0.5, lora_x=lora_x, activation=activation,
                        impl="triton")

    def ref(x, lora_x, **kw):
        return lora_mlp_ref(x, ws, *unpack(kw), 0.5, lora_x=lora_x, activation=activation)

    _compare("lora_mlp", fused, ref, ts, {"x", "lora_x"}, 1, dtype)


def _saved_during(fn):
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, saved


def test_backward_saves_only_inputs_and_rank_r_activations():
    m, n, k, r = 20, 96, 64, 8
    w = _nf4(n, k, "cpu")
    x = torch.randn(m, k, requires_grad=True)
    A = torch.randn(r, k, requires_grad=True)
    B = torch.randn(n, r, requires_grad=True)
    y, saved = _saved_during(lambda: lora_linear(x, w, A, B, 1.0, impl="triton"))
    new = [t for t in saved if t.data_ptr() not in {x.data_ptr(), A.data_ptr(), B.data_ptr()}]
    assert [tuple(t.shape) for t in new] == [(m, r)], "only u = x A^T may be added"
    y.sum().backward()
    assert x.grad is not None and A.grad is not None and B.grad is not None

    # The MLP keeps g and up (M, F) but not h: two (M, F) tensors, not three.
    f = 96
    ws = [_nf4(f, k, "cpu"), _nf4(f, k, "cpu"), _nf4(k, f, "cpu")]
    As = [torch.randn(r, kk, requires_grad=True) for kk in (k, k, f)]
    Bs = [torch.randn(nn_, r, requires_grad=True) for nn_ in (f, f, k)]
    out, saved = _saved_during(lambda: lora_mlp(x, ws, As, Bs, 1.0, impl="triton"))
    assert sum(t.numel() == m * f for t in saved) == 2
    assert not any(t.numel() in (f * k,) for t in saved), "a dense weight was saved"
    out.sum().backward()
    # Backward allocates two (M, F) tensors (h recomputed, dh); the activation's gradients
    # overwrite the saved g and up instead of adding two more.
    out = lora_mlp(x, ws, As, Bs, 1.0, impl="triton")
    with _FullSizeAllocations(m * f) as allocs:
        out.sum().backward(retain_graph=True)
    assert allocs.count == 2, allocs.ops
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()  # g and up were consumed: a second backward is refused, not wrong


class _FullSizeAllocations(TorchDispatchMode):
    """Counts new tensors of ``numel`` elements created by ops (views and in-place ops reuse
    storage and are not counted)."""

    def __init__(self, numel: int):
        super().__init__()
        self.numel, self.count, self.ops = numel, 0, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if (isinstance(t, torch.Tensor) and t.numel() == self.numel
                    and t.untyped_storage().data_ptr() not in inputs):
                self.count += 1
                self.ops.append(str(func))
        return out


def test_bad_shapes_raise_clear_errors():
    x = torch.randn(4, 64)
    w = torch.randn(32, 64)
    with pytest.raises(ValueError, match="do not chain"):
        lora_linear(x, w, torch.randn(8, 63), torch.randn(32, 8), 1.0)
    with pytest.raises(ValueError, match="expected"):
        lora_linear(x, torch.randn(32, 65), torch.randn(8, 64), torch.randn(32, 8), 1.0)
    with pytest.raises(ValueError, match="lora_x"):
        lora_linear(x, w, torch.randn(8, 64), torch.randn(32, 8), 1.0, lora_x=torch.randn(4, 3))
    with pytest.raises(ValueError, match="3 entries"):
        lora_qkv(x, (w, w), (torch.randn(8, 64),) * 2, (torch.randn(32, 8),) * 2, 1.0)
    with pytest.raises(ValueError, match="activation"):
        lora_mlp(x, (w, w, torch.randn(64, 32)), (torch.randn(8, 64),) * 2 + (torch.randn(8, 32),),
                 (torch.randn(32, 8),) * 2 + (torch.randn(64, 8),), 1.0, activation="relu")


@pytest.mark.parametrize("impl", ["triton", "ref"])
def test_rank_zero_adapter_is_the_base_linear(impl):
    # The reference reshaped u with reshape(-1, 0), which cannot infer the row count: a rank-0
    # adapter crashed with a RuntimeError on CPU while the Triton path returned the base linear.
    x = torch.randn(2, 3, 64, requires_grad=True)
    w, b = torch.randn(32, 64), torch.randn(32)
    y = lora_linear(x, w, torch.randn(0, 64), torch.randn(32, 0), 2.0, b, impl=impl)
    want = torch.nn.functional.linear(x, w, b)
    torch.testing.assert_close(y, want)
    torch.testing.assert_close(grads(y, (x,), torch.ones_like(y))[0],
                               grads(want, (x,), torch.ones_like(want))[0])


@pytest.mark.parametrize("impl", ["triton", "ref"])
def test_zero_in_features(impl):
    # in_features = 0: the Triton path's reshape(-1, 0) could not infer the row count (a crash);
    # torch's linear of an empty contraction is the bias.
    x = torch.randn(3, 0, requires_grad=True)
    w, A, B, b = torch.randn(5, 0), torch.randn(2, 0), torch.randn(5, 2), torch.randn(5)
    y = lora_linear(x, w, A, B, 2.0, b, impl=impl)
    torch.testing.assert_close(y, torch.nn.functional.linear(x, w, b))
    assert grads(y, (x,), torch.ones_like(y))[0].shape == x.shape


@pytest.mark.parametrize("impl", ["triton", "ref"])
def test_adapter_on_another_device_or_not_float_is_refused(impl):
    # An adapter on another device than x was not checked: a meta A or B gave no error at all
    # (and a garbage output), a bias or lora_x a RuntimeError from inside a matmul.
    x, w, A, B = torch.randn(4, 64), torch.randn(32, 64), torch.randn(8, 64), torch.randn(32, 8)
    bad = {"A": A.to("meta"), "B": B.to("meta"), "bias": torch.randn(32, device="meta"),
           "lora_x": x.to("meta")}
    for name, t in bad.items():
        args = {"A": A, "B": B, "bias": None, "lora_x": None, name: t}
        with pytest.raises(ValueError, match=f"but {name}.* on meta"):
            lora_linear(x, w, args["A"], args["B"], 1.0, args["bias"], lora_x=args["lora_x"],
                        impl=impl)
    with pytest.raises(ValueError, match="A 0 has dtype torch.int64"):
        lora_linear(x, w, A.long(), B, 1.0, impl=impl)
    with pytest.raises(ValueError, match="but B 2 on meta"):
        lora_qkv(x, (w, w, w), (A, A, A), (B, B, B.to("meta")), 1.0, impl=impl)


# ------------------------------------------------------------------------------------------ GPU
@pytest.mark.gpu
@pytest.mark.parametrize("base", ["nf4", "dense"])
@pytest.mark.parametrize("m", [8, 1024])
def test_gpu_lora_linear_bf16(base, m):
    n, k, r = 4096, 4096, 16
    w = _nf4(n, k, "cuda") if base == "nf4" else None
    dense = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
    ts = {"x": torch.randn(m, k, device="cuda"), "A": torch.randn(r, k, device="cuda") * 0.02,
          "B": torch.randn(n, r, device="cuda") * 0.02}

    def fused(x, A, B):
        return lora_linear(x, w if w is not None else dense, A, B, 2.0)

    def ref(x, A, B):
        return lora_linear_ref(x, w if w is not None else dense, A, B, 2.0)

    _compare("lora_linear", fused, ref, ts, {"x"}, 1, torch.bfloat16)


@pytest.mark.gpu
def test_gpu_lora_qkv_and_mlp_bf16():
    d, f, r, m = 2048, 5632, 16, 512
    ts = {"x": torch.randn(m, d, device="cuda"),
          **{f"A{i}": torch.randn(r, kk, device="cuda") * 0.02 for i, kk in enumerate((d, d, f))},
          **{f"B{i}": torch.randn(n, r, device="cuda") * 0.02 for i, n in enumerate((f, f, d))}}
    ws = [_nf4(f, d, "cuda"), _nf4(f, d, "cuda"), _nf4(d, f, "cuda")]

    def unpack(kw):
        return [kw[f"A{i}"] for i in range(3)], [kw[f"B{i}"] for i in range(3)]

    _compare("lora_mlp", lambda x, **kw: lora_mlp(x, ws, *unpack(kw), 2.0),
             lambda x, **kw: lora_mlp_ref(x, ws, *unpack(kw), 2.0), ts, {"x"}, 1,
             torch.bfloat16)
    qkv = [_nf4(d, d, "cuda"), _nf4(256, d, "cuda"), _nf4(256, d, "cuda")]
    ts = {"x": torch.randn(m, d, device="cuda"),
          **{f"A{i}": torch.randn(r, d, device="cuda") * 0.02 for i in range(3)},
          **{f"B{i}": torch.randn(n, r, device="cuda") * 0.02 for i, n in enumerate((d, 256, 256))}}
    _compare("lora_qkv", lambda x, **kw: lora_qkv(x, qkv, *unpack(kw), 2.0),
             lambda x, **kw: lora_qkv_ref(x, qkv, *unpack(kw), 2.0), ts, {"x"}, 3,
             torch.bfloat16)
