"""RoPE in config.json <-> Ember's ``rope_theta`` / ``RopeScaling``, for ``ember.models.hf_config``.

Types: default, linear, dynamic (NTK: the base grows with a forward's length past
``max_position_embeddings``, ``ember.models.config.rope_dynamic_inv_freq``), llama3, yarn and
longrope, read from either ``rope_parameters`` (transformers 5) or ``rope_scaling`` (4.x) with
transformers 5's precedence.

LongRoPE (Phi-3.5, Phi-4-mini; Phi-3's old names "su" and "yarn" mean it too): ``short_factor`` and
``long_factor`` must list rotary_dim / 2 numbers; ``original_max_position_embeddings`` is, for
phi3, the top-level field (default 4096, which transformers' Phi-3 puts above the rope dict's),
otherwise the top-level field if config.json has one, else the rope dict's (default
``max_position_embeddings``), as for llama3 and yarn (transformers 5.24's
``standardize_rope_params`` on a flat rope dict); ``factor`` defaults to
max_position_embeddings / original and only sets the default ``attention_factor``
sqrt(1 + ln(factor) / ln(original)) (1 when factor <= 1). Which table a forward uses is decided in
``ember.models.transformer``.

``partial_rotary_factor`` (Phi-4-mini: 0.75; from the rope dict, else the top-level field) is read
for phi3 only (phi: ``hf_phi``): transformers' other families ignore it with the default RoPE (so
does Ember, with a warning) and break with the scaled types (refused, naming the family; Gemma 3
only where a layer uses the scaled RoPE, ``hf_gemma``).
Per-layer-type parameters are refused here; Gemma 3's are read in ``ember.models.hf_gemma``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping

from ember import EmberError
from ember.models.config import ModelConfig, RopeScaling

_ROPE_KEYS = {
    "default": frozenset(),
    "linear": frozenset({"factor"}),
    "dynamic": frozenset({"factor"}),
    "llama3": frozenset(
        {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}
    ),
    "yarn": frozenset(
        """factor original_max_position_embeddings attention_factor beta_fast beta_slow mscale
        mscale_all_dim truncate""".split()
    ),
    "longrope": frozenset(
        "short_factor long_factor original_max_position_embeddings factor attention_factor".split()
    ),
}
# transformers computes LongRoPE in the shared rotary embedding of these families (Gemma 3: on its
# full-attention layers); MoE families count as their dense sibling (hf_moe)
LONGROPE_FAMILIES = ("phi3", "phi", "llama", "mistral", "ministral", "qwen2", "qwen3", "gemma",
                     "gemma2", "gemma3_text", "olmo2", "granite", "smollm3")
PHI3_ROPE_TYPES = ("default", "longrope")  # transformers' Phi3Config.validate_rope
PHI3_ORIGINAL_MAX = 4096  # Phi3Config's class default for original_max_position_embeddings


def get_float(d: Mapping, key: str, default=..., where: str = "config.json") -> float:
    if key not in d or d[key] is None:
        if default is ...:
            raise EmberError(f"{where}: required field {key!r} is missing")
        return default
    v = d[key]
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise EmberError(f"{where}: {key} must be a number, got {v!r}")
    return float(v)


def get_window(d: Mapping, default: int | None = None) -> int | None:
    """config.json's ``sliding_window``: an integer >= 1, or null (no window)."""
    window = d.get("sliding_window", default)
    if window is not None and (isinstance(window, bool) or not isinstance(window, int)
                               or window < 1):
        raise EmberError(
            f"config.json: sliding_window must be an integer >= 1 or null, got {window!r}"
        )
    return window


def rope_dict(raw: Mapping) -> dict:
    """The rope parameters transformers 5 reads: a non-empty legacy ``rope_scaling`` wins over
    ``rope_parameters``."""
    scaling, params = raw.get("rope_scaling"), raw.get("rope_parameters")
    for name, val in (("rope_scaling", scaling), ("rope_parameters", params)):
        if val is not None and not isinstance(val, dict):
            raise EmberError(f"config.json: {name} must be an object or null, got {val!r}")
    return dict(scaling or params or {})


def parse_partial_rotary(raw: Mapping, model_type: str, warn: bool = True) -> float:
    """``partial_rotary_factor``: the rope dict's, else the top-level one, else 1 (transformers 5's
    precedence). Only phi3 applies it. The other families' default RoPE rotates the whole head
    whatever it says (a value != 1 is ignored as transformers ignores it, with a warning); their
    scaled RoPE types size the frequencies by it and then fail in transformers: refused."""
    rope = rope_dict(raw)
    kind = rope.get("rope_type") or rope.get("type") or "default"
    where = "config.json rope parameters"
    if rope.get("partial_rotary_factor") is None:
        rope, where = raw, "config.json"
    f = get_float(rope, "partial_rotary_factor", 1.0, where)
    if not 0 < f <= 1:
        raise EmberError(f"{where}: partial_rotary_factor must be in (0, 1], got {f}")
    if f != 1.0 and model_type != "phi3":
        # Gemma 3's per-layer-type dicts: decided in hf_gemma.parse_gemma3_rope, which knows
        # whether a layer uses the scaled (full-attention) RoPE
        if kind != "default" and model_type != "gemma3_text":
            raise EmberError(
                f"{where}: partial_rotary_factor={f} is not supported for model_type "
                f"{model_type!r} with rope type {kind!r}: transformers' {model_type} sizes the "
                f"{kind} frequencies by it but rotates the whole head, and fails; only phi3 "
                "applies partial rotary embeddings. Remove partial_rotary_factor")
        if warn:
            warnings.warn(
                f"{where}: partial_rotary_factor={f} is ignored for model_type {model_type!r}: "
                "transformers' default RoPE rotates the whole head there (only phi3 applies "
                "partial rotary embeddings); Ember does the same", stacklevel=4)
        return 1.0
    return f


def parse_rope(
    raw: Mapping, max_pos: int, model_type: str = "llama", rotary_dim: int | None = None
) -> tuple[float, RopeScaling | None]:
    """RoPE theta and scaling, with transformers 5's precedence: a non-empty legacy ``rope_scaling``
    wins over ``rope_parameters``, and a top-level ``rope_theta`` fills in a missing theta.
    ``rotary_dim`` (LongRoPE's factor lists have rotary_dim / 2 entries) defaults to head_dim."""
    rope = rope_dict(raw)
    if any(isinstance(v, dict) for v in rope.values()):
        raise EmberError(
            f"config.json: per-layer-type RoPE parameters ({sorted(rope)}) are not "
            "supported; Ember applies one RoPE to every layer"
        )
    theta = get_float(rope, "rope_theta", None, "config.json rope parameters")
    if theta is None:
        theta = get_float(raw, "rope_theta", 10000.0)
    if not 0 < theta < math.inf:  # transformers computes NaN / inf frequencies from it
        raise EmberError(f"config.json: rope_theta must be a positive finite number (RoPE's "
                         f"base), got {theta}")
    kind = rope.pop("rope_type", None) or rope.pop("type", None) or "default"
    rope.pop("type", None)
    rope.pop("rope_theta", None)
    # transformers 5 writes partial_rotary_factor into rope_parameters (Phi-3): read by
    # parse_partial_rotary; refused here for the other families (Gemma 3's per-layer dicts)
    if model_type != "phi3":
        # hf_config already read (and warned about) a flat rope dict; Gemma 3's per-layer ones
        # are read here only
        parse_partial_rotary({"rope_parameters": {**rope, "rope_type": kind}}, model_type,
                             warn=model_type == "gemma3_text")
    rope.pop("partial_rotary_factor", None)
    if model_type == "phi3" and kind in ("su", "yarn"):
        kind = "longrope"  # transformers reads Phi-3's old names as LongRoPE
    if kind not in _ROPE_KEYS:
        raise EmberError(
            f"config.json: rope type {kind!r} is not supported (supported: {', '.join(_ROPE_KEYS)})"
        )
    if model_type == "phi3" and kind not in PHI3_ROPE_TYPES:
        raise EmberError(f"config.json: rope type {kind!r} is not one transformers' Phi-3 takes "
                         f"(only {', '.join(PHI3_ROPE_TYPES)})")
    unknown = sorted(set(rope) - _ROPE_KEYS[kind])
    if unknown:
        raise EmberError(f"config.json: unsupported field(s) {unknown} for rope type {kind!r}")
    if kind == "default":
        return theta, None
    if kind in ("llama3", "yarn") and "original_max_position_embeddings" in raw:
        # transformers 5.24 re-standardizes a flat rope dict as the model is built, putting a
        # top-level original_max_position_embeddings over the dict's (``standardize_rope_params``;
        # longrope: below, as for phi3)
        rope["original_max_position_embeddings"] = raw["original_max_position_embeddings"]
    where = f"config.json {kind} rope scaling"
    if kind == "yarn":
        return theta, _parse_yarn(rope, max_pos, where)
    if kind == "longrope":
        if model_type not in LONGROPE_FAMILIES:
            raise EmberError(
                f"{where}: LongRoPE is not supported for model_type {model_type!r} (supported "
                f"for {', '.join(LONGROPE_FAMILIES)})"
            )
        if rotary_dim is None:
            heads = raw.get("num_attention_heads")
            hd = raw.get("head_dim") or (raw.get("hidden_size", 0) // heads if heads else 0)
            rotary_dim = int(hd)
        key = "original_max_position_embeddings"
        orig = raw.get(key, PHI3_ORIGINAL_MAX if model_type == "phi3" else rope.get(key, max_pos))
        return theta, _parse_longrope(rope, max_pos, orig, rotary_dim, where)
    factor = get_float(rope, "factor", ..., where)
    if factor <= 0:
        raise EmberError(f"{where}: factor must be > 0, got {factor}")
    if kind in ("linear", "dynamic"):
        return theta, RopeScaling(kind=kind, factor=factor)
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


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's attention scaling for ``factor`` (transformers' ``get_mscale``)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def longrope_attention_factor(factor: float, orig: int) -> float:
    """LongRoPE's default attention scaling (transformers' and llama.cpp's converter's)."""
    return 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(orig))


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
            yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all)
            if mscale and mscale_all
            else yarn_mscale(factor)
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


def _parse_longrope(rope: Mapping, max_pos: int, orig, rotary_dim: int, where: str
                    ) -> RopeScaling:
    """LongRoPE as transformers' ``_compute_longrope_parameters`` reads it."""
    if isinstance(orig, bool) or not isinstance(orig, int) or orig <= 0:
        raise EmberError(
            f"{where}: original_max_position_embeddings must be a positive integer, got {orig!r}"
        )
    lists = {}
    for key in ("short_factor", "long_factor"):
        v = rope.get(key)
        if not isinstance(v, list) or not all(
            isinstance(x, (int, float)) and not isinstance(x, bool) for x in v
        ):
            raise EmberError(f"{where}: {key} must be a list of numbers, got {v!r}")
        if len(v) != rotary_dim // 2:
            raise EmberError(
                f"{where}: {key} must have rotary_dim / 2 = {rotary_dim // 2} entries (one per "
                f"rotated frequency, rotary_dim = int(head_dim * partial_rotary_factor) = "
                f"{rotary_dim}), got {len(v)}"
            )
        if not all(x > 0 for x in v):
            raise EmberError(f"{where}: {key} must hold positive numbers, got {v!r}")
        lists[key] = tuple(float(x) for x in v)
    factor = get_float(rope, "factor", max_pos / orig, where)
    attn = get_float(rope, "attention_factor", None, where)
    if attn is None:
        attn = longrope_attention_factor(factor, orig)
    if attn < 0:
        raise EmberError(f"{where}: attention_factor must be >= 0, got {attn}")
    return RopeScaling(
        kind="longrope",
        factor=factor,
        original_max_position_embeddings=orig,
        attention_factor=float(attn),
        **lists,
    )


def rope_to_hf(cfg: ModelConfig) -> dict:
    """transformers 5's ``rope_parameters`` for cfg (theta, type and the type's fields, and
    ``partial_rotary_factor`` when it is not 1)."""
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.partial_rotary_factor != 1.0:
        rope["partial_rotary_factor"] = cfg.partial_rotary_factor
    rs = cfg.rope_scaling
    if rs is not None and rs.kind in ("linear", "dynamic"):
        rope.update(rope_type=rs.kind, factor=rs.factor)
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
    elif rs is not None and rs.kind == "longrope":
        rope.update(
            rope_type="longrope",
            short_factor=list(rs.short_factor),
            long_factor=list(rs.long_factor),
            original_max_position_embeddings=rs.original_max_position_embeddings,
            factor=rs.factor,
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


def legacy_rope_scaling(cfg: ModelConfig) -> dict | None:
    """transformers 4.x's ``rope_scaling`` for cfg: ``rope_to_hf``'s fields without theta and
    partial rotary, except Phi-3's LongRoPE: 4.x's Phi3Config accepts exactly ``type``,
    ``short_factor`` and ``long_factor`` (anything else fails to load) and derives factor and
    attention_factor from the top-level context lengths, so those three are written when the
    derived values are cfg's (5.x reads the same dict the same way, as it does the published
    Phi-3.5 / Phi-4-mini configs)."""
    rs = cfg.rope_scaling
    if rs is None:
        return None
    if cfg.model_type == "phi3" and rs.kind == "longrope":
        short = {"type": "longrope", "short_factor": list(rs.short_factor),
                 "long_factor": list(rs.long_factor)}
        derived = _parse_longrope(short, cfg.max_position_embeddings,
                                  rs.original_max_position_embeddings, cfg.rotary_dim, "")
        if derived == rs:
            return short
    return {k: v for k, v in rope_to_hf(cfg).items()
            if k not in ("rope_theta", "partial_rotary_factor")}

