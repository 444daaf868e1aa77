"""Family-specific parts of the GGUF import (``ember.models.gguf``): Gemma 1/2/3, Phi-3, Granite,
SmolLM3, OLMo2.

What llama.cpp's ``convert_hf_to_gguf.py`` writes for them and what its runtime assumes, read
back into ``ModelConfig`` fields and Ember tensors:

- Gemma (``gemma``, ``gemma2``, ``gemma3``): every ``*norm.weight`` is stored as ``1 + w`` (Gemma's
  RMSNorm scales by ``1 + w``; Ember keeps HF's ``w`` with ``norm_offset`` 1), GeGLU, embeddings
  scaled by sqrt(hidden), tied output. Gemma 2/3 add the post-attention / post-FFN norms.
- What the file does not say, llama.cpp hard-codes, and so does this module: the softmax scale
  is 1/sqrt(head_dim) except for the 27B models (46-layer Gemma 2, 62-layer Gemma 3), whose
  ``query_pre_attn_scalar`` is hidden/heads; Gemma 2 alternates sliding / full layers (every 2nd
  full), softcaps 50 / 30 and a 4096 window unless the file gives them; Gemma 3 makes every 6th
  layer full, its sliding layers use an unscaled RoPE of base 10000 unless the file gives
  ``rope.freq_base_swa`` (``rope.freq_base`` and any scaling are the full layers'; transformers
  reads the sliding base, the llama.cpp builds seen hard-code 10000), no attention softcap, and
  no sliding layers at all when the file has no ``attention.sliding_window``.
  ``<arch>.attention.sliding_window_pattern`` (a period, or one bool per layer, true = sliding)
  overrides the pattern where present.
- Phi-3 (``phi3``): ``attn_qkv`` (q, k, v rows stacked) and ``ffn_up`` with 2 x ffn rows (gate,
  then up) are split with ``ember.models.hf``'s Phi-3 split; ``attention.sliding_window`` 0 means
  none (Phi-4). LongRoPE and partial rotary (Phi-3.5, Phi-4-mini) are read in
  ``ember.models.gguf_rope``.
- Granite (``granite``, Llama's layout, Q/K permuted): ``logit_scale`` (required), and where
  present and non-zero ``embedding_scale``, ``residual_scale``, ``attention.scale`` (else none,
  none, 1/sqrt(head_dim)), as llama.cpp reads them; ``rope.scaling.finetuned`` false (llama.cpp:
  no RoPE) is refused.
- SmolLM3 (``smollm3``, Llama's layout): llama.cpp skips RoPE on every 4th layer (its
  ``n_no_rope_layer_step``, hard-coded, no key) and has no sliding window.
- OLMo2 (``olmo2``, not permuted: NeoX RoPE): ``post_attention_norm`` / ``post_ffw_norm`` and
  no pre-norms, q/k norms over the whole projection; an OLMo 3 sliding window is refused.
- StarCoder2 (``starcoder2``, not permuted): LayerNorms with bias (``attention.layer_norm_epsilon``,
  ``ffn_norm.bias`` too), every projection's bias, the plain tanh-GELU MLP; no window key.
- Phi-1/1.5/2 (``phi2``): LayerNorms with bias (eps ``attention.layer_norm_epsilon``), parallel
  blocks, a plain GELU MLP, biases everywhere incl. ``output.bias``; q/k/v either separate or one
  ``attn_qkv`` (weight and bias, rows q; k; v: files converted from the original phi-2 code);
  ``rope.dimension_count`` gives the partial rotary factor.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from ember import EmberError
from ember.models.config import ModelConfig
from ember.models.gguf_moe import BLOCK_NAMES as MOE_BLOCK_NAMES
from ember.models.gguf_moe import expert_tensors
from ember.models.gguf_rope import nice_float, rope_base

# GGUF architecture -> (HF model_type, whether llama.cpp permuted Q/K rows for it)
ARCHITECTURES = {
    "llama": ("llama", True), "qwen2": ("qwen2", False), "qwen3": ("qwen3", False),
    "gemma": ("gemma", False), "gemma2": ("gemma2", False), "gemma3": ("gemma3_text", False),
    "phi3": ("phi3", False), "phi2": ("phi", False), "qwen2moe": ("qwen2_moe", False),
    "qwen3moe": ("qwen3_moe", False), "granite": ("granite", True), "smollm3": ("smollm3", True),
    "olmo2": ("olmo2", False), "starcoder2": ("starcoder2", False),
}
GEMMA = ("gemma", "gemma2", "gemma3")
# block tensors beyond the common ones: Gemma 2/3's sandwich norms, Phi-3's fused q/k/v
EXTRA_BLOCK_NAMES = {
    "post_attention_norm.weight": "attn_post_norm.weight",
    "post_ffw_norm.weight": "mlp_post_norm.weight",
    "attn_qkv.weight": "attn.qkv_proj.weight",  # split in arch_tensors
    "attn_qkv.bias": "attn.qkv_proj.bias",  # phi2's fused q/k/v bias, split likewise
    "attn_norm.bias": "attn_norm.bias",  # phi2: LayerNorms with bias
    "ffn_norm.bias": "mlp_norm.bias",  # starcoder2: the MLP's LayerNorm too
    **MOE_BLOCK_NAMES,  # mixture of experts (ember.models.gguf_moe)
}
_LAYERS_27B = {"gemma2": 46, "gemma3": 62}  # llama.cpp's LLM_TYPE_27B test
_WINDOW_PERIOD = {"gemma2": 2, "gemma3": 6}
_MULTIMODAL_PREFIXES = ("v.", "mm.", "a.")  # vision tower, projector, audio encoder tensors


def check_supported(arch: Any, md: dict, tensor_names, path: Path) -> None:
    """Refuse files this importer cannot represent, naming the key or tensor."""
    if arch == "clip":
        raise EmberError(f"{path}: this is a multimodal projector file (general.architecture "
                         "'clip', an mmproj GGUF), not a language model; load the text model's "
                         "GGUF file instead")
    if arch not in ARCHITECTURES:
        raise EmberError(f"{path}: GGUF architecture {arch!r} is not supported (supported: "
                         f"{sorted(ARCHITECTURES)})")
    mm = [n for n in tensor_names if n.startswith(_MULTIMODAL_PREFIXES)]
    if mm:
        raise EmberError(f"{path}: multimodal GGUF (vision/audio tensors such as {mm[0]!r}) is "
                         "not supported; use a text-only GGUF of the language model")


def _layer_types(arch: str, md: dict, num_layers: int, window: int | None) -> tuple[str, ...]:
    if window is None:
        return ("full_attention",) * num_layers
    pattern = md.get(f"{arch}.attention.sliding_window_pattern", _WINDOW_PERIOD[arch])
    if isinstance(pattern, list):
        if len(pattern) != num_layers:
            raise EmberError(f"{arch}.attention.sliding_window_pattern has {len(pattern)} "
                             f"entries for {num_layers} layers")
        sliding = [bool(x) for x in pattern]
    elif isinstance(pattern, int) and not isinstance(pattern, bool) and pattern >= 1:
        sliding = [i % pattern < pattern - 1 for i in range(num_layers)]  # llama.cpp's rule
    else:
        raise EmberError(f"{arch}.attention.sliding_window_pattern must be a period >= 1 or "
                         f"one bool per layer, got {pattern!r}")
    return tuple("sliding_attention" if s else "full_attention" for s in sliding)


def arch_fields(arch: str, md: dict, get: Callable, base: dict) -> dict:
    """ModelConfig fields of a Gemma / Phi-2 / Phi-3 file beyond the common ones in ``base``."""
    if arch == "phi2":  # llama.cpp's PHI2: Phi-1/1.5/2 (no q/k LayerNorms, no GQA in converters)
        return dict(norm="layernorm", parallel_block=True, gated_mlp=False, attention_bias=True,
                    attention_out_bias=True, mlp_bias=True, lm_head_bias=True,
                    activation="gelu_tanh",
                    rms_norm_eps=nice_float(get("attention.layer_norm_epsilon", required=True)))
    if arch == "starcoder2":  # llama.cpp's STARCODER2: LayerNorms, biases, plain GELU MLP
        return dict(norm="layernorm", gated_mlp=False, attention_bias=True,
                    attention_out_bias=True, mlp_bias=True, activation="gelu_tanh",
                    rms_norm_eps=nice_float(get("attention.layer_norm_epsilon", required=True)))
    if arch == "phi3":
        window = int(get("attention.sliding_window") or 0)
        return {"sliding_window": window or None}
    if arch == "granite":
        return granite_fields(md, get)
    if arch == "olmo2":  # post-norms only, q/k norms over the whole projection
        if get("attention.sliding_window"):
            raise EmberError("olmo2.attention.sliding_window is set (an OLMo 3 file); sliding "
                             "windows are not supported for olmo2 GGUF files")
        return dict(sandwich_norms=True, pre_norms=False, qk_norm_full=True)
    if arch == "smollm3":  # llama.cpp hard-codes NoPE on every 4th layer (no key) and no window
        return {"nope_layers": tuple(i for i in range(base["num_layers"]) if (i + 1) % 4 == 0)}
    if arch not in GEMMA:
        return {}
    hidden, heads, layers = base["hidden_size"], base["num_heads"], base["num_layers"]
    out = dict(norm_offset=1.0, activation="gelu_tanh", embedding_scale=hidden**0.5)
    if arch == "gemma":
        return out
    if arch == "gemma2":
        window = int(get("attention.sliding_window") or 4096)
        out.update(attn_softcap=float(get("attn_logit_softcapping") or 50.0),
                   final_softcap=float(get("final_logit_softcapping") or 30.0))
    else:
        window = int(get("attention.sliding_window") or 0) or None
        final = get("final_logit_softcapping")
        # the converter writes rope_parameters' sliding_attention base as rope.freq_base_swa
        local = get("rope.freq_base_swa")
        local = rope_base(10000.0 if local is None else local, "gemma3.rope.freq_base_swa")
        out.update(final_softcap=float(final) if final else None, rope_local_theta=local)
    scalar = hidden // heads if layers == _LAYERS_27B[arch] else base["head_dim"]
    out.update(sandwich_norms=True, sliding_window=window, query_pre_attn_scalar=float(scalar),
               layer_types=_layer_types(arch, md, layers, window))
    return out


def granite_fields(md: dict, get: Callable) -> dict:
    """Granite's multipliers as llama.cpp reads them: ``logit_scale`` required, the others
    optional with 0 or absent meaning none (the attention scale then 1/sqrt(head_dim)); RoPE
    only while ``rope.scaling.finetuned`` is true (its default)."""
    if md.get("granite.rope.scaling.finetuned", True) is not True:
        raise EmberError("granite.rope.scaling.finetuned is false: llama.cpp then applies no RoPE "
                         "at all, which Ember's Granite does not implement")
    logit = get("logit_scale")
    if not logit:
        raise EmberError("granite.logit_scale is missing or 0 (llama.cpp requires it)")
    emb, res, att = (nice_float(get(k) or 0.0) for k in ("embedding_scale", "residual_scale",
                                                           "attention.scale"))
    return dict(embedding_scale=emb or None, residual_multiplier=res or 1.0,
                attention_multiplier=att or None, logits_scaling=nice_float(logit))


def arch_tensors(arch: str, name: str, key: str, w: torch.Tensor,
                 cfg: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """(Ember key, tensor) pairs for one dequantized GGUF tensor already named ``key``."""
    experts = expert_tensors(key, w, cfg.num_experts) if cfg.num_experts else None
    if experts is not None:
        yield from experts
        return
    if arch in GEMMA and name.endswith("norm.weight"):
        yield key, w - 1  # stored as 1 + w
        return
    if arch == "phi2" and ".qkv_proj." in key:  # rows q; k; v, weight or bias
        n = [cfg.num_heads * cfg.head_dim] + [cfg.num_kv_heads * cfg.head_dim] * 2
        if w.shape[0] != sum(n):
            raise EmberError(f"{name} has {w.shape[0]} rows, the metadata implies {sum(n)}")
        for p, t in zip(("q_proj", "k_proj", "v_proj"), w.split(n), strict=True):
            yield key.replace("qkv_proj", p), t
        return
    if arch == "phi3" and (key.endswith(".qkv_proj.weight") or (
            key.endswith(".mlp.up_proj.weight") and w.shape[0] == 2 * cfg.intermediate_size)):
        from ember.models.hf import hf_key_to_ember, split_fused

        if "qkv" in key and w.shape[0] != (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim:
            raise EmberError(f"{name} has {w.shape[0]} rows, but phi3.attention.head_count "
                             f"{cfg.num_heads} + 2 x head_count_kv {cfg.num_kv_heads} heads of "
                             f"{cfg.head_dim} imply "
                             f"{(cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim}; the file "
                             "is inconsistent: convert the model again")
        layer = key.split(".")[1]
        hf_key = (f"model.layers.{layer}.self_attn.qkv_proj.weight" if "qkv" in key
                  else f"model.layers.{layer}.mlp.gate_up_proj.weight")
        for part, t in split_fused({hf_key: w}, cfg).items():
            yield hf_key_to_ember(part, cfg), t
        return
    yield key, w
