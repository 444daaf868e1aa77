"""Flash attention backward, FA2-style without atomics, in three launches:

1. ``delta = rowsum(dO * O)`` (fp32, same layout as the LSE).
2. dK/dV: one program per (key block, batch x kv head). It loops over the query heads of its GQA
   group and, for each, over the visible query blocks, recomputing ``P^T = exp(S^T - lse)``:
   ``dV += P^T dO``, ``dS^T = P^T * (dO V^T - delta) [* (1 - tanh^2) with softcap]``,
   ``dK += dS^T Q``. The group reduction happens in registers, so dK/dV are written once.
3. dQ: one program per (query block, batch x query head), looping over visible key blocks:
   ``dQ += dS K``.

Both gradient kernels finish with the softmax scale (``dS/d(qk) = scale [* (1 - tanh^2)]``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ember.kernels._dispatch import interpreting
from ember.kernels.attention._common import (
    _dot,
    _key_ranges,
    _query_ranges,
    _rowsum,
    _scores,
    _visible,
    device_fn,
)
from ember.kernels.attention._fwd import (
    block_d,
    fp32_spec,
    head_dim_class,
    seqlen_bucket,
    softmax_consts,
)


@triton.jit
def _attn_bwd_preprocess_kernel(O, DO, DELTA, stride_ob, stride_ot, stride_oh, stride_db,
                                stride_dt, stride_dh, stride_lb, stride_lh, T, n_heads,
                                HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                                BLOCK_M: tl.constexpr, INTERPRET: tl.constexpr):
    # int64 rows: in varlen mode they run over every packed token, not one document.
    pid_m = tl.program_id(0).to(tl.int64)
    # Heads on grid axis 1, batch (documents) on axis 2: B x H on one axis passed CUDA's 65535.
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (rows[:, None] < T) & (offs_d[None, :] < HEAD_DIM)
    o = tl.load(O + b * stride_ob + h * stride_oh + rows[:, None] * stride_ot + offs_d[None, :],
                mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + b * stride_db + h * stride_dh + rows[:, None] * stride_dt + offs_d[None, :],
                 mask=mask, other=0.0).to(tl.float32)
    delta = _rowsum(o * do, INTERPRET)
    tl.store(DELTA + b * stride_lb + h * stride_lh + rows, delta, mask=rows < T)


@device_fn
def _bwd_kv_inner(dk, dv, k, v, Q, DO, LSE, DELTA, stride_qt, stride_qh, stride_dot, stride_doh,
                  stride_lh, group, cols, offs_m, offs_d, lo, hi, T, S, off, window, qk_scale, cap2,
                  MASK: tl.constexpr, CAUSAL: tl.constexpr, WINDOWED: tl.constexpr,
                  SOFTCAP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, INTERPRET: tl.constexpr,
                  IEEE: tl.constexpr):
    """Query blocks [lo, hi) of every query head in the GQA group (pointers at its first head).
    One flat loop over (head, block): a loop over heads around the block loop costs registers
    (the pipelined inner loop's state is re-created per head) and made dK/dV spill at hd 128."""
    dmask = offs_d < HEAD_DIM
    n_blocks = tl.cdiv(hi - lo, BLOCK_M)
    # Divide by at least 1: for an empty range the software pipeliner's prologue still evaluates
    # the first iteration's addresses, and `it // 0` made them garbage (illegal address on H100).
    nb = tl.maximum(n_blocks, 1)
    if n_blocks > 0:  # no loop (and no pipelined prologue) for an empty range
        for it in tl.range(0, n_blocks * group):
            g = it // nb
            rows = lo + (it - g * nb) * BLOCK_M + offs_m
            qt_ptrs = Q + g * stride_qh + rows[None, :] * stride_qt + offs_d[:, None]  # q^T (D, BM)
            do_ptrs = DO + g * stride_doh + rows[:, None] * stride_dot + offs_d[None, :]
            lse_ptrs = LSE + g * stride_lh + rows
            delta_ptrs = DELTA + g * stride_lh + rows
            if MASK:
                rmask = rows < T
                qT = tl.load(qt_ptrs, mask=rmask[None, :] & dmask[:, None], other=0.0)
                do = tl.load(do_ptrs, mask=rmask[:, None] & dmask[None, :], other=0.0)
                # lse = +inf makes P = 0 for rows past the end (and for rows that saw no key).
                lse = tl.load(lse_ptrs, mask=rmask, other=float("inf"))
                delta = tl.load(delta_ptrs, mask=rmask, other=0.0)
            else:
                if BLOCK_D != HEAD_DIM:
                    qT = tl.load(qt_ptrs, mask=dmask[:, None], other=0.0)
                    do = tl.load(do_ptrs, mask=dmask[None, :], other=0.0)
                else:
                    qT = tl.load(qt_ptrs)
                    do = tl.load(do_ptrs)
                lse = tl.load(lse_ptrs)
                delta = tl.load(delta_ptrs)
            zero = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
            # (BN, BM)
            s2, th = _scores(_dot(k, qT, zero, INTERPRET, IEEE), qk_scale, cap2, SOFTCAP)
            pT = tl.exp2(s2 - lse[None, :] * 1.4426950408889634)
            if MASK:
                keep = _visible(rows[None, :], cols[:, None], T, S, off, window, CAUSAL, WINDOWED)
                pT = tl.where(keep, pT, 0.0)
            dv = _dot(pT.to(do.dtype), do, dv, INTERPRET, IEEE)
            dpT = _dot(v, tl.trans(do), zero, INTERPRET, IEEE)
            dsT = pT * (dpT - delta[None, :])
            if SOFTCAP:
                dsT = dsT * (1.0 - th * th)
            dk = _dot(dsT.to(qT.dtype), tl.trans(qT), dk, INTERPRET, IEEE)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, CU,
                          stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh,
                          stride_vb, stride_vt, stride_vh, stride_db, stride_dt, stride_dh,
                          stride_dkb, stride_dkt, stride_dkh, stride_dvb, stride_dvt, stride_dvh,
                          stride_lb, stride_lh,
                          T, S, n_kv_heads, group, window, qk_scale, cap2, sm_scale,
                          seqlen_bucket,
                          HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                          BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, WINDOWED: tl.constexpr,
                          SOFTCAP: tl.constexpr, VARLEN: tl.constexpr, INTERPRET: tl.constexpr,
                          IEEE: tl.constexpr):
    pid_n = tl.program_id(0)
    # Heads on grid axis 1, batch (documents) on axis 2: B x H on one axis passed CUDA's 65535.
    hk = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    off = S - T
    start = b * 0
    if VARLEN:
        start = tl.load(CU + b).to(tl.int64)
        T = (tl.load(CU + b + 1) - tl.load(CU + b)).to(tl.int32)
        S = T
        off = 0
    n0 = pid_n * BLOCK_N
    if n0 >= S:
        return
    cols = n0 + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    kv_mask = (cols[:, None] < S) & (offs_d[None, :] < HEAD_DIM)
    K += b * stride_kb + start * stride_kt + hk * stride_kh
    V += b * stride_vb + start * stride_vt + hk * stride_vh
    k = tl.load(K + cols[:, None] * stride_kt + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(V + cols[:, None] * stride_vt + offs_d[None, :], mask=kv_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    lo, full_lo, full_hi, hi = _query_ranges(n0, T, S, off, window, BLOCK_M, BLOCK_N, CAUSAL,
                                             WINDOWED)
    h0 = hk * group  # first query head of the group
    Q += b * stride_qb + start * stride_qt + h0 * stride_qh
    DO += b * stride_db + start * stride_dt + h0 * stride_dh
    LSE += b * stride_lb + h0 * stride_lh + start
    DELTA += b * stride_lb + h0 * stride_lh + start
    dk, dv = _bwd_kv_inner(dk, dv, k, v, Q, DO, LSE, DELTA, stride_qt, stride_qh, stride_dt,
                           stride_dh, stride_lh, group, cols, offs_m, offs_d, lo, full_lo, T, S,
                           off, window, qk_scale, cap2, True, CAUSAL, WINDOWED, SOFTCAP, HEAD_DIM,
                           BLOCK_D, BLOCK_M, BLOCK_N, INTERPRET, IEEE)
    dk, dv = _bwd_kv_inner(dk, dv, k, v, Q, DO, LSE, DELTA, stride_qt, stride_qh, stride_dt,
                           stride_dh, stride_lh, group, cols, offs_m, offs_d, full_lo, full_hi, T,
                           S, off, window, qk_scale, cap2, False, CAUSAL, WINDOWED, SOFTCAP,
                           HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, INTERPRET, IEEE)
    dk, dv = _bwd_kv_inner(dk, dv, k, v, Q, DO, LSE, DELTA, stride_qt, stride_qh, stride_dt,
                           stride_dh, stride_lh, group, cols, offs_m, offs_d, full_hi, hi, T, S,
                           off, window, qk_scale, cap2, True, CAUSAL, WINDOWED, SOFTCAP, HEAD_DIM,
                           BLOCK_D, BLOCK_M, BLOCK_N, INTERPRET, IEEE)
    dk = dk * sm_scale
    DK += b * stride_dkb + start * stride_dkt + hk * stride_dkh
    DV += b * stride_dvb + start * stride_dvt + hk * stride_dvh
    tl.store(DK + cols[:, None] * stride_dkt + offs_d[None, :], dk.to(DK.dtype.element_ty),
             mask=kv_mask)
    tl.store(DV + cols[:, None] * stride_dvt + offs_d[None, :], dv.to(DV.dtype.element_ty),
             mask=kv_mask)


@device_fn
def _bwd_q_inner(dq, q, do, lse2, delta, K, V, stride_kt, stride_vt, rows, offs_n, offs_d,
                 lo, hi, T, S, off, window, qk_scale, cap2,
                 MASK: tl.constexpr, CAUSAL: tl.constexpr, WINDOWED: tl.constexpr,
                 SOFTCAP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, INTERPRET: tl.constexpr,
                 IEEE: tl.constexpr):
    dmask = offs_d < HEAD_DIM
    for n0 in tl.range(lo, hi, BLOCK_N):
        cols = n0 + offs_n
        k_ptrs = K + cols[:, None] * stride_kt + offs_d[None, :]
        v_ptrs = V + cols[:, None] * stride_vt + offs_d[None, :]
        if MASK:
            kv_mask = (cols[:, None] < S) & dmask[None, :]
            k = tl.load(k_ptrs, mask=kv_mask, other=0.0)
            v = tl.load(v_ptrs, mask=kv_mask, other=0.0)
        elif BLOCK_D != HEAD_DIM:
            k = tl.load(k_ptrs, mask=dmask[None, :], other=0.0)
            v = tl.load(v_ptrs, mask=dmask[None, :], other=0.0)
        else:
            k = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
        zero = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        s2, th = _scores(_dot(q, tl.trans(k), zero, INTERPRET, IEEE), qk_scale, cap2, SOFTCAP)
        p = tl.exp2(s2 - lse2[:, None])
        if MASK:
            keep = _visible(rows[:, None], cols[None, :], T, S, off, window, CAUSAL, WINDOWED)
            p = tl.where(keep, p, 0.0)
        dp = _dot(do, tl.trans(v), zero, INTERPRET, IEEE)
        ds = p * (dp - delta[:, None])
        if SOFTCAP:
            ds = ds * (1.0 - th * th)
        dq = _dot(ds.to(k.dtype), k, dq, INTERPRET, IEEE)
    return dq


@triton.jit
def _attn_bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, CU,
                        stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh,
                        stride_vb, stride_vt, stride_vh, stride_db, stride_dt, stride_dh,
                        stride_dqb, stride_dqt, stride_dqh, stride_lb, stride_lh,
                        T, S, n_heads, group, window, qk_scale, cap2, sm_scale, seqlen_bucket,
                        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, WINDOWED: tl.constexpr,
                        SOFTCAP: tl.constexpr, VARLEN: tl.constexpr, INTERPRET: tl.constexpr,
                        IEEE: tl.constexpr):
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    # Heads on grid axis 1, batch (documents) on axis 2: B x H on one axis passed CUDA's 65535.
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    hk = h // group
    off = S - T
    start = b * 0
    if VARLEN:
        start = tl.load(CU + b).to(tl.int64)
        T = (tl.load(CU + b + 1) - tl.load(CU + b)).to(tl.int32)
        S = T
        off = 0
    m0 = pid_m * BLOCK_M
    if m0 >= T:
        return
    Q += b * stride_qb + start * stride_qt + h * stride_qh
    DO += b * stride_db + start * stride_dt + h * stride_dh
    DQ += b * stride_dqb + start * stride_dqt + h * stride_dqh
    K += b * stride_kb + start * stride_kt + hk * stride_kh
    V += b * stride_vb + start * stride_vt + hk * stride_vh
    LSE += b * stride_lb + h * stride_lh + start
    DELTA += b * stride_lb + h * stride_lh + start

    rows = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = rows < T
    io_mask = row_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
    q = tl.load(Q + rows[:, None] * stride_qt + offs_d[None, :], mask=io_mask, other=0.0)
    do = tl.load(DO + rows[:, None] * stride_dt + offs_d[None, :], mask=io_mask, other=0.0)
    lse2 = tl.load(LSE + rows, mask=row_ok, other=float("inf")) * 1.4426950408889634
    delta = tl.load(DELTA + rows, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    lo, full_lo, full_hi, hi = _key_ranges(m0, T, S, off, window, BLOCK_M, BLOCK_N, CAUSAL,
                                           WINDOWED)
    dq = _bwd_q_inner(dq, q, do, lse2, delta, K, V, stride_kt, stride_vt, rows, offs_n, offs_d,
                      lo, full_lo, T, S, off, window, qk_scale, cap2, True, CAUSAL, WINDOWED,
                      SOFTCAP, HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, INTERPRET, IEEE)
    dq = _bwd_q_inner(dq, q, do, lse2, delta, K, V, stride_kt, stride_vt, rows, offs_n, offs_d,
                      full_lo, full_hi, T, S, off, window, qk_scale, cap2, False, CAUSAL,
                      WINDOWED, SOFTCAP, HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, INTERPRET, IEEE)
    dq = _bwd_q_inner(dq, q, do, lse2, delta, K, V, stride_kt, stride_vt, rows, offs_n, offs_d,
                      full_hi, hi, T, S, off, window, qk_scale, cap2, True, CAUSAL, WINDOWED,
                      SOFTCAP, HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, INTERPRET, IEEE)
    dq = dq * sm_scale
    tl.store(DQ + rows[:, None] * stride_dqt + offs_d[None, :], dq.to(DQ.dtype.element_ty),
             mask=io_mask)


def _configs(pairs, interp):
    """[(BLOCK_M, BLOCK_N, num_warps, num_stages)] -> autotune configs (one small config under
    the interpreter, which cannot benchmark and whose speed depends on the iteration count)."""
    if interpreting():
        return [triton.Config({"BLOCK_M": interp[0], "BLOCK_N": interp[1]}, num_warps=4,
                              num_stages=1)]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
            for bm, bn, w, s in pairs]


_KEY = ["HEAD_DIM", "CAUSAL", "WINDOWED", "SOFTCAP", "VARLEN", "seqlen_bucket"]
# dK/dV programs own a wide key block and stream narrow query blocks; dQ the other way round.
# Chosen so that none spills registers on sm_90 (ptxas -v on the compiled kernels): the dK + dV
# accumulators alone take 128 registers per thread at BLOCK_N=128, hd 128 and 8 warps.
_DKDV = {
    64: [(32, 128, 8, 3), (64, 128, 8, 3), (32, 64, 4, 3)],
    128: [(32, 128, 8, 3), (64, 128, 8, 2), (32, 64, 4, 3)],
    256: [(32, 64, 8, 2), (16, 64, 8, 2), (64, 32, 8, 2)],
}
_DQ = {
    64: [(128, 32, 4, 5), (128, 64, 8, 3), (64, 64, 4, 3)],
    128: [(128, 32, 8, 3), (128, 64, 8, 2), (64, 64, 8, 3)],
    256: [(64, 32, 8, 2), (64, 16, 4, 2), (64, 64, 8, 1)],
}
_DKDV_K = {d: triton.autotune(_configs(c, (16, 32)), key=_KEY)(_attn_bwd_dkdv_kernel)
           for d, c in _DKDV.items()}
_DQ_K = {d: triton.autotune(_configs(c, (32, 16)), key=_KEY)(_attn_bwd_dq_kernel)
         for d, c in _DQ.items()}
# fp32 inputs: one config per class that fits every sm_80+ GPU's shared memory (_fwd.FP32_FWD).
FP32_DKDV = {64: (32, 32, 4, 2), 128: (32, 32, 4, 2), 256: (16, 32, 4, 1)}
FP32_DQ = {64: (32, 32, 4, 2), 128: (32, 32, 4, 2), 256: (32, 16, 4, 1)}
_DKDV_FP32 = {d: triton.autotune(_configs([c], (16, 32)), key=_KEY)(_attn_bwd_dkdv_kernel)
              for d, c in FP32_DKDV.items()}
_DQ_FP32 = {d: triton.autotune(_configs([c], (32, 16)), key=_KEY)(_attn_bwd_dq_kernel)
            for d, c in FP32_DQ.items()}


def attn_bwd(do, q, k, v, out, lse, *, causal: bool, scale: float, window: int | None,
             softcap: float | None, cu_seqlens: torch.Tensor | None, max_seqlen: int | None,
             need_dq: bool = True, need_dkdv: bool = True):
    """Gradients (dq, dk, dv) (None where not needed) for ``attn_fwd``'s inputs and outputs.
    All tensors have a contiguous last dim; lse is the forward's (B, Hq, T) fp32."""
    varlen = cu_seqlens is not None
    if varlen:
        q4, k4, v4, o4, do4 = q[None], k[None], v[None], out[None], do[None]
        n_batch = cu_seqlens.numel() - 1
        T = S = max_seqlen
    else:
        q4, k4, v4, o4, do4 = q, k, v, out, do
        n_batch, T, S = q.shape[0], q.shape[1], k.shape[1]
    hq, hkv, d = q4.shape[2], k4.shape[2], q4.shape[3]
    bd = block_d(d)
    dclass = head_dim_class(bd)
    fp32 = q.dtype == torch.float32
    qk_scale, cap2 = softmax_consts(scale, softcap)
    sb = (lambda t: 0) if varlen else (lambda t: t.stride(0))
    cu = cu_seqlens if varlen else torch.zeros(1, device=q.device, dtype=torch.int32)
    flags = dict(HEAD_DIM=d, BLOCK_D=bd, CAUSAL=causal, WINDOWED=window is not None,
                 SOFTCAP=softcap is not None, VARLEN=varlen, INTERPRET=interpreting(),
                 IEEE=q.dtype == torch.float32)
    bucket = seqlen_bucket(max(T, S))

    delta = torch.empty_like(lse)
    rows = o4.shape[1]
    pre_block = 64
    _attn_bwd_preprocess_kernel[(triton.cdiv(rows, pre_block), hq, o4.shape[0])](
        o4, do4, delta, o4.stride(0), o4.stride(1), o4.stride(2), do4.stride(0), do4.stride(1),
        do4.stride(2), lse.stride(0), lse.stride(1), rows, hq,
        HEAD_DIM=d, BLOCK_D=bd, BLOCK_M=pre_block, INTERPRET=interpreting())

    dq = dk = dv = None
    if need_dkdv:
        dk4 = torch.empty_like(k4, memory_format=torch.contiguous_format)
        dv4 = torch.empty_like(v4, memory_format=torch.contiguous_format)
        grid = lambda meta: (triton.cdiv(S, meta["BLOCK_N"]), hkv, n_batch)
        (_DKDV_FP32 if fp32 else _DKDV_K)[dclass][grid](
            q4, k4, v4, do4, lse, delta, dk4, dv4, cu,
            sb(q4), q4.stride(1), q4.stride(2), sb(k4), k4.stride(1), k4.stride(2),
            sb(v4), v4.stride(1), v4.stride(2), sb(do4), do4.stride(1), do4.stride(2),
            sb(dk4), dk4.stride(1), dk4.stride(2), sb(dv4), dv4.stride(1), dv4.stride(2),
            sb(lse), lse.stride(1),
            T, S, hkv, hq // hkv, window or 0, qk_scale, cap2, scale, bucket, **flags)
        dk, dv = (dk4[0], dv4[0]) if varlen else (dk4, dv4)
    if need_dq:
        dq4 = torch.empty_like(q4, memory_format=torch.contiguous_format)
        grid = lambda meta: (triton.cdiv(T, meta["BLOCK_M"]), hq, n_batch)
        (_DQ_FP32 if fp32 else _DQ_K)[dclass][grid](
            q4, k4, v4, do4, lse, delta, dq4, cu,
            sb(q4), q4.stride(1), q4.stride(2), sb(k4), k4.stride(1), k4.stride(2),
            sb(v4), v4.stride(1), v4.stride(2), sb(do4), do4.stride(1), do4.stride(2),
            sb(dq4), dq4.stride(1), dq4.stride(2), sb(lse), lse.stride(1),
            T, S, hq, hq // hkv, window or 0, qk_scale, cap2, scale, bucket, **flags)
        dq = dq4[0] if varlen else dq4
    return dq, dk, dv


def _sig(names_ptr, dt, names_int, n_float):
    sig = {}
    for n in names_ptr:
        sig[n] = "*fp32" if n in ("LSE", "DELTA") else "*i32" if n == "CU" else f"*{dt}"
    for n in names_int:
        sig[n] = "i32"
    for n in n_float:
        sig[n] = "fp32"
    return sig


_FLAGS = ("HEAD_DIM", "BLOCK_D", "BLOCK_M", "BLOCK_N", "CAUSAL", "WINDOWED", "SOFTCAP", "VARLEN",
          "INTERPRET", "IEEE")
_STRIDES = ("stride_qb", "stride_qt", "stride_qh", "stride_kb", "stride_kt", "stride_kh",
            "stride_vb", "stride_vt", "stride_vh", "stride_db", "stride_dt", "stride_dh")


def _dkdv_sig(dt):
    sig = _sig(("Q", "K", "V", "DO", "LSE", "DELTA", "DK", "DV", "CU"), dt,
               _STRIDES + ("stride_dkb", "stride_dkt", "stride_dkh", "stride_dvb", "stride_dvt",
                           "stride_dvh", "stride_lb", "stride_lh", "T", "S", "n_kv_heads",
                           "group", "window"), ("qk_scale", "cap2", "sm_scale"))
    sig["seqlen_bucket"] = "i32"
    return sig | dict.fromkeys(_FLAGS, "constexpr")


def _dq_sig(dt):
    sig = _sig(("Q", "K", "V", "DO", "LSE", "DELTA", "DQ", "CU"), dt,
               _STRIDES + ("stride_dqb", "stride_dqt", "stride_dqh", "stride_lb", "stride_lh",
                           "T", "S", "n_heads", "group", "window"),
               ("qk_scale", "cap2", "sm_scale"))
    sig["seqlen_bucket"] = "i32"
    return sig | dict.fromkeys(_FLAGS, "constexpr")


def _flags(d, causal, bm, bn, windowed=False, softcap=False, varlen=False, ieee=False):
    return {"HEAD_DIM": d, "BLOCK_D": block_d(d), "BLOCK_M": bm, "BLOCK_N": bn, "CAUSAL": causal,
            "WINDOWED": windowed, "SOFTCAP": softcap, "VARLEN": varlen, "INTERPRET": False,
            "IEEE": ieee}


def _fp32_flags(d, causal, bm, bn):
    return _flags(d, causal, bm, bn, ieee=True)


_PRE_SIG = _sig(("O", "DO", "DELTA"), "bf16",
                ("stride_ob", "stride_ot", "stride_oh", "stride_db", "stride_dt", "stride_dh",
                 "stride_lb", "stride_lh", "T", "n_heads"), ()) | dict.fromkeys(
    ("HEAD_DIM", "BLOCK_D", "BLOCK_M", "INTERPRET"), "constexpr")

# See _fwd.COMPILE_SPECS: causal bf16 hd128 with the first tuning config, a non-causal fp16
# hd80 variant with every mask, Gemma 2's causal window + softcap at hd 256 with the first hd-256
# configs, and the fp32 configs at hd 256.
COMPILE_SPECS = [
    (_attn_bwd_preprocess_kernel, _PRE_SIG,
     {"HEAD_DIM": 128, "BLOCK_D": 128, "BLOCK_M": 64, "INTERPRET": False}),
    (_attn_bwd_dkdv_kernel, _dkdv_sig("bf16"), _flags(128, True, 32, 128),
     {"num_warps": 8, "num_stages": 3}),
    (_attn_bwd_dkdv_kernel, _dkdv_sig("fp16"), _flags(80, False, 32, 64, True, True, True),
     {"num_warps": 4, "num_stages": 3}),
    (_attn_bwd_dq_kernel, _dq_sig("bf16"), _flags(128, True, 128, 32),
     {"num_warps": 8, "num_stages": 3}),
    (_attn_bwd_dq_kernel, _dq_sig("fp16"), _flags(80, False, 64, 64, True, True, True),
     {"num_warps": 4, "num_stages": 3}),
    (_attn_bwd_dkdv_kernel, _dkdv_sig("bf16"), _flags(256, True, 32, 64, True, True),
     {"num_warps": 8, "num_stages": 2}),
    (_attn_bwd_dq_kernel, _dq_sig("bf16"), _flags(256, True, 64, 32, True, True),
     {"num_warps": 8, "num_stages": 2}),
    fp32_spec(_attn_bwd_dkdv_kernel, _dkdv_sig("fp32"), _fp32_flags, FP32_DKDV[256]),
    fp32_spec(_attn_bwd_dq_kernel, _dq_sig("fp32"), _fp32_flags, FP32_DQ[256]),
]
