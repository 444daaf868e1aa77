"""LoRA layer fwd/bwd bench (QLoRA target: NF4 base <= 1.15x the bf16 base; peers ~1.5x).

One projection y = x W^T + s (x A^T) B^T at Llama-3-8B shapes (q/o 4096->4096, k/v 4096->1024,
gate/up 4096->14336, down 14336->4096), 4K-8K tokens, r = 16, bf16 activations, fp32 adapters,
frozen base (gradients for x, A, B). Providers:

- ``bf16_base``: ember's fused LoRA over a bf16 weight (the baseline every row is compared to in
  the ``vs peer`` column);
- ``triton``: ember's fused LoRA over the NF4 weight (Triton dequant in forward and again in
  backward, cuBLAS matmuls);
- ``ref``: the unfused reference over NF4 (torch dequant, autograd keeps the dense weight);
- ``bnb_peft``: PEFT's LoRA on a bitsandbytes Linear4bit (when both import with CUDA).

After the table it prints the NF4/bf16 fwd+bwd ratio per shape. ``python bench/lora.py
[--quick | --smoke]``; flags in bench/_harness.py.
"""

from __future__ import annotations

import _harness as H
import torch
import torch.nn as nn

from ember.kernels.lora import lora_linear, lora_linear_ref
from ember.kernels.nf4 import NF4Weight

RANK, ALPHA = 16, 32.0


def _peft_bnb(w: torch.Tensor, A: nn.Parameter, B: nn.Parameter):
    """PEFT LoRA over bitsandbytes' Linear4bit sharing our A and B (so gradients line up)."""
    bnb = H.try_import("bitsandbytes")
    peft = H.try_import("peft")
    if bnb is None or peft is None or not w.is_cuda:
        return None
    try:
        n, k = w.shape
        base = bnb.nn.Linear4bit(k, n, bias=False, compute_dtype=torch.bfloat16,
                                 quant_type="nf4", compress_statistics=True)
        base.weight = bnb.nn.Params4bit(w.detach().cpu(), requires_grad=False, quant_type="nf4",
                                        compress_statistics=True)
        holder = nn.Module()
        holder.proj = base.cuda()
        peft.inject_adapter_in_model(peft.LoraConfig(r=RANK, lora_alpha=ALPHA,
                                                     target_modules=["proj"]), holder)
        holder.proj.lora_A["default"].weight = A
        holder.proj.lora_B["default"].weight = B
        return holder.proj
    except Exception:  # noqa: BLE001 - a peer that cannot be built is just absent
        return None


def run_shape(bench: H.Bench, args, m: int, k: int, n: int) -> None:
    dtype, dev = H.bench_dtype(args), args.device
    scale = ALPHA / RANK
    w = torch.randn(n, k, device=dev, dtype=dtype) * 0.02
    q = NF4Weight.quantize(w)
    x = torch.randn(m, k, device=dev, dtype=dtype, requires_grad=True)
    A = nn.Parameter(torch.randn(RANK, k, device=dev) * 0.01)
    B = nn.Parameter(torch.randn(n, RANK, device=dev) * 0.01)
    peer = _peft_bnb(w, A, B)
    shape = f"M={m} {k}->{n} r={RANK}"
    e = x.element_size()
    # Frozen base: fwd 2MNK, bwd 2MNK (dx only); LoRA adds ~4 GEMMs of rank r each way.
    lora = 2 * m * RANK * (k + n)
    bench.case(
        op="lora_linear", shape=shape,
        providers={
            "bf16_base": lambda: lora_linear(x, w, A, B, scale, impl="triton"),
            "ref": lambda: lora_linear_ref(x, q, A, B, scale),
            "triton": lambda: lora_linear(x, q, A, B, scale, impl="triton"),
            "bnb_peft": peer and (lambda: peer(x)),
        },
        grad_inputs=(x, A, B),
        flops={"fwd": 2 * m * n * k + lora, "bwd": 2 * m * n * k + 2 * lora,
               "fwd+bwd": 4 * m * n * k + 3 * lora},
        bytes={"fwd": m * (k + n) * e + n * k // 2, "bwd": m * (2 * n + k) * e + n * k // 2,
               "fwd+bwd": m * (3 * n + 2 * k) * e + n * k},
    )


def _ratios(rows) -> list[str]:
    by = {(r["shape"], r["provider"]): r["ms"] for r in rows if r["mode"] == "fwd+bwd" and r["ms"]}
    out = []
    for shape in dict.fromkeys(s for s, _ in by):
        base = by.get((shape, "bf16_base"))
        for prov in ("triton", "bnb_peft", "ref"):
            if base and (shape, prov) in by:
                out.append(f"{shape}: {prov} / bf16_base fwd+bwd = {by[(shape, prov)] / base:.3f}")
    return out


def main() -> None:
    args = H.parse_args(__doc__)
    bench = H.Bench("lora", args)
    projections = [(4096, 4096), (4096, 1024), (4096, 14336), (14336, 4096)]
    shapes = H.pick(args, full=[(m, k, n) for m in (4096, 8192) for k, n in projections],
                    quick=[(8192, 4096, 14336), (8192, 14336, 4096), (8192, 4096, 4096)],
                    smoke=[(48, 192, 96)])
    for shape in shapes:
        run_shape(bench, args, *shape)
    bench.finish()
    print("\n".join(_ratios(bench.rows)))


if __name__ == "__main__":
    main()
