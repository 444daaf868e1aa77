"""Tensors made only when written: how a converter streams a model to disk.

A state dict handed to ``save_state_dict`` may hold, besides tensors, objects with a ``shape`` and
a ``dtype`` whose values are produced one at a time by the shard writer: ``NF4Weight`` (dequantized
on save) and ``Deferred`` (any function, e.g. a GGUF tensor dequantized from the memory-mapped
file). Key mapping, shape checks and shard planning read only the shape, so writing a model needs
one shard of memory, not the whole model.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from ember.kernels.nf4 import NF4Weight


class Deferred:
    """A tensor of known ``shape`` and ``dtype`` whose values ``fn()`` makes when needed."""

    def __init__(self, shape: Sequence[int], dtype: torch.dtype,
                 fn: Callable[[], torch.Tensor]) -> None:
        self.shape = torch.Size(shape)
        self.dtype = dtype
        self._fn = fn

    def numel(self) -> int:
        return math.prod(self.shape)

    def load(self) -> torch.Tensor:
        t = self._fn()
        if t.shape != self.shape:  # a converter bug, not a user error
            raise RuntimeError(f"deferred tensor made shape {tuple(t.shape)}, promised "
                               f"{tuple(self.shape)}")
        return t.to(self.dtype)

    @staticmethod
    def cat(parts: Sequence, dtype: torch.dtype | None = None) -> Deferred:
        """Rows of ``parts`` (tensors, ``NF4Weight`` or ``Deferred``) concatenated when needed,
        in ``dtype`` (default: the first part's)."""
        dtype = dtype or parts[0].dtype
        rows = sum(p.shape[0] for p in parts)
        return Deferred((rows, *parts[0].shape[1:]), dtype,
                        lambda: torch.cat([materialize(p, dtype) for p in parts]))


def materialize(v, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The CPU tensor for a state-dict value (a tensor, ``NF4Weight`` or ``Deferred``) in
    ``dtype`` (default: its own), contiguous."""
    dtype = dtype or v.dtype
    if isinstance(v, NF4Weight):
        return v.dequantize(dtype).to("cpu").contiguous()
    if isinstance(v, Deferred):
        return v.load().to("cpu", dtype).contiguous()
    return v.detach().to("cpu", dtype).contiguous()
