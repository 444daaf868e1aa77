"""Writing a checkpoint's tensors: in shards of about ``max_shard_size`` bytes, cut and ordered as
transformers' ``save_pretrained`` (huggingface_hub's ``split_torch_state_dict_into_shards``) cuts
its state dict, so the same model gives the same index file: ``parse_size`` reads
``max_shard_size``; ``_write_shards`` writes ``model.safetensors`` or
``model-0000i-of-0000n.safetensors`` plus the index, one shard in host memory at a time."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors.torch import save_file

from ember import EmberError
from ember.models.deferred import materialize
from ember.models.safetensors_io import INDEX_FILE, SINGLE_FILE, _write_json

_SIZE_UNITS = {
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string like "5GB" (10^9) or "2GiB" (2^30), as transformers does."""
    if isinstance(size, int) and not isinstance(size, bool) and size > 0:
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)\s*", str(size), re.IGNORECASE)
    if not m:
        raise EmberError(
            f"max_shard_size must be a positive int (bytes) or like '5GB' / '500MB' / "
            f"'2GiB', got {size!r}"
        )
    return max(1, int(float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()]))


def _plan_shards(sizes: dict[str, int], limit: int) -> list[list[str]]:
    """Greedy shards in key order, as huggingface_hub's ``split_torch_state_dict_into_shards``
    (transformers' save_pretrained) cuts them: a tensor larger than the limit gets a shard of its
    own, placed when it comes, while the shard being filled stays open for the next ones."""
    shards: list[list[str]] = []
    current: list[str] = []
    used = 0
    for key, n in sizes.items():
        if n > limit:
            shards.append([key])
            continue
        if used + n > limit:
            shards.append(current)
            current, used = [], 0
        current.append(key)
        used += n
    return [*shards, current] if current or not shards else shards


_LAYER_KEY = re.compile(r"model\.layers\.(\d+)\.(self_attn|mlp|block_sparse_moe)?\.?(.*)")
_LEAF_RANK = {n: i for i, n in enumerate(("q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj",
                                          "q_norm", "k_norm", "gate_proj", "up_proj",
                                          "gate_up_proj", "down_proj"))}


def _hf_order(tensors: dict) -> list[str]:
    """A text model's keys in transformers' state-dict order (its modules' order), in which
    huggingface_hub fills the shards: the embedding, each layer's attention, MLP, then norms,
    the final norm, the head. Other checkpoints (multimodal) keep Ember's order."""
    keys = list(tensors)
    if not all(k.startswith(("model.", "lm_head.", "score.")) for k in keys) or any(
            ".experts." in k for k in keys):
        return keys  # (transformers 5 converts MoE experts on saving, in an order of its own)

    def rank(i_key):
        i, k = i_key
        m = _LAYER_KEY.fullmatch(k)
        if m is None:  # embedding first, final norm, then the head
            section = 0 if "embed" in k else 2 if k.startswith("model.") else 3
            return (section, 0, 0, k.endswith(".bias"), i)  # a module's weight, then its bias
        group = {"self_attn": 0, "mlp": 1, "block_sparse_moe": 1}.get(m[2], 2)
        leaf = _LEAF_RANK.get(m[3].split(".")[0], len(_LEAF_RANK)) if group < 2 else 0
        return (1, int(m[1]), group, leaf, i)

    return [k for _, k in sorted(enumerate(keys), key=rank)]


def _write_shards(tensors: dict, dtypes: dict[str, torch.dtype], folder: Path, limit: int) -> None:
    """Write ``tensors`` (HF keys; each cast to ``dtypes[key]``; an ``NF4Weight`` or ``Deferred``
    made then) to ``folder/model.safetensors``, or in shards of about ``limit`` bytes plus the
    index."""
    sizes = {k: tensors[k].numel() * dtypes[k].itemsize for k in _hf_order(tensors)}
    shards = _plan_shards(sizes, limit)
    names = (
        [SINGLE_FILE]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    for name, keys in zip(names, shards, strict=True):
        # Cast and copy one shard at a time so saving a GPU model needs one shard of host memory.
        shard, seen = {}, set()
        for k in keys:
            t = materialize(tensors[k], dtypes[k])
            # NF4 layers share one quant_map tensor; safetensors refuses aliased tensors.
            ptr = t.untyped_storage().data_ptr()
            shard[k] = t.clone() if ptr in seen else t
            seen.add(ptr)
        save_file(shard, folder / name, metadata={"format": "pt"})
        del shard
    if len(shards) > 1:
        _write_json(
            folder / INDEX_FILE,
            {
                "metadata": {
                    "total_size": sum(sizes.values()),
                    "total_parameters": sum(v.numel() for v in tensors.values()),
                },
                "weight_map": {
                    k: name for name, keys in zip(names, shards, strict=True) for k in keys
                },
            },
        )
