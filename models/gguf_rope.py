"""RoPE settings of a GGUF file -> ``ModelConfig`` fields (``rope_theta``, ``rope_scaling``,
``partial_rotary_factor``), read the way llama.cpp's ``convert_hf_to_gguf.py`` writes them from a
Hugging Face config, so that the imported model computes what transformers computes on the
original checkpoint:

- ``<arch>.rope.freq_base`` -> theta (10000 when absent, llama.cpp's default).
- linear: ``rope.scaling.type = linear`` + ``rope.scaling.factor`` (old files: only
  ``rope.scale_linear``).
- Llama 3.1 (``llama3``): no type key; a ``rope_freqs`` tensor of per-frequency divisors, matched
  back to the standard low/high frequency factors.
- YaRN (Qwen2.5 / Qwen3 long-context configs): ``rope.scaling.type = yarn``, ``factor``,
  ``original_context_length`` and, when the config had them, ``yarn_attn_factor`` (transformers'
  ``attention_factor``; OLMo 2 / 3's converter writes it as ``rope.scaling.attn_factor``),
  ``yarn_beta_fast`` / ``yarn_beta_slow``. A ``yarn_ext_factor`` other than 1 or a
  ``yarn_log_multiplier`` (DeepSeek's mscale) has no transformers equivalent for these families:
  refused; so has a ``rope.scaling.attn_factor`` other than 1 without YaRN or LongRoPE (llama.cpp
  multiplies cos / sin by it).
- LongRoPE (Phi-3 128k, Phi-3.5, Phi-4-mini): tensors ``rope_factors_short`` /
  ``rope_factors_long`` (rotary_dim / 2 divisors each), ``rope.scaling.original_context_length``
  and ``rope.scaling.attn_factor``; the scaled context is ``context_length``. As transformers
  does, the long factors apply to a forward whose largest position reaches the original context
  (llama.cpp decides once per context size instead).
- Partial rotary (Phi-4-mini: ``rope.dimension_count`` < head_dim): ``partial_rotary_factor`` =
  dimension_count / head_dim, for phi3 only (transformers applies it to no other family).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from ember import EmberError
from ember.models.config import ModelConfig, RopeScaling, rope_inv_freq
from ember.models.hf_rope import (
    LONGROPE_FAMILIES,
    PHI3_ORIGINAL_MAX,
    longrope_attention_factor,
    yarn_mscale,
)

ROPE_TENSORS = ("rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight")


def nice_float(x: float) -> float:
    """GGUF stores fp32; return the shortest decimal that rounds to the same fp32 (1e-05, not
    9.999999747378752e-06), which is what the original config said."""
    return float(str(np.float32(x)))


def _llama3_origs(rope_freqs: torch.Tensor, plain: torch.Tensor, low: float,
                  high: float) -> list[int]:
    """Original context lengths that could give ``rope_freqs`` with these low / high factors:
    each divisor strictly between 1 and the factor pins it (the converter's smooth band), and
    with none, any length between the bands' edges computes the same model (8192 if it fits)."""
    factor, wavelen = float(rope_freqs.max()), 2 * math.pi / plain.double()
    r = rope_freqs.double()
    mid = (r > 1 + 1e-4) & (r < factor * (1 - 1e-4))
    if bool(mid.any()):
        smooth = (1 / r[mid] - 1 / factor) / (1 - 1 / factor)
        return sorted({round(x) for x in (wavelen[mid] * (low + smooth * (high - low))).tolist()})
    above = float((wavelen[r <= 1 + 1e-4] * high).max()) if bool((r <= 1 + 1e-4).any()) else 0.0
    below = float((wavelen[r > 1 + 1e-4] * low).min()) if bool((r > 1 + 1e-4).any()) else math.inf
    if above < 8192 < below:
        return [8192]
    return [math.floor(above) + 1] if math.floor(above) + 1 < below else []


def _llama3_rope(rope_freqs: torch.Tensor, head_dim: int, theta: float, orig: int | None,
                 path: Path) -> RopeScaling:
    """Recover Llama-3.1 rope scaling from llama.cpp's ``rope_freqs`` factors (which the file
    stores instead of the four parameters) by matching the standard low/high factors. The
    converter writes no ``rope.scaling.original_context_length`` for these; without it the
    original context is the one the factors imply (8192 for every Llama 3.x)."""
    factor = float(rope_freqs.max())
    base = ModelConfig(vocab_size=1, hidden_size=head_dim, intermediate_size=1,
                       num_layers=1, num_heads=1, num_kv_heads=1, rope_theta=theta)
    plain = rope_inv_freq(base)
    pairs = [(1.0, 4.0), (1.0, 2.0), (2.0, 4.0)]
    tries = [(p, orig or 8192) for p in pairs]
    if orig is None:  # then the lengths the factors imply
        tries += [(p, o) for p in pairs for o in _llama3_origs(rope_freqs, plain, *p)]
    for (low, high), o in tries:
        rs = RopeScaling(kind="llama3", factor=factor, low_freq_factor=low,
                         high_freq_factor=high, original_max_position_embeddings=o)
        ratio = plain / rope_inv_freq(base.replace(rope_scaling=rs))
        if torch.allclose(ratio, rope_freqs.float(), rtol=1e-3, atol=1e-4):
            return rs
    raise EmberError(f"{path}: rope_freqs tensor does not match Llama-3 rope scaling with any "
                     "standard low/high frequency factor; this GGUF is not supported")


def _yarn(get: Callable, arch: str, context: int, path: Path) -> RopeScaling:
    factor = get("rope.scaling.factor")
    if not factor or factor <= 0:
        raise EmberError(f"{path}: YaRN rope scaling without a positive {arch}.rope.scaling."
                         f"factor (got {factor!r}); the file is incomplete")
    ext = get("rope.scaling.yarn_ext_factor")
    if ext is not None and not (ext < 0 or math.isclose(ext, 1.0)):  # < 0: llama.cpp's "unset"
        raise EmberError(f"{path}: {arch}.rope.scaling.yarn_ext_factor={ext} (an extrapolation "
                         "mix other than 1) has no transformers equivalent; import the original "
                         "Hugging Face checkpoint instead")
    if get("rope.scaling.yarn_log_multiplier"):
        raise EmberError(f"{path}: {arch}.rope.scaling.yarn_log_multiplier (DeepSeek's YaRN "
                         "mscale) is not supported for this architecture")
    attn = get("rope.scaling.yarn_attn_factor")
    if attn is None:  # OLMo 2 / 3's converter writes transformers' attention_factor here
        attn = get("rope.scaling.attn_factor")
    if attn is not None and not attn > 0:
        raise EmberError(f"{path}: {arch}.rope.scaling YaRN attention factor must be > 0, got "
                         f"{attn}")
    return RopeScaling(
        kind="yarn", factor=nice_float(factor),
        original_max_position_embeddings=int(get("rope.scaling.original_context_length")
                                             or context),
        beta_fast=nice_float(get("rope.scaling.yarn_beta_fast") or 32.0),
        beta_slow=nice_float(get("rope.scaling.yarn_beta_slow") or 1.0),
        attention_factor=nice_float(attn) if attn is not None else yarn_mscale(factor))


def _longrope(g, get: Callable, arch: str, context: int, rotary_dim: int,
              path: Path) -> RopeScaling:
    from ember.models.gguf_arch import ARCHITECTURES

    if ARCHITECTURES[arch][0] not in LONGROPE_FAMILIES:
        raise EmberError(f"{path}: LongRoPE factors in a {arch!r} file are not supported "
                         f"(supported for {', '.join(LONGROPE_FAMILIES)})")
    names = ("rope_factors_short.weight", "rope_factors_long.weight")
    missing = [n for n in names if n not in g.tensors]
    if missing:
        raise EmberError(f"{path}: LongRoPE needs both rope_factors_short and rope_factors_long; "
                         f"{missing} is missing")
    short, long = (tuple(nice_float(x) for x in g.tensor(n).flatten().tolist()) for n in names)
    for n, f in zip(names, (short, long), strict=True):
        if len(f) != rotary_dim // 2 or min(f) <= 0:
            raise EmberError(f"{path}: {n} must hold rotary_dim / 2 = {rotary_dim // 2} "
                             f"positive factors, got {len(f)} (min {min(f, default=0)})")
    orig = int(get("rope.scaling.original_context_length") or PHI3_ORIGINAL_MAX)
    factor = context / orig
    attn = get("rope.scaling.attn_factor")
    if attn is None:
        attn = longrope_attention_factor(factor, orig)
    return RopeScaling(kind="longrope", factor=factor, original_max_position_embeddings=orig,
                       attention_factor=nice_float(attn), short_factor=short, long_factor=long)


def rope_base(value: float, name: str) -> float:
    """A RoPE base read from a file (``name``: where, for the error) as ``nice_float``; an
    EmberError unless finite and > 0 (the frequencies base**(-2i/d) would be inf / NaN)."""
    if not (math.isfinite(value) and value > 0):
        raise EmberError(f"{name} is {value}, not a positive number; the file is corrupt: "
                         "convert the model again")
    return nice_float(value)


def rope_fields(g, arch: str, get: Callable, head_dim: int, context: int) -> dict:
    """``rope_theta``, ``rope_scaling`` and ``partial_rotary_factor`` of the parsed file ``g``;
    ``get(key)`` reads ``<arch>.<key>``."""
    path = g.path
    out: dict = {"rope_theta": rope_base(get("rope.freq_base", 10000.0),
                                         f"{path}: {arch}.rope.freq_base")}
    rot = get("rope.dimension_count")
    rotary_dim = head_dim if rot is None else int(rot)
    if rotary_dim != head_dim:
        partial = rotary_dim / head_dim
        if arch not in ("phi3", "phi2") or not 0 < rotary_dim < head_dim or int(
                head_dim * partial) != rotary_dim:
            raise EmberError(f"{path}: partial rotary embeddings ({arch}.rope.dimension_count="
                             f"{rot}, head_dim {head_dim}) are only supported for phi3 / phi2 "
                             "files; use the original Hugging Face checkpoint")
        out["partial_rotary_factor"] = partial
    kind = get("rope.scaling.type", "none")
    factor = get("rope.scaling.factor") or get("rope.scale_linear")
    has = g.tensors.__contains__
    if has("rope_freqs.weight") and (has("rope_factors_long.weight")
                                     or has("rope_factors_short.weight")):
        raise EmberError(f"{path}: both rope_freqs and rope_factors_* tensors; not supported")
    if has("rope_factors_long.weight") or has("rope_factors_short.weight") or kind == "longrope":
        out["rope_scaling"] = _longrope(g, get, arch, context, rotary_dim, path)
    elif has("rope_freqs.weight"):
        orig = get("rope.scaling.original_context_length")
        orig = int(orig) if orig else None
        out["rope_scaling"] = _llama3_rope(g.tensor("rope_freqs.weight"), rotary_dim,
                                           out["rope_theta"], orig, path)
    elif kind == "yarn":
        out["rope_scaling"] = _yarn(get, arch, context, path)
    elif kind == "linear" or (kind == "none" and factor
                              and f"{arch}.rope.scaling.type" not in g.metadata):
        if not factor or factor <= 0:
            raise EmberError(f"{path}: linear rope scaling without a positive "
                             f"{arch}.rope.scaling.factor (got {factor!r})")
        out["rope_scaling"] = RopeScaling(kind="linear", factor=nice_float(factor))
    elif kind != "none":
        raise EmberError(f"{path}: rope scaling type {kind!r} ({arch}.rope.scaling.type) is not "
                         "supported in GGUF files (none, linear, yarn, longrope, llama3 "
                         "rope_freqs); import the original Hugging Face checkpoint, whose "
                         "config.json Ember reads")
    scale, rs = get("rope.scaling.attn_factor"), out.get("rope_scaling")
    if scale is not None and not math.isclose(scale, 1.0) and (
            rs is None or rs.kind not in ("yarn", "longrope")):
        raise EmberError(f"{path}: {arch}.rope.scaling.attn_factor={scale} (llama.cpp multiplies "
                         "cos / sin by it) has no transformers equivalent without YaRN or "
                         "LongRoPE scaling; import the original Hugging Face checkpoint instead")
    return out
