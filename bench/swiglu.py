"""SwiGLU / GeGLU fwd/bwd bench: ember Triton vs eager/compiled reference vs Liger.

Shapes: MLP widths of Llama-3-8B (14336) and Qwen2.5-7B (18944) for SwiGLU, Gemma-2-9B (14336,
tanh GELU) for GeGLU, at 4K-16K tokens, bf16. ``python bench/swiglu.py [--quick | --smoke]``;
flags in bench/_harness.py.
"""

from __future__ import annotations

import _harness as H
import torch

from ember.kernels.swiglu import geglu, geglu_ref, swiglu, swiglu_ref

# name -> (ours, reference, Liger module, Liger autograd.Function name)
OPS = {
    "swiglu": (swiglu, swiglu_ref, "liger_kernel.ops.swiglu", "LigerSiLUMulFunction"),
    "geglu": (geglu, geglu_ref, "liger_kernel.ops.geglu", "LigerGELUMulFunction"),
}


def run_shape(bench: H.Bench, args, name: str, m: int, f: int) -> None:
    op, ref, peer_mod, peer_fn = OPS[name]
    cref = H.compiled(ref)
    peer = H.try_import(peer_mod)
    peer = getattr(peer, peer_fn, None) if peer is not None and args.device == "cuda" else None
    g = torch.randn(m, f, device=args.device, dtype=H.bench_dtype(args), requires_grad=True)
    u = torch.randn(m, f, device=args.device, dtype=H.bench_dtype(args), requires_grad=True)
    io = m * f * g.element_size()
    bench.case(
        op=name,
        shape=f"M={m} F={f}",
        providers={
            "ref": lambda: ref(g, u),
            "ref_compiled": lambda: cref(g, u),
            "triton": lambda: op(g, u, impl="triton"),
            "liger": peer and (lambda: peer.apply(g, u)),
        },
        grad_inputs=(g, u),
        # gate, up in, out | dy, gate, up in, d_gate, d_up out.
        bytes={"fwd": 3 * io, "bwd": 5 * io, "fwd+bwd": 8 * io},
    )


def main() -> None:
    args = H.parse_args(__doc__)
    bench = H.Bench("swiglu", args)
    shapes = H.pick(
        args,
        full=[("swiglu", m, f) for m in (4096, 16384) for f in (14336, 18944)]
        + [("geglu", m, 14336) for m in (4096, 16384)],
        quick=[("swiglu", 8192, 14336), ("geglu", 8192, 14336)],
        smoke=[("swiglu", 7, 300), ("geglu", 7, 300)],
    )
    for shape in shapes:
        run_shape(bench, args, *shape)
    bench.finish()


if __name__ == "__main__":
    main()
