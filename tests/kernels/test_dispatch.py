"""Dispatch rules shared by every op: each public op launches its Triton kernels with the input's
CUDA device made current (``_dispatch.device_guard``). Triton launches on the current device, so
without it a single-process run on "cuda:1" failed with "Pointer argument cannot be accessed from
Triton". Checked on CPU by counting the interpreter's launches outside the guard, and on a machine
with two GPUs for real."""

from __future__ import annotations

import contextlib

import pytest
import torch
from triton.runtime.interpreter import InterpretedFunction

from ember.kernels import (
    NF4Weight,
    _dispatch,
    adamw8bit_step,
    apply_rope,
    flash_attention,
    geglu,
    linear_cross_entropy,
    lora_linear,
    lora_mlp,
    nf4_dequantize,
    nf4_linear,
    nf4_quantize,
    rms_norm,
    swiglu,
)
from ember.kernels.swiglu import glu_backward_


def _ops(device):
    """name -> a call of the public op's Triton path on small inputs (forward only: backward runs
    on autograd's thread for the gradients' device)."""
    r = lambda *s: torch.randn(*s, device=device)  # noqa: E731
    w = NF4Weight.quantize(r(24, 64), impl="ref")
    ang = r(1, 5, 4)
    u8 = lambda n: torch.zeros(n, dtype=torch.uint8, device=device)  # noqa: E731
    return {
        "rms_norm": lambda: rms_norm(r(3, 40), r(40), impl="triton"),
        "apply_rope": lambda: apply_rope(r(1, 5, 2, 8), r(1, 5, 1, 8), ang.cos(), ang.sin(),
                                         impl="triton"),
        "swiglu": lambda: swiglu(r(3, 10), r(3, 10), impl="triton"),
        "geglu": lambda: geglu(r(3, 10), r(3, 10), impl="triton"),
        "glu_backward_": lambda: glu_backward_(r(3, 10), r(3, 10), r(3, 10), gelu=False,
                                               impl="triton"),
        "flash_attention": lambda: flash_attention(r(1, 5, 2, 16), r(1, 5, 1, 16),
                                                   r(1, 5, 1, 16), impl="triton"),
        "linear_cross_entropy": lambda: linear_cross_entropy(
            r(4, 16), r(30, 16), torch.tensor([1, 2, -100, 29], device=device), impl="triton"),
        "nf4_quantize": lambda: nf4_quantize(r(8, 64), impl="triton"),
        "nf4_dequantize": lambda: nf4_dequantize(w.packed, w.state, impl="triton"),
        "nf4_linear": lambda: nf4_linear(r(2, 64), w, impl="triton"),
        "lora_linear": lambda: lora_linear(r(2, 64), w, r(4, 64), r(24, 4), 0.5, impl="triton"),
        "lora_mlp": lambda: lora_mlp(r(2, 64), (w, w, r(64, 24)), (r(4, 64), r(4, 64), r(4, 24)),
                                     (r(24, 4), r(24, 4), r(64, 4)), 0.5, impl="triton"),
        "adamw8bit_step": lambda: adamw8bit_step(r(300), r(300), u8(300), u8(300),
                                                 torch.ones(2, device=device),
                                                 torch.ones(2, device=device), step=1, lr=1e-3,
                                                 impl="triton"),
    }


@pytest.mark.parametrize("op", list(_ops("cpu")))
def test_every_launch_happens_under_the_device_guard(op, monkeypatch):
    depth, devices, outside, launches = [0], [], [], [0]

    @contextlib.contextmanager
    def guard(t):
        devices.append(t.device)
        depth[0] += 1
        try:
            yield
        finally:
            depth[0] -= 1

    run = InterpretedFunction.run

    def counted_run(self, *args, **kwargs):
        launches[0] += 1
        if depth[0] == 0:
            outside.append(self.fn.__name__)
        return run(self, *args, **kwargs)

    call = _ops("cpu")[op]  # built before patching: NF4 weights come from the reference
    monkeypatch.setattr(_dispatch, "device_guard", guard)
    monkeypatch.setattr(InterpretedFunction, "run", counted_run)
    with torch.no_grad():
        call()
    assert launches[0], f"{op}: no Triton kernel ran, the test checks nothing"
    assert not outside, f"{op}: kernels {outside} launched outside _dispatch.device_guard"
    assert devices and all(d == torch.device("cpu") for d in devices), devices


def test_device_guard_is_a_no_op_off_cuda():
    with _dispatch.device_guard(torch.zeros(1)):
        pass


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
@pytest.mark.parametrize("op", list(_ops("cpu")))
def test_gpu_ops_on_the_second_gpu(op):
    torch.cuda.set_device(0)
    _ops("cuda:1")[op]()
    torch.cuda.synchronize(1)


def test_autocast_checks_trace_where_dynamo_cannot_call_is_autocast_available(monkeypatch):
    """torch 2.11's dynamo (the GPU machine's) cannot trace torch.amp.is_autocast_available
    ("Attempted to call function marked as skipped"; 2.13's can), and every public op asks it
    (autocast_dtype, no_autocast): under torch.compile(fullgraph=True) each op failed there, e.g.
    test_contexts.py's compiled linear_cross_entropy. Simulated here with a replacement dynamo
    cannot trace either; the op must still compile, with autocast honoured."""
    import torch.nn.functional as F

    from ember.kernels import linear_cross_entropy

    real = torch.amp.is_autocast_available

    def untraceable(device_type):
        torch._dynamo.graph_break()
        return real(device_type)

    monkeypatch.setattr(torch.amp, "is_autocast_available", untraceable)
    h, w = torch.randn(6, 16), torch.randn(50, 16)
    y = torch.randint(0, 50, (6,))
    torch._dynamo.reset()
    step = torch.compile(lambda h: linear_cross_entropy(h, w, y), backend="aot_eager",
                         fullgraph=True)
    assert torch.allclose(step(h), F.cross_entropy(h @ w.t(), y), atol=1e-5)
    with torch.autocast("cpu", torch.bfloat16):
        got = step(h)
        want = F.cross_entropy(F.linear(h, w), y)
    assert torch.allclose(got, want, atol=1e-6)
