"""Reading a DCP checkpoint without running code from it.

torch's ``FileSystemReader`` reads a checkpoint's ``.metadata`` with a plain ``pickle.load`` and
its non-tensor items (optimizer hyperparameters, Ember's extra state) with
``torch.load(weights_only=False)``: a crafted run folder would run code on ``--resume``,
``ember eval RUN`` or ``ember export RUN``. Inside ``safe_unpickling()`` both are restricted:

- ``.metadata`` with ``MetadataUnpickler``: only the DCP metadata records (the dataclasses and
  enums of ``torch.distributed.checkpoint.*``), ``torch.Size``, torch dtypes and layouts, and
  ``pathlib`` paths (the checkpoint id) may be named; anything else is refused naming it;
- every ``torch.load`` is ``weights_only=True`` (tensors and plain Python values, which is all
  Ember writes).

A refused file is an ``EmberError`` naming the file and what it asked for. The patches are
module attributes replaced for the duration of the block (the reader looks both up at call
time), in torch 2.4 to 2.14 alike.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import io
import pathlib
import pickle
import threading
import types

import torch

from ember import EmberError

_PATHS = {"PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath", "Path"}


class MetadataUnpickler(pickle.Unpickler):
    """A pickle reader that names only DCP's metadata records (see the module docstring)."""

    def find_class(self, module: str, name: str):
        if module == "torch" and name == "Size":
            return torch.Size
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if module == "torch.serialization" and name == "_get_layout":
            return _layout
        if module == "pathlib" and name in _PATHS:
            return getattr(pathlib, name)
        if module == "collections" and name == "OrderedDict":
            import collections

            return collections.OrderedDict
        if module.startswith("torch.distributed.checkpoint") and "." not in name:
            # (a dotted name walks attributes: "torch.x.SomeDataclass" reached any dataclass)
            obj = super().find_class(module, name)
            if isinstance(obj, type) and obj.__module__.startswith(
                    "torch.distributed.checkpoint") and (dataclasses.is_dataclass(obj)
                                                         or issubclass(obj, enum.Enum)):
                return obj
        raise pickle.UnpicklingError(f"{module}.{name} is not a checkpoint metadata record")


def _layout(name: str) -> torch.layout:
    """torch.serialization._get_layout's job without its lookup of any torch attribute."""
    layout = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(layout, torch.layout):
        raise pickle.UnpicklingError(f"{name!r} is not a torch layout")
    return layout


def _load_metadata(file) -> object:
    try:
        return MetadataUnpickler(file).load()
    except (pickle.UnpicklingError, EOFError, AttributeError, TypeError, ValueError,
            ImportError, IndexError, KeyError) as e:
        name = getattr(file, "name", "the checkpoint's .metadata")
        raise EmberError(f"{name}: not a checkpoint metadata file Ember reads ({e}); it may be "
                         "corrupt or crafted: resume from another checkpoint") from None


def _loads(data: bytes) -> object:
    return _load_metadata(io.BytesIO(data))


_PATCHING = threading.RLock()


@contextlib.contextmanager
def safe_unpickling():
    """Within the block, DCP reads ``.metadata`` and its items as described in the module
    docstring."""
    import torch.distributed.checkpoint.filesystem as fs

    shim = types.SimpleNamespace(**{k: getattr(pickle, k) for k in dir(pickle)
                                    if not k.startswith("__")})
    shim.load, shim.loads = _load_metadata, _loads

    def weights_only_load(*args, **kwargs):
        kwargs["weights_only"] = True
        try:
            return real_load(*args, **kwargs)
        except pickle.UnpicklingError as e:
            raise EmberError(f"a checkpoint item holds more than tensors and plain values "
                             f"({str(e).splitlines()[0]}); it may be corrupt or crafted: resume "
                             "from another checkpoint") from None

    with _PATCHING:  # one block at a time: two threads' patches never interleave
        real_pickle, real_load = getattr(fs, "pickle", pickle), torch.load
        fs.pickle, torch.load = shim, weights_only_load
        try:
            yield
        finally:
            fs.pickle, torch.load = real_pickle, real_load
