"""HF model folders on disk, below the model: ``config.json`` and ``generation_config.json``
(``ember.models.config_files``), safetensors headers and shard indexes, the stream of tensors they
hold (opening one weights file: ``ember.models.weights_files``; sharded writing:
``ember.models.shard_writer``).

``scan_checkpoint`` reads only the file headers (``CheckpointIndex``: which file holds which
tensor, its shape and dtype); ``iter_checkpoint`` then streams ``(ember_key, tensor)`` pairs one
file at a time, as stored, after validating every key and shape against the config.
``language_model_view`` shows a multimodal Gemma 3 checkpoint as its language
model. transformers' ``pytorch_model.bin`` (and its sharded index) is read through
``open_weights`` with ``torch.load(weights_only=True)``, PyTorch's restricted unpickler, which
runs no code; other pickle files are refused. Orchestration (building the model, dtypes, atomic
folders) is in ``ember.models.loading``; bitsandbytes 4-bit folders in
``ember.models.bnb_checkpoint``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import warnings
from collections import Counter
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError

from ember import EmberError
from ember.models.config import ModelConfig
from ember.models.config_files import (  # noqa: F401  (re-exported: their old home)
    _parse_config,
    _read_config_json,
    generation_config_to_write,
    read_config,
    read_generation_config,
)
from ember.models.hf import expert_parts, fused_parts, map_hf_keys, split_multimodal_keys
from ember.models.nf4 import QS_SUFFIXES, is_quant_state_key, split_bnb_key
from ember.models.weights_files import (  # noqa: F401  (re-exported: their old home)
    _PICKLE_SUFFIXES,
    _ST_DTYPES,
    INDEX_FILE,
    SINGLE_FILE,
    TORCH_FILE,
    TORCH_INDEX_FILE,
    _TorchFile,
    lfs_pointer,
    open_weights,
)

# --------------------------------------------------------------------------------------------------
# Reading


@dataclass
class CheckpointIndex:
    """Where every tensor of a safetensors checkpoint lives, from the file headers only."""

    folder: Path
    files: list[Path] = field(default_factory=list)
    key_file: dict[str, Path] = field(default_factory=dict)
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    dtypes: dict[str, torch.dtype] = field(default_factory=dict)
    # the name in the file of a key named otherwise here (a multimodal checkpoint's language
    # model: ``language_model_view``); absent keys are stored under their own name
    stored: dict[str, str] = field(default_factory=dict)
    # the weights of a bare base model (``LlamaModel``), stored without the ``model.`` prefix
    base_model: bool = False

    def stored_key(self, key: str) -> str:
        return self.stored.get(key, key)

    def stored_dtype(self) -> torch.dtype:
        """The dtype holding most of the weights (a few fp32 norms in a bf16 file don't count);
        in a bitsandbytes checkpoint, of the weights that are not 4-bit."""
        quantized = self.quantized_weights()
        count: Counter = Counter()
        for k, shape in self.shapes.items():
            if split_bnb_key(k)[0] not in quantized:
                count[self.dtypes[k]] += max(1, torch.Size(shape).numel())
        if not count:
            raise EmberError(
                f"{self.folder}: every tensor is 4-bit; the checkpoint lacks the "
                "embedding and norms"
            )
        return count.most_common(1)[0][0]

    def quantized_weights(self) -> set[str]:
        """HF keys of the bitsandbytes 4-bit weights (those with a quant state)."""
        return {split_bnb_key(k)[0] for k in self.key_file if is_quant_state_key(k)}


def _refuse_pickle(folder: Path) -> None:
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in _PICKLE_SUFFIXES)
    if pickles:
        raise EmberError(
            f"{folder} holds only pickle weights ({', '.join(pickles[:3])}) under names Ember "
            f"does not read (it reads safetensors, and {TORCH_FILE} / {TORCH_INDEX_FILE} with "
            "torch.load(weights_only=True)). Convert them to safetensors with a tool you "
            "trust, e.g. transformers: AutoModelForCausalLM.from_pretrained(src)"
            ".save_pretrained(dst), then load dst"
        )


def _index_files(folder: Path, name: str = INDEX_FILE) -> list[Path]:
    index = folder / name
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        names = sorted(set(weight_map.values()))
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
        raise EmberError(
            f"{index} is not a valid checkpoint index (needs a 'weight_map' object: "
            f"{type(e).__name__}: {e})"
        ) from None
    files = []
    for shard in names:
        if not isinstance(shard, str) or Path(shard).name != shard:
            raise EmberError(
                f"{index}: weight_map names file {shard!r}, which is not a plain file "
                "name in the folder"
            )
        path = folder / shard
        if not path.is_file():
            raise EmberError(
                f"{path} not found (listed in {name}); the download is incomplete"
            )
        files.append(path)
    return files


def _why_unreadable(path: Path) -> str:
    """What an unreadable weights file most likely is, and what to do about it."""
    return (lfs_pointer(path, "the weights")
            or "it is truncated or corrupt: download or save it again")


def scan_checkpoint(folder: str | os.PathLike, *, quantized: bool = False,
                    int8: bool = False) -> CheckpointIndex:
    """Find the safetensors files of an HF folder and read their headers (no tensor data).

    ``quantized``: the folder is a bitsandbytes 4-bit checkpoint, so uint8 tensors (packed
    weights, absmax, quant states) are expected too; ``int8``: an 8-bit one (int8 weights,
    uint8 format tags)."""
    allowed = {**_ST_DTYPES, "U8": torch.uint8} if quantized or int8 else _ST_DTYPES
    if int8:
        allowed = {**allowed, "I8": torch.int8}
    if quantized:  # packed 4-bit bytes in transformers' other bnb_4bit_quant_storage dtypes
        allowed = {**allowed, **_STORAGE_DTYPES}
    folder = Path(folder)
    if (folder / SINGLE_FILE).is_file():
        files = [folder / SINGLE_FILE]
    elif (folder / INDEX_FILE).is_file():
        files = _index_files(folder)
    elif (folder / TORCH_FILE).is_file():
        files = [folder / TORCH_FILE]
    elif (folder / TORCH_INDEX_FILE).is_file():
        files = _index_files(folder, TORCH_INDEX_FILE)
    else:
        _refuse_pickle(folder)
        found = sorted(p.name for p in folder.glob("*.safetensors"))
        hint = f" (found {', '.join(found[:3])} without {INDEX_FILE})" if found else ""
        raise EmberError(f"no {SINGLE_FILE} or {INDEX_FILE} in {folder}{hint}")
    ckpt = CheckpointIndex(folder=folder, files=files)
    for path in files:
        try:
            with open_weights(path) as f:
                for key in f.keys():
                    if key in ckpt.key_file:
                        raise EmberError(
                            f"tensor {key} is stored twice: in {ckpt.key_file[key]} and {path}"
                        )
                    sl = f.get_slice(key)
                    st_dtype = sl.get_dtype()
                    if st_dtype not in allowed:
                        hint = (
                            " (a bitsandbytes 4-bit checkpoint? Its config.json needs the "
                            "quantization_config it was saved with)"
                            if st_dtype == "U8" and not quantized
                            else ""
                        )
                        raise EmberError(
                            f"{path}: tensor {key} has dtype {st_dtype}; only F32, F16 "
                            f"and BF16 weights are supported{hint}"
                        )
                    if quantized and ".quant_state." in key and not is_quant_state_key(key):
                        raise EmberError(
                            f"{path}: tensor {key} is not a bitsandbytes 4-bit quant state "
                            f"Ember reads ({' / '.join(QS_SUFFIXES)}); load the unquantized "
                            "model with quantize='nf4'"
                        )
                    ckpt.key_file[key] = path
                    ckpt.shapes[key] = tuple(sl.get_shape())
                    ckpt.dtypes[key] = allowed[st_dtype]
        except (SafetensorError, OSError) as e:
            raise EmberError(
                f"{path} is not a readable safetensors file ({e}); {_why_unreadable(path)}"
            ) from None
    if not ckpt.key_file:
        raise EmberError(f"{folder}: the safetensors files hold no tensors")
    if quantized:
        _check_storage_dtypes(ckpt)
    # an 8-bit checkpoint's scales are looked up by stored name (bnb_int8): its keys stay as stored
    return ckpt if int8 else _base_model_view(ckpt)


# bnb_4bit_quant_storage's dtypes beyond uint8 / F32 / F16 / BF16 (transformers' BitsAndBytesConfig
# takes int8 and float64 too): only a packed 4-bit weight may be stored in them.
_STORAGE_DTYPES = {"I8": torch.int8, "F64": torch.float64}


def _check_storage_dtypes(ckpt: CheckpointIndex) -> None:
    quantized = ckpt.quantized_weights()
    names = {v: k for k, v in _STORAGE_DTYPES.items()}
    for key, dtype in ckpt.dtypes.items():
        if dtype in names and key not in quantized:
            scb = key.removesuffix("weight") + "SCB"
            hint = (" (an 8-bit LLM.int8 weight, with its {scb}: the config.json's "
                    "quantization_config says 4-bit; fix it to the load_in_8bit one the model "
                    "was saved with)" if scb in ckpt.key_file and dtype == torch.int8 else
                    " (and any dtype for a packed 4-bit weight, as bnb_4bit_quant_storage)")
            raise EmberError(
                f"{ckpt.key_file[key]}: tensor {key} has dtype {names[dtype]}; only F32, F16 and "
                f"BF16 weights are supported{hint.format(scb=scb)}"
            )


_HEADS = ("lm_head.", "score.")
# Wrappers whose prefix a state dict saved through them carries on every key: torch.compile's
# OptimizedModule, DistributedDataParallel / DataParallel.
_WRAPPER_PREFIXES = ("_orig_mod.", "module.")


def _base_model_view(ckpt: CheckpointIndex) -> CheckpointIndex:
    """The checkpoint under the causal LM's names: a wrapper's prefix on every key (a state dict
    saved from a ``torch.compile``d or DDP model: ``_orig_mod.``, ``module.``) removed, with a
    warning; a bare base model's (``LlamaModel.save_pretrained``: ``embed_tokens.weight``,
    ``layers.0...``, no ``model.`` prefix, no head) given the ``model.`` prefix, as transformers'
    ``from_pretrained`` adds the missing ``base_model_prefix``; any other checkpoint as it is."""
    name = {k: k for k in ckpt.key_file}
    stripped = ""
    # wrappers nest in either order (nanoGPT's DDP(torch.compile(m)): module._orig_mod.)
    while prefix := next((p for p in _WRAPPER_PREFIXES
                          if all(v.startswith(p) for v in name.values())), None):
        name = {k: v.removeprefix(prefix) for k, v in name.items()}
        stripped += prefix
    if stripped:
        warnings.warn(
            f"{ckpt.folder}: every tensor name starts with {stripped!r} (saved from a wrapped "
            "model: torch.compile, DDP); loading them without it (transformers would not "
            "find them and start from random weights)", stacklevel=4)
    bare = "embed_tokens.weight" in name.values() and not any(
        v.startswith("model.") for v in name.values())
    if bare:
        name = {k: v if v.startswith(_HEADS) else f"model.{v}" for k, v in name.items()}
    if all(k == v for k, v in name.items()):
        return ckpt
    return CheckpointIndex(
        folder=ckpt.folder,
        files=ckpt.files,
        key_file={name[k]: p for k, p in ckpt.key_file.items()},
        shapes={name[k]: v for k, v in ckpt.shapes.items()},
        dtypes={name[k]: v for k, v in ckpt.dtypes.items()},
        stored={name[k]: ckpt.stored_key(k) for k in ckpt.key_file if name[k] != k},
        base_model=bare,
    )


def language_model_view(ckpt: CheckpointIndex) -> CheckpointIndex:
    """A multimodal Gemma 3 checkpoint's language model, under the text model's HF names (the
    vision tower and projector left out, with a warning: Ember trains the language model only)."""
    text, vision = split_multimodal_keys(ckpt.key_file, str(ckpt.folder))
    if vision:
        warnings.warn(
            f"{ckpt.folder}: a multimodal checkpoint; its {len(vision)} vision tower / projector "
            "tensors are not loaded (Ember trains the language model, text-only); a merged "
            "export copies them through unchanged",
            stacklevel=3,
        )
    return CheckpointIndex(
        folder=ckpt.folder,
        files=ckpt.files,
        key_file={k: ckpt.key_file[s] for k, s in text.items()},
        shapes={k: ckpt.shapes[s] for k, s in text.items()},
        dtypes={k: ckpt.dtypes[s] for k, s in text.items()},
        stored={k: s for k, s in text.items() if k != s},
    )


_HEAD_BLOCK_BYTES = 16 << 20  # fp32 bytes of each tensor's rows compared at a time


def _same_values(ckpt: CheckpointIndex, a: str, b: str) -> bool:
    """Whether stored tensors ``a`` and ``b`` (one shape) hold equal values (as fp32: -0.0 equals
    0.0, NaN nothing), read a block of rows at a time, stopping at the first block that differs:
    not both whole plus their fp32 copies (4 V x D fp32 buffers for a bf16 embedding and head)
    every time a tied folder with a stored head is opened."""
    files = {ckpt.key_file[k] for k in (a, b)}
    with contextlib.ExitStack() as stack:
        opened = {p: stack.enter_context(open_weights(p)) for p in files}
        sa, sb = (opened[ckpt.key_file[k]] for k in (a, b))
        # (a .bin's tensors are memory-mapped: sliced as they are)
        sa, sb = (f.get_tensor(ckpt.stored_key(k)) if isinstance(f, _TorchFile)
                  else f.get_slice(ckpt.stored_key(k)) for f, k in ((sa, a), (sb, b)))
        shape = ckpt.shapes[a]
        rows = max(1, _HEAD_BLOCK_BYTES // (4 * max(1, math.prod(shape[1:]))))
        for i in range(0, shape[0], rows):
            x, y = sa[i:i + rows], sb[i:i + rows]
            if x.dtype != y.dtype or x.dtype not in _ST_DTYPES.values():
                x, y = x.float(), y.float()  # (fp16 / bf16 -> fp32 is exact: compared as is)
            if not torch.equal(x, y):
                return False
    return True


def untie_if_head_differs(ckpt: CheckpointIndex, cfg: ModelConfig) -> ModelConfig:
    """cfg, untied when config.json says tie_word_embeddings but the checkpoint stores an
    ``lm_head.weight`` that differs from the embedding. transformers then keeps the two apart
    (and warns), so Ember does the same instead of silently using the embedding as the head."""
    emb, head = "model.embed_tokens.weight", "lm_head.weight"
    if not cfg.tie_word_embeddings or head not in ckpt.key_file or emb not in ckpt.key_file:
        return cfg
    if head in ckpt.quantized_weights() or ckpt.shapes[head] != ckpt.shapes[emb]:
        return cfg  # map_hf_keys names the mismatch
    if _same_values(ckpt, emb, head):
        return cfg
    warnings.warn(
        f"{ckpt.folder}: config.json has tie_word_embeddings=true but the checkpoint's "
        f"{head} differs from {emb}; loading them untied, as transformers does (set "
        "tie_word_embeddings=false in config.json to silence this)",
        stacklevel=3,
    )
    return cfg.replace(tie_word_embeddings=False)


def _unlisted_hint(ckpt: CheckpointIndex) -> str:
    """Why weights may be missing from a sharded checkpoint: safetensors files in the folder
    that its index does not list (an index from another save), which transformers' loading
    skips too."""
    unlisted = sorted(p.name for p in ckpt.folder.glob("*.safetensors") if p not in ckpt.files)
    if not unlisted or not (ckpt.folder / INDEX_FILE).is_file() or any(
            p.suffix != ".safetensors" or p.name == SINGLE_FILE for p in ckpt.files):
        return ""
    return (f"; the folder also holds {', '.join(unlisted[:3])}, which "
            f"{INDEX_FILE} does not list: an index from another save? Save the "
            "checkpoint again, or fix its weight_map")


def iter_checkpoint(
    folder: str | os.PathLike, cfg: ModelConfig | None = None, ckpt: CheckpointIndex | None = None,
    dequant: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
    keys: Collection[str] | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(ember_key, tensor)`` for every weight, one file at a time, as stored (dtype, CPU).

    All keys and shapes are validated against cfg (default: the folder's config.json) before the
    first tensor is read, so a bad checkpoint fails fast and names the key. ``dequant(stored
    key, tensor)`` turns a stored tensor into the weight it stands for (an 8-bit checkpoint's:
    ``ember.models.bnb_int8``). ``keys``: only these Ember weights (the others, and the files
    holding none of them, are not read)."""
    cfg = cfg if cfg is not None else read_config(folder)
    ckpt = ckpt if ckpt is not None else scan_checkpoint(folder)
    try:
        mapping = map_hf_keys(ckpt.shapes, cfg, str(ckpt.folder))
    except EmberError as e:
        raise EmberError(f"{e}{_unlisted_hint(ckpt)}") from None
    fused = fused_parts(ckpt.shapes, cfg)  # Phi-3: one stored tensor, several Ember weights
    experts = expert_parts(ckpt.shapes, cfg, str(ckpt.folder))  # 3-D MoE expert stacks
    parts = {k: [p[0] for p in v] for k, v in (*fused.items(), *experts.items())}

    def wanted(k: str) -> bool:  # a stored tensor holding one of ``keys`` (all: None)
        return keys is None or any(mapping[p] in keys for p in parts.get(k, (k,)))

    for path in ckpt.files:
        names = [k for k, p in ckpt.key_file.items()
                 if p == path and (k in mapping or k in parts) and wanted(k)]
        if keys is not None and not names:
            continue
        try:
            with open_weights(path) as f:
                for key in names:
                    t = f.get_tensor(ckpt.stored_key(key))
                    if dequant is not None:
                        t = dequant(ckpt.stored_key(key), t)
                    if key in fused:
                        for part, a, b in fused[key]:
                            if keys is None or mapping[part] in keys:
                                yield mapping[part], t[a:b].clone()
                    elif key in experts:
                        for part, e, a, b in experts[key]:
                            if keys is None or mapping[part] in keys:
                                yield mapping[part], t[e, a:b].clone()
                    else:
                        yield mapping[key], t
        except SafetensorError as e:
            raise EmberError(
                f"{path}: reading tensor data failed ({e}); the file is corrupt"
            ) from None


# --------------------------------------------------------------------------------------------------
# Writing

def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")
