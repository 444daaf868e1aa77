"""The base weights a LoRA run's merged export starts from.

A LoRA run at bf16 / fp16 precision loads its frozen base in that dtype (``model.dtype = "auto"``)
to save memory, while the base checkpoint may be fp32. ``ember export --merged`` writes the
checkpoint's dtype, so the merge must start from the checkpoint's own values: PEFT's
``merge_and_unload`` on the base as transformers loads it adds the fp32 update to the fp32
weight; Ember's run model holds the bf16-rounded weight (4.9e-4 off on a 0.1-scale weight,
every projection and the embedding, though only the adapter was trained).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ember import EmberError
from ember.engine.config import TrainConfig
from ember.engine.stages import base_of, load_base
from ember.kernels.nf4 import NF4Weight
from ember.models.loading import iter_dense_weights, load_dtype
from ember.models.lora import LoRALinear, base_state_dict, lora_modules
from ember.models.lora_init import converted_adapter, lora_scale
from ember.models.nf4 import is_quantized


def widen_frozen_base_(model: nn.Module, cfg: TrainConfig, dtype: torch.dtype | None) -> bool:
    """Replace the frozen base tensors of a LoRA run's ``model`` (loaded in ``cfg.model.dtype``)
    by the base checkpoint's values in ``dtype``, the dtype the export writes. A tensor is
    replaced only where the checkpoint's value, rounded to the run's dtype, is the run's value
    bit for bit: a trained one (a classifier head, ``modules_to_save``) is left as trained.
    Returns whether anything was loaded. Not for an NF4 base (the 4-bit weights are the base, as
    PEFT merges into bitsandbytes' dequantized ones)."""
    mods = lora_modules(model)
    if cfg.method == "lora" and is_quantized(model) and "peft_base_init" in model.__dict__:
        return _unresidual_nf4_(model, cfg)
    if cfg.method != "lora" or dtype is None or not mods or is_quantized(model):
        return False
    # the dtype the run loaded its base in (model.dtype, "auto" in an unresolved config)
    run_dtype = next(iter(mods.values())).base.weight.dtype
    if run_dtype in (dtype, torch.float32):  # an fp32 run holds a 16-bit base exactly
        return False
    device = next(model.parameters()).device
    # loaded in the written dtype (a second copy of the base, its tensors moved into the model)
    orig = load_base(cfg, base_of(cfg), str(dtype).removeprefix("torch."), str(device))[0]
    theirs = orig.state_dict()
    _unresidual_(model, theirs)
    with torch.no_grad():
        for key, t in base_state_dict(model, keep_vars=True).items():
            src = theirs.get(key)
            if (
                src is None
                or src.shape != t.shape
                or t.dtype != run_dtype
                or not torch.equal(src.to(run_dtype), t)
            ):
                continue
            t.data = src
    return True


def _unresidual_(model: nn.Module, theirs: dict[str, torch.Tensor]) -> None:
    """A PiSSA / OLoRA run rebuilt from a checkpoint (no final adapter) holds a residual base
    ``W - scale * B0 A0`` computed from the run's rounded W: each such module gets the original
    weight and the rank-2r adapter relative to it (``converted_adapter``), the very adapter its
    final export holds, so the merge is the final adapter's (was: the bf16 residual + B A, 7e-4
    off PEFT's merge)."""
    base_init = model.__dict__.pop("peft_base_init", None)
    if base_init is None:
        return
    with torch.no_grad():
        for n, m in lora_modules(model).items():
            if not isinstance(m, LoRALinear) or n not in base_init:
                continue
            A, B, m.rank, m.alpha = converted_adapter(
                m.lora_A.detach(),
                m.lora_B.detach(),
                base_init[n],
                m.rank,
                m.alpha,
                m.use_rslora,
            )
            m.lora_A, m.lora_B = nn.Parameter(A, False), nn.Parameter(B, False)
            m.scale = lora_scale(m.rank, m.alpha, m.use_rslora)
            if hasattr(m.base, "weight"):  # (an NF4 base: _unresidual_nf4_ swaps it)
                m.base.weight.data = theirs[f"{n}.weight"]


def _unresidual_nf4_(model: nn.Module, cfg: TrainConfig) -> bool:
    """``_unresidual_`` for a PiSSA / OLoRA run on an NF4 base rebuilt from a checkpoint: its
    residual was quantized again, so residual + B A differs from the final adapter's merge (the
    original NF4 base + the rank-2r adapter) by the residual's re-quantization error (0.1 on
    the tiny test model's logits): each such module gets the original NF4 weight (the base
    quantized again as the run loaded it) and the converted adapter, the final export's."""
    mods = lora_modules(model)
    names = [n for n in model.peft_base_init if n in mods]
    orig = _original_weights(model, cfg, names)
    weights = {n: w for n, w in orig.items() if isinstance(w, NF4Weight)}
    _unresidual_(model, {f"{n}.weight": w for n, w in orig.items() if n not in weights})
    for n, w in weights.items():
        mods[n].base.quant_weight = w
    return True


def _original_weights(model: nn.Module, cfg: TrainConfig, names: list[str]) -> dict:
    """The weights of the modules ``names`` as the run loaded its base: those of NF4 layers
    quantized again (alone: the rest of the base is neither read nor quantized, was the whole
    base), the others dense. A bitsandbytes 4-bit base (no dense weights) is loaded whole, its
    4-bit weights as stored."""
    mods = lora_modules(model)
    device = next(model.parameters()).device
    try:
        dense = iter_dense_weights(base_of(cfg), {f"{n}.weight" for n in names})
    except EmberError:  # a 4-bit checkpoint (any other error: load_base's own, below)
        orig = load_base(cfg, base_of(cfg), cfg.model.dtype, str(device),
                         quantize=cfg.model.quantize, double_quant=cfg.model.double_quant)[0]
        src = {n: orig.get_submodule(n) for n in names}
        return {n: getattr(m, "quant_weight", None) or m.weight for n, m in src.items()}
    dtype = load_dtype(base_of(cfg), cfg.model.dtype)
    out = {}
    for key, t in dense:
        n = key.removesuffix(".weight")
        t = t.to(device=device, dtype=dtype)  # as the loader casts before quantizing
        q = getattr(mods[n].base, "quant_weight", None)  # the residual, quantized as the base
        out[n] = t if q is None else NF4Weight.quantize(t, q.blocksize, q.state.nested)
    return out
