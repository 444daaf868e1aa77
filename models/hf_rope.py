"""RoPE in config.json <-> Ember's ``rope_theta`` / ``RopeScaling``, for ``ember.models.hf_config``.

Types: default, linear, llama3 and yarn, read from either ``rope_parameters`` (transformers 5) or
``rope_scaling`` (4.x) with transformers 5's precedence; dynamic NTK and LongRoPE change the
frequencies with the sequence length and are refused, as is ``partial_rotary_factor`` != 1.
Per-layer-type parameters are refused here; Gemma 3's are read in ``ember.models.hf_gemma``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from ember import EmberError
from ember.models.config import ModelConfig, RopeScaling

_ROPE_KEYS = {
    "default": frozenset(),
    "linear": frozenset({"factor"}),
    "llama3": frozenset(
        {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}
    ),
    "yarn": frozenset(
        """factor original_max_position_embeddings attention_factor beta_fast beta_slow mscale
        mscale_all_dim truncate""".split()
    ),
}


def get_float(d: Mapping, key: str, default=..., where: str = "config.json") -> float:
    if key not in d or d[key] is None:
        if default is ...:
            raise EmberError(f"{where}: required field {key!r} is missing")
        return default
    v = d[key]
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise EmberError(f"{where}: {key} must be a number, got {v!r}")
    return float(v)


def parse_rope(
    raw: Mapping, max_pos: int, model_type: str = "llama"
) -> tuple[float, RopeScaling | None]:
    """RoPE theta and scaling, with transformers 5's precedence: a non-empty legacy ``rope_scaling``
    wins over ``rope_parameters``, and a top-level ``rope_theta`` fills in a missing theta."""
    scaling, params = raw.get("rope_scaling"), raw.get("rope_parameters")
    for name, val in (("rope_scaling", scaling), ("rope_parameters", params)):
        if val is not None and not isinstance(val, dict):
            raise EmberError(f"config.json: {name} must be an object or null, got {val!r}")
    rope = dict(scaling or params or {})
    if any(isinstance(v, dict) for v in rope.values()):
        raise EmberError(
            f"config.json: per-layer-type RoPE parameters ({sorted(rope)}) are not "
            "supported; Ember applies one RoPE to every layer"
        )
    theta = get_float(rope, "rope_theta", None, "config.json rope parameters")
    if theta is None:
        theta = get_float(raw, "rope_theta", 10000.0)
    kind = rope.pop("rope_type", None) or rope.pop("type", None) or "default"
    rope.pop("type", None)
    rope.pop("rope_theta", None)
    # transformers 5 writes partial_rotary_factor into rope_parameters (Phi-3)
    if get_float(rope, "partial_rotary_factor", 1.0, "config.json rope parameters") != 1.0:
        raise EmberError("config.json: partial_rotary_factor != 1 is not supported")
    rope.pop("partial_rotary_factor", None)
    if model_type == "phi3" and kind in ("su", "yarn"):
        kind = "longrope"  # transformers reads Phi-3's old names as LongRoPE
    if kind not in _ROPE_KEYS:
        raise EmberError(
            f"config.json: rope type {kind!r} is not supported (supported: {', '.join(_ROPE_KEYS)})"
        )
    unknown = sorted(set(rope) - _ROPE_KEYS[kind])
    if unknown:
        raise EmberError(f"config.json: unsupported field(s) {unknown} for rope type {kind!r}")
    if kind == "default":
        return theta, None
    where = f"config.json {kind} rope scaling"
    if kind == "yarn":
        return theta, _parse_yarn(rope, max_pos, where)
    factor = get_float(rope, "factor", ..., where)
    if factor <= 0:
        raise EmberError(f"{where}: factor must be > 0, got {factor}")
    if kind == "linear":
        return theta, RopeScaling(kind="linear", factor=factor)
    low, high = (
        get_float(rope, "low_freq_factor", ..., where),
        get_float(rope, "high_freq_factor", ..., where),
    )
    if high <= low:
        raise EmberError(f"{where}: high_freq_factor ({high}) must exceed low_freq_factor ({low})")
    orig = rope.get("original_max_position_embeddings", max_pos)
    if isinstance(orig, bool) or not isinstance(orig, int) or orig <= 0:
        raise EmberError(
            f"{where}: original_max_position_embeddings must be a positive integer, got {orig!r}"
        )
    return theta, RopeScaling(
        kind="llama3",
        factor=factor,
        low_freq_factor=low,
        high_freq_factor=high,
        original_max_position_embeddings=orig,
    )


def _yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _parse_yarn(rope: Mapping, max_pos: int, where: str) -> RopeScaling:
    """YaRN with transformers' defaults: original context = max_position_embeddings, factor =
    their ratio, attention_factor from factor (and DeepSeek's mscale / mscale_all_dim)."""
    orig = rope.get("original_max_position_embeddings", max_pos)
    if isinstance(orig, bool) or not isinstance(orig, int) or orig <= 0:
        raise EmberError(
            f"{where}: original_max_position_embeddings must be a positive integer, got {orig!r}"
        )
    factor = get_float(rope, "factor", max_pos / orig, where)
    if factor <= 0:
        raise EmberError(f"{where}: factor must be > 0, got {factor}")
    attn = get_float(rope, "attention_factor", None, where)
    if attn is None:
        mscale = get_float(rope, "mscale", 0.0, where)
        mscale_all = get_float(rope, "mscale_all_dim", 0.0, where)
        attn = (
            _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all)
            if mscale and mscale_all
            else _yarn_mscale(factor)
        )
    truncate = rope.get("truncate", True)
    if not isinstance(truncate, bool):
        raise EmberError(f"{where}: truncate must be true or false, got {truncate!r}")
    return RopeScaling(
        kind="yarn",
        factor=factor,
        original_max_position_embeddings=orig,
        beta_fast=get_float(rope, "beta_fast", 0.0, where) or 32.0,
        beta_slow=get_float(rope, "beta_slow", 0.0, where) or 1.0,
        truncate=truncate,
        attention_factor=float(attn),
    )


def rope_to_hf(cfg: ModelConfig) -> dict:
    """transformers 5's ``rope_parameters`` for cfg (theta, type and the type's fields)."""
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    rs = cfg.rope_scaling
    if rs is not None and rs.kind == "linear":
        rope.update(rope_type="linear", factor=rs.factor)
    elif rs is not None and rs.kind == "yarn":
        rope.update(
            rope_type="yarn",
            factor=rs.factor,
            original_max_position_embeddings=rs.original_max_position_embeddings,
            beta_fast=rs.beta_fast,
            beta_slow=rs.beta_slow,
            truncate=rs.truncate,
            attention_factor=rs.attention_factor,
        )
    elif rs is not None:
        rope.update(
            rope_type="llama3",
            factor=rs.factor,
            low_freq_factor=rs.low_freq_factor,
            high_freq_factor=rs.high_freq_factor,
            original_max_position_embeddings=rs.original_max_position_embeddings,
        )
    return rope
