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
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace

import torch
import torch.nn as nn

from ember import EmberError
from ember.kernels.nf4 import NF4Weight, _absmax_ref, nf4_linear

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
from ember.models.bnb_format import nf4_from_bnb, nf4_to_bnb, quant_state_key, split_bnb_key
from ember.models.bnb_format import rename_bnb_keys as rename_bnb_keys
from ember.models.nf4_storage import STORAGE_DTYPE, NF4Layout, pack_nf4, unpack_nf4


# ---------------------------------------------------------------------------- NF4 row blocks
def rows_straddle_blocks(rows: Sequence[int], k: int, blocksize: int) -> bool:
    """True when cutting a (sum(rows), k) weight into ``rows`` falls inside a 4-bit block (a
    width k times a part's rows not a multiple of blocksize: tiny or odd Phi-3 configs). Such a
    part is no NF4 weight of its own: ``split_nf4_rows`` refuses it, and loaders keep it dense
    (``dequantize_nf4_rows``), bnb's dequantized rows."""
    at = 0
    for r in rows[:-1]:
        at += r
        if at * k % blocksize:
            return True
    return False


def dequantize_nf4_rows(w: NF4Weight, rows: Sequence[int]) -> list[torch.Tensor]:
    """A 2D NF4 weight dequantized (in its own dtype, as bitsandbytes does) and cut into row
    blocks: the dense parts of a fused weight whose cuts straddle 4-bit blocks."""
    return [t.clone() for t in w.dequantize().split(list(rows))]


def split_nf4_rows(w: NF4Weight, rows: Sequence[int], key: str) -> list[NF4Weight]:
    """A 2D NF4 weight cut into row blocks (Phi-3's fused qkv_proj / gate_up_proj), each part
    dequantizing to exactly the whole's rows. The cuts must fall between 4-bit blocks; a nested
    absmax is sliced where the cuts also fall between its 256-value blocks (real model sizes),
    else each part keeps the fp32 absmax it dequantizes to (bit-identical weights)."""
    st = w.state
    k = st.shape[1] if len(st.shape) == 2 else 0
    cuts = [0]
    for r in rows:
        cuts.append(cuts[-1] + r)
    if len(st.shape) != 2 or cuts[-1] != st.shape[0]:
        raise EmberError(f"{key}: NF4 weight of shape {tuple(st.shape)} cannot be cut into "
                         f"{list(rows)} rows")
    bs, nbs = st.blocksize, st.nested_blocksize
    if any(c * k % bs for c in cuts[1:-1]):
        raise EmberError(f"{key}: its 4-bit blocks of {bs} values straddle the parts (rows "
                         f"{cuts[1:-1]} of {k} values); load the unquantized model with "
                         "quantize='nf4'")
    sliced = not st.nested or all(c * k // bs % nbs == 0 for c in cuts[1:-1])
    absmax = st.absmax if sliced else _absmax_ref(st)
    flat = w.packed.reshape(-1)
    parts = []
    for a, b in zip(cuts[:-1], cuts[1:], strict=False):
        ba, bb = a * k // bs, -(-b * k // bs)
        part = replace(st, shape=torch.Size((b - a, k)), absmax=absmax[ba:bb].clone())
        if st.nested and sliced:
            part = replace(part, nested_absmax=st.nested_absmax[ba // nbs:-(-bb // nbs)].clone())
        elif st.nested:
            part = replace(part, offset=None, nested_absmax=None, nested_code=None)
        parts.append(NF4Weight(flat[a * k // 2:(b * k + 1) // 2].clone().reshape(-1, 1), part))
    return parts


def cat_nf4_rows(ws: Sequence[NF4Weight], key: str) -> NF4Weight:
    """The inverse of ``split_nf4_rows``: row blocks stacked into one NF4 weight, exactly (the
    parts' 4-bit blocks and double-quantization statistics must line up as one weight's would:
    parts quantized one by one with double quantization have their own offsets)."""
    st = ws[0].state
    k, bs, nbs = st.shape[-1], st.blocksize, st.nested_blocksize
    if any(len(w.shape) != 2 or w.shape[1] != k or w.blocksize != bs or w.dtype != st.dtype
           or w.state.quant_type != st.quant_type for w in ws):
        raise EmberError(f"{key}: its NF4 parts differ in width, blocksize, dtype or quant_type "
                         f"({[tuple(w.shape) for w in ws]}); save with dequantize=True")
    if any(w.numel() % bs for w in ws[:-1]):
        raise EmberError(f"{key}: its 4-bit blocks of {bs} values would straddle the parts; "
                         "save with dequantize=True")
    if not any(w.state.nested for w in ws):
        state = replace(st, absmax=torch.cat([w.state.absmax for w in ws]))
    elif (all(w.state.nested and w.state.offset_value == st.offset_value and
              w.state.nested_blocksize == nbs and torch.equal(w.state.nested_code, st.nested_code)
              for w in ws) and all(w.state.absmax.numel() % nbs == 0 for w in ws[:-1])):
        state = replace(st, absmax=torch.cat([w.state.absmax for w in ws]),
                        nested_absmax=torch.cat([w.state.nested_absmax for w in ws]))
    else:
        raise EmberError(f"{key}: its parts were quantized one by one (each with its own "
                         "double-quantization statistics), so bitsandbytes' fused weight would "
                         "need re-quantizing; save with dequantize=True")
    shape = torch.Size((sum(w.shape[0] for w in ws), k))
    packed = torch.cat([w.packed.reshape(-1) for w in ws]).reshape(-1, 1)
    return NF4Weight(packed, replace(state, shape=shape))


# ---------------------------------------------------------------------------------- Linear4bit
class Linear4bit(nn.Module):
    """y = x W^T + b with W stored as NF4 (frozen); output in x.dtype. ``quant_weight`` is None
    until a weight is set (``set_weight`` or ``load_state_dict``).

    Flat-storage mode (``store_flat_``): all the weight's NF4 bytes become one frozen 1-D
    Parameter, ``nf4_storage`` (``ember.models.nf4_storage``), and ``quant_weight`` is rebuilt
    from it at each use as views of whatever tensor that Parameter is then, so a wrapper that
    swaps Parameters (a data-parallel one sharding them, gathering them for the forward) moves
    the 4-bit base like any other weight. The state dict then holds ``nf4_storage`` rather
    than bitsandbytes' entries; the weight can no longer be replaced."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 device=None, dtype=None, quant_weight: NF4Weight | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.nf4_layout: NF4Layout | None = None  # set in flat-storage mode
        self.quant_weight = quant_weight
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype))
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, blocksize: int = 64,
                    double_quant: bool = True) -> Linear4bit:
        q = cls(linear.in_features, linear.out_features, bias=False)
        q.set_weight(linear.weight.detach(), blocksize=blocksize, double_quant=double_quant)
        if linear.bias is not None:
            q.bias = nn.Parameter(linear.bias.detach(), requires_grad=linear.bias.requires_grad)
        return q

    def set_weight(self, weight: torch.Tensor | NF4Weight, *, blocksize: int = 64,
                   double_quant: bool = True) -> None:
        """Quantize a dense (out, in) weight on its device, or take an ``NF4Weight`` as is."""
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise EmberError(f"Linear4bit: weight of shape {tuple(weight.shape)} does not fit "
                             f"({self.out_features}, {self.in_features})")
        if isinstance(weight, torch.Tensor):
            if weight.device.type == "meta":
                raise EmberError("Linear4bit: cannot quantize a meta tensor; load real weights")
            weight = NF4Weight.quantize(weight, blocksize, double_quant)
        self.quant_weight = weight

    def _device(self):
        """Where a loaded weight goes: the current weight's device, else the bias's (unless meta),
        else wherever the state dict's tensor is."""
        if self.quant_weight is not None:
            return self.quant_weight.device
        if self.bias is not None and self.bias.device.type != "meta":
            return self.bias.device
        return None

    @property
    def quant_weight(self) -> NF4Weight | None:
        if self.nf4_layout is not None:
            return unpack_nf4(self.nf4_storage, self.nf4_layout)
        return self._quant_weight

    @quant_weight.setter
    def quant_weight(self, weight: NF4Weight | None) -> None:
        if self.nf4_layout is not None:
            raise EmberError("Linear4bit: this layer keeps its NF4 bytes as one parameter "
                             "(flat storage, e.g. sharded across processes); its weight cannot "
                             "be replaced")
        self._quant_weight = weight

    def store_flat_(self, layout: NF4Layout | None = None) -> None:
        """Switch to flat-storage mode (see the class docstring). Without ``layout``: pack the
        current weight. With one (e.g. another process's ``nf4_layout``): an uninitialized
        storage of that layout on the meta device, for a copy of a layer whose bytes arrive
        later (``load_state_dict``); the layer's weight, if any, is dropped."""
        if self.nf4_layout is not None:
            raise EmberError("Linear4bit: the NF4 weight is in flat storage already")
        if layout is None:
            if self._quant_weight is None:
                raise EmberError("Linear4bit: no NF4 weight to store; load the weights first")
            storage, layout = pack_nf4(self._quant_weight)
        else:
            storage = torch.empty(layout.numel, dtype=STORAGE_DTYPE, device="meta")
        if tuple(layout.shape) != (self.out_features, self.in_features):
            raise EmberError(f"Linear4bit: an NF4 layout of shape {layout.shape} does not fit "
                             f"({self.out_features}, {self.in_features})")
        self._quant_weight = None
        self.nf4_storage = nn.Parameter(storage, requires_grad=False)
        self.nf4_layout = layout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.quant_weight
        if w is None:
            raise EmberError("Linear4bit has no weight yet: load a checkpoint or call set_weight")
        return nf4_linear(x, w, self.bias)

    def _apply(self, fn, recurse=True):
        # The NF4 bytes follow the module's device moves, never a dtype cast (which would break
        # them: exact absmax values, codes that are no numbers).
        if self.nf4_layout is not None:
            storage = self.nf4_storage
            probe = fn(torch.empty(0, dtype=storage.dtype, device=storage.device))
            if probe.dtype == storage.dtype:
                return super()._apply(fn, recurse)
            del self._parameters["nf4_storage"]
            try:
                super()._apply(fn, recurse)
            finally:
                self.nf4_storage = nn.Parameter(storage.to(probe.device), requires_grad=False)
            return self
        if self._quant_weight is not None:
            probe = fn(torch.empty(0, device=self._quant_weight.device))
            if probe.device != self._quant_weight.device:
                self._quant_weight = self._quant_weight.to(probe.device)
        return super()._apply(fn, recurse)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        if self._quant_weight is not None:
            destination.update(nf4_to_bnb(self._quant_weight, prefix + "weight"))
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        if self.nf4_layout is not None:  # nf4_storage is a Parameter like the bias
            super()._load_from_state_dict(state_dict, prefix, local_metadata, strict,
                                          missing_keys, unexpected_keys, error_msgs)
            return
        key = prefix + "weight"
        mine = {k: v for k, v in state_dict.items() if k == key or k.startswith(key + ".")}
        if key not in mine:
            missing_keys.append(key)
        else:
            device = self._device()
            try:
                if len(mine) == 1 and mine[key].is_floating_point():  # a dense checkpoint
                    w = mine[key].to(device) if device is not None else mine[key]
                    self.set_weight(w)
                else:
                    self.set_weight(nf4_from_bnb(mine, key, device))
            except EmberError as e:
                error_msgs.append(str(e))
        rest = {k: v for k, v in state_dict.items() if k not in mine}
        super()._load_from_state_dict(rest, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def extra_repr(self) -> str:
        qw, lay = self._quant_weight, self.nf4_layout
        nf4 = ("None" if qw is None else f"blocksize {qw.blocksize}, nested {qw.state.nested}")
        if lay is not None:
            nf4 = f"blocksize {lay.blocksize}, nested {lay.offset is not None}, flat storage"
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, nf4={nf4}")


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
