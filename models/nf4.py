"""QLoRA base models: NF4 ``Linear4bit`` layers and the bitsandbytes 4-bit checkpoint format.

A quantized projection is ``Linear4bit`` (``quant_weight``: an ``NF4Weight``; ``bias``: a
Parameter or None), so ``LoRALinear`` wraps it like an ``nn.Linear``. Its state dict is
bitsandbytes' own, key for key and byte for byte (what ``transformers`` writes with
``BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")``)::

    <prefix>.weight                                   packed codes, (ceil(n/2), 1) uint8
    <prefix>.weight.absmax                            uint8 (double quant) or fp32 (blocks,)
    <prefix>.weight.quant_map                         the 16 NF4 values, fp32
    <prefix>.weight.nested_absmax                     fp32, double quant only
    <prefix>.weight.nested_quant_map                  the 256-value dynamic map, double quant only
    <prefix>.weight.quant_state.bitsandbytes__nf4     uint8 bytes of a JSON dict (shape, dtype,
                                                      blocksize, nested_offset, ...)
    <prefix>.bias

and config.json carries ``quantization_config`` (``bnb_quantization_config``); the format's
functions are in ``ember.models.bnb_format`` (re-exported here). Loading paths:
``load_quantized_`` quantizes while loading (meta-device model, tensor by tensor, never the whole
bf16 model; built on ``replace_linears_with_4bit_`` + ``assign_quantized_``);
``load_bnb_quantized_`` streams a pre-quantized bitsandbytes checkpoint into a meta-device model;
``load_bnb_4bit_state`` turns such a state dict into ``{weight key: NF4Weight}``; and
``quantize_model_`` quantizes a loaded model in place, one layer at a time. Saving: the model's
``state_dict()`` is already in bnb's format; ``rename_bnb_keys`` applies the HF key renaming.

``Linear4bit`` lives in ``ember.models.nf4_layer``, the row-block helpers of a fused NF4 weight
(``split_nf4_rows``, ``cat_nf4_rows``, ...) in ``ember.models.nf4_rows``; this module keeps the
whole-model helpers and re-exports both, the place to import them from.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn as nn

from ember import EmberError
from ember.kernels.nf4 import NF4Weight

# bitsandbytes' tensor format lives in ember.models.bnb_format; its names are re-exported here.
from ember.models.bnb_format import BNB_SUFFIXES as BNB_SUFFIXES
from ember.models.bnb_format import QS_SUFFIX as QS_SUFFIX
from ember.models.bnb_format import QS_SUFFIXES as QS_SUFFIXES
from ember.models.bnb_format import QUANT_TYPES as QUANT_TYPES
from ember.models.bnb_format import bnb_quantization_config as bnb_quantization_config
from ember.models.bnb_format import check_quant_type as check_quant_type
from ember.models.bnb_format import check_quantization_config as check_quantization_config
from ember.models.bnb_format import is_quant_state_key as is_quant_state_key
from ember.models.bnb_format import load_bnb_4bit_state as load_bnb_4bit_state
from ember.models.bnb_format import nf4_from_bnb as nf4_from_bnb
from ember.models.bnb_format import nf4_to_bnb as nf4_to_bnb
from ember.models.bnb_format import quant_state_key as quant_state_key
from ember.models.bnb_format import rename_bnb_keys as rename_bnb_keys
from ember.models.bnb_format import split_bnb_key
from ember.models.nf4_layer import Linear4bit
from ember.models.nf4_rows import cat_nf4_rows as cat_nf4_rows
from ember.models.nf4_rows import dequantize_nf4_rows as dequantize_nf4_rows
from ember.models.nf4_rows import rows_straddle_blocks, split_nf4_rows


# ----------------------------------------------------------------------- whole-model helpers
def is_quantized(model: nn.Module) -> bool:
    """True when any layer of ``model`` holds NF4 weights (a QLoRA base)."""
    return any(isinstance(m, Linear4bit) for m in model.modules())


def _skipped(name: str, skip: Iterable[str]) -> bool:
    return any(name == s or name.endswith("." + s) or fnmatch.fnmatch(name, s) for s in skip)


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


# Mixture-of-experts routers (``mlp.gate``, Qwen2-MoE's ``shared_expert_gate``) always stay dense:
# the top-k choice turns their tiny logit gaps into discrete decisions that NF4's rounding flips,
# and they hold a negligible share of the weights.
ROUTERS = ("mlp.gate", "shared_expert_gate")
# The output heads stay dense unless asked (``skip``), as bitsandbytes leaves them in transformers:
# the LM head and a classifier's ``score`` (which trains whole with the adapters, PEFT's
# modules_to_save) are read as dense matrices (logits, the fused loss, ``classify``).
HEADS = ("lm_head", "score")


def _linear_names(model: nn.Module, skip: Iterable[str] | str) -> list[str]:
    if isinstance(skip, str):  # one pattern, not its characters
        skip = (skip,)
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and
            not _skipped(n, (*skip, *ROUTERS))]


def quantize_model_(model: nn.Module, skip: Iterable[str] = HEADS, *,
                    blocksize: int = 64, double_quant: bool = True,
                    fused: Iterable[Sequence[str]] | None = None) -> list[str]:
    """Replace every ``nn.Linear`` (but ``skip``: leaf names, full names or globs) by a
    ``Linear4bit`` quantized on the weight's device, one layer at a time so that each dense
    weight is freed before the next is quantized. ``fused``: groups of weight keys that
    bitsandbytes quantizes as one stacked weight (default: the model's own, Phi-3's q/k/v and
    gate/up, ``ember.models.hf.fused_groups``), quantized together as ``load_quantized_`` does,
    bnb's bytes. Returns the quantized module names."""
    names = _linear_names(model, skip)
    if fused is None:
        cfg = getattr(model, "cfg", None)
        if cfg is not None and getattr(cfg, "model_type", None) == "phi3":
            from ember.models.hf import fused_groups  # hf imports this module

            fused = fused_groups(cfg)
    group_of = {}
    for g in fused or ():
        owners = [k.rpartition(".")[0] for k in g]
        if all(o in names for o in owners):
            group_of.update({o: tuple(g) for o in owners})
    for name in names:  # only names are held: each old layer dies when replaced
        group = group_of.get(name)
        if group is not None:
            if name == group[0].rpartition(".")[0]:  # the whole group, at its first part
                _quantize_group_(model, group, blocksize, double_quant)
            continue
        try:
            q = Linear4bit.from_linear(model.get_submodule(name), blocksize=blocksize,
                                       double_quant=double_quant)
        except ValueError as e:  # e.g. inf / NaN weights: say which layer
            raise EmberError(f"{name}.weight: {e}") from e
        _set_module(model, name, q)
    return [n for n in names if isinstance(model.get_submodule(n), Linear4bit)]


def _quantize_group_(model: nn.Module, keys: Sequence[str], blocksize: int,
                     double_quant: bool) -> None:
    parts = []
    for key in keys:
        name = key.rpartition(".")[0]
        lin = model.get_submodule(name)
        parts.append((key, lin.weight.detach()))
        q = Linear4bit(lin.in_features, lin.out_features, bias=False)
        q.bias = lin.bias
        _set_module(model, name, q)
    _quantize_stacked_(model, parts, blocksize, double_quant)


def replace_linears_with_4bit_(model: nn.Module, skip: Iterable[str] = HEADS) -> list[str]:
    """For loading: swap ``nn.Linear`` layers (typically on the meta device) for empty
    ``Linear4bit`` ones, to be filled by ``assign_quantized_`` or ``load_state_dict``."""
    names = _linear_names(model, skip)
    for name in names:
        lin = model.get_submodule(name)
        bias = lin.bias
        _set_module(model, name, Linear4bit(
            lin.in_features, lin.out_features, bias is not None,
            device=None if bias is None else bias.device,
            dtype=None if bias is None else bias.dtype))
    return names


def assign_quantized_(model: nn.Module, name: str, tensor: torch.Tensor | NF4Weight, *,
                      device=None, blocksize: int = 64, double_quant: bool = True) -> bool:
    """Loader hook: if ``name`` is the ``.weight`` of a ``Linear4bit``, quantize ``tensor`` on
    ``device`` (or take an NF4Weight) into it and return True; otherwise return False and let the
    caller assign the tensor as usual."""
    parent, _, leaf = name.rpartition(".")
    if leaf != "weight":
        return False
    try:
        module = model.get_submodule(parent)
    except AttributeError:
        return False
    if not isinstance(module, Linear4bit):
        return False
    if device is not None:
        tensor = tensor.to(device)
    try:
        module.set_weight(tensor, blocksize=blocksize, double_quant=double_quant)
    except ValueError as e:  # e.g. inf / NaN weights: say which tensor of the checkpoint
        raise EmberError(f"{name}: {e}") from e
    return True


def _assign_param_(model: nn.Module, key: str, tensor: torch.Tensor, device, dtype) -> None:
    owner, _, name = key.rpartition(".")
    module = model.get_submodule(owner)
    if name not in module._parameters:
        raise EmberError(f"checkpoint tensor {key} has no parameter to go to in the model")
    old = module._parameters[name]
    setattr(module, name, nn.Parameter(tensor.to(device=device, dtype=dtype),
                                       requires_grad=old is None or old.requires_grad))


def _meta_left(model: nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.is_meta]


def load_quantized_(model: nn.Module, tensors: Iterable[tuple[str, torch.Tensor]], *, device,
                    compute_dtype: torch.dtype, skip: Iterable[str] = HEADS,
                    blocksize: int = 64, double_quant: bool = True,
                    fused: Iterable[Sequence[str]] = ()) -> list[str]:
    """Quantize while loading. ``model`` is built on the meta device; ``tensors`` streams dense
    ``(ember_key, tensor)`` pairs (any stored dtype, CPU). Each linear weight (but ``skip``) is
    moved to ``device``, cast to ``compute_dtype`` (as transformers does before quantizing) and
    quantized there, one at a time; every other tensor becomes a ``compute_dtype`` parameter.
    ``fused``: groups of weight keys the checkpoint stores stacked as one weight (Phi-3's
    qkv_proj / gate_up_proj), which bitsandbytes quantizes whole (one absmax mean for the double
    quantization): each group is quantized stacked and cut (``split_nf4_rows``), bnb's bytes
    (cuts inside a 4-bit block: dense parts holding bnb's dequantized rows).
    Returns the quantized module names. Non-persistent buffers (RoPE) are the caller's."""
    names = replace_linears_with_4bit_(model, skip)
    group_of = {k: tuple(g) for g in fused for k in g}
    pending: dict[tuple, dict[str, torch.Tensor]] = {}
    for key, t in tensors:
        group = group_of.get(key)
        if group is not None and isinstance(model.get_submodule(key.rpartition(".")[0]),
                                            Linear4bit):
            parts = pending.setdefault(group, {})
            parts[key] = t.to(device=device, dtype=compute_dtype)
            if len(parts) == len(group):
                del pending[group]
                _quantize_stacked_(model, [(k, parts[k]) for k in group], blocksize,
                                   double_quant)
        elif not assign_quantized_(model, key, t.to(device=device, dtype=compute_dtype),
                                   blocksize=blocksize, double_quant=double_quant):
            _assign_param_(model, key, t, device, compute_dtype)
    if pending:
        raise EmberError(f"the checkpoint lacks part of the fused weights {sorted(pending)[:2]}")
    _check_loaded(model)
    return [n for n in names if isinstance(model.get_submodule(n), Linear4bit)]


def _quantize_stacked_(model: nn.Module, parts: list[tuple[str, torch.Tensor]], blocksize: int,
                       double_quant: bool) -> None:
    whole = torch.cat([t for _, t in parts])
    rows = [t.shape[0] for _, t in parts]
    try:
        q = NF4Weight.quantize(whole, blocksize, double_quant)
    except ValueError as e:  # e.g. inf / NaN weights: say which tensors
        raise EmberError(f"{[k for k, _ in parts]}: {e}") from e
    del whole
    if rows_straddle_blocks(rows, q.shape[1], blocksize):
        # No part is an NF4 weight of its own (bnb's blocks run across the cuts): dense parts
        # holding bnb's dequantized rows, as the loader of transformers' checkpoint keeps them.
        for (key, _), piece in zip(parts, dequantize_nf4_rows(q, rows), strict=True):
            _dense_linear_(model, key.rpartition(".")[0], piece)
        return
    for (key, _), piece in zip(parts, split_nf4_rows(q, rows, parts[0][0]), strict=True):
        assign_quantized_(model, key, piece, blocksize=blocksize, double_quant=double_quant)


def _dense_linear_(model: nn.Module, name: str, weight: torch.Tensor) -> None:
    """Module ``name`` (a Linear4bit or nn.Linear) becomes an nn.Linear holding ``weight``
    (frozen like the NF4 base it stands in for); its bias, loaded or not, is kept."""
    old = model.get_submodule(name)
    lin = nn.Linear(old.in_features, old.out_features, bias=False, device="meta")
    lin.weight = nn.Parameter(weight, requires_grad=False)
    lin.bias = old.bias
    _set_module(model, name, lin)


def load_bnb_quantized_(model: nn.Module, tensors: Iterable[tuple[str, torch.Tensor]], *, device,
                        compute_dtype: torch.dtype,
                        rename: Callable[[str], str | None] | None = None) -> list[str]:
    """Load a pre-quantized bitsandbytes NF4 checkpoint into a meta-device ``model``, streaming.
    ``tensors`` yields the checkpoint's ``(key, tensor)`` pairs as stored; ``rename`` maps a dense
    key (``model.layers.0.self_attn.q_proj.weight``) to the Ember one (None: already Ember keys).
    The linear layers that arrive quantized become ``Linear4bit`` (the others, e.g. a dense
    lm_head, stay ``nn.Linear``); the rest is cast to ``compute_dtype``. Returns the NF4 modules."""
    pending: dict[str, dict[str, torch.Tensor]] = {}
    done = []
    for key, t in tensors:
        base, suffix = split_bnb_key(key)
        ekey = rename(base) if rename is not None else base
        if ekey is None:
            raise EmberError(f"checkpoint key {key} does not belong to this model")
        parts = pending.get(ekey)
        if parts is None and not suffix:
            owner = model.get_submodule(ekey.rpartition(".")[0]) if "." in ekey else model
            if not (ekey.endswith(".weight") and t.dtype == torch.uint8 and
                    isinstance(owner, (nn.Linear, Linear4bit))):
                _assign_param_(model, ekey, t, device, compute_dtype)
                continue
        parts = pending.setdefault(ekey, {})
        parts[ekey + suffix] = t
        w = _complete_bnb(parts, ekey, device)
        if w is not None:
            del pending[ekey]
            module_name = ekey.rpartition(".")[0]
            lin = model.get_submodule(module_name)
            if not isinstance(lin, Linear4bit):
                q = Linear4bit(lin.in_features, lin.out_features, bias=False)
                q.bias = lin.bias  # loaded already, or still meta and filled by its own key
                _set_module(model, module_name, q)
                lin = q
            lin.set_weight(w)
            done.append(module_name)
    if pending:
        raise EmberError(f"incomplete bitsandbytes weights (a missing shard?): "
                         f"{sorted(pending)[:3]}")
    _check_loaded(model)
    return done


def _complete_bnb(parts: dict[str, torch.Tensor], key: str, device) -> NF4Weight | None:
    """The NF4Weight once all its bnb entries have arrived, else None."""
    qs_key = quant_state_key(parts, key)
    if qs_key is None or key not in parts:
        return None
    qs = parts[qs_key]
    nested = b'"nested_offset"' in bytes(qs.tolist())
    need = ("absmax", "quant_map") + (("nested_absmax", "nested_quant_map") if nested else ())
    if any(f"{key}.{s}" not in parts for s in need):
        return None
    return nf4_from_bnb(parts, key, device)


def _check_loaded(model: nn.Module) -> None:
    left = _meta_left(model) + [n for n, m in model.named_modules()
                                if isinstance(m, Linear4bit) and m.quant_weight is None]
    if left:
        raise EmberError(f"the checkpoint has no weights for {left[:5]}")


def dequantize_model_(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> list[str]:
    """Replace every ``Linear4bit`` by an ``nn.Linear`` holding its dequantized weight (for a
    merged bf16 export). Returns the replaced module names."""
    names = [n for n, m in model.named_modules() if isinstance(m, Linear4bit)]
    for name in names:
        q = model.get_submodule(name)
        lin = nn.Linear(q.in_features, q.out_features, bias=q.bias is not None,
                        device=q.quant_weight.device, dtype=dtype)
        with torch.no_grad():
            lin.weight.copy_(q.quant_weight.dequantize(dtype))
            if q.bias is not None:
                lin.bias.copy_(q.bias)
        _set_module(model, name, lin)
    return names
