"""Gemma 2 / Gemma 3 text ``config.json`` fields <-> ``ModelConfig``, for
``ember.models.hf_config``: per-layer sliding windows (``layer_types`` or transformers' default
pattern), ``query_pre_attn_scalar``, logit softcaps (Gemma 3's ``attn_logit_softcapping``
is ignored, with a warning, as transformers ignores it), and Gemma 3's RoPE per layer type (a scaled
global RoPE, a local one with its own base, linear / llama3 / yarn scaled where
``rope_parameters["sliding_attention"]`` says so), read as transformers 5 reads them.

The multimodal Gemma 3 (``model_type`` "gemma3", ``Gemma3ForConditionalGeneration``: SigLIP vision
tower + projector + a Gemma 3 text model): ``multimodal_text_config`` gives the config.json of its
language model (``text_config`` with transformers' ``Gemma3TextConfig`` defaults for the fields
Google's configs leave out, and the top-level embedding tying), which Ember trains text-only. Its
weights are renamed in ``ember.models.hf`` (``split_multimodal_keys``).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import replace

from ember import EmberError
from ember.models.config import ModelConfig, RopeScaling
from ember.models.hf_rope import get_float, parse_rope, rope_to_hf

# config.json fields of each family beyond the common ones, and transformers' class defaults
# (``window_period``: every n-th layer is global when layer_types is absent).
_GEMMA2 = """attention_bias hidden_activation use_bidirectional_attention query_pre_attn_scalar
    sliding_window layer_types final_logit_softcapping attn_logit_softcapping
    cache_implementation"""
FIELDS = {
    "gemma2": frozenset(f"{_GEMMA2} sliding_window_size".split()),
    "gemma3_text": frozenset(
        f"{_GEMMA2} sliding_window_pattern _sliding_window_pattern rope_local_base_freq".split()
    ),
}
_G2 = dict(bos_token_id=2, eos_token_id=1, num_key_value_heads=4, head_dim=256,
           tie_word_embeddings=True, sliding_window=4096, query_pre_attn_scalar=256)  # fmt: skip
DEFAULTS = {
    "gemma2": dict(**_G2, max_position_embeddings=8192, final_logit_softcapping=30.0,
                   attn_logit_softcapping=50.0, window_period=2),
    "gemma3_text": dict(**_G2, max_position_embeddings=131072, window_period=6),
}  # fmt: skip


def _opt_float(raw: Mapping, key: str, default: float | None) -> float | None:
    """A number or null (an explicit null overrides the default)."""
    return get_float(raw, key, None) if key in raw else default


def gemma_fields(
    raw: Mapping,
    model_type: str,
    num_layers: int,
    max_pos: int,
    window: int | None,
    rotary_dim: int | None = None,
) -> dict:
    """ModelConfig fields of Gemma 2 / Gemma 3 text: per-layer windows (``layer_types``, else
    transformers' default pattern: every ``window_period``-th layer global), softcaps, attention
    scale and (Gemma 3) each layer type's RoPE base and scaling. ``window``:
    the parsed ``sliding_window``; ``rotary_dim``: the rotated width of a head (LongRoPE's factor
    lists have rotary_dim / 2 entries)."""
    dflt = DEFAULTS[model_type]
    if "sliding_window_size" in raw and raw["sliding_window_size"] != window:
        raise EmberError(
            f"config.json: sliding_window_size ({raw['sliding_window_size']!r}) differs from "
            f"sliding_window ({window!r}); transformers uses sliding_window"
        )
    types = raw.get("layer_types")
    if types is None:
        period = dflt["window_period"]
        if model_type == "gemma3_text":
            period = raw.get("sliding_window_pattern", period)
        if isinstance(period, bool) or not isinstance(period, int) or period < 1:
            raise EmberError(f"config.json: sliding_window_pattern must be >= 1, got {period!r}")
        types = [
            "full_attention" if (i + 1) % period == 0 else "sliding_attention"
            for i in range(num_layers)
        ]
    if not isinstance(types, list):
        raise EmberError(f"config.json: layer_types must be a list, got {types!r}")
    if window is None and "sliding_attention" in types:
        raise EmberError(
            "config.json: sliding_window is null but layer_types (or the default "
            "pattern) has sliding-attention layers; transformers cannot build their "
            "mask: set sliding_window, or mark every layer full_attention"
        )
    scalar = get_float(raw, "query_pre_attn_scalar", dflt["query_pre_attn_scalar"])
    if scalar <= 0:
        raise EmberError(f"config.json: query_pre_attn_scalar must be > 0, got {scalar}")
    out = dict(
        sliding_window=window,
        layer_types=tuple(types),
        sandwich_norms=True,
        query_pre_attn_scalar=scalar,
        attn_softcap=_opt_float(raw, "attn_logit_softcapping", dflt.get("attn_logit_softcapping")),
        final_softcap=_opt_float(
            raw, "final_logit_softcapping", dflt.get("final_logit_softcapping")
        ),
    )
    for key in ("attn_softcap", "final_softcap"):
        if out[key] is not None and out[key] <= 0:
            raise EmberError(f"config.json: logit softcapping must be > 0 or null, got {out[key]}")
    if model_type == "gemma3_text" and out["attn_softcap"] is not None:
        # transformers' Gemma 3 attention (4.50+ and 5.x) never passes the cap to its attention
        # function: the field is read and ignored, so Ember ignores it too
        warnings.warn(
            f"config.json: attn_logit_softcapping={out['attn_softcap']} is ignored for "
            "gemma3_text, as transformers ignores it (Gemma 3 attention has no logit softcap)",
            stacklevel=3,
        )
        out["attn_softcap"] = None
    if model_type == "gemma3_text":
        (
            out["rope_theta"],
            out["rope_scaling"],
            out["rope_local_theta"],
            out["rope_local_scaling"],
        ) = parse_gemma3_rope(
            raw,
            max_pos,
            rotary_dim,
            global_layers="full_attention" in types,
            local_layers="sliding_attention" in types,
        )
    return out


def gemma_to_hf(cfg: ModelConfig, out: dict) -> None:
    """Gemma 2/3 fields of config.json (transformers 5 names, plus Gemma 3's 4.x RoPE names)."""
    scalar = cfg.query_pre_attn_scalar or cfg.head_dim
    out.update(
        hidden_activation=out.pop("hidden_act"),
        # transformers types it as an int and checks
        query_pre_attn_scalar=int(scalar) if float(scalar).is_integer() else scalar,
        sliding_window=cfg.sliding_window,
        layer_types=[
            "sliding_attention" if cfg.is_sliding(i) else "full_attention"
            for i in range(cfg.num_layers)
        ],
        attn_logit_softcapping=cfg.attn_softcap,
        final_logit_softcapping=cfg.final_softcap,
    )
    if cfg.model_type == "gemma3_text":
        out["rope_parameters"] = gemma3_rope_to_hf(cfg)
        out["rope_local_base_freq"] = out["rope_parameters"]["sliding_attention"]["rope_theta"]


def parse_gemma3_rope(
    raw: Mapping,
    max_pos: int,
    rotary_dim: int | None = None,
    global_layers: bool = True,
    local_layers: bool = True,
) -> tuple[float, RopeScaling | None, float, RopeScaling | None]:
    """Gemma 3 (``gemma3_text``): (global theta, global scaling, local theta, local scaling), as
    transformers 5's ``Gemma3TextConfig.convert_rope_params_to_dict`` reads either
    ``rope_parameters`` per layer type or the legacy ``rope_theta`` / ``rope_scaling`` (global
    layers only) / ``rope_local_base_freq``. ``global_layers`` / ``local_layers``: whether some
    layer uses full / sliding attention (transformers builds only the tables of those)."""
    params = raw.get("rope_parameters")
    if params is not None and (
        not isinstance(params, dict) or not set(params) <= {"sliding_attention", "full_attention"}
    ):
        raise EmberError(
            "config.json: gemma3_text rope_parameters must map 'sliding_attention' / "
            f"'full_attention' to RoPE parameters, got {params!r}"
        )
    # without rope_parameters transformers starts from {"rope_type": "default"} per layer type
    full = dict(params.get("full_attention") or {}) if params else {"rope_type": "default"}
    local = dict((params or {}).get("sliding_attention") or {})
    scaling = raw.get("rope_scaling")
    if scaling is not None:
        if not isinstance(scaling, dict):
            raise EmberError(f"config.json: rope_scaling must be an object, got {scaling!r}")
        full.update(scaling)
    # transformers 5.24 reads a legacy "type" only where no "rope_type" is set, and without
    # rope_parameters one is ("default"): {"type": "linear", "factor": 8} then changes nothing
    # (4.x applied it), so it is ignored here too
    kind = full.get("rope_type") or full.get("type") or "default"
    if kind == "default" and full.get("type", "default") != "default":
        warnings.warn(
            f"config.json: Gemma 3 rope_scaling {scaling!r} names its type with the legacy key "
            "'type', which transformers 5 ignores (it computes the default RoPE; 4.x applied "
            "the scaling); Ember does the same. Rename it to 'rope_type' to apply the scaling",
            stacklevel=3,
        )
        full = {k: v for k, v in full.items() if k in ("rope_theta", "partial_rotary_factor")}
    # the scaled types size the full-attention frequencies by partial_rotary_factor (the dict's,
    # else the top-level one) but rotate the whole head: transformers fails on a full-attention
    # layer, and never builds that table when there is none
    partial = full.get("partial_rotary_factor", raw.get("partial_rotary_factor"))
    if kind != "default" and partial is not None and partial != 1:
        if global_layers:
            raise EmberError(
                f"config.json: partial_rotary_factor={partial} is not supported for Gemma 3 "
                f"with the {kind!r} RoPE on its full-attention layers: transformers sizes the "
                f"{kind} frequencies by it but rotates the whole head, and fails there. Remove "
                "partial_rotary_factor"
            )
        full.pop("partial_rotary_factor", None)
    full.setdefault("rope_theta", get_float(raw, "rope_theta", 1_000_000.0))
    local.setdefault("rope_theta", get_float(raw, "rope_local_base_freq", 10_000.0))
    unused_longrope = kind == "longrope" and partial not in (None, 1) and rotary_dim is not None
    theta, rs = parse_rope(
        {"rope_parameters": full},
        max_pos,
        "gemma3_text",
        int(rotary_dim * partial) if unused_longrope else rotary_dim,
    )
    if unused_longrope:
        # transformers checks the factor lists against the partial width and, with no
        # full-attention layer, never builds the table; Ember rotates whole heads, where those
        # lists do not fit: the unused scaling is dropped (an export writes the default RoPE)
        warnings.warn(
            f"config.json: Gemma 3's LongRoPE with partial_rotary_factor={partial} is unused "
            "(no layer uses full attention) and dropped, as transformers never builds it; an "
            "export writes the default RoPE for the full-attention layers",
            stacklevel=2,
        )
        rs = None
    local_theta, local_rs = _local_rope(raw, local, max_pos, rotary_dim, local_layers)
    if rs is not None and rs.kind == "yarn" and not rs.truncate:
        # transformers 5's YaRN reads truncate from the top level of rope_parameters, which for
        # Gemma 3 holds the per-layer-type dicts: it always truncates (4.x honoured the flag)
        warnings.warn(
            "config.json: Gemma 3 YaRN truncate=false is ignored, as transformers 5 ignores it "
            "(it truncates, reading the flag beside the per-layer-type dicts)",
            stacklevel=2,
        )
        rs = replace(rs, truncate=True)
    return theta, rs, local_theta, local_rs


def _local_rope(
    raw: Mapping, local: dict, max_pos: int, rotary_dim: int | None, local_layers: bool
) -> tuple[float, RopeScaling | None]:
    """(theta, scaling) of Gemma 3's sliding layers from ``rope_parameters["sliding_attention"]``
    (``local``), as transformers 5 builds that table: linear, llama3 and yarn as for the global
    layers; the sequence-dependent dynamic and longrope refused (Ember grows or switches the
    global table only); nothing when no layer slides (transformers never builds it)."""
    # transformers 5 takes the kind of a per-layer-type dict from the legacy "type" too
    key = "rope_type" if local.get("rope_type") else "type"
    kind = local.get(key) or "default"
    partial = local.get("partial_rotary_factor", raw.get("partial_rotary_factor"))
    if not local_layers or kind == "default":
        theta, rs = parse_rope({"rope_parameters": local}, max_pos, "gemma3_text", rotary_dim)
        if not local_layers and kind != "default":
            warnings.warn(
                f"config.json: Gemma 3's rope_parameters['sliding_attention'] {kind!r} scaling "
                "is unused (no layer uses sliding attention) and dropped, as transformers never "
                "builds it; an export writes the default RoPE for the sliding layers",
                stacklevel=3,
            )
        return theta, rs if local_layers else None
    if kind in ("dynamic", "longrope"):
        raise EmberError(
            f"config.json: rope_parameters['sliding_attention'] has {key} {kind!r}, which "
            "Ember does not run on Gemma 3's sliding layers (linear, llama3 and yarn load; "
            f"{kind} only on full-attention layers)"
        )
    if partial is not None and partial != 1:
        raise EmberError(
            f"config.json: partial_rotary_factor={partial} is not supported with the {kind!r} "
            "RoPE on Gemma 3's sliding_attention layers: transformers sizes the frequencies by "
            "it but rotates the whole head, and fails there. Remove partial_rotary_factor"
        )
    local = {k: v for k, v in local.items() if k != "partial_rotary_factor"}
    theta, rs = parse_rope({"rope_parameters": local}, max_pos, "gemma3_text", rotary_dim)
    if rs is not None and rs.kind == "yarn" and not rs.truncate:
        warnings.warn(
            "config.json: Gemma 3 YaRN truncate=false (sliding_attention) is ignored, as "
            "transformers 5 ignores it (it truncates, reading the flag beside the per-layer-type "
            "dicts)",
            stacklevel=3,
        )
        rs = replace(rs, truncate=True)
    return theta, rs


def gemma3_rope_to_hf(cfg: ModelConfig) -> dict:
    """transformers 5's per-layer-type ``rope_parameters`` of a Gemma 3 config."""
    local = cfg.rope_theta if cfg.rope_local_theta is None else cfg.rope_local_theta
    sliding = {"rope_type": "default", "rope_theta": local}
    if cfg.rope_local_scaling is not None:
        sliding = rope_to_hf(
            cfg.replace(
                rope_theta=local, rope_scaling=cfg.rope_local_scaling, partial_rotary_factor=1.0
            )
        )
    return {
        "sliding_attention": sliding,
        "full_attention": rope_to_hf(cfg),
    }


# --------------------------------------------------------------------------------------------------
# Multimodal Gemma 3 (Gemma3ForConditionalGeneration): the language model's config.json

MULTIMODAL = {"gemma3": "Gemma3ForConditionalGeneration"}  # model_type -> its one architecture
# Top-level fields of a gemma3 config.json besides the text/vision configs: image-token bookkeeping
# (text-only inputs never use them) and fields handed to the text config.
_MM_FIELDS = frozenset(
    """
    text_config vision_config mm_tokens_per_image boi_token_index eoi_token_index
    image_token_index image_token_id boi_token_id eoi_token_id tie_word_embeddings dtype torch_dtype
    bos_token_id eos_token_id pad_token_id initializer_range
""".split()
)
# transformers 5's Gemma3TextConfig defaults for the fields Ember otherwise requires (Google's
# gemma-3-4b/12b/27b text_config lists only what differs from them).
_TEXT_DEFAULTS = dict(vocab_size=262208, hidden_size=2304, intermediate_size=9216,
                      num_hidden_layers=26, num_attention_heads=8, pad_token_id=0)  # fmt: skip


def multimodal_text_config(raw: Mapping, harmless: frozenset) -> dict:
    """The ``gemma3_text`` config.json of a multimodal Gemma 3 config.json's language model.

    Checked: the architecture, the top-level fields (``harmless`` plus the image-token fields;
    anything else is refused by name; a bitsandbytes ``quantization_config`` is the loader's).
    The embedding tying is the top-level ``tie_word_embeddings`` (what transformers'
    Gemma3ForConditionalGeneration obeys, default true); dtype and token ids missing from
    ``text_config`` come from the top level."""
    arch = MULTIMODAL[raw["model_type"]]
    archs = raw.get("architectures")
    if archs is not None and archs != [arch]:
        raise EmberError(
            f"config.json: architectures {archs!r} is not supported for model_type "
            f"'gemma3'; Ember loads the language model of [{arch!r}] only"
        )
    unknown = sorted(set(raw) - _MM_FIELDS - harmless - {"quantization_config"})
    if unknown:
        raise EmberError(
            f"config.json: field(s) {unknown} are not supported for model_type 'gemma3'; "
            "Ember cannot guarantee the same computation"
        )
    text = raw.get("text_config") or {}
    if not isinstance(text, Mapping):
        raise EmberError(f"config.json: text_config must be an object, got {text!r}")
    top = {
        k: raw[k]
        for k in ("dtype", "torch_dtype", "bos_token_id", "eos_token_id", "pad_token_id")
        if k in raw and k not in text
    }
    text = {**_TEXT_DEFAULTS, "model_type": "gemma3_text", **top, **text}
    if text["model_type"] != "gemma3_text":
        raise EmberError(
            f"config.json: text_config.model_type is {text['model_type']!r}; a multimodal "
            "Gemma 3 has a 'gemma3_text' language model"
        )
    if text.get("final_logit_softcapping") is not None:
        # Gemma3ForCausalLM applies it, Gemma3ForConditionalGeneration does not: say so.
        raise EmberError(
            "config.json: text_config.final_logit_softcapping is set, which transformers' "
            "Gemma3ForConditionalGeneration ignores (Gemma3ForCausalLM applies it); set it to "
            "null to train the language model as the multimodal class computes it"
        )
    text.pop("architectures", None)  # a saved sub-config may say null / the text class
    text["tie_word_embeddings"] = raw.get("tie_word_embeddings", True)
    return text
