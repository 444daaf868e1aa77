"""Hugging Face <-> Ember state dicts, as pure functions: the key table and its transforms.

State dicts are renamed through ``KEY_TABLE`` (with ``SANDWICH_KEYS`` first for Gemma 2/3, whose
``post_attention_layernorm`` is the norm on the attention output); the transforms are Phi-3's
fused ``qkv_proj`` / ``gate_up_proj`` weights, split into Ember's projections on import and
concatenated on export, and transformers 5's 3-D MoE expert stacks (``ember.models.hf_moe``
``expert_parts``), split per expert on import. Tied checkpoints may or may not carry
``lm_head.weight``: it is accepted (shape-checked) and dropped on import, and never written on
export, exactly as transformers saves tied models.

A bitsandbytes 4-bit weight is ``<key>`` (packed uint8) plus ``<key>.absmax`` etc.
(``ember.models.nf4``); those entries are renamed with their weight, and ``to_hf_state_dict``
accepts them (Phi-3's NF4 parts are stacked into one fused NF4 weight, ``cat_nf4_rows``).

A multimodal Gemma 3 checkpoint (Gemma3ForConditionalGeneration) holds the language model under a
prefix beside the vision tower and projector; ``split_multimodal_keys`` gives the text model's
names of its keys (and the vision keys, which a text-only model does not load) and
``multimodal_key`` the stored name back for export.

config.json <-> ``ModelConfig`` (supported model types, field validation, RoPE and sliding-window
parsing, ``quantization_config``) is in ``ember.models.hf_config``; its public names are
importable from here too.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping

import torch

from ember import EmberError
from ember.models.config import ModelConfig
from ember.models.deferred import Deferred
from ember.models.hf_config import (
    ARCHITECTURES,
    DTYPES,
    SUPPORTED_MODEL_TYPES,
    config_from_hf,
    quantization_config_from_hf,
)
from ember.models.hf_config_export import config_to_hf
from ember.models.hf_moe import expert_parts, is_empty_shared_expert
from ember.models.hf_phi import KEYS as PHI_KEYS
from ember.models.hf_starcoder2 import KEYS as STARCODER2_KEYS
from ember.models.nf4 import (
    QS_SUFFIX,
    cat_nf4_rows,
    is_quant_state_key,
    nf4_from_bnb,
    nf4_to_bnb,
    quant_state_key,
    split_bnb_key,
)

__all__ = [
    "ARCHITECTURES",
    "DTYPES",
    "KEY_TABLE",
    "MOE_KEYS",
    "SANDWICH_KEYS",
    "SUPPORTED_MODEL_TYPES",
    "config_from_hf",
    "config_to_hf",
    "ember_key_to_hf",
    "expected_shapes",
    "expert_parts",
    "from_hf_state_dict",
    "fused_groups",
    "fused_parts",
    "hf_key_to_ember",
    "map_hf_keys",
    "multimodal_key",
    "quantization_config_from_hf",
    "split_fused",
    "split_multimodal_keys",
    "to_hf_state_dict",
]

# (ember key template, HF key template); "{i}" is a layer index.
KEY_TABLE: list[tuple[str, str]] = [
    ("embed.weight", "model.embed_tokens.weight"),
    ("layers.{i}.attn_norm.weight", "model.layers.{i}.input_layernorm.weight"),
    ("layers.{i}.attn.q_proj.weight", "model.layers.{i}.self_attn.q_proj.weight"),
    ("layers.{i}.attn.q_proj.bias", "model.layers.{i}.self_attn.q_proj.bias"),
    ("layers.{i}.attn.k_proj.weight", "model.layers.{i}.self_attn.k_proj.weight"),
    ("layers.{i}.attn.k_proj.bias", "model.layers.{i}.self_attn.k_proj.bias"),
    ("layers.{i}.attn.v_proj.weight", "model.layers.{i}.self_attn.v_proj.weight"),
    ("layers.{i}.attn.v_proj.bias", "model.layers.{i}.self_attn.v_proj.bias"),
    ("layers.{i}.attn.o_proj.weight", "model.layers.{i}.self_attn.o_proj.weight"),
    ("layers.{i}.attn.o_proj.bias", "model.layers.{i}.self_attn.o_proj.bias"),
    ("layers.{i}.attn.q_norm.weight", "model.layers.{i}.self_attn.q_norm.weight"),
    ("layers.{i}.attn.k_norm.weight", "model.layers.{i}.self_attn.k_norm.weight"),
    ("layers.{i}.mlp_norm.weight", "model.layers.{i}.post_attention_layernorm.weight"),
    ("layers.{i}.mlp.gate_proj.weight", "model.layers.{i}.mlp.gate_proj.weight"),
    ("layers.{i}.mlp.gate_proj.bias", "model.layers.{i}.mlp.gate_proj.bias"),
    ("layers.{i}.mlp.up_proj.weight", "model.layers.{i}.mlp.up_proj.weight"),
    ("layers.{i}.mlp.up_proj.bias", "model.layers.{i}.mlp.up_proj.bias"),
    ("layers.{i}.mlp.down_proj.weight", "model.layers.{i}.mlp.down_proj.weight"),
    ("layers.{i}.mlp.down_proj.bias", "model.layers.{i}.mlp.down_proj.bias"),
    ("norm.weight", "model.norm.weight"),
    ("lm_head.weight", "lm_head.weight"),
    ("score.weight", "score.weight"),  # classifiers (ember.models.heads)
]

# Gemma 2/3 (cfg.sandwich_norms): the same HF name means another norm, so these rows come first.
SANDWICH_KEYS: list[tuple[str, str]] = [
    ("layers.{i}.attn_post_norm.weight", "model.layers.{i}.post_attention_layernorm.weight"),
    ("layers.{i}.mlp_norm.weight", "model.layers.{i}.pre_feedforward_layernorm.weight"),
    ("layers.{i}.mlp_post_norm.weight", "model.layers.{i}.post_feedforward_layernorm.weight"),
]

# Mixture-of-experts layers ("{e}" is an expert index), as transformers 5 saves them (it fuses the
# experts into 3-D parameters in memory but writes one key per expert and projection).
_QWEN_MOE_KEYS = [
    ("layers.{i}.mlp.gate.weight", "model.layers.{i}.mlp.gate.weight"),
    *[(f"layers.{{i}}.mlp.experts.{{e}}.{p}.weight",
       f"model.layers.{{i}}.mlp.experts.{{e}}.{p}.weight")
      for p in ("gate_proj", "up_proj", "down_proj")],
    *[(f"layers.{{i}}.mlp.shared_expert.{p}.weight",
       f"model.layers.{{i}}.mlp.shared_expert.{p}.weight")
      for p in ("gate_proj", "up_proj", "down_proj")],
    ("layers.{i}.mlp.shared_expert_gate.weight", "model.layers.{i}.mlp.shared_expert_gate.weight"),
]
MOE_KEYS: dict[str, list[tuple[str, str]]] = {
    # Mixtral: w1 = gate, w3 = up, w2 = down
    "mixtral": [
        ("layers.{i}.mlp.gate.weight", "model.layers.{i}.block_sparse_moe.gate.weight"),
        # the router as transformers 5 names it in memory (stacked-expert checkpoints: hf_moe)
        ("layers.{i}.mlp.gate.weight", "model.layers.{i}.mlp.gate.weight"),
        *[(f"layers.{{i}}.mlp.experts.{{e}}.{p}.weight",
           f"model.layers.{{i}}.block_sparse_moe.experts.{{e}}.{w}.weight")
          for p, w in (("gate_proj", "w1"), ("up_proj", "w3"), ("down_proj", "w2"))],
    ],
    "qwen2_moe": _QWEN_MOE_KEYS,
    "qwen3_moe": _QWEN_MOE_KEYS,
}

# Phi-3 stores q/k/v as one qkv_proj and gate/up as one gate_up_proj (rows stacked in this order):
# split into Ember's projections on import, concatenated back on export.
_FUSED = {
    "self_attn.qkv_proj.weight": (
        "self_attn.q_proj.weight",
        "self_attn.k_proj.weight",
        "self_attn.v_proj.weight",
    ),
    "mlp.gate_up_proj.weight": ("mlp.gate_proj.weight", "mlp.up_proj.weight"),
}
_FUSED_KEY = re.compile(
    r"(model\.layers\.\d+\.)(self_attn\.qkv_proj\.weight|mlp\.gate_up_proj\.weight)"
)


def _part_rows(cfg: ModelConfig, fused_suffix: str) -> list[int]:
    hd = cfg.head_dim
    if fused_suffix.startswith("self_attn"):
        return [cfg.num_heads * hd, cfg.num_kv_heads * hd, cfg.num_kv_heads * hd]
    return [cfg.intermediate_size, cfg.intermediate_size]


def fused_parts(
    hf_shapes: Mapping[str, tuple[int, ...]], cfg: ModelConfig
) -> dict[str, list[tuple[str, int, int]]]:
    """For a fused-projection family (Phi-3): ``{fused HF key: [(part HF key, first row, end
    row)]}`` for the fused keys present; {} for every other family."""
    if cfg.model_type != "phi3":
        return {}
    out = {}
    for key in hf_shapes:
        m = _FUSED_KEY.fullmatch(key)
        if m is None:
            continue
        rows, start, parts = _part_rows(cfg, m[2]), 0, []
        for part, n in zip(_FUSED[m[2]], rows, strict=True):
            parts.append((m[1] + part, start, start + n))
            start += n
        out[key] = parts
    return out


def fused_groups(cfg: ModelConfig) -> list[list[str]]:
    """The Ember weight keys stored as one fused weight (Phi-3: q/k/v and gate/up of each layer,
    in stacking order); [] for every other family."""
    if cfg.model_type != "phi3":
        return []
    return [[hf_key_to_ember(f"model.layers.{i}.{p}", cfg) for p in parts]
            for i in range(cfg.num_layers) for parts in _FUSED.values()]


def _unfused_shapes(hf_shapes: Mapping[str, tuple[int, ...]], cfg: ModelConfig, where: str):
    """hf_shapes with each fused weight (and 3-D expert stack) replaced by its parts
    (shape-checked)."""
    fused, experts = fused_parts(hf_shapes, cfg), expert_parts(hf_shapes, cfg, where)
    if not fused and not experts:
        return hf_shapes
    out = {k: v for k, v in hf_shapes.items() if k not in fused and k not in experts}
    for key, parts in [*experts.items(), *fused.items()]:
        twice = next((p[0] for p in parts if p[0] in hf_shapes), None)
        if twice is not None:
            raise EmberError(f"{where}: {twice} is stored on its own and inside {key} (two key "
                             "layouts mixed): which one is the weight is ambiguous; save the "
                             "checkpoint again from the model it came from")
    for key, parts in experts.items():
        out.update({part: (b - a, hf_shapes[key][2]) for part, _, a, b in parts})
    for key, parts in fused.items():
        shape = tuple(hf_shapes[key])
        if len(shape) != 2 or shape[0] != parts[-1][2]:
            raise EmberError(
                f"{where}: {key} has shape {shape}, expected ({parts[-1][2]}, {cfg.hidden_size}) "
                "for this config.json"
            )
        for part, a, b in parts:
            out[part] = (b - a, shape[1])
    return out


def split_fused(sd: Mapping[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """An HF state dict with Phi-3's fused weights split into per-projection HF keys, and 3-D
    expert stacks (transformers 5's in-memory MoE layout) into per-expert ones."""
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    fused, experts = fused_parts(shapes, cfg), expert_parts(shapes, cfg, "state dict")
    out = {k: v for k, v in sd.items() if k not in fused and k not in experts}
    for key, parts in fused.items():
        out.update({part: sd[key][a:b] for part, a, b in parts})
    for key, parts in experts.items():
        out.update({part: sd[key][e, a:b] for part, e, a, b in parts})
    return out


def _fuse_nf4(out: dict, keys: list[str], fused: str) -> None:
    """Replace the bnb entries of NF4 parts by those of the fused weight (exact or refused)."""
    ws = []
    for k in keys:
        entries = {e: out.pop(e) for e in [e for e in out if split_bnb_key(e)[0] == k]}
        ws.append(nf4_from_bnb(entries, k))
    out.update(nf4_to_bnb(cat_nf4_rows(ws, fused), fused))


def _fuse(hf: dict[str, torch.Tensor], cfg: ModelConfig) -> dict:
    if cfg.model_type != "phi3":
        return hf
    out = dict(hf)
    for i in range(cfg.num_layers):
        for fused, parts in _FUSED.items():
            keys = [f"model.layers.{i}.{p}" for p in parts]
            nf4 = [quant_state_key(out, k) is not None for k in keys]
            if any(nf4) and not all(nf4):
                raise EmberError(
                    f"cannot export model.layers.{i}.{fused} in bitsandbytes' format: some of "
                    "its parts are NF4 and some dense; save it with dequantize=True"
                )
            if all(nf4):
                _fuse_nf4(out, keys, f"model.layers.{i}.{fused}")
                continue
            ws = [out.pop(k) for k in keys]
            # An NF4Weight (save_pretrained(dequantize=True)) or a Deferred (a GGUF import) is
            # made when written, so the fused weight is too: one layer in memory at a time.
            out[f"model.layers.{i}.{fused}"] = (
                torch.cat([w.to(ws[0].dtype) for w in ws])
                if all(isinstance(w, torch.Tensor) for w in ws) else Deferred.cat(ws)
            )
    return out


# HF keys some checkpoints carry that hold no weights: RoPE buffers saved by old conversions, per
# layer or the model's (transformers ignores any ``rotary_emb.inv_freq`` and recomputes RoPE).
_IGNORED_HF_KEYS = re.compile(r"(?:.+\.)?rotary_emb\.inv_freq")


def _compile(templates: Iterable[str]) -> list[tuple[re.Pattern, str]]:
    return [(re.compile(re.escape(t).replace(r"\{i\}", r"(?P<i>\d+)")
                        .replace(r"\{e\}", r"(?P<e>\d+)")), t) for t in templates]


def _tables(rows: list[tuple[str, str]]):
    """(ember->hf patterns, table, hf->ember patterns, table) for rows tried in order."""
    to_hf, from_hf = {}, {}
    for e, h in rows:
        to_hf.setdefault(e, h)
        from_hf.setdefault(h, e)
    return (_compile(to_hf), to_hf, _compile(from_hf), from_hf)


_PLAIN = _tables(KEY_TABLE)
_SANDWICH = _tables(SANDWICH_KEYS + KEY_TABLE)
_MOE_TABLES = {mt: _tables(rows + KEY_TABLE) for mt, rows in MOE_KEYS.items()}
_PHI = _tables(PHI_KEYS)  # Phi-1/1.5/2: its own names (LayerNorms with bias, dense, fc1/fc2)
_STARCODER2 = _tables(STARCODER2_KEYS)  # LayerNorms with bias, c_fc / c_proj


def _rename(key: str, patterns, table) -> str | None:
    for pat, template in patterns:
        m = pat.fullmatch(key)
        if m:
            out = table[template]
            for name, value in m.groupdict().items():
                out = out.replace("{" + name + "}", value)
            return out
    return None


def _table(cfg: ModelConfig | None):
    if cfg is not None and cfg.sandwich_norms:
        return _SANDWICH
    if cfg is not None and cfg.model_type == "phi":
        return _PHI
    if cfg is not None and cfg.model_type == "starcoder2":
        return _STARCODER2
    return _MOE_TABLES.get(cfg.model_type, _PLAIN) if cfg is not None else _PLAIN


def hf_key_to_ember(key: str, cfg: ModelConfig | None = None) -> str | None:
    """The Ember name of an HF state-dict key, or None if the key is not in ``KEY_TABLE`` (or
    ``SANDWICH_KEYS`` for a cfg with sandwich norms, ``MOE_KEYS`` for an MoE family)."""
    _, _, patterns, table = _table(cfg)
    return _rename(key, patterns, table)


def ember_key_to_hf(key: str, cfg: ModelConfig | None = None) -> str | None:
    patterns, table, _, _ = _table(cfg)
    return _rename(key, patterns, table)


# --------------------------------------------------------------------------------------------------
# State dicts


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Ember state-dict keys and shapes for cfg (from a Transformer built on the meta device)."""
    from ember.models.transformer import Transformer

    with torch.device("meta"):
        model = Transformer(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _listing(keys: Iterable[str], n: int = 5) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:n]) + (f" (and {len(keys) - n} more)" if len(keys) > n else "")


def map_hf_keys(
    hf_shapes: Mapping[str, tuple[int, ...]], cfg: ModelConfig, where: str = "checkpoint"
) -> dict[str, str]:
    """Validate HF key -> shape against cfg; return {hf_key: ember_key} for the keys to load.

    Raises EmberError naming unknown keys, missing keys, or a key with the wrong shape."""
    want = expected_shapes(cfg)
    hf_shapes = _unfused_shapes(hf_shapes, cfg, where)
    mapping, unknown, mapped = {}, [], {}
    for hk, shape in hf_shapes.items():
        ek = hf_key_to_ember(hk, cfg)
        if ek is None:
            if not _IGNORED_HF_KEYS.fullmatch(hk):
                unknown.append(hk)
            continue
        if is_empty_shared_expert(hk, shape, cfg):
            continue
        if ek == "lm_head.weight" and cfg.tie_word_embeddings:
            # Some tied checkpoints store the head anyway; the embedding is the weight used.
            if tuple(shape) != want["embed.weight"]:
                raise EmberError(
                    f"{where}: {hk} has shape {tuple(shape)}, expected {want['embed.weight']}"
                )
            if ember_key_to_hf("embed.weight", cfg) in hf_shapes:
                continue
            ek = "embed.weight"  # the head alone: transformers ties the embedding to it
        if ek not in want:
            unknown.append(hk)
            continue
        if tuple(shape) != want[ek]:
            raise EmberError(
                f"{where}: {hk} has shape {tuple(shape)}, expected {want[ek]} for this config.json"
            )
        if ek in mapped:  # e.g. Mixtral's router as block_sparse_moe.gate and mlp.gate
            raise EmberError(f"{where}: {mapped[ek]} and {hk} are the same weight stored twice "
                             "under two names (key layouts mixed): which one is the weight is "
                             "ambiguous; save the checkpoint again from the model it came from")
        mapping[hk], mapped[ek] = ek, hk
    if unknown:
        raise EmberError(f"{where}: unexpected key(s) for this config.json: {_listing(unknown)}")
    missing = set(want) - set(mapping.values())
    if missing:
        head = (" (untied, the head is a weight of its own, which transformers would start "
                "from random; a base model's save, e.g. LlamaModel.save_pretrained, has none: "
                "save the *ForCausalLM model)" if missing == {"lm_head.weight"} else "")
        raise EmberError(
            f"{where}: missing key(s): {_listing(ember_key_to_hf(k, cfg) or k for k in missing)}"
            f"{head}"
        )
    return mapping


def from_hf_state_dict(sd: Mapping[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """HF state dict -> Ember state dict (same tensors, renamed, fused ones split; validated
    against cfg)."""
    sd = split_fused(sd, cfg)
    mapping = map_hf_keys({k: tuple(v.shape) for k, v in sd.items()}, cfg, "state dict")
    return {ek: sd[hk] for hk, ek in mapping.items()}


def _quant_state_shape(sd: Mapping, base: str) -> tuple[int, ...]:
    """The dense shape a bitsandbytes weight dequantizes to, from its JSON quant state."""
    qs_key = quant_state_key(sd, base)
    raw = sd[qs_key]
    try:
        return tuple(json.loads(bytes(raw.cpu().tolist()).decode("utf-8"))["shape"])
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise EmberError(
            f"state dict: {qs_key} is not a readable bitsandbytes quant "
            f"state ({type(e).__name__}: {e})"
        ) from None


def to_hf_state_dict(sd: Mapping[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Ember state dict -> HF state dict as transformers saves it (tied: no lm_head.weight).

    NF4 layers (``Linear4bit``) appear in bitsandbytes' format: ``<name>.weight`` packed uint8 plus
    its ``.absmax`` / ``.quant_map`` / ... entries, renamed along with the weight; their dense shape
    is checked from the quant state. A value may also be any object with a ``shape`` (e.g. an
    ``NF4Weight`` to be dequantized while saving)."""
    want = expected_shapes(cfg)
    quantized = {split_bnb_key(k)[0] for k in sd if is_quant_state_key(k)}
    unknown = [k for k in sd if split_bnb_key(k)[0] not in want]
    if unknown:
        raise EmberError(f"state dict: unexpected Ember key(s): {_listing(unknown)}")
    missing = set(want) - set(sd)
    if missing:
        raise EmberError(f"state dict: missing Ember key(s): {_listing(missing)}")
    out = {}
    for k, v in sd.items():
        base, suffix = split_bnb_key(k)
        if base in quantized:
            if not suffix and _quant_state_shape(sd, base) != want[base]:
                raise EmberError(
                    f"state dict: NF4 weight {k} has shape "
                    f"{_quant_state_shape(sd, base)}, expected {want[k]}"
                )
            out[_hf_name(base, cfg) + suffix] = v
            continue
        if suffix:
            raise EmberError(
                f"state dict: {k} without {base}.{QS_SUFFIX} (an incomplete bitsandbytes weight)"
            )
        if tuple(v.shape) != want[k]:
            raise EmberError(f"state dict: {k} has shape {tuple(v.shape)}, expected {want[k]}")
        out[_hf_name(k, cfg)] = v
    return _fuse(out, cfg)


def _hf_name(key: str, cfg: ModelConfig) -> str:
    hk = ember_key_to_hf(key, cfg)
    if hk is None:  # a module the family's HF class has no weight for
        raise EmberError(f"state dict: {key} has no Hugging Face name for model_type "
                         f"{cfg.model_type!r}; this model cannot be exported to transformers")
    return hk


# --------------------------------------------------------------------------------------------------
# Multimodal Gemma 3 checkpoints

# (stored prefix, text-model prefix): transformers 4.50-4.51 and 5.x save "language_model.model.",
# 4.52-4.57 "model.language_model." (transformers' "llava" conversion mapping reads both).
_MM_TEXT_PREFIXES = (
    ("language_model.model.", "model."),
    ("model.language_model.", "model."),
    ("language_model.lm_head.", "lm_head."),
    ("lm_head.", "lm_head."),
)
_MM_VISION_PREFIXES = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.",
                       "model.multi_modal_projector.")


def split_multimodal_keys(keys: Iterable[str], where: str = "checkpoint"
                          ) -> tuple[dict[str, str], list[str]]:
    """``({text-model HF key: stored key}, [vision tower / projector keys])`` of a multimodal
    Gemma 3 checkpoint. Other keys keep their name (``map_hf_keys`` then names them)."""
    text, vision = {}, []
    for key in keys:
        if key.startswith(_MM_VISION_PREFIXES):
            vision.append(key)
            continue
        new = next((t + key[len(s):] for s, t in _MM_TEXT_PREFIXES if key.startswith(s)), key)
        if new in text:
            raise EmberError(f"{where}: {text[new]} and {key} are the same weight of the language "
                             "model stored twice (two key layouts mixed)")
        text[new] = key
    return text, vision


def multimodal_key(key: str, stored: Mapping[str, str]) -> str:
    """The multimodal checkpoint's name of a text-model HF key: as ``stored`` (from
    ``split_multimodal_keys`` of the base) names it, else in transformers 5's saved layout."""
    if key in stored:
        return stored[key]
    return "language_model." + key if key.startswith("model.") else key
