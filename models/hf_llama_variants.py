"""SmolLM3, Granite, OLMo2 and OLMo3 ``config.json`` fields <-> ``ModelConfig``, for
``ember.models.hf_config``: Llama's decoder with a few fields each, read as transformers 5 reads
them (``models/{smollm3,granite,olmo2}/modeling_*.py``).

- SmolLM3 (``SmolLM3ForCausalLM``): ``no_rope_layers`` (per layer 1 = RoPE, 0 = NoPE; entries past
  ``num_hidden_layers`` are never read) or, without it, a NoPE layer every
  ``no_rope_layer_interval``-th layer; ``layer_types`` (default: the NoPE layers are sliding iff
  ``use_sliding_window`` and ``sliding_window`` is set). transformers' eager / SDPA masks apply
  the window on every ``sliding_attention`` layer, its flash-attention path only when
  ``use_sliding_window`` is also true: a config where the two disagree is refused. RoPE base
  default 2e6.
- Granite: ``embedding_multiplier`` (Ember's ``embedding_scale``), ``residual_multiplier``,
  ``attention_multiplier`` (the softmax scale itself; default 1.0, not 1/sqrt(head_dim)),
  ``logits_scaling`` (logits divided by it).
- OLMo2: no pre-norms; ``post_attention_layernorm`` / ``post_feedforward_layernorm`` are RMSNorms on
  the attention and MLP outputs before the residual add (Ember's sandwich norms, whose HF names
  are Gemma 2's), and q_norm / k_norm over the whole q / k projection width before RoPE.
- OLMo3: OLMo2 plus a window on the layers ``layer_types`` marks (default: every layer but each
  4th), and RoPE per layer type (``ember.models.hf_olmo3``).

The state-dict key table is Llama's (OLMo2: Gemma 2's sandwich rows in ``ember.models.hf``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from ember import EmberError
from ember.models.config import ModelConfig
from ember.models.hf_olmo3 import OLMO3_FIELDS, olmo3_fields, olmo3_problems, olmo3_to_hf
from ember.models.hf_rope import get_float

ARCHITECTURES = {"smollm3": "SmolLM3ForCausalLM", "granite": "GraniteForCausalLM",
                 "olmo2": "Olmo2ForCausalLM", "olmo3": "Olmo3ForCausalLM"}
OLMO = ("olmo2", "olmo3")  # no pre-norms, sandwich norms, q/k norms over the whole projection
VARIANTS = tuple(ARCHITECTURES)
_GRANITE_MULT = ("embedding_multiplier", "residual_multiplier", "attention_multiplier",
                 "logits_scaling")
FIELDS = {
    # max_window_layers: in SmolLM3-3B's published config.json (a Qwen2 leftover); transformers'
    # SmolLM3 never reads it (its windows come from layer_types / no_rope_layers), nor does Ember
    "smollm3": frozenset("""attention_bias mlp_bias use_sliding_window sliding_window
        no_rope_layers no_rope_layer_interval layer_types max_window_layers""".split()),
    "granite": frozenset({"attention_bias", "mlp_bias", *_GRANITE_MULT}),
    "olmo2": frozenset({"attention_bias"}),
    "olmo3": OLMO3_FIELDS,
}
# transformers' class defaults for the fields a config.json may omit
DEFAULTS = {
    "smollm3": dict(bos_token_id=128000, eos_token_id=128001, max_position_embeddings=32768,
                    num_key_value_heads=4, tie_word_embeddings=True),
    "granite": dict(bos_token_id=1, eos_token_id=2, max_position_embeddings=2048,
                    num_key_value_heads=None),
    "olmo2": dict(bos_token_id=None, eos_token_id=50279, max_position_embeddings=2048,
                  num_key_value_heads=None, rms_norm_eps=1e-5),
    "olmo3": dict(bos_token_id=None, eos_token_id=50279, max_position_embeddings=2048,
                  num_key_value_heads=None, rms_norm_eps=1e-5),
}
_PAD = {"smollm3": 128004, "granite": None, "olmo2": 1, "olmo3": 1}
SMOLLM3_THETA = 2_000_000.0  # SmolLM3Config.default_theta
_NO_GRANITE_CLASSIFIER = ("transformers has no GraniteForSequenceClassification, so a Granite "
                          "sequence classifier has no Hugging Face form")


def with_defaults(raw: Mapping) -> Mapping:
    """``raw`` with the family's RoPE base and pad token filled in where transformers' config
    class defaults them differently from Llama's (other families: ``raw`` itself)."""
    mt = raw.get("model_type")
    if mt not in VARIANTS:
        return raw
    out = {"pad_token_id": _PAD[mt], **raw}
    if mt == "smollm3":
        out = {"rope_theta": SMOLLM3_THETA, **out}
    return out


def _int(v, what: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise EmberError(f"config.json: {what} must be an integer, got {v!r}")
    return v


def _smollm3_fields(raw: Mapping, num_layers: int) -> dict:
    rope = raw.get("no_rope_layers")
    if rope is None:
        every = _int(raw.get("no_rope_layer_interval", 4), "no_rope_layer_interval")
        if every < 1:
            raise EmberError(f"config.json: no_rope_layer_interval must be >= 1, got {every}")
        rope = [int((i + 1) % every != 0) for i in range(num_layers)]
    if not isinstance(rope, list) or len(rope) < num_layers or not all(
            _int(r, "each no_rope_layers entry") in (0, 1) for r in rope):
        raise EmberError(f"config.json: no_rope_layers must list 1 (RoPE) or 0 (NoPE) for each "
                         f"of the {num_layers} layers, got {rope!r}")
    nope = tuple(i for i in range(num_layers) if not rope[i])
    use = raw.get("use_sliding_window", False)
    if not isinstance(use, bool):
        raise EmberError(f"config.json: use_sliding_window must be true or false, got {use!r}")
    window = raw.get("sliding_window")
    if window is not None and (_int(window, "sliding_window") < 1):
        raise EmberError(f"config.json: sliding_window must be >= 1 or null, got {window}")
    types = raw.get("layer_types")
    if types is None:
        types = ["sliding_attention" if use and window is not None and i in nope
                 else "full_attention" for i in range(num_layers)]
    if (not isinstance(types, list) or len(types) != num_layers
            or not set(types) <= {"full_attention", "sliding_attention"}):
        raise EmberError(f"config.json: layer_types must list 'full_attention' or "
                         f"'sliding_attention' for each of the {num_layers} layers, got {types!r}")
    sliding = [t == "sliding_attention" for t in types]
    if any(sliding) and (window is None or not use):
        raise EmberError(
            "config.json: layer_types marks sliding-attention layers but "
            + ("sliding_window is null (transformers cannot build that mask)" if window is None
               else "use_sliding_window is false (transformers' eager/SDPA attention applies the "
                    "window there, its flash attention does not); set use_sliding_window to "
                    "true to keep the window, or mark those layers full_attention"))
    out = dict(nope_layers=nope, sliding_window=window if any(sliding) else None)
    if any(sliding) and not all(sliding):
        out["layer_types"] = tuple(types)
    return out


def _granite_fields(raw: Mapping) -> dict:
    m = {k: get_float(raw, k, 1.0) for k in _GRANITE_MULT}
    if not all(math.isfinite(v) for v in m.values()) or m["logits_scaling"] == 0:
        raise EmberError(f"config.json: Granite's multipliers must be finite numbers and "
                         f"logits_scaling non-zero, got {m}")
    return dict(embedding_scale=None if m["embedding_multiplier"] == 1.0
                else m["embedding_multiplier"],
                residual_multiplier=m["residual_multiplier"],
                attention_multiplier=m["attention_multiplier"],
                logits_scaling=m["logits_scaling"])


def variant_fields(raw: Mapping, num_layers: int, max_pos: int = 2048,
                   rotary_dim: int | None = None) -> dict:
    """The ModelConfig fields of a SmolLM3 / Granite / OLMo2 / OLMo3 config.json beyond Llama's
    ({} for other families; OLMo3's RoPE needs ``max_pos`` and ``rotary_dim``)."""
    mt = raw["model_type"]
    if mt not in VARIANTS:
        return {}
    if mt == "smollm3":
        return _smollm3_fields(raw, num_layers)
    if mt == "granite":
        if raw.get("architectures") == ["GraniteForSequenceClassification"]:
            raise EmberError(_NO_GRANITE_CLASSIFIER)
        return _granite_fields(raw)
    out = dict(sandwich_norms=True, pre_norms=False, qk_norm_full=True)  # qk_norm: hf_config
    if mt == "olmo3":
        out.update(olmo3_fields(raw, num_layers, max_pos, rotary_dim))
    return out


def variant_problems(cfg: ModelConfig) -> list[str]:
    """The variant fields cfg sets that its model_type cannot express in config.json (for every
    model_type: a Llama with NoPE layers has no HF form either)."""
    mt, problems = cfg.model_type, []
    if cfg.nope_layers and mt != "smollm3":
        problems.append(f"nope_layers={cfg.nope_layers}")
    granite = dict(residual_multiplier=1.0, logits_scaling=1.0, attention_multiplier=None)
    for name, plain in granite.items():
        if mt != "granite" and getattr(cfg, name) != plain:
            problems.append(f"{name}={getattr(cfg, name)}")
    olmo = mt in OLMO
    if cfg.pre_norms == olmo:
        problems.append(f"pre_norms={cfg.pre_norms}")
    if cfg.qk_norm_full != olmo:
        problems.append(f"qk_norm_full={cfg.qk_norm_full}")
    if mt in ("granite", "olmo2") and cfg.sliding_window is not None:
        problems.append(f"sliding_window={cfg.sliding_window}")
    if mt == "granite" and cfg.labels is not None:
        problems.append(f"labels={list(cfg.labels)} ({_NO_GRANITE_CLASSIFIER})")
    if mt == "smollm3" and cfg.rope_local_theta is not None:
        problems.append(f"rope_local_theta={cfg.rope_local_theta}")
    if mt == "olmo3":
        problems += olmo3_problems(cfg)
    return problems


def variant_to_hf(cfg: ModelConfig, out: dict) -> None:
    """The family's config.json fields (transformers 5 names), into ``out`` (other families:
    nothing)."""
    mt = cfg.model_type
    if mt not in VARIANTS:
        return
    out["attention_bias"] = cfg.attention_bias
    if mt in ("smollm3", "granite"):
        out["mlp_bias"] = cfg.mlp_bias
    if mt == "smollm3":
        sliding = [cfg.is_sliding(i) for i in range(cfg.num_layers)]
        out.update(
            no_rope_layers=[int(i not in cfg.nope_layers) for i in range(cfg.num_layers)],
            use_sliding_window=any(sliding),
            sliding_window=cfg.sliding_window if any(sliding) else None,
            layer_types=["sliding_attention" if s else "full_attention" for s in sliding])
    if mt == "granite":
        out.update(
            embedding_multiplier=1.0 if cfg.embedding_scale is None else cfg.embedding_scale,
            residual_multiplier=cfg.residual_multiplier,
            attention_multiplier=cfg.head_dim**-0.5 if cfg.softmax_scale is None
            else cfg.softmax_scale,
            logits_scaling=cfg.logits_scaling)
    if mt == "olmo3":
        olmo3_to_hf(cfg, out)
