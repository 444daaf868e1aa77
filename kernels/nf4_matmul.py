"""x (M, K) @ dequant(W_nf4 (N, K))^T for few rows (decode, eval), in one pass over the packed
weight, and the choice between that and dequantize-then-cuBLAS.

Two fused kernels, both reading 0.5 byte per weight (+ the block scales) and never writing the
dense weight:
- ``gemv`` (M <= 4): CUDA cores. Each program dequantizes a (BLOCK_N, BLOCK_K) tile once in fp32
  and multiplies it into every row of x, accumulating elementwise in fp32 registers over its K
  slice and reducing along K once at the end (no cross-thread reduction per step).
- ``fused`` (M <= 16): tensor cores; the dequantized tile is the B operand of ``tl.dot`` with x
  padded to 16 rows.
Both split K into slices (enough programs to keep every SM busy) whose fp32 partial sums are then
added; with one slice the bias is fused. Weights need in_features % blocksize == 0 and blocksize
<= the K tile.

Which path is fastest depends on the GPU, the shape and the row count (on an H100 the first
``fused`` kernel measured 0.46 ms for M = 1..16 on a 14336x4096 weight, dequant + cuBLAS ~0.11
ms). So ``nf4_mm`` times the paths that apply once per (device, dtype, M, N, K, blocksize,
nested) on the first call and remembers the fastest (a few ms, once per shape).
``EMBER_NF4_MATMUL=dequant|fused|gemv`` forces a path where it applies (``auto``: the default).
Under the Triton interpreter the fused kernels are always taken, so that CI keeps them correct.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable

import torch
import triton
import triton.language as tl

from ember.kernels._codegen import CONSUMER_SHARED
from ember.kernels._dispatch import interpreting


def fused_mm_ref(x2: torch.Tensor, weight, bias: torch.Tensor | None = None,
                 path: str = "fused", split: int | None = None) -> torch.Tensor:
    """The spec of ``fused_mm`` (every path and split gives this): x2 @ dequant(W)^T (+ bias) in
    PyTorch, ``ember.kernels.nf4.nf4_linear_ref`` (imported here: nf4 imports this module)."""
    from ember.kernels.nf4 import nf4_linear_ref

    return nf4_linear_ref(x2, weight, bias)

SMALL_M = 16  # rows up to which the fused tensor-core kernel is a candidate
GEMV_M = 4  # rows up to which the CUDA-core kernel is a candidate
PATHS = ("dequant", "fused", "gemv")


@triton.jit
def _nibbles(word):
    """(..., ) int32 words of packed bytes -> (..., 8) codes in element order: byte 0 (the least
    significant, little-endian) holds elements 0 (high nibble) and 1 (low nibble)."""
    j = tl.arange(0, 8)
    return (tl.expand_dims(word, -1) >> (8 * (j // 2) + 4 - 4 * (j % 2))) & 15


@triton.jit
def _dequant_tile(P, ABSMAX, ABSMAX2, CODE, CODE2, offset, rn, nmask, k0, KW,
                  BS: tl.constexpr, NBS: tl.constexpr, NESTED: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """W[rn, k0:k0+BLOCK_K] in fp32 (BLOCK_N, BLOCK_K); 0 outside the weight. KW = K // 8 words
    per row is an argument (not computed here) so that its divisibility reaches the loads."""
    rw = k0 // 8 + tl.arange(0, BLOCK_K // 8)
    word = tl.load(P + rn[:, None] * KW + rw[None, :], mask=nmask[:, None] & (rw[None, :] < KW),
                   other=0)
    q = tl.reshape(_nibbles(word), (BLOCK_N, BLOCK_K // BS, BS))
    nblk = KW * 8 // BS
    rblk = k0 // BS + tl.arange(0, BLOCK_K // BS)
    bmask = nmask[:, None] & (rblk[None, :] < nblk)
    blk = rn[:, None] * nblk + rblk[None, :]
    am = tl.load(ABSMAX + blk, mask=bmask, other=0)
    if NESTED:
        am2 = tl.load(ABSMAX2 + blk // NBS, mask=bmask, other=0.0)
        am = tl.load(CODE2 + am.to(tl.int32)) * am2 + offset
    return tl.reshape(tl.load(CODE + q) * am.to(tl.float32)[:, :, None], (BLOCK_N, BLOCK_K))


@triton.jit
def _nf4_matmul_kernel(X, P, ABSMAX, ABSMAX2, CODE, CODE2, BIAS, OUT, offset, M, N, KW,
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
    k_hi = tl.minimum(k_lo + K_SPLIT, KW * 8)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(X + rm[:, None] * stride_xm + rk[None, :],
                    mask=(rm[:, None] < M) & (rk[None, :] < k_hi), other=0.0)
        w = _dequant_tile(P, ABSMAX, ABSMAX2, CODE, CODE2, offset, rn, nmask, k0, KW, BS, NBS,
                          NESTED, BLOCK_N, BLOCK_K)
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


@triton.jit
def _nf4_gemv_kernel(X, P, ABSMAX, ABSMAX2, CODE, CODE2, BIAS, OUT, offset, M, N, KW,
                     stride_xm, stride_os, stride_om, K_SPLIT, BS: tl.constexpr,
                     NBS: tl.constexpr, NESTED: tl.constexpr, HAS_BIAS: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Same contract as _nf4_matmul_kernel, on CUDA cores, for M <= BLOCK_M (a few rows)."""
    pid_n = tl.program_id(0).to(tl.int64)
    pid_s = tl.program_id(1).to(tl.int64)
    rm = tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = rn < N
    acc = tl.zeros([BLOCK_M, BLOCK_N, BLOCK_K], dtype=tl.float32)
    k_lo = pid_s * K_SPLIT
    k_hi = tl.minimum(k_lo + K_SPLIT, KW * 8)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(X + rm[:, None] * stride_xm + rk[None, :],
                    mask=(rm[:, None] < M) & (rk[None, :] < k_hi), other=0.0).to(tl.float32)
        w = _dequant_tile(P, ABSMAX, ABSMAX2, CODE, CODE2, offset, rn, nmask, k0, KW, BS, NBS,
                          NESTED, BLOCK_N, BLOCK_K)
        acc += x[:, None, :] * w[None, :, :]
    out = tl.sum(acc, axis=2)  # (BLOCK_M, BLOCK_N)
    if HAS_BIAS:
        out += tl.load(BIAS + rn, mask=nmask, other=0.0).to(tl.float32)[None, :]
    o = OUT + pid_s * stride_os + rm[:, None] * stride_om + rn[None, :]
    tl.store(o, out.to(OUT.dtype.element_ty), mask=(rm[:, None] < M) & nmask[None, :])


def _config(path: str, dtype: torch.dtype, m: int) -> dict:
    """Tiles. ``fused``: fp32 operands (IEEE dot) get half the K tile, so that the pipelined
    buffers fit the shared memory of every sm_80+ GPU. ``gemv``: rows x BLOCK_N x BLOCK_K fp32
    accumulators = 32 registers per thread per row."""
    if path == "gemv":
        rows = triton.next_power_of_2(m)
        return {"BLOCK_M": rows, "BLOCK_N": 16 // rows if rows < 4 else 4, "BLOCK_K": 256,
                "num_warps": 4, "num_stages": 3}
    fp32 = dtype == torch.float32
    return {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 128 if fp32 else 256, "num_warps": 4,
            "num_stages": 2 if fp32 else 3}


def _sig(**kw):
    return {k: ("constexpr" if v is None else v) for k, v in kw.items()}


_C = None


def _spec(path: str, xt: str, ot: str, dtype: torch.dtype, nested: bool, m: int = 16):
    cfg = _config(path, dtype, m)
    # One fixed config per path: it must fit the smallest sm_80+ GPU (see CONSUMER_SHARED).
    opts = {k: cfg.pop(k) for k in ("num_warps", "num_stages")} | {"shared_max": CONSUMER_SHARED}
    sig = _sig(X=xt, P="*i32", ABSMAX="*u8" if nested else "*fp32", ABSMAX2="*fp32",
               CODE="*fp32", CODE2="*fp32", BIAS=xt, OUT=ot, offset="fp32", M="i32", N="i32",
               KW="i32", stride_xm="i32", stride_os="i32", stride_om="i32", K_SPLIT="i32",
               BS=_C, NBS=_C, NESTED=_C, HAS_BIAS=_C, BLOCK_M=_C, BLOCK_N=_C, BLOCK_K=_C)
    cx = {"BS": 64, "NBS": 256, "NESTED": nested, "HAS_BIAS": ot == xt, **cfg}
    if path == "gemv":
        return (_nf4_gemv_kernel, sig, cx, opts)
    sig.update(_sig(IEEE=_C, INTERPRET=_C))
    return (_nf4_matmul_kernel, sig, {**cx, "IEEE": dtype == torch.float32, "INTERPRET": False},
            opts)


COMPILE_SPECS = [
    _spec("fused", "*bf16", "*bf16", torch.bfloat16, True),  # one K slice, bias fused
    _spec("fused", "*fp16", "*fp32", torch.float16, False),  # K split into fp32 partial sums
    _spec("fused", "*fp32", "*fp32", torch.float32, True),
    _spec("gemv", "*bf16", "*fp32", torch.bfloat16, True, m=1),
    _spec("gemv", "*fp16", "*fp16", torch.float16, False, m=4),
]


# ----------------------------------------------------------------------------------- launchers
def words(packed: torch.Tensor) -> torch.Tensor:
    """The packed bytes as int32 words (kernels read 4 bytes = 8 values at a time); sizes that are
    not a multiple of 8 values (never a real weight) pay for a padded copy."""
    flat = packed.reshape(-1).contiguous()
    if flat.numel() % 4 or flat.data_ptr() % 4:
        flat = torch.nn.functional.pad(flat, (0, -flat.numel() % 4))
    return flat.view(torch.int32)


def state_args(state):
    """(ABSMAX, ABSMAX2, CODE, CODE2, offset) kernel arguments of an NF4State (placeholders when
    not nested). The kernels index them as dense vectors, so strided views are compacted."""
    absmax, code = state.absmax.contiguous(), state.code.contiguous()
    if state.nested:
        return (absmax, state.nested_absmax.contiguous(), code, state.nested_code.contiguous(),
                state.offset_value)
    return absmax, absmax, code, code, 0.0


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def applies(path: str, m: int, weight, dtype: torch.dtype) -> bool:
    """Whether ``path`` can compute x (m, K) @ W^T for this NF4 weight."""
    if path == "dequant":
        return True
    if len(weight.shape) != 2 or m < 1 or m > (GEMV_M if path == "gemv" else SMALL_M):
        return False
    k, bs = weight.shape[1], weight.blocksize
    return weight.shape[0] > 0 and k % bs == 0 and bs <= _config(path, dtype, m)["BLOCK_K"]


def fused_mm(x2: torch.Tensor, weight, bias: torch.Tensor | None, path: str = "fused",
             split: int | None = None) -> torch.Tensor:
    """x2 (M, K) @ dequant(W)^T (+ bias) with the ``fused`` or ``gemv`` kernel; ``split``
    K-slices (default: enough programs to cover the GPU about twice) are summed in fp32."""
    m, k = x2.shape
    n = weight.shape[0]
    st = weight.state
    cfg = _config(path, x2.dtype, m)
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
    absmax, am2, code, code2, offset = state_args(st)
    fuse_bias = bias is not None and split == 1
    if fuse_bias:
        bias = bias.contiguous()  # read as BIAS + column
    args = (x2, words(weight.packed), absmax, am2, code, code2, bias if fuse_bias else x2,
            out, offset, m, n, k // 8, x2.stride(0), out.stride(0), out.stride(1), k_split)
    kw = {"BS": st.blocksize, "NBS": st.nested_blocksize, "NESTED": st.nested,
          "HAS_BIAS": fuse_bias, "enable_fp_fusion": False, **cfg}
    if path == "gemv":
        _nf4_gemv_kernel[(tiles, split)](*args, **kw)
    else:
        _nf4_matmul_kernel[(tiles, split)](*args, IEEE=x2.dtype == torch.float32,
                                           INTERPRET=interpreting(), **kw)
    if split == 1:
        return out[0]
    y = out.sum(0).to(x2.dtype)
    return y if bias is None else y.add_(bias.to(y.dtype))


# -------------------------------------------------------------------------------------- choice
_CHOICE: dict[tuple, str] = {}


def _forced() -> str:
    v = os.environ.get("EMBER_NF4_MATMUL", "auto")
    if v not in ("auto", *PATHS):
        raise ValueError(f"EMBER_NF4_MATMUL must be one of auto, {', '.join(PATHS)}; got {v!r}")
    return v


def _cuda_ms(fn: Callable[[], object], reps: int = 10) -> float:
    """Mean time of fn with a cold L2 before each call (a decode step streams every layer's
    weights, so none of them is in L2 when its matmul runs)."""
    fn()  # compiles on first use
    flush = torch.empty(torch.cuda.get_device_properties(torch.cuda.current_device()).L2_cache_size
                        or 64 << 20, dtype=torch.uint8, device="cuda")
    pairs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
             for _ in range(reps)]
    for start, end in pairs:
        flush.zero_()
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return sum(s.elapsed_time(e) for s, e in pairs) / reps


def _key(x2: torch.Tensor, weight) -> tuple:
    return (str(x2.device), x2.dtype, x2.shape[0], tuple(weight.shape), weight.blocksize,
            weight.state.nested)


def remembered(x2: torch.Tensor, weight) -> str | None:
    """The path timed fastest for this shape, if it has been timed."""
    return _CHOICE.get(_key(x2, weight))


def choose(x2: torch.Tensor, weight, run: Callable[[str], torch.Tensor], *,
           timer: Callable[[Callable[[], object]], float] | None = None) -> str:
    """The path for x2 @ W^T: forced by EMBER_NF4_MATMUL, else the fastest of those that apply,
    timed once per shape with ``timer`` (CUDA events by default) and remembered."""
    m = x2.shape[0]
    paths = [p for p in PATHS if applies(p, m, weight, x2.dtype)]
    forced = _forced()
    if forced != "auto":
        return forced if forced in paths else "dequant"
    if len(paths) == 1:
        return paths[0]
    if timer is None:
        if interpreting() or not x2.is_cuda:
            return "gemv" if "gemv" in paths else "fused"
        if torch.cuda.is_current_stream_capturing():
            return "dequant"
        timer = _cuda_ms
    key = _key(x2, weight)
    if key not in _CHOICE:
        if torch.compiler.is_compiling():
            # Timing with CUDA events inside traced code is a graph break (an error under
            # fullgraph) and would time fake tensors: the untimed default until an eager call
            # has timed this shape.
            return "gemv" if "gemv" in paths else "fused"
        try:
            times = {p: timer(functools.partial(run, p)) for p in paths}
        except torch.OutOfMemoryError:  # no room to time: the path that always works
            return "dequant"
        _CHOICE[key] = min(times, key=times.get)
    return _CHOICE[key]
