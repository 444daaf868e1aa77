"""ggml's K-quants in torch (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K: super-blocks of 256), byte for byte
what llama.cpp's ``quantize_row_q{2..6}_K_ref`` writes, and the fp32 arithmetic of ggml's
reference they share with the legacy types (correctly rounded division, ggml's ``nearest_int``,
sums in the C loop's order). How they are transcribed, what is exact and the oracle: the
docstring of ``ember.models.gguf_quants``, whose ``quantize`` is the entry point.
"""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGMLQuantizationType as Q

QK_K = 256


def _f32(v: float) -> torch.Tensor:
    return torch.tensor(v, dtype=torch.float32)


def _div(c: float, t: torch.Tensor) -> torch.Tensor:
    """c / t correctly rounded (torch's ``c / t`` is ``c * (1 / t)``, rounded twice)."""
    return torch.div(_f32(c), t)


def _nearest_int(f: torch.Tensor) -> torch.Tensor:
    """ggml's nearest_int: add 1.5 * 2**23 and read the mantissa (round half to even)."""
    bits = (f + 12582912.0).view(torch.int32)
    return (bits & 0x007FFFFF) - 0x00400000


def _seqsum(t: torch.Tensor) -> torch.Tensor:
    """Sum over dim 0 in order, starting from 0.0, in fp32: a C ``for`` loop's ``s += t[i]``."""
    acc = torch.zeros_like(t[0])
    for row in t:
        acc += row
    return acc


# ------------------------------------------------------------------------------------------
# K-quants: super-blocks of 256


def _codes(v: torch.Tensor, lo: int, hi: int, bound: torch.Tensor) -> torch.Tensor:
    """clamp(nearest_int(v), lo, hi) as floats, in place in v. ``bound`` (n,) bounds |v| per
    column: where all are below 2**22 the float trick is round half to even, (v + c) - c in
    floats (no int pass); otherwise (degenerate blocks, NaN) the trick itself, whose
    wrap-around C would see too."""
    if bool((bound <= 4e6).all()):
        return v.add_(12582912.0).sub_(12582912.0).clamp_(lo, hi)
    return _nearest_int(v).clamp_(lo, hi).float()


def _make_qkx2(x: torch.Tensor, w: torch.Tensor, nmax: int, rmin: float, rdelta: float,
               nstep: int, mad: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ggml's make_qkx2_quants on every row of x (n, k) with weights w: codes L (n, k) in
    0..nmax, scale (n,) and the_min (n,) such that x ~ scale * L - the_min; ``mad`` (use_mad,
    Q2_K): errors weighted by |diff| instead of diff**2."""
    xt, wt = x.T.contiguous(), w.T.contiguous()  # (k, n): the sums run over dim 0, in C's order
    lo = x.amin(1)
    mx = x.amax(1)
    sum_w, sum_x = wt[0].clone(), wt[0] * xt[0]
    for i in range(1, xt.shape[0]):
        sum_w += wt[i]
        sum_x += wt[i] * xt[i]
    mn = torch.where(lo > 0, torch.zeros_like(lo), lo)
    mn0, flat = mn, mx == mn
    zero = torch.zeros_like(mn)

    def codes(iscale, shift):  # the codes of a trial scale and min, in 0..nmax
        span = torch.maximum((mx - shift).abs(), (lo - shift).abs())  # >= |x - shift|
        bound = torch.where(flat, zero, iscale.abs() * span)
        return _codes((xt - shift).mul_(iscale), 0, nmax, bound)

    iscale = _div(float(nmax), mx - mn)
    scale = _div(1.0, iscale)
    L = codes(iscale, mn)
    diff = scale * L + mn - xt
    best = _seqsum(wt * (diff.abs() if mad else diff * diff))
    best_is, best_shift = iscale, mn  # L is recomputed from these at the end
    stacked = torch.empty(xt.shape[0], 3, xt.shape[1])  # (k, 3, n): 3 sums in one loop
    for step in range(nstep + 1):
        factor = float(np.float32(rmin) + np.float32(rdelta) * np.float32(step) + np.float32(nmax))
        # C divides by (max - min) and shifts by min with min the best fit's so far
        iscale = _div(factor, mx - mn)
        laux = codes(iscale, mn)
        wl = torch.mul(wt, laux, out=stacked[:, 0])
        torch.mul(wl, laux, out=stacked[:, 1])
        torch.mul(wl, xt, out=stacked[:, 2])
        sum_l, sum_l2, sum_xl = _seqsum(stacked)
        D = sum_w * sum_l2 - sum_l * sum_l
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
        pos = this_min > 0
        this_scale = torch.where(pos, sum_xl / sum_l2, this_scale)
        this_min = torch.where(pos, zero, this_min)
        diff = (laux * this_scale).add_(this_min).sub_(xt)
        err = _seqsum((diff.abs_() if mad else diff.mul_(diff)).mul_(wt))
        better = (D > 0) & (err < best)
        best_is = torch.where(better, iscale, best_is)
        best_shift = torch.where(better, mn, best_shift)
        best = torch.where(better, err, best)
        scale = torch.where(better, this_scale, scale)
        mn = torch.where(better, this_min, mn)
    L = torch.where(flat, 0.0, codes(best_is, best_shift))
    scale = torch.where(flat, zero, scale)
    return L.T, scale, -torch.where(flat, mn0, mn)


def _pack_scales_k4(ls: torch.Tensor, lm: torch.Tensor) -> torch.Tensor:
    """Q4_K / Q5_K's 12 bytes of 6-bit scales and mins (n, 8) each (get_scale_min_k4's inverse)."""
    lo = torch.cat([ls[:, :4] | ((ls[:, 4:] >> 4) << 6), lm[:, :4] | ((lm[:, 4:] >> 4) << 6),
                    (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4)], 1)
    return lo.to(torch.uint8)


def _super_scale(v: torch.Tensor, top: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The k-quants' second level on the sub-block scales (or mins) v (nb, n): codes
    nearest_int(top / vmax * v) kept to a byte (uint8_t), 0 where vmax is not > 0, and the fp16
    super-scale vmax / top (nb, 1), vmax the largest v floored at +0.0 as C starts it."""
    vmax = v.amax(1, keepdim=True)
    vmax = torch.where(vmax > 0, vmax, 0.0)  # C starts at +0.0: a -0.0 max leaves it +0.0
    codes = torch.where(vmax > 0, _nearest_int(_div(top, vmax) * v), 0) & 0xFF
    return codes, (vmax / top).half()


def _requant(sub: torch.Tensor, L: torch.Tensor, d: torch.Tensor, dm: torch.Tensor,
             nmax: int) -> torch.Tensor:
    """Codes of the sub-blocks sub (nb * n, k) again against the rounded fp32 scales d = d16 * ls
    and mins dm = dmin16 * lm (nb, n) each; sub-blocks whose d is 0 keep the first fit's L. Returns
    (nb, 256) uint8."""
    d, dm = d.reshape(-1, 1), dm.reshape(-1, 1)
    requant = _nearest_int((sub + dm) / d).clamp(0, nmax).float()
    return torch.where(d == 0, L, requant).to(torch.uint8).reshape(-1, QK_K)


def _q45_k(x: torch.Tensor, nmax: int, rmin: float, nstep: int):
    """The common part of Q4_K and Q5_K on super-blocks x (nb, 256): (d, dmin, scales, L)."""
    nb = x.shape[0]
    sub = x.reshape(-1, 32)
    sum_x2 = _seqsum((sub * sub).T.contiguous())
    av_x = torch.sqrt((sum_x2 / 32).double()).float()  # torch's fp32 sqrt is not correctly rounded
    weights = av_x[:, None] + sub.abs()
    L, scales, mins = _make_qkx2(sub, weights, nmax, rmin, 0.1, nstep)
    ls, d16 = _super_scale(scales.reshape(nb, 8), 63.0)
    lm, dmin16 = _super_scale(mins.reshape(nb, 8), 63.0)
    ls, lm = ls.clamp(max=63), lm.clamp(max=63)  # uint8_t, then MIN(63, .)
    L = _requant(sub, L, d16.float() * ls, dmin16.float() * lm, nmax)
    head = torch.cat([d16.view(torch.uint8).reshape(nb, 2), dmin16.view(torch.uint8).reshape(nb, 2),
                      _pack_scales_k4(ls, lm)], 1)
    return head, L


def _split64(L: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(nb, 256) -> the first and second halves of each 64: (nb, 4, 32) each."""
    q = L.reshape(-1, 4, 2, 32)
    return q[:, :, 0], q[:, :, 1]


def _q4_k(x: torch.Tensor) -> torch.Tensor:
    head, L = _q45_k(x, 15, -1.0, 20)
    a, b = _split64(L)
    return torch.cat([head, (a | (b << 4)).reshape(-1, 128)], 1)


def _q5_k(x: torch.Tensor) -> torch.Tensor:
    head, L = _q45_k(x, 31, -0.5, 15)
    a, b = _split64(L)
    shifts = (2 * torch.arange(4, dtype=torch.uint8))[None, :, None]
    qh = (((a >> 4) << shifts) | ((b >> 4) << (shifts + 1))).sum(1, dtype=torch.uint8)
    ql = ((a & 0xF) | ((b & 0xF) << 4)).reshape(-1, 128)
    return torch.cat([head, qh, ql], 1)


def _make_qx(x: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ggml's make_qx_quants with rmse_type 1 (weights x**2), no quant weights, on every row of
    x (n, k): codes L (n, k) in 0..2*nmax-1 (value L - nmax) and the scale (n,)."""
    xt = x.T.contiguous()
    imax = x.abs().argmax(1, keepdim=True)
    mx = torch.gather(x, 1, imax)[:, 0]
    zero = x.abs().amax(1) < 1e-15  # GROUP_MAX_EPS
    x2 = xt * xt
    wx = x2 * xt  # w * x with w = x * x
    stacked = torch.empty(xt.shape[0], 2, xt.shape[1])  # (k, 2, n)

    def codes(iscale):  # |iscale * x| <= |factor| <= 33 but in all-zero blocks (masked)
        return _codes(iscale * xt, -nmax, nmax - 1, torch.where(zero, 0.0, iscale.abs() * mx.abs()))

    def trial(iscale):
        lv = codes(iscale)
        torch.mul(wx, lv, out=stacked[:, 0])
        torch.mul(torch.mul(x2, lv, out=stacked[:, 1]), lv, out=stacked[:, 1])
        return _seqsum(stacked)

    iscale = _div(float(-nmax), mx)
    sumlx, suml2 = trial(iscale)
    scale = torch.where(suml2 != 0, sumlx / suml2, torch.zeros_like(suml2))
    best = scale * sumlx
    best_is = iscale
    for step in (*range(-9, 0), *range(1, 10)):
        factor = float(-(np.float32(nmax) + np.float32(0.1) * np.float32(step)))
        iscale = _div(factor, mx)
        sumlx, suml2 = trial(iscale)
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        best_is = torch.where(better, iscale, best_is)
        scale = torch.where(better, sumlx / suml2, scale)
        best = torch.where(better, scale * sumlx, best)
    L = torch.where(zero, 0.0, codes(best_is) + nmax)
    return L.T, torch.where(zero, torch.zeros_like(scale), scale)


def _q6_k(x: torch.Tensor) -> torch.Tensor:
    nb = x.shape[0]
    sub = x.reshape(-1, 16)
    L, scales = _make_qx(sub, 32)
    scales = scales.reshape(nb, 16)
    imax = scales.abs().argmax(1, keepdim=True)
    max_scale = torch.gather(scales, 1, imax)
    zero = (max_scale.abs() < 1e-15)[:, 0]
    iscale = _div(-128.0, max_scale)
    d16 = _div(1.0, iscale).half()
    sc = (_nearest_int(iscale * scales).clamp(max=127) & 0xFF).to(torch.uint8).view(torch.int8)
    d = (d16.float() * sc.float()).reshape(-1, 1)
    requant = (_nearest_int(sub / d).clamp(-32, 31) + 32).float()
    L = torch.where(d == 0, L, requant).to(torch.uint8).reshape(nb, 2, 4, 32)
    ql = torch.cat([L[:, :, 0] & 0xF, L[:, :, 1] & 0xF], 2) | (
        torch.cat([L[:, :, 2] & 0xF, L[:, :, 3] & 0xF], 2) << 4)
    qh = _pack2((L >> 4).reshape(nb, QK_K))
    out = torch.cat([ql.reshape(nb, 128), qh, sc.view(torch.uint8),
                     d16.view(torch.uint8).reshape(nb, 2)], 1)
    return torch.where(zero[:, None], torch.zeros_like(out), out)


def _pack2(L: torch.Tensor) -> torch.Tensor:
    """(nb, 256) 2-bit codes -> (nb, 64) bytes: per half of 128, byte l holds codes l, l + 32,
    l + 64 and l + 96 from the low bits up."""
    q = L.reshape(-1, 2, 4, 32)
    return (q[:, :, 0] | (q[:, :, 1] << 2) | (q[:, :, 2] << 4) | (q[:, :, 3] << 6)).reshape(-1, 64)


def _q2_k(x: torch.Tensor) -> torch.Tensor:
    """quantize_row_q2_K_ref: 16 sub-blocks of 16 fitted by make_qkx2_quants (weights |x|,
    absolute errors), 4-bit scales and mins against fp16 d / dmin, codes 0..3."""
    nb = x.shape[0]
    sub = x.reshape(-1, 16)
    L, scales, mins = _make_qkx2(sub, sub.abs(), 3, -0.5, 0.1, 15, mad=True)
    ls, d16 = _super_scale(scales.reshape(nb, 16), 15.0)
    lm, dmin16 = _super_scale(mins.reshape(nb, 16), 15.0)
    sc = (ls | (lm << 4)) & 0xFF  # y.scales[j] |= l << 4, kept to a byte
    L = _requant(sub, L, d16.float() * (sc & 0xF), dmin16.float() * (sc >> 4), 3)
    return torch.cat([sc.to(torch.uint8), _pack2(L), d16.view(torch.uint8).reshape(nb, 2),
                      dmin16.view(torch.uint8).reshape(nb, 2)], 1)


def _make_q3(x: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ggml's make_q3_quants with do_rmse on every row of x (n, k): codes by -nmax / (the value
    of largest magnitude), then up to 5 rounds of changing one code at a time where that
    raises sum(w x l)**2 / sum(w l**2) (w = x**2), each row stopping at its first round
    without a change. Codes L (n, k) in 0..2*nmax-1 (0 for an all-zero row) and the scale."""
    xt = x.T.contiguous()  # (k, n): the loops run over dim 0 in C's order, over all rows at once
    mx = torch.gather(x, 1, x.abs().argmax(1, keepdim=True))[:, 0]
    zero = x.abs().amax(1) < 1e-15  # GROUP_MAX_EPS
    iscale = torch.where(zero, 0.0, _div(float(-nmax), torch.where(zero, 1.0, mx)))
    L = _nearest_int(iscale * xt).clamp(-nmax, nmax - 1).float()
    w = xt * xt
    wx = w * xt
    sumlx, suml2 = _seqsum(wx * L), _seqsum(w * L * L)
    live = ~zero
    for _ in range(5):
        changed = torch.zeros_like(live)
        for i in range(xt.shape[0]):
            slx0 = sumlx - wx[i] * L[i]
            sl2 = suml2 - w[i] * L[i] * L[i]
            new = _nearest_int(xt[i] * sl2 / torch.where(slx0 > 0, slx0, 1.0))
            new = new.clamp(-nmax, nmax - 1).float()
            slx = slx0 + wx[i] * new
            sl2 = sl2 + w[i] * new * new
            take = live & (slx0 > 0) & (new != L[i]) & (sl2 > 0) & (
                slx * slx * suml2 > sumlx * sumlx * sl2)
            L[i] = torch.where(take, new, L[i])
            sumlx, suml2 = torch.where(take, slx, sumlx), torch.where(take, sl2, suml2)
            changed |= take
        live &= changed
        if not live.any():  # every row has stopped: the rounds left would change nothing
            break
    scale = torch.where(suml2 > 0, sumlx / torch.where(suml2 > 0, suml2, 1.0), 0.0)
    return torch.where(zero, 0.0, L + nmax).T, torch.where(zero, 0.0, scale)


def _q3_k(x: torch.Tensor) -> torch.Tensor:
    """quantize_row_q3_K_ref: 16 sub-blocks of 16 fitted by make_q3_quants, 6-bit signed
    scales against an fp16 d, codes -4..3 stored as 2 low bits plus a high-bit mask."""
    nb = x.shape[0]
    sub = x.reshape(-1, 16)
    L, scales = _make_q3(sub, 4)
    scales = scales.reshape(nb, 16)
    max_scale = torch.gather(scales, 1, scales.abs().argmax(1, keepdim=True))
    live = max_scale != 0
    iscale = _div(-32.0, torch.where(live, max_scale, 1.0))
    ls = torch.where(live, _nearest_int(iscale * scales).clamp(-32, 31) + 32, 0)  # 0..63
    lo, hi = ls & 0xF, ls >> 4
    packed = torch.cat([lo[:, :8] | (lo[:, 8:] << 4),
                        (hi.reshape(nb, 4, 4) << (2 * torch.arange(4))[None, :, None]).sum(1)], 1)
    d16 = torch.where(live, _div(1.0, iscale), 0.0).half()
    sc = torch.where(live, ls - 32, -32)  # what C decodes back from the packed bytes
    d = (d16.float() * sc.float()).reshape(-1, 1)
    requant = (_nearest_int(sub / d).clamp(-4, 3) + 4).float()
    L = torch.where(d == 0, L, requant).to(torch.uint8).reshape(nb, QK_K)
    high = (L >> 2).reshape(nb, 8, 32)  # code j's high bit: hmask[j % 32], bit j // 32
    hmask = (high << torch.arange(8, dtype=torch.uint8)[None, :, None]).sum(1, dtype=torch.uint8)
    return torch.cat([hmask, _pack2(L & 3), packed.to(torch.uint8),
                      d16.view(torch.uint8).reshape(nb, 2)], 1)


_K_QUANTS = {Q.Q2_K: _q2_k, Q.Q3_K: _q3_k, Q.Q4_K: _q4_k, Q.Q5_K: _q5_k, Q.Q6_K: _q6_k}
