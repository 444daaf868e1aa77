"""The fused few-row NF4 matmuls (``gemv`` on CUDA cores, ``fused`` on tensor cores) against the
dequantize-then-matmul reference under the numerics rule, and the choice between them and
dequant + cuBLAS (timed once per shape, forced by EMBER_NF4_MATMUL)."""

from __future__ import annotations

import pytest
import torch

from ember.kernels import nf4_matmul
from ember.kernels.nf4 import NF4Weight, nf4_linear, nf4_linear_ref
from ember.kernels.nf4_matmul import applies, choose, fused_mm, fused_mm_ref
from tests.numerics import assert_close_to_ref


def _case(m, n, k, blocksize=64, bias=True, double_quant=True):
    wq = NF4Weight.quantize(torch.randn(n, k) * 0.05, blocksize, double_quant)
    return wq, torch.randn(m, k), torch.randn(n) if bias else None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("path,m,n,k,split,blocksize,double_quant", [
    ("fused", 5, 40, 192, 1, 64, True),     # N not a multiple of the 32-column tile
    ("fused", 16, 96, 768, 3, 64, False),   # K split in 3 slices summed in fp32
    ("fused", 1, 33, 256, 2, 128, True),
    ("gemv", 1, 37, 320, 1, 64, True),      # K not a multiple of the 256 tile, bias fused
    ("gemv", 3, 20, 768, 2, 64, False),     # 3 rows padded to 4, K split
    ("gemv", 2, 9, 512, 1, 256, True),      # blocksize = the K tile
])
def test_fused_kernels_match_reference(poisoned, path, m, n, k, split, blocksize, double_quant,
                                       dtype):
    wq, x32, b32 = _case(m, n, k, blocksize, double_quant=double_quant)
    x, b = x32.to(dtype), b32.to(dtype)
    assert applies(path, m, wq, dtype)
    out = fused_mm(x, wq, b, path, split=split)
    assert out.dtype == dtype and out.shape == (m, n)
    assert_close_to_ref(f"nf4_{path}", out, fused_mm_ref(x, wq, b),
                        fused_mm_ref(x32, wq, b32))


@pytest.mark.parametrize("path", ["fused", "gemv", "dequant"])
@pytest.mark.parametrize("double_quant", [True, False])
def test_strided_state_bias_and_packed(poisoned, path, double_quant):
    """The kernels index absmax, the codes, the bias and the packed bytes as dense vectors:
    strided views of them (a state or bias sliced out of a wider buffer) were read wrongly."""
    import dataclasses

    wq, x, b = _case(2, 40, 128, double_quant=double_quant)
    st = wq.state

    def strided(t):  # same values, every other element of a buffer twice the size
        return torch.stack([t, torch.zeros_like(t)], -1).flatten()[::2].view(t.shape)

    kw = dict(absmax=strided(st.absmax), code=strided(st.code))
    if double_quant:
        kw.update(nested_absmax=strided(st.nested_absmax), nested_code=strided(st.nested_code))
    packed = torch.stack([wq.packed, torch.zeros_like(wq.packed)], -1).flatten(1)[:, ::2]
    ws = NF4Weight(packed, dataclasses.replace(st, **kw))
    bs = strided(b)
    assert not (bs.is_contiguous() or ws.packed.is_contiguous() or ws.state.absmax.is_contiguous())
    if path == "dequant":  # more than 16 rows: dequantize + matmul
        out = nf4_linear(x.repeat(10, 1), ws, bs, impl="triton")[:2]
    else:
        out = fused_mm(x, ws, bs, path)
    ref = fused_mm_ref(x, wq, b)
    assert_close_to_ref(f"nf4_{path}", out, ref, ref)


def test_bf16_gemv_within_one_ulp_of_reference():
    """The interpreter cannot do bf16 arithmetic, but the gemv kernel upcasts right after its
    loads, so bf16 inputs give the fp32 result rounded once."""
    wq, x32, _ = _case(2, 24, 256)
    x = x32.bfloat16()
    out = fused_mm(x, wq, None, "gemv")
    ref = x.float() @ wq.dequantize(torch.float32).t()
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, rtol=2 ** -7, atol=1e-3)


def test_which_paths_apply():
    wq = NF4Weight.quantize(torch.randn(8, 128))
    assert [p for p in nf4_matmul.PATHS if applies(p, 1, wq, torch.float16)] == [
        "dequant", "fused", "gemv"]
    assert [p for p in nf4_matmul.PATHS if applies(p, 8, wq, torch.float16)] == [
        "dequant", "fused"]
    assert [p for p in nf4_matmul.PATHS if applies(p, 17, wq, torch.float16)] == ["dequant"]
    odd = NF4Weight.quantize(torch.randn(8, 100))  # K not a multiple of the 64-value block
    assert [p for p in nf4_matmul.PATHS if applies(p, 1, odd, torch.float16)] == ["dequant"]
    big = NF4Weight.quantize(torch.randn(4, 512), blocksize=512)  # block larger than the K tile
    assert not applies("fused", 1, big, torch.float16) and not applies("gemv", 1, big,
                                                                       torch.float16)


def test_choice_is_the_fastest_timed_once_per_shape(monkeypatch):
    monkeypatch.setattr(nf4_matmul, "_CHOICE", {})
    monkeypatch.delenv("EMBER_NF4_MATMUL", raising=False)
    wq, x, _ = _case(2, 16, 128, bias=False)
    speed = {"dequant": 3.0, "fused": 2.0, "gemv": 1.0}
    ran, timed = [], []

    def run(path):
        ran.append(path)
        return torch.zeros(())

    def timer(fn):
        fn()
        timed.append(ran[-1])
        return speed[ran[-1]]

    assert choose(x, wq, run, timer=timer) == "gemv"
    assert sorted(timed) == ["dequant", "fused", "gemv"]
    speed["gemv"] = 9.0  # remembered: not timed again for the same shape
    assert choose(x, wq, run, timer=timer) == "gemv" and len(timed) == 3
    x8 = torch.randn(8, 128)  # another row count is another shape: gemv does not apply
    assert choose(x8, wq, run, timer=timer) == "fused"
    assert timed[3:] == ["dequant", "fused"]
    assert choose(torch.randn(40, 128), wq, run, timer=timer) == "dequant"  # nothing to time
    assert len(timed) == 5


def test_choice_forced_by_environment(monkeypatch):
    wq, x, _ = _case(2, 16, 128, bias=False)

    def timer(fn):
        raise AssertionError("a forced path is not timed")

    for path in nf4_matmul.PATHS:
        monkeypatch.setenv("EMBER_NF4_MATMUL", path)
        assert choose(x, wq, lambda p: None, timer=timer) == path
    monkeypatch.setenv("EMBER_NF4_MATMUL", "gemv")  # where it cannot apply: dequant + matmul
    assert choose(torch.randn(9, 128), wq, lambda p: None, timer=timer) == "dequant"
    monkeypatch.setenv("EMBER_NF4_MATMUL", "fast")
    with pytest.raises(ValueError, match="EMBER_NF4_MATMUL must be one of auto, dequant"):
        choose(x, wq, lambda p: None, timer=timer)


@pytest.mark.parametrize("path", nf4_matmul.PATHS)
def test_nf4_linear_takes_the_forced_path(monkeypatch, path):
    """nf4_linear's forward goes through the chosen kernel (each gives the reference's output);
    the launchers are spied so that a path silently not taken fails."""
    monkeypatch.setenv("EMBER_NF4_MATMUL", path)
    taken = []
    real = nf4_matmul.fused_mm
    monkeypatch.setattr("ember.kernels.nf4.fused_mm",
                        lambda *a, **kw: taken.append(a[3]) or real(*a, **kw))
    wq, x, b = _case(3, 24, 256)
    y = nf4_linear(x.view(1, 3, -1), wq, b, impl="triton")
    assert taken == ([] if path == "dequant" else [path])
    torch.testing.assert_close(y[0], nf4_linear_ref(x, wq, b), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------ GPU
@pytest.mark.gpu
@pytest.mark.parametrize("path,m", [("gemv", 1), ("gemv", 4), ("fused", 1), ("fused", 16)])
@pytest.mark.parametrize("n,k", [(4096, 4096), (1000, 4160)])
def test_gpu_fused_paths_bf16(path, m, n, k):
    wq = NF4Weight.quantize(torch.randn(n, k, device="cuda") * 0.02)
    x32, b32 = torch.randn(m, k, device="cuda"), torch.randn(n, device="cuda")
    x, b = x32.bfloat16(), b32.bfloat16()
    assert_close_to_ref(f"nf4_{path}", fused_mm(x, wq, b, path), fused_mm_ref(x, wq, b),
                        fused_mm_ref(x32, wq, b32))


def test_choice_is_not_timed_while_compiling(monkeypatch):
    """A compiled decode step (nf4_linear on <= 16 CUDA rows) timed the paths with CUDA events
    and a synchronize inside the traced code: a graph break (an error under fullgraph=True),
    timing fake tensors. While dynamo traces, the remembered choice is used, else the untimed
    default (gemv where it applies)."""
    monkeypatch.setattr(nf4_matmul, "_CHOICE", {})
    monkeypatch.delenv("EMBER_NF4_MATMUL", raising=False)
    wq, x, _ = _case(2, 16, 128, bias=False)
    speed = {"dequant": 1.0, "fused": 2.0, "gemv": 3.0}

    def timer(fn):
        if torch.compiler.is_compiling():
            torch._dynamo.graph_break()  # as torch.cuda.Event / synchronize are
        return speed[fn.args[0]]

    def step(x):  # the path's name length stands in for the path (dynamo returns tensors)
        return x * len(choose(x, wq, lambda p: None, timer=timer))

    torch._dynamo.reset()
    assert torch.equal(torch.compile(step, backend="eager", fullgraph=True)(x), x * 4)  # gemv
    assert choose(x, wq, lambda p: None, timer=timer) == "dequant"  # timed eagerly
    torch._dynamo.reset()
    assert torch.equal(torch.compile(step, backend="eager", fullgraph=True)(x), x * 7)
