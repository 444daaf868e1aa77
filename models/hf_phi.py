"""Phi-1 / Phi-1.5 / Phi-2 (transformers ``model_type`` "phi", ``PhiForCausalLM``): config.json
<-> ``ModelConfig`` and the state-dict key table, for ``ember.models.hf_config`` / ``hf``.

The architecture is Ember's decoder with these fields: LayerNorms with bias (``norm="layernorm"``,
eps ``layer_norm_eps``), one ``input_layernorm`` per block feeding attention and MLP in parallel
(``parallel_block``), biases on q/k/v, the output projection (``dense``), the plain MLP
(``fc1`` -> ``hidden_act`` -> ``fc2``: Ember's ``up_proj`` / ``down_proj``, ``gated_mlp=False``) and
the head (``lm_head.bias``: Ember's ``head_bias``), optional per-head q/k LayerNorms
(``qk_layernorm``), partial rotary (``partial_rotary_factor``, transformers' default 0.5; the
``rope_parameters`` value wins over the top-level one, as in transformers 5).

Dropout: ``resid_pdrop`` and ``embd_pdrop`` are applied in training forwards exactly where
transformers applies them (phi-2 ships ``resid_pdrop=0.1``; eval and generation never drop);
``attention_dropout`` is applied to the attention probabilities in training forwards, as for every
family.
Refused with a message: RoPE scaling (no released Phi-1/2 uses it), ``head_dim`` other than
hidden_size / heads (transformers' q/k LayerNorms assume it). A classifier
(``PhiForSequenceClassification``: ``score.weight``, no LM head) loads and exports as in every
family (``ember.models.heads``). bitsandbytes NF4 checkpoints load as for every family.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping

from ember import EmberError
from ember.models.config import ModelConfig
from ember.models.heads import labels_from_hf, labels_to_hf, problem_type_from_hf
from ember.models.hf_llama_variants import variant_problems
from ember.models.hf_rope import get_float

ARCHITECTURE = "PhiForCausalLM"
CLASSIFIER = "PhiForSequenceClassification"

# config.json fields of PhiConfig (the generic bookkeeping ones are hf_config's harmless list)
FIELDS = frozenset("""
    vocab_size hidden_size intermediate_size num_hidden_layers num_attention_heads
    num_key_value_heads head_dim resid_pdrop embd_pdrop attention_dropout hidden_act
    max_position_embeddings layer_norm_eps tie_word_embeddings rope_parameters rope_theta
    rope_scaling partial_rotary_factor qk_layernorm bos_token_id eos_token_id pad_token_id dtype
    torch_dtype quantization_config
""".split())

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


def _rope(raw: Mapping) -> tuple[float, float]:
    """(rope_theta, partial_rotary_factor) as transformers 5's PhiConfig reads them: the
    ``rope_parameters`` dict, else the legacy top-level fields; partial rotary defaults to 0.5."""
    params = raw.get("rope_parameters")
    if params is not None and not isinstance(params, Mapping):
        raise EmberError(f"config.json: rope_parameters must be an object, got {params!r}")
    params = dict(params or {})
    scaling = raw.get("rope_scaling")
    kind = params.get("rope_type", params.get("type", "default"))
    if scaling is not None or kind != "default":
        raise EmberError(
            "config.json: RoPE scaling (rope_scaling / rope_parameters rope_type "
            f"{scaling or kind!r}) is not supported for model_type 'phi' (Ember implements "
            "Phi-1/1.5/2's default RoPE); remove it or use rope_type 'default'"
        )
    unknown = sorted(set(params) - {"rope_type", "type", "rope_theta", "partial_rotary_factor"})
    if unknown:
        raise EmberError(f"config.json: rope_parameters field(s) {unknown} are not supported "
                         "for model_type 'phi'")
    theta = get_float(params, "rope_theta", get_float(raw, "rope_theta", 10000.0))
    partial = get_float(params, "partial_rotary_factor",
                        get_float(raw, "partial_rotary_factor", 0.5))
    if not 0 < partial <= 1:
        raise EmberError(f"config.json: partial_rotary_factor must be in (0, 1], got {partial}")
    return theta, partial


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
    heads, hidden = raw.get("num_attention_heads"), raw.get("hidden_size")
    if raw.get("head_dim") is not None and isinstance(heads, int) and isinstance(hidden, int) \
            and heads > 0 and raw["head_dim"] != hidden // heads:
        raise EmberError(
            f"config.json: head_dim={raw['head_dim']} differs from hidden_size / "
            f"num_attention_heads = {hidden // heads}, which transformers' Phi q/k LayerNorms "
            "assume; remove head_dim"
        )
    qk = raw.get("qk_layernorm", False)
    if not isinstance(qk, bool):
        raise EmberError(f"config.json: qk_layernorm must be true or false, got {qk!r}")
    theta, partial = _rope(raw)
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
        cfg = config_from_hf(base)
    except EmberError as e:  # the shared fields were read as a llama config's: say phi
        raise EmberError(str(e).replace("for llama", "for phi")) from None
    try:
        return cfg.replace(
            model_type="phi", norm="layernorm", parallel_block=True, gated_mlp=False,
            attention_bias=True, attention_out_bias=True, mlp_bias=True, lm_head_bias=True,
            qk_norm=qk, partial_rotary_factor=partial, resid_dropout=resid, embed_dropout=embd,
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


def phi_to_hf(cfg: ModelConfig, dtype: str) -> dict:
    """config.json of a phi ModelConfig (transformers 5 names, plus 4.x's rope_theta /
    partial_rotary_factor), or an EmberError naming what PhiForCausalLM cannot express."""
    problems = [f"{k}={getattr(cfg, k)!r}" for k, want in dict(
        norm="layernorm", parallel_block=True, gated_mlp=False, attention_bias=True,
        attention_out_bias=True, mlp_bias=True, lm_head_bias=True, sandwich_norms=False,
        sliding_window=None, layer_types=None, attn_softcap=None, final_softcap=None,
        embedding_scale=None, norm_offset=0.0, rope_scaling=None, rope_local_theta=None,
        query_pre_attn_scalar=None, num_experts=0,
    ).items() if getattr(cfg, k) != want]
    if cfg.head_dim != cfg.hidden_size // cfg.num_heads:
        problems.append(f"head_dim={cfg.head_dim}")
    problems += variant_problems(cfg)  # NoPE layers, Granite's multipliers, OLMo2's norms
    if problems:
        raise EmberError("cannot export as Hugging Face model_type 'phi': it has no equivalent "
                         f"of {', '.join(problems)}")
    out = {
        "architectures": [ARCHITECTURE],
        "model_type": "phi",
        **shape_to_hf(cfg),
        "hidden_act": "gelu_new" if cfg.activation == "gelu_tanh" else "silu",
        "layer_norm_eps": cfg.rms_norm_eps,
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "qk_layernorm": cfg.qk_norm,
        "resid_pdrop": cfg.resid_dropout,
        "embd_pdrop": cfg.embed_dropout,
        "attention_dropout": cfg.attention_dropout,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta,
                            "partial_rotary_factor": cfg.partial_rotary_factor},
        "rope_theta": cfg.rope_theta,
        "partial_rotary_factor": cfg.partial_rotary_factor,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "pad_token_id": cfg.pad_token_id,
        "dtype": dtype,
        "torch_dtype": dtype,
        "use_cache": True,
    }
    if "initializer_range" in cfg.extra:
        out["initializer_range"] = cfg.extra["initializer_range"]
    if cfg.labels is not None:
        out.update(architectures=[CLASSIFIER], **labels_to_hf(cfg.labels, cfg.problem_type))
    return out
