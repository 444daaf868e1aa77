"""Phi-1 / Phi-1.5 / Phi-2 (transformers ``model_type`` "phi", ``PhiForCausalLM``): config.json
<-> ``ModelConfig`` and the state-dict key table, for ``ember.models.hf_config`` / ``hf``.

The architecture is Ember's decoder with these fields: LayerNorms with bias (``norm="layernorm"``,
eps ``layer_norm_eps``), one ``input_layernorm`` per block feeding attention and MLP in parallel
(``parallel_block``), biases on q/k/v, the output projection (``dense``), the plain MLP
(``fc1`` -> ``hidden_act`` -> ``fc2``: Ember's ``up_proj`` / ``down_proj``, ``gated_mlp=False``) and
the head (``lm_head.bias``: Ember's ``head_bias``), optional per-head q/k LayerNorms
(``qk_layernorm``), partial rotary (``partial_rotary_factor``, transformers' default 0.5; the
``rope_parameters`` value wins over the top-level one, as in transformers 5), any RoPE scaling
``hf_rope`` reads (linear, dynamic, YaRN, LongRoPE, llama3; computed over the rotated width, as
transformers' PhiRotaryEmbedding does) and ``head_dim`` other than hidden_size / heads.

Dropout: ``resid_pdrop`` and ``embd_pdrop`` are applied in training forwards exactly where
transformers applies them (phi-2 ships ``resid_pdrop=0.1``; eval and generation never drop);
``attention_dropout`` is applied to the attention probabilities in training forwards, as for every
family.
Refused with a message: ``head_dim`` other than hidden_size / heads together with
``qk_layernorm`` (transformers sizes the q/k LayerNorms hidden_size / heads and cannot run it).
A classifier
(``PhiForSequenceClassification``: ``score.weight``, no LM head) loads and exports as in every
family (``ember.models.heads``). bitsandbytes NF4 checkpoints load as for every family.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping

from ember import EmberError
from ember.models.activations import to_hf_name
from ember.models.config import ModelConfig, RopeScaling
from ember.models.heads import labels_from_hf, labels_to_hf, problem_type_from_hf
from ember.models.hf_llama_variants import variant_problems
from ember.models.hf_rope import (
    get_float,
    legacy_rope_scaling,
    parse_rope,
    rope_dict,
    rope_to_hf,
)

ARCHITECTURE = "PhiForCausalLM"
CLASSIFIER = "PhiForSequenceClassification"

# config.json fields of PhiConfig (the generic bookkeeping ones are hf_config's harmless list)
FIELDS = frozenset("""
    vocab_size hidden_size intermediate_size num_hidden_layers num_attention_heads
    num_key_value_heads head_dim resid_pdrop embd_pdrop attention_dropout hidden_act
    max_position_embeddings layer_norm_eps tie_word_embeddings rope_parameters rope_theta
    rope_scaling partial_rotary_factor qk_layernorm bos_token_id eos_token_id pad_token_id dtype
    torch_dtype quantization_config original_max_position_embeddings
""".split())  # the last: top level, over a yarn / llama3 / longrope dict's (hf_rope.parse_rope)

# (ember key template, HF key template); "{i}" is a layer index.
KEYS: list[tuple[str, str]] = [
    ("embed.weight", "model.embed_tokens.weight"),
    *[(f"layers.{{i}}.attn_norm.{p}", f"model.layers.{{i}}.input_layernorm.{p}")
      for p in ("weight", "bias")],
    *[(f"layers.{{i}}.attn.{e}.{p}", f"model.layers.{{i}}.self_attn.{h}.{p}")
      for e, h in (("q_proj", "q_proj"), ("k_proj", "k_proj"), ("v_proj", "v_proj"),
                   ("o_proj", "dense"), ("q_norm", "q_layernorm"), ("k_norm", "k_layernorm"))
      for p in ("weight", "bias")],
    *[(f"layers.{{i}}.mlp.{e}.{p}", f"model.layers.{{i}}.mlp.{h}.{p}")
      for e, h in (("up_proj", "fc1"), ("down_proj", "fc2")) for p in ("weight", "bias")],
    ("norm.weight", "model.final_layernorm.weight"),
    ("norm.bias", "model.final_layernorm.bias"),
    ("lm_head.weight", "lm_head.weight"),
    ("head_bias", "lm_head.bias"),
    ("score.weight", "score.weight"),  # PhiForSequenceClassification (ember.models.heads)
]

# Ember's projection leaf names <-> transformers' Phi names (LoRA targets, PEFT module names)
HF_LEAVES = {"o_proj": "dense", "up_proj": "fc1", "down_proj": "fc2"}
EMBER_LEAVES = {h: e for e, h in HF_LEAVES.items()}


def _fraction(raw: Mapping, key: str, default: float) -> float:
    v = get_float(raw, key, default)
    if not 0.0 <= v < 1.0:
        raise EmberError(f"config.json: {key} must be in [0, 1), got {v}")
    return v


def _rope(raw: Mapping) -> tuple[float, RopeScaling | None, float]:
    """(rope_theta, scaling, partial_rotary_factor) as transformers 5's PhiConfig reads them: the
    rope dict (a non-empty legacy ``rope_scaling`` wins over ``rope_parameters``) with any of the
    shared RoPE types (``hf_rope.parse_rope``), over the partially rotated width; partial rotary
    from the rope dict, else the top-level field, else 0.5."""
    rope = rope_dict(raw)
    partial = get_float(rope, "partial_rotary_factor",
                        get_float(raw, "partial_rotary_factor", 0.5))
    if not 0 < partial <= 1:
        raise EmberError(f"config.json: partial_rotary_factor must be in (0, 1], got {partial}")
    rope.pop("partial_rotary_factor", None)
    heads, hidden = raw.get("num_attention_heads", 32), raw.get("hidden_size", 2048)
    max_pos, hd = raw.get("max_position_embeddings", 2048), raw.get("head_dim")
    for name, v in (("num_attention_heads", heads), ("hidden_size", hidden),
                    ("max_position_embeddings", max_pos), ("head_dim", hd)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v <= 0):
            raise EmberError(f"config.json: {name} must be a positive integer, got {v!r}")
    rotary_dim = int((hd or hidden // heads) * partial)
    # a top-level original_max_position_embeddings goes over the rope dict's (parse_rope)
    top = {k: raw[k] for k in ("rope_theta", "original_max_position_embeddings") if k in raw}
    theta, scaling = parse_rope({"rope_parameters": rope, **top}, max_pos, "phi", rotary_dim)
    return theta, scaling, partial


def phi_config(raw: Mapping, harmless: frozenset, config_from_hf) -> ModelConfig:
    """The ModelConfig of a phi config.json. The shared fields (sizes, ids, dtype, activation,
    ``attention_dropout``) are read by ``config_from_hf`` as for a Llama config, then the Phi
    fields are set."""
    archs = raw.get("architectures")
    if archs is not None and archs not in ([ARCHITECTURE], [CLASSIFIER]):
        raise EmberError(f"config.json: architectures {archs!r} is not supported for model_type "
                         f"'phi'; only [{ARCHITECTURE!r}] (causal LM) or [{CLASSIFIER!r}] is")
    labels = labels_from_hf(raw, CLASSIFIER)
    unknown = sorted(set(raw) - FIELDS - harmless)
    if unknown:
        raise EmberError(f"config.json: field(s) {unknown} are not supported for model_type "
                         "'phi'; Ember cannot guarantee the same computation")
    qk = raw.get("qk_layernorm", False)
    if not isinstance(qk, bool):
        raise EmberError(f"config.json: qk_layernorm must be true or false, got {qk!r}")
    theta, scaling, partial = _rope(raw)
    heads, hidden = raw.get("num_attention_heads", 32), raw.get("hidden_size", 2048)
    if qk and raw.get("head_dim") is not None and raw["head_dim"] != hidden // heads:
        raise EmberError(
            f"config.json: head_dim={raw['head_dim']} differs from hidden_size / "
            f"num_attention_heads = {hidden // heads}, which transformers' Phi q/k LayerNorms "
            "(qk_layernorm) assume (it cannot run this config); remove head_dim"
        )
    resid, embd = _fraction(raw, "resid_pdrop", 0.0), _fraction(raw, "embd_pdrop", 0.0)
    if "auto_map" in raw:  # as hf_config does for the other families, in phi's words
        warnings.warn("config.json: auto_map points at custom modeling code, which Ember never "
                      "runs; loading it as a standard phi model", stacklevel=3)
    drop = ("resid_pdrop", "embd_pdrop", "qk_layernorm", "layer_norm_eps", "rope_parameters",
            "rope_scaling", "rope_theta", "partial_rotary_factor", "architectures", "auto_map")
    base = {k: v for k, v in raw.items() if k not in drop}
    base.update(model_type="llama", rope_theta=theta,
                rms_norm_eps=get_float(raw, "layer_norm_eps", 1e-5),
                hidden_act=raw.get("hidden_act", "gelu_new"))
    try:
        cfg = config_from_hf(base, partial_rotary_factor=partial)  # Phi's: head_dim may be odd
    except EmberError as e:  # the shared fields were read as a llama config's: say phi
        raise EmberError(str(e).replace("for llama", "for phi")) from None
    try:
        return cfg.replace(
            model_type="phi", norm="layernorm", parallel_block=True, gated_mlp=False,
            attention_bias=True, attention_out_bias=True, mlp_bias=True, lm_head_bias=True,
            qk_norm=qk, partial_rotary_factor=partial, rope_scaling=scaling,
            resid_dropout=resid, embed_dropout=embd,
            labels=labels, problem_type=problem_type_from_hf(raw, labels))
    except ValueError as e:
        raise EmberError(f"config.json: {e}") from None


_NOT_PHI = dict(norm="rms", parallel_block=False, gated_mlp=True, lm_head_bias=False,
                resid_dropout=0.0, embed_dropout=0.0)


def phi_fields_of(cfg: ModelConfig) -> list[str]:
    """The Phi-only fields a non-phi config sets (export of another model_type refuses them)."""
    return [f"{k}={getattr(cfg, k)!r}" for k, v in _NOT_PHI.items() if getattr(cfg, k) != v]


def shape_to_hf(cfg: ModelConfig) -> dict:
    """The config.json keys of the model's shape, named alike by every family transformers has
    (``config_to_hf`` and ``phi_to_hf`` start from them)."""
    return {"vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
            "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.num_layers,
            "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads}


def pad_token_id_to_hf(cfg: ModelConfig) -> int | None:
    """config.json's ``pad_token_id``: the model's, else the negative one it was read with
    (``ModelConfig.padding_idx``), so that transformers keeps the same embedding row untrained."""
    return cfg.pad_token_id if cfg.pad_token_id is not None else cfg.extra.get("pad_token_id")


def phi_to_hf(cfg: ModelConfig, dtype: str) -> dict:
    """config.json of a phi ModelConfig (transformers 5 names, plus 4.x's rope_theta /
    partial_rotary_factor), or an EmberError naming what PhiForCausalLM cannot express."""
    problems = [f"{k}={getattr(cfg, k)!r}" for k, want in dict(
        norm="layernorm", parallel_block=True, gated_mlp=False, attention_bias=True,
        attention_out_bias=True, mlp_bias=True, lm_head_bias=True, sandwich_norms=False,
        sliding_window=None, layer_types=None, attn_softcap=None, final_softcap=None,
        embedding_scale=None, norm_offset=0.0, rope_local_theta=None,
        query_pre_attn_scalar=None, num_experts=0,
    ).items() if getattr(cfg, k) != want]
    own_head_dim = cfg.head_dim != cfg.hidden_size // cfg.num_heads
    if own_head_dim and cfg.qk_norm:  # transformers' q/k LayerNorms are hidden / heads wide
        problems.append(f"head_dim={cfg.head_dim} with q/k norms")
    problems += variant_problems(cfg)  # NoPE layers, Granite's multipliers, OLMo2's norms
    if problems:
        raise EmberError("cannot export as Hugging Face model_type 'phi': it has no equivalent "
                         f"of {', '.join(problems)}")
    out = {
        "architectures": [ARCHITECTURE],
        "model_type": "phi",
        **shape_to_hf(cfg),
        "hidden_act": to_hf_name(cfg.activation, "phi"),
        "layer_norm_eps": cfg.rms_norm_eps,
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "qk_layernorm": cfg.qk_norm,
        "resid_pdrop": cfg.resid_dropout,
        "embd_pdrop": cfg.embed_dropout,
        "attention_dropout": cfg.attention_dropout,
        # always with partial_rotary_factor: phi's default is 0.5, not rope_to_hf's 1
        "rope_parameters": {**rope_to_hf(cfg), "partial_rotary_factor": cfg.partial_rotary_factor},
        "rope_theta": cfg.rope_theta,  # 4.x reads these two and rope_scaling
        "partial_rotary_factor": cfg.partial_rotary_factor,
        "rope_scaling": legacy_rope_scaling(cfg),
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "pad_token_id": pad_token_id_to_hf(cfg),
        "dtype": dtype,
        "torch_dtype": dtype,
        "use_cache": True,
    }
    if own_head_dim:  # PhiConfig has no head_dim field: transformers reads it as an extra one
        out["head_dim"] = cfg.head_dim
    if "initializer_range" in cfg.extra:
        out["initializer_range"] = cfg.extra["initializer_range"]
    if cfg.labels is not None:
        out.update(architectures=[CLASSIFIER], **labels_to_hf(cfg.labels, cfg.problem_type))
    return out
