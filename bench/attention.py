"""Flash attention fwd/bwd bench: ember Triton vs PyTorch SDPA's flash, cuDNN, efficient backends.

Shapes: 16K tokens per batch (B = 16K / T), T from 1K to 16K, hd 128 with 16 heads and hd 64 with
32 heads, causal and not, bf16; q/k/v laid out (B, T, H, D) as the model produces them (SDPA gets
transposed views, which its kernels take without a copy). TFLOP/s from FLOPs = 4 B H T^2 D (x0.5
causal), x2.5 for the backward, x3.5 for fwd+bwd. ``ref_compiled`` is skipped: the reference is SDPA
itself. ``python bench/attention.py [--quick | --smoke]``; flags in bench/_harness.py.
"""

from __future__ import annotations

import _harness as H
import torch
import torch.nn.functional as F

from ember.kernels.attention import _bwd, _fwd, flash_attention, flash_attention_ref

TOKENS = 16384


def _sdpa(backend_name: str, args):
    """A provider factory for one SDPA backend, or None when this torch/GPU lacks it."""
    if args.device != "cuda":
        return None
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:
        return None
    backend = getattr(SDPBackend, backend_name, None)
    if backend is None:
        return None

    def make(q, k, v, causal):
        def run():
            with sdpa_kernel(backend):
                out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                                     v.transpose(1, 2), is_causal=causal)
            return out.transpose(1, 2)

        return run

    return make


def run_shape(bench: H.Bench, args, peers, t: int, d: int, h: int, causal: bool) -> None:
    b = max(1, TOKENS // t) if not args.smoke else 1
    dtype = H.bench_dtype(args)
    q, k, v = (torch.randn(b, t, h, d, device=args.device, dtype=dtype, requires_grad=True)
               for _ in range(3))
    fwd = 4 * b * h * t * t * d * (0.5 if causal else 1.0)
    providers = {
        "ref": args.smoke and (lambda: flash_attention_ref(q, k, v, causal=causal)),
        "triton": lambda: flash_attention(q, k, v, causal=causal, impl="triton"),
    }
    for name, make in peers.items():
        providers[name] = make and make(q, k, v, causal)
    bench.case(
        shape=f"B={b} T={t} H={h} D={d} {'causal' if causal else 'full'}",
        providers={n: p or None for n, p in providers.items()},
        grad_inputs=(q, k, v),
        flops={"fwd": fwd, "bwd": 2.5 * fwd, "fwd+bwd": 3.5 * fwd},
        extra={"B": b, "T": t, "H": h, "D": d, "causal": causal},
    )


def main() -> None:
    args = H.parse_args(__doc__)
    bench = H.Bench("attention", args)
    peers = {"sdpa_flash": _sdpa("FLASH_ATTENTION", args),
             "sdpa_cudnn": _sdpa("CUDNN_ATTENTION", args),
             "sdpa_efficient": _sdpa("EFFICIENT_ATTENTION", args)}
    heads = {64: 32, 128: 16}
    shapes = H.pick(
        args,
        full=[(t, d, heads[d], c) for d in (128, 64) for c in (True, False)
              for t in (1024, 2048, 4096, 8192, 16384)],
        # The target shape first (causal hd128 at 8K), so a time-limited run reports it.
        quick=[(8192, 128, 16, True), (8192, 128, 16, False), (2048, 128, 16, True),
               (16384, 128, 16, True), (8192, 64, 32, True), (1024, 64, 32, False)],
        smoke=[(24, 64, 1, True)],
    )
    # Autotuning (the first call per configuration) happens before do_bench's estimate.
    for t, d, h, causal in shapes:
        run_shape(bench, args, peers, t, d, h, causal)
    bench.finish()
    if not args.smoke:
        print_autotune_choices()


def print_autotune_choices() -> None:
    """The config each autotuner picked per key (head dim, causal, window, softcap, varlen, T
    bucket, dtypes): the evidence for reordering or trimming the config lists."""
    tuners = {**{f"fwd{d}": t for d, t in _fwd._FWD.items()},
              **{f"dkdv{d}": t for d, t in _bwd._DKDV_K.items()},
              **{f"dq{d}": t for d, t in _bwd._DQ_K.items()}}
    print("\n### autotune choices\n")
    for name, tuner in tuners.items():
        for key, cfg in getattr(tuner, "cache", {}).items():
            print(f"- {name} {key[:6]}: {cfg}")


if __name__ == "__main__":
    main()
