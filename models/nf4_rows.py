"""Row blocks of an ``NF4Weight``: splitting a stacked (fused) weight into its parts' rows, and
stacking parts back, without re-quantizing (bitsandbytes quantizes Phi-3's fused q/k/v and
gate/up as one weight), and telling when a cut falls inside a 4-bit block. Re-exported by
``ember.models.nf4``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch

from ember import EmberError
from ember.kernels.nf4 import NF4Weight, _absmax_ref


# ---------------------------------------------------------------------------- NF4 row blocks
def rows_straddle_blocks(rows: Sequence[int], k: int, blocksize: int) -> bool:
    """True when cutting a (sum(rows), k) weight into ``rows`` falls inside a 4-bit block (a
    width k times a part's rows not a multiple of blocksize: tiny or odd Phi-3 configs). Such a
    part is no NF4 weight of its own: ``split_nf4_rows`` refuses it, and loaders keep it dense
    (``dequantize_nf4_rows``), bnb's dequantized rows."""
    at = 0
    for r in rows[:-1]:
        at += r
        if at * k % blocksize:
            return True
    return False


def dequantize_nf4_rows(w: NF4Weight, rows: Sequence[int]) -> list[torch.Tensor]:
    """A 2D NF4 weight dequantized (in its own dtype, as bitsandbytes does) and cut into row
    blocks: the dense parts of a fused weight whose cuts straddle 4-bit blocks."""
    return [t.clone() for t in w.dequantize().split(list(rows))]


def split_nf4_rows(w: NF4Weight, rows: Sequence[int], key: str) -> list[NF4Weight]:
    """A 2D NF4 weight cut into row blocks (Phi-3's fused qkv_proj / gate_up_proj), each part
    dequantizing to exactly the whole's rows. The cuts must fall between 4-bit blocks; a nested
    absmax is sliced where the cuts also fall between its 256-value blocks (real model sizes),
    else each part keeps the fp32 absmax it dequantizes to (bit-identical weights)."""
    st = w.state
    k = st.shape[1] if len(st.shape) == 2 else 0
    cuts = [0]
    for r in rows:
        cuts.append(cuts[-1] + r)
    if len(st.shape) != 2 or cuts[-1] != st.shape[0]:
        raise EmberError(f"{key}: NF4 weight of shape {tuple(st.shape)} cannot be cut into "
                         f"{list(rows)} rows")
    bs, nbs = st.blocksize, st.nested_blocksize
    if any(c * k % bs for c in cuts[1:-1]):
        raise EmberError(f"{key}: its 4-bit blocks of {bs} values straddle the parts (rows "
                         f"{cuts[1:-1]} of {k} values); load the unquantized model with "
                         "quantize='nf4'")
    sliced = not st.nested or all(c * k // bs % nbs == 0 for c in cuts[1:-1])
    absmax = st.absmax if sliced else _absmax_ref(st)
    flat = w.packed.reshape(-1)
    parts = []
    for a, b in zip(cuts[:-1], cuts[1:], strict=False):
        ba, bb = a * k // bs, -(-b * k // bs)
        part = replace(st, shape=torch.Size((b - a, k)), absmax=absmax[ba:bb].clone())
        if st.nested and sliced:
            part = replace(part, nested_absmax=st.nested_absmax[ba // nbs:-(-bb // nbs)].clone())
        elif st.nested:
            part = replace(part, offset=None, nested_absmax=None, nested_code=None)
        parts.append(NF4Weight(flat[a * k // 2:(b * k + 1) // 2].clone().reshape(-1, 1), part))
    return parts


def cat_nf4_rows(ws: Sequence[NF4Weight], key: str) -> NF4Weight:
    """The inverse of ``split_nf4_rows``: row blocks stacked into one NF4 weight, exactly (the
    parts' 4-bit blocks and double-quantization statistics must line up as one weight's would:
    parts quantized one by one with double quantization have their own offsets)."""
    st = ws[0].state
    k, bs, nbs = st.shape[-1], st.blocksize, st.nested_blocksize
    if any(len(w.shape) != 2 or w.shape[1] != k or w.blocksize != bs or w.dtype != st.dtype
           or w.state.quant_type != st.quant_type for w in ws):
        raise EmberError(f"{key}: its NF4 parts differ in width, blocksize, dtype or quant_type "
                         f"({[tuple(w.shape) for w in ws]}); save with dequantize=True")
    if any(w.numel() % bs for w in ws[:-1]):
        raise EmberError(f"{key}: its 4-bit blocks of {bs} values would straddle the parts; "
                         "save with dequantize=True")
    if not any(w.state.nested for w in ws):
        state = replace(st, absmax=torch.cat([w.state.absmax for w in ws]))
    elif (all(w.state.nested and w.state.offset_value == st.offset_value and
              w.state.nested_blocksize == nbs and torch.equal(w.state.nested_code, st.nested_code)
              for w in ws) and all(w.state.absmax.numel() % nbs == 0 for w in ws[:-1])):
        state = replace(st, absmax=torch.cat([w.state.absmax for w in ws]),
                        nested_absmax=torch.cat([w.state.nested_absmax for w in ws]))
    else:
        raise EmberError(f"{key}: its parts were quantized one by one (each with its own "
                         "double-quantization statistics), so bitsandbytes' fused weight would "
                         "need re-quantizing; save with dequantize=True")
    shape = torch.Size((sum(w.shape[0] for w in ws), k))
    packed = torch.cat([w.packed.reshape(-1) for w in ws]).reshape(-1, 1)
    return NF4Weight(packed, replace(state, shape=shape))
