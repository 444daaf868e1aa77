"""Base-changing LoRA inits (PEFT's ``init_lora_weights="pissa"`` / ``"pissa_niter_K"`` /
``"olora"``) and the plain LoRA their trained adapters are exported as.

PiSSA: the base weight W (out, in), in fp32, is split by its SVD ``W = V S U^T``; with
``S_r = S[:r] / scale`` the adapter starts at ``A = sqrt(S_r) U_r^T`` (r, in),
``B = V_r sqrt(S_r)`` (out, r), and the frozen base becomes the residual
``W_res = W - scale * B A`` (so the model computes W at step 0). ``pissa_niter_K``: the same from
``torch.svd_lowrank(W, r, niter=K)`` (a random draw, from the run's seed). OLoRA: ``W = Q R``,
``A = R[:r]``, ``B = Q[:, :r]`` (no division by the scale), ``W_res = W - scale * B A``. The
residual is cast back to W's dtype and A, B are rounded through it (PEFT moves its adapters to the
base's dtype after the init; they train in fp32 as everywhere in Ember).

Export (PEFT's ``save_pretrained(path_initial_model_for_weight_conversion=...)``): the trained
model is ``W_res + scale * B A = W + scale * (B A - B0 A0)``, a plain LoRA of rank 2r relative to
the ORIGINAL W with ``A' = [A; A0]``, ``B' = [B, -B0]``, written as ``r' = 2r`` and
``alpha' = 2 alpha`` (rsLoRA: ``sqrt(2) alpha``) so the scale is unchanged, and
``init_lora_weights = true``. A DoRA magnitude carries over as it is (the adapted weight, so its
norm, is the same). An adapter without a base-changing init (the token embedding's: PEFT leaves it
at A zero, B normal) is padded with zeros to rank 2r, which changes nothing it computes. PEFT's
own conversion keeps only ``lora_A`` / ``lora_B`` keys (it drops an embedding adapter and a DoRA
magnitude); Ember keeps them.

On a CPU the decomposition and the residual's product run on one thread: LAPACK's SVD / QR and
the matmul split their work by threads, so another thread count gave other last bits, and a run
resumed with another count (a one-process run continued under torchrun, whose ranks get
OMP_NUM_THREADS=1; another ``threads``) was refused as built on other base weights.
"""

from __future__ import annotations

import math
import re

import torch

from ember import EmberError
from ember.kernels._dispatch import one_cpu_thread

INITS = ("kaiming", "gaussian", "pissa", "pissa_niter_K", "olora")
_NITER = re.compile(r"pissa_niter_(\d+)")


def check_init(init: object) -> None:
    """EmberError unless ``init`` is one of ``INITS`` (``pissa_niter_K``: K a whole number)."""
    if isinstance(init, str) and (init in ("kaiming", "gaussian", "pissa", "olora")
                                  or _NITER.fullmatch(init)):
        return
    if isinstance(init, str) and init.lower().startswith("loftq"):
        # PEFT 0.21's loftq_init computes on "cuda" / "xpu" only, and its base (the dequantized
        # LoftQ weight) is no low-rank step from the original: an export needs the base too
        raise EmberError("lora.init 'loftq' is not supported: for a quantization-aware init use "
                         "lora.init = 'pissa' with model.quantize = \"nf4\" (QPiSSA) or "
                         "'olora' (LoftQ replaces the base by its own dequantized weights, "
                         "which a run would have to export beside the adapter)")
    raise EmberError(f"lora.init must be one of {', '.join(repr(i) for i in INITS)} (K: the "
                     f"number of subspace iterations, e.g. 'pissa_niter_4'), got {init!r}")


def lora_scale(rank: int, alpha: float, use_rslora: bool) -> float:
    """The factor of B A: alpha / rank, alpha / sqrt(rank) with rsLoRA (PEFT's ``scaling``)."""
    return alpha / (math.sqrt(rank) if use_rslora else rank)


def changes_base(init: str) -> bool:
    """Whether the init moves the top of the base weight into the adapter (PiSSA, OLoRA)."""
    return init.startswith("pissa") or init == "olora"


def base_changing_init(weight: torch.Tensor, rank: int, scale: float, init: str
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(A (r, in), B (out, r), residual (out, in)) of PEFT's ``pissa_init`` / ``olora_init`` for
    a dense base weight (out, in): A and B fp32, the residual in the weight's dtype; on a CPU the
    same bits at any thread count."""
    with one_cpu_thread(weight.device):
        return _base_changing_init(weight, rank, scale, init)


def _base_changing_init(weight: torch.Tensor, rank: int, scale: float, init: str
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dtype = weight.dtype
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise EmberError(f"lora.init {init!r} needs a float32 / float16 / bfloat16 base weight, "
                         f"got {dtype}")
    w = weight.detach().to(torch.float32)
    if rank > min(w.shape):
        raise EmberError(f"lora.init {init!r}: lora.rank {rank} exceeds the smaller side of a "
                         f"{tuple(w.shape)} weight; use a rank <= {min(w.shape)}")
    if init == "olora":
        Q, R = torch.linalg.qr(w)
        A, B = R[:rank].contiguous(), Q[:, :rank].contiguous()
    else:
        niter = _NITER.fullmatch(init)
        if niter is None:  # "pissa": the full SVD, deterministic
            V, S, Uh = torch.linalg.svd(w, full_matrices=False)
            Vr, Sr, Uhr = V[:, :rank], S[:rank] / scale, Uh[:rank]
        else:
            Vr, Sr, Ur = torch.svd_lowrank(w, rank, niter=int(niter[1]))
            Sr, Uhr = Sr / scale, Ur.t()
        A = torch.diag(torch.sqrt(Sr)) @ Uhr
        B = Vr @ torch.diag(torch.sqrt(Sr))
    residual = (w - scale * B @ A).to(dtype)
    # PEFT casts its adapters to the base's dtype after the init (then trains them in fp32)
    return A.to(dtype).float(), B.to(dtype).float(), residual


def skip_lowrank_draw(shape: tuple[int, int], rank: int, device: torch.device) -> None:
    """Advance ``device``'s RNG as ``base_changing_init``'s ``pissa_niter_K`` on a ``shape``
    weight does without decomposing it: ``torch.svd_lowrank`` draws one fp32 Gaussian
    ``(min(shape), rank)`` test matrix (its ``get_approximate_basis`` of the tall side)."""
    torch.randn(min(shape), rank, device=device)


def rng_state(device: torch.device) -> torch.Tensor:
    """``device``'s RNG state (a CUDA device's, else the CPU's): one module's draw, replayed."""
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


def set_rng_state(device: torch.device, state: torch.Tensor) -> None:
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)


def converted_adapter(A: torch.Tensor, B: torch.Tensor, init: tuple | None,
                      rank: int, alpha: float, use_rslora: bool
                      ) -> tuple[torch.Tensor, torch.Tensor, int, float]:
    """(A', B', 2r, alpha') of a trained adapter relative to the original base: ``init`` is its
    (A0, B0), or None (an adapter whose init left the base alone: zero padding)."""
    A0, B0 = init if init is not None else (torch.zeros_like(A), torch.zeros_like(B))
    A0, B0 = A0.to(A.device, A.dtype), B0.to(B.device, B.dtype)
    # alpha' keeps the scale: alpha / r -> 2 alpha / 2r; rsLoRA alpha / sqrt(r) -> sqrt(2) alpha
    factor = math.sqrt(2) if use_rslora else 2
    return torch.cat([A, A0], dim=0), torch.cat([B, -B0], dim=1), 2 * rank, alpha * factor
