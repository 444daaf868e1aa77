"""bitsandbytes' 4-bit tensor format: one weight's state dict entries and their validation,
the quant state keys (NF4 and FP4), ``quantization_config`` for config.json.

``nf4_to_bnb`` / ``nf4_from_bnb`` turn an ``NF4Weight`` into bitsandbytes' entries and back, byte
for byte (``ember.models.nf4``'s docstring lists them); ``nf4_from_bnb`` checks that the entries
fit together (sizes, dtypes, the JSON quant state) and names what is wrong, since a checkpoint
that does not would dequantize to garbage or fail deep inside a kernel.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping

import torch

from ember import EmberError
from ember.kernels.nf4 import BLOCKSIZES, NESTED_BLOCKSIZE, NF4State, NF4Weight

QS_SUFFIX = "quant_state.bitsandbytes__nf4"
# bnb's FP4 (``bnb_4bit_quant_type="fp4"``, BitsAndBytesConfig's default) is the same format with
# another 16-value code (its ``quant_map``), so it loads, trains and saves like NF4.
QS_SUFFIXES = (QS_SUFFIX, "quant_state.bitsandbytes__fp4")
QUANT_TYPES = ("nf4", "fp4")
BNB_SUFFIXES = ("absmax", "quant_map", "nested_absmax", "nested_quant_map", *QS_SUFFIXES)


def is_quant_state_key(key: str) -> bool:
    """True for a bitsandbytes 4-bit quant state entry (``...weight.quant_state.bitsandbytes__nf4``
    or ``__fp4``)."""
    return key.endswith(tuple("." + s for s in QS_SUFFIXES))


def quant_state_key(keys, base: str) -> str | None:
    """The key of ``base``'s quant state among ``keys`` (NF4 or FP4), None if it has none."""
    return next((f"{base}.{s}" for s in QS_SUFFIXES if f"{base}.{s}" in keys), None)



def nf4_to_bnb(w: NF4Weight, key: str = "weight") -> dict[str, torch.Tensor]:
    """The bitsandbytes tensors of one weight, named from ``key`` (e.g. ``...q_proj.weight``)."""
    st = w.state
    out = {key: w.packed, f"{key}.absmax": st.absmax, f"{key}.quant_map": st.code}
    if st.nested:
        out[f"{key}.nested_absmax"] = st.nested_absmax
        out[f"{key}.nested_quant_map"] = st.nested_code.clone()
    out[f"{key}.quant_state.bitsandbytes__{st.quant_type}"] = torch.tensor(
        list(st.quant_state_json().encode()), dtype=torch.uint8)
    return out


def nf4_from_bnb(tensors: Mapping[str, torch.Tensor], key: str = "weight",
                 device=None) -> NF4Weight:
    """Inverse of ``nf4_to_bnb``: ``tensors`` holds ``key`` and its ``key.<suffix>`` entries."""
    qs_key = quant_state_key(tensors, key)
    if qs_key is None:
        other = [k for k in tensors if k.startswith(f"{key}.quant_state.")]
        if other:
            raise EmberError(f"{other[0]}: not a bitsandbytes 4-bit quant state (only "
                             f"{' / '.join(QS_SUFFIXES)} load)")
        raise EmberError(f"{key}: missing '{key}.{QS_SUFFIX}', this is not a bitsandbytes "
                         "4-bit weight")
    try:
        meta = json.loads(bytes(tensors[qs_key].cpu().tolist()).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise EmberError(f"{qs_key}: unreadable quant state ({e})") from e
    check_quant_type(meta.get("quant_type"), qs_key)
    if not qs_key.endswith("__" + meta["quant_type"]):
        raise EmberError(f"{qs_key}: its JSON says quant_type {meta['quant_type']!r}, its name "
                         "another; the checkpoint is corrupt: save it again")
    shape, dtype, blocksize, nested_blocksize = _meta_fields(meta, qs_key)
    dev = device if device is not None else tensors[key].device
    nested = "nested_offset" in meta
    entries = {s: tensors.get(f"{key}.{s}") for s in _ENTRIES}
    absent = [f"{key}.{s}" for s in _ENTRIES[:4 if nested else 2] if entries[s] is None]
    if absent:
        raise EmberError(f"{key}: the 4-bit weight lacks {', '.join(absent)} (a missing shard?)")
    if not nested and (entries["nested_absmax"] is not None or
                       entries["absmax"].dtype == torch.uint8):
        raise EmberError(f"{qs_key}: the weight's absmax is double-quantized but its quant "
                         f"state has no nested_offset; {_CORRUPT}")
    packed = tensors[key]
    if packed.dtype != torch.uint8:  # bnb_4bit_quant_storage other than uint8: same bytes
        packed = packed.contiguous().view(torch.uint8)
    n = shape.numel()
    blocks = -(-n // blocksize)
    want = {"": (packed, (n + 1) // 2, torch.uint8), "absmax": (entries["absmax"], blocks,
            torch.uint8 if nested else None), "quant_map": (entries["quant_map"], 16, None)}
    if nested:
        want.update(nested_absmax=(entries["nested_absmax"], -(-blocks // nested_blocksize), None),
                    nested_quant_map=(entries["nested_quant_map"], 256, None))
    for suffix, (t, numel, need) in want.items():
        if t.numel() != numel or (t.dtype != need if need else not t.is_floating_point()):
            raise EmberError(
                f"{key}{'.' if suffix else ''}{suffix} is {str(t.dtype).removeprefix('torch.')} "
                f"with {t.numel()} values, but a {tuple(shape)} weight in 4-bit blocks of "
                f"{blocksize} needs {numel} {str(need or 'floats').removeprefix('torch.')}; "
                f"{_CORRUPT}")
    get = lambda suffix: entries[suffix].to(dev)
    state = NF4State(
        absmax=get("absmax") if nested else get("absmax").float(), shape=shape, dtype=dtype,
        blocksize=blocksize, code=get("quant_map").float(),
        offset=float(meta["nested_offset"]) if nested else None,
        nested_absmax=get("nested_absmax").float() if nested else None,
        nested_code=get("nested_quant_map").float() if nested else None,
        nested_blocksize=nested_blocksize, quant_type=meta["quant_type"])
    return NF4Weight(packed.to(dev).reshape(-1, 1), state)


_ENTRIES = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")
_CORRUPT = "the checkpoint is corrupt: save it again with transformers + bitsandbytes"
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _meta_fields(meta: Mapping, qs_key: str) -> tuple[torch.Size, torch.dtype, int, int]:
    """(shape, dtype, blocksize, nested_blocksize) of a JSON quant state, validated."""
    missing = [k for k in ("shape", "dtype", "blocksize") if k not in meta]
    if missing:
        raise EmberError(f"{qs_key}: the quant state lacks {', '.join(missing)}; {_CORRUPT}")
    if meta["dtype"] not in _DTYPES:
        raise EmberError(f"{qs_key}: dtype {meta['dtype']!r} is not one of {sorted(_DTYPES)}; "
                         f"{_CORRUPT}")
    try:
        shape = torch.Size(int(d) for d in meta["shape"])
        blocksize = int(meta["blocksize"])
        nested_blocksize = int(meta.get("nested_blocksize", NESTED_BLOCKSIZE))
        if "nested_offset" in meta:
            float(meta["nested_offset"])
    except (TypeError, ValueError) as e:
        raise EmberError(f"{qs_key}: unreadable quant state ({e}); {_CORRUPT}") from None
    if blocksize not in BLOCKSIZES or nested_blocksize not in BLOCKSIZES:
        raise EmberError(f"{qs_key}: blocksize {blocksize} / nested_blocksize "
                         f"{nested_blocksize} is not one of bitsandbytes' {BLOCKSIZES}; "
                         f"{_CORRUPT}")
    return shape, _DTYPES[meta["dtype"]], blocksize, nested_blocksize



def split_bnb_key(key: str) -> tuple[str, str]:
    """``'a.weight.absmax'`` -> ``('a.weight', '.absmax')``; other keys -> ``(key, '')``. A loader
    renames the weight part like any dense weight and appends the suffix again."""
    for suffix in BNB_SUFFIXES:
        if key.endswith("." + suffix):
            return key[: -len(suffix) - 1], "." + suffix
    return key, ""


def rename_bnb_keys(state_dict: Mapping[str, torch.Tensor],
                    rename: Callable[[str], str]) -> dict[str, torch.Tensor]:
    """Apply a dense-key renaming (e.g. ember -> HF names) to a state dict with bnb entries."""
    out = {}
    for key, value in state_dict.items():
        base, suffix = split_bnb_key(key)
        out[rename(base) + suffix] = value
    return out


def load_bnb_4bit_state(state_dict: Mapping[str, torch.Tensor],
                        quantization_config: Mapping | None = None, device=None):
    """Split a pre-quantized bitsandbytes state dict into ``({weight key: NF4Weight}, rest)``;
    the weight keys are the dense names (``model.layers.0.self_attn.q_proj.weight``).
    ``quantization_config``: config.json's, or transformers' ``BitsAndBytesConfig`` (a model's
    ``config.quantization_config``)."""
    if quantization_config is not None:
        if not isinstance(quantization_config, Mapping) and hasattr(quantization_config,
                                                                    "to_dict"):
            quantization_config = quantization_config.to_dict()
        if not isinstance(quantization_config, Mapping):
            raise EmberError(f"quantization_config must be a dict or a transformers "
                             f"BitsAndBytesConfig, got {type(quantization_config).__name__}")
        check_quantization_config(quantization_config)
    bases = {split_bnb_key(k)[0] for k in state_dict if is_quant_state_key(k)}
    # int8 is also a bnb_4bit_quant_storage dtype of packed 4-bit weights
    if any(v.dtype == torch.int8 and k not in bases for k, v in state_dict.items()):
        raise EmberError("an 8-bit (LLM.int8) state dict, not a 4-bit one: load its folder with "
                         "load_pretrained, which dequantizes it")
    quantized, rest = {}, {}
    for key, value in state_dict.items():
        base, _ = split_bnb_key(key)
        if base not in bases:
            rest[key] = value
    for base in sorted(bases):
        parts = {k: v for k, v in state_dict.items() if split_bnb_key(k)[0] == base}
        if base not in parts:
            raise EmberError(f"{base}: the checkpoint has its quant state but not the packed "
                             "weight itself (a missing shard?)")
        quantized[base] = nf4_from_bnb(parts, base, device)
    return quantized, rest


def bnb_quantization_config(compute_dtype: torch.dtype = torch.bfloat16, *,
                            double_quant: bool = True,
                            skip_modules: Iterable[str] | None = None,
                            quant_type: str = "nf4") -> dict:
    """``quantization_config`` for config.json, as transformers writes it for NF4 (or FP4)."""
    return {"_load_in_4bit": True, "_load_in_8bit": False,
            "bnb_4bit_compute_dtype": str(compute_dtype).removeprefix("torch."),
            "bnb_4bit_quant_storage": "uint8", "bnb_4bit_quant_type": quant_type,
            "bnb_4bit_use_double_quant": double_quant, "llm_int8_enable_fp32_cpu_offload": False,
            "llm_int8_has_fp16_weight": False,
            "llm_int8_skip_modules": list(skip_modules) if skip_modules is not None else None,
            "llm_int8_threshold": 6.0, "load_in_4bit": True, "load_in_8bit": False,
            "quant_method": "bitsandbytes"}


def check_quantization_config(cfg: Mapping) -> None:
    """Reject quantization configs Ember cannot load, with a message that says why."""
    method = cfg.get("quant_method")
    # transformers' AutoQuantizationConfig: load_in_4bit / load_in_8bit make it bitsandbytes (a
    # config written before quant_method existed has only those).
    if method is None and (cfg.get("load_in_4bit") or cfg.get("load_in_8bit")):
        method = "bitsandbytes"
    if method != "bitsandbytes":
        raise EmberError(f"quantization_config.quant_method={method!r}: only bitsandbytes "
                         "checkpoints (4-bit NF4, 8-bit) load; use the unquantized model with "
                         "quantize='nf4'")
    if cfg.get("load_in_8bit") or cfg.get("_load_in_8bit"):
        return  # LLM.int8: loaded dequantized (ember.models.bnb_int8)
    if not (cfg.get("load_in_4bit") or cfg.get("_load_in_4bit")):
        raise EmberError("quantization_config: bitsandbytes with neither load_in_4bit nor "
                         "load_in_8bit; save the checkpoint again")
    # The 4-bit weights' own quant states say NF4 or FP4 (and win, as in bitsandbytes' loader).
    check_quant_type(cfg.get("bnb_4bit_quant_type", "fp4"),
                     "quantization_config.bnb_4bit_quant_type")


def check_quant_type(quant_type, where: str) -> None:
    if quant_type not in QUANT_TYPES:
        raise EmberError(f"{where}: bitsandbytes quant_type {quant_type!r} is not one of "
                         f"{QUANT_TYPES}; save the checkpoint again with transformers + "
                         "bitsandbytes, or load the unquantized model with quantize='nf4'")
