"""config.json of mixture-of-experts families <-> ``ModelConfig``, for ``ember.models.hf_config``.

Each MoE family is its dense sibling plus expert fields: ``mixtral`` is ``mistral``'s attention,
``qwen2_moe`` is ``qwen2``'s (q/k/v biases), ``qwen3_moe`` is ``qwen3``'s (q/k norms).
``moe_base_config`` turns an MoE config.json into its sibling's (with the MoE family's
defaults filled in, since they differ: Mixtral's RoPE base is 1e6 and it has no window by
default) plus the ``ModelConfig`` MoE fields; ``moe_to_hf`` turns the sibling's exported dict
back. Fields read as transformers 5.23 reads them: Mixtral ``num_local_experts`` (or its alias
``num_experts``); Qwen2-MoE ``num_experts``; Qwen3-MoE ``num_experts`` (4.x) or
``num_local_experts`` (what 5.x writes).
Checkpoints that store a sparse layer's experts as transformers 5 holds them in memory (two 3-D
tensors ``mlp.experts.gate_up_proj`` (E, 2F, D), gate rows first, and ``mlp.experts.down_proj``
(E, D, F), e.g. saved from a state dict rather than by ``save_pretrained``; Mixtral's router then
is ``mlp.gate``) load as transformers loads them: ``expert_parts`` names each expert's slices;
export writes one key per expert and projection, as ``save_pretrained`` does.
Refused: ``router_jitter_noise`` != 0 (training-time noise Ember does not draw), a Qwen-MoE
sliding window (no released model uses it) and ``qkv_bias`` false. Sequence classifiers
(``Qwen3MoeForSequenceClassification``) read and write as their dense sibling's
(``ember.models.heads``) under the MoE family's classifier name.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from ember import EmberError
from ember.models.config import ModelConfig

# family: (dense sibling, its architecture, the family's architecture)
MOE_FAMILIES = {
    "mixtral": ("mistral", "MistralForCausalLM", "MixtralForCausalLM"),
    "qwen2_moe": ("qwen2", "Qwen2ForCausalLM", "Qwen2MoeForCausalLM"),
    "qwen3_moe": ("qwen3", "Qwen3ForCausalLM", "Qwen3MoeForCausalLM"),
}

# transformers' defaults where the MoE family's differ from (or are absent in) its sibling's.
_DEFAULTS = {
    "mixtral": dict(rope_theta=1e6, sliding_window=None, rms_norm_eps=1e-5,
                    max_position_embeddings=131072, num_key_value_heads=8),
    "qwen2_moe": dict(num_key_value_heads=16),
    "qwen3_moe": dict(num_key_value_heads=4, head_dim=None),
}
_MOE_DEFAULTS = {
    "mixtral": dict(num_local_experts=8, num_experts_per_tok=2),
    "qwen2_moe": dict(num_experts=60, num_experts_per_tok=4, moe_intermediate_size=1408,
                      shared_expert_intermediate_size=5632, norm_topk_prob=False),
    "qwen3_moe": dict(num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768,
                      norm_topk_prob=False),
}
_QWEN_WINDOW = ("use_sliding_window", "sliding_window", "max_window_layers", "layer_types")
_ROUTER = ("router_aux_loss_coef", "router_jitter_noise", "output_router_logits")


def _int(raw: Mapping, key: str, default) -> int:
    v = raw.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise EmberError(f"config.json: {key} must be a non-negative integer, got {v!r}")
    return v


def moe_base_config(raw: Mapping) -> tuple[dict, dict]:
    """(the dense sibling's config.json, ModelConfig MoE fields) of an MoE config.json."""
    mt = raw["model_type"]
    base, base_arch, arch = MOE_FAMILIES[mt]
    out, moe_d = dict(raw), _MOE_DEFAULTS[mt]
    archs = out.pop("architectures", None)
    # the headless base model (Qwen2MoeModel.save_pretrained) loads as AutoModelForCausalLM
    # loads it, as a dense family's (hf_config.base_architecture): tied, or its head missing
    bare = arch.replace("ForCausalLM", "Model")
    # the sequence classifier (Qwen3MoeForSequenceClassification) reads as its dense sibling's
    # (labels, num_labels, problem_type: ember.models.heads), the experts as a causal LM's
    classifier = arch.replace("ForCausalLM", "ForSequenceClassification")
    if archs is not None and archs not in ([arch], [bare], [classifier]):
        raise EmberError(f"config.json: architectures {archs!r} is not supported for model_type "
                         f"{mt!r}; only [{arch!r}] (causal LM), [{classifier!r}] (sequence "
                         f"classifier) or [{bare!r}] (its base model) is")
    if _num(out, "router_jitter_noise", 0.0) != 0.0:
        raise EmberError("config.json: router_jitter_noise != 0 is not supported (Ember draws no "
                         "router noise); set it to 0")
    coef = _num(out, "router_aux_loss_coef", 0.001)
    for key in _ROUTER:
        out.pop(key, None)
    experts_key = "num_local_experts" if mt == "mixtral" else "num_experts"
    # transformers' attribute_map makes the other name the same field (Qwen3-MoE: 5.x writes
    # num_local_experts; Mixtral: num_experts is read as num_local_experts)
    alias = {"mixtral": "num_experts", "qwen3_moe": "num_local_experts"}.get(mt)
    if alias in out:
        if experts_key in out and out[experts_key] != out[alias]:
            raise EmberError("config.json: num_experts and num_local_experts disagree")
        out[experts_key] = out.pop(alias)
    fields = dict(
        num_experts=_int(out, experts_key, moe_d[experts_key]),
        num_experts_per_tok=_int(out, "num_experts_per_tok", moe_d["num_experts_per_tok"]),
        router_aux_loss_coef=coef,
    )
    out.pop(experts_key, None)
    out.pop("num_experts_per_tok", None)
    if mt == "mixtral":
        if "layer_types" in out:  # Mistral's field (Ministral's windows); Mixtral has none
            raise EmberError("config.json: field(s) ['layer_types'] are not supported for "
                             "model_type 'mixtral'; Ember cannot guarantee the same computation")
        fields.update(moe_intermediate_size=None, norm_topk_prob=True)
    else:
        if _bool(out, "use_sliding_window", False):
            raise EmberError(f"config.json: use_sliding_window=true is not supported for {mt}")
        for key in _QWEN_WINDOW:
            out.pop(key, None)
        only = out.pop("mlp_only_layers", None)
        only = [] if only is None else only  # null: transformers' default, no dense layers
        if not isinstance(only, list) or not all(isinstance(i, int) for i in only):
            raise EmberError(f"config.json: mlp_only_layers must be a list of layer indices, "
                             f"got {only!r}")
        fields.update(
            moe_intermediate_size=_int(out, "moe_intermediate_size",
                                       moe_d["moe_intermediate_size"]),
            norm_topk_prob=_bool(out, "norm_topk_prob", moe_d["norm_topk_prob"]),
            shared_expert_intermediate_size=_int(
                out, "shared_expert_intermediate_size",
                moe_d.get("shared_expert_intermediate_size", 0)),
            decoder_sparse_step=_int(out, "decoder_sparse_step", 1),
            mlp_only_layers=tuple(only),
        )
        for key in ("moe_intermediate_size", "norm_topk_prob", "decoder_sparse_step",
                    "shared_expert_intermediate_size"):
            out.pop(key, None)
        if mt == "qwen3_moe":
            fields["shared_expert_intermediate_size"] = 0
    if mt == "qwen2_moe" and not _bool(out, "qkv_bias", True):
        raise EmberError("config.json: qkv_bias=false is not supported for qwen2_moe")
    out.pop("qkv_bias", None)
    if fields["num_experts"] == 0 or fields.get("decoder_sparse_step") == 0:
        raise EmberError(f"config.json: {mt} with no experts (num_experts=0 or "
                         "decoder_sparse_step=0); load it as a dense model instead")
    for key, value in _DEFAULTS[mt].items():
        # rope_theta too when there is a rope dict: transformers fills the dict's missing base
        # with it (Mixtral's 1e6), and a base in the dict still goes first (hf_rope.parse_rope)
        out.setdefault(key, value)
    out["model_type"] = base
    if archs is not None:
        suffix = {arch: "ForCausalLM", bare: "Model", classifier: "ForSequenceClassification"}
        out["architectures"] = [base_arch.replace("ForCausalLM", suffix[archs[0]])]
    return out, fields


def _num(raw: Mapping, key: str, default: float) -> float:
    v = raw.get(key, default)
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise EmberError(f"config.json: {key} must be a number, got {v!r}")
    return float(v)


def _bool(raw: Mapping, key: str, default: bool) -> bool:
    v = raw.get(key, default)
    if not isinstance(v, bool):
        raise EmberError(f"config.json: {key} must be true or false, got {v!r}")
    return v


def moe_config(raw: Mapping, config_from_hf) -> ModelConfig:
    """The ModelConfig of an MoE config.json (``config_from_hf`` reads the dense sibling's)."""
    base, moe = moe_base_config(raw)
    cfg = config_from_hf(base)
    try:
        return cfg.replace(model_type=raw["model_type"], **moe)
    except ValueError as e:
        raise EmberError(f"config.json: {e}") from None


def moe_check_exportable(cfg: ModelConfig) -> ModelConfig:
    """The dense sibling's ModelConfig of an MoE cfg (for the shared export checks)."""
    mt = cfg.model_type
    if mt not in MOE_FAMILIES:
        raise EmberError(f"cannot export model_type {mt!r} with experts: Hugging Face's "
                         f"mixture-of-experts families are {', '.join(MOE_FAMILIES)}")
    if cfg.num_experts == 0:
        raise EmberError(f"cannot export model_type {mt!r} without experts (num_experts=0)")
    problems = []
    if mt == "mixtral" and (not cfg.norm_topk_prob or cfg.shared_expert_intermediate_size
                            or cfg.decoder_sparse_step != 1 or cfg.mlp_only_layers
                            or cfg.moe_intermediate_size != cfg.intermediate_size):
        problems.append("Qwen-MoE routing fields")
    if mt == "qwen3_moe" and cfg.shared_expert_intermediate_size:
        problems.append("a shared expert")
    if mt != "mixtral" and cfg.sliding_window is not None:
        problems.append(f"sliding_window={cfg.sliding_window}")
    if problems:
        raise EmberError(f"cannot export as Hugging Face model_type {mt!r}: it has no "
                         f"equivalent of {', '.join(problems)}")
    return cfg.replace(model_type=MOE_FAMILIES[mt][0], num_experts=0)


def moe_to_hf(cfg: ModelConfig, out: dict) -> dict:
    """Turn the dense sibling's exported config.json ``out`` into the MoE family's."""
    mt = cfg.model_type
    arch = MOE_FAMILIES[mt][2]
    if cfg.labels is not None:  # the sibling's classifier fields (labels_to_hf) stay
        arch = arch.replace("ForCausalLM", "ForSequenceClassification")
    out.update(model_type=mt, architectures=[arch],
               num_experts_per_tok=cfg.num_experts_per_tok,
               router_aux_loss_coef=cfg.router_aux_loss_coef, router_jitter_noise=0.0,
               output_router_logits=False)
    if mt == "mixtral":
        out["num_local_experts"] = cfg.num_experts
        return out
    for key in _QWEN_WINDOW:
        out.pop(key, None)
    out.update(num_experts=cfg.num_experts, moe_intermediate_size=cfg.moe_intermediate_size,
               norm_topk_prob=cfg.norm_topk_prob, decoder_sparse_step=cfg.decoder_sparse_step,
               mlp_only_layers=list(cfg.mlp_only_layers), use_sliding_window=False,
               sliding_window=None)
    if mt == "qwen2_moe":
        out.update(shared_expert_intermediate_size=cfg.shared_expert_intermediate_size,
                   qkv_bias=True)
    return out


# Ember modules of a sparse layer that transformers 5 + bitsandbytes keep dense (the experts'
# 3-D parameters and the router are no nn.Linear): written dequantized in a 4-bit checkpoint
DENSE_UNDER_BNB = re.compile(r"\.mlp\.(?:experts\.|gate$)")
_STACKED = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)")
_SHARED = re.compile(r"model\.layers\.\d+\.mlp\.shared_expert(?:_gate|\.(?:gate|up|down)_proj)"
                     r"\.weight")


def is_empty_shared_expert(key: str, shape: tuple[int, ...], cfg: ModelConfig) -> bool:
    """Whether ``key`` is part of a Qwen2-MoE shared expert of width 0
    (``shared_expert_intermediate_size: 0``): transformers still builds and saves one (its
    projections (0, D) / (D, 0), its gate (1, D)), which adds exactly 0 to every token. Ember
    builds none, so these keys are skipped on load."""
    if (cfg.model_type != "qwen2_moe" or cfg.shared_expert_intermediate_size
            or not _SHARED.fullmatch(key)):
        return False
    if key.endswith("shared_expert_gate.weight"):
        return tuple(shape) == (1, cfg.hidden_size)
    return 0 in tuple(shape)
# per-expert HF names of (gate, up, down), as save_pretrained writes them
_EXPERT_KEYS = {
    "mixtral": ("block_sparse_moe.experts.{e}.w1", "block_sparse_moe.experts.{e}.w3",
                "block_sparse_moe.experts.{e}.w2"),
    "qwen2_moe": ("mlp.experts.{e}.gate_proj", "mlp.experts.{e}.up_proj",
                  "mlp.experts.{e}.down_proj"),
}
_EXPERT_KEYS["qwen3_moe"] = _EXPERT_KEYS["qwen2_moe"]


def expert_parts(hf_shapes: Mapping[str, tuple[int, ...]], cfg: ModelConfig,
                 where: str = "checkpoint") -> dict[str, list[tuple[str, int, int, int]]]:
    """``{stacked key: [(per-expert HF key, expert e, first row, end row)]}`` for the 3-D expert
    stacks of sparse layers in ``hf_shapes`` (the part is ``stack[e, first:end]``); {} for dense
    families. A stack of the wrong shape is an EmberError naming it."""
    if cfg.model_type not in _EXPERT_KEYS:
        return {}
    out = {}
    E, F, D = cfg.num_experts, cfg.moe_intermediate_size, cfg.hidden_size
    gate, up, down = (f"{{prefix}}.{k}.weight" for k in _EXPERT_KEYS[cfg.model_type])
    for key, shape in hf_shapes.items():
        m = _STACKED.fullmatch(key)
        if m is None or not (int(m[1]) < cfg.num_layers and cfg.is_sparse(int(m[1]))):
            continue  # not a stack, or one in a dense layer: map_hf_keys names it
        prefix = f"model.layers.{m[1]}"
        fused = m[2] == "gate_up_proj"
        want = (E, 2 * F, D) if fused else (E, D, F)
        if tuple(shape) != want:
            raise EmberError(f"{where}: {key} has shape {tuple(shape)}, expected {want} for this "
                             "config.json")
        parts = []
        for e in range(E):
            names = [(gate, 0, F), (up, F, 2 * F)] if fused else [(down, 0, D)]
            parts += [(t.format(prefix=prefix, e=e), e, a, b) for t, a, b in names]
        out[key] = parts
    return out
