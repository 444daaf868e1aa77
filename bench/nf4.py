"""NF4 bench: dequantization GB/s (target >= 85% of copy bandwidth), quantization, and the small-M
NF4 matmul (decode / eval), ember Triton vs the torch reference vs bitsandbytes.

Shapes: Llama-3-8B weights, 4096x4096 (q/o) and 14336x4096 (gate/up; down is the transpose),
blocksize 64 with double quantization, bf16 output. ``python bench/nf4.py [--quick | --smoke]``.
Rows: ``dequant`` (0.5 byte/param + absmax in, 2 bytes/param out), ``quantize`` (bf16 in, codes and
absmax out), ``nf4_linear`` at M = 1, 4 and 16 rows (packed weight read once: bytes = weight + x +
y; the ``bf16_dense`` row is a cuBLAS matmul with the dense bf16 weight, 4x the weight bytes):
``triton`` is what nf4_linear runs (the path it timed fastest for the shape, named in ``extra``),
``triton_<path>`` each path of ember.kernels.nf4_matmul forced.
"""

from __future__ import annotations

import _harness as H
import torch
import torch.nn.functional as F

from ember.kernels.nf4 import (
    NF4Weight,
    nf4_dequantize,
    nf4_dequantize_ref,
    nf4_linear,
    nf4_linear_ref,
    nf4_quantize,
    nf4_quantize_ref,
)
from ember.kernels.nf4_matmul import PATHS, applies, fused_mm, remembered


def _bnb(args):
    """bitsandbytes.functional, on CUDA when its CUDA library loads, on CPU in --smoke."""
    bnbf = H.try_import("bitsandbytes.functional")
    if bnbf is None:
        return None
    try:
        probe = torch.randn(64, 64, device=args.device)
        bnbf.dequantize_4bit(*bnbf.quantize_4bit(probe, quant_type="nf4"))
    except Exception:  # noqa: BLE001 - a bnb build without this device is simply not a peer
        return None
    return bnbf


def _weight_bytes(w: NF4Weight) -> int:
    st = w.state
    extra = st.nested_absmax.numel() * 4 + st.nested_code.numel() * 4 if st.nested else 0
    return w.packed.numel() + st.absmax.numel() * st.absmax.element_size() + extra


def _forced(path: str, x, q):
    if path == "dequant":
        return x @ nf4_dequantize(q.packed, q.state, x.dtype, impl="triton").t()
    return fused_mm(x, q, None, path)


def run_shape(bench: H.Bench, args, n: int, k: int, bnbf) -> None:
    dtype = H.bench_dtype(args)
    w = torch.randn(n, k, device=args.device, dtype=dtype) * 0.02
    q = NF4Weight.quantize(w)
    packed, st = q.packed, q.state
    wb, out_b = _weight_bytes(q), n * k * w.element_size()
    shape = f"{n}x{k} {str(dtype).removeprefix('torch.')}"
    cref = H.compiled(nf4_dequantize_ref)
    bnb = H.try_import("bitsandbytes") if bnbf is not None else None
    pb = sb = None
    if bnbf is not None:
        pb, sb = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    bench.case(
        op="dequant", shape=shape,
        providers={
            "ref": lambda: nf4_dequantize_ref(packed, st, dtype),
            "ref_compiled": lambda: cref(packed, st, dtype),
            "triton": lambda: nf4_dequantize(packed, st, dtype, impl="triton"),
            "bnb": bnbf and (lambda: bnbf.dequantize_4bit(pb, sb)),
        },
        bytes={"fwd": wb + out_b},
    )
    bench.case(
        op="quantize", shape=shape,
        providers={
            "ref": lambda: nf4_quantize_ref(w)[0],
            "triton": lambda: nf4_quantize(w, impl="triton")[0],
            "bnb": bnbf and (lambda: bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4",
                                                        compress_statistics=True)[0]),
        },
        bytes={"fwd": out_b + wb},
    )
    for m in (1, 16) if args.smoke else (1, 4, 16):
        x = torch.randn(m, k, device=args.device, dtype=dtype)
        io = m * (k + n) * x.element_size()  # x in, y out
        forced = {f"triton_{p}": (lambda x=x, p=p: _forced(p, x, q))
                  for p in PATHS if applies(p, m, q, dtype)}
        nf4_linear(x, q, impl="triton")  # times the paths once (on a GPU) and remembers the best
        bench.case(
            op="nf4_linear", shape=f"M={m} {shape}",
            providers={
                "ref": lambda x=x: nf4_linear_ref(x, q),
                "triton": lambda x=x: nf4_linear(x, q, impl="triton"),
                **forced,
                "bnb": bnb and sb is not None and (
                    lambda x=x: bnb.matmul_4bit(x, pb.t(), quant_state=sb)),
                "bf16_dense": lambda x=x: F.linear(x, w),
            },
            bytes={"fwd": wb + io},
            flops={"fwd": 2 * m * n * k},
            extra={"path": remembered(x, q) or "untimed (interpreter)"},
        )


def main() -> None:
    args = H.parse_args(__doc__)
    bench = H.Bench("nf4", args)
    shapes = H.pick(args, full=[(4096, 4096), (14336, 4096)], quick=[(14336, 4096)],
                    smoke=[(72, 192)])
    bnbf = _bnb(args)
    for n, k in shapes:
        run_shape(bench, args, n, k, bnbf)
    bench.finish()


if __name__ == "__main__":
    main()
