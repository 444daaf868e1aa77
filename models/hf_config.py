"""Hugging Face ``config.json`` <-> Ember ``ModelConfig``, as pure functions on parsed dicts.

Supported ``model_type``: llama (also SmolLM2), mistral, ministral, qwen2, qwen3, phi3 (its fused
weights are split in ``ember.models.hf``), gemma (v1: ``norm_offset`` 1, GeGLU, scaled embeddings),
gemma2 and gemma3_text (also: sandwich norms, ``query_pre_attn_scalar``, per-layer sliding windows
from ``layer_types``, softcaps; Gemma 3: (1 + w) q/k norms, a local RoPE base). The multimodal
``gemma3`` (Gemma3ForConditionalGeneration) loads as its ``gemma3_text`` language model, marked
``extra["multimodal"] = "gemma3"`` so that export writes for the multimodal class
(``ember.models.hf_gemma.multimodal_text_config``); other multimodal families are refused.
Mixture of experts (mixtral, qwen2_moe, qwen3_moe): ``ember.models.hf_moe``; smollm3, granite,
olmo2, olmo3: ``ember.models.hf_llama_variants``. Both
config.json styles are read: transformers 4.x (``rope_theta``, ``rope_scaling``, ``torch_dtype``)
and 5.x (``rope_parameters``, ``dtype``); ``config_to_hf`` (``ember.models.hf_config_export``)
writes both, so either
major version loads the folder. RoPE (default, linear, llama3, yarn, longrope; Phi-3's
``partial_rotary_factor``) is parsed in ``ember.models.hf_rope``, Gemma 2/3's own fields (windows
per layer, softcaps, Gemma 3's RoPE per layer type) in ``ember.models.hf_gemma``.

MLP activation: any parameter-free name of transformers' ACT2FN in any family
(``ember.models.activations``; SiLU and the tanh GELU on fused kernels), read from the field
transformers 5 reads (``hidden_activation`` for Gemma 2/3, else ``hidden_act``).

Every config.json field is either understood, checked to have the one value Ember implements, or on
an explicit list of harmless fields (bookkeeping, generation defaults); any other field is an error
that names it, so a checkpoint Ember would silently compute differently is never loaded.

Qwen2/Qwen3 sliding window: transformers applies it to layers ``i >= max_window_layers`` (or per
``layer_types``); a mixed stack becomes ``ModelConfig.layer_types``. Ministral (Ministral-8B) is
Mistral with the window on the layers ``layer_types`` marks: ``model_type`` "ministral", or
"mistral" with a ``layer_types`` field, which transformers' AutoConfig reads as ministral.

Quantized checkpoints: ``quantization_config`` is accepted for bitsandbytes 4-bit (NF4, FP4) and
8-bit only (``quantization_config_from_hf`` validates it; GPTQ, AWQ... are refused naming the
field); it describes storage, so the ModelConfig does not carry it. State dicts are in
``ember.models.hf``, which re-exports every public name of this module.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping

import torch

from ember import EmberError
from ember.models import hf_llama_variants as _var
from ember.models.activations import activation_from_hf
from ember.models.config import ModelConfig
from ember.models.heads import labels_from_hf, problem_type_from_hf
from ember.models.hf_gemma import DEFAULTS as _GEMMA_DEFAULTS
from ember.models.hf_gemma import FIELDS as _GEMMA_FIELDS
from ember.models.hf_gemma import MULTIMODAL, gemma_fields, multimodal_text_config
from ember.models.hf_moe import MOE_FAMILIES, moe_config
from ember.models.hf_phi import phi_config
from ember.models.hf_rope import get_float as _get_float
from ember.models.hf_rope import parse_partial_rotary as _parse_partial_rotary
from ember.models.hf_rope import parse_rope as _parse_rope
from ember.models.hf_starcoder2 import ARCHITECTURE as _STARCODER2
from ember.models.hf_starcoder2 import starcoder2_config
from ember.models.nf4 import check_quantization_config

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "ministral", "qwen2", "qwen3", "phi3", "gemma",
                         "gemma2", "gemma3_text", "phi", *MOE_FAMILIES, *_var.VARIANTS,
                         "starcoder2")
GEMMA = ("gemma", "gemma2", "gemma3_text")
_SANDWICH = ("gemma2", "gemma3_text")  # Gemma 2/3: post-norms, softcaps, per-layer windows
ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "ministral": "MinistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "phi3": "Phi3ForCausalLM",
    "gemma": "GemmaForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
    "phi": "PhiForCausalLM",
    **{mt: arch for mt, (_, _, arch) in MOE_FAMILIES.items()},
    **_var.ARCHITECTURES,
    "starcoder2": _STARCODER2,
}
# transformers' config-class pad_token_id where it is not None (the variants': hf_llama_variants):
# the embedding's padding_idx (that row's gradient stays zero) and the classifier's last token
_PAD_DEFAULTS = {"gemma": 0, "gemma2": 0, "gemma3_text": 0, "phi3": 32000}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


# --------------------------------------------------------------------------------------------------
# config.json -> ModelConfig

# Fields with no effect on the computation (bookkeeping, labels, generation defaults, other
# runtimes).
_HARMLESS_FIELDS = frozenset(
    """
    _name_or_path transformers_version architectures model_type use_cache initializer_range auto_map
    pretraining_tp is_llama_config transformers.js_config output_attentions output_hidden_states
    return_dict torchscript use_return_dict id2label label2id problem_type num_labels
    chunk_size_feed_forward max_sequence_length
    is_encoder_decoder is_decoder add_cross_attention tie_encoder_decoder
    cross_attention_hidden_size pruned_heads finetuning_task tokenizer_class prefix sep_token_id
    decoder_start_token_id
    task_specific_params tf_legacy_loss use_bfloat16 _attn_implementation_autoset
    max_length min_length do_sample early_stopping num_beams num_beam_groups diversity_penalty
    temperature top_k top_p typical_p repetition_penalty length_penalty no_repeat_ngram_size
    encoder_no_repeat_ngram_size bad_words_ids num_return_sequences output_scores
    return_dict_in_generate forced_bos_token_id forced_eos_token_id remove_invalid_values
    exponential_decay_length_penalty suppress_tokens begin_suppress_tokens
    _commit_hash _attn_implementation attn_implementation unsloth_version unsloth_fixed
""".split()
)

_COMMON_FIELDS = frozenset(
    """
    vocab_size hidden_size intermediate_size num_hidden_layers num_attention_heads
    num_key_value_heads head_dim rms_norm_eps max_position_embeddings tie_word_embeddings
    bos_token_id eos_token_id
    pad_token_id rope_theta rope_scaling rope_parameters dtype torch_dtype hidden_act
    attention_dropout rope_interleaved partial_rotary_factor quantization_config
""".split()
) | {"original_max_position_embeddings"}  # top level: the original context of a flat llama3 /
# yarn / longrope dict, over the dict's own (transformers 5.24; hf_rope.parse_rope), ignored with
# the other RoPE types and Gemma 3's per-layer dicts

_QWEN_WINDOW = "use_sliding_window sliding_window max_window_layers layer_types"
_FAMILY_FIELDS = {
    "llama": frozenset({"attention_bias", "mlp_bias"}),
    "mistral": frozenset({"sliding_window", "layer_types"}),
    "ministral": frozenset({"sliding_window", "layer_types"}),
    "qwen2": frozenset(f"{_QWEN_WINDOW} use_mrope".split()),
    "qwen3": frozenset(f"{_QWEN_WINDOW} attention_bias".split()),
    "phi3": frozenset(
        # attention_bias: transformers' Phi-3 has no biases whatever it says; the last four are
        # Phi-4-mini's custom-code fields (checked at their no-op values below)
        """sliding_window resid_pdrop embd_pdrop original_max_position_embeddings
        attention_bias full_attn_mod interpolate_factor lm_head_bias mlp_bias""".split()
    ),
    "gemma": frozenset({"attention_bias", "hidden_activation", "use_bidirectional_attention"}),
    **_GEMMA_FIELDS,
    **_var.FIELDS,
}

_MLP_BIAS = ("llama", "smollm3", "granite")
_WINDOW_IGNORED = ("llama", "gemma", "granite", "olmo2")  # no window in transformers
_QK_NORM = ("qwen3", "gemma3_text", "olmo2", "olmo3")
_PHI3_NOOP_FIELDS = dict(full_attn_mod=1, interpolate_factor=1, lm_head_bias=False, mlp_bias=False)

# transformers' class defaults for fields a config.json may omit; matching them keeps parity.
_IDS = dict(bos_token_id=1, eos_token_id=2)
_QWEN = dict(max_position_embeddings=32768, num_key_value_heads=32, sliding_window=4096,
             bos_token_id=None, eos_token_id=None, max_window_layers=28)  # fmt: skip
_DEFAULTS = {
    "llama": dict(**_IDS, max_position_embeddings=2048, num_key_value_heads=None),
    "mistral": dict(
        **_IDS, max_position_embeddings=131072, num_key_value_heads=8, sliding_window=4096
    ),
    "ministral": dict(
        **_IDS, max_position_embeddings=131072, num_key_value_heads=8, sliding_window=4096
    ),
    "qwen2": _QWEN,
    "qwen3": dict(**_QWEN, head_dim=128),
    "phi3": dict(
        bos_token_id=1,
        eos_token_id=32000,
        max_position_embeddings=4096,
        num_key_value_heads=None,
        sliding_window=None,
        rms_norm_eps=1e-5,
    ),
    "gemma": dict(
        bos_token_id=2,
        eos_token_id=1,
        max_position_embeddings=8192,
        num_key_value_heads=16,
        head_dim=256,
        tie_word_embeddings=True,
    ),
    **_GEMMA_DEFAULTS,
    **_var.DEFAULTS,
}


def _get_int(raw: Mapping, key: str, default=..., *, nullable: bool = False) -> int | None:
    if key not in raw:
        if default is ...:
            raise EmberError(f"config.json: required field {key!r} is missing")
        return default
    v = raw[key]
    if v is None and nullable:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise EmberError(f"config.json: {key} must be a non-negative integer, got {v!r}")
    return v


def _get_bool(raw: Mapping, key: str, default: bool) -> bool:
    v = raw.get(key, default)
    if not isinstance(v, bool):
        raise EmberError(f"config.json: {key} must be true or false, got {v!r}")
    return v


def _parse_window(raw: Mapping, model_type: str, num_layers: int
                  ) -> tuple[int | None, tuple[str, ...] | None]:
    dflt = _DEFAULTS[model_type]
    window = _get_int(raw, "sliding_window", dflt.get("sliding_window"), nullable=True)
    if window == 0:
        raise EmberError("config.json: sliding_window must be >= 1 or null, got 0")
    if model_type == "phi3":
        return window, None
    if model_type in ("mistral", "ministral"):
        # Ministral: the window on the layers layer_types marks (transformers' AutoConfig loads a
        # mistral config.json with layer_types as ministral); without it, on every layer
        types = raw.get("layer_types")
        return (window, None) if types is None else _window_layers(types, window, num_layers)
    if model_type in ("llama", "gemma", *_var.VARIANTS):  # SmolLM3's: hf_llama_variants
        return None, None
    if model_type in _SANDWICH:
        return window, None
    if _get_bool(raw, "use_mrope", False):
        raise EmberError("config.json: use_mrope=true (multimodal RoPE) is not supported")
    # Qwen2/3: the window exists only with use_sliding_window, and only on the layers layer_types
    # (or max_window_layers) marks as sliding; transformers ignores max_window_layers when
    # layer_types is given.
    if not _get_bool(raw, "use_sliding_window", False):
        window = None
    types = raw.get("layer_types")
    if types is None:
        first = _get_int(raw, "max_window_layers", dflt["max_window_layers"])
        types = [
            "sliding_attention" if window is not None and i >= first else "full_attention"
            for i in range(num_layers)
        ]
    return _window_layers(types, window, num_layers)


def _window_layers(types, window: int | None, num_layers: int
                   ) -> tuple[int | None, tuple[str, ...] | None]:
    """(window, per-layer types or None when every layer is alike) of a ``layer_types`` list;
    sliding layers without a window are refused (transformers fails to build their mask)."""
    if (
        not isinstance(types, list)
        or len(types) != num_layers
        or not set(types) <= {"full_attention", "sliding_attention"}
    ):
        raise EmberError(
            f"config.json: layer_types must list 'full_attention'/'sliding_attention' "
            f"for each of the {num_layers} layers, got {types!r}"
        )
    sliding = [i for i, t in enumerate(types) if t == "sliding_attention"]
    if not sliding:
        return None, None
    if window is None:
        raise EmberError(
            "config.json: layer_types marks sliding-attention layers but "
            "use_sliding_window is false or sliding_window is null"
        )
    if len(sliding) != num_layers:  # the window on some layers only: per-layer types
        return window, tuple(types)
    return window, None


def _activation(raw: Mapping, model_type: str) -> str:
    """Ember's MLP activation, read from the field transformers 5's MLP reads: ``hidden_act``, or
    ``hidden_activation`` (Gemma 2/3); ``ember.models.activations``."""
    if raw.get("use_bidirectional_attention"):
        raise EmberError("config.json: use_bidirectional_attention=true is not supported")
    key = "hidden_activation" if model_type in _SANDWICH else "hidden_act"
    return activation_from_hf(raw, model_type, key,
                              "gelu_pytorch_tanh" if model_type in GEMMA else "silu")


def quantization_config_from_hf(raw: Mapping) -> dict | None:
    """config.json's ``quantization_config`` (bitsandbytes 4-bit or 8-bit: the kinds Ember loads),
    validated, or None for an unquantized checkpoint. It says how the linear weights are stored,
    not what the model computes, so ``config_from_hf`` leaves it out of the ModelConfig."""
    qc = raw.get("quantization_config")
    if qc is None:
        return None
    if not isinstance(qc, Mapping):
        raise EmberError(f"config.json: quantization_config must be an object, got {qc!r}")
    try:
        check_quantization_config(qc)
    except EmberError as e:
        raise EmberError(f"config.json: {e}") from None
    return dict(qc)


def config_from_hf(raw: Mapping, *, partial_rotary_factor: float | None = None) -> ModelConfig:
    """ModelConfig from a parsed config.json (either transformers 4.x or 5.x style).
    ``partial_rotary_factor``: set by ``hf_phi``, which reads Phi's own (default 0.5) and parses
    the shared fields as a Llama config's (whose factor would be ignored)."""
    if not isinstance(raw, Mapping):
        raise EmberError(f"config.json must hold a JSON object, got {type(raw).__name__}")
    model_type = raw.get("model_type")
    if model_type is not None and not isinstance(model_type, str):  # (unhashable: TypeError)
        raise EmberError(f"config.json: model_type must be the family's name, a string such as "
                         f"\"llama\", got {model_type!r}; fix config.json")
    if model_type in MULTIMODAL:
        # Gemma3ForConditionalGeneration: its language model, trained text-only; the marker tells
        # export to write PEFT names / merged folders for the multimodal class.
        cfg = config_from_hf(multimodal_text_config(raw, _HARMLESS_FIELDS))
        return cfg.replace(extra={**cfg.extra, "multimodal": model_type})
    if model_type in MOE_FAMILIES:  # the dense sibling's attention plus experts (hf_moe)
        return moe_config(raw, config_from_hf)
    if model_type == "phi":  # Phi-1/1.5/2: Llama's shared fields plus its own (hf_phi)
        return phi_config(raw, _HARMLESS_FIELDS, config_from_hf)
    if model_type == "starcoder2":  # LayerNorms, plain MLP, biases (hf_starcoder2)
        return starcoder2_config(raw, _HARMLESS_FIELDS, config_from_hf)
    if model_type not in SUPPORTED_MODEL_TYPES:
        multimodal = "text_config" in raw or "vision_config" in raw
        raise EmberError(
            f"config.json: model_type {model_type!r} is "
            + ("a multimodal model, which Ember does not load (of the multimodal families, only "
               "the language model of 'gemma3' is supported); use a text-only checkpoint"
               if multimodal else "not supported")
            + f" (supported: {', '.join(SUPPORTED_MODEL_TYPES + tuple(MULTIMODAL))})"
        )
    quantization_config_from_hf(raw)
    raw = _var.with_defaults(raw)  # SmolLM3 / Granite / OLMo2: RoPE base, pad token defaults
    if "pad_token_id" not in raw and model_type in _PAD_DEFAULTS:
        raw = {**raw, "pad_token_id": _PAD_DEFAULTS[model_type]}
    if "auto_map" in raw:
        # Official Phi-3 / older Qwen repos ship custom code next to a model_type transformers
        # implements natively; like transformers without trust_remote_code, the native model is
        # used (the unknown-field check below still refuses configs the native code can't read).
        warnings.warn(
            f"config.json: auto_map points at custom modeling code, which Ember never runs; "
            f"loading it as a standard {model_type} model",
            stacklevel=2,
        )
    if model_type in _WINDOW_IGNORED and "sliding_window" in raw:
        # transformers' attention for these families never reads it (Llama conversions of
        # Mistral-style checkpoints carry one): ignored as transformers ignores it, never refused
        if raw["sliding_window"] is not None:
            warnings.warn(
                f"config.json: sliding_window={raw['sliding_window']!r} is ignored: "
                f"transformers' {model_type} attends over the whole sequence on every layer, "
                "and so does Ember; use model_type 'mistral' for a windowed model",
                stacklevel=2,
            )
        raw = {k: v for k, v in raw.items() if k != "sliding_window"}
    unknown = sorted(set(raw) - _HARMLESS_FIELDS - _COMMON_FIELDS - _FAMILY_FIELDS[model_type])
    if unknown:
        raise EmberError(
            f"config.json: field(s) {unknown} are not supported for model_type "
            f"{model_type!r}; Ember cannot guarantee the same computation"
        )
    archs = raw.get("architectures")
    classifier = _classifier_architecture(model_type)
    labels = labels_from_hf(raw, classifier)
    if labels is None and model_type in _OLD_CLASSIFIERS:  # folders Ember exported before
        labels = labels_from_hf(raw, _OLD_CLASSIFIERS[model_type])
    causal_lm = isinstance(archs, list) and archs and all(
        isinstance(a, str) and a.endswith("ForCausalLM") for a in archs)
    if causal_lm and labels is None and archs != [ARCHITECTURES[model_type]]:
        # AutoModelForCausalLM builds the model from model_type and never reads architectures
        # (old Llama conversions say "LLaMAForCausalLM"); the weights' names are checked anyway
        warnings.warn(
            f"config.json: architectures {archs!r} is not {model_type}'s "
            f"{ARCHITECTURES[model_type]!r}; loading it as model_type {model_type!r}, as "
            "transformers' AutoModelForCausalLM does (export writes the standard name)",
            stacklevel=2,
        )
    elif archs is not None and labels is None and archs not in (
            [ARCHITECTURES[model_type]], [base_architecture(model_type)]):
        # the base model (LlamaModel) loads as AutoModelForCausalLM loads it: tied to the
        # embedding, or refused for its missing lm_head.weight (transformers: a random head)
        raise EmberError(
            f"config.json: architectures {archs!r} is not supported; expected "
            f"[{ARCHITECTURES[model_type]!r}] or [{classifier!r}]"
        )
    act = _activation(raw, model_type)
    if model_type == "phi3":
        # Phi-4-mini's config.json (written for its custom code) carries these at values that
        # change nothing; transformers' Phi-3 ignores them whatever they say, so others are refused
        for key, noop in _PHI3_NOOP_FIELDS.items():
            if key in raw and raw[key] != noop:
                raise EmberError(
                    f"config.json: {key}={raw[key]!r} is not supported for model_type 'phi3' "
                    f"(only {json.dumps(noop)}: transformers' Phi-3 does not implement it)"
                )
    # Phi-3's residual dropout (on the attention and MLP outputs, in training forwards); its
    # embd_pdrop is read and never applied by transformers' Phi-3, so it changes nothing here
    resid = _get_float(raw, "resid_pdrop", 0.0)
    for key in ("resid_pdrop", "embd_pdrop", "attention_dropout"):
        if not 0.0 <= _get_float(raw, key, 0.0) < 1.0:
            raise EmberError(f"config.json: {key} must be in [0, 1), got {raw[key]}")
    # Dropout on the attention probabilities in training forwards (Granite 3 ships 0.1), as
    # transformers' attention does (models/transformer.py: an explicit-mask path in training)
    attn_drop = _get_float(raw, "attention_dropout", 0.0)
    if _get_bool(raw, "rope_interleaved", False):
        raise EmberError(
            "config.json: rope_interleaved=true is not supported (Ember uses the "
            "half-rotation RoPE layout)"
        )
    partial = (_parse_partial_rotary(raw, model_type) if partial_rotary_factor is None
               else partial_rotary_factor)

    dflt = _DEFAULTS[model_type]
    num_layers = _get_int(raw, "num_hidden_layers")
    num_heads = _get_int(raw, "num_attention_heads")
    kv = _get_int(raw, "num_key_value_heads", dflt["num_key_value_heads"], nullable=True)
    head_dim = _get_int(raw, "head_dim", dflt.get("head_dim"), nullable=True)
    max_pos = _get_int(raw, "max_position_embeddings", dflt["max_position_embeddings"])
    kv = kv if kv is not None else num_heads
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads"):
        if _get_int(raw, key) == 0:
            raise EmberError(f"config.json: {key} must be >= 1")
    if kv == 0 or num_heads % kv:
        raise EmberError(
            f"config.json: num_attention_heads ({num_heads}) must be a multiple of "
            f"num_key_value_heads ({kv})"
        )
    if head_dim is None and _get_int(raw, "hidden_size") % num_heads:
        raise EmberError(
            f"config.json: hidden_size ({raw['hidden_size']}) is not divisible by "
            f"num_attention_heads ({num_heads}); set head_dim"
        )
    dims = head_dim or _get_int(raw, "hidden_size") // num_heads
    rotary_dim = int(dims * partial)
    if rotary_dim % 2:
        # transformers builds ceil(rotary_dim / 2) frequencies, a table one wider than the rotated
        # part, and fails, except Phi-3, which rotates rotary_dim + 1 dims with frequencies spaced
        # for rotary_dim; an odd head_dim is fine when an even part of it rotates (partial rotary)
        theirs = ("transformers' Phi-3 rotates int(...) + 1 dims with frequencies spaced for the "
                  "odd width, which Ember does not implement" if model_type == "phi3" else
                  "transformers cannot run this config either")
        raise EmberError(
            f"config.json: RoPE rotates int(head_dim * partial_rotary_factor) = {rotary_dim} "
            f"dims of each head (head_dim {dims}), which must be even; {theirs}")
    # Gemma 3's and OLMo 3's RoPE per layer type: hf_gemma / hf_olmo3
    theta, scaling = (None, None) if model_type in ("gemma3_text", "olmo3") else _parse_rope(
        raw, max_pos, model_type, rotary_dim
    )
    dtype = raw.get("dtype") or raw.get("torch_dtype")
    if dtype is not None and not (isinstance(dtype, str) and dtype in DTYPES):  # [..]: unhashable
        raise EmberError(
            f"config.json: dtype {dtype!r} is not supported (use one of {', '.join(DTYPES)})"
        )
    eos = raw.get("eos_token_id", dflt["eos_token_id"])
    if not (
        eos is None
        or (isinstance(eos, int) and not isinstance(eos, bool))
        or (isinstance(eos, list) and all(isinstance(e, int) for e in eos))
    ):
        raise EmberError(
            f"config.json: eos_token_id must be an integer, a list or null, got {eos!r}"
        )

    if model_type == "qwen2":
        attn_bias, out_bias = True, False
    elif model_type in ("llama", "qwen3", *GEMMA, *_var.VARIANTS):
        attn_bias = out_bias = _get_bool(raw, "attention_bias", False)
    else:
        attn_bias = out_bias = False
    extra = {k: raw[k] for k in ("initializer_range",) if k in raw}
    if _pad_token_id(raw) is None and isinstance(raw.get("pad_token_id"), int):
        extra["pad_token_id"] = raw["pad_token_id"]  # negative: ModelConfig.padding_idx
    window, layer_types = _parse_window(raw, model_type, num_layers)
    fields = dict(rope_theta=theta, rope_scaling=scaling, sliding_window=window)
    if layer_types is not None:  # Qwen2/3 with the window on some layers only
        fields["layer_types"] = layer_types
    fields.update(_var.variant_fields(raw, num_layers, max_pos, rotary_dim))
    if model_type in _SANDWICH:
        fields.update(gemma_fields(raw, model_type, num_layers, max_pos, fields["sliding_window"],
                                   rotary_dim))
    gemma = model_type in GEMMA
    fields.setdefault("embedding_scale", _get_int(raw, "hidden_size") ** 0.5 if gemma else None)
    try:
        return ModelConfig(
            model_type=model_type,
            vocab_size=_get_int(raw, "vocab_size"),
            hidden_size=_get_int(raw, "hidden_size"),
            intermediate_size=_get_int(raw, "intermediate_size"),
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=kv,
            head_dim=head_dim,
            rms_norm_eps=_get_float(raw, "rms_norm_eps", dflt.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=max_pos,
            partial_rotary_factor=partial,
            tie_word_embeddings=_get_bool(
                raw, "tie_word_embeddings", dflt.get("tie_word_embeddings", False)
            ),
            attention_bias=attn_bias,
            attention_out_bias=out_bias,
            mlp_bias=_get_bool(raw, "mlp_bias", False) if model_type in _MLP_BIAS else False,
            qk_norm=model_type in _QK_NORM,
            activation=act,
            norm_offset=1.0 if gemma else 0.0,
            bos_token_id=_get_int(raw, "bos_token_id", dflt["bos_token_id"], nullable=True),
            eos_token_id=eos,
            pad_token_id=_pad_token_id(raw),
            torch_dtype=dtype or "float32",
            resid_dropout=resid,
            attention_dropout=attn_drop,
            labels=labels, problem_type=problem_type_from_hf(raw, labels),
            extra=extra,
            **fields,
        )
    except EmberError:
        raise
    except ValueError as e:
        raise EmberError(f"config.json: {e}") from None


def _pad_token_id(raw: Mapping) -> int | None:
    """pad_token_id; a negative one (early Llama conversions: -1) is no pad token: no token id is
    negative. transformers' embedding still takes it as padding_idx, which PyTorch counts from
    the end: ``config_from_hf`` keeps it in ``extra`` for ``ModelConfig.padding_idx`` and export."""
    pad = raw.get("pad_token_id")
    if isinstance(pad, int) and not isinstance(pad, bool) and pad < 0:
        return None
    return _get_int(raw, "pad_token_id", None, nullable=True)


# transformers' Gemma 3 text classifier; Gemma3ForSequenceClassification is the multimodal one's
_CLASSIFIERS = {"gemma3_text": "Gemma3TextForSequenceClassification"}
_OLD_CLASSIFIERS = {"gemma3_text": "Gemma3ForSequenceClassification"}
_BASE_MODELS = {"gemma3_text": "Gemma3TextModel"}


def base_architecture(model_type: str) -> str:
    """transformers' headless base model class of a family (``LlamaModel``)."""
    return _BASE_MODELS.get(model_type) or ARCHITECTURES[model_type].replace("ForCausalLM",
                                                                             "Model")


def _classifier_architecture(model_type: str) -> str:
    """transformers' classifier class of a family (``LlamaForSequenceClassification``)."""
    return _CLASSIFIERS.get(model_type) or ARCHITECTURES[model_type].replace(
        "ForCausalLM", "ForSequenceClassification")
