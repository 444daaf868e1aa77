"""Ember ``ModelConfig`` -> Hugging Face ``config.json`` (the reading half, and what each field
means, is ``ember.models.hf_config``): a dict transformers 4.45+ and 5.x load into the same model,
or an ``EmberError`` naming what the target ``model_type`` cannot express."""

from __future__ import annotations

import torch

from ember import EmberError
from ember.models import hf_llama_variants as _var
from ember.models.activations import to_hf_name
from ember.models.config import ModelConfig
from ember.models.heads import labels_to_hf
from ember.models.hf_config import (
    _MLP_BIAS,
    _QK_NORM,
    _SANDWICH,
    ARCHITECTURES,
    DTYPES,
    GEMMA,
    SUPPORTED_MODEL_TYPES,
    _classifier_architecture,
)
from ember.models.hf_gemma import gemma_to_hf
from ember.models.hf_moe import MOE_FAMILIES, moe_check_exportable, moe_to_hf
from ember.models.hf_phi import pad_token_id_to_hf, phi_fields_of, phi_to_hf, shape_to_hf
from ember.models.hf_rope import LONGROPE_FAMILIES, legacy_rope_scaling, rope_to_hf
from ember.models.hf_starcoder2 import starcoder2_to_hf

# Families transformers has no *ForSequenceClassification for: a classifier of one has no
# transformers class to load it into, as a SEQ_CLS adapter's base (a merged folder: variant_problems
# refuses it in config_to_hf).
NO_CLASSIFIER = ("granite",)


def check_classifier_exportable(cfg: ModelConfig, what: str = "export") -> None:
    if cfg.labels is not None and cfg.model_type in NO_CLASSIFIER:
        raise EmberError(
            f"cannot {what} a {cfg.model_type} classifier: transformers has no "
            f"{_classifier_architecture(cfg.model_type)} to load it into; keep it in Ember's "
            "own checkpoints, or train the classifier on a family transformers has one for"
        )


def _check_exportable(cfg: ModelConfig) -> None:
    mt = cfg.model_type
    if mt not in SUPPORTED_MODEL_TYPES:
        raise EmberError(
            f"cannot export model_type {mt!r} to Hugging Face (supported: "
            f"{', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    # Phi-1/2's fields and the Llama variants' (SmolLM3, Granite, OLMo2): no other family has them
    problems = [p for p in phi_fields_of(cfg) if not (  # Phi-3 has Phi's residual dropout
        mt == "phi3" and p.startswith("resid_dropout="))] + _var.variant_problems(cfg)
    gemma, sandwich = mt in GEMMA, mt in _SANDWICH
    names = ("layer_types", "query_pre_attn_scalar", "attn_softcap", "final_softcap")
    for name in () if sandwich else names:
        if name == "layer_types" and mt in ("qwen2", "qwen3", "smollm3", "mistral",
                                            "ministral", "olmo3") and cfg.sliding_window:
            continue  # Qwen's / Ministral's own layer_types: the window on some layers only
        if getattr(cfg, name) is not None:
            problems.append(f"{name}={getattr(cfg, name)}")
    if cfg.sandwich_norms != (sandwich or mt in _var.OLMO):
        problems.append(f"sandwich_norms={cfg.sandwich_norms}")
    if cfg.rope_local_theta is not None and mt not in ("gemma3_text", "olmo3"):
        problems.append(f"rope_local_theta={cfg.rope_local_theta}")
    if mt == "gemma3_text" and cfg.rope_local_theta is None and cfg.rope_scaling is not None:
        problems.append("RoPE scaling on sliding layers (rope_local_theta=None)")
    if cfg.partial_rotary_factor != 1.0 and mt != "phi3":
        problems.append(f"partial_rotary_factor={cfg.partial_rotary_factor}")
    if cfg.longrope is not None and mt not in LONGROPE_FAMILIES:
        problems.append("LongRoPE")
    if mt == "phi3" and cfg.rope_scaling is not None and cfg.rope_scaling.kind != "longrope":
        problems.append(f"{cfg.rope_scaling.kind} RoPE scaling (transformers' Phi-3 takes "
                        "LongRoPE only)")
    if cfg.embedding_scale != (cfg.hidden_size**0.5 if gemma else None) and mt != "granite":
        problems.append(f"embedding_scale={cfg.embedding_scale}")
    if cfg.norm_offset != (1.0 if gemma else 0.0):
        problems.append(f"norm_offset={cfg.norm_offset}")
    if cfg.qk_norm != (mt in _QK_NORM):
        problems.append(f"qk_norm={cfg.qk_norm}")
    if cfg.mlp_bias and mt not in _MLP_BIAS:
        problems.append("mlp_bias=True")
    if cfg.sliding_window is not None and mt in ("llama", "gemma"):
        problems.append(f"sliding_window={cfg.sliding_window}")
    rs = cfg.rope_scaling
    if mt == "gemma3_text" and rs is not None and rs.kind == "yarn" and not rs.truncate:
        problems.append("YaRN truncate=False (transformers 5's Gemma 3 always truncates)")
    if cfg.attn_softcap is not None and mt == "gemma3_text":  # transformers reads, never applies it
        problems.append(f"attn_softcap={cfg.attn_softcap}")
    bias = (cfg.attention_bias, cfg.attention_out_bias)
    allowed = {
        "llama": {(False, False), (True, True)},
        "mistral": {(False, False)},
        "ministral": {(False, False)},
        "qwen2": {(True, False)},
        "qwen3": {(False, False), (True, True)},
        "phi3": {(False, False)},
        "gemma": {(False, False), (True, True)},
        "gemma2": {(False, False), (True, True)},
        "gemma3_text": {(False, False), (True, True)},
    }.get(mt, {(False, False), (True, True)})  # SmolLM3, Granite, OLMo2: Llama's
    if bias not in allowed:
        problems.append(f"attention_bias={bias[0]}, attention_out_bias={bias[1]}")
    if problems:
        raise EmberError(
            f"cannot export as Hugging Face model_type {mt!r}: it has no "
            f"equivalent of {', '.join(problems)}"
        )


def config_to_hf(cfg: ModelConfig, dtype: str | torch.dtype | None = None) -> dict:
    """A config.json dict that transformers (4.45+ and 5.x) loads into the same model.

    ``dtype`` is the dtype the weights are saved in (default ``cfg.torch_dtype``)."""
    if cfg.num_experts or cfg.model_type in MOE_FAMILIES:  # ember.models.hf_moe
        return moe_to_hf(cfg, config_to_hf(moe_check_exportable(cfg), dtype))
    if cfg.model_type not in ("phi", "starcoder2"):
        _check_exportable(cfg)
    if isinstance(dtype, torch.dtype):
        dtype = {v: k for k, v in DTYPES.items()}.get(dtype, str(dtype))
    dtype = dtype or cfg.torch_dtype
    if dtype not in DTYPES:
        raise EmberError(f"cannot export dtype {dtype!r} (use one of {', '.join(DTYPES)})")
    if cfg.model_type == "phi":  # ember.models.hf_phi
        return phi_to_hf(cfg, dtype)
    if cfg.model_type == "starcoder2":  # ember.models.hf_starcoder2
        return starcoder2_to_hf(cfg, dtype)
    mt = cfg.model_type
    rope = rope_to_hf(cfg)
    legacy_scaling = legacy_rope_scaling(cfg)
    out = {
        "architectures": [ARCHITECTURES[mt]],
        "model_type": mt,
        **shape_to_hf(cfg),
        "head_dim": cfg.head_dim,
        "hidden_act": to_hf_name(cfg.activation, mt),
        "rms_norm_eps": cfg.rms_norm_eps,
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "pad_token_id": pad_token_id_to_hf(cfg),
        # 5.x reads rope_parameters and dtype; 4.x reads rope_theta, rope_scaling and torch_dtype.
        "rope_parameters": rope,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": legacy_scaling,
        "dtype": dtype,
        "torch_dtype": dtype,
        "attention_dropout": cfg.attention_dropout,
        "use_cache": True,
    }
    if "initializer_range" in cfg.extra:  # absent: transformers' default, as it was read
        out["initializer_range"] = cfg.extra["initializer_range"]
    if mt in ("llama", "qwen3", *GEMMA):
        out["attention_bias"] = cfg.attention_bias
    if mt == "llama":
        out["mlp_bias"] = cfg.mlp_bias
    if mt == "gemma":
        # transformers 4.40-4.47's GemmaMLP computes hidden_activation (the tanh GELU when it is
        # missing), 4.48+ hidden_act: both, the same name (the reader checks that they agree)
        out["hidden_activation"] = out["hidden_act"]
    if mt in ("mistral", "ministral", "phi3"):
        out["sliding_window"] = cfg.sliding_window
    if mt == "ministral" and cfg.sliding_window is None:
        # transformers' Ministral builds its sliding mask even when no layer slides, and fails
        # without a window: one as long as the context, used by no layer (read back as none)
        out["sliding_window"] = cfg.max_position_embeddings
    if mt == "ministral" or (mt == "mistral" and cfg.layer_types is not None):
        # a mistral config.json with layer_types is what transformers' AutoConfig loads as
        # ministral, the class that reads it
        out["layer_types"] = [("sliding_attention" if cfg.is_sliding(i) else "full_attention")
                              for i in range(cfg.num_layers)]
    if mt == "phi3":
        out.update(
            resid_pdrop=cfg.resid_dropout,
            embd_pdrop=0.0,
            # transformers' Phi-3 reads LongRoPE's original context from here, not the rope dict
            original_max_position_embeddings=cfg.max_position_embeddings
            if cfg.longrope is None
            else cfg.longrope.original_max_position_embeddings,
        )
        if cfg.partial_rotary_factor != 1.0:
            out["partial_rotary_factor"] = cfg.partial_rotary_factor
    if mt in ("qwen2", "qwen3"):
        sliding = cfg.sliding_window is not None
        types = [("sliding_attention" if cfg.is_sliding(i) else "full_attention")
                 for i in range(cfg.num_layers)]
        first = next((i for i, t in enumerate(types) if t == "sliding_attention"), cfg.num_layers)
        out.update(use_sliding_window=sliding, sliding_window=cfg.sliding_window,
                   max_window_layers=first, layer_types=types)
    if cfg.labels is not None:
        out.update(architectures=[_classifier_architecture(mt)],
                   **labels_to_hf(cfg.labels, cfg.problem_type))
    if mt in _SANDWICH:
        gemma_to_hf(cfg, out)
    _var.variant_to_hf(cfg, out)
    return out
