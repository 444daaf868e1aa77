"""PEFT adapters for Phi-3, whose checkpoints fuse q/k/v into ``qkv_proj`` and gate/up into
``gate_up_proj`` while Ember keeps one projection each (``ember.models.hf`` splits the weights).

PEFT's LoRA on a fused projection is ``W x + s B A x`` with one ``A`` and ``B`` stacking the rows
of the parts, so on import each part gets the shared ``A`` and its rows of ``B`` (exact). On
export, parts with the same ``A``, rank and alpha fuse back to exactly that; otherwise the parts
are stacked block-diagonally, ``A = [A_q; A_k; A_v]`` and ``B = diag(s_q B_q, s_k B_k, s_v B_v)``
with the fused scale set to 1 (rank ``r_q + r_k + r_v``), which computes the same update.

DoRA: the magnitude is one value per output row and its norm ``||W + s B A||`` is taken row by
row, so the fused module's vector is the parts' vectors stacked (exact both ways, in either
export form above). A part without an adapter contributes its base rows' norms, which makes
DoRA's rescaling 1 there, as the unadapted projection computes.
"""

from __future__ import annotations

import math
import re

import torch

from ember.models.config import ModelConfig
from ember.models.peft_files import rank_alpha

GROUPS = {
    "self_attn.qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "mlp.gate_up_proj": ("gate_proj", "up_proj"),
}
_FUSED_NAME = re.compile(r"(.*\.layers\.\d+\.)(self_attn\.qkv_proj|mlp\.gate_up_proj)")


def is_fused(cfg: ModelConfig | None) -> bool:
    return getattr(cfg, "model_type", None) == "phi3"


def _rows(cfg: ModelConfig, group: str) -> list[int]:
    hd = cfg.head_dim
    if group.startswith("self_attn"):
        return [cfg.num_heads * hd, cfg.num_kv_heads * hd, cfg.num_kv_heads * hd]
    return [cfg.intermediate_size] * 2


def _part_name(prefix: str, group: str, part: str) -> str:
    return f"{prefix}{group.split('.')[0]}.{part}"


def split_adapter(tensors: dict, config: dict, cfg: ModelConfig) -> tuple[dict, dict]:
    """PEFT tensors and adapter_config for a fused model -> the per-projection layout Ember loads:
    each part gets the fused ``lora_A`` and its rows of ``lora_B``; the fused module's
    rank/alpha patterns are repeated for each part name (ahead of the others, so they win)."""
    out, rank_pat, alpha_pat = {}, {}, {}
    old_rank, old_alpha = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    for key, t in tensors.items():
        m = re.fullmatch(r"base_model\.model\.(.+)\.(lora_A|lora_B|lora_magnitude_vector)"
                         r"(?:\.default)?(?:\.weight)?", key)
        f = _FUSED_NAME.fullmatch(m[1]) if m else None
        if f is None:
            out[key] = t
            continue
        prefix, group = f[1], f[2]
        rows = _rows(cfg, group)
        by_row = m[2] != "lora_A" and t.shape[0] == sum(rows)  # B's and the magnitude's rows
        chunks = t.split(rows) if by_row else [t] * len(rows)
        suffix = "" if m[2] == "lora_magnitude_vector" else ".weight"
        for part, chunk in zip(GROUPS[group], chunks, strict=True):
            name = _part_name(prefix, group, part)
            out[f"base_model.model.{name}.{m[2]}{suffix}"] = chunk
            # Always explicit: a pattern that PEFT matched against no fused name (e.g. "up_proj",
            # which "gate_up_proj" does not end with) must not reach the part's own name; the
            # fused module's values by the rule of the PEFT that wrote the config (rank_alpha)
            rank_pat[re.escape(name)], alpha_pat[re.escape(name)] = rank_alpha(config, m[1])
    config = {
        **config,
        "rank_pattern": {**rank_pat, **old_rank},
        "alpha_pattern": {**alpha_pat, **old_alpha},
    }
    return out, config


def part_names(hf_name: str) -> list[str]:
    """A fused module's transformers name -> its parts', the modules Ember adapts
    (``model.layers.0.self_attn.qkv_proj`` -> ``...q_proj``, ``...k_proj``, ``...v_proj``);
    any other name: itself."""
    f = _FUSED_NAME.fullmatch(hf_name)
    return [hf_name] if f is None else [_part_name(f[1], f[2], p) for p in GROUPS[f[2]]]


def fused_module_name(hf_name: str, cfg: ModelConfig | None) -> str:
    """A part's transformers name -> the module PEFT sees in a fused model
    (``model.layers.0.self_attn.q_proj`` -> ``model.layers.0.self_attn.qkv_proj``); other names
    and unfused models: unchanged."""
    if not is_fused(cfg):
        return hf_name
    prefix, _, leaf = hf_name.rpartition(".")
    group = next((g for g, parts in GROUPS.items() if leaf in parts), None)
    return hf_name if group is None else f"{prefix.rpartition('.')[0]}.{group}"


def _by_group(items: dict) -> tuple[dict, dict]:
    """``{hf name: value}`` -> (the values of unfused modules by name, ``{(layer prefix, fused
    group): {part leaf: value}}``), the layer prefix ending in "." (e.g. "model.layers.0.")."""
    out, groups = {}, {}
    for name, v in items.items():
        prefix, _, leaf = name.rpartition(".")
        group = next((g for g, parts in GROUPS.items() if leaf in parts), None)
        if group is None:
            out[name] = v
        else:
            groups.setdefault((prefix.rpartition(".")[0] + ".", group), {})[leaf] = v
    return out, groups


def fuse_magnitudes(mags: dict, base_norm, cfg: ModelConfig) -> dict:
    """DoRA magnitudes ``{hf name: (out,)}`` per projection -> per module of the fused model;
    ``base_norm(hf name)`` gives the base rows' norms of a part without an adapter."""
    out, groups = _by_group(mags)
    for (prefix, group), parts in groups.items():
        out[prefix + group] = torch.cat([
            parts[p].float() if p in parts else base_norm(_part_name(prefix, group, p)).float()
            for p in GROUPS[group]])
    return out


def fuse_adapter(entries: dict, cfg: ModelConfig, rslora: bool) -> dict:
    """``{hf name: (A, B, rank, alpha)}`` per projection -> the same for a fused model's modules."""
    out, groups = _by_group(entries)
    for (prefix, group), parts in groups.items():
        fused_name = prefix + group
        present = [p for p in GROUPS[group] if p in parts]
        first = parts[present[0]]
        if len(present) == len(GROUPS[group]) and all(
            parts[p][2:] == first[2:] and torch.equal(parts[p][0], first[0]) for p in present
        ):
            out[fused_name] = (first[0], torch.cat([parts[p][1] for p in present]), *first[2:])
            continue
        rank = sum(parts[p][2] for p in present)
        A = torch.cat([parts[p][0].float() for p in present])
        B = torch.zeros(sum(_rows(cfg, group)), rank)
        row = col = 0
        for part, n in zip(GROUPS[group], _rows(cfg, group), strict=True):
            if part in parts:
                _, b, r, alpha = parts[part]
                B[row : row + n, col : col + r] = b.float() * (
                    alpha / (math.sqrt(r) if rslora else r)
                )
                col += r
            row += n
        out[fused_name] = (A, B, rank, math.sqrt(rank) if rslora else float(rank))  # scale 1
    return out
