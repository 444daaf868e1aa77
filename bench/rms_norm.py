"""RMSNorm fwd/bwd bench: ember Triton vs eager/compiled reference vs Liger.

Shapes: hidden sizes of Llama-3-8B (4096) and Qwen2.5-7B / Gemma-2-9B (3584; Gemma's offset 1) at
4K-16K tokens, plus the per-head qk-norm shape (32 heads x 128). bf16 activations, fp32 weight as in
training. ``python bench/rms_norm.py [--quick | --smoke]``; flags in bench/_harness.py.
"""

from __future__ import annotations

import _harness as H
import torch

from ember.kernels.rms_norm import rms_norm, rms_norm_ref

EPS = 1e-6
cref = H.compiled(rms_norm_ref)
liger = H.try_import("liger_kernel.ops.rms_norm")


def run_shape(bench: H.Bench, args, m: int, d: int, offset: float) -> None:
    x = torch.randn(m, d, device=args.device, dtype=H.bench_dtype(args), requires_grad=True)
    w = (0.1 * torch.randn(d, device=args.device)).requires_grad_()
    io = m * d * x.element_size()
    bench.case(
        shape=f"M={m} D={d} offset={offset:g}",
        providers={
            "ref": lambda: rms_norm_ref(x, w, EPS, offset),
            "ref_compiled": lambda: cref(x, w, EPS, offset),
            "triton": lambda: rms_norm(x, w, EPS, offset, impl="triton"),
            # casting_mode="gemma": all math in fp32, like ours; in_place=False keeps dy intact.
            "liger": liger and args.device == "cuda"
            and (lambda: liger.LigerRMSNormFunction.apply(x, w, EPS, offset, "gemma", False)),
        },
        grad_inputs=(x, w),
        # x in, y out, rstd (fp32) out | dy, x in, dx out, rstd in; weight and dw are O(D).
        bytes={"fwd": 2 * io + 4 * m, "bwd": 3 * io + 4 * m, "fwd+bwd": 5 * io + 8 * m},
    )


def main() -> None:
    args = H.parse_args(__doc__)
    bench = H.Bench("rms_norm", args)
    shapes = H.pick(
        args,
        full=[(t, d, off) for t in (4096, 16384) for d, off in ((4096, 0.0), (3584, 1.0))]
        + [(4096 * 32, 128, 0.0)],
        quick=[(8192, 4096, 0.0), (8192, 3584, 1.0)],
        smoke=[(37, 96, 1.0)],
    )
    for m, d, offset in shapes:
        run_shape(bench, args, m, d, offset)
    bench.finish()


if __name__ == "__main__":
    main()
