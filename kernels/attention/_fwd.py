"""Flash attention forward: one program per (query block, batch x query head).

Online softmax over key blocks in the log2 domain; saves the natural-log LSE (fp32) per query row
for the backward (``+inf`` for a row that sees no key, so the backward's ``exp(s - lse)`` is 0).
GQA: query head ``h`` reads kv head ``h // group`` in place (no repeated K/V).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ember.kernels._codegen import CONSUMER_SHARED
from ember.kernels._dispatch import interpreting
from ember.kernels.attention._common import (
    LOG2E,
    _dot,
    _key_ranges,
    _rowmax,
    _rowsum,
    _scores,
    _visible,
    device_fn,
)


@device_fn
def _fwd_inner(acc, l_i, m_i, q, K, V, stride_kt, stride_vt, rows, offs_n, offs_d, lo, hi,
               T, S, off, window, qk_scale, cap2,
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
        elif BLOCK_D != HEAD_DIM:
            k = tl.load(k_ptrs, mask=dmask[None, :], other=0.0)
        else:
            k = tl.load(k_ptrs)
        qk = _dot(q, tl.trans(k), tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), INTERPRET, IEEE)
        s2, _ = _scores(qk, qk_scale, cap2, SOFTCAP)
        if MASK:
            keep = _visible(rows[:, None], cols[None, :], T, S, off, window, CAUSAL, WINDOWED)
            s2 = tl.where(keep, s2, float("-inf"))
        m_new = tl.maximum(m_i, _rowmax(s2, INTERPRET))
        if MASK:
            # A row with no visible key yet keeps m = -inf; subtracting 0 instead avoids inf - inf.
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_use = m_new
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(s2 - m_use[:, None])
        l_i = l_i * alpha + _rowsum(p, INTERPRET)
        acc = acc * alpha[:, None]
        if MASK:
            v = tl.load(v_ptrs, mask=kv_mask, other=0.0)
        elif BLOCK_D != HEAD_DIM:
            v = tl.load(v_ptrs, mask=dmask[None, :], other=0.0)
        else:
            v = tl.load(v_ptrs)
        acc = _dot(p.to(v.dtype), v, acc, INTERPRET, IEEE)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd_kernel(Q, K, V, O, LSE, CU,
                     stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh,
                     stride_vb, stride_vt, stride_vh, stride_ob, stride_ot, stride_oh,
                     stride_lb, stride_lh,
                     T, S, n_heads, group, window, qk_scale, cap2, seqlen_bucket,
                     HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, WINDOWED: tl.constexpr,
                     SOFTCAP: tl.constexpr, VARLEN: tl.constexpr, INTERPRET: tl.constexpr,
                     IEEE: tl.constexpr):
    # Longest query blocks (causal: the last ones) first, so the tail of the grid is short work.
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
    K += b * stride_kb + start * stride_kt + hk * stride_kh
    V += b * stride_vb + start * stride_vt + hk * stride_vh
    O += b * stride_ob + start * stride_ot + h * stride_oh
    LSE += b * stride_lb + h * stride_lh + start

    rows = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = rows < T
    io_mask = row_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
    q = tl.load(Q + rows[:, None] * stride_qt + offs_d[None, :], mask=io_mask, other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    lo, full_lo, full_hi, hi = _key_ranges(m0, T, S, off, window, BLOCK_M, BLOCK_N, CAUSAL,
                                           WINDOWED)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, K, V, stride_kt, stride_vt, rows, offs_n, offs_d,
                               lo, full_lo, T, S, off, window, qk_scale, cap2, True, CAUSAL,
                               WINDOWED, SOFTCAP, HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, INTERPRET,
                               IEEE)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, K, V, stride_kt, stride_vt, rows, offs_n, offs_d,
                               full_lo, full_hi, T, S, off, window, qk_scale, cap2, False, CAUSAL,
                               WINDOWED, SOFTCAP, HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, INTERPRET,
                               IEEE)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, K, V, stride_kt, stride_vt, rows, offs_n, offs_d,
                               full_hi, hi, T, S, off, window, qk_scale, cap2, True, CAUSAL,
                               WINDOWED, SOFTCAP, HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, INTERPRET,
                               IEEE)
    # A row with no visible key (causal with S < T) outputs 0 with lse +inf. Told apart by
    # position, not by l = 0: a row whose visible scores are all -inf (an inf in q or k) has
    # l = 0 too and must give NaN (0 / 0), as softmax does, so the trainer's guard sees it.
    if CAUSAL:
        empty = rows + off < 0
    elif WINDOWED:
        empty = rows + off <= -window
    else:
        empty = rows < 0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(empty, float("inf"), (m_i + tl.log2(l_safe)) / 1.4426950408889634)
    tl.store(O + rows[:, None] * stride_ot + offs_d[None, :], out.to(O.dtype.element_ty),
             mask=io_mask)
    tl.store(LSE + rows, lse, mask=row_ok)


def _configs(pairs):
    """[(BLOCK_M, BLOCK_N, num_warps, num_stages)] -> autotune configs; the interpreter gets one
    small config (its speed depends on the number of block iterations, and it cannot benchmark)."""
    if interpreting():
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 16}, num_warps=4, num_stages=1)]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
            for bm, bn, w, s in pairs]


_KEY = ["HEAD_DIM", "CAUSAL", "WINDOWED", "SOFTCAP", "VARLEN", "seqlen_bucket"]
# One autotuner per head-dim class: the shared-memory budget differs too much for one list.
# (BLOCK_M, BLOCK_N, num_warps, num_stages); named so that tests can run each of them in the
# interpreter (tests/kernels/test_autotune_configs.py), which otherwise only runs _configs' one.
FWD_CONFIGS = {
    64: [(128, 64, 4, 3), (128, 128, 8, 3), (64, 64, 4, 3)],
    128: [(128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3)],
    256: [(64, 64, 8, 2), (128, 64, 8, 2), (64, 32, 4, 2)],
}
_FWD = {d: triton.autotune(_configs(c), key=_KEY)(_attn_fwd_kernel)
        for d, c in FWD_CONFIGS.items()}


# fp32 inputs (IEEE products on tiles of twice the bytes) get one small config per head-dim class,
# (BLOCK_M, BLOCK_N, num_warps, num_stages) as above, for the forward here and for the backward's
# dK/dV and dQ kernels (``_bwd.FP32_DKDV``, ``_bwd.FP32_DQ``). In fp32 every 16-bit config needs
# more shared memory than an A100 has (163 KB) at head dim 128 and 256, e.g. 180 KB for
# (64, 64, 4, 3) at hd 128, so fp32 launches failed with OutOfResources there; these fit the 99 KB
# of an RTX 30xx/40xx (sm_80 builds at the class's largest head dim: 74/70/70 KB at hd 128,
# 70/100/98 KB at hd 256; the compile check holds the hd 256 ones to that). fp32 is for tests and
# small models, where one config also spares minutes of autotuning compiles.
FP32_FWD = {64: (64, 32, 4, 2), 128: (64, 32, 4, 2), 256: (32, 32, 4, 1)}
_FWD_FP32 = {d: triton.autotune(_configs([c]), key=_KEY)(_attn_fwd_kernel)
             for d, c in FP32_FWD.items()}


def head_dim_class(bd: int) -> int:
    """The key of the config tables for a padded head dim."""
    return 64 if bd <= 64 else 128 if bd <= 128 else 256


def block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def seqlen_bucket(n: int) -> int:
    """Autotune key for the sequence length: retune per power of two up to 16K, not per length
    (varlen batches change max_seqlen every step)."""
    return min(triton.next_power_of_2(max(n, 1)), 16384)


def softmax_consts(scale: float, softcap: float | None) -> tuple[float, float]:
    """(qk_scale, cap2) for ``_scores``."""
    if softcap is None:
        return scale * LOG2E, 1.0
    return 2.0 * LOG2E * scale / softcap, softcap * LOG2E


def attn_fwd(q, k, v, *, causal: bool, scale: float, window: int | None, softcap: float | None,
             cu_seqlens: torch.Tensor | None, max_seqlen: int | None):
    """q (B, T, Hq, D) or (total, Hq, D) with cu_seqlens; last dims contiguous. Returns
    (out like q, lse fp32 (B, Hq, T) or (1, Hq, total))."""
    varlen = cu_seqlens is not None
    if varlen:
        q4, k4, v4 = q[None], k[None], v[None]
        n_batch = cu_seqlens.numel() - 1
        T = S = max_seqlen
        t_total = q.shape[0]
    else:
        q4, k4, v4 = q, k, v
        n_batch, T, S = q.shape[0], q.shape[1], k.shape[1]
        t_total = T
    hq, hkv, d = q4.shape[2], k4.shape[2], q4.shape[3]
    out = torch.empty_like(q4, memory_format=torch.contiguous_format)
    lse = torch.empty((q4.shape[0], hq, t_total), device=q.device, dtype=torch.float32)
    qk_scale, cap2 = softmax_consts(scale, softcap)
    bd = block_d(d)
    kernel = (_FWD_FP32 if q.dtype == torch.float32 else _FWD)[head_dim_class(bd)]
    grid = lambda meta: (triton.cdiv(T, meta["BLOCK_M"]), hq, n_batch)
    cu = cu_seqlens if varlen else torch.zeros(1, device=q.device, dtype=torch.int32)
    stride_b = (lambda t: 0) if varlen else (lambda t: t.stride(0))
    kernel[grid](
        q4, k4, v4, out, lse, cu,
        stride_b(q4), q4.stride(1), q4.stride(2), stride_b(k4), k4.stride(1), k4.stride(2),
        stride_b(v4), v4.stride(1), v4.stride(2), stride_b(out), out.stride(1), out.stride(2),
        stride_b(lse), lse.stride(1),
        T, S, hq, hq // hkv, window or 0, qk_scale, cap2, seqlen_bucket(max(T, S)),
        HEAD_DIM=d, BLOCK_D=bd, CAUSAL=causal, WINDOWED=window is not None,
        SOFTCAP=softcap is not None, VARLEN=varlen, INTERPRET=interpreting(),
        IEEE=q.dtype == torch.float32,
    )
    if varlen:
        return out[0], lse
    return out, lse


def _spec_sig(dt: str) -> dict:
    sig = {n: f"*{dt}" for n in ("Q", "K", "V", "O")}
    sig.update(LSE="*fp32", CU="*i32")
    for n in ("stride_qb", "stride_qt", "stride_qh", "stride_kb", "stride_kt", "stride_kh",
              "stride_vb", "stride_vt", "stride_vh", "stride_ob", "stride_ot", "stride_oh",
              "stride_lb", "stride_lh", "T", "S", "n_heads", "group", "window", "seqlen_bucket"):
        sig[n] = "i32"
    sig.update(qk_scale="fp32", cap2="fp32")
    for n in ("HEAD_DIM", "BLOCK_D", "BLOCK_M", "BLOCK_N", "CAUSAL", "WINDOWED", "SOFTCAP",
              "VARLEN", "INTERPRET", "IEEE"):
        sig[n] = "constexpr"
    return sig


def _spec_consts(d, causal, windowed=False, softcap=False, varlen=False, bm=128, bn=64,
                 ieee=False):
    return {"HEAD_DIM": d, "BLOCK_D": block_d(d), "BLOCK_M": bm, "BLOCK_N": bn, "CAUSAL": causal,
            "WINDOWED": windowed, "SOFTCAP": softcap, "VARLEN": varlen, "INTERPRET": False,
            "IEEE": ieee}


def fp32_spec(kernel, sig, consts, cfg):
    """A COMPILE_SPECS entry for an fp32 config (bm, bn, warps, stages) at head dim 256, the
    class's largest, so the shared memory the compile check measures is the class's maximum."""
    bm, bn, warps, stages = cfg
    return (kernel, sig, consts(256, True, bm, bn),
            {"num_warps": warps, "num_stages": stages, "shared_max": CONSUMER_SHARED})


# Kept short: every spec costs seconds of CI per GPU target. Together they cover causal and not,
# bf16, fp16 and fp32, hd 128, 256 and a padded head dim, every optional mask path, and causal with
# a window and softcap (Gemma 2).
COMPILE_SPECS = [
    (_attn_fwd_kernel, _spec_sig("bf16"), _spec_consts(128, True),
     {"num_warps": 8, "num_stages": 3}),
    (_attn_fwd_kernel, _spec_sig("fp16"), _spec_consts(80, False, True, True, True, 64, 64),
     {"num_warps": 4, "num_stages": 3}),
    # Gemma 2: hd 256, causal sliding window with softcap, the first hd-256 tuning config.
    (_attn_fwd_kernel, _spec_sig("bf16"), _spec_consts(256, True, True, True, False, 64, 64),
     {"num_warps": 8, "num_stages": 2}),
    fp32_spec(_attn_fwd_kernel, _spec_sig("fp32"),
              lambda d, c, bm, bn: _spec_consts(d, c, bm=bm, bn=bn, ieee=True), FP32_FWD[256]),
]
