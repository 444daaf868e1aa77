"""8-bit AdamW step bench: ember Triton vs eager/compiled reference vs bitsandbytes' CUDA kernel.

One optimizer step of one weight (in place, repeated: the states keep evolving, which does not
change the work). Shapes: Llama-3-8B's attention (4096 x 4096) and MLP (14336 x 4096) weights.
bf16 weights and gradients on the GPU (as with bf16 full fine-tuning), fp32 on CPU.
``python bench/adamw8bit.py [--quick | --smoke]``; flags in bench/_harness.py.
"""

from __future__ import annotations

import _harness as H
import torch

from ember.kernels.adamw8bit import BLOCKSIZE, adamw8bit_step, adamw8bit_step_ref, dynamic_map

bnb = H.try_import("bitsandbytes")
cref = H.compiled(adamw8bit_step_ref)
KW = dict(step=3, lr=1e-4, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01)


def run_shape(bench: H.Bench, args, rows: int, cols: int) -> None:
    dtype = H.bench_dtype(args, gpu=torch.bfloat16)
    p = torch.randn(rows, cols, device=args.device, dtype=dtype)
    g = torch.randn_like(p) * 1e-3
    n, nb = p.numel(), -(-p.numel() // BLOCKSIZE)
    s1 = torch.randint(0, 256, (rows, cols), device=args.device, dtype=torch.uint8)
    s2 = torch.randint(0, 256, (rows, cols), device=args.device, dtype=torch.uint8)
    a1 = torch.rand(nb, device=args.device) * 1e-3
    a2 = torch.rand(nb, device=args.device) * 1e-6
    st = (p, g, s1, s2, a1, a2)

    def peer():
        q1, q2 = dynamic_map(True).to(p.device), dynamic_map(False).to(p.device)
        return lambda: bnb.functional.optimizer_update_8bit_blockwise(
            "adam", g, p, s1, s2, KW["beta1"], KW["beta2"], 0.0, 0.0, KW["eps"], KW["step"],
            KW["lr"], q1, q2, a1, a2, KW["weight_decay"])

    # read p, g; write p; read + write 2 state bytes; the scales are 8 bytes per 256 values
    io = n * (3 * p.element_size() + 4) + 16 * nb
    bench.case(
        shape=f"{rows}x{cols}",
        providers={
            "ref": lambda: adamw8bit_step_ref(*st, **KW),
            "ref_compiled": lambda: cref(*st, **KW),
            "triton": lambda: adamw8bit_step(*st, **KW, impl="triton"),
            "bitsandbytes": bnb is not None and args.device == "cuda" and peer(),
        },
        bytes={"fwd": io}, dtype=dtype)


def main() -> None:
    args = H.parse_args(__doc__)
    bench = H.Bench("adamw8bit", args)
    shapes = H.pick(args, full=[(4096, 4096), (14336, 4096)], quick=[(4096, 4096)],
                    smoke=[(37, 300)])
    for rows, cols in shapes:
        run_shape(bench, args, rows, cols)
    bench.finish()


if __name__ == "__main__":
    main()
