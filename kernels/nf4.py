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
is what ``Linear4bit`` and ``lora_linear`` take. Where a state is expected, a bitsandbytes
``QuantState`` (or its ``as_dict()`` / ``as_dict(packed=True)``) is read as one (``as_nf4_state``),
and where a weight is, a bnb ``Params4bit`` (``as_nf4_weight``). The Triton dequant reads 0.5
byte/param (+1 byte per 64) and writes bf16/fp16/fp32; the Triton quantizer does the 4-bit part, the
(n/64-element) double quantization runs in torch on the same device. ``nf4_linear`` (y = x W^T + b)
uses Triton dequant + cuBLAS, or for M <= 16 rows (decode/eval) a fused dequant+matmul kernel when
it was timed faster for that shape (``ember.kernels.nf4_matmul``); its backward re-dequantizes W
(never stored) and saves no tensor at all. Limits: 2D weights for the matmul.
"""

from __future__ import annotations

import functools
import json
import operator
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from ember.kernels import _dispatch
from ember.kernels._dispatch import check_dtype, check_tensors, use_triton
from ember.kernels.adamw8bit import BLOCKSIZE as _BLOCKWISE_8BIT
from ember.kernels.adamw8bit import dynamic_map, quantize_blockwise_ref
from ember.kernels.nf4_matmul import (
    _C,
    SMALL_M,
    _nibbles,
    _sig,
    choose,
    fused_mm,
    state_args,
    words,
)

NF4_CODE = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
            -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
            0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
            0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0)
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
# bnb's double quantization of absmax is its 8-bit blockwise dynamic quantization (signed map,
# blocks of 256): the one its 8-bit optimizers use, ``adamw8bit.quantize_blockwise_ref``.
NESTED_BLOCKSIZE = _BLOCKWISE_8BIT


# Built once here: dynamo ignores functools.cache and traces _tables' body, where building the
# map (a float tensor's tolist()) is unsupported, so nf4_quantize failed under fullgraph.
_DYNAMIC_SIGNED = dynamic_map(True)


@functools.cache
def _tables(device: torch.device):
    """NF4 code, its 15 midpoints and the signed 8-bit dynamic map on device."""
    code = torch.tensor(NF4_CODE, dtype=torch.float32)
    bounds = (code[:-1] + code[1:]) / 2
    return tuple(t.to(device) for t in (code, bounds, _DYNAMIC_SIGNED))


@dataclass(frozen=True)
class NF4State:
    """Everything but the packed codes. ``absmax`` is fp32 (blocks,), or uint8 with nested_*."""

    absmax: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype
    blocksize: int
    code: torch.Tensor
    # A float, or under torch.compile a 0-d fp32 tensor (reading it to the host would break the
    # graph); ``offset_value`` is it as a float either way.
    offset: float | torch.Tensor | None = None
    nested_absmax: torch.Tensor | None = None
    nested_code: torch.Tensor | None = None
    nested_blocksize: int = NESTED_BLOCKSIZE
    # bitsandbytes' name for ``code``: "nf4", or "fp4" for a checkpoint quantized with bnb's FP4
    # (the same format and dequantization, another 16-value code; Ember quantizes to NF4 only).
    quant_type: str = "nf4"

    @property
    def nested(self) -> bool:
        return self.nested_absmax is not None

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def offset_value(self) -> float | None:
        return None if self.offset is None else float(self.offset)

    def to(self, device) -> NF4State:
        mv = lambda t: t.to(device) if torch.is_tensor(t) else t
        return replace(self, absmax=mv(self.absmax), code=mv(self.code), offset=mv(self.offset),
                       nested_absmax=mv(self.nested_absmax), nested_code=mv(self.nested_code))

    def quant_state_json(self) -> str:
        """The JSON bitsandbytes packs into ``weight.quant_state.bitsandbytes__<quant_type>``."""
        d = {"quant_type": self.quant_type, "blocksize": self.blocksize,
             "dtype": str(self.dtype).removeprefix("torch."), "shape": list(self.shape)}
        if self.nested:
            d.update(nested_blocksize=self.nested_blocksize, nested_dtype="float32",
                     nested_offset=self.offset_value)
        return json.dumps(d)


_QS_PREFIX = "quant_state.bitsandbytes__"
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def as_nf4_state(state, op: str = "nf4_dequantize") -> NF4State:
    """``state`` as an ``NF4State``: an NF4State as is; a bitsandbytes ``QuantState`` (what
    ``quantize_4bit`` returns, ``Params4bit.quant_state``) or its ``as_dict()`` /
    ``as_dict(packed=True)`` read field by field (same tensors, no copy). Anything else, or a
    quant type other than nf4/fp4, is a ValueError."""
    if isinstance(state, NF4State):
        return state
    if isinstance(state, dict):
        d = dict(state)
        for key in [k for k in d if k.startswith(_QS_PREFIX)]:  # as_dict(packed=True)
            d.update(json.loads(bytes(d.pop(key).reshape(-1).tolist()).decode("utf-8")))
        nested = d.get("nested_offset") is not None
        get = d.get
        fields = (get("absmax"), get("shape"), get("dtype"), get("blocksize"), get("quant_map"),
                  get("quant_type"), get("nested_offset"), get("nested_absmax"),
                  get("nested_quant_map"), get("nested_blocksize", NESTED_BLOCKSIZE))
    elif all(hasattr(state, a) for a in ("absmax", "shape", "dtype", "blocksize", "code",
                                         "quant_type")):
        nested = bool(getattr(state, "nested", False))
        s2 = state.state2 if nested else None
        fields = (state.absmax, state.shape, state.dtype, state.blocksize, state.code,
                  state.quant_type, state.offset if nested else None,
                  s2.absmax if nested else None, s2.code if nested else None,
                  s2.blocksize if nested else NESTED_BLOCKSIZE)
    else:
        raise ValueError(f"{op}: state must be an NF4State (from nf4_quantize) or a bitsandbytes "
                         f"QuantState or its as_dict(); got {type(state).__name__}")
    absmax, shape, dtype, blocksize, code, qtype, offset, am2, code2, nbs = fields
    dtype = _DTYPES.get(dtype.removeprefix("torch."), dtype) if isinstance(dtype, str) else dtype
    if (qtype not in ("nf4", "fp4") or not torch.is_tensor(absmax) or not torch.is_tensor(code)
            or shape is None or dtype not in _DTYPES.values() or blocksize is None
            or (nested and not (torch.is_tensor(am2) and torch.is_tensor(code2)))):
        raise ValueError(f"{op}: this bitsandbytes quant state is not a complete 4-bit nf4/fp4 "
                         f"state (quant_type {qtype!r}, dtype {dtype}); quantize with "
                         "quant_type='nf4' or pass an NF4State")
    if torch.is_tensor(offset):
        offset = offset.item()
    return NF4State(absmax if nested else absmax.float(), torch.Size(shape), dtype,
                    int(blocksize), code.float(), None if offset is None else float(offset),
                    am2.float() if nested else None, code2.float() if nested else None,
                    int(nbs), qtype)


def _check_state(op: str, packed: torch.Tensor, state: NF4State) -> torch.Tensor:
    """packed as uint8 (bitsandbytes' other ``quant_storage`` dtypes hold the same bytes),
    checked against the state's shape, block count and nesting; the kernels index absmax and the
    packed bytes unchecked, so a mismatch would read past their ends."""
    if packed.dtype != torch.uint8 and packed.numel() * packed.element_size() == (
            state.numel + 1) // 2:
        packed = packed.contiguous().view(torch.uint8)
    if packed.dtype != torch.uint8 or packed.numel() != (state.numel + 1) // 2:
        raise ValueError(f"{op}: packed must be uint8 with ceil({state.numel}/2) elements for "
                         f"shape {tuple(state.shape)}, got {packed.dtype} {tuple(packed.shape)}")
    blocks = -(-state.numel // state.blocksize)
    nested_ok = not state.nested or (state.absmax.dtype == torch.uint8 and
                                     state.nested_absmax.numel() * state.nested_blocksize >= blocks)
    if state.absmax.numel() != blocks or not nested_ok:
        raise ValueError(f"{op}: the state's absmax ({state.absmax.dtype}, "
                         f"{state.absmax.numel()} values) does not fit a {tuple(state.shape)} "
                         f"weight in blocks of {state.blocksize} ({blocks} blocks)")
    return packed


class NF4Weight:
    """A quantized weight: ``packed`` (ceil(n/2), 1) uint8 + ``state`` (an NF4State, or a
    bitsandbytes QuantState / its ``as_dict()``). Not a Parameter: frozen."""

    def __init__(self, packed: torch.Tensor, state: NF4State):
        state = as_nf4_state(state, "NF4Weight")
        self.packed, self.state = _check_state("NF4Weight", packed, state), state

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


def as_nf4_weight(weight):
    """A bitsandbytes ``Params4bit`` (``Linear4bit.weight``: packed bytes carrying a
    ``quant_state``) as an ``NF4Weight`` over the same tensors; anything else unchanged."""
    qs = getattr(weight, "quant_state", None) if isinstance(weight, torch.Tensor) else None
    return weight if qs is None else NF4Weight(weight.detach(), qs)


# ----------------------------------------------------------------------------------- reference
def _quantize_absmax(absmax: torch.Tensor):
    """Double quantization (torch, any device): (uint8 codes, fp32 absmax2, offset, the map) of
    absmax - its mean, by bnb's 8-bit blockwise rule. The offset is a float, or a 0-d tensor
    while traced (``NF4State.offset``). ValueError where absmax - mean overflows fp32."""
    traced = _dispatch.no_host_values(absmax)
    if traced:
        offset = absmax.mean()
    else:  # a CPU mean of over 32K blocks (a 2M+ weight) is split across threads otherwise
        with _dispatch.one_cpu_thread(absmax.device):
            offset = absmax.mean()
    centred = absmax - offset
    # (a NaN/inf weight is nf4_quantize's own error, which inductor may raise after this one)
    finite = torch.isfinite(centred).all() | ~torch.isfinite(absmax).all()
    msg = ("nf4_quantize: weights this large{} overflow fp32 in double quantization (the mean "
           "of the block absmax; bitsandbytes silently returns NaN weights); quantize with "
           "double_quant=False (bnb_4bit_use_double_quant=False) or rescale them")
    if traced:  # a host read here breaks the graph
        torch._assert_async(finite, msg.format(""))
    elif not finite:
        raise ValueError(msg.format(f" (max |w| = {absmax.max().item():.3g})"))
    q, am2 = quantize_blockwise_ref(centred, signed=True)
    return q.contiguous(), am2, offset if traced else offset.item(), _tables(absmax.device)[2]


def _make_state(absmax, w, blocksize, double_quant) -> NF4State:
    code = _tables(absmax.device)[0]
    if not double_quant:
        return NF4State(absmax, w.shape, w.dtype, blocksize, code)
    q, am2, offset, dyn = _quantize_absmax(absmax)
    return NF4State(q, w.shape, w.dtype, blocksize, code, offset, am2, dyn)


def nf4_quantize_ref(w: torch.Tensor, blocksize: int = 64, double_quant: bool = True):
    """The spec of ``nf4_quantize``: w of any shape, fp32/fp16/bf16 -> (packed (ceil(n/2), 1)
    uint8, NF4State)."""
    flat = w.reshape(-1).float()
    n = flat.numel()
    full = n - n % blocksize
    code, bounds, _ = _tables(w.device)
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
    """fp32 (blocks,) scales. The state's vectors are read flat, as the kernels read them: a
    (blocks, 1) absmax was broadcast against the (blocks,) block index into a wrong weight."""
    absmax = state.absmax.reshape(-1)
    if not state.nested:
        return absmax.float()
    blk = torch.arange(absmax.numel(), device=absmax.device) // state.nested_blocksize
    return (state.nested_code.reshape(-1)[absmax.long()] * state.nested_absmax.reshape(-1)[blk]
            + state.offset)


def nf4_dequantize_ref(packed: torch.Tensor, state: NF4State, dtype: torch.dtype | None = None):
    """The spec of ``nf4_dequantize``: packed (ceil(n/2), 1) uint8 + NF4State -> state.shape in
    dtype (default state.dtype)."""
    n, bs = state.numel, state.blocksize
    b = packed.reshape(-1)
    q = torch.stack([b >> 4, b & 15], 1).reshape(-1)[:n].long()
    am = _absmax_ref(state)
    vals = F.pad(state.code.reshape(-1)[q], (0, am.numel() * bs - n)).view(-1, bs) * am[:, None]
    return vals.reshape(-1)[:n].view(state.shape).to(dtype or state.dtype)


def nf4_linear_ref(x: torch.Tensor, weight: NF4Weight, bias: torch.Tensor | None = None):
    """The spec of ``nf4_linear``: x (..., in) -> (..., out) in x.dtype, W dequantized densely."""
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
]


# ----------------------------------------------------------------------------------- launchers
def _nf4_quantize(w: torch.Tensor, blocksize: int, double_quant: bool):
    x = w.reshape(-1).contiguous()
    n = x.numel()
    packed = torch.empty(((n + 1) // 2, 1), dtype=torch.uint8, device=w.device)
    absmax = torch.empty(-(-n // blocksize), dtype=torch.float32, device=w.device)
    rows = max(1, 2048 // blocksize)
    _nf4_quantize_kernel[(triton.cdiv(absmax.numel(), rows),)](
        x, packed, absmax, _tables(w.device)[1], n, BS=blocksize, ROWS=rows, num_warps=4)
    return packed, _make_state(absmax, w, blocksize, double_quant)


def _nf4_dequantize(packed: torch.Tensor, state: NF4State, dtype: torch.dtype) -> torch.Tensor:
    out = torch.empty(state.shape, dtype=dtype, device=packed.device)
    per_program = 512  # words: 4096 values per program
    absmax, am2, code, code2, offset = state_args(state)
    bf16 = dtype == torch.bfloat16
    _nf4_dequant_kernel[(triton.cdiv(state.numel, per_program * 8),)](
        words(packed), absmax, am2, code, code2,
        out.view(torch.uint16) if bf16 else out, offset, state.numel, BS=state.blocksize,
        NBS=state.nested_blocksize, WORDS=per_program, NESTED=state.nested, BF16_BITS=bf16,
        num_warps=4, enable_fp_fusion=False)
    return out


def nf4_mm(x2: torch.Tensor, weight: NF4Weight, bias: torch.Tensor | None = None):
    """Triton path of x2 (M, K) @ W^T (+ bias): dequant + cuBLAS, or for a few rows one of the
    fused kernels of ``ember.kernels.nf4_matmul``, whichever was timed fastest for this shape."""
    bias = None if bias is None else bias.to(x2.dtype)

    def run(path: str) -> torch.Tensor:
        if path != "dequant":
            return fused_mm(x2, weight, bias, path)
        w = _nf4_dequantize(weight.packed, weight.state, x2.dtype)
        return x2 @ w.t() if bias is None else torch.addmm(bias, x2, w.t())

    if x2.shape[0] <= SMALL_M:
        x2 = x2.contiguous()
        return run(choose(x2, weight, run))
    return run("dequant")


class _NF4Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2, bias, weight):
        ctx.weight, ctx.bias_dtype = weight, None if bias is None else bias.dtype
        return nf4_mm(x2, weight, bias)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        dx = dbias = None
        if ctx.needs_input_grad[0]:  # re-dequantize: the dense weight is never kept
            dx = dy @ _nf4_dequantize(ctx.weight.packed, ctx.weight.state, dy.dtype)
        if ctx.needs_input_grad[1]:
            dbias = dy.sum(0).to(ctx.bias_dtype)
        return dx, dbias, None


# -------------------------------------------------------------------------------------- public
def _as_index(value):
    """value as a Python int when it is an integer (int, NumPy integer, one-element integer
    tensor), else unchanged (the caller's check refuses it)."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not (
            value.is_floating_point() or value.is_complex() or value.dtype == torch.bool):
        return int(value.item())
    if isinstance(value, bool) or isinstance(value, torch.Tensor):
        return value
    try:
        return operator.index(value)
    except TypeError:
        return value


def nf4_quantize(w: torch.Tensor, blocksize: int = 64, double_quant: bool = True, *,
                 impl: str | None = None):
    """Quantize ``w`` (any shape, fp32/fp16/bf16) to NF4 in blocks of ``blocksize`` (32..4096),
    byte for byte as bitsandbytes' ``quantize_4bit(quant_type="nf4",
    compress_statistics=double_quant)``: returns (packed (ceil(n/2), 1) uint8, NF4State)."""
    check_tensors("nf4_quantize", w=w)
    check_dtype("nf4_quantize", "w", w)
    # 64.0 is "in" BLOCKSIZES and crashed in torch.empty; a 0-d tensor crashed the launcher (and
    # became a tensor field of the reference's state): an integer, read as a Python int
    blocksize = _as_index(blocksize)
    if not isinstance(blocksize, int) or blocksize not in BLOCKSIZES:
        raise ValueError(f"nf4_quantize: blocksize must be an int, one of {BLOCKSIZES}, got "
                         f"{blocksize!r}")
    if w.numel() == 0:
        raise ValueError("nf4_quantize: cannot quantize an empty tensor")
    lo, hi = torch.aminmax(w.detach())  # NaN propagates; no n-element temporary
    finite = torch.isfinite(lo) & torch.isfinite(hi)
    msg = (f"nf4_quantize: w of shape {tuple(w.shape)} holds inf or NaN values, which have no "
           "4-bit code (bitsandbytes silently dequantizes their block, with double quantization "
           "the whole weight, to inf/NaN); fix or re-export the weights before quantizing")
    if _dispatch.no_host_values(w):  # torch.compile / fake tensors: a host read breaks the graph
        torch._assert_async(finite, msg)
    elif not finite:
        raise ValueError(msg)
    if use_triton(w, impl, "nf4_quantize"):
        with _dispatch.device_guard(w):
            return _nf4_quantize(w.detach(), blocksize, double_quant)
    return nf4_quantize_ref(w.detach(), blocksize, double_quant)


def nf4_dequantize(packed: torch.Tensor, state: NF4State, dtype: torch.dtype | None = None, *,
                   impl: str | None = None) -> torch.Tensor:
    """The dense weight (state.shape) in ``dtype`` (fp32/fp16/bf16; default: the dtype it was
    quantized from) from packed (ceil(n/2), 1) uint8 codes and their state: an NF4State, or a
    bitsandbytes QuantState / ``as_dict()`` / ``as_dict(packed=True)``."""
    check_tensors("nf4_dequantize", packed=packed)
    state = as_nf4_state(state)
    dtype = dtype or state.dtype
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"nf4_dequantize: dtype must be float32/float16/bfloat16, got {dtype}")
    packed = _check_state("nf4_dequantize", packed, state)
    if state.absmax.device != packed.device:
        raise ValueError(f"nf4_dequantize: packed on {packed.device} but state on "
                         f"{state.absmax.device}; move both with NF4Weight.to(device)")
    if use_triton(packed, impl, "nf4_dequantize"):
        with _dispatch.device_guard(packed):
            return _nf4_dequantize(packed.contiguous(), state, dtype)
    return nf4_dequantize_ref(packed, state, dtype)


def nf4_linear(x: torch.Tensor, weight: NF4Weight, bias: torch.Tensor | None = None, *,
               impl: str | None = None) -> torch.Tensor:
    """y = x W^T + b for x (..., in) fp32/fp16/bf16, an NF4 weight (out, in) (an ``NF4Weight`` or a
    bitsandbytes ``Params4bit``) and bias (out,) or None; output (..., out) in x.dtype; W itself
    gets no gradient."""
    check_tensors("nf4_linear", x=x)
    check_dtype("nf4_linear", "x", x)
    weight = as_nf4_weight(weight)
    if not isinstance(weight, NF4Weight):
        raise ValueError(f"nf4_linear: weight must be an NF4Weight (NF4Weight.quantize(w)) or a "
                         f"bitsandbytes Params4bit, got {type(weight).__name__}; use F.linear "
                         "for a dense weight")
    if len(weight.shape) != 2 or weight.shape[1] != x.shape[-1]:
        raise ValueError(f"nf4_linear: x {tuple(x.shape)} does not match weight "
                         f"{tuple(weight.shape)} (out, in)")
    if weight.device != x.device:
        raise ValueError(f"nf4_linear: x on {x.device}, weight on {weight.device}")
    if bias is not None:
        # The fused kernels read bias[:out] unchecked: a short bias would add memory past its end.
        check_tensors("nf4_linear", bias=bias)
        check_dtype("nf4_linear", "bias", bias)
        if tuple(bias.shape) != (weight.shape[0],) or bias.device != x.device:
            raise ValueError(f"nf4_linear: bias must be ({weight.shape[0]},) on {x.device}, got "
                             f"{tuple(bias.shape)} on {bias.device}")
    if not use_triton(x, impl, "nf4_linear"):
        return nf4_linear_ref(x, weight, bias)
    # Under torch.autocast x and bias in its dtype, as nf4_linear_ref's F.linear sees them (the
    # fused small-M kernels otherwise answered in fp32 where the dequant path gave bf16).
    x, bias = _dispatch.cast_floats(_dispatch.autocast_dtype(x), x, bias)
    with _dispatch.no_autocast(x), _dispatch.device_guard(x):
        y = _NF4Linear.apply(x.reshape(-1, x.shape[-1]), bias, weight)
    return y.view(*x.shape[:-1], weight.shape[0])
