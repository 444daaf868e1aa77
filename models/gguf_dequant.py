"""GGUF tensor bytes -> fp32: vectorized torch ports of ggml's block formats (Q8_0, Q4_0, Q4_1,
Q5_0, Q5_1, Q2_K..Q6_K), bit-equal to ``gguf.quants``; the other types (IQ*, TQ*, MXFP4, ...)
through ``gguf.quants``' numpy reference. Used by ``ember.models.gguf`` (``GGUFFile.tensor``)."""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from ember import EmberError

Q = GGMLQuantizationType

# Each function takes blocks (n_blocks, type_size) uint8 and returns
# (n_blocks, block_size) fp32, in gguf.quants' operation order so results are bit-equal.


def _f16(b: torch.Tensor, lo: int) -> torch.Tensor:
    return b[:, lo:lo + 2].contiguous().view(torch.float16).float()  # (n, 1)


def _shifts(*s: int, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.tensor(s, dtype=torch.uint8).reshape(shape)


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """(n, 16) packed bytes -> (n, 32): low nibbles first, then high nibbles (ggml's order)."""
    return torch.cat([qs & 0x0F, qs >> 4], dim=1)


def _bits32(qh: torch.Tensor) -> torch.Tensor:
    """(n, 4) little-endian uint32 -> (n, 32) bits, bit j of the word at column j."""
    return ((qh[:, :, None] >> _shifts(*range(8), shape=(1, 1, 8))) & 1).reshape(-1, 32)


def _q8_0(b):
    return b[:, 2:].contiguous().view(torch.int8).float() * _f16(b, 0)


def _q4_0(b):
    return _f16(b, 0) * (_nibbles(b[:, 2:]).float() - 8)


def _q4_1(b):
    return _f16(b, 0) * _nibbles(b[:, 4:]).float() + _f16(b, 2)


def _q5_0(b):
    q = _nibbles(b[:, 6:]) | (_bits32(b[:, 2:6]) << 4)
    return _f16(b, 0) * (q.float() - 16)


def _q5_1(b):
    q = _nibbles(b[:, 8:]) | (_bits32(b[:, 4:8]) << 4)
    return _f16(b, 0) * q.float() + _f16(b, 2)


def _k_scale_min(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K: 12 bytes -> eight 6-bit scales and eight 6-bit mins."""
    s = scales.reshape(-1, 3, 4)
    d, m, md = s[:, 0], s[:, 1], s[:, 2]
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc, mn  # (n, 8) each


def _q4_k(b):
    n = b.shape[0]
    sc, mn = _k_scale_min(b[:, 4:16])
    d = (_f16(b, 0) * sc.float()).reshape(n, 8, 1)
    dm = (_f16(b, 2) * mn.float()).reshape(n, 8, 1)
    q = (b[:, 16:].reshape(n, 4, 1, 32) >> _shifts(0, 4, shape=(1, 1, 2, 1))) & 0x0F
    return (d * q.reshape(n, 8, 32).float() - dm).reshape(n, 256)


def _q5_k(b):
    n = b.shape[0]
    sc, mn = _k_scale_min(b[:, 4:16])
    d = (_f16(b, 0) * sc.float()).reshape(n, 8, 1)
    dm = (_f16(b, 2) * mn.float()).reshape(n, 8, 1)
    ql = ((b[:, 48:].reshape(n, 4, 1, 32) >> _shifts(0, 4, shape=(1, 1, 2, 1))) & 0x0F)
    qh = ((b[:, 16:48].reshape(n, 1, 1, 32) >> _shifts(*range(8), shape=(1, 1, 8, 1))) & 1)
    q = ql.reshape(n, 8, 32) | (qh.reshape(n, 8, 32) << 4)
    return (d * q.float() - dm).reshape(n, 256)


def _q6_k(b):
    n = b.shape[0]
    scales = b[:, 192:208].contiguous().view(torch.int8).float()
    d = (_f16(b, 208) * scales).reshape(n, 16, 1)
    ql = (b[:, :128].reshape(n, 2, 1, 64) >> _shifts(0, 4, shape=(1, 1, 2, 1))) & 0x0F
    qh = (b[:, 128:192].reshape(n, 2, 1, 32) >> _shifts(0, 2, 4, 6, shape=(1, 1, 4, 1))) & 0x03
    q = (ql.reshape(n, 8, 32) | (qh.reshape(n, 8, 32) << 4)).float() - 32
    return (d * q.reshape(n, 16, 16)).reshape(n, 256)


def _q2_k(b):
    n = b.shape[0]
    scales = b[:, :16]
    dl = (_f16(b, 80) * (scales & 0x0F).float()).reshape(n, 16, 1)
    ml = (_f16(b, 82) * (scales >> 4).float()).reshape(n, 16, 1)
    q = (b[:, 16:80].reshape(n, 2, 1, 32) >> _shifts(0, 2, 4, 6, shape=(1, 1, 4, 1))) & 0x03
    return (dl * q.reshape(n, 16, 16).float() - ml).reshape(n, 256)


def _q3_k(b):
    n = b.shape[0]
    sc = b[:, 96:108]
    lo = (sc[:, :8].reshape(n, 1, 8) >> _shifts(0, 4, shape=(1, 2, 1))).reshape(n, 16)
    hi = (sc[:, 8:].reshape(n, 1, 4) >> _shifts(0, 2, 4, 6, shape=(1, 4, 1))).reshape(n, 16)
    scales = ((lo & 0x0F) | ((hi & 0x03) << 4)).float() - 32
    dl = (_f16(b, 108) * scales).reshape(n, 16, 1)
    ql = (b[:, 32:96].reshape(n, 2, 1, 32) >> _shifts(0, 2, 4, 6, shape=(1, 1, 4, 1))) & 0x03
    qh = (b[:, :32].reshape(n, 1, 1, 32) >> _shifts(*range(8), shape=(1, 1, 8, 1))) & 1
    # the high bit is stored inverted: a set bit means "no -4 offset"
    q = ql.reshape(n, 16, 16).float() - ((qh.reshape(n, 16, 16) ^ 1) << 2).float()
    return (dl * q).reshape(n, 256)


_DEQUANT = {Q.Q8_0: _q8_0, Q.Q4_0: _q4_0, Q.Q4_1: _q4_1, Q.Q5_0: _q5_0, Q.Q5_1: _q5_1,
            Q.Q2_K: _q2_k, Q.Q3_K: _q3_k, Q.Q4_K: _q4_k, Q.Q5_K: _q5_k, Q.Q6_K: _q6_k}
_PLAIN = {Q.F32: torch.float32, Q.F16: torch.float16, Q.BF16: torch.bfloat16, Q.F64: torch.float64}


def unsupported_reason(qtype: int) -> str | None:
    """Why tensors of ggml type ``qtype`` cannot be dequantized here, or None if they can."""
    from gguf import quants

    qt = Q(qtype)
    numpy_types = getattr(quants, "_type_traits", None)  # gguf's numpy dequantizers
    if qt in _PLAIN or qt in _DEQUANT or numpy_types is None or qt in numpy_types:
        return None
    if qt.name[0] == "I" and qt.name[1:].isdigit():
        return (f"GGUF tensor type {qt.name} holds integers, not weights (llama.cpp converts "
                "no such tensor to floats either); this is not a model file Ember can load")
    return (f"GGUF tensor type {qt.name} cannot be dequantized by this gguf package; "
            "re-quantize the model (Q8_0, Q4_K_M, Q6_K ...)")


def dequantize(raw: torch.Tensor, qtype: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Raw GGUF tensor bytes (uint8, 1-D) -> fp32 tensor of ``shape`` (torch order)."""
    qt = Q(qtype)
    why = unsupported_reason(qt)
    if why is not None:
        raise EmberError(why)
    if qt in _PLAIN:
        return raw.view(_PLAIN[qt]).float().reshape(shape)
    block, type_size = GGML_QUANT_SIZES[qt]
    blocks = raw.reshape(-1, type_size)
    if qt in _DEQUANT:
        return _DEQUANT[qt](blocks).reshape(shape)
    from gguf import quants  # IQ*/TQ*/MXFP4: numpy reference, slower but complete

    try:
        out = quants.dequantize(blocks.numpy(), qt)
    except NotImplementedError:
        raise EmberError(f"GGUF tensor type {qt.name} cannot be dequantized by this gguf "
                         "package; re-quantize the model (Q8_0, Q4_K_M, Q6_K ...)") from None
    return torch.from_numpy(np.ascontiguousarray(out)).reshape(shape)
