"""``check_expressible`` for ``ember.models.gguf_export``: the metadata ``save_gguf`` is about to
write, read back with the importer's own ``config_from_gguf``; an EmberError names every field
that would come back different (llama.cpp would compute another model), or what the importer
cannot read at all (a Llama 3 RoPE of other than the released low/high frequency factors)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ember import EmberError
from ember.models.config import ModelConfig
from ember.models.gguf import TensorInfo, config_from_gguf

# why a field cannot be written, where the GGUF file has no key for it at all
_WHY = {
    "activation": " (llama.cpp's graph for this architecture hard-codes its MLP activation and "
    "a GGUF file has no key for another)"
}


class _Header:
    """What ``config_from_gguf`` reads of a ``GGUFFile``: metadata, tensor shapes, rope_freqs."""

    def __init__(self, md: dict, shapes: dict[str, tuple[int, ...]], extra: dict, path: Path):
        self.metadata, self.path, self._extra = md, path, extra
        self.tensors = {n: TensorInfo(n, s, 0, 0, 0) for n, s in shapes.items()}

    def tensor(self, name: str) -> torch.Tensor:
        return self._extra[name]


def _semantics(cfg: ModelConfig) -> dict[str, Any]:
    """The config fields that change the computation, in a form where equal means same model
    (floats at fp32 precision, per-layer windows and RoPE bases instead of their encodings)."""

    def f32(v):
        if isinstance(v, tuple):  # LongRoPE factors
            return tuple(map(f32, v))
        return float(np.float32(v)) if isinstance(v, float) else v

    out = {f.name: f32(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    for k in (
        "model_type",
        "torch_dtype",
        "extra",
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
        "labels",
        "layer_types",
        "sliding_window",
        "query_pre_attn_scalar",
        "rope_local_theta",
        "resid_dropout",
        "embed_dropout",
        "attention_dropout",
    ):  # dropout: training only
        out.pop(k)
    rs = cfg.rope_scaling
    out["rope_scaling"] = (
        None if rs is None else {k: f32(v) for k, v in dataclasses.asdict(rs).items()}
    )
    out["windows"] = tuple(cfg.window(i) for i in range(cfg.num_layers))
    out["local_rope"] = tuple(
        cfg.rope_local_theta if cfg.is_sliding(i) else None for i in range(cfg.num_layers)
    )
    out["softmax_scale"] = f32(cfg.softmax_scale or cfg.head_dim**-0.5)
    return out


def check_expressible(cfg: ModelConfig, md: dict, shapes: dict, extra: dict, path: Path) -> None:
    """Read ``md`` back with the importer; EmberError naming every field that would differ (or
    what the importer cannot read: a Llama 3 RoPE of other than the released low/high factors)."""
    try:
        back = config_from_gguf(_Header(md, shapes, extra, path))
    except EmberError as e:
        rs = cfg.rope_scaling
        said = (
            ""
            if rs is None
            else "; this model's rope scaling: "
            + ", ".join(
                f"{f.name}={getattr(rs, f.name)}"
                for f in dataclasses.fields(rs)
                if f.name in ("kind", "factor") or getattr(rs, f.name) != f.default
            )
        )
        raise EmberError(
            f"save_gguf: Ember could not read the {md['general.architecture']} "
            f"GGUF file back as this model ({str(e).split(': ', 1)[-1]}{said}). "
            "Export the merged HF folder instead (ember export --merged)"
        ) from None
    ours, theirs = _semantics(cfg), _semantics(back)
    diff = {k: (v, theirs[k]) for k, v in ours.items() if theirs[k] != v}
    if diff:
        said = "; ".join(
            f"{k}: {a!r} would be read as {b!r}{_WHY.get(k, '')}" for k, (a, b) in diff.items()
        )
        raise EmberError(
            f"save_gguf: a {md['general.architecture']} GGUF file cannot express "
            f"this model ({said}); llama.cpp would compute a different model. "
            "Export the merged HF folder instead (ember export --merged)"
        )
