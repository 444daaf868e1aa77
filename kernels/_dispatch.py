"""Choosing between a kernel's Triton implementation and its PyTorch reference.

Every public op takes ``impl=None | "triton" | "ref"``:

- ``None`` (default): Triton for CUDA tensors, the reference otherwise. The environment variable
  ``EMBER_KERNELS=ref`` forces the reference everywhere (debugging), ``EMBER_KERNELS=triton`` forces
  Triton everywhere (with ``TRITON_INTERPRET=1`` this runs the kernels on CPU, slowly).
- ``"triton"``: Triton; on CPU tensors only under ``TRITON_INTERPRET=1`` (the test rig).
- ``"ref"``: the pure-PyTorch reference.
"""

from __future__ import annotations

import contextlib
import os

import torch
from torch._subclasses.fake_tensor import is_fake

_IMPLS = (None, "triton", "ref")
_AUTOCAST_FROM = (torch.float32, torch.float16, torch.bfloat16)


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(t: torch.Tensor, impl: str | None, op: str) -> bool:
    """Decide the implementation for op on tensor t; raises a clear error for impossible asks."""
    if impl not in _IMPLS:
        raise ValueError(f"{op}: impl must be one of None, 'triton', 'ref'; got {impl!r}")
    if impl is None:
        impl = os.environ.get("EMBER_KERNELS") or None
        if impl not in _IMPLS:
            raise ValueError(f"EMBER_KERNELS must be 'triton' or 'ref', got {impl!r}")
    if impl == "ref":
        return False
    if impl == "triton":
        if not (t.is_cuda or (t.device.type == "cpu" and interpreting())):
            raise ValueError(
                f"{op}: impl='triton' needs CUDA tensors (got {t.device}); set TRITON_INTERPRET=1 "
                "before importing triton to run the kernels on CPU, or use impl='ref'"
            )
        return True
    return t.is_cuda


def device_guard(t: torch.Tensor):
    """Context making t's CUDA device the current one (a no-op for other devices). Triton
    launches every kernel on the current device, so tensors on cuda:1 while cuda:0 is current
    (a single-process run with device "cuda:1") failed with "Pointer argument cannot be accessed
    from Triton". Public ops enter it around their Triton path, called as
    ``_dispatch.device_guard`` (tests replace it to see that they do). Backward passes need none:
    autograd runs them on a thread whose current device is the gradients' device."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def check_tensors(op: str, **tensors) -> None:
    """Each named argument must be a torch.Tensor (callers check optional ones only when given):
    a list, NumPy array or None used to fail deep inside with an AttributeError."""
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")


def check_dtype(op: str, name: str, t: torch.Tensor, allowed=(torch.float32, torch.float16,
                                                               torch.bfloat16)) -> None:
    if t.dtype not in allowed:
        names = ", ".join(str(d).replace("torch.", "") for d in allowed)
        raise ValueError(f"{op}: {name} has dtype {t.dtype}; supported: {names}")


def autocast_dtype(t: torch.Tensor) -> torch.dtype | None:
    """The dtype ``torch.autocast`` runs matmuls in on t's device, or None when it is off there.

    The hand-written autograd.Functions are opaque to autocast: under ``torch.autocast("cpu",
    torch.bfloat16)`` fp32 inputs reached them as fp32, so the LoRA Functions mixed bf16 and fp32
    operands and crashed, flash attention answered in fp32 where SDPA answers in bf16, and the
    chunked cross-entropy recomputed its logits in fp32 in backward (autocast is off there) against
    a forward lse of bf16 logits. Ops built on matmuls cast their floating inputs to this dtype, as
    autocast casts ``F.linear`` / SDPA inputs, and run with autocast off (``no_autocast``)."""
    if not isinstance(t, torch.Tensor):  # the op's own checks report it
        return None
    dev = t.device.type
    if not _autocast_available(dev) or not torch.is_autocast_enabled(dev):
        return None
    return torch.get_autocast_dtype(dev)


def no_autocast(t: torch.Tensor):
    """Context turning autocast off on t's device (a no-op where autocast does not exist)."""
    if not _autocast_available(t.device.type):
        return contextlib.nullcontext()
    return torch.autocast(t.device.type, enabled=False)


# Device types a compiled graph runs on that have autocast (torch.amp.is_autocast_available).
_COMPILED_AUTOCAST = ("cpu", "cuda", "xpu", "mps", "hpu")


def _autocast_available(device_type: str) -> bool:
    """torch.amp.is_autocast_available, except while dynamo traces: torch 2.11's dynamo (the GPU
    machine's) cannot trace it ("function marked as skipped"), which made every public op fail
    under torch.compile(fullgraph=True) there; 2.13's can. While tracing, the device types that
    have autocast in both versions answer True (meta and the rest: False, as torch says)."""
    if torch.compiler.is_compiling():
        return device_type in _COMPILED_AUTOCAST
    return torch.amp.is_autocast_available(device_type)


def cast_floats(dtype: torch.dtype | None, *tensors):
    """tensors with each fp32/fp16/bf16 tensor cast to dtype (others, and None, unchanged, as
    autocast leaves fp64 alone); all unchanged when dtype is None."""
    if dtype is None:
        return tensors
    return tuple(t.to(dtype) if isinstance(t, torch.Tensor) and t.dtype in _AUTOCAST_FROM else t
                 for t in tensors)


def no_host_values(t: torch.Tensor) -> bool:
    """t has no values to read on the host: a meta or fake tensor (shape inference, as
    ``FakeTensorMode`` and ``torch.compile`` run an op), or one being traced by dynamo, where a
    host read is a graph break (an error under ``fullgraph=True``). Input checks on values then
    use ``torch._assert_async``, as they do on CUDA."""
    return torch.compiler.is_compiling() or t.is_meta or is_fake(t)


@contextlib.contextmanager
def one_cpu_thread(device: torch.device):
    """One torch thread on a CPU, for results that must not change in their last bits with the
    thread count (torch splits a large CPU reduction, an SVD or a QR across threads): a run
    resumed under torchrun (one thread per process) is checked against the bytes it began with."""
    if device.type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
