"""The weights files of an HF folder, one at a time: their names (``SINGLE_FILE``, ``INDEX_FILE``,
transformers' ``pytorch_model.bin`` and its index), opening one for reading (``open_weights``:
safetensors' ``safe_open``, or a ``pytorch_model*.bin`` behind the same interface, read with
``torch.load(weights_only=True)``) and ``lfs_pointer`` (a Git LFS pointer in place of a file).
The folder's index of them is ``ember.models.safetensors_io``.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors import safe_open

from ember import EmberError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# PyTorch checkpoints as transformers names them: read with torch.load(weights_only=True)
TORCH_FILE = "pytorch_model.bin"
TORCH_INDEX_FILE = "pytorch_model.bin.index.json"
_ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


_DTYPE_NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                torch.uint8: "U8", torch.int8: "I8", torch.float64: "F64", torch.int32: "I32",
                torch.int64: "I64", torch.bool: "BOOL"}


class _TorchSlice:
    def __init__(self, t: torch.Tensor):
        self.t = t

    def get_dtype(self) -> str:
        return _DTYPE_NAMES.get(self.t.dtype, str(self.t.dtype).removeprefix("torch."))

    def get_shape(self) -> list[int]:
        return list(self.t.shape)


class _TorchFile:
    """A ``pytorch_model*.bin`` behind safetensors' ``safe_open`` interface. It is read with
    ``torch.load(weights_only=True)``: PyTorch's restricted unpickler, which builds tensors and
    plain containers only and refuses anything else (no code runs), memory-mapped when the file
    allows it."""

    def __init__(self, path: Path):
        try:
            try:
                sd = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
            except RuntimeError:  # the pre-1.6 (non-zip) format cannot be memory-mapped
                sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # the restricted unpickler's refusals, truncated files
            pointer = lfs_pointer(path, "the weights")
            if pointer:
                raise EmberError(f"{path} is not readable: {pointer}") from None
            raise EmberError(f"{path} is not a plain PyTorch tensor checkpoint "
                             f"(torch.load(weights_only=True) refused it: {type(e).__name__}: "
                             f"{str(e)[:200]}); convert it to safetensors with a tool you trust"
                             ) from None
        if not isinstance(sd, dict) or not all(
                isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()):
            raise EmberError(f"{path} does not hold a state dict (name -> tensor)")
        self.sd = sd

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> bool:
        return False

    def keys(self) -> list[str]:
        return list(self.sd)

    def get_tensor(self, key: str) -> torch.Tensor:
        return self.sd[key]

    def get_slice(self, key: str) -> _TorchSlice:
        return _TorchSlice(self.sd[key])


def open_weights(path: Path):
    """A weights file opened for reading: safetensors (``safe_open``), or a transformers
    ``pytorch_model*.bin`` (``torch.load(weights_only=True)``)."""
    if Path(path).suffix == ".bin":
        return _TorchFile(Path(path))
    return safe_open(path, framework="pt", device="cpu")


def lfs_pointer(path: str | os.PathLike, what: str) -> str | None:
    """If ``path`` is a Git LFS pointer file (a repository cloned without git-lfs), the reason
    to give for it (``what`` it stands in for: "the weights", "the tokenizer"); else None."""
    try:
        with open(path, "rb") as f:
            head = f.read(64)
    except OSError:
        return None
    if not head.startswith(b"version https://git-lfs"):
        return None
    return (f"it is a Git LFS pointer, not {what} (the repository was cloned without "
            "git-lfs): run 'git lfs install && git lfs pull' in the folder")
