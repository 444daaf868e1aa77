"""``LoRALinear``: a frozen base projection plus a trainable low-rank update (the layer
``ember.models.lora.apply_lora`` puts in place of each targeted projection).

A wrapped projection computes ``y = x W^T + b + scale * (dropout(x) A^T) B^T`` through
``ember.kernels.lora_linear`` (the one call site the fused / NF4 kernels plug into), with
``A`` (r, in), ``B`` (out, r) and ``scale = alpha / r`` (``alpha / sqrt(r)`` with rsLoRA).

DoRA (``use_dora``, PEFT's ``DoraLinearLayer``) adds a trainable magnitude ``m`` (out,), set to the
row norms ``||W + scale * B A||`` (over the input dim) when the module is made, and computes
``y = x W^T + b + (g - 1) x_l W^T + g * scale * (x_l A^T) B^T`` with ``g = m / ||W + scale * B A||``
per output row; the norm is a constant for autograd (the DoRA paper, section 4.3, as PEFT).
Without dropout (x_l = x) that is ``g * (x W^T + scale * (x A^T) B^T) + b``; merged,
``W' = g * (W + scale * B A)``. DoRA modules never take the fused q/k/v and MLP kernels.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ember import EmberError
from ember.kernels import lora_linear
from ember.models.lora_init import base_changing_init, changes_base, lora_scale


def _is_linear(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) or hasattr(m, "quant_weight")


def _features(base: nn.Module) -> tuple[int, int]:
    if hasattr(base, "in_features") and hasattr(base, "out_features"):
        return int(base.in_features), int(base.out_features)
    out_f, in_f = base.quant_weight.shape
    return int(in_f), int(out_f)


def _base_weight(base: nn.Module):
    return base.quant_weight if hasattr(base, "quant_weight") else base.weight


def dense_base_weight(base: nn.Module) -> torch.Tensor:
    """A projection's weight in fp32, detached. An NF4 base is dequantized in the dtype it was
    quantized from, then widened: bitsandbytes' ``dequantize_4bit``, which PEFT's merge and DoRA
    norm on a 4-bit base add the adapter to (a bf16 base: the bf16-rounded weight the 4-bit
    forward computes with, not the unrounded fp32 product)."""
    w = _base_weight(base)
    return w.detach().float() if isinstance(w, torch.Tensor) else w.dequantize().float()


class LoRALinear(nn.Module):
    """A frozen base projection plus a trainable low-rank update (see the module docstring)."""

    def __init__(self, base: nn.Module, rank: int, alpha: float, *, dropout: float = 0.0,
                 use_rslora: bool = False, init: str = "kaiming", use_dora: bool = False,
                 dtype: torch.dtype = torch.float32, dense_weight: torch.Tensor | None = None):
        """``dense_weight``: the full-precision weight an NF4 ``base`` was quantized from, for
        PiSSA on it (QPiSSA: ``apply_lora(..., dense_weights=...)``)."""
        super().__init__()
        if not _is_linear(base):
            raise TypeError(f"LoRALinear wraps nn.Linear or an NF4 Linear4bit, got {type(base)}")
        in_f, out_f = _features(base)
        device = _base_weight(base).device
        self.base = base
        self.rank, self.alpha, self.use_rslora = rank, float(alpha), use_rslora
        self.scale = lora_scale(rank, self.alpha, use_rslora)
        # Adapters train in fp32 even over a bf16/NF4 base (PEFT's autocast_adapter_dtype).
        self.lora_A = nn.Parameter(torch.empty(rank, in_f, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(out_f, rank, device=device, dtype=dtype))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None
        self.use_dora = use_dora
        self.lora_magnitude = None
        if use_dora:  # fp32 like A and B; reset_lora sets it to the row norms
            self.lora_magnitude = nn.Parameter(torch.empty(out_f, device=device, dtype=dtype))
        self.reset_lora(init, dense_weight)

    @property
    def in_features(self) -> int:
        return self.lora_A.shape[1]

    @property
    def out_features(self) -> int:
        return self.lora_B.shape[0]

    def reset_lora(self, init: str = "kaiming", dense_weight: torch.Tensor | None = None) -> None:
        """A random, B zero (and a DoRA magnitude ``||W||``): the wrapped model computes exactly
        what the base did. PiSSA / OLoRA (``ember.models.lora_init``): A and B from the base
        weight, which becomes the residual ``W - scale * B A`` (a weight on the meta device is
        left as it is: its real values are loaded later). ``dense_weight``: the full-precision
        weight an NF4 base was quantized from (QPiSSA)."""
        with torch.no_grad():
            if changes_base(init):
                self._init_from_base(init, dense_weight)
            elif init == "kaiming":
                nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            else:
                nn.init.normal_(self.lora_A, std=1.0 / self.rank)
            if not changes_base(init):
                self.lora_B.zero_()
            if self.lora_magnitude is not None:
                self.lora_magnitude.copy_(self.weight_norm())

    def _init_from_base(self, init: str, dense: torch.Tensor | None) -> None:
        if hasattr(self.base, "quant_weight"):
            self._init_from_nf4_base(init, dense)
            return
        w = self.base.weight
        if w.device.type == "meta":
            return
        A, B, residual = base_changing_init(w, self.rank, self.scale, init)
        self.lora_A.copy_(A)
        self.lora_B.copy_(B)
        self.base.weight = nn.Parameter(residual, requires_grad=False)

    def _init_from_nf4_base(self, init: str, dense: torch.Tensor | None) -> None:
        """OLoRA as PEFT's ``olora_init`` on a bitsandbytes 4-bit layer: QR of the dequantized
        weight (in its own dtype, then fp32); A, B stay fp32 (PEFT casts adapters only to a
        float base's dtype) and the fp32 residual is quantized again with the weight's
        blocksize and double quant (``Params4bit`` of the fp32 residual: its quant state's
        dtype becomes float32). PiSSA (QPiSSA, PEFT's documented recipe: PiSSA on the dense
        model, the residual saved and loaded in 4 bit): the decomposition of the weight the
        NF4 one was quantized from, in its dtype, the residual quantized in that dtype."""
        q = self.base.quant_weight
        if q is None or q.device.type == "meta":
            return
        if init != "olora" and dense is None:
            # PEFT's pissa_init refuses a 4-bit base too
            raise EmberError(f"lora.init {init!r} on a 4-bit (NF4) base needs the "
                             "full-precision weights it was quantized from (QPiSSA): pass "
                             "apply_lora(..., dense_weights=lambda keys: iter_dense_weights("
                             "model folder, keys)) (ember train does), or use lora.init = "
                             "'olora' (PEFT's 4-bit OLoRA) or 'kaiming'")
        if q.state.quant_type != "nf4":
            raise EmberError(f"lora.init {init!r}: the base is bitsandbytes "
                             f"{q.state.quant_type.upper()}, and Ember quantizes to NF4 only; "
                             "use lora.init = 'kaiming'")
        if init == "olora":
            w = q.dequantize().float()
        else:
            if tuple(dense.shape) != tuple(q.shape):
                raise EmberError(f"lora.init {init!r}: a full-precision weight of shape "
                                 f"{tuple(dense.shape)} for an NF4 weight of shape "
                                 f"{tuple(q.shape)}: not the model it was quantized from")
            w = dense.detach().to(q.device, q.dtype)
        A, B, residual = base_changing_init(w, self.rank, self.scale, init)
        self.lora_A.copy_(A)
        self.lora_B.copy_(B)
        self.base.set_weight(residual, blocksize=q.blocksize, double_quant=q.state.nested)

    def adapter_params(self) -> dict[str, nn.Parameter]:
        """The trained tensors by attribute name: lora_A, lora_B (and lora_magnitude)."""
        names = ("lora_A", "lora_B") + (("lora_magnitude",) if self.use_dora else ())
        return {k: getattr(self, k) for k in names}

    def weight_norm(self) -> torch.Tensor:
        """``||W + scale * B A||`` per output row (out,), fp32, outside autograd (DoRA's norm)."""
        with torch.no_grad():
            return torch.linalg.norm(self._adapted_weight(), dim=1)

    def forward(self, x: torch.Tensor, lora_x: torch.Tensor | None = None) -> torch.Tensor:
        """``lora_x``: the adapter's input already dropped out by the caller (Phi-3's q/k/v and
        gate/up share one mask, as PEFT's LoRA on the fused projection draws); None: this
        module draws its own (in training, with dropout)."""
        # scale 0 (adapters off) draws no mask, as PEFT's disable_adapter runs the base alone
        if lora_x is None and self.dropout is not None and self.training and self.scale != 0.0:
            lora_x = self.dropout(x)
        w, A, B, bias = _base_weight(self.base), self.lora_A, self.lora_B, self.base.bias
        # scale 0 is "adapters off" (losses.adapters_disabled): the base, as PEFT's
        # disable_adapter, for DoRA too
        if not self.use_dora or self.scale == 0.0:
            return lora_linear(x, w, A, B, self.scale, bias, lora_x=lora_x)
        g = (self.lora_magnitude / self.weight_norm()).to(x.dtype)  # (out,), grad to m only
        if lora_x is None:
            y = g * lora_linear(x, w, A, B, self.scale, None)
            return y if bias is None else y + bias.to(x.dtype)
        # Dropout (PEFT): the base sees x; the rescaled base and the update see dropout(x).
        # scale 0 makes lora_linear the base matmul alone (NF4 stays on its kernels).
        upd = F.linear(F.linear(lora_x, A.to(x.dtype)), B.to(x.dtype))
        return (lora_linear(x, w, A, B, 0.0, bias)
                + (g - 1) * lora_linear(lora_x, w, A, B, 0.0, None) + (g * self.scale) * upd)

    def _adapted_weight(self) -> torch.Tensor:
        """W + scale * B @ A in fp32, detached (an NF4 base dequantized)."""
        update = self.lora_B.detach().float() @ self.lora_A.detach().float()
        return dense_base_weight(self.base) + self.scale * update

    def merged_weight(self, dtype: torch.dtype | None = None, *,
                      round_update: bool = False) -> torch.Tensor:
        """W + scale * B @ A (DoRA: rescaled rowwise to ``m``), computed in fp32, returned in
        ``dtype`` (default: the base's). ``round_update``: the fp32 update is rounded to ``dtype``
        before it is added, as PEFT's merge of ``target_parameters`` (MoE experts) rounds it."""
        w = _base_weight(self.base)
        dtype = dtype or (w.dtype if isinstance(w, torch.Tensor) else torch.float32)
        if round_update and not self.use_dora:
            update = self.scale * (self.lora_B.detach().float() @ self.lora_A.detach().float())
            return (dense_base_weight(self.base) + update.to(dtype).float()).to(dtype)
        merged = self._adapted_weight()
        if self.use_dora:
            norm = torch.linalg.norm(merged, dim=1)
            merged = (self.lora_magnitude.detach().float() / norm)[:, None] * merged
        return merged.to(dtype)

    def extra_repr(self) -> str:
        return (f"rank={self.rank}, alpha={self.alpha}, scale={self.scale:g}, "
                f"dropout={self.dropout.p if self.dropout is not None else 0.0}"
                + (", dora" if self.use_dora else ""))


def configured_dropout(m: nn.Module) -> float:
    """The LoRA dropout ``m`` was made with: its module's p, or the p a run turned off
    (``ember.models.dropout.disable_dropout_`` keeps it as ``export_dropout``) - what an
    exported adapter_config.json says and what PEFT's checks apply to."""
    p = getattr(m, "export_dropout", None)
    return p if p is not None else (m.dropout.p if m.dropout is not None else 0.0)
