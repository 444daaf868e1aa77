"""RoPE fwd/bwd bench: ember Triton vs eager/compiled reference vs Liger.

Shapes: Llama-3-8B attention (32 query heads, 8 kv heads, head_dim 128) and Qwen2.5-7B (28/4/128)
at 4K-16K tokens, bf16 q/k, fp32 cos/sin of shape (1, T, 64). Ours takes q/k as (B, T, H, D) (the
layout a q_proj output ``.view`` gives); Liger gets its own (B, H, T, D) contiguous layout and
full-width cos/sin. ``python bench/rope.py [--quick | --smoke]``; flags in bench/_harness.py.
"""

from __future__ import annotations

import _harness as H
import torch

from ember.kernels.rope import apply_rope, apply_rope_ref

cref = H.compiled(apply_rope_ref)
liger = H.try_import("liger_kernel.ops.rope")


def run_shape(bench: H.Bench, args, b: int, t: int, h: int, kh: int, d: int) -> None:
    dev, dtype = args.device, H.bench_dtype(args)
    q = torch.randn(b, t, h, d, device=dev, dtype=dtype, requires_grad=True)
    k = torch.randn(b, t, kh, d, device=dev, dtype=dtype, requires_grad=True)
    ang = torch.rand(1, t, d // 2, device=dev) * 6.3
    cos, sin = ang.cos(), ang.sin()
    providers = {
        "ref": lambda: apply_rope_ref(q, k, cos, sin),
        "ref_compiled": lambda: cref(q, k, cos, sin),
        "triton": lambda: apply_rope(q, k, cos, sin, impl="triton"),
    }
    grad_inputs = [q, k]
    if liger is not None and dev == "cuda":
        lq = q.detach().transpose(1, 2).contiguous().requires_grad_()  # (B, H, T, D)
        lk = k.detach().transpose(1, 2).contiguous().requires_grad_()
        lcos, lsin = torch.cat([cos, cos], -1), torch.cat([sin, sin], -1)  # (1, T, D)
        providers["liger"] = lambda: liger.LigerRopeFunction.apply(lq, lk, lcos, lsin)
        # Liger's leaves join grad_inputs; for the other providers their grads are simply None.
        grad_inputs += [lq, lk]
    qk = (q.numel() + k.numel()) * q.element_size()
    cs = 2 * cos.numel() * 4
    bench.case(
        shape=f"B={b} T={t} H={h} K={kh} hd={d}",
        providers=providers,
        grad_inputs=grad_inputs,
        # q, k in and out (cos/sin read once per token) | the same for dq, dk.
        bytes={"fwd": 2 * qk + cs, "bwd": 2 * qk + cs, "fwd+bwd": 4 * qk + 2 * cs},
    )


def main() -> None:
    args = H.parse_args(__doc__)
    bench = H.Bench("rope", args)
    shapes = H.pick(
        args,
        full=[(b, t, 32, 8, 128) for b, t in ((1, 4096), (4, 4096), (1, 16384))]
        + [(2, 8192, 28, 4, 128)],
        quick=[(2, 4096, 32, 8, 128), (2, 4096, 28, 4, 128)],
        smoke=[(2, 5, 3, 1, 80)],
    )
    for shape in shapes:
        run_shape(bench, args, *shape)
    bench.finish()


if __name__ == "__main__":
    main()
