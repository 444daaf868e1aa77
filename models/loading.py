"""Load and save models: Hugging Face folders (safetensors), ``.gguf`` files and built-in names.

Loading is lazy: the model is built on the meta device and each tensor is read from its safetensors
file (``safe_open``, memory-mapped), cast, moved and assigned one at a time, so peak host memory
stays about one copy of the model. ``iter_checkpoint`` exposes that stream of
``(ember_key, tensor)`` pairs (raw, as stored) for consumers that transform weights while loading
(NF4 quantization).

Pickle checkpoints (``pytorch_model.bin``, ``*.pt``) are refused, never unpickled.

QLoRA: ``load_pretrained(..., quantize="nf4")`` quantizes the linear layers while loading; a
bitsandbytes NF4 checkpoint (``quantization_config`` in config.json, as transformers saves with
``BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")``) loads as it is, streamed by
``iter_bnb_checkpoint`` into ``ember.models.nf4.load_bnb_quantized_``. ``save_pretrained`` writes
a model with NF4 layers back in that format, or dequantized (``dequantize=True``) as a plain model.

dtype policy: ``load_pretrained(dtype=None)`` keeps the dtype the weights are stored in (a bf16
checkpoint gives a bf16 model, on CPU too); ``save_pretrained(dtype=None)`` writes the model's
current dtype, like transformers. RoPE frequencies are always computed in fp32.
"""

from __future__ import annotations

import hashlib
import importlib
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
from ember.kernels.nf4 import NF4Weight
from ember.models.config import ModelConfig, rope_inv_freq
from ember.models.hf import (
    DTYPES,
    config_from_hf,
    config_to_hf,
    hf_key_to_ember,
    map_hf_keys,
    quantization_config_from_hf,
    to_hf_state_dict,
)
from ember.models.hub import cache_root
from ember.models.nf4 import (
    QS_SUFFIX,
    Linear4bit,
    bnb_quantization_config,
    load_bnb_quantized_,
    split_bnb_key,
)
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


def _read_config_json(folder: str | os.PathLike) -> tuple[Path, dict]:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise EmberError(f"{path} not found: a model folder needs config.json next to the weights")
    try:
        return path, json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EmberError(f"{path} is not valid JSON ({e})") from None


def _parse_config(path: Path, raw) -> ModelConfig:
    try:
        return config_from_hf(raw)
    except EmberError as e:
        raise EmberError(f"{path}: {str(e).removeprefix('config.json: ')}") from None


def read_config(folder: str | os.PathLike) -> ModelConfig:
    """ModelConfig from ``folder/config.json``."""
    return _parse_config(*_read_config_json(folder))


@dataclass
class CheckpointIndex:
    """Where every tensor of a safetensors checkpoint lives, from the file headers only."""

    folder: Path
    files: list[Path] = field(default_factory=list)
    key_file: dict[str, Path] = field(default_factory=dict)
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    dtypes: dict[str, torch.dtype] = field(default_factory=dict)

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
        return {split_bnb_key(k)[0] for k in self.key_file if k.endswith("." + QS_SUFFIX)}


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


def scan_checkpoint(folder: str | os.PathLike, *, quantized: bool = False) -> CheckpointIndex:
    """Find the safetensors files of an HF folder and read their headers (no tensor data).

    ``quantized``: the folder is a bitsandbytes 4-bit checkpoint, so uint8 tensors (packed
    weights, absmax, quant states) are expected too."""
    allowed = {**_ST_DTYPES, "U8": torch.uint8} if quantized else _ST_DTYPES
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
                    ckpt.key_file[key] = path
                    ckpt.shapes[key] = tuple(sl.get_shape())
                    ckpt.dtypes[key] = allowed[st_dtype]
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


def _read_quant_state(f, key: str, path: Path) -> dict:
    try:
        meta = json.loads(bytes(f.get_tensor(key).tolist()).decode("utf-8"))
        shape = tuple(int(n) for n in meta["shape"])
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise EmberError(
            f"{path}: tensor {key} is not a readable bitsandbytes quant state "
            f"({type(e).__name__}: {e})"
        ) from None
    if meta.get("quant_type") != "nf4":
        raise EmberError(
            f"{path}: tensor {key} has quant_type {meta.get('quant_type')!r}; only NF4 4-bit "
            "weights load"
        )
    return {**meta, "shape": shape}


def _bnb_dense_shapes(ckpt: CheckpointIndex) -> dict[str, tuple[int, ...]]:
    """HF key -> the shape of the dense weight it stands for: a 4-bit weight's comes from its
    JSON quant state (a few hundred bytes, read now so that every key and shape is validated
    before the first weight is loaded); its absmax/quant_map/... entries are not weights."""
    quantized = ckpt.quantized_weights()
    shapes, orphans = {}, []
    for key, shape in ckpt.shapes.items():
        base, suffix = split_bnb_key(key)
        if base in quantized:
            continue
        if suffix:
            orphans.append(key)
        elif ckpt.dtypes[key] == torch.uint8:
            raise EmberError(
                f"{ckpt.key_file[key]}: tensor {key} is uint8 but has no "
                f"{key}.{QS_SUFFIX}: not a bitsandbytes 4-bit weight"
            )
        else:
            shapes[key] = shape
    if orphans:
        raise EmberError(
            f"{ckpt.folder}: {', '.join(sorted(orphans)[:3])} belong to 4-bit "
            f"weights without a {QS_SUFFIX} entry (a missing shard?)"
        )
    metas = {}
    for path in ckpt.files:
        with safe_open(path, framework="pt", device="cpu") as f:
            for base in quantized:
                qs_key = f"{base}.{QS_SUFFIX}"
                if ckpt.key_file[qs_key] == path:
                    metas[base] = _read_quant_state(f, qs_key, path)
    for base in sorted(quantized):
        if base not in ckpt.key_file:
            raise EmberError(
                f"{ckpt.folder}: the packed 4-bit weight {base} is missing (only "
                "its quant state is stored; a missing shard?)"
            )
        meta = metas[base]
        parts = ("absmax", "quant_map")
        if "nested_offset" in meta:
            parts += ("nested_absmax", "nested_quant_map")
        absent = [f"{base}.{p}" for p in parts if f"{base}.{p}" not in ckpt.key_file]
        if absent:
            raise EmberError(
                f"{ckpt.folder}: the 4-bit weight {base} lacks {', '.join(absent)} (a missing "
                "shard?)"
            )
        shapes[base] = meta["shape"]
    return shapes


def iter_bnb_checkpoint(
    folder: str | os.PathLike, cfg: ModelConfig | None = None, ckpt: CheckpointIndex | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(hf_key, tensor)`` for every tensor of a bitsandbytes 4-bit checkpoint, as stored
    (dense weights, packed NF4 weights and their ``.absmax`` / ``.quant_map`` / ... entries; the
    consumer is ``ember.models.nf4.load_bnb_quantized_``). Keys are HF's, since a bnb entry's name
    only maps through its weight's. Keys and dense shapes are validated against cfg first;
    packed weights stored in another dtype (``bnb_4bit_quant_storage``) come as their uint8 bytes.
    """
    cfg = cfg if cfg is not None else read_config(folder)
    ckpt = ckpt if ckpt is not None else scan_checkpoint(folder, quantized=True)
    mapping = map_hf_keys(_bnb_dense_shapes(ckpt), cfg, str(ckpt.folder))
    quantized = ckpt.quantized_weights()
    for path in ckpt.files:
        keys = [k for k, p in ckpt.key_file.items() if p == path and split_bnb_key(k)[0] in mapping]
        try:
            with safe_open(path, framework="pt", device="cpu") as f:
                for key in keys:
                    t = f.get_tensor(key)
                    if key in quantized and t.dtype != torch.uint8:
                        t = t.contiguous().view(torch.uint8).reshape(-1, 1)
                    yield key, t
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
    """A ``Transformer`` with the weights of an HF model folder (config.json + safetensors).

    A bitsandbytes NF4 checkpoint (``quantization_config`` in config.json) loads with its 4-bit
    weights as they are (``Linear4bit``), whatever ``quantize`` says."""
    folder = Path(folder)
    if not folder.is_dir():
        raise EmberError(f"model folder {folder} does not exist")
    if quantize not in (None, "nf4"):
        raise EmberError(f"quantize must be None or 'nf4', got {quantize!r}")
    path, raw = _read_config_json(folder)
    cfg = _parse_config(path, raw)
    prequantized = quantization_config_from_hf(raw) is not None
    ckpt = scan_checkpoint(folder, quantized=prequantized)
    stored = ckpt.stored_dtype()
    target = resolve_dtype(dtype) or stored
    cfg = cfg.replace(torch_dtype=_dtype_name(stored))
    with torch.device("meta"):
        model = Transformer(cfg)
    device = torch.device(device)
    if prequantized:
        _load_bnb_(model, folder, ckpt, device, target)
    elif quantize == "nf4":
        _load_nf4_(model, iter_checkpoint(folder, cfg, ckpt), device, target)
    else:
        _assign_(model, iter_checkpoint(folder, cfg, ckpt), device, target)
    return model


def _load_bnb_(
    model: Transformer,
    folder: Path,
    ckpt: CheckpointIndex,
    device: torch.device,
    dtype: torch.dtype,
) -> None:
    """A pre-quantized bitsandbytes checkpoint: NF4 weights stay NF4 (bit for bit); the rest is
    cast to dtype. Ember computes everything in dtype (bnb_4bit_compute_dtype is not used)."""
    if not ckpt.quantized_weights():
        raise EmberError(
            f"{folder}/config.json has a quantization_config but the safetensors "
            "hold no 4-bit weights; remove quantization_config to load it dense"
        )
    tensors = iter_bnb_checkpoint(folder, model.cfg, ckpt)
    load_bnb_quantized_(model, tensors, device=device, compute_dtype=dtype, rename=hf_key_to_ember)
    head = model.lm_head
    if isinstance(head, Linear4bit):
        # logits() and the fused loss read the head as a dense (V, D) matrix.
        model.lm_head = nn.Linear(
            head.in_features, head.out_features, bias=False, device=device, dtype=dtype
        )
        with torch.no_grad():
            model.lm_head.weight.copy_(head.quant_weight.dequantize(dtype))
    model.inv_freq = rope_inv_freq(model.cfg).to(device)


def _load_nf4_(model: Transformer, tensors, device: torch.device, dtype: torch.dtype) -> None:
    """Quantize-while-loading: ember.models.nf4 owns which weights become NF4 and how (looked up
    in sys.modules at call time, so a test can stand in for it)."""
    nf4 = importlib.import_module("ember.models.nf4")
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


def _materialize(v, dtype: torch.dtype) -> torch.Tensor:
    if isinstance(v, NF4Weight):  # save_pretrained(dequantize=True): one weight at a time
        return v.dequantize(dtype).to("cpu").contiguous()
    return v.detach().to("cpu", dtype).contiguous()


def _bnb_config(hf: dict, dense: list[str], cfg: ModelConfig, dtype: torch.dtype) -> dict:
    """``quantization_config`` for a bnb 4-bit folder. transformers decides which linears to
    convert from the config alone: by default all but the output head, else all but
    ``llm_int8_skip_modules``, which therefore lists every linear Ember keeps dense."""
    keep = {
        k.removesuffix(".weight")
        for k in dense
        if k.endswith("_proj.weight") or k == "lm_head.weight"
    }
    if cfg.tie_word_embeddings:
        keep.add("lm_head")  # tied to the embedding, never quantized
    return bnb_quantization_config(
        dtype,
        double_quant=any(k.endswith(".nested_absmax") for k in hf),
        skip_modules=None if keep == {"lm_head"} else sorted(keep),
    )


def _write_folder(
    sd: dict, cfg: ModelConfig, tmp: Path, tokenizer, dtype: torch.dtype | None, limit: int
) -> None:
    if any(".lora_" in k or ".base." in k for k in sd):
        raise EmberError(
            "save_pretrained: the model has LoRA adapters; merge them first "
            "(ember.models.lora.merge_lora) or save the adapter alone (save_adapter)"
        )
    hf = to_hf_state_dict(sd, cfg)
    quantized = {split_bnb_key(k)[0] for k in hf if k.endswith("." + QS_SUFFIX)}
    # dtype casts the dense tensors; 4-bit data and its statistics are written bit for bit.
    dense = [k for k in hf if split_bnb_key(k)[0] not in quantized]
    dtypes = {k: v.dtype for k, v in hf.items()}
    dtypes.update({k: dtype or hf[k].dtype for k in dense})
    saved_dtype = Counter(dtypes[k] for k in dense).most_common(1)[0][0]
    sizes = {k: v.numel() * dtypes[k].itemsize for k, v in hf.items()}
    shards = _plan_shards(sizes, limit)
    names = (
        [SINGLE_FILE]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    for name, keys in zip(names, shards, strict=True):
        # Cast and copy one shard at a time so saving a GPU model needs one shard of host memory.
        tensors, seen = {}, set()
        for k in keys:
            t = _materialize(hf[k], dtypes[k])
            # NF4 layers share one quant_map tensor; safetensors refuses aliased tensors.
            ptr = t.untyped_storage().data_ptr()
            tensors[k] = t.clone() if ptr in seen else t
            seen.add(ptr)
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
    config = config_to_hf(cfg, saved_dtype)
    if quantized:
        config["quantization_config"] = _bnb_config(hf, dense, cfg, saved_dtype)
    _write_json(tmp / "config.json", config)
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
    dequantize: bool = False,
) -> Path:
    """Write an HF folder (config.json + safetensors, sharded above ``max_shard_size``) that
    ``transformers.AutoModelForCausalLM.from_pretrained(out_dir)`` loads unchanged.

    ``dtype`` (default: as they are) is the dtype of the written dense tensors. A model with NF4
    layers (``Linear4bit``: loaded with ``quantize="nf4"``, from a bitsandbytes checkpoint, or
    after ``quantize_model_``) is written in bitsandbytes' 4-bit format, which transformers loads
    with bitsandbytes installed (``quantization_config`` in config.json; the 4-bit data is never
    cast). ``dequantize=True`` writes a plain model instead: each NF4 weight dequantized, one at a
    time, to ``dtype`` (default: the dtype it was quantized from), e.g. the base for PEFT adapters
    trained with QLoRA. A model with LoRA adapters is refused: ``merge_lora`` it first, or save
    the adapter alone (``save_adapter``).

    The folder appears atomically: everything is written to a temporary sibling and renamed into
    place. An existing ``out_dir`` is replaced only if it holds nothing but model-folder files
    (config, weights, tokenizer), so unrelated files are never deleted."""
    model = getattr(model, "_orig_mod", model)  # torch.compile wrapper
    if not isinstance(model, Transformer):
        raise EmberError(
            f"save_pretrained expects an ember Transformer, got {type(model).__name__}"
        )
    sd = model.state_dict()
    if dequantize:
        sd = _with_nf4_weights(model, sd)
    return save_state_dict(
        sd,
        model.cfg,
        out_dir,
        tokenizer,
        dtype=dtype,
        max_shard_size=max_shard_size,
    )


def _with_nf4_weights(model: nn.Module, sd: dict) -> dict:
    """sd with each Linear4bit's bnb entries replaced by its NF4Weight, dequantized on write."""
    nf4 = {
        f"{n}.weight": m.quant_weight for n, m in model.named_modules() if isinstance(m, Linear4bit)
    }
    out = {}
    for k, v in sd.items():
        base = split_bnb_key(k)[0]
        if base not in nf4:
            out[k] = v
        elif k == base:
            out[k] = nf4[base]
    return out


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
    ``torch.distributed.checkpoint.state_dict.get_model_state_dict(..., full_state_dict=True)``);
    bitsandbytes entries of NF4 layers are written in bnb's format, as by ``save_pretrained``."""
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
