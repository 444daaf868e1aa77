"""PEFT's module names and tensor keys for Ember's LoRA modules (used by
``ember.models.peft_adapter``), with the embedding and output-head adapters of
``ember.models.lora_embed``:

    base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight   (a projection)
    base_model.model.model.embed_tokens.lora_embedding_A / _B          (Ember's ``embed``)
    base_model.model.lm_head.lora_A.weight / lora_B.weight             (Ember's ``lm_head``)

A tied model's adapter with ``ensure_weight_tying`` (Ember's ``LoRAEmbedding.ties_head``) is the
embedding's pair, plus the head's as PEFT saves it: ``lora_A = B_emb^T``, ``lora_B = A_emb^T``.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from ember import EmberError
from ember.models.hf_phi import EMBER_LEAVES as _PHI_EMBER_LEAVES
from ember.models.hf_phi import HF_LEAVES as _PHI_HF_LEAVES
from ember.models.hf_starcoder2 import EMBER_LEAVES as _SC2_EMBER_LEAVES
from ember.models.hf_starcoder2 import HF_LEAVES as _SC2_HF_LEAVES

# transformers' own names of Ember's projections, per family; back: no family's clash
_HF_LEAVES = {"phi": _PHI_HF_LEAVES, "starcoder2": _SC2_HF_LEAVES}
_EMBER_LEAVES = {**_PHI_EMBER_LEAVES, **_SC2_EMBER_LEAVES}

# Qwen2-MoE's shared expert is a plain MLP inside the MoE block (experts: ember.models.peft_moe)
_EMBER_NAME = re.compile(r"layers\.(\d+)\.(attn|mlp)\.((?:shared_expert\.)?\w+)")
# A multimodal Gemma 3's language model: "model.language_model." in transformers 4.52+ (what PEFT
# names on transformers 5), "language_model.model." before.
_LM_PREFIX = r"(?:model\.language_model\.|language_model\.model\.|model\.)?"
_HF_NAME = re.compile(_LM_PREFIX + r"layers\.(\d+)\.(self_attn|mlp)\.((?:shared_expert\.)?\w+)")
# one expert's projection (ember.models.peft_moe splits PEFT's stacked expert adapters into these)
_EMBER_EXPERT = re.compile(r"layers\.(\d+)\.mlp\.experts\.(\d+)\.(\w+)")
_HF_EXPERT = re.compile(_LM_PREFIX + r"layers\.(\d+)\.mlp\.experts\.(\d+)\.(\w+)")
# Mixtral as transformers 4 named it (PEFT adapters made there): the router and the experts'
# w1 / w3 / w2 (gate / up / down) under block_sparse_moe
_HF_MIXTRAL = re.compile(_LM_PREFIX + r"layers\.(\d+)\.block_sparse_moe\."
                         r"(?:experts\.(\d+)\.(w[123])|gate)")
_MIXTRAL_LEAVES = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
_HF_EMBED = re.compile(_LM_PREFIX + "embed_tokens")
_HF_HEAD = re.compile(r"(?:language_model\.)?lm_head")
_VISION = re.compile(r"(?:model\.)?(?:vision_tower|multi_modal_projector)\.")
# lora_A / lora_B of a projection or the head (".weight"), lora_embedding_A / _B of the embedding
_PEFT_KEY = re.compile(r"base_model\.model\.(.+)\.(lora_A|lora_B|lora_embedding_A|lora_embedding_B)"
                       r"(?:\.default)?(?:\.weight)?")
# DoRA's magnitude: a bare parameter in PEFT 0.21's files (no ".weight")
_MAGNITUDE_KEY = re.compile(r"base_model\.model\.(.+)\.lora_magnitude_vector(?:\.default)?"
                            r"(?:\.weight)?")


def _multimodal(cfg) -> bool:
    return bool(getattr(cfg, "extra", {}).get("multimodal"))


def hf_module_name(name: str, cfg=None) -> str:
    """``layers.3.attn.q_proj`` -> ``model.layers.3.self_attn.q_proj`` (transformers' name);
    ``model.language_model.layers.3.self_attn.q_proj`` when cfg is a multimodal Gemma 3's
    language model (``extra["multimodal"]``: the module inside Gemma3ForConditionalGeneration).
    ``embed`` -> ``model.embed_tokens``, ``lm_head`` -> ``lm_head``. Phi-1/2 (model_type "phi")
    names its o_proj / up_proj / down_proj ``dense`` / ``fc1`` / ``fc2``."""
    prefix = "model.language_model." if _multimodal(cfg) else "model."
    if name in ("embed", "lm_head"):
        return prefix + "embed_tokens" if name == "embed" else "lm_head"
    m = _EMBER_EXPERT.fullmatch(name)
    if m is not None:
        return f"{prefix}layers.{m[1]}.mlp.experts.{m[2]}.{m[3]}"
    m = _EMBER_NAME.fullmatch(name)
    if m is None:
        raise EmberError(f"no transformers name for module {name!r}: PEFT export covers the "
                         "attention and MLP projections inside layers, embed_tokens and lm_head")
    part = "self_attn" if m[2] == "attn" else "mlp"
    leaf = _HF_LEAVES.get(getattr(cfg, "model_type", None), {}).get(m[3], m[3])
    return f"{prefix}layers.{m[1]}.{part}.{leaf}"


def ember_module_name(hf_name: str) -> str | None:
    if _HF_EMBED.fullmatch(hf_name):
        return "embed"
    if _HF_HEAD.fullmatch(hf_name):
        return "lm_head"
    m = _HF_EXPERT.fullmatch(hf_name)
    if m is not None:
        return f"layers.{m[1]}.mlp.experts.{m[2]}.{m[3]}"
    m = _HF_MIXTRAL.fullmatch(hf_name)
    if m is not None:
        return (f"layers.{m[1]}.mlp.experts.{m[2]}.{_MIXTRAL_LEAVES[m[3]]}" if m[2]
                else f"layers.{m[1]}.mlp.gate")
    m = _HF_NAME.fullmatch(hf_name)
    if m is None:
        return None
    leaf = _EMBER_LEAVES.get(m[3], m[3])  # Phi's dense / fc1 / fc2, StarCoder2's c_fc / c_proj
    return f"layers.{m[1]}.{'attn' if m[2] == 'self_attn' else 'mlp'}.{leaf}"


def seen_module_name(name: str, seen: dict[str, str], cfg=None) -> str:
    """Ember module ``name`` as PEFT saw it when it saved the adapter whose file names
    ``seen`` (Ember name -> name in the file): transformers' name, less the prefix the file's
    names lack (a bare LlamaModel's adapter: ``layers.0.self_attn.q_proj``)."""
    hf = hf_module_name(name, cfg)
    for ours, theirs in seen.items():
        ref = hf_module_name(ours, cfg) if _EMBER_NAME.fullmatch(ours) else None
        if ref is not None and ref != theirs and ref.endswith("." + theirs):
            return hf.removeprefix(ref[: -len(theirs)])
    return hf


def lora_keys(hf_name: str) -> tuple[str, str]:
    """PEFT's keys of a module's (A, B): ``lora_embedding_A`` (no ".weight") for the embedding."""
    base = f"base_model.model.{hf_name}"
    if _HF_EMBED.fullmatch(hf_name):
        return f"{base}.lora_embedding_A", f"{base}.lora_embedding_B"
    return f"{base}.lora_A.weight", f"{base}.lora_B.weight"


def tied_head_tensors(A: torch.Tensor, B: torch.Tensor) -> dict[str, torch.Tensor]:
    """The head's pair PEFT saves for a tied adapter (``ensure_weight_tying``) from the
    embedding's A (r, V) and B (D, r): ``lora_A = B^T``, ``lora_B = A^T``."""
    a, b = lora_keys("lm_head")
    return {a: B.t().contiguous(), b: A.t().contiguous()}


def split_tied_head(pairs: dict, config: dict, tied: bool, wfile: Path) -> bool | None:
    """Checks the embedding / head pairs (``{ember name: {"lora_A": .., "lora_B": ..}}``) of an
    adapter for a model with tied embeddings and removes the head's; returns whether the head
    sees the adapted embedding (PEFT's ``ensure_weight_tying``), None without an embedding
    adapter. PEFT without ``ensure_weight_tying`` puts a separate adapter on the shared matrix
    for lm_head, which no single matrix can hold: ``load_adapter`` unties such a model's head
    first (``untie_head``), so here it is an ensure_weight_tying head that differs: refused."""
    if not tied:
        return None
    emb, head = pairs.get("embed"), pairs.pop("lm_head", None)
    ensure = bool(config.get("ensure_weight_tying"))
    if head is not None:
        both = ("lora_A", "lora_B")
        same = (ensure and emb is not None and all(k in emb and k in head for k in both)
                and torch.equal(head["lora_A"], emb["lora_B"].t())
                and torch.equal(head["lora_B"], emb["lora_A"].t()))
        if not same:
            raise EmberError(f"{wfile}: LoRA on lm_head of a model with tied embeddings, not tied "
                             "to the embedding's adapter (PEFT without ensure_weight_tying: two "
                             "adapters on one shared matrix) is not supported; train it with "
                             "ensure_weight_tying=True, or merge it with PEFT and load the "
                             "merged model")
    return None if emb is None else ensure
