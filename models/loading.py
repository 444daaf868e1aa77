"""Load and save models: Hugging Face folders (safetensors), ``.gguf`` files and built-in names.

Loading is lazy: the model is built on the meta device and each tensor is read from its safetensors
file (``safe_open``, memory-mapped), cast, moved and assigned one at a time, so peak host memory
stays about one copy of the model. ``iter_checkpoint`` exposes that stream of
``(ember_key, tensor)`` pairs (raw, as stored) for consumers that transform weights while loading
(NF4 quantization).

Pickle checkpoints (``pytorch_model.bin``, ``*.pt``) are refused, never unpickled.

dtype policy: ``load_pretrained(dtype=None)`` keeps the dtype the weights are stored in (a bf16
checkpoint gives a bf16 model, on CPU too); ``save_pretrained(dtype=None)`` writes the model's
current dtype, like transformers. RoPE frequencies are always computed in fp32.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import uuid
import warnings
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ember import EmberError
from ember.models.config import ModelConfig, rope_inv_freq
from ember.models.hf import DTYPES, config_from_hf, config_to_hf, map_hf_keys, to_hf_state_dict
from ember.models.hub import cache_root
from ember.models.transformer import Transformer

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
_DTYPE_ALIASES = {
    "fp32": "float32",
    "fp16": "float16",
    "half": "float16",
    "bf16": "bfloat16",
    "float": "float32",
}
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# What a model folder may contain; save_pretrained only replaces folders made of these.
_MODEL_FOLDER_FILES = re.compile(
    r"(config\.json|generation_config\.json|model(-\d+-of-\d+)?\.safetensors|"
    r"model\.safetensors\.index\.json|tokenizer.*|special_tokens_map\.json|added_tokens\.json|"
    r"chat_template\.jinja|vocab\.json|merges\.txt)"
)


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """None, a torch floating dtype, or a name ("bfloat16", "bf16", "float32", "fp16", ...)."""
    if dtype is None or dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str):
        name = dtype.removeprefix("torch.")
        name = _DTYPE_ALIASES.get(name, name)
        if name in DTYPES:
            return DTYPES[name]
    raise EmberError(
        f"dtype must be one of {', '.join(DTYPES)} (or None to keep the checkpoint's), "
        f"got {dtype!r}"
    )


def _dtype_name(dtype: torch.dtype) -> str:
    return next(k for k, v in DTYPES.items() if v == dtype)


# --------------------------------------------------------------------------------------------------
# Reading


def read_config(folder: str | os.PathLike) -> ModelConfig:
    """ModelConfig from ``folder/config.json``."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise EmberError(f"{path} not found: a model folder needs config.json next to the weights")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EmberError(f"{path} is not valid JSON ({e})") from None
    try:
        return config_from_hf(raw)
    except EmberError as e:
        raise EmberError(f"{path}: {str(e).removeprefix('config.json: ')}") from None


@dataclass
class CheckpointIndex:
    """Where every tensor of a safetensors checkpoint lives, from the file headers only."""

    folder: Path
    files: list[Path] = field(default_factory=list)
    key_file: dict[str, Path] = field(default_factory=dict)
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    dtypes: dict[str, torch.dtype] = field(default_factory=dict)

    def stored_dtype(self) -> torch.dtype:
        """The dtype holding most of the weights (a few fp32 norms in a bf16 file don't count)."""
        count: Counter = Counter()
        for k, shape in self.shapes.items():
            count[self.dtypes[k]] += max(1, torch.Size(shape).numel())
        return count.most_common(1)[0][0]


def _refuse_pickle(folder: Path) -> None:
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in _PICKLE_SUFFIXES)
    if pickles:
        raise EmberError(
            f"{folder} holds only pickle weights ({', '.join(pickles[:3])}); Ember never unpickles "
            "checkpoints (it can run arbitrary code). Convert them to safetensors with a tool you "
            "trust, e.g. transformers: AutoModelForCausalLM.from_pretrained(src)"
            ".save_pretrained(dst), then load dst"
        )


def _index_files(folder: Path) -> list[Path]:
    index = folder / INDEX_FILE
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        names = sorted(set(weight_map.values()))
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
        raise EmberError(
            f"{index} is not a valid safetensors index (needs a 'weight_map' object: "
            f"{type(e).__name__}: {e})"
        ) from None
    files = []
    for name in names:
        if not isinstance(name, str) or Path(name).name != name:
            raise EmberError(
                f"{index}: weight_map names file {name!r}, which is not a plain file "
                "name in the folder"
            )
        path = folder / name
        if not path.is_file():
            raise EmberError(
                f"{path} not found (listed in {INDEX_FILE}); the download is incomplete"
            )
        files.append(path)
    return files


def scan_checkpoint(folder: str | os.PathLike) -> CheckpointIndex:
    """Find the safetensors files of an HF folder and read their headers (no tensor data)."""
    folder = Path(folder)
    if (folder / SINGLE_FILE).is_file():
        files = [folder / SINGLE_FILE]
    elif (folder / INDEX_FILE).is_file():
        files = _index_files(folder)
    else:
        _refuse_pickle(folder)
        found = sorted(p.name for p in folder.glob("*.safetensors"))
        hint = f" (found {', '.join(found[:3])} without {INDEX_FILE})" if found else ""
        raise EmberError(f"no {SINGLE_FILE} or {INDEX_FILE} in {folder}{hint}")
    ckpt = CheckpointIndex(folder=folder, files=files)
    for path in files:
        try:
            with safe_open(path, framework="pt", device="cpu") as f:
                for key in f.keys():
                    if key in ckpt.key_file:
                        raise EmberError(
                            f"tensor {key} is stored twice: in {ckpt.key_file[key]} and {path}"
                        )
                    sl = f.get_slice(key)
                    st_dtype = sl.get_dtype()
                    if st_dtype not in _ST_DTYPES:
                        raise EmberError(
                            f"{path}: tensor {key} has dtype {st_dtype}; only F32, F16 "
                            "and BF16 weights are supported"
                        )
                    ckpt.key_file[key] = path
                    ckpt.shapes[key] = tuple(sl.get_shape())
                    ckpt.dtypes[key] = _ST_DTYPES[st_dtype]
        except (SafetensorError, OSError) as e:
            raise EmberError(
                f"{path} is not a readable safetensors file ({e}); it is truncated or "
                "corrupt: download or save it again"
            ) from None
    if not ckpt.key_file:
        raise EmberError(f"{folder}: the safetensors files hold no tensors")
    return ckpt


def iter_checkpoint(
    folder: str | os.PathLike, cfg: ModelConfig | None = None, ckpt: CheckpointIndex | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(ember_key, tensor)`` for every weight, one file at a time, as stored (dtype, CPU).

    All keys and shapes are validated against cfg (default: the folder's config.json) before the
    first tensor is read, so a bad checkpoint fails fast and names the key."""
    cfg = cfg if cfg is not None else read_config(folder)
    ckpt = ckpt if ckpt is not None else scan_checkpoint(folder)
    mapping = map_hf_keys(ckpt.shapes, cfg, str(ckpt.folder))
    for path in ckpt.files:
        keys = [k for k, p in ckpt.key_file.items() if p == path and k in mapping]
        try:
            with safe_open(path, framework="pt", device="cpu") as f:
                for key in keys:
                    yield mapping[key], f.get_tensor(key)
        except SafetensorError as e:
            raise EmberError(
                f"{path}: reading tensor data failed ({e}); the file is corrupt"
            ) from None


def _assign_(model: nn.Module, tensors, device, dtype: torch.dtype) -> None:
    """Replace the meta parameters of model by the given tensors (cast and moved one at a time)."""
    for key, t in tensors:
        owner, _, name = key.rpartition(".")
        module = model.get_submodule(owner)
        new = t.to(device=device, dtype=dtype)
        setattr(
            module, name, nn.Parameter(new, requires_grad=module._parameters[name].requires_grad)
        )
    # The RoPE table is a non-persistent buffer: not in checkpoints, rebuilt in fp32 for the config.
    model.inv_freq = rope_inv_freq(model.cfg).to(device)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise EmberError(f"internal error: no weights were loaded for {left[:5]}")


def load_hf_folder(
    folder: str | os.PathLike,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device = "cpu",
    *,
    quantize: str | None = None,
) -> Transformer:
    """A ``Transformer`` with the weights of an HF model folder (config.json + safetensors)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise EmberError(f"model folder {folder} does not exist")
    cfg = read_config(folder)
    ckpt = scan_checkpoint(folder)
    stored = ckpt.stored_dtype()
    target = resolve_dtype(dtype) or stored
    cfg = cfg.replace(torch_dtype=_dtype_name(stored))
    with torch.device("meta"):
        model = Transformer(cfg)
    tensors = iter_checkpoint(folder, cfg, ckpt)
    if quantize is None:
        _assign_(model, tensors, torch.device(device), target)
    elif quantize == "nf4":
        _load_nf4_(model, tensors, torch.device(device), target)
    else:
        raise EmberError(f"quantize must be None or 'nf4', got {quantize!r}")
    return model


def _load_nf4_(model: Transformer, tensors, device: torch.device, dtype: torch.dtype) -> None:
    """Quantize-while-loading: ember.models.nf4 owns which weights become NF4 and how."""
    try:
        from ember.models import nf4
    except ImportError:
        raise EmberError(
            "quantize='nf4' needs ember.models.nf4, which this build does not have "
            "yet; load without quantize"
        ) from None
    if not hasattr(nf4, "load_quantized_"):
        raise EmberError(
            "quantize='nf4': ember.models.nf4 has no load_quantized_(model, tensors, "
            "device=..., compute_dtype=...) entry point"
        )
    nf4.load_quantized_(model, tensors, device=device, compute_dtype=dtype)
    model.inv_freq = rope_inv_freq(model.cfg).to(device)


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()[:16]


def gguf_folder(gguf_path: str | os.PathLike) -> Path:
    """The HF folder imported from a .gguf file, cached by content hash (imported once)."""
    from ember.models.gguf import import_gguf

    src = Path(gguf_path)
    if not src.is_file():
        raise EmberError(f"GGUF file {src} does not exist")
    out = cache_root() / "gguf" / f"{src.stem}-{_file_digest(src)}"
    if (out / "config.json").is_file():
        return out
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        import_gguf(src, tmp)
        try:
            os.rename(tmp, out)
        except OSError:
            if not (out / "config.json").is_file():  # not a concurrent import that won the race
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _resolve_path(path: str | os.PathLike) -> Path:
    p = Path(path)
    if p.is_dir():
        return p
    # .gguf files (imported once, under a lock, through gguf_folder) and built-in names.
    from ember.models.hub import resolve_model

    return resolve_model(path)


def load_pretrained(
    path: str | os.PathLike,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device = "cpu",
    *,
    quantize: str | None = None,
):
    """``(model, tokenizer)`` from an HF folder, a ``.gguf`` file or a built-in model name.

    ``dtype=None`` keeps the stored dtype. ``tokenizer`` is None (with a warning) when the folder
    has no tokenizer.json. ``quantize="nf4"`` stores the linear weights in NF4 while loading."""
    folder = _resolve_path(path)
    model = load_hf_folder(folder, dtype, device, quantize=quantize)
    if (folder / "tokenizer.json").is_file():
        from ember.models.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(folder)
    else:
        warnings.warn(
            f"{folder} has no tokenizer.json: returning tokenizer=None (token ids in and out only)",
            stacklevel=2,
        )
        tokenizer = None
    return model, tokenizer


# --------------------------------------------------------------------------------------------------
# Saving

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
    """Greedy shards in key order; a tensor larger than the limit gets a shard of its own."""
    shards: list[list[str]] = [[]]
    used = 0
    for key, n in sizes.items():
        if shards[-1] and used + n > limit:
            shards.append([])
            used = 0
        shards[-1].append(key)
        used += n
    return shards


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _write_folder(
    sd: dict, cfg: ModelConfig, tmp: Path, tokenizer, dtype: torch.dtype | None, limit: int
) -> None:
    if any(".lora_" in k or ".base." in k for k in sd):
        raise EmberError(
            "save_pretrained: the model has LoRA adapters; merge them first "
            "(ember.models.lora.merge_lora) or save the adapter alone (save_adapter)"
        )
    hf = to_hf_state_dict(sd, cfg)
    dtypes = {k: dtype or v.dtype for k, v in hf.items()}
    saved_dtype = Counter(dtypes[k] for k in hf).most_common(1)[0][0]
    sizes = {k: v.numel() * dtypes[k].itemsize for k, v in hf.items()}
    shards = _plan_shards(sizes, limit)
    names = (
        [SINGLE_FILE]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    for name, keys in zip(names, shards, strict=True):
        # Cast and copy one shard at a time so saving a GPU model needs one shard of host memory.
        tensors = {k: hf[k].detach().to("cpu", dtypes[k]).contiguous() for k in keys}
        save_file(tensors, tmp / name, metadata={"format": "pt"})
        del tensors
    if len(shards) > 1:
        _write_json(
            tmp / INDEX_FILE,
            {
                "metadata": {
                    "total_size": sum(sizes.values()),
                    "total_parameters": sum(v.numel() for v in hf.values()),
                },
                "weight_map": {
                    k: name for name, keys in zip(names, shards, strict=True) for k in keys
                },
            },
        )
    _write_json(tmp / "config.json", config_to_hf(cfg, saved_dtype))
    gen = {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id}
    if cfg.pad_token_id is not None:
        gen["pad_token_id"] = cfg.pad_token_id
    _write_json(tmp / "generation_config.json", gen)
    if tokenizer is not None:
        if not hasattr(tokenizer, "save_pretrained"):
            raise EmberError(
                f"save_pretrained: tokenizer {type(tokenizer).__name__} has no "
                "save_pretrained(out_dir)"
            )
        tokenizer.save_pretrained(tmp)


def save_pretrained(
    model: Transformer,
    out_dir: str | os.PathLike,
    tokenizer=None,
    *,
    dtype: str | torch.dtype | None = None,
    max_shard_size: int | str = "5GB",
) -> Path:
    """Write an HF folder (config.json + safetensors, sharded above ``max_shard_size``) that
    ``transformers.AutoModelForCausalLM.from_pretrained(out_dir)`` loads unchanged.

    The folder appears atomically: everything is written to a temporary sibling and renamed into
    place. An existing ``out_dir`` is replaced only if it holds nothing but model-folder files
    (config, weights, tokenizer), so unrelated files are never deleted."""
    model = getattr(model, "_orig_mod", model)  # torch.compile wrapper
    if not isinstance(model, Transformer):
        raise EmberError(
            f"save_pretrained expects an ember Transformer, got {type(model).__name__}"
        )
    return save_state_dict(
        model.state_dict(),
        model.cfg,
        out_dir,
        tokenizer,
        dtype=dtype,
        max_shard_size=max_shard_size,
    )


def save_state_dict(
    sd: dict[str, torch.Tensor],
    cfg: ModelConfig,
    out_dir: str | os.PathLike,
    tokenizer=None,
    *,
    dtype: str | torch.dtype | None = None,
    max_shard_size: int | str = "5GB",
) -> Path:
    """``save_pretrained`` for a full Ember state dict (e.g. gathered from a sharded model with
    ``torch.distributed.checkpoint.state_dict.get_model_state_dict(..., full_state_dict=True)``)."""
    target = resolve_dtype(dtype)
    limit = parse_size(max_shard_size)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise EmberError(f"save_pretrained: {out} exists and is not a folder")
    existing = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    foreign = [n for n in existing if not _MODEL_FOLDER_FILES.fullmatch(n)]
    if foreign:
        raise EmberError(
            f"save_pretrained: {out} already holds files that are not part of a model "
            f"folder ({', '.join(foreign[:5])}); choose a new or empty folder"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:8]
    tmp = out.parent / f".{out.name}.tmp-{tag}"
    tmp.mkdir()
    try:
        _write_folder(sd, cfg, tmp, tokenizer, target, limit)
        if existing:
            old = out.parent / f".{out.name}.old-{tag}"
            os.rename(out, old)
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)  # out is absent or an empty folder
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
