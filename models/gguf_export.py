"""GGUF export: an Ember ``Transformer`` and its tokenizer -> one GGUF v3 file for llama.cpp,
Ollama and LM Studio (the inverse of ``ember.models.gguf``).

Families, as llama.cpp's ``convert_hf_to_gguf.py`` writes them: ``llama`` (also Mistral and
SmolLM2; Q/K rows permuted from HF's rotate-half layout to llama.cpp's interleaved pairs),
``qwen2`` (biases), ``qwen3`` (q/k norms), ``gemma`` / ``gemma2`` / ``gemma3`` (every norm weight
stored as 1 + w; windows, softcaps), ``phi3`` (``attn_qkv`` = q;k;v and ``ffn_up`` = gate;up),
and mixture-of-experts Mixtral (``llama``), ``qwen2moe``, ``qwen3moe`` (``ember.models.gguf_moe``:
experts stacked into 3-D tensors, quantized row by row as llama-quantize does).

Output types: ``f32``, ``f16``, ``bf16`` (as the converter: 1-D tensors, i.e. norms, biases,
``rope_freqs``, stay F32), and llama-quantize's file types ``q8_0``, ``q4_0``, ``q4_1``,
``q5_0``, ``q5_1``, ``q2_k``, ``q3_k_s``, ``q3_k_m`` (alias ``q3_k``), ``q3_k_l``, ``q4_k_s``,
``q4_k_m`` (``q4_k``), ``q5_k_s``, ``q5_k_m`` (``q5_k``), ``q6_k`` (any case): each tensor
gets the type llama-quantize would give it (Q6_K for the output matrix, more bits for some
``attn_v`` / ``ffn_down``, fallbacks for rows that are not whole blocks, named in a warning:
``ember.models.gguf_quants.tensor_types``), quantized byte for byte as llama.cpp does
(``ember.models.gguf_quants``).

Metadata: the ``<arch>.*`` keys the importer and llama.cpp read (``config_from_gguf``), a Llama
3.1 rope scaling as the ``rope_freqs`` tensor, YaRN as the converter's ``rope.scaling.type`` /
``factor`` / ``original_context_length``, Phi-3 LongRoPE as ``rope_factors_long`` / ``_short``
tensors with ``rope.scaling.attn_factor`` / ``original_context_length``, and the tokenizer
(``ember.models.gguf_tokenizer``).
Whatever GGUF cannot express is refused before anything is written: the metadata is read back
with the importer's own ``config_from_gguf`` and every field that would come back different is
named (a query_pre_attn_scalar llama.cpp hard-codes differently, a local RoPE base other than
10000, a Gemma 2 / 3 layer pattern other than llama.cpp's fixed period, partial rotary,
LongRoPE outside phi3, a YaRN whose beta_fast / beta_slow / truncate / attention_factor are
not llama.cpp's fixed ones ...). Refused too: classifier heads, prompt-tuning models and LoRA
adapters not merged (``merge_lora`` first). A 4-bit (NF4) model is dequantized.
A llama-architecture sliding window (Mistral v0.1) is dropped with a warning: llama.cpp's llama
graph has no window, and its converter drops it too; a window no shorter than the context
(Ministral) is dropped silently wherever GGUF has no window key. A Phi-3 window is written (as
the converter does) with a warning: llama.cpp reads the key but disables Phi-3 sliding-window
attention.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGUFWriter, LlamaFileType

from ember import EmberError
from ember.models.config import ModelConfig, rope_inv_freq
from ember.models.gguf import (
    _BLOCK_NAMES,
    _TOP_NAMES,
    Q,
    permute_qk,
)
from ember.models.gguf_arch import ARCHITECTURES, GEMMA
from ember.models.gguf_dequant import dequantize
from ember.models.gguf_export_check import check_expressible
from ember.models.gguf_moe import (
    EXPORT_ARCH,
    F32_TENSORS,
    check_exportable,
    moe_metadata,
    stack_expert,
)
from ember.models.gguf_quants import ALIASES, FILE_TYPES, quantize, tensor_types
from ember.models.gguf_rope import ROPE_TENSORS
from ember.models.hf_rope import yarn_mscale

WINDOW_ARCHS = ("gemma2", "gemma3", "phi3")  # those whose GGUF keeps attention.sliding_window

# float output type -> (ggml type of matrices, general.file_type); quantized: FILE_TYPES
DTYPES = {
    "f32": (Q.F32, LlamaFileType.ALL_F32), "f16": (Q.F16, LlamaFileType.MOSTLY_F16),
    "bf16": (Q.BF16, LlamaFileType.MOSTLY_BF16),
}
GGUF_TYPES = (*DTYPES, *FILE_TYPES, *ALIASES)
# Ember model_type -> GGUF general.architecture
_ARCH_OF = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3",
            "gemma": "gemma", "gemma2": "gemma2", "gemma3_text": "gemma3", "gemma3": "gemma3",
            "phi3": "phi3", "phi": "phi2", "granite": "granite", "smollm3": "smollm3",
            "olmo2": "olmo2", "starcoder2": "starcoder2", **EXPORT_ARCH}
_GGUF_BLOCK = {v: k for k, v in _BLOCK_NAMES.items()}
_GGUF_TOP = {v: k for k, v in _TOP_NAMES.items()}
# Phi-3's fused tensors and the Ember projections stacked in them, in row order
_PHI3_FUSED = {"attn_qkv": ("q_proj", "k_proj", "v_proj"), "ffn_up": ("gate_proj", "up_proj")}
_PHI3_PARTS = {p: fused for fused, parts in _PHI3_FUSED.items() for p in parts}


def gguf_arch(cfg: ModelConfig) -> str:
    """The GGUF ``general.architecture`` of a config; EmberError for a family GGUF export lacks."""
    arch = _ARCH_OF.get(cfg.model_type)
    if arch is None:
        raise EmberError(f"save_gguf: model_type {cfg.model_type!r} has no GGUF export "
                         f"(supported: {', '.join(sorted(_ARCH_OF))})")
    if arch == "phi2" and (cfg.qk_norm or cfg.tie_word_embeddings):
        raise EmberError("save_gguf: llama.cpp's phi2 architecture has no q/k LayerNorms "
                         "(qk_layernorm) and no tied output head; export the merged HF folder "
                         "instead (ember export --merged)")
    if arch == "starcoder2" and not (cfg.attention_bias and cfg.mlp_bias):  # llama.cpp needs them
        raise EmberError("save_gguf: llama.cpp's starcoder2 requires every projection's bias "
                         "(use_bias true); export the merged HF folder instead")
    if arch in ("gemma", "gemma2") and not cfg.tie_word_embeddings:
        # llama.cpp reads token_embd as the output matrix and has no output.weight for these
        # (its converter drops lm_head); transformers' GGUF loader leaves lm_head uninitialized
        raise EmberError(f"save_gguf: llama.cpp's {arch} always uses the token embedding as the "
                         "output matrix, and this model has a separate lm_head "
                         "(tie_word_embeddings false); no GGUF file can hold it. Export the "
                         "merged HF folder instead (ember export --merged)")
    return arch


# ------------------------------------------------------------------------------------------
# Tensors


def _gguf_name(key: str) -> str:
    if key in _GGUF_TOP:
        return _GGUF_TOP[key]
    _, layer, rest = key.split(".", 2)
    return f"blk.{layer}.{_GGUF_BLOCK[rest]}"


def _dense(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict with NF4 weights dequantized (to the dtype they came from)."""
    from ember.models.bnb_checkpoint import _with_nf4_weights
    from ember.models.nf4 import is_quantized

    sd = model.state_dict()
    if is_quantized(model):
        sd = _with_nf4_weights(model, sd)
    return {k: v if isinstance(v, torch.Tensor) else v.dequantize(v.dtype)
            for k, v in sd.items()}


def _llama3_factors(cfg: ModelConfig) -> torch.Tensor:
    """convert_hf_to_gguf.py's ``rope_freqs``: per rotary frequency, what Llama 3 divides it by."""
    rs = cfg.rope_scaling
    low_wavelen = rs.original_max_position_embeddings / rs.low_freq_factor
    high_wavelen = rs.original_max_position_embeddings / rs.high_freq_factor
    plain = cfg.replace(rope_scaling=None)
    out = []
    for freq in rope_inv_freq(plain).tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            out.append(1.0)
        elif wavelen > low_wavelen:
            out.append(rs.factor)
        else:
            smooth = (rs.original_max_position_embeddings / wavelen - rs.low_freq_factor) / (
                rs.high_freq_factor - rs.low_freq_factor)
            out.append(1 / ((1 - smooth) / rs.factor + smooth))
    return torch.tensor(out, dtype=torch.float32)


def gguf_tensors(sd: dict[str, torch.Tensor], cfg: ModelConfig
                 ) -> Iterator[tuple[str, torch.Tensor]]:
    """(GGUF name, fp32 tensor in llama.cpp's layout) for an Ember state dict."""
    arch = gguf_arch(cfg)
    _, permuted = ARCHITECTURES[arch]
    fused: dict[str, dict[str, torch.Tensor]] = {}
    experts: dict[str, dict[int, torch.Tensor]] = {}
    for key, t in sd.items():
        if key == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        w = t.detach().float().cpu()
        if permuted and (".q_proj." in key or ".k_proj." in key):
            w = permute_qk(w, cfg.num_heads if ".q_proj." in key else cfg.num_kv_heads)
        if arch in GEMMA and key.endswith("norm.weight"):
            w = w + 1  # llama.cpp's Gemma norms scale by the stored weight
        part = key.split(".")[-2] if "." in key else key  # head_bias: phi's output.bias
        if arch == "phi3" and part in _PHI3_PARTS and key.endswith(".weight"):
            name = f"blk.{key.split('.')[1]}.{_PHI3_PARTS[part]}.weight"
            parts = fused.setdefault(name, {})
            parts[part] = w
            order = _PHI3_FUSED[_PHI3_PARTS[part]]
            if len(parts) == len(order):
                yield name, torch.cat([parts[p] for p in order])
                del fused[name]
            continue
        if ".mlp.experts." in key:  # stacked per layer and projection (ember.models.gguf_moe)
            if (done := stack_expert(experts, key, w, cfg.num_experts)) is not None:
                yield done
            continue
        if key.endswith("shared_expert_gate.weight"):
            w = w.reshape(-1)  # (1, D) squeezed by the converter; transformers reads a vector
        yield _gguf_name(key), w
    if fused or experts:
        raise EmberError(f"save_gguf: incomplete fused weights {sorted(fused or experts)[:3]}")
    if cfg.rope_scaling is not None and cfg.rope_scaling.kind == "llama3":
        yield "rope_freqs.weight", _llama3_factors(cfg)
    if cfg.rope_scaling is not None and cfg.rope_scaling.kind == "longrope":
        # Phi3MiniModel.generate_extra_tensors: one divisor per rotary frequency
        yield "rope_factors_long.weight", torch.tensor(cfg.rope_scaling.long_factor)
        yield "rope_factors_short.weight", torch.tensor(cfg.rope_scaling.short_factor)


def _encode(w: torch.Tensor, qtype: Q) -> np.ndarray:
    """The tensor's GGUF bytes (numpy, torch order) as ``qtype``; 1-D tensors are given F32."""
    if qtype == Q.F32:
        return w.numpy().astype(np.float32)
    if qtype == Q.F16:
        return w.numpy().astype(np.float16)
    if qtype == Q.BF16:
        return w.to(torch.bfloat16).view(torch.uint8).numpy()
    # a 3-D expert stack is quantized row by row, as llama-quantize does each expert's matrix
    return quantize(w.reshape(-1, w.shape[-1]), qtype).reshape(*w.shape[:-1], -1).numpy()


def _check_finite(name: str, w: torch.Tensor, qtype: Q, data: np.ndarray) -> None:
    """Refuse a tensor whose GGUF form holds inf or NaN, as llama-quantize's
    ``ggml_validate_row_data`` does (the converter would write it silently): a weight that is
    not finite, or one too large for an fp16 value or block scale."""
    if not bool(torch.isfinite(w).all()):
        raise EmberError(f"save_gguf: tensor {name} has NaN or inf weights (a diverged "
                         "training run?); nothing can run this model. Fix the weights first")
    if qtype == Q.F32:
        return
    raw = torch.from_numpy(np.ascontiguousarray(data)).reshape(-1)
    back = raw if qtype == Q.F16 else dequantize(raw.view(torch.uint8), qtype, (-1,))
    if not bool(torch.isfinite(back).all()):
        raise EmberError(f"save_gguf: tensor {name} has weights up to {w.abs().max().item():.3g}, "
                         f"beyond what {qtype.name} can hold (its fp16 values or block scales "
                         "stop at 65504): the file would hold inf. Export as bf16 or f32, or "
                         "rescale the weights")


def _tensor_types(dtype: str, shapes: dict[str, tuple[int, ...]], cfg: ModelConfig, arch: str
                  ) -> tuple[dict[str, Q], LlamaFileType]:
    """Each tensor's ggml type and the file type for ``dtype`` (a name in GGUF_TYPES)."""
    if dtype in DTYPES:
        qtype, file_type = DTYPES[dtype]
        types = {n: Q.F32 if len(s) < 2 else qtype for n, s in shapes.items()}
    else:
        ftype = ALIASES.get(dtype, dtype)
        fallbacks: dict[str, Q] = {}
        types = tensor_types(shapes, dtype, arch=arch, n_layer=cfg.num_layers,
                             n_head=cfg.num_heads, n_head_kv=cfg.num_kv_heads,
                             n_expert=cfg.num_experts, fallbacks=fallbacks)
        file_type = FILE_TYPES[ftype][1]
        if fallbacks:  # announced, as llama-quantize and the converter's --outtype do
            said = ", ".join(f"{n} ({shapes[n][-1]} per row: {fallbacks[n].name} -> "
                             f"{types[n].name})" for n in list(fallbacks)[:4])
            more = f" and {len(fallbacks) - 4} more" if len(fallbacks) > 4 else ""
            warnings.warn(f"save_gguf: {len(fallbacks)} tensor(s) have rows that are not whole "
                          f"blocks of their {dtype} type and use a fallback type, as llama.cpp "
                          f"does (llama-quantize's fallback, else F16 as convert_hf_to_gguf.py "
                          f"writes): {said}{more}; the file is larger than a pure {dtype} one",
                          stacklevel=3)
    types.update({n: Q.F32 for n in types if n.endswith(F32_TENSORS)})
    return types, file_type


# ------------------------------------------------------------------------------------------
# Metadata


def _check_yarn(rs, arch: str) -> None:
    """llama.cpp's YaRN for these graphs: ramp dims floor / ceil'ed (transformers' truncate)
    between beta_fast 32 and beta_slow 1, cos / sin times 0.1 ln(factor) + 1 (times the
    ``rope.scaling.attn_factor`` key, which Ember's importer does not read for YaRN). Its
    ``yarn_beta_*`` / ``yarn_attn_factor`` keys are read for a few other architectures only, so
    anything else would be computed differently: refused, naming the field."""
    default = {"beta_fast": 32.0, "beta_slow": 1.0, "truncate": True,
               "attention_factor": yarn_mscale(rs.factor)}
    bad = [f"{k}={getattr(rs, k)!r} (llama.cpp: {v!r})" for k, v in default.items()
           if not (getattr(rs, k) == v if isinstance(v, bool)
                   else math.isclose(getattr(rs, k), v, rel_tol=1e-6))]
    if bad:
        raise EmberError(f"save_gguf: llama.cpp's {arch} YaRN has no key for this model's "
                         f"{', '.join(bad)}; it would compute a different model. Export the "
                         "merged HF folder instead (ember export --merged)")


def arch_metadata(cfg: ModelConfig) -> dict[str, Any]:
    """``<arch>.*`` keys (without the prefix) for ``cfg``, as llama.cpp's converter writes them."""
    arch = gguf_arch(cfg)
    rs = cfg.rope_scaling
    if rs is not None and rs.kind not in ("linear", "llama3", "yarn") and not (
            rs.kind == "longrope" and arch == "phi3"):
        raise EmberError(f"save_gguf: rope scaling {rs.kind!r} cannot be written to a {arch} "
                         "GGUF (llama.cpp reads none, linear, YaRN, Llama-3 and Phi-3's "
                         "LongRoPE); export the merged HF folder instead (ember export --merged)")
    if rs is not None and rs.kind == "yarn":
        _check_yarn(rs, arch)
    md: dict[str, Any] = {
        "context_length": cfg.max_position_embeddings, "embedding_length": cfg.hidden_size,
        "block_count": cfg.num_layers, "feed_forward_length": cfg.intermediate_size,
        "attention.head_count": cfg.num_heads, "attention.head_count_kv": cfg.num_kv_heads,
        "attention.layer_norm_rms_epsilon": float(cfg.rms_norm_eps),
        "rope.freq_base": float(cfg.rope_theta), "vocab_size": cfg.vocab_size,
    }
    if cfg.head_dim != cfg.hidden_size // cfg.num_heads or arch in GEMMA:
        md.update({"attention.key_length": cfg.head_dim, "attention.value_length": cfg.head_dim})
    if arch in ("llama", "phi3", "phi2", "granite", "smollm3"):
        md["rope.dimension_count"] = cfg.rotary_dim
    if arch in ("phi2", "starcoder2"):  # LayerNorms
        md["attention.layer_norm_epsilon"] = float(md.pop("attention.layer_norm_rms_epsilon"))
    if arch == "granite":  # as the converter: the multipliers where non-zero, logit_scale always
        md.update({k: float(v) for k, v in (
            ("embedding_scale", cfg.embedding_scale), ("residual_scale", cfg.residual_multiplier),
            ("attention.scale", cfg.attention_multiplier)) if v})
        md["logit_scale"] = float(cfg.logits_scaling)
    if cfg.num_experts:
        check_exportable(cfg, arch)
        md.update(moe_metadata(cfg, arch))
    if rs is not None and rs.kind == "linear":
        md.update({"rope.scaling.type": "linear", "rope.scaling.factor": float(rs.factor)})
    if rs is not None and rs.kind == "yarn":  # TextModel.set_gguf_parameters' three keys
        md.update({"rope.scaling.type": "yarn", "rope.scaling.factor": float(rs.factor),
                   "rope.scaling.original_context_length": rs.original_max_position_embeddings})
    if rs is not None and rs.kind == "longrope":  # Phi3MiniModel.set_gguf_parameters' keys
        md.update({"rope.scaling.attn_factor": float(rs.attention_factor),
                   "rope.scaling.original_context_length": rs.original_max_position_embeddings})
    if rs is not None and rs.kind == "llama3" and rs.original_max_position_embeddings != 8192:
        md["rope.scaling.original_context_length"] = rs.original_max_position_embeddings
    if arch == "phi3":
        md["attention.sliding_window"] = cfg.sliding_window or 0
    if arch == "olmo2" and (cfg.tie_word_embeddings or cfg.attention_bias
                            or cfg.attention_out_bias or cfg.head_dim * cfg.num_heads
                            != cfg.hidden_size):
        raise EmberError("save_gguf: llama.cpp's olmo2 has a separate output matrix, no attention "
                         "biases and head_dim = hidden / heads; this model differs (tied "
                         f"embeddings {cfg.tie_word_embeddings}, attention bias "
                         f"{cfg.attention_bias}, head_dim {cfg.head_dim}). Export the merged HF "
                         "folder instead (ember export --merged)")
    if arch in ("gemma2", "gemma3"):
        if cfg.sliding_window is not None:
            md["attention.sliding_window"] = cfg.sliding_window
        if cfg.final_softcap is not None:
            md["final_logit_softcapping"] = float(cfg.final_softcap)
        if cfg.attn_softcap is not None:
            md["attn_logit_softcapping"] = float(cfg.attn_softcap)
        sliding = [cfg.is_sliding(i) for i in range(cfg.num_layers)]
        period = {"gemma2": 2, "gemma3": 6}[arch]
        if cfg.sliding_window is not None and sliding != [
                i % period < period - 1 for i in range(cfg.num_layers)]:
            # llama.cpp hard-codes the period and reads no pattern key (nor does transformers)
            raise EmberError(f"save_gguf: llama.cpp's {arch} makes layer i full attention when "
                             f"(i + 1) % {period} == 0, the others sliding; this model's "
                             f"layer_types differ (sliding: {sliding}), which no {arch} GGUF key "
                             "can say. Export the merged HF folder instead (ember export --merged)")
    return md


def _refuse_unexportable(model: torch.nn.Module) -> None:
    from ember.models.lora import lora_modules
    from ember.models.prompt_tuning import prompt_embedding
    from ember.models.transformer import Transformer

    if not isinstance(model, Transformer):
        raise EmberError(f"save_gguf expects an ember Transformer, got {type(model).__name__}")
    if model.cfg.labels:
        raise EmberError("save_gguf: a sequence classifier (score head) has no GGUF form for "
                         "llama.cpp; export it as an HF folder (ember export --merged)")
    if prompt_embedding(model) is not None:
        raise EmberError("save_gguf: a prompt-tuning model's virtual tokens are inputs, not "
                         "weights; GGUF cannot hold them. Save the PEFT adapter instead")
    if lora_modules(model):
        raise EmberError("save_gguf: the model has LoRA adapters; merge them first "
                         "(ember.models.lora.merge_lora(model)) or use ember export --gguf, "
                         "which merges")


def _check_output_path(out: Path) -> None:
    """Refuse a path the file cannot be written to before any work: a directory, a parent that
    is a file, a folder without write permission (a missing parent folder is created)."""
    if out.is_dir():
        raise EmberError(f"save_gguf: {str(out)!r} is a directory; give the path of the .gguf "
                         f"file to write, e.g. {str(out / 'model.gguf')!r}")
    folder = out.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise EmberError(f"save_gguf: cannot write {str(out)!r}: {str(folder)!r} is a file, not "
                         "a folder; choose another output path")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise EmberError(f"save_gguf: cannot write {str(out)!r}: no write permission in "
                         f"{str(folder)!r}; choose a folder you can write to")


# llama.cpp (llama-vocab.cpp) strips the whitespace after special tokens (LLAMA_TOKEN_ATTR_RSTRIP)
# only in a file whose general.name, lower-cased, contains one of these: the tokenizer metadata
# cannot say it. Its converter wrote the name "Phi3" for Phi-3 once; it now writes the repo's
# name as a title ("Phi 3 Mini 4k Instruct"), which no longer matches.
_LLAMA_CPP_RSTRIP_NAMES = ("phi-3", "phi3")


def _gguf_general_name(out: Path, tokenizer, arch: str, name: str | None) -> str:
    """``general.name``: ``name``, else the file's stem. A Phi-3 tokenizer that strips whitespace
    after special tokens (Phi-3's tokenizer.json: rstrip on <|user|>, <|end|>, ...) tokenizes the
    same in llama.cpp only under a Phi-3 name, so a default name gets " (Phi-3)" appended when the
    stem lacks it; a given name is kept, with a warning when llama.cpp will tokenize otherwise."""
    added = getattr(getattr(tokenizer, "backend", None), "get_added_tokens_decoder", dict)()
    strips = any(t.rstrip and t.special for t in added.values())
    chosen = name or out.stem
    named = any(k in chosen.lower() for k in _LLAMA_CPP_RSTRIP_NAMES)
    if arch == "phi3" and strips and not named:
        if name is None:
            return f"{chosen} (Phi-3)"
        warnings.warn(f"save_gguf: general.name {name!r} does not contain 'phi-3' or 'phi3', "
                      "so llama.cpp will keep the whitespace after special tokens that this "
                      "tokenizer strips (Phi-3's rstrip): chat prompts tokenize differently; "
                      "include 'Phi-3' in the name to match", stacklevel=3)
    elif named and not strips:
        warnings.warn(f"save_gguf: general.name {chosen!r} contains 'phi-3'/'phi3', so llama.cpp "
                      "will strip the whitespace after special tokens, which this tokenizer keeps: "
                      "prompts with special tokens tokenize differently; pass another name=",
                      stacklevel=3)
    return chosen


def _put(w: GGUFWriter, key: str, v: Any) -> None:
    if isinstance(v, bool):
        w.add_bool(key, v)
    elif isinstance(v, int):
        w.add_uint32(key, v)
    elif isinstance(v, float):
        w.add_float32(key, v)
    elif isinstance(v, str):
        w.add_string(key, v)
    else:  # lists: strings or int32 (token types)
        w.add_array(key, list(v))


def save_gguf(model: torch.nn.Module, tokenizer, path: str | os.PathLike, *,
              dtype: str = "f16", name: str | None = None) -> Path:
    """Write ``model`` (an Ember ``Transformer``, LoRA merged) and ``tokenizer`` (an Ember
    ``Tokenizer``: byte-level or SentencePiece-style BPE) to the GGUF file ``path`` for llama.cpp.

    ``dtype``: "f16" (default), "bf16", "f32" for the matrices (norms and biases are always
    F32), or a llama-quantize file type, any case: "q8_0", "q4_0", "q4_1", "q5_0", "q5_1",
    "q2_k", "q3_k_s", "q3_k_m" (= "q3_k"), "q3_k_l", "q4_k_s", "q4_k_m" (= "q4_k"), "q5_k_s",
    "q5_k_m" (= "q5_k"), "q6_k".
    ``name``: ``general.name`` (default: the file's stem; for a Phi-3 tokenizer that strips
    whitespace after its special tokens, the stem + " (Phi-3)" unless it says Phi-3 already:
    llama.cpp applies that stripping by name, see ``_gguf_general_name``). The file appears
    atomically (written to a temporary sibling, then renamed)."""
    from ember.models.gguf_tokenizer import tokenizer_metadata

    if not isinstance(dtype, str) or dtype.lower() not in GGUF_TYPES:
        raise EmberError(f"save_gguf: dtype {dtype!r} is not one of {', '.join(GGUF_TYPES)} "
                         "(llama.cpp's names, any case)")
    dtype = dtype.lower()
    if name is not None and not (isinstance(name, str) and name.strip()):
        raise EmberError(f"save_gguf: name (general.name) must be a non-empty string or None "
                         f"(the file's stem), got {name!r}")
    if tokenizer is None:
        raise EmberError("save_gguf: a tokenizer is needed (llama.cpp reads the vocabulary from "
                         "the GGUF file)")
    out = Path(path)
    _check_output_path(out)
    model = getattr(model, "_orig_mod", model)
    _refuse_unexportable(model)
    cfg = model.cfg
    arch = gguf_arch(cfg)
    if cfg.sliding_window is not None and arch not in WINDOW_ARCHS and (
            cfg.sliding_window >= cfg.max_position_embeddings):
        # a window no shorter than the context never binds (Ministral: 32768 of 32768); the
        # converter writes no window key for these architectures either
        cfg = cfg.replace(sliding_window=None)
    if cfg.sliding_window is not None and arch in ("llama", "starcoder2"):
        warnings.warn(f"save_gguf: the sliding window ({cfg.sliding_window}) is dropped: "
                      f"llama.cpp's {arch} architecture attends to the whole context (as its "
                      "converter does: Mistral v0.1, StarCoder2); outputs differ past the window",
                      stacklevel=2)
        cfg = cfg.replace(sliding_window=None)
    if cfg.sliding_window is not None and arch == "phi3" and (
            cfg.sliding_window < cfg.max_position_embeddings):
        warnings.warn(f"save_gguf: the file keeps phi3.attention.sliding_window = "
                      f"{cfg.sliding_window} (as llama.cpp's converter writes it; Ember and "
                      "transformers read it), but llama.cpp disables Phi-3 sliding-window "
                      "attention ('Phi SWA is currently disabled'): its outputs differ past the "
                      "window", stacklevel=2)
    tensors = dict(gguf_tensors(_dense(model), cfg))
    md = {"general.architecture": arch,
          **{f"{arch}.{k}": v for k, v in arch_metadata(cfg).items()}}
    shapes = {n: tuple(t.shape) for n, t in tensors.items()}
    check_expressible(cfg, md, shapes, {n: tensors.get(n) for n in ROPE_TENSORS}, out)
    md.update(tokenizer_metadata(tokenizer, cfg.vocab_size, arch))
    types, file_type = _tensor_types(dtype, shapes, cfg, arch)
    general_name = _gguf_general_name(out, tokenizer, arch, name)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    writer = GGUFWriter(str(tmp), arch)
    try:
        writer.add_name(general_name)
        writer.add_file_type(int(file_type))
        writer.add_quantization_version(2)
        for k, v in md.items():
            if k != "general.architecture":
                _put(writer, k, v)
        for n, t in tensors.items():
            data = _encode(t, types[n])
            _check_finite(n, t, types[n], data)
            writer.add_tensor(n, data, raw_dtype=types[n] if data.dtype == np.uint8 else None)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return out
