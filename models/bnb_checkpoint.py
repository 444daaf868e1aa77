"""bitsandbytes 4-bit checkpoints (NF4, and FP4: the same format with another code) in and out of
HF folders.

In: a folder whose config.json has a ``quantization_config`` (as transformers saves a model loaded
with ``BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4" or "fp4")``). Every key,
quant state and dense shape is validated before the first weight is read (``_bnb_dense_shapes``);
``iter_bnb_checkpoint`` streams the tensors as stored and ``_load_bnb_`` hands them to
``ember.models.nf4.load_bnb_quantized_``, NF4 weights bit for bit. Out: the
``quantization_config`` a saved folder needs (``_bnb_config``), and a state dict whose NF4 layers
are dequantized while writing (``_with_nf4_weights``, for ``save_pretrained(dequantize=True)``).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError

from ember import EmberError
from ember.models.config import ModelConfig
from ember.models.hf import expert_parts, fused_parts, hf_key_to_ember, map_hf_keys
from ember.models.nf4 import (
    QS_SUFFIX,
    Linear4bit,
    _complete_bnb,
    bnb_quantization_config,
    check_quant_type,
    dequantize_nf4_rows,
    is_quant_state_key,
    load_bnb_quantized_,
    nf4_to_bnb,
    quant_state_key,
    rows_straddle_blocks,
    split_bnb_key,
    split_nf4_rows,
)
from ember.models.safetensors_io import (
    CheckpointIndex,
    open_weights,
    read_config,
    scan_checkpoint,
)
from ember.models.transformer import Transformer


def _read_quant_state(f, key: str, path: Path) -> dict:
    try:
        meta = json.loads(bytes(f.get_tensor(key).tolist()).decode("utf-8"))
        shape = tuple(int(n) for n in meta["shape"])
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise EmberError(
            f"{path}: tensor {key} is not a readable bitsandbytes quant state "
            f"({type(e).__name__}: {e})"
        ) from None
    check_quant_type(meta.get("quant_type"), f"{path}: tensor {key}")
    return {**meta, "shape": shape}


def _bnb_dense_shapes(ckpt: CheckpointIndex) -> dict[str, tuple[int, ...]]:
    """HF key -> the shape of the dense weight it stands for: a 4-bit weight's comes from its
    JSON quant state (a few hundred bytes, read now so that every key and shape is validated
    before the first weight is loaded); its absmax/quant_map/... entries are not weights."""
    quantized = ckpt.quantized_weights()
    shapes, orphans = {}, []
    for key, shape in ckpt.shapes.items():
        base, suffix = split_bnb_key(key)
        if base in quantized:
            continue
        if suffix:
            orphans.append(key)
        elif ckpt.dtypes[key] == torch.uint8:
            raise EmberError(
                f"{ckpt.key_file[key]}: tensor {key} is uint8 but has no "
                f"{key}.{QS_SUFFIX}: not a bitsandbytes 4-bit weight"
            )
        else:
            shapes[key] = shape
    if orphans:
        raise EmberError(
            f"{ckpt.folder}: {', '.join(sorted(orphans)[:3])} belong to 4-bit "
            f"weights without a {QS_SUFFIX} entry (a missing shard?)"
        )
    metas = {}
    for path in ckpt.files:
        with open_weights(path) as f:
            for base in quantized:
                qs_key = quant_state_key(ckpt.key_file, base)
                if ckpt.key_file[qs_key] == path:
                    metas[base] = _read_quant_state(f, ckpt.stored_key(qs_key), path)
    for base in sorted(quantized):
        if base not in ckpt.key_file:
            raise EmberError(
                f"{ckpt.folder}: the packed 4-bit weight {base} is missing (only "
                "its quant state is stored; a missing shard?)"
            )
        meta = metas[base]
        parts = ("absmax", "quant_map")
        if "nested_offset" in meta:
            parts += ("nested_absmax", "nested_quant_map")
        absent = [f"{base}.{p}" for p in parts if f"{base}.{p}" not in ckpt.key_file]
        if absent:
            raise EmberError(
                f"{ckpt.folder}: the 4-bit weight {base} lacks {', '.join(absent)} (a missing "
                "shard?)"
            )
        shapes[base] = meta["shape"]
    return shapes


def iter_bnb_checkpoint(
    folder: str | os.PathLike, cfg: ModelConfig | None = None, ckpt: CheckpointIndex | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(hf_key, tensor)`` for every tensor of a bitsandbytes 4-bit checkpoint, as stored
    (dense weights, packed NF4 weights and their ``.absmax`` / ``.quant_map`` / ... entries; the
    consumer is ``ember.models.nf4.load_bnb_quantized_``). Keys are HF's, since a bnb entry's name
    only maps through its weight's. Keys and dense shapes are validated against cfg first;
    packed weights stored in another dtype (``bnb_4bit_quant_storage``) come as their uint8 bytes.
    Phi-3's fused qkv_proj / gate_up_proj come split into their parts' keys (``split_nf4_rows``:
    the same dequantized rows, bit for bit; dense dequantized rows where a cut falls inside a
    4-bit block, ``rows_straddle_blocks``).
    """
    cfg = cfg if cfg is not None else read_config(folder)
    ckpt = ckpt if ckpt is not None else scan_checkpoint(folder, quantized=True)
    shapes = _bnb_dense_shapes(ckpt)
    mapping = map_hf_keys(shapes, cfg, str(ckpt.folder))
    fused = fused_parts(shapes, cfg)  # Phi-3: one stored weight (NF4 or dense), several parts
    quantized = ckpt.quantized_weights()
    experts = expert_parts(shapes, cfg, str(ckpt.folder))  # dense 3-D MoE expert stacks
    if experts.keys() & quantized:
        raise EmberError(f"{ckpt.folder}: 4-bit 3-D expert stacks ("
                         f"{min(experts.keys() & quantized)}, ...) are not supported; "
                         "bitsandbytes leaves transformers' experts dense")
    pending: dict[str, dict[str, torch.Tensor]] = {}  # a fused NF4 weight's entries so far
    for path in ckpt.files:
        keys = [k for k, p in ckpt.key_file.items()
                if p == path and (split_bnb_key(k)[0] in mapping or split_bnb_key(k)[0] in fused
                                  or k in experts)]
        try:
            with open_weights(path) as f:
                for key in keys:
                    t = f.get_tensor(ckpt.stored_key(key))
                    if key in quantized and t.dtype != torch.uint8:
                        t = t.contiguous().view(torch.uint8).reshape(-1, 1)
                    base = split_bnb_key(key)[0]
                    if key in experts:
                        for part, e, a, b in experts[key]:
                            yield part, t[e, a:b].clone()
                    elif base not in fused:
                        yield key, t
                    elif base not in quantized:
                        for part, a, b in fused[base]:
                            yield part, t[a:b].clone()
                    else:
                        yield from _split_fused_nf4(pending, key, t, fused[base])
        except SafetensorError as e:
            raise EmberError(
                f"{path}: reading tensor data failed ({e}); the file is corrupt"
            ) from None


def _split_fused_nf4(pending: dict, key: str, t: torch.Tensor, parts: list) -> Iterator:
    """Collect the bnb entries of a fused NF4 weight; once complete, yield each part's."""
    base = split_bnb_key(key)[0]
    entries = pending.setdefault(base, {})
    entries[key] = t
    w = _complete_bnb(entries, base, None)
    if w is None:
        return
    del pending[base]
    rows = [b - a for _, a, b in parts]
    if len(w.shape) == 2 and rows_straddle_blocks(rows, w.shape[1], w.blocksize):
        # bnb's 4-bit blocks run across the cuts: no part is an NF4 weight of its own, so the
        # parts load dense, as bitsandbytes dequantizes them (the same logits as its model).
        for (part, _, _), piece in zip(parts, dequantize_nf4_rows(w, rows), strict=True):
            yield part, piece
        return
    pieces = split_nf4_rows(w, rows, base)
    for (part, _, _), piece in zip(parts, pieces, strict=True):
        yield from nf4_to_bnb(piece, part).items()


def _load_bnb_(
    model: Transformer,
    folder: Path,
    ckpt: CheckpointIndex,
    device: torch.device,
    dtype: torch.dtype,
) -> None:
    """A pre-quantized bitsandbytes checkpoint: NF4 weights stay NF4 (bit for bit); the rest is
    cast to dtype. Ember computes everything in dtype (bnb_4bit_compute_dtype is not used)."""
    if not ckpt.quantized_weights():
        raise EmberError(
            f"{folder}/config.json has a quantization_config but the safetensors "
            "hold no 4-bit weights; remove quantization_config to load it dense"
        )
    tensors = iter_bnb_checkpoint(folder, model.cfg, ckpt)
    load_bnb_quantized_(model, tensors, device=device, compute_dtype=dtype,
                        rename=lambda key: hf_key_to_ember(key, model.cfg))
    for name in ("lm_head", "score"):
        head = getattr(model, name)
        if isinstance(head, Linear4bit):
            # logits(), the fused loss and classify() read a head as a dense (V, D) matrix (a
            # classifier's score is 4-bit when llm_int8_skip_modules does not list it).
            dense = nn.Linear(head.in_features, head.out_features, bias=head.bias is not None,
                              device=device, dtype=dtype)
            with torch.no_grad():
                dense.weight.copy_(head.quant_weight.dequantize(dtype))
                if head.bias is not None:
                    dense.bias.copy_(head.bias)
            setattr(model, name, dense)
    model.reset_rope_(device)


def _bnb_config(hf: dict, dense: list[str], cfg: ModelConfig, dtype: torch.dtype) -> dict:
    """``quantization_config`` for a bnb 4-bit folder. transformers decides which linears to
    convert from the config alone: by default all but the output head (a classifier's
    ``score``), else all but ``llm_int8_skip_modules``, which therefore lists every linear Ember
    keeps dense."""
    keep = {  # every dense matrix but the embedding: projections, lm_head, a classifier's score
        k.removesuffix(".weight")
        for k in dense
        if k.endswith(".weight") and len(hf[k].shape) == 2 and not k.endswith("embed_tokens.weight")
    }
    if cfg.tie_word_embeddings:
        keep.add("lm_head")  # tied to the embedding, never quantized
    quant_types = {k.rpartition("__")[2] for k in hf if is_quant_state_key(k)}
    if len(quant_types) > 1:
        raise EmberError("save_pretrained: the model mixes NF4 and FP4 layers, which one "
                         "bitsandbytes quantization_config cannot describe; save it with "
                         "dequantize=True")
    return bnb_quantization_config(
        dtype,
        double_quant=any(k.endswith(".nested_absmax") for k in hf),
        skip_modules=None if keep == {"lm_head"} else sorted(keep),
        quant_type=quant_types.pop(),
    )


def _with_nf4_weights(model: nn.Module, sd: dict, only: re.Pattern | None = None) -> dict:
    """sd with each Linear4bit's bnb entries (those whose module name ``only`` finds, if given)
    replaced by its NF4Weight, dequantized on write."""
    nf4 = {
        f"{n}.weight": m.quant_weight for n, m in model.named_modules()
        if isinstance(m, Linear4bit) and (only is None or only.search(n))
    }
    out = {}
    for k, v in sd.items():
        base = split_bnb_key(k)[0]
        if base not in nf4:
            out[k] = v
        elif k == base:
            out[k] = nf4[base]
    return out
