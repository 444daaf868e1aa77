"""NF4 4-bit weights, byte-compatible with bitsandbytes 0.50 (``quant_type="nf4"``).

Quantize (w of any shape, n = numel, flattened row-major, blocks of ``blocksize`` values):
  absmax_b = max|w| over block b (fp32); s = clamp(w * (1 / max(absmax_b, 1e-38)), -1, 1)
  (the last, partial block: absmax clamped to 1e-38 *and stored so*, s = w / absmax: bnb's rule);
  q = #{NF4 midpoints < s} (a value on a midpoint goes to the lower code), two codes per byte with
  the FIRST element in the HIGH nibble, odd n padded with s = 0; packed is (ceil(n/2), 1) uint8.
  Double quantization: offset = mean(absmax); absmax - offset is quantized 8-bit blockwise (block
  256) with bnb's signed dynamic map, by bnb's CPU rule: idx = lut[int(((v + 1) / 2) * 65535 + 0.5)]
  with v = clamp(x * (1 / absmax2), -1, 1) and lut[i] = #{map midpoints < -1 + 2i/65535} (not
  quite nearest; bnb's CUDA kernel searches the map directly, so a checkpoint bnb quantized on a
  GPU may differ from ours in rare nested-absmax ties; dequantization is exact either way).
Dequantize: w = code[q] * absmax, one fp32 product rounded once (RNE) to the output dtype; nested
  absmax = code2[qa] * absmax2 + offset in two fp32 roundings (no FMA: launches disable fusion).

Tensor contract: ``NF4State`` keeps absmax (fp32, or uint8 + nested fp32 absmax/code/offset), the
original shape and dtype, blocksize and the 16-entry code; ``NF4Weight`` bundles packed + state and
is what ``Linear4bit`` and ``lora_linear`` take. The Triton dequant reads 0.5 byte/param (+1 byte
per 64) and writes bf16/fp16/fp32; the Triton quantizer does the 4-bit part, the (n/64-element)
double quantization runs in torch on the same device. ``nf4_linear`` (y = x W^T + b) uses a fused
dequant+matmul kernel for M <= 16 rows (decode/eval) and Triton dequant + cuBLAS otherwise; its
backward re-dequantizes W (never stored) and saves no tensor at all. Limits: 2D weights for the
matmul; the fused kernel needs in_features % blocksize == 0 and blocksize <= its K tile (256, 128
for fp32); other shapes take the dequant + cuBLAS path.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ember.kernels._dispatch import check_dtype, interpreting, use_triton

NF4_CODE = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
            -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
            0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
            0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0)
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
NESTED_BLOCKSIZE = 256
SMALL_M = 16  # rows up to which nf4_linear uses the fused dequant+matmul kernel


def dynamic_map() -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic map (``create_dynamic_map(True, 7, 8)``): 256 fp32."""
    data: list[float] = []
    for i in range(7):
        bounds = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        data += ((10 ** (-6 + i)) * means).tolist() + (-(10 ** (-6 + i)) * means).tolist()
    return torch.tensor(sorted(data + [0, 1.0]), dtype=torch.float32)


@functools.cache
def _tables(device: torch.device):
    """NF4 code, its 15 midpoints, the dynamic map and bnb's 65536-entry lookup table on device."""
    code = torch.tensor(NF4_CODE, dtype=torch.float32)
    bounds = (code[:-1] + code[1:]) / 2
    dyn = dynamic_map()
    mid = 0.5 * (dyn[:-1] + dyn[1:])
    grid = -1.0 + (2.0 * torch.arange(65536, dtype=torch.float32)) / 65535.0
    lut = torch.searchsorted(mid, grid, side="left").to(torch.uint8)
    return tuple(t.to(device) for t in (code, bounds, dyn, lut))


@dataclass(frozen=True)
class NF4State:
    """Everything but the packed codes. ``absmax`` is fp32 (blocks,), or uint8 with nested_*."""

    absmax: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype
    blocksize: int
    code: torch.Tensor
    offset: float | None = None
    nested_absmax: torch.Tensor | None = None
    nested_code: torch.Tensor | None = None
    nested_blocksize: int = NESTED_BLOCKSIZE

    @property
    def nested(self) -> bool:
        return self.nested_absmax is not None

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    def to(self, device) -> NF4State:
        mv = lambda t: None if t is None else t.to(device)
        return replace(self, absmax=mv(self.absmax), code=mv(self.code),
                       nested_absmax=mv(self.nested_absmax), nested_code=mv(self.nested_code))

    def quant_state_json(self) -> str:
        """The JSON bitsandbytes packs into ``weight.quant_state.bitsandbytes__nf4``."""
        d = {"quant_type": "nf4", "blocksize": self.blocksize,
             "dtype": str(self.dtype).removeprefix("torch."), "shape": list(self.shape)}
        if self.nested:
            d.update(nested_blocksize=self.nested_blocksize, nested_dtype="float32",
                     nested_offset=self.offset)
        return json.dumps(d)


class NF4Weight:
    """A quantized weight: ``packed`` (ceil(n/2), 1) uint8 + ``state``. Not a Parameter: frozen."""

    def __init__(self, packed: torch.Tensor, state: NF4State):
        if packed.dtype != torch.uint8 or packed.numel() != (state.numel + 1) // 2:
            raise ValueError(f"NF4Weight: packed must be uint8 with ceil({state.numel}/2) "
                             f"elements, got {packed.dtype} with {packed.numel()}")
        self.packed, self.state = packed, state

    @classmethod
    def quantize(cls, w: torch.Tensor, blocksize: int = 64, double_quant: bool = True, *,
                 impl: str | None = None) -> NF4Weight:
        return cls(*nf4_quantize(w, blocksize, double_quant, impl=impl))

    shape = property(lambda self: self.state.shape)
    dtype = property(lambda self: self.state.dtype)
    device = property(lambda self: self.packed.device)
    blocksize = property(lambda self: self.state.blocksize)

    def numel(self) -> int:
        return self.state.numel

    def dequantize(self, dtype: torch.dtype | None = None, *, impl: str | None = None):
        return nf4_dequantize(self.packed, self.state, dtype, impl=impl)

    def to(self, device) -> NF4Weight:
        return NF4Weight(self.packed.to(device), self.state.to(device))

    def __repr__(self) -> str:
        return (f"NF4Weight(shape={tuple(self.shape)}, dtype={self.dtype}, "
                f"blocksize={self.blocksize}, nested={self.state.nested}, device={self.device})")


# ----------------------------------------------------------------------------------- reference
def _quantize_absmax(absmax: torch.Tensor):
    """Double quantization (torch, any device): (uint8 codes, fp32 absmax2, offset)."""
    offset = absmax.mean()
    a = absmax - offset
    _, _, dyn, lut = _tables(a.device)
    nb = a.numel()
    n2 = -(-nb // NESTED_BLOCKSIZE)
    blocks = F.pad(a, (0, n2 * NESTED_BLOCKSIZE - nb)).view(n2, NESTED_BLOCKSIZE)
    am2 = blocks.abs().amax(1)
    inv = torch.where(am2 > 0, 1.0 / am2, torch.zeros_like(am2))
    v = (blocks * inv[:, None]).clamp(-1.0, 1.0)
    q = lut[((v + 1.0) * 0.5 * 65535.0 + 0.5).to(torch.int32)]
    q = torch.where(am2[:, None] > 0, q, torch.zeros_like(q))
    return q.reshape(-1)[:nb].contiguous(), am2, offset.item(), dyn


def _make_state(absmax, w, blocksize, double_quant) -> NF4State:
    code = _tables(absmax.device)[0]
    if not double_quant:
        return NF4State(absmax, w.shape, w.dtype, blocksize, code)
    q, am2, offset, dyn = _quantize_absmax(absmax)
    return NF4State(q, w.shape, w.dtype, blocksize, code, offset, am2, dyn)


def nf4_quantize_ref(w: torch.Tensor, blocksize: int = 64, double_quant: bool = True):
    flat = w.reshape(-1).float()
    n = flat.numel()
    full = n - n % blocksize
    code, bounds, _, _ = _tables(w.device)
    blocks = flat[:full].view(-1, blocksize)
    absmax = blocks.abs().amax(1)
    scaled = (blocks * (1.0 / absmax.clamp(min=1e-38))[:, None]).clamp(-1, 1).reshape(-1)
    if full < n:
        am = flat[full:].abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, am[None]])
        scaled = torch.cat([scaled, (flat[full:] / am).clamp(-1, 1)])
    q = torch.bucketize(F.pad(scaled, (0, n % 2)), bounds).to(torch.uint8)
    packed = ((q[0::2] << 4) | q[1::2]).unsqueeze(1)
    return packed, _make_state(absmax, w, blocksize, double_quant)


def _absmax_ref(state: NF4State) -> torch.Tensor:
    if not state.nested:
        return state.absmax.float()
    blk = torch.arange(state.absmax.numel(), device=state.absmax.device) // state.nested_blocksize
    return state.nested_code[state.absmax.long()] * state.nested_absmax[blk] + state.offset


def nf4_dequantize_ref(packed: torch.Tensor, state: NF4State, dtype: torch.dtype | None = None):
    n, bs = state.numel, state.blocksize
    b = packed.reshape(-1)
    q = torch.stack([b >> 4, b & 15], 1).reshape(-1)[:n].long()
    am = _absmax_ref(state)
    vals = F.pad(state.code[q], (0, am.numel() * bs - n)).view(-1, bs) * am[:, None]
    return vals.reshape(-1)[:n].view(state.shape).to(dtype or state.dtype)


def nf4_linear_ref(x: torch.Tensor, weight: NF4Weight, bias: torch.Tensor | None = None):
    w = nf4_dequantize_ref(weight.packed, weight.state, x.dtype)
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))


# ------------------------------------------------------------------------------------- kernels
@triton.jit
def _nf4_quantize_kernel(X, P, ABSMAX, BOUNDS, N, BS: tl.constexpr, ROWS: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    blk = pid * ROWS + tl.arange(0, ROWS)  # (ROWS,) block ids
    idx = blk[:, None] * BS + tl.arange(0, BS)[None, :]
    x = tl.load(X + idx, mask=idx < N, other=0.0).to(tl.float32)
    am = tl.max(tl.abs(x), axis=1)
    # 1e-38 is subnormal in fp32: a bare literal is typed fp64 by triton 3.6, so make it fp32.
    amc = tl.maximum(am, tl.full([ROWS], 1e-38, tl.float32))
    tail = blk >= N // BS  # bnb: the partial last block keeps the clamped absmax, divides
    tl.store(ABSMAX + blk, tl.where(tail, amc, am), mask=blk * BS < N)
    full = x * tl.math.div_rn(tl.full([ROWS], 1.0, tl.float32), amc)[:, None]
    part = tl.math.div_rn(x, tl.broadcast_to(amc[:, None], (ROWS, BS)))
    s = tl.where(tail[:, None], part, full)
    s = tl.where(am[:, None] > 0, s, 0.0)  # all-zero block: 0 (bnb: 0 * 1e38), even with FTZ
    s = tl.minimum(tl.maximum(s, -1.0), 1.0)
    q = tl.zeros([ROWS, BS], dtype=tl.int32)
    for j in tl.static_range(15):
        q += (s > tl.load(BOUNDS + j)).to(tl.int32)
    hi, lo = tl.split(tl.reshape(q, (ROWS, BS // 2, 2)))
    bidx = blk[:, None] * (BS // 2) + tl.arange(0, BS // 2)[None, :]
    tl.store(P + bidx, ((hi << 4) | lo).to(tl.uint8), mask=bidx < (N + 1) // 2)


@triton.jit
def _nibbles(word):
    """(..., ) int32 words of packed bytes -> (..., 8) codes in element order: byte 0 (the least
    significant, little-endian) holds elements 0 (high nibble) and 1 (low nibble)."""
    j = tl.arange(0, 8)
    return (tl.expand_dims(word, -1) >> (8 * (j // 2) + 4 - 4 * (j % 2))) & 15


@triton.jit
def _nf4_dequant_kernel(P, ABSMAX, ABSMAX2, CODE, CODE2, OUT, offset, N, BS: tl.constexpr,
                        NBS: tl.constexpr, WORDS: tl.constexpr, NESTED: tl.constexpr,
                        BF16_BITS: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    wid = pid * WORDS + tl.arange(0, WORDS)  # 4 packed bytes = 8 values, all in one block
    wmask = wid * 8 < N
    q = _nibbles(tl.load(P + wid, mask=wmask, other=0))  # (WORDS, 8)
    blk = wid * 8 // BS
    am = tl.load(ABSMAX + blk, mask=wmask, other=0)
    if NESTED:
        am2 = tl.load(ABSMAX2 + blk // NBS, mask=wmask, other=0.0)
        am = tl.load(CODE2 + am.to(tl.int32)) * am2 + offset
    w = tl.load(CODE + q) * am.to(tl.float32)[:, None]
    idx = wid[:, None] * 8 + tl.arange(0, 8)[None, :]
    if BF16_BITS:  # round to nearest even by hand: exact in the interpreter as on the GPU
        bits = w.to(tl.uint32, bitcast=True)
        w = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).to(tl.uint16)
    tl.store(OUT + idx, w.to(OUT.dtype.element_ty), mask=idx < N)


@triton.jit
def _nf4_matmul_kernel(X, P, ABSMAX, ABSMAX2, CODE, CODE2, BIAS, OUT, offset, M, N, K,
                       stride_xm, stride_os, stride_om, K_SPLIT, BS: tl.constexpr,
                       NBS: tl.constexpr, NESTED: tl.constexpr, HAS_BIAS: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       IEEE: tl.constexpr, INTERPRET: tl.constexpr):
    """OUT[s] (M, N) = X (M, K) @ dequant(W (N, K))^T over K slice s = program_id(1)."""
    pid_n = tl.program_id(0).to(tl.int64)
    pid_s = tl.program_id(1).to(tl.int64)
    rm = tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = rn < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    k_lo = pid_s * K_SPLIT
    k_hi = tl.minimum(k_lo + K_SPLIT, K)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(X + rm[:, None] * stride_xm + rk[None, :],
                    mask=(rm[:, None] < M) & (rk[None, :] < k_hi), other=0.0)
        rw = k0 // 8 + tl.arange(0, BLOCK_K // 8)
        word = tl.load(P + rn[:, None] * (K // 8) + rw[None, :],
                       mask=nmask[:, None] & (rw[None, :] < k_hi // 8), other=0)
        q = tl.reshape(_nibbles(word), (BLOCK_N, BLOCK_K // BS, BS))
        rblk = k0 // BS + tl.arange(0, BLOCK_K // BS)
        bmask = nmask[:, None] & (rblk[None, :] < k_hi // BS)
        blk = rn[:, None] * (K // BS) + rblk[None, :]
        am = tl.load(ABSMAX + blk, mask=bmask, other=0)
        if NESTED:
            am2 = tl.load(ABSMAX2 + blk // NBS, mask=bmask, other=0.0)
            am = tl.load(CODE2 + am.to(tl.int32)) * am2 + offset
        w = tl.reshape(tl.load(CODE + q) * am.to(tl.float32)[:, :, None], (BLOCK_N, BLOCK_K))
        if INTERPRET:  # the interpreter's bf16 dot is wrong: fp32 operands there
            acc += tl.dot(x.to(tl.float32), tl.trans(w))
        elif IEEE:
            acc += tl.dot(x, tl.trans(w), input_precision="ieee")
        else:
            acc += tl.dot(x, tl.trans(w.to(x.dtype)))
    if HAS_BIAS:
        acc += tl.load(BIAS + rn, mask=nmask, other=0.0).to(tl.float32)[None, :]
    o = OUT + pid_s * stride_os + rm[:, None] * stride_om + rn[None, :]
    tl.store(o, acc.to(OUT.dtype.element_ty), mask=(rm[:, None] < M) & nmask[None, :])


def _sig(**kw):  # _nibbles is compiled through the kernels that call it
    return {k: ("constexpr" if v is None else v) for k, v in kw.items()}


_C = None
def _mm_config(dtype: torch.dtype) -> dict:
    """Tiles of the fused matmul: fp32 operands (IEEE dot) get half the K tile, so that the
    pipelined buffers stay within the shared memory of every sm_80+ GPU."""
    fp32 = dtype == torch.float32
    return {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 128 if fp32 else 256, "num_warps": 4,
            "num_stages": 2 if fp32 else 3}


def _mm_spec(xt: str, ot: str, dtype: torch.dtype, nested: bool):
    cfg = _mm_config(dtype)
    opts = {k: cfg.pop(k) for k in ("num_warps", "num_stages")}
    sig = _sig(X=xt, P="*i32", ABSMAX="*u8" if nested else "*fp32", ABSMAX2="*fp32",
               CODE="*fp32", CODE2="*fp32", BIAS=xt, OUT=ot, offset="fp32", M="i32", N="i32",
               K="i32", stride_xm="i32", stride_os="i32", stride_om="i32", K_SPLIT="i32", BS=_C,
               NBS=_C, NESTED=_C, HAS_BIAS=_C, BLOCK_M=_C, BLOCK_N=_C, BLOCK_K=_C, IEEE=_C,
               INTERPRET=_C)
    cx = {"BS": 64, "NBS": 256, "NESTED": nested, "HAS_BIAS": ot == xt,
          "IEEE": dtype == torch.float32, "INTERPRET": False, **cfg}
    return (_nf4_matmul_kernel, sig, cx, opts)


COMPILE_SPECS = [
    (_nf4_quantize_kernel, _sig(X=xt, P="*u8", ABSMAX="*fp32", BOUNDS="*fp32", N="i32", BS=_C,
                                ROWS=_C), {"BS": 64, "ROWS": 32})
    for xt in ("*fp32", "*bf16")
] + [
    (_nf4_dequant_kernel, _sig(P="*i32", ABSMAX=am, ABSMAX2="*fp32", CODE="*fp32", CODE2="*fp32",
                               OUT=ot, offset="fp32", N="i32", BS=_C, NBS=_C, WORDS=_C, NESTED=_C,
                               BF16_BITS=_C),
     {"BS": 64, "NBS": 256, "WORDS": 512, "NESTED": nested, "BF16_BITS": ot == "*u16"})
    for am, nested in (("*u8", True), ("*fp32", False)) for ot in ("*u16", "*fp16", "*fp32")
] + [
    _mm_spec("*bf16", "*bf16", torch.bfloat16, True),  # one K slice, bias fused
    _mm_spec("*fp16", "*fp32", torch.float16, False),  # K split into fp32 partial sums
    _mm_spec("*fp32", "*fp32", torch.float32, True),
]


# ----------------------------------------------------------------------------------- launchers
def _nested_args(state: NF4State):
    if state.nested:
        return state.nested_absmax, state.nested_code, float(state.offset)
    return state.absmax, state.code, 0.0


def _nf4_quantize(w: torch.Tensor, blocksize: int, double_quant: bool):
    x = w.reshape(-1).contiguous()
    n = x.numel()
    packed = torch.empty(((n + 1) // 2, 1), dtype=torch.uint8, device=w.device)
    absmax = torch.empty(-(-n // blocksize), dtype=torch.float32, device=w.device)
    rows = max(1, 2048 // blocksize)
    _nf4_quantize_kernel[(triton.cdiv(absmax.numel(), rows),)](
        x, packed, absmax, _tables(w.device)[1], n, BS=blocksize, ROWS=rows, num_warps=4)
    return packed, _make_state(absmax, w, blocksize, double_quant)


def _words(packed: torch.Tensor) -> torch.Tensor:
    """The packed bytes as int32 words (kernels read 4 bytes = 8 values at a time); sizes that are
    not a multiple of 8 values (never a real weight) pay for a padded copy."""
    flat = packed.reshape(-1)
    if flat.numel() % 4 or flat.data_ptr() % 4:
        flat = F.pad(flat, (0, -flat.numel() % 4))
    return flat.view(torch.int32)


def _nf4_dequantize(packed: torch.Tensor, state: NF4State, dtype: torch.dtype) -> torch.Tensor:
    out = torch.empty(state.shape, dtype=dtype, device=packed.device)
    words = 512  # 4096 values per program
    am2, code2, offset = _nested_args(state)
    bf16 = dtype == torch.bfloat16
    _nf4_dequant_kernel[(triton.cdiv(state.numel, words * 8),)](
        _words(packed), state.absmax, am2, state.code, code2,
        out.view(torch.uint16) if bf16 else out, offset, state.numel, BS=state.blocksize,
        NBS=state.nested_blocksize, WORDS=words, NESTED=state.nested, BF16_BITS=bf16,
        num_warps=4, enable_fp_fusion=False)
    return out


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _fusable(weight: NF4Weight, dtype: torch.dtype) -> bool:
    n_out, k = weight.shape if len(weight.shape) == 2 else (0, 1)
    bs = weight.blocksize
    return n_out > 0 and k % bs == 0 and bs <= _mm_config(dtype)["BLOCK_K"]


def _nf4_matmul(x2: torch.Tensor, weight: NF4Weight, bias: torch.Tensor | None,
                split: int | None = None) -> torch.Tensor:
    """x2 (M <= 16, K) @ dequant(W)^T (+ bias) in one pass over the packed weight; ``split``
    K-slices (default: enough programs to cover the GPU twice) are summed in fp32."""
    m, k = x2.shape
    n = weight.shape[0]
    st = weight.state
    cfg = _mm_config(x2.dtype)
    block_n, block_k = cfg["BLOCK_N"], cfg["BLOCK_K"]
    tiles = triton.cdiv(n, block_n)
    if split is None:
        sms = _sm_count(x2.device.index or 0) if x2.is_cuda else 1
        split = 1
        while tiles * split < 2 * sms and k // (split * 2) >= 4 * block_k:
            split *= 2
    k_split = triton.cdiv(triton.cdiv(k, split), block_k) * block_k
    split = triton.cdiv(k, k_split)
    out = torch.empty((split, m, n), device=x2.device,
                      dtype=x2.dtype if split == 1 else torch.float32)
    am2, code2, offset = _nested_args(st)
    fuse_bias = bias is not None and split == 1
    _nf4_matmul_kernel[(tiles, split)](
        x2, _words(weight.packed), st.absmax, am2, st.code, code2, bias if fuse_bias else x2, out,
        offset,
        m, n, k, x2.stride(0), out.stride(0), out.stride(1), k_split, BS=st.blocksize,
        NBS=st.nested_blocksize, NESTED=st.nested, HAS_BIAS=fuse_bias,
        IEEE=x2.dtype == torch.float32, INTERPRET=interpreting(), enable_fp_fusion=False, **cfg)
    if split == 1:
        return out[0]
    y = out.sum(0).to(x2.dtype)
    return y if bias is None else y.add_(bias.to(y.dtype))


def nf4_mm(x2: torch.Tensor, weight: NF4Weight, bias: torch.Tensor | None = None):
    """Triton path of x2 (M, K) @ W^T (+ bias): dequant + cuBLAS; the fused small-M kernel is
    opt-in (EMBER_NF4_FUSED_MATMUL=1) because on an H100 it measured 0.46 ms at M=1..16 for a
    14336x4096 weight against ~0.11 ms for dequant + cuBLAS (bench/results/2026-11-23_*.jsonl);
    the interpreter always takes it so that CI keeps it correct."""
    fused = interpreting() or os.environ.get("EMBER_NF4_FUSED_MATMUL") == "1"
    if fused and x2.shape[0] <= SMALL_M and _fusable(weight, x2.dtype):
        return _nf4_matmul(x2.contiguous(), weight, None if bias is None else bias.to(x2.dtype))
    w = _nf4_dequantize(weight.packed, weight.state, x2.dtype)
    if bias is None:
        return x2 @ w.t()
    return torch.addmm(bias.to(x2.dtype), x2, w.t())


class _NF4Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2, bias, weight):
        ctx.weight, ctx.bias_dtype = weight, None if bias is None else bias.dtype
        return nf4_mm(x2, weight, bias)

    @staticmethod
    def backward(ctx, dy):
        dx = dbias = None
        if ctx.needs_input_grad[0]:  # re-dequantize: the dense weight is never kept
            dx = dy @ _nf4_dequantize(ctx.weight.packed, ctx.weight.state, dy.dtype)
        if ctx.needs_input_grad[1]:
            dbias = dy.sum(0).to(ctx.bias_dtype)
        return dx, dbias, None


# -------------------------------------------------------------------------------------- public
def nf4_quantize(w: torch.Tensor, blocksize: int = 64, double_quant: bool = True, *,
                 impl: str | None = None):
    """Quantize ``w`` to NF4: returns (packed (ceil(n/2), 1) uint8, NF4State)."""
    check_dtype("nf4_quantize", "w", w)
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"nf4_quantize: blocksize must be one of {BLOCKSIZES}, got {blocksize}")
    if w.numel() == 0:
        raise ValueError("nf4_quantize: cannot quantize an empty tensor")
    if use_triton(w, impl, "nf4_quantize"):
        return _nf4_quantize(w.detach(), blocksize, double_quant)
    return nf4_quantize_ref(w.detach(), blocksize, double_quant)


def nf4_dequantize(packed: torch.Tensor, state: NF4State, dtype: torch.dtype | None = None, *,
                   impl: str | None = None) -> torch.Tensor:
    """The dense weight (state.shape) in ``dtype`` (default: the dtype it was quantized from)."""
    dtype = dtype or state.dtype
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"nf4_dequantize: dtype must be float32/float16/bfloat16, got {dtype}")
    if packed.dtype != torch.uint8 or packed.numel() != (state.numel + 1) // 2:
        raise ValueError(f"nf4_dequantize: packed must be uint8 with ceil({state.numel}/2) "
                         f"elements for shape {tuple(state.shape)}, got {packed.dtype} "
                         f"{tuple(packed.shape)}")
    if state.absmax.device != packed.device:
        raise ValueError(f"nf4_dequantize: packed on {packed.device} but state on "
                         f"{state.absmax.device}; move both with NF4Weight.to(device)")
    if use_triton(packed, impl, "nf4_dequantize"):
        return _nf4_dequantize(packed.contiguous(), state, dtype)
    return nf4_dequantize_ref(packed, state, dtype)


def nf4_linear(x: torch.Tensor, weight: NF4Weight, bias: torch.Tensor | None = None, *,
               impl: str | None = None) -> torch.Tensor:
    """y = x W^T + b for an NF4 weight (out, in); output in x.dtype; W itself gets no gradient."""
    check_dtype("nf4_linear", "x", x)
    if len(weight.shape) != 2 or weight.shape[1] != x.shape[-1]:
        raise ValueError(f"nf4_linear: x {tuple(x.shape)} does not match weight "
                         f"{tuple(weight.shape)} (out, in)")
    if weight.device != x.device:
        raise ValueError(f"nf4_linear: x on {x.device}, weight on {weight.device}")
    if not use_triton(x, impl, "nf4_linear"):
        return nf4_linear_ref(x, weight, bias)
    y = _NF4Linear.apply(x.reshape(-1, x.shape[-1]), bias, weight)
    return y.view(*x.shape[:-1], weight.shape[0])
