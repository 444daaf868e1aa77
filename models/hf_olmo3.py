"""OLMo 3 (``Olmo3ForCausalLM``) ``config.json`` fields beyond OLMo 2's, for
``ember.models.hf_llama_variants``, read as transformers 5.24 reads them
(``models/olmo3/{configuration,modeling}_olmo3.py``).

- Sliding windows: ``sliding_window`` (default 4096) on the layers ``layer_types`` marks
  ``sliding_attention``; without ``layer_types``, every layer but each 4th slides.
- RoPE per layer type: ``rope_parameters`` maps ``full_attention`` / ``sliding_attention`` to a
  RoPE dict each (Ember's ``rope_theta`` / ``rope_scaling`` and ``rope_local_theta`` /
  ``rope_local_scaling``). Without it, transformers starts both from the default RoPE of base
  500000; a legacy top-level ``rope_theta`` / ``rope_scaling`` reaches the full-attention layers
  only (``Olmo3Config.convert_rope_params_to_dict``), the sliding ones keep base 500000. A flat
  ``rope_parameters`` (``{"rope_type": ..., "rope_theta": ...}``) is never read by transformers'
  Olmo3 rotary embedding: refused rather than silently ignored. The sequence-dependent dynamic
  and longrope RoPE types are refused (transformers has no per-layer-type path Ember matches).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import replace

from ember import EmberError
from ember.models.config import ModelConfig
from ember.models.hf_rope import get_float, get_window, parse_rope, rope_to_hf

OLMO3_FIELDS = frozenset({"attention_bias", "sliding_window", "layer_types"})
OLMO3_THETA = 500_000.0  # Olmo3Config.default_theta
OLMO3_WINDOW = 4096
_TYPES = ("full_attention", "sliding_attention")
_REFUSED_KINDS = ("dynamic", "longrope")


def _layer_types(raw: Mapping, num_layers: int) -> list[str]:
    types = raw.get("layer_types")
    if types is None:
        return ["sliding_attention" if (i + 1) % 4 else "full_attention" for i in range(num_layers)]
    if not isinstance(types, list) or len(types) != num_layers or not set(types) <= set(_TYPES):
        raise EmberError(
            f"config.json: layer_types must list 'full_attention' or "
            f"'sliding_attention' for each of the {num_layers} layers, got {types!r}"
        )
    return types


def _rope(d: dict, where: str, max_pos: int, rotary_dim: int | None):
    if "type" in d:
        raise EmberError(
            f"config.json: olmo3 {where} RoPE names its type with the legacy key "
            f"'type' ({d!r}); transformers 5's Olmo3 does not read it. Rename it to "
            "'rope_type'"
        )
    kind = d.get("rope_type") or "default"
    if kind in _REFUSED_KINDS:
        raise EmberError(
            f"config.json: olmo3 {where} rope_type {kind!r} is not supported (Ember "
            "runs default, linear, llama3 and yarn RoPE per OLMo 3 layer type)"
        )
    theta, rs = parse_rope({"rope_parameters": d}, max_pos, "olmo3", rotary_dim)
    if rs is not None and rs.kind == "yarn" and not rs.truncate:
        # transformers 5's YaRN reads truncate beside the per-layer-type dicts: it truncates
        warnings.warn(
            f"config.json: olmo3 {where} YaRN truncate=false is ignored, as "
            "transformers 5 ignores it (it truncates)",
            stacklevel=4,
        )
        rs = replace(rs, truncate=True)
    return theta, rs


def olmo3_fields(raw: Mapping, num_layers: int, max_pos: int, rotary_dim: int | None) -> dict:
    """Window, per-layer types and per-layer-type RoPE of an OLMo 3 config.json."""
    types = _layer_types(raw, num_layers)
    window = get_window(raw, OLMO3_WINDOW)
    sliding = [t == "sliding_attention" for t in types]
    if any(sliding) and window is None:
        raise EmberError(
            "config.json: layer_types marks sliding-attention layers but "
            "sliding_window is null (transformers cannot build that mask); set "
            "sliding_window or mark those layers full_attention"
        )
    params = raw.get("rope_parameters")
    if params is not None and (
        not isinstance(params, dict)
        or not params
        or not set(params) <= set(_TYPES)
        or not all(isinstance(v, dict | None) for v in params.values())
    ):
        raise EmberError(
            "config.json: olmo3 rope_parameters must map 'full_attention' / 'sliding_attention' "
            f"to RoPE parameters, got {params!r}; transformers' Olmo3 reads no other form (a flat "
            'dict is ignored there). Write {"full_attention": {...}, "sliding_attention": '
            "{...}}"
        )
    full = dict((params or {}).get("full_attention") or {"rope_type": "default"})
    local = dict((params or {}).get("sliding_attention") or {"rope_type": "default"})
    scaling = raw.get("rope_scaling")
    if scaling is not None:
        if not isinstance(scaling, dict):
            raise EmberError(f"config.json: rope_scaling must be an object, got {scaling!r}")
        full.update(scaling)  # the full-attention layers only, as transformers reads it
    full.setdefault("rope_theta", get_float(raw, "rope_theta", OLMO3_THETA))
    if "rope_theta" not in local and get_float(raw, "rope_theta", OLMO3_THETA) != OLMO3_THETA:
        warnings.warn(
            f"config.json: olmo3 rope_theta={raw['rope_theta']} sets the full-attention layers' "
            f"RoPE base only; the sliding layers keep {OLMO3_THETA:g}, as transformers reads it. "
            "Set rope_parameters['sliding_attention']['rope_theta'] to change theirs",
            stacklevel=3,
        )
    local.setdefault("rope_theta", OLMO3_THETA)
    partial = raw.get("partial_rotary_factor")
    scaled = [
        k
        for k, d in (("full_attention", full), ("sliding_attention", local))
        if (d.get("rope_type") or "default") != "default" or "partial_rotary_factor" in d
    ]
    if partial not in (None, 1, 1.0) and scaled:
        raise EmberError(
            f"config.json: partial_rotary_factor={partial} is not supported for olmo3 with a "
            f"scaled RoPE on its {' and '.join(scaled)} layers: transformers sizes those "
            "frequencies by it but rotates the whole head. Remove partial_rotary_factor"
        )
    theta, rs = _rope(full, "full_attention", max_pos, rotary_dim)
    local_theta, local_rs = _rope(local, "sliding_attention", max_pos, rotary_dim)
    if not all(sliding) and not any(sliding):
        local_theta, local_rs = theta, rs  # transformers builds no sliding table
    if all(sliding):
        theta, rs = local_theta, local_rs  # nor a full-attention one
    out = dict(rope_theta=theta, rope_scaling=rs, sliding_window=window if any(sliding) else None)
    if (local_theta, local_rs) != (theta, rs):
        out.update(rope_local_theta=local_theta, rope_local_scaling=local_rs)
    if any(sliding) and not all(sliding):
        out["layer_types"] = tuple(types)
    return out


def olmo3_problems(cfg: ModelConfig) -> list[str]:
    """What an OLMo 3 config.json cannot express of cfg."""
    problems = []
    for rs in (cfg.rope_scaling, cfg.rope_local_scaling):
        if rs is not None and rs.kind in _REFUSED_KINDS:
            problems.append(f"{rs.kind} RoPE scaling")
    return problems


def olmo3_to_hf(cfg: ModelConfig, out: dict) -> None:
    """OLMo 3's config.json fields: window, layer types, RoPE per layer type."""
    sliding = [cfg.is_sliding(i) for i in range(cfg.num_layers)]
    full = rope_to_hf(cfg)
    local = full
    if cfg.rope_local_theta is not None:
        local = rope_to_hf(
            cfg.replace(rope_theta=cfg.rope_local_theta, rope_scaling=cfg.rope_local_scaling)
        )
    out.update(
        # transformers builds the sliding mask even when no layer uses it, and fails without a
        # window: one as long as the context, used by no layer (read back as none)
        sliding_window=cfg.sliding_window if any(sliding) else cfg.max_position_embeddings,
        layer_types=["sliding_attention" if s else "full_attention" for s in sliding],
        rope_parameters={"full_attention": full, "sliding_attention": local},
        rope_scaling=None,
    )
