"""One NF4 weight's bytes as one flat tensor (``Linear4bit``'s flat-storage mode).

A quantized weight is several tensors (packed codes; absmax, uint8 with double quantization plus
its fp32 ``nested_absmax``; the 16-value NF4 code and the 256-value nested code) and a few
Python values (shape, dtype, blocksize, the nested offset). ``pack_nf4`` lays the tensors' bytes
end to end in one 1-D tensor, each part at a 16-byte aligned offset (so that every part can be
viewed as its dtype, and the kernels' word loads stay aligned), the total padded to a multiple of
16 bytes; the layout (offsets, dtypes, shapes, the Python values) is an ``NF4Layout``, a small
picklable value. ``unpack_nf4`` gives the ``NF4Weight`` back as views of that tensor, no copy.

The flat tensor is ``STORAGE_DTYPE`` (bf16), not uint8, so that a data-parallel wrapper treats it
like the model's other parameters: a mixed-precision policy that casts parameters to bf16 leaves
a bf16 one as it is (no cast: the bytes arrive unchanged), and nothing reads its values as
numbers (Answer.AI's FSDP-QLoRA stores bitsandbytes' weights as ``quant_storage=bf16`` for the
same reason).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ember.kernels.nf4 import NF4State, NF4Weight

STORAGE_DTYPE = torch.bfloat16
ALIGN = 16  # bytes


@dataclass(frozen=True)
class NF4Layout:
    """Where one NF4 weight's tensors lie in its flat storage, and the rest of its state."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    blocksize: int
    offset: float | None
    nested_blocksize: int
    parts: tuple[tuple[str, torch.dtype, tuple[int, ...], int], ...]  # (field, dtype, shape, at)
    nbytes: int
    quant_type: str = "nf4"

    @property
    def numel(self) -> int:
        """Elements of the flat storage tensor (``STORAGE_DTYPE``)."""
        return self.nbytes // STORAGE_DTYPE.itemsize


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def _tensors(w: NF4Weight) -> dict[str, torch.Tensor]:
    st = w.state
    out = {"packed": w.packed, "absmax": st.absmax, "code": st.code,
           "nested_absmax": st.nested_absmax, "nested_code": st.nested_code}
    return {k: v for k, v in out.items() if v is not None}


def nf4_layout(w: NF4Weight) -> NF4Layout:
    """The layout ``pack_nf4`` gives ``w`` (no bytes are touched: works on the meta device)."""
    parts, at = [], 0
    for name, t in _tensors(w).items():
        parts.append((name, t.dtype, tuple(t.shape), at))
        at = _align(at + t.numel() * t.dtype.itemsize)
    st = w.state
    return NF4Layout(tuple(st.shape), st.dtype, st.blocksize, st.offset_value, st.nested_blocksize,
                     tuple(parts), max(at, ALIGN), st.quant_type)


def pack_nf4(w: NF4Weight) -> tuple[torch.Tensor, NF4Layout]:
    """(1-D ``STORAGE_DTYPE`` tensor holding all of ``w``'s bytes, its layout), on w's device;
    the padding bytes are zero."""
    layout = nf4_layout(w)
    flat = torch.zeros(layout.nbytes, dtype=torch.uint8, device=w.device)
    for (_, _, _, at), t in zip(layout.parts, _tensors(w).values(), strict=True):
        b = t.detach().contiguous().reshape(-1).view(torch.uint8)
        flat[at:at + b.numel()] = b
    return flat.view(STORAGE_DTYPE), layout


def unpack_nf4(storage: torch.Tensor, layout: NF4Layout) -> NF4Weight:
    """The ``NF4Weight`` whose bytes ``storage`` holds, as views of it (no copy)."""
    if storage.dim() != 1 or storage.numel() * storage.element_size() != layout.nbytes:
        raise ValueError(f"unpack_nf4: the storage has {storage.numel()} x "
                         f"{storage.element_size()} bytes, the layout {layout.nbytes}")
    b = storage.detach().view(torch.uint8)
    t = {name: b[at:at + math.prod(shape) * dtype.itemsize].view(dtype).reshape(shape)
         for name, dtype, shape, at in layout.parts}
    state = NF4State(absmax=t["absmax"], shape=torch.Size(layout.shape), dtype=layout.dtype,
                     blocksize=layout.blocksize, code=t["code"], offset=layout.offset,
                     nested_absmax=t.get("nested_absmax"), nested_code=t.get("nested_code"),
                     nested_blocksize=layout.nested_blocksize, quant_type=layout.quant_type)
    return NF4Weight(t["packed"], state)
