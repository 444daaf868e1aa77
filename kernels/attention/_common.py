"""Device helpers shared by the attention forward and backward kernels.

Scores live in the log2 domain inside the kernels: ``s2 = s * log2(e)`` so that every exponential
is an ``exp2`` (one MUFU op on NVIDIA GPUs). With a softcap ``c`` the natural-log score is
``s = c * tanh(scale * qk / c)``; ``tanh`` is built from ``exp2`` because libdevice is not available
in the interpreter.

Visibility of key ``j`` to query ``i`` (both counted inside the sequence; ``off = S - T`` aligns the
queries to the end of the keys, 0 in varlen mode): ``j < S``; causal: ``j <= i + off``; window W:
``i + off - j < W`` and, when not causal, also ``j - (i + off) < W``.

Every loop over the other operand's blocks is split into three ranges ``[lo, full_lo)``,
``[full_lo, full_hi)`` and ``[full_hi, hi)``: the middle range holds the blocks that are fully
visible for every row of the program's block, so it runs without any mask (and without load masks
when the head dim is a power of two); the outer ranges apply the explicit mask. ``lo``/``hi`` skip
the blocks that are fully invisible (above the causal diagonal, outside the window).
"""

from __future__ import annotations

import triton
import triton.language as tl

from ember.kernels._dispatch import interpreting

LOG2E = 1.4426950408889634


def device_fn(fn):
    """``triton.jit`` for helpers called from inside kernels.

    The interpreter re-patches all of ``triton.language`` on every device-function call (several
    milliseconds each, i.e. most of the CPU test time). The enclosing kernel has already patched it,
    so under the interpreter the helper's rewritten Python function is called directly.
    """
    jitted = triton.jit(fn)
    rewrite = getattr(jitted, "rewrite", None)
    if not interpreting() or rewrite is None:
        return jitted
    cache = []

    def call(*args, **kwargs):
        if not cache:
            cache.append(rewrite())
        return cache[0](*args, **kwargs)

    call.__name__ = fn.__name__
    return call


@device_fn
def _dot(a, b, acc, INTERPRET: tl.constexpr, IEEE: tl.constexpr):
    """acc + a @ b in fp32. The interpreter mishandles bf16 (bits read as integers), so operands
    are upcast there; fp32 inputs use IEEE products (no TF32) so that fp32 results are exact."""
    if INTERPRET:
        return acc + tl.dot(a.to(tl.float32), b.to(tl.float32))
    elif IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@device_fn
def _rowmax(x, INTERPRET: tl.constexpr):
    # tl.max / tl.sum are jit functions: the interpreter re-patches the language on each call.
    # tl.reduce with the standard combine function takes its direct numpy path instead.
    if INTERPRET:
        return tl.reduce(x, 1, tl.standard._elementwise_max)
    else:
        return tl.max(x, 1)


@device_fn
def _rowsum(x, INTERPRET: tl.constexpr):
    if INTERPRET:
        return tl.reduce(x, 1, tl.standard._sum_combine)
    else:
        return tl.sum(x, 1)


@device_fn
def _scores(qk, qk_scale, cap2, SOFTCAP: tl.constexpr):
    """Raw q.k products -> log2-domain scores, and tanh(scale * qk / c) (1.0 without softcap).

    Without softcap ``qk_scale = scale * log2(e)``. With softcap
    ``qk_scale = 2 * log2(e) * scale / c`` (the exp2 argument of tanh) and ``cap2 = c * log2(e)``.
    """
    if SOFTCAP:
        # tanh(x) = 1 - 2 / (exp(2x) + 1): exp2 overflowing to inf gives exactly 1, underflow -1.
        th = 1.0 - 2.0 / (tl.exp2(qk * qk_scale) + 1.0)
        return th * cap2, th
    else:
        return qk * qk_scale, qk


@device_fn
def _visible(rows, cols, T, S, off, window, CAUSAL: tl.constexpr, WINDOWED: tl.constexpr):
    """Boolean (rows x cols) visibility mask; rows are query indices, cols key indices (any
    broadcastable shapes)."""
    i = rows + off
    keep = (cols < S) & (rows < T)
    if CAUSAL:
        keep = keep & (cols <= i)
    if WINDOWED:
        keep = keep & (i - cols < window)
        if not CAUSAL:
            keep = keep & (cols - i < window)
    return keep


@device_fn
def _floor(x, B: tl.constexpr):
    # Clamped at 0 first: integer division rounds toward zero on GPU but floors in the interpreter.
    return (tl.maximum(x, 0) // B) * B


@device_fn
def _ceil(x, B: tl.constexpr):
    return ((tl.maximum(x, 0) + B - 1) // B) * B


@device_fn
def _key_ranges(m0, T, S, off, window, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                CAUSAL: tl.constexpr, WINDOWED: tl.constexpr):
    """Key-block ranges (lo, full_lo, full_hi, hi) for the query block [m0, m0 + BLOCK_M)."""
    last = m0 + BLOCK_M - 1 + off  # aligned index of the block's last query
    first = m0 + off
    lo = 0
    hi = S
    full_lo = 0
    full_hi = _floor(S, BLOCK_N)
    if CAUSAL:
        hi = tl.minimum(hi, last + 1)
        full_hi = tl.minimum(full_hi, _floor(first + 1, BLOCK_N))
    if WINDOWED:
        lo = _floor(first - window + 1, BLOCK_N)
        full_lo = _ceil(last - window + 1, BLOCK_N)
        if not CAUSAL:
            hi = tl.minimum(hi, last + window)
            full_hi = tl.minimum(full_hi, _floor(first + window, BLOCK_N))
    hi = tl.maximum(hi, lo)
    full_lo = tl.minimum(tl.maximum(full_lo, lo), hi)
    full_hi = tl.minimum(tl.maximum(full_hi, full_lo), hi)
    return lo, full_lo, full_hi, hi


@device_fn
def _query_ranges(n0, T, S, off, window, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  CAUSAL: tl.constexpr, WINDOWED: tl.constexpr):
    """Query-block ranges (lo, full_lo, full_hi, hi) for the key block [n0, n0 + BLOCK_N)."""
    last = n0 + BLOCK_N - 1  # the block's last key
    lo = 0
    hi = T
    full_lo = 0
    full_hi = _floor(T, BLOCK_M)
    if CAUSAL:
        lo = _floor(n0 - off, BLOCK_M)
        full_lo = _ceil(last - off, BLOCK_M)
    if WINDOWED:
        hi = tl.minimum(hi, tl.maximum(last + window - off, 0))
        full_hi = tl.minimum(full_hi, _floor(n0 + window - off, BLOCK_M))
        if not CAUSAL:
            lo = _floor(n0 - off - window + 1, BLOCK_M)
            full_lo = _ceil(last - off - window + 1, BLOCK_M)
    hi = tl.maximum(hi, lo)
    full_lo = tl.minimum(tl.maximum(full_lo, lo), hi)
    full_hi = tl.minimum(tl.maximum(full_hi, full_lo), hi)
    return lo, full_lo, full_hi, hi
