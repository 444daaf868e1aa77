"""ggml's block quantizations in torch, byte for byte what llama.cpp writes, and llama-quantize's
per-tensor type choice for its file types (``Q4_K_M`` ...).

Legacy types, per block of 32 (as ``gguf.quants``, which follows ggml's reference):
``Q8_0`` d = max|x| / 127, q = round(x / d); ``Q4_0`` / ``Q5_0`` d = (the signed value of largest
magnitude) / -8 (-16), q = trunc(x / d + 8.5 (16.5)); ``Q4_1`` / ``Q5_1`` d = (max - min) / 15 (31),
m = min, q = trunc((x - m) / d + 0.5). Bytes: fp16 scale(s), then the low nibbles (element i and
i + 16 share a byte), for the 5-bit types 4 bytes of high bits in between. One difference from
``gguf.quants``, where we follow llama.cpp: an all-zero block whose first value is -0.0 gets a
-0.0 / +0.0 scale (or min) as ggml's loops leave it, not the sign numpy's argmax picks.

K-quants (their code: ``ember.models.gguf_kquants``), per super-block of 256, transcribed from
ggml-quants.c's ``quantize_row_q{2..6}_K_ref``
(what ``llama-quantize`` runs without an importance matrix): Q2_K fits 16 sub-blocks of 16 with
``make_qkx2_quants`` (weights |x|, absolute errors, 16 trial scales) and 4-bit scales and mins;
Q3_K fits 16 sub-blocks of 16 with ``make_q3_quants`` (codes improved one at a time, up to 5
rounds) and 6-bit signed scales; Q4_K / Q5_K cut it into 8 sub-blocks
of 32, each fitted by ``make_qkx2_quants`` (a weighted least-squares search over 21 / 16 trial
scales of a scale and a min), then the 8 scales and mins are themselves quantized to 6 bits
against fp16 super-scales; Q6_K uses 16 sub-blocks of 16 with ``make_qx_quants`` (19 trial
scales, symmetric) and int8 sub-scales. Every loop over a block is vectorized over all blocks
at once, while each sum keeps the C code's order (element by element, in fp32, no fused
multiply-add), because the search compares errors and a different rounding picks a different
scale. ``_nearest_int`` is ggml's float trick itself. The C reference compiled with
``-ffp-contract=off`` is the oracle (tests/models/test_gguf_quants.py). A build that contracts
to fused multiply-adds (gcc ``-O3 -march=native`` on x86, llama.cpp's default native build)
differs from it, and so from itself built strictly: on SmolLM2's weights in 3.3% of Q4_K and
1.3% of Q6_K super-blocks, 1e-4 of Q4_0 / Q5_0 blocks; no portable bytes exist beyond IEEE's.

Inputs must be finite; a block whose scale underflows to a subnormal (all |x| < ~1e-37) is
outside what the tests cover.
"""

from __future__ import annotations

import torch
from gguf import GGMLQuantizationType as Q
from gguf import LlamaFileType

from ember import EmberError
from ember.models.gguf_kquants import _K_QUANTS, QK_K, _div

# ggml type -> (elements per block, bytes per block)
BLOCKS = {Q.Q4_0: (32, 18), Q.Q4_1: (32, 20), Q.Q5_0: (32, 22), Q.Q5_1: (32, 24),
          Q.Q8_0: (32, 34), Q.Q2_K: (QK_K, 84), Q.Q3_K: (QK_K, 110), Q.Q4_K: (QK_K, 144),
          Q.Q5_K: (QK_K, 176), Q.Q6_K: (QK_K, 210)}
_CHUNK = 1 << 22  # elements quantized at once: bounds the temporaries of the K-quant searches


def _half_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.half().view(torch.uint8).reshape(*t.shape, 2)


def _nibbles(q: torch.Tensor) -> torch.Tensor:
    """(n, 32) codes -> (n, 16) bytes: element i in the low nibble, i + 16 in the high one."""
    return (q[:, :16] & 0xF) | (q[:, 16:] << 4)


def _high_bits(q: torch.Tensor) -> torch.Tensor:
    """(n, 32) 5-bit codes -> (n, 4) bytes: bit i of the little-endian uint32 is q[i]'s bit 4."""
    bits = ((q >> 4) & 1).reshape(-1, 4, 8)
    return (bits << torch.arange(8, dtype=torch.uint8)).sum(-1, dtype=torch.uint8)


def _blocks(w: torch.Tensor, qtype: Q) -> torch.Tensor:
    size = BLOCKS[qtype][0]
    if w.ndim != 2 or w.shape[1] % size:
        raise EmberError(f"quantize {qtype.name}: need a matrix with rows a multiple of {size}, "
                         f"got shape {tuple(w.shape)}")
    return w.detach().float().cpu().reshape(-1, size)


# ------------------------------------------------------------------------------------------
# Legacy types: blocks of 32


def quantize_q8_0(w: torch.Tensor) -> torch.Tensor:
    """ggml's Q8_0 of a (rows, cols) tensor, cols a multiple of 32 -> uint8 (rows, cols/32*34):
    per block of 32, an fp16 scale d = max|x| / 127 then int8 q = round(x / d) (half away from
    zero, computed as x * (1/d) in fp32, like ggml's reference and ``gguf.quants``)."""
    blocks = _blocks(w, Q.Q8_0)
    d = blocks.abs().amax(dim=1, keepdim=True) / 127
    inv = torch.where(d == 0, torch.zeros_like(d), _div(1.0, d))
    x = blocks * inv
    a = x.abs()
    whole = a.floor()
    q = torch.sign(x) * (whole + (2 * (a - whole)).floor())
    out = torch.cat([d.half().view(torch.uint8), q.to(torch.int8).view(torch.uint8)], dim=1)
    return out.reshape(w.shape[0], -1)


def _symmetric(blocks: torch.Tensor, half: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_0 / Q5_0: the scale d (n, 1) and the codes trunc(x / d + half + 0.5), 0..2*half-1."""
    a = blocks.abs()
    imax = a.argmax(dim=1, keepdim=True)
    # C keeps max = +0.0 unless some |x| > 0: an all-zero block gets d = -0.0 (gguf.quants: the
    # sign of its first zero)
    mx = torch.gather(blocks, 1, imax).where(a.amax(1, keepdim=True) > 0, 0.0)
    d = mx / -half
    inv = torch.where(d == 0, torch.zeros_like(d), _div(1.0, d))
    q = torch.trunc(blocks * inv + (half + 0.5)).clamp(0, 2 * half - 1).to(torch.uint8)
    return d, q


def _affine(blocks: torch.Tensor, top: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q4_1 / Q5_1: d = (max - min) / top (n, 1), m = min, codes trunc((x - m) / d + 0.5)."""
    # C's first extreme element (v < min, v > max): the sign of a zero extreme is the first one's
    mx = torch.gather(blocks, 1, blocks.argmax(dim=1, keepdim=True))
    mn = torch.gather(blocks, 1, blocks.argmin(dim=1, keepdim=True))
    d = (mx - mn) / top
    inv = torch.where(d == 0, torch.zeros_like(d), _div(1.0, d))
    q = torch.trunc((blocks - mn) * inv + 0.5).clamp(0, top).to(torch.uint8)
    return d, mn, q


def quantize_q4_0(w: torch.Tensor) -> torch.Tensor:
    """ggml's Q4_0 (18 bytes per 32: fp16 d, 16 bytes of nibbles), as ``gguf.quants``."""
    d, q = _symmetric(_blocks(w, Q.Q4_0), 8)
    return torch.cat([_half_bytes(d[:, 0]), _nibbles(q)], 1).reshape(w.shape[0], -1)


def quantize_q4_1(w: torch.Tensor) -> torch.Tensor:
    """ggml's Q4_1 (20 bytes per 32: fp16 d, fp16 min, nibbles), as ``gguf.quants``."""
    d, m, q = _affine(_blocks(w, Q.Q4_1), 15)
    out = torch.cat([_half_bytes(d[:, 0]), _half_bytes(m[:, 0]), _nibbles(q)], 1)
    return out.reshape(w.shape[0], -1)


def quantize_q5_0(w: torch.Tensor) -> torch.Tensor:
    """ggml's Q5_0 (22 bytes per 32: fp16 d, 4 bytes of high bits, nibbles), as ``gguf.quants``."""
    d, q = _symmetric(_blocks(w, Q.Q5_0), 16)
    out = torch.cat([_half_bytes(d[:, 0]), _high_bits(q), _nibbles(q)], 1)
    return out.reshape(w.shape[0], -1)


def quantize_q5_1(w: torch.Tensor) -> torch.Tensor:
    """ggml's Q5_1 (24 bytes per 32: fp16 d, fp16 min, high bits, nibbles), as ``gguf.quants``."""
    d, m, q = _affine(_blocks(w, Q.Q5_1), 31)
    out = torch.cat([_half_bytes(d[:, 0]), _half_bytes(m[:, 0]), _high_bits(q), _nibbles(q)], 1)
    return out.reshape(w.shape[0], -1)


_LEGACY = {Q.Q4_0: quantize_q4_0, Q.Q4_1: quantize_q4_1, Q.Q5_0: quantize_q5_0,
           Q.Q5_1: quantize_q5_1, Q.Q8_0: quantize_q8_0}


def quantize(w: torch.Tensor, qtype: Q) -> torch.Tensor:
    """``w`` (rows, cols), cols a multiple of the type's block -> uint8 (rows, row bytes) in
    ggml's layout for ``qtype`` (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K .. Q6_K)."""
    if qtype in _LEGACY:
        return _LEGACY[qtype](w)
    if qtype not in _K_QUANTS:
        raise EmberError(f"quantize: no quantizer for {qtype.name} (have "
                         f"{', '.join(t.name for t in BLOCKS)})")
    blocks = _blocks(w, qtype)
    step = max(1, _CHUNK // QK_K)
    out = torch.cat([_K_QUANTS[qtype](blocks[i:i + step]) for i in range(0, len(blocks), step)])
    return out.reshape(w.shape[0], -1)


# ------------------------------------------------------------------------------------------
# llama-quantize's file types: the type of each tensor (llama.cpp src/llama-quant.cpp,
# llama_tensor_get_type_impl and tensor_type_fallback, for the types below, no imatrix)

# name as llama-quantize spells it, lowercased -> (default ggml type, general.file_type)
_F = LlamaFileType
FILE_TYPES = {
    "q4_0": (Q.Q4_0, _F.MOSTLY_Q4_0), "q4_1": (Q.Q4_1, _F.MOSTLY_Q4_1),
    "q5_0": (Q.Q5_0, _F.MOSTLY_Q5_0), "q5_1": (Q.Q5_1, _F.MOSTLY_Q5_1),
    "q8_0": (Q.Q8_0, _F.MOSTLY_Q8_0),
    "q4_k_s": (Q.Q4_K, _F.MOSTLY_Q4_K_S), "q4_k_m": (Q.Q4_K, _F.MOSTLY_Q4_K_M),
    "q5_k_s": (Q.Q5_K, _F.MOSTLY_Q5_K_S), "q5_k_m": (Q.Q5_K, _F.MOSTLY_Q5_K_M),
    "q6_k": (Q.Q6_K, _F.MOSTLY_Q6_K), "q2_k": (Q.Q2_K, _F.MOSTLY_Q2_K),
    "q3_k_s": (Q.Q3_K, _F.MOSTLY_Q3_K_S), "q3_k_m": (Q.Q3_K, _F.MOSTLY_Q3_K_M),
    "q3_k_l": (Q.Q3_K, _F.MOSTLY_Q3_K_L),
}
ALIASES = {"q4_k": "q4_k_m", "q5_k": "q5_k_m", "q3_k": "q3_k_m"}  # llama-quantize's own aliases
# what a type falls back to for rows that are not whole blocks (then F16)
_FALLBACK = {Q.Q2_K: Q.Q4_0, Q.Q3_K: Q.Q4_0, Q.Q4_K: Q.Q5_0, Q.Q5_K: Q.Q5_1, Q.Q6_K: Q.Q8_0}
# 8-expert models' attn_output: Q5_K for these file types
_MOE8_ATTN_OUT = ("q2_k", "q3_k_s", "q3_k_m", "q4_k_s", "q4_k_m")
_ATTN_V = ("attn_qkv.weight", "attn_kv_b.weight", "attn_v.weight")  # category_is_attn_v


def _use_more_bits(i_layer: int, n_layers: int) -> bool:
    # the first clause short-circuits every negative (i - n/8), so // and % are C's / and %
    return (i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8
            or (i_layer - n_layers // 8) % 3 == 2)


def _layer(name: str) -> int:
    return int(name.split(".")[1])


def _mixed_type(name: str, ncols: int, ftype: str, ctx: dict) -> Q:
    """llama_tensor_get_type_impl for our file types and architectures."""
    new = FILE_TYPES[ftype][0]
    if name == "output.weight" or (ctx["tied"] and name == "token_embd.weight"):
        if ncols % BLOCKS[new][0]:
            return Q.Q8_0
        return new if new == Q.Q8_0 else Q.Q6_K
    if name == "token_embd.weight":
        return new
    if any(k in name for k in _ATTN_V):
        i, n = _layer(name), ctx["n_attention_wv"]
        if ftype == "q2_k":
            new = Q.Q4_K if ctx["n_gqa"] >= 4 else Q.Q3_K
        elif ftype == "q3_k_m":
            new = Q.Q5_K if i < 2 else Q.Q4_K
        elif ftype == "q3_k_l":
            new = Q.Q5_K
        elif ftype in ("q4_k_m", "q5_k_m") and _use_more_bits(i, n):
            new = Q.Q6_K
        elif ftype == "q4_k_s" and i < 4:
            new = Q.Q5_K
        if ctx["is_70b"] and new in (Q.Q3_K, Q.Q4_K):
            new = Q.Q5_K
        if ctx["n_expert"] == 8:  # "for the 8-expert model, bumping this to Q8_0 trades ~128MB"
            new = Q.Q8_0
    elif "attn_k.weight" in name and ctx["n_expert"] == 8:
        new = Q.Q8_0
    elif "ffn_down" in name:
        i, n = _layer(name), ctx["n_layer"]
        if ftype == "q2_k":
            new = Q.Q3_K
        elif ftype == "q3_k_m":
            new = Q.Q5_K if i < n // 16 else Q.Q4_K
        elif ftype == "q3_k_l":
            new = Q.Q5_K
        elif ftype in ("q4_k_m", "q5_k_m") and _use_more_bits(i, n):
            new = Q.Q6_K
        elif ftype == "q4_k_s" and i < n // 8:
            new = Q.Q5_K
    elif "attn_output.weight" in name:
        if ctx["n_expert"] == 8:
            new = Q.Q5_K if ftype in _MOE8_ATTN_OUT else new
        else:
            new = {"q2_k": Q.Q3_K, "q3_k_m": Q.Q4_K, "q3_k_l": Q.Q5_K}.get(ftype, new)
    return new


def tensor_types(shapes: dict[str, tuple[int, ...]], ftype: str, *, arch: str, n_layer: int,
                 n_head: int, n_head_kv: int, n_expert: int = 0,
                 fallbacks: dict[str, Q] | None = None) -> dict[str, Q]:
    """The ggml type llama-quantize gives each tensor (GGUF name -> torch shape) for ``ftype``
    (a key of FILE_TYPES or ALIASES): 1-D tensors and norms stay F32; ``output.weight`` (or the
    tied ``token_embd.weight``) gets Q6_K (Q8_0 for Q8_0, or when its rows are not whole blocks);
    for Q4_K_M / Q5_K_M, ``attn_v`` (``attn_qkv``) and ``ffn_down`` of the layers
    ``use_more_bits`` picks get Q6_K; Q4_K_S gives Q5_K to the first 4 ``attn_v`` and the first
    1/8 of ``ffn_down``; an 80-layer Llama-2/3-70B-like model (GQA) or Qwen2-72B gets Q5_K for
    its Q3_K / Q4_K ``attn_v``. Q2_K: ``attn_v`` Q4_K with GQA >= 4 (else Q3_K), ``ffn_down``
    and ``attn_output`` Q3_K; Q3_K_M: the first 2 ``attn_v`` and first 1/16 of ``ffn_down``
    Q5_K, the others and ``attn_output`` Q4_K; Q3_K_L: these three Q5_K. Rows not a multiple of
    the block: Q2_K / Q3_K -> Q4_0, Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0, and F16 if still
    not whole blocks. A model of ``n_expert`` 8 (Mixtral 8x7B) gets Q8_0 for every ``attn_v``
    and ``attn_k``, and Q5_K for ``attn_output`` in Q2_K, Q3_K_S / M and Q4_K_S / M.
    ``fallbacks``, when given, receives the type each fallen-back tensor would have had (name ->
    wanted type)."""
    ftype = ALIASES.get(ftype, ftype)
    ctx = {"tied": "output.weight" not in shapes, "n_layer": n_layer, "n_expert": n_expert,
           "n_gqa": n_head // max(n_head_kv, 1),
           "n_attention_wv": sum(any(k in n for k in _ATTN_V) for n in shapes),
           "is_70b": n_layer == 80 and (arch == "qwen2" or (arch == "llama"
                                                            and n_head != n_head_kv))}
    out = {}
    for name, shape in shapes.items():
        if len(shape) < 2 or not name.endswith("weight") or "_norm.weight" in name:
            out[name] = Q.F32
            continue
        new = _mixed_type(name, shape[-1], ftype, ctx)
        if shape[-1] % BLOCKS[new][0]:
            if fallbacks is not None:
                fallbacks[name] = new
            new = _FALLBACK.get(new, new)
            if shape[-1] % BLOCKS[new][0]:
                new = Q.F16
        out[name] = new
    return out
