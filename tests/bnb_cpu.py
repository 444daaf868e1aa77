"""bitsandbytes as a test oracle on CPU hosts where its native CPU kernels are wrong.

bitsandbytes 0.50's native CPU kernels (``libbitsandbytes_cpu``) disagree with its own
``quantize_4bit`` and its reference (pure PyTorch) kernels on some AVX512 hosts (seen on an AMD EPYC
with AVX512-BF16: ``dequantize_4bit`` of a (64, 96) normal matrix off by 2.0 instead of 0.45; with
blocksize != 64 block k takes block k-1's absmax; ``Linear4bit``'s AVX512-BF16 weight repacking
fails on tiny shapes), while on the AVX2 hosts CI ran on before they agree. The CUDA kernels, which
users' checkpoints come from, match the reference. So the oracle tests use the reference kernels
wherever the native ones disagree with them (and the portable ``Linear4bit`` layout);
``install()`` says what it replaced (the pytest header shows it).
"""

from __future__ import annotations

import logging

import torch


def _reference_kernels():
    from bitsandbytes.backends.default.ops import (
        _dequantize_4bit_compute,
        _dequantize_blockwise_compute,
    )
    from bitsandbytes.backends.utils import _get_4bit_code

    # bitsandbytes wraps them in torch.compile (an inductor build per new shape: seconds each);
    # the eager functions compute the same
    _dequantize_4bit_compute = getattr(_dequantize_4bit_compute, "__wrapped__",
                                       _dequantize_4bit_compute)
    _dequantize_blockwise_compute = getattr(_dequantize_blockwise_compute, "__wrapped__",
                                            _dequantize_blockwise_compute)

    def dequantize_4bit(A, absmax, blocksize, quant_type, shape, dtype):
        A = A if A.dtype == torch.uint8 else A.view(torch.uint8)
        code = _get_4bit_code(quant_type, A.device)
        return _dequantize_4bit_compute(A.reshape(-1), absmax, code, blocksize, shape, dtype)

    def dequantize_blockwise(A, absmax, code, blocksize, dtype):
        return _dequantize_blockwise_compute(A, absmax, code, blocksize, dtype)

    def gemv_4bit(A, B, shapeB, absmax, code, blocksize):
        quant_type = "fp4" if code[1] > 0 else "nf4"
        w = torch.ops.bitsandbytes.dequantize_4bit.default(B, absmax, blocksize, quant_type,
                                                           shapeB, A.dtype)
        return torch.nn.functional.linear(A, w)

    return {"dequantize_4bit": dequantize_4bit, "dequantize_blockwise": dequantize_blockwise,
            "gemv_4bit": gemv_4bit}


def _disagrees(name: str, ref) -> bool:
    ops = torch.ops.bitsandbytes
    g = torch.Generator().manual_seed(0)
    code = torch.linspace(-1, 1, 256)
    # rows shorter than a block (96) and longer (384); blocksize 64 and 128
    for shape in ((64, 96), (16, 384)):
        w = torch.randn(*shape, generator=g)
        for blocksize in (64, 128):
            if name == "dequantize_blockwise":
                q, absmax = ops.quantize_blockwise(w.reshape(-1), code, blocksize)
                args = (q, absmax, code, blocksize, torch.float32)
            else:
                q, absmax = ops.quantize_4bit(w, blocksize, "nf4", torch.uint8)
                args = (q, absmax, blocksize, "nf4", list(shape), torch.float32)
            if name == "gemv_4bit":
                from bitsandbytes.functional import get_4bit_type

                x = torch.randn(1, shape[1], generator=g)
                args = (x, q, list(shape), absmax, get_4bit_type("nf4", device="cpu"), blocksize)
            # the reference's own rounding: a matmul may sum in another order
            if not torch.allclose(getattr(ops, name).default(*args), ref(*args), rtol=1e-5,
                                  atol=1e-5):
                return True
    return False


def install() -> list[str]:
    """Replace the CPU kernels of bitsandbytes that disagree with its reference kernels; returns
    their names (empty: bitsandbytes is missing, or its native kernels are right here)."""
    quiet = logging.getLogger("bitsandbytes")
    level = quiet.level
    # its import warns that the optional `kernels` package (an AVX512-BF16 gemm) is missing
    quiet.setLevel(logging.ERROR)
    try:
        import bitsandbytes  # noqa: F401
    except Exception:
        return []
    finally:
        quiet.setLevel(level)
    replaced = []
    for name, ref in _reference_kernels().items():
        try:
            bad = _disagrees(name, ref)
        except (RuntimeError, NotImplementedError):
            continue
        if bad:
            import warnings

            with warnings.catch_warnings():  # torch warns that a kernel is overridden
                warnings.simplefilter("ignore")
                torch.library.register_kernel(f"bitsandbytes::{name}", "cpu", ref)
            replaced.append(name)
    from bitsandbytes.nn import modules

    if getattr(modules, "has_avx512bf16", lambda: False)():
        # Linear4bit repacks its weight for an AVX512-BF16 CPU kernel in eval mode; that repacking
        # asserts rows % its block (e.g. "shape '[64, 1]' is invalid for input of size 96" on a
        # tiny model): the oracle keeps bitsandbytes' portable layout, as on any other CPU
        modules.has_avx512bf16 = lambda: False
        replaced.append("Linear4bit AVX512-BF16 repacking")
    return replaced
