"""RMSNorm: y = x / sqrt(mean(x^2) + eps) * (offset + w).

Contract: x (..., D) fp32/fp16/bf16; weight (D,) fp32/fp16/bf16 (may differ from x's dtype; any
stride: a non-contiguous weight is copied).
Statistics in fp32, output in x.dtype. ``offset=1.0`` gives Gemma's ``(1 + w)``.

Triton path: x is viewed as (M, D) rows; the last dim must be contiguous (a copy is made
otherwise) and rows may have any stride that collapses into one. Forward saves x, weight and the
per-row rstd = 1/sqrt(mean(x^2)+eps) (M fp32 values). Backward, with x_hat = x * rstd and
g = dy * (offset + w):

    dx = rstd * (g - x_hat * mean(g * x_hat))        dw = sum_rows(dy * x_hat)

dw is reduced in two stages so no program contends on one row: a fixed number of programs (about
two per SM) each walk a contiguous slab of rows and write one fp32 partial row of dw, then the
(programs, D) partials are summed.

Rows wider than ``_MAX_D`` (65536) do not fit one block: they take the looped kernels, one row at
a time per program, which walk the row in ``_LOOP_BLOCK_N`` chunks: forward sums the squares in a
first pass and normalizes in a second; backward reduces mean(g * x_hat) in a first pass and
writes dx in a second, adding dy * x_hat into the program's own fp32 partial row of dw (the same
two-stage reduction). Any D works; the choice is automatic.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from ember.kernels import _dispatch
from ember.kernels._dispatch import check_dtype, check_tensors, use_triton

_MAX_D = 65536  # widest row one block holds; wider rows take the looped kernels
_LOOP_BLOCK_N = 4096  # chunk of a row the looped kernels handle per step


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6,
                 offset: float = 0.0) -> torch.Tensor:
    """The spec of ``rms_norm``: x (..., D) fp32/fp16/bf16, weight (D,) any float dtype; fp32
    statistics; returns x's shape and dtype. Plain autograd (double backward works)."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (y * (offset + weight.float())).to(x.dtype)


@triton.jit
def _rms_norm_fwd_kernel(X, W, Y, RSTD, M, N, stride_x, stride_y, eps, offset,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    rmask = rows < M
    cmask = cols < N
    mask = rmask[:, None] & cmask[None, :]
    x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / N + eps)
    w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32) + offset
    y = x * rstd[:, None] * w[None, :]
    tl.store(Y + rows[:, None] * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + rows, rstd, mask=rmask)


@triton.jit
def _rms_norm_bwd_kernel(DY, X, W, RSTD, DX, DW_PARTIAL, M, N, rows_per_program,
                         stride_dy, stride_x, stride_dx, offset,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    cmask = cols < N
    w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32) + offset
    dw = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    first = pid * rows_per_program
    # rows_per_program is a multiple of BLOCK_M, so slabs of neighbouring programs never overlap.
    for start in range(0, rows_per_program, BLOCK_M):
        rows = first + start + tl.arange(0, BLOCK_M)
        rmask = rows < M
        mask = rmask[:, None] & cmask[None, :]
        x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
        x = x.to(tl.float32)
        dy = tl.load(DY + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0)
        dy = dy.to(tl.float32)
        rstd = tl.load(RSTD + rows, mask=rmask, other=0.0)
        x_hat = x * rstd[:, None]
        g = dy * w[None, :]
        c = tl.sum(g * x_hat, axis=1) / N
        dx = (g - x_hat * c[:, None]) * rstd[:, None]
        tl.store(DX + rows[:, None] * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty),
                 mask=mask)
        dw += dy * x_hat
    tl.store(DW_PARTIAL + pid * N + cols, tl.sum(dw, axis=0), mask=cmask)


@triton.jit
def _rms_norm_fwd_looped_kernel(X, W, Y, RSTD, N, stride_x, stride_y, eps, offset,
                                BLOCK_N: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = X + row * stride_x
    y_row = Y + row * stride_y
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for start in range(0, N, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        x = tl.load(x_row + cols, mask=cols < N, other=0.0).to(tl.float32)
        acc += x * x
    rstd = 1.0 / tl.sqrt(tl.sum(acc, axis=0) / N + eps)
    for start in range(0, N, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        cmask = cols < N
        x = tl.load(x_row + cols, mask=cmask, other=0.0).to(tl.float32)
        w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32) + offset
        tl.store(y_row + cols, (x * rstd * w).to(Y.dtype.element_ty), mask=cmask)
    tl.store(RSTD + row, rstd)


@triton.jit
def _bwd_chunk(DY, X, W, row, start, N, stride_dy, stride_x, offset, BLOCK_N: tl.constexpr):
    """Columns [start, start + BLOCK_N) of one row: (cols, mask, x, dy, w + offset), in fp32."""
    cols = start + tl.arange(0, BLOCK_N)
    cmask = cols < N
    x = tl.load(X + row * stride_x + cols, mask=cmask, other=0.0).to(tl.float32)
    dy = tl.load(DY + row * stride_dy + cols, mask=cmask, other=0.0).to(tl.float32)
    w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32) + offset
    return cols, cmask, x, dy, w


@triton.jit
def _rms_norm_bwd_looped_kernel(DY, X, W, RSTD, DX, DW_PARTIAL, M, N, rows_per_program,
                                stride_dy, stride_x, stride_dx, offset, BLOCK_N: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    dw_row = DW_PARTIAL + pid * N  # this program's own partial row: zeroed by the launcher
    first = pid * rows_per_program
    for r in range(0, rows_per_program):
        row = first + r
        if row < M:
            rstd = tl.load(RSTD + row)
            acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
            for start in range(0, N, BLOCK_N):
                cols, cmask, x, dy, w = _bwd_chunk(DY, X, W, row, start, N, stride_dy, stride_x,
                                                   offset, BLOCK_N)
                acc += dy * w * x
            c = tl.sum(acc, axis=0) * rstd / N
            for start in range(0, N, BLOCK_N):
                cols, cmask, x, dy, w = _bwd_chunk(DY, X, W, row, start, N, stride_dy, stride_x,
                                                   offset, BLOCK_N)
                x_hat = x * rstd
                dx = (dy * w - x_hat * c) * rstd
                tl.store(DX + row * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=cmask)
                dw = tl.load(dw_row + cols, mask=cmask, other=0.0)
                tl.store(dw_row + cols, dw + dy * x_hat, mask=cmask)


_LOOPED_FWD_SIG = {"X": "*bf16", "W": "*fp32", "Y": "*bf16", "RSTD": "*fp32", "N": "i32",
                   "stride_x": "i32", "stride_y": "i32", "eps": "fp32", "offset": "fp32",
                   "BLOCK_N": "constexpr"}
_LOOPED_BWD_SIG = {"DY": "*bf16", "X": "*bf16", "W": "*fp32", "RSTD": "*fp32", "DX": "*bf16",
                   "DW_PARTIAL": "*fp32", "M": "i32", "N": "i32", "rows_per_program": "i32",
                   "stride_dy": "i32", "stride_x": "i32", "stride_dx": "i32", "offset": "fp32",
                   "BLOCK_N": "constexpr"}

COMPILE_SPECS = [
    (_rms_norm_fwd_looped_kernel, _LOOPED_FWD_SIG, {"BLOCK_N": 4096}, {"num_warps": 8}),
    (_rms_norm_fwd_looped_kernel, {k: "*fp32" if v == "*bf16" else v
                                   for k, v in _LOOPED_FWD_SIG.items()},
     {"BLOCK_N": 4096}, {"num_warps": 8}),
    (_rms_norm_bwd_looped_kernel, _LOOPED_BWD_SIG, {"BLOCK_N": 4096}, {"num_warps": 8}),
    (_rms_norm_bwd_looped_kernel, {k: "*fp32" if v == "*bf16" else v
                                   for k, v in _LOOPED_BWD_SIG.items()},
     {"BLOCK_N": 4096}, {"num_warps": 8}),
    (_rms_norm_fwd_kernel,
     {"X": "*fp32", "W": "*fp32", "Y": "*fp32", "RSTD": "*fp32", "M": "i32", "N": "i32",
      "stride_x": "i32", "stride_y": "i32", "eps": "fp32", "offset": "fp32",
      "BLOCK_M": "constexpr", "BLOCK_N": "constexpr"},
     {"BLOCK_M": 16, "BLOCK_N": 128}),
    (_rms_norm_fwd_kernel,
     {"X": "*bf16", "W": "*bf16", "Y": "*bf16", "RSTD": "*fp32", "M": "i32", "N": "i32",
      "stride_x": "i32", "stride_y": "i32", "eps": "fp32", "offset": "fp32",
      "BLOCK_M": "constexpr", "BLOCK_N": "constexpr"},
     {"BLOCK_M": 1, "BLOCK_N": 4096}, {"num_warps": 8}),
    (_rms_norm_bwd_kernel,
     {"DY": "*fp32", "X": "*fp32", "W": "*fp32", "RSTD": "*fp32", "DX": "*fp32",
      "DW_PARTIAL": "*fp32", "M": "i32", "N": "i32", "rows_per_program": "i32",
      "stride_dy": "i32", "stride_x": "i32", "stride_dx": "i32", "offset": "fp32",
      "BLOCK_M": "constexpr", "BLOCK_N": "constexpr"},
     {"BLOCK_M": 16, "BLOCK_N": 128}),
    (_rms_norm_bwd_kernel,
     {"DY": "*bf16", "X": "*bf16", "W": "*fp32", "RSTD": "*fp32", "DX": "*bf16",
      "DW_PARTIAL": "*fp32", "M": "i32", "N": "i32", "rows_per_program": "i32",
      "stride_dy": "i32", "stride_x": "i32", "stride_dx": "i32", "offset": "fp32",
      "BLOCK_M": "constexpr", "BLOCK_N": "constexpr"},
     {"BLOCK_M": 1, "BLOCK_N": 4096}, {"num_warps": 8}),
]


def _blocks(n: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps): a whole row per block; several rows when rows are short so a
    program still moves ~2K elements."""
    block_n = triton.next_power_of_2(n)
    block_m = max(1, min(16, 2048 // block_n))
    size = block_m * block_n
    num_warps = 16 if size >= 16384 else 8 if size >= 4096 else 4
    return block_m, block_n, num_warps


def _rows(t: torch.Tensor) -> torch.Tensor:
    """t as (M, D) with unit stride along D, copying only when no such view exists."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _rms_norm_fwd(x2: torch.Tensor, weight: torch.Tensor, eps: float, offset: float):
    m, n = x2.shape
    y = torch.empty((m, n), device=x2.device, dtype=x2.dtype)
    rstd = torch.empty(m, device=x2.device, dtype=torch.float32)
    if m == 0:
        return y, rstd
    if n > _MAX_D:
        _rms_norm_fwd_looped_kernel[(m,)](
            x2, weight, y, rstd, n, x2.stride(0), y.stride(0), eps, offset,
            BLOCK_N=_LOOP_BLOCK_N, num_warps=8)
        return y, rstd
    block_m, block_n, num_warps = _blocks(n)
    _rms_norm_fwd_kernel[(triton.cdiv(m, block_m),)](
        x2, weight, y, rstd, m, n, x2.stride(0), y.stride(0), eps, offset,
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps)
    return y, rstd


def _num_partials(device: torch.device, tiles: int) -> int:
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        return max(1, min(tiles, 2 * sms))
    # The interpreter runs programs one after another: a few are enough to exercise the reduction.
    return max(1, min(tiles, 3))


def _rms_norm_bwd(dy2: torch.Tensor, x2: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor,
                  offset: float):
    m, n = x2.shape
    dx = torch.empty((m, n), device=x2.device, dtype=x2.dtype)
    if m == 0:
        return dx, torch.zeros_like(weight)
    if n > _MAX_D:
        programs = _num_partials(x2.device, m)
        rows_per_program = triton.cdiv(m, programs)
        programs = triton.cdiv(m, rows_per_program)
        partial = torch.zeros((programs, n), device=x2.device, dtype=torch.float32)
        _rms_norm_bwd_looped_kernel[(programs,)](
            dy2, x2, weight, rstd, dx, partial, m, n, rows_per_program,
            dy2.stride(0), x2.stride(0), dx.stride(0), offset,
            BLOCK_N=_LOOP_BLOCK_N, num_warps=8)
        return dx, partial.sum(0).to(weight.dtype)
    block_m, block_n, num_warps = _blocks(n)
    tiles = triton.cdiv(m, block_m)
    programs = _num_partials(x2.device, tiles)
    rows_per_program = triton.cdiv(tiles, programs) * block_m
    programs = triton.cdiv(m, rows_per_program)
    partial = torch.empty((programs, n), device=x2.device, dtype=torch.float32)
    _rms_norm_bwd_kernel[(programs,)](
        dy2, x2, weight, rstd, dx, partial, m, n, rows_per_program,
        dy2.stride(0), x2.stride(0), dx.stride(0), offset,
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps)
    return dx, partial.sum(0).to(weight.dtype)


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps, offset):
        x2 = _rows(x)
        y, rstd = _rms_norm_fwd(x2, weight, eps, offset)
        ctx.save_for_backward(x2, weight, rstd)
        ctx.offset = offset
        return y.view(x.shape)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x2, weight, rstd = ctx.saved_tensors
        dx, dw = _rms_norm_bwd(_rows(dy), x2, weight, rstd, ctx.offset)
        return (dx.view(dy.shape) if ctx.needs_input_grad[0] else None,
                dw if ctx.needs_input_grad[1] else None, None, None)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, offset: float = 0.0, *,
             impl: str | None = None) -> torch.Tensor:
    """y = x / sqrt(mean(x^2) + eps) * (offset + weight) over the last dim.

    x (..., D) fp32/fp16/bf16, weight (D,) fp32/fp16/bf16 (may differ from x's), eps > 0,
    offset 1.0 for Gemma's (1 + w). Statistics in fp32; returns x's shape and dtype; gradients
    for x and weight (in their own dtypes). See the module docstring."""
    check_tensors("rms_norm", x=x, weight=weight)
    if weight.dim() != 1 or x.dim() == 0 or x.shape[-1] != weight.shape[0] or x.shape[-1] == 0:
        raise ValueError(f"rms_norm: weight shape {tuple(weight.shape)} does not match x's last "
                         f"dim (x shape {tuple(x.shape)}); weight must be (D,) with D > 0")
    check_dtype("rms_norm", "x", x)
    check_dtype("rms_norm", "weight", weight)
    if x.device != weight.device:
        raise ValueError(f"rms_norm: x is on {x.device} but weight on {weight.device}")
    if not 0 < eps < math.inf:  # eps=inf gave an all-zero output
        raise ValueError(f"rms_norm: eps must be > 0 and finite, got {eps}")
    if use_triton(x, impl, "rms_norm"):
        # The kernels index weight as a dense (D,) vector: a strided view (w[::2]) is copied.
        with _dispatch.device_guard(x):
            return _RMSNorm.apply(x, weight.contiguous(), float(eps), float(offset))
    return rms_norm_ref(x, weight, eps, offset)
