"""GGUF reader: ``GGUFFile``, the header (metadata key/values, tensor table) of a llama.cpp model
file parsed with ``struct`` over a read-only memory map, a split model's files joined (gguf-split),
and each tensor's bytes or fp32 values (``ember.models.gguf_dequant``); ``TensorInfo``, one row of
the tensor table. The file format is described in ``ember.models.gguf``, which turns what is read
here into an Ember config and state dict.
"""

from __future__ import annotations

import math
import mmap
import struct
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from ember import EmberError
from ember.models.gguf_dequant import dequantize
from ember.models.hub import SPLIT_NAME, split_paths

Q = GGMLQuantizationType

# ------------------------------------------------------------------------------------------
# Reader


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # torch order: (rows, cols) for a matrix
    qtype: int
    offset: int  # absolute byte offset in the file
    nbytes: int
    shard: int = 0  # the file holding it, for a model split in several (gguf-split)


_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q",
            11: "<q", 12: "<d"}
_NP = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32, 6: np.float32,
       7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}
_STRING, _ARRAY = 8, 9


class GGUFFile:
    """A parsed GGUF header (``metadata``, ``tensors``) over a read-only memory map of the file;
    for a split model's first file, of all its files (their tensors joined, as llama.cpp
    loads them)."""

    def __init__(self, path: str | Path, *, _shard: bool = False):
        self.path = Path(path)
        if not self.path.is_file():
            raise EmberError(f"GGUF file not found: {self.path}")
        with open(self.path, "rb") as f:
            size = self.path.stat().st_size
            if size < 24:
                raise EmberError(f"{self.path}: not a GGUF file ({size} bytes)")
            self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self._maps = [self._mm]
        try:
            self._parse()
            if not _shard:
                self._join_splits()
        except (struct.error, UnicodeDecodeError, IndexError, OverflowError, MemoryError) as e:
            self.close()
            raise EmberError(f"{self.path}: truncated or corrupt GGUF header ({e}); re-download "
                             "or re-export the file") from None
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> GGUFFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for mm in self._maps:
            mm.close()
        self._maps, self._mm = [], None

    def _join_splits(self) -> None:
        count = int(self.metadata.get("split.count") or 1)
        if count <= 1:
            return
        no, m = int(self.metadata.get("split.no", 0)), SPLIT_NAME.search(self.path.name)
        if no != 0 or m is None or int(m.group(2)) != count:
            raise EmberError(f"{self.path}: file {no + 1} of a model split in {count} (llama.cpp's "
                             f"gguf-split); open the first, named <prefix>-00001-of-{count:05d}"
                             ".gguf, with the others beside it")
        for i, p in enumerate(split_paths(self.path)[1:], start=1):
            if not p.is_file():
                raise EmberError(f"{self.path}: the model is split in {count} files and "
                                 f"{p.name} is missing; put all of them in one folder")
            shard = GGUFFile(p, _shard=True)
            self._maps.append(shard._mm)  # closed with this file's
            if (int(shard.metadata.get("split.no", -1)), shard.metadata.get("split.count")) != (
                    i, count):
                raise EmberError(f"{p}: split.no / split.count are "
                                 f"{shard.metadata.get('split.no')} / "
                                 f"{shard.metadata.get('split.count')}, expected {i} / {count}")
            for name, t in shard.tensors.items():
                if name in self.tensors:
                    raise EmberError(f"{p}: tensor {name!r} is also in another file of the split")
                self.tensors[name] = replace(t, shard=len(self._maps) - 1)
        want = self.metadata.get("split.tensors.count")
        if want is not None and int(want) != len(self.tensors):
            raise EmberError(f"{self.path}: split.tensors.count is {want} but the {count} files "
                             f"hold {len(self.tensors)} tensors")

    def _take(self, fmt: str):
        (v,) = struct.unpack_from(fmt, self._mm, self._pos)
        self._pos += struct.calcsize(fmt)
        return v

    def _str(self) -> str:
        n = self._take("<Q")
        end = self._pos + n
        if end > len(self._mm):
            raise struct.error(f"string of {n} bytes runs past the end of the file")
        s = self._mm[self._pos:end].decode("utf-8", self._errors)
        self._pos = end
        return s

    def _text_value(self, key: str, vtype: int) -> Any:
        """``_value``; a string that is not UTF-8 (llama.cpp keeps the bytes, gguf.GGUFReader
        and transformers fail) is refused in the tokenizer's keys, whose text must match, and
        elsewhere (names, descriptions, tags) read with U+FFFD in place of the bad bytes."""
        start = self._pos
        try:
            return self._value(vtype)
        except UnicodeDecodeError as e:
            if key.startswith("tokenizer."):
                raise EmberError(f"{self.path}: metadata key {key!r} holds bytes that are not "
                                 f"UTF-8 text ({e.reason} at {e.object[e.start:e.end]!r}); the "
                                 "vocabulary cannot be read: convert the model again from its "
                                 "Hugging Face tokenizer") from None
        warnings.warn(f"{self.path}: metadata key {key!r} holds bytes that are not UTF-8; read "
                      "with U+FFFD in their place", stacklevel=4)
        self._pos, self._errors = start, "replace"
        try:
            return self._value(vtype)
        finally:
            self._errors = "strict"

    def _value(self, vtype: int) -> Any:
        if vtype in _SCALARS:
            return self._take(_SCALARS[vtype])
        if vtype == _STRING:
            return self._str()
        if vtype == _ARRAY:
            etype, n = self._take("<I"), self._take("<Q")
            if etype == _STRING:
                return [self._str() for _ in range(n)]
            if etype in _NP:
                dt = np.dtype(_NP[etype])
                end = self._pos + n * dt.itemsize
                if end > len(self._mm):
                    raise struct.error(f"array of {n} values runs past the end of the file")
                arr = np.frombuffer(self._mm, dtype=dt, count=n, offset=self._pos).tolist()
                self._pos = end
                return arr
            return [self._value(etype) for _ in range(n)]  # arrays of arrays: rare, small
        raise struct.error(f"unknown metadata value type {vtype}")

    def _parse(self) -> None:
        self._pos, self._errors = 0, "strict"
        if self._mm[:4] != b"GGUF":
            raise EmberError(f"{self.path}: not a GGUF file (magic {bytes(self._mm[:4])!r})")
        self._pos = 4
        version = self._take("<I")
        if version > 0xFFFF and struct.unpack(">I", struct.pack("<I", version))[0] in (2, 3):
            raise EmberError(f"{self.path}: a big-endian GGUF file (written for s390x); Ember "
                             "reads little-endian ones: convert it with the gguf package's "
                             "command: gguf-convert-endian FILE little")
        if version not in (2, 3):  # v1: another layout; later ones: unknown (llama.cpp refuses)
            raise EmberError(f"{self.path}: GGUF version {version} is not supported (v2/v3 "
                             "little-endian only; re-export with a current llama.cpp, or "
                             "update Ember for a newer format)")
        n_tensors, n_kv = self._take("<Q"), self._take("<Q")
        self.version = version
        self.metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = self._str()
            if key in self.metadata:  # llama.cpp and gguf.GGUFReader refuse such a file too
                raise EmberError(f"{self.path}: metadata key {key!r} appears twice; the file "
                                 "is corrupt (llama.cpp refuses it): convert the model again")
            self.metadata[key] = self._text_value(key, self._take("<I"))
        infos, names = [], set()
        for _ in range(n_tensors):
            name = self._str()
            if name in names:
                raise EmberError(f"{self.path}: tensor {name!r} appears twice in the tensor "
                                 "table; the file is corrupt (llama.cpp refuses it): convert "
                                 "the model again")
            names.add(name)
            dims = [self._take("<Q") for _ in range(self._take("<I"))]
            infos.append((name, dims, self._take("<I"), self._take("<Q")))
        align = self.metadata.get("general.alignment", 32)
        if not isinstance(align, int) or align <= 0 or align & (align - 1):
            raise EmberError(f"{self.path}: general.alignment {align!r} is not a positive "
                             "power of two")
        data_start = -(-self._pos // align) * align
        self.tensors: dict[str, TensorInfo] = {}
        for name, dims, qtype, offset in infos:
            try:
                block, type_size = GGML_QUANT_SIZES[Q(qtype)]
            except (ValueError, KeyError):
                raise EmberError(f"{self.path}: tensor {name!r} has unknown ggml type {qtype}; "
                                 "the file needs a newer gguf package") from None
            n = math.prod(dims)
            if dims and dims[0] % block:
                raise EmberError(f"{self.path}: tensor {name!r} row length {dims[0]} is not a "
                                 f"multiple of the {Q(qtype).name} block size {block}")
            info = TensorInfo(name, tuple(reversed(dims)), qtype, data_start + offset,
                              n // block * type_size)
            if info.offset + info.nbytes > len(self._mm):
                raise EmberError(f"{self.path}: truncated file: tensor {name!r} needs bytes up to "
                                 f"{info.offset + info.nbytes}, file has {len(self._mm)}")
            self.tensors[name] = info

    def raw(self, name: str) -> torch.Tensor:
        """The tensor's bytes as a uint8 torch tensor (a copy, so the map can be closed)."""
        t = self.tensors[name]
        mm = self._maps[t.shard]
        return torch.from_numpy(np.frombuffer(mm, np.uint8, t.nbytes, t.offset).copy())

    def tensor(self, name: str) -> torch.Tensor:
        """The tensor dequantized to fp32, in torch shape."""
        t = self.tensors[name]
        try:
            return dequantize(self.raw(name), t.qtype, t.shape)
        except EmberError as e:
            raise EmberError(f"{self.path}: tensor {name!r}: {e}") from None
