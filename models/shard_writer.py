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


_EXPERT_KEY = re.compile(r"(.*\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj|w1|w3|w2)\.weight")


def _natural_key(key: str) -> list[tuple]:
    """transformers' ``dot_natural_key``: the dotted parts, numbers (also a part's trailing
    digits) compared as numbers."""
    parts = []
    for part in key.split("."):
        text = part.rstrip("0123456789")
        parts.append((0, int(part)) if part.isdigit() else
                     (1, text, int(part[len(text):])) if text != part else (1, part))
    return parts


def _moe_rank(key: str) -> tuple:
    """transformers 5's order for a MoE checkpoint (revert_weight_conversion): its in-memory
    names (Mixtral's block_sparse_moe is mlp, each layer's experts two stacks, down_proj and
    gate_up_proj) sorted by ``_natural_key``, a stack written as all its experts' gate (w1),
    then all their up (w3) weights."""
    key = key.replace(".block_sparse_moe.", ".mlp.")
    m = _EXPERT_KEY.fullmatch(key)
    if m is None:
        return (_natural_key(key), 0, 0)
    stack = "down_proj" if m[3] in ("down_proj", "w2") else "gate_up_proj"
    return (_natural_key(f"{m[1]}.{stack}"), m[3] in ("up_proj", "w3"), int(m[2]))


def _storage_unit(key: str) -> str:
    """What huggingface_hub places as one tensor: transformers 5 saves a MoE layer's experts as
    views of its in-memory stacks (one per projection: down, gate, up) and the hub places the
    tensors of one storage together, sized as the whole storage, in the shard of the first."""
    m = _EXPERT_KEY.fullmatch(key)
    return f"{m[1]}.*.{m[3]}" if m else key


def _hf_order(tensors: dict) -> list[str]:
    """A text model's keys in transformers' state-dict order (its modules' order), in which
    huggingface_hub fills the shards: the embedding, each layer's attention, MLP, then norms,
    the final norm, the head; a MoE model's as ``_moe_rank``. Other checkpoints (multimodal)
    keep Ember's order."""
    keys = list(tensors)
    if not all(k.startswith(("model.", "lm_head.", "score.")) for k in keys):
        return keys
    if any(_EXPERT_KEY.fullmatch(k) for k in keys):
        return sorted(keys, key=_moe_rank)

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
    units: dict[str, list[str]] = {}
    for k in sizes:
        units.setdefault(_storage_unit(k), []).append(k)
    shards = [[k for u in shard for k in units[u]] for shard in
              _plan_shards({u: sum(sizes[k] for k in ks) for u, ks in units.items()}, limit)]
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
