"""StarCoder2 (transformers ``model_type`` "starcoder2", ``Starcoder2ForCausalLM``): config.json
<-> ``ModelConfig`` and the state-dict key table, for ``ember.models.hf_config`` / ``hf``, read as
transformers 5.24's ``models/starcoder2/modeling_starcoder2.py`` computes.

Ember's decoder with these fields: LayerNorms with bias (``norm="layernorm"``, eps
``norm_epsilon``) before attention and before the MLP (a sequential block, not Phi's parallel one),
biases on q/k/v/o and both MLP projections iff ``use_bias`` (default true), the plain MLP
(``c_fc`` -> ``hidden_act`` -> ``c_proj``: Ember's ``up_proj`` / ``down_proj``,
``gated_mlp=False``), a window on every layer when ``sliding_window`` is set (default none), no
head bias. Dropout: ``residual_dropout`` on the attention and MLP outputs and
``embedding_dropout`` on the embeddings, in training forwards only, where transformers applies
them; ``attention_dropout`` as for every family. RoPE: the shared types ``hf_rope`` reads (base
default 10000). A classifier (``Starcoder2ForSequenceClassification``) loads and exports as in
every family (``ember.models.heads``).
"""

from __future__ import annotations

from collections.abc import Mapping

from ember import EmberError
from ember.models.activations import to_hf_name
from ember.models.config import ModelConfig
from ember.models.heads import labels_from_hf, labels_to_hf, problem_type_from_hf
from ember.models.hf_llama_variants import variant_problems
from ember.models.hf_rope import get_float, get_window, legacy_rope_scaling, rope_to_hf

ARCHITECTURE = "Starcoder2ForCausalLM"
CLASSIFIER = "Starcoder2ForSequenceClassification"

FIELDS = frozenset(
    """
    vocab_size hidden_size intermediate_size num_hidden_layers num_attention_heads
    num_key_value_heads head_dim hidden_act max_position_embeddings norm_epsilon use_bias
    residual_dropout embedding_dropout attention_dropout sliding_window tie_word_embeddings
    rope_parameters rope_theta rope_scaling bos_token_id eos_token_id pad_token_id dtype
    torch_dtype quantization_config original_max_position_embeddings
    mlp_type norm_type rms_norm_eps
""".split()
)
# Keys the released checkpoints' config.json carry (starcoder2-3b/7b/15b, written before
# Starcoder2Config settled) and transformers ignores: the only values they take there, else refused
# (rms_norm_eps: transformers reads norm_epsilon, and so does Ember)
RELEASED_ONLY = {"mlp_type": "default", "norm_type": "layer_norm"}
# Starcoder2Config's class defaults where they differ from Llama's
DEFAULTS = dict(
    bos_token_id=50256,
    eos_token_id=50256,
    max_position_embeddings=4096,
    num_key_value_heads=2,
    hidden_act="gelu_pytorch_tanh",
    tie_word_embeddings=True,
)

# (ember key template, HF key template); "{i}" is a layer index.
KEYS: list[tuple[str, str]] = [
    ("embed.weight", "model.embed_tokens.weight"),
    *[
        (f"layers.{{i}}.{e}.{p}", f"model.layers.{{i}}.{h}.{p}")
        for e, h in (("attn_norm", "input_layernorm"), ("mlp_norm", "post_attention_layernorm"))
        for p in ("weight", "bias")
    ],
    *[
        (f"layers.{{i}}.attn.{e}.{p}", f"model.layers.{{i}}.self_attn.{e}.{p}")
        for e in ("q_proj", "k_proj", "v_proj", "o_proj")
        for p in ("weight", "bias")
    ],
    *[
        (f"layers.{{i}}.mlp.{e}.{p}", f"model.layers.{{i}}.mlp.{h}.{p}")
        for e, h in (("up_proj", "c_fc"), ("down_proj", "c_proj"))
        for p in ("weight", "bias")
    ],
    ("norm.weight", "model.norm.weight"),
    ("norm.bias", "model.norm.bias"),
    ("lm_head.weight", "lm_head.weight"),
    ("score.weight", "score.weight"),  # Starcoder2ForSequenceClassification (ember.models.heads)
]

# Ember's projection leaf names <-> transformers' StarCoder2 names (LoRA targets, PEFT names)
HF_LEAVES = {"up_proj": "c_fc", "down_proj": "c_proj"}
EMBER_LEAVES = {h: e for e, h in HF_LEAVES.items()}


def _fraction(raw: Mapping, key: str) -> float:
    v = get_float(raw, key, 0.0)
    if not 0.0 <= v < 1.0:
        raise EmberError(f"config.json: {key} must be in [0, 1), got {v}")
    return v


def starcoder2_config(raw: Mapping, harmless: frozenset, config_from_hf) -> ModelConfig:
    """The ModelConfig of a starcoder2 config.json: the shared fields read by ``config_from_hf``
    as a Llama config's, then StarCoder2's own set."""
    archs = raw.get("architectures")
    if archs is not None and archs not in ([ARCHITECTURE], [CLASSIFIER]):
        raise EmberError(
            f"config.json: architectures {archs!r} is not supported for model_type "
            f"'starcoder2'; only [{ARCHITECTURE!r}] or [{CLASSIFIER!r}] is"
        )
    unknown = sorted(set(raw) - FIELDS - harmless)
    if unknown:
        raise EmberError(
            f"config.json: field(s) {unknown} are not supported for model_type "
            "'starcoder2'; Ember cannot guarantee the same computation"
        )
    labels = labels_from_hf(raw, CLASSIFIER)
    bias = raw.get("use_bias", True)
    if not isinstance(bias, bool):
        raise EmberError(f"config.json: use_bias must be true or false, got {bias!r}")
    window = get_window(raw)
    for key, only in RELEASED_ONLY.items():
        if key in raw and raw[key] != only:
            raise EmberError(
                f"config.json: {key} {raw[key]!r} is not supported for model_type 'starcoder2' "
                f"(the released checkpoints have {only!r}, the only one transformers computes)"
            )
    resid, embd = _fraction(raw, "residual_dropout"), _fraction(raw, "embedding_dropout")
    own = (
        *RELEASED_ONLY,
        "use_bias",
        "norm_epsilon",
        "residual_dropout",
        "embedding_dropout",
        "sliding_window",
        "architectures",
    )
    base = {**DEFAULTS, **{k: v for k, v in raw.items() if k not in own}}
    base.update(model_type="llama", rms_norm_eps=get_float(raw, "norm_epsilon", 1e-5))
    try:
        cfg = config_from_hf(base)
    except EmberError as e:  # the shared fields were read as a llama config's: say starcoder2
        raise EmberError(str(e).replace("for llama", "for starcoder2")) from None
    try:
        return cfg.replace(
            model_type="starcoder2",
            norm="layernorm",
            gated_mlp=False,
            attention_bias=bias,
            attention_out_bias=bias,
            mlp_bias=bias,
            sliding_window=window,
            resid_dropout=resid,
            embed_dropout=embd,
            labels=labels,
            problem_type=problem_type_from_hf(raw, labels),
        )
    except ValueError as e:
        raise EmberError(f"config.json: {e}") from None


def starcoder2_to_hf(cfg: ModelConfig, dtype: str) -> dict:
    """config.json of a starcoder2 ModelConfig, or an EmberError naming what
    Starcoder2ForCausalLM cannot express."""
    bias = cfg.attention_bias
    problems = [
        f"{k}={getattr(cfg, k)!r}"
        for k, want in dict(
            norm="layernorm",
            parallel_block=False,
            gated_mlp=False,
            attention_out_bias=bias,
            mlp_bias=bias,
            lm_head_bias=False,
            qk_norm=False,
            sandwich_norms=False,
            layer_types=None,
            attn_softcap=None,
            final_softcap=None,
            embedding_scale=None,
            norm_offset=0.0,
            rope_local_theta=None,
            query_pre_attn_scalar=None,
            num_experts=0,
            partial_rotary_factor=1.0,
        ).items()
        if getattr(cfg, k) != want
    ]
    problems += variant_problems(cfg)  # NoPE layers, Granite's multipliers, OLMo's norms
    if problems:
        raise EmberError(
            "cannot export as Hugging Face model_type 'starcoder2': it has no "
            f"equivalent of {', '.join(problems)}"
        )
    out = {
        "architectures": [ARCHITECTURE],
        "model_type": "starcoder2",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": to_hf_name(cfg.activation, "starcoder2"),
        "norm_epsilon": cfg.rms_norm_eps,
        "use_bias": bias,
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "sliding_window": cfg.sliding_window,
        "residual_dropout": cfg.resid_dropout,
        "embedding_dropout": cfg.embed_dropout,
        "attention_dropout": cfg.attention_dropout,
        "rope_parameters": rope_to_hf(cfg),
        "rope_theta": cfg.rope_theta,  # 4.x reads these two
        "rope_scaling": legacy_rope_scaling(cfg),
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "pad_token_id": cfg.pad_token_id
        if cfg.pad_token_id is not None
        else cfg.extra.get("pad_token_id"),
        "dtype": dtype,
        "torch_dtype": dtype,
        "use_cache": True,
    }
    if "initializer_range" in cfg.extra:
        out["initializer_range"] = cfg.extra["initializer_range"]
    if cfg.labels is not None:
        out.update(architectures=[CLASSIFIER], **labels_to_hf(cfg.labels, cfg.problem_type))
    return out
