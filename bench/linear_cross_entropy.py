"""Fused linear cross-entropy: loss + dhidden + dweight from hidden states, never the logits.

    python bench/linear_cross_entropy.py            # H100: both shapes, bf16, fwd / bwd / fwd+bwd
    python bench/linear_cross_entropy.py --smoke    # CPU: tiny shape, triton in the interpreter

Providers: ``ref`` (eager, full logits: ``linear_cross_entropy_ref``), ``ref_compiled`` (the
chunked PyTorch implementation with its per-chunk math under ``torch.compile``, full rows x 4096
vocabulary entries per chunk: the honest memory-bounded baseline), ``triton`` (ours), ``liger``
(``LigerFusedLinearCrossEntropyLoss``, when installed) and ``chunked`` (the chunked reference,
eager). Labels are mean-reduced with ~6% ignored tokens.

TFLOP/s counts model FLOPs: 2NDV for the logits, 4NDV for dhidden + dweight (fwd = 2NDV,
bwd = 4NDV, fwd+bwd = 6NDV). Every method that keeps memory independent of N x V recomputes the
logits in the backward (another 2NDV) and is not credited for it, so 6NDV / time is an honest
lower bound on the work done. After the table, "loss+grad MB" is the fwd+bwd peak minus the
inputs (hidden, weight, labels): the issue's memory target is <= 1.3 GB at N=8192, D=2304,
V=256000.
"""

from __future__ import annotations

import _harness as H
import torch

from ember.kernels.cross_entropy import (
    linear_cross_entropy,
    linear_cross_entropy_chunked,
    linear_cross_entropy_ref,
)

SHAPES = [(8192, 2304, 256000), (4096, 4096, 128256)]  # Gemma 2 2B head, Llama 3 8B head
SMOKE = [(48, 40, 300)]


def _case(bench: H.Bench, args, n: int, d: int, v: int, liger_mod) -> float:
    """Times every provider at one shape; returns the inputs' size in MiB."""
    dtype = H.bench_dtype(args)
    h = torch.randn(n, d, device=args.device, dtype=dtype, requires_grad=True)
    w = (torch.randn(v, d, device=args.device) / d**0.5).to(dtype).requires_grad_()
    y = torch.randint(0, v, (n,), device=args.device)
    y[::17] = -100
    chunks = {"chunk_rows": n, "chunk_vocab": 4096}
    liger = liger_mod.LigerFusedLinearCrossEntropyLoss() if liger_mod else None
    model_flops = 2.0 * n * d * v
    inputs_mb = sum(t.numel() * t.element_size() for t in (h, w, y)) / 2**20
    bench.case(
        shape=f"N={n} D={d} V={v}",
        providers={
            "ref": lambda: linear_cross_entropy_ref(h, w, y),
            "ref_compiled": lambda: linear_cross_entropy_chunked(h, w, y, compiled=True, **chunks),
            "triton": lambda: linear_cross_entropy(h, w, y, impl="triton"),
            "liger": liger and (lambda: liger(w, h, y)),
            "chunked": lambda: linear_cross_entropy_chunked(h, w, y, **chunks),
        },
        grad_inputs=(h, w),
        flops={"fwd": model_flops, "bwd": 2 * model_flops, "fwd+bwd": 3 * model_flops},
        extra={"inputs_mb": inputs_mb},
    )
    return inputs_mb


def main() -> None:
    args = H.parse_args("fused linear cross-entropy: loss + dhidden + dweight")
    bench = H.Bench("linear_cross_entropy", args)
    liger_mod = None if args.smoke else H.try_import("liger_kernel.transformers")
    inputs_mb = {}
    for n, d, v in H.pick(args, full=SHAPES, quick=SHAPES[:1], smoke=SMOKE):
        inputs_mb[f"N={n} D={d} V={v}"] = _case(bench, args, n, d, v, liger_mod)
    bench.finish()
    for r in bench.rows:
        if r["mode"] == "fwd+bwd" and r["peak_mem_mb"] is not None:
            mb = r["peak_mem_mb"] - inputs_mb[r["shape"]]
            print(f"{r['shape']} {r['provider']}: loss+grad {mb:.0f} MiB ({mb / 1024:.3f} GiB)")


if __name__ == "__main__":
    main()
