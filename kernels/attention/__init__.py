"""Attention: softmax(scale * q k^T [+ masks, softcap]) v, causal / sliding window / GQA / packed.

Contract:
- Padded mode: q (B, T, Hq, D), k and v (B, S, Hkv, D), Hq a multiple of Hkv (query head h uses kv head
  h // (Hq // Hkv)); output (B, T, Hq, D) in q.dtype.
- Varlen (packed) mode: ``cu_seqlens`` int32 (n_docs + 1,) cumulative lengths starting at 0; q (total, Hq, D),
  k/v (total, Hkv, D); token i of document d only attends within d.
- ``causal``: query i sees keys j <= i (positions counted inside each document; with S != T in padded mode the
  query block is aligned to the end of the keys, as flash-attn does).
- ``window=W``: query i sees keys j with i - j < W (W keys including itself; HF's ``sliding_window``).
- ``softcap=c``: scores s become c * tanh(s / c) before masking (Gemma 2).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ember.kernels._dispatch import use_triton


def _attend_ref(q, k, v, causal, scale, window, softcap):
    """q (B, T, Hq, D), k/v (B, S, Hkv, D) -> (B, T, Hq, D); fp32 math with an explicit mask."""
    T, S, hq, hkv = q.shape[1], k.shape[1], q.shape[2], k.shape[2]
    qf, kf, vf = (t.float().transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
    if hq != hkv:
        kf = kf.repeat_interleave(hq // hkv, dim=1)
        vf = vf.repeat_interleave(hq // hkv, dim=1)
    s = torch.matmul(qf, kf.transpose(-1, -2)) * scale  # (B, H, T, S)
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    i = torch.arange(T, device=q.device)[:, None] + (S - T)
    j = torch.arange(S, device=q.device)[None, :]
    keep = torch.ones(T, S, dtype=torch.bool, device=q.device)
    if causal:
        keep &= j <= i
    if window is not None:
        keep &= (i - j < window) if causal else ((i - j).abs() < window)
    s = s.masked_fill(~keep, float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)  # rows with no visible key give 0
    return torch.matmul(p, vf).transpose(1, 2).to(q.dtype)


def flash_attention_ref(q, k, v, *, causal=True, softmax_scale=None, window=None, softcap=None,
                        cu_seqlens=None, max_seqlen=None):
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    if cu_seqlens is None:
        if softcap is None and window is None and q.shape[1] == k.shape[1]:
            # Fast path: SDPA handles GQA and causal on CPU without an explicit (T, S) mask.
            out = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal,
                scale=scale, enable_gqa=q.shape[2] != k.shape[2])
            return out.transpose(1, 2)
        return _attend_ref(q, k, v, causal, scale, window, softcap)
    outs = []
    bounds = cu_seqlens.tolist()
    for a, b in zip(bounds[:-1], bounds[1:]):
        if b > a:
            outs.append(flash_attention_ref(q[None, a:b], k[None, a:b], v[None, a:b], causal=causal,
                                            softmax_scale=scale, window=window,
                                            softcap=softcap)[0])
    return torch.cat(outs, dim=0) if outs else q.new_zeros(q.shape)


def _validate(q, k, v, cu_seqlens, window, softcap):
    want = 3 if cu_seqlens is not None else 4
    if q.dim() != want or k.dim() != want or v.dim() != want:
        layout = "(total, H, D) with cu_seqlens" if want == 3 else "(B, T, H, D)"
        raise ValueError(f"flash_attention: q, k, v must be {layout}; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape != v.shape or q.shape[-1] != k.shape[-1] or q.shape[0] != k.shape[0] or (
            want == 3 and q.shape[0] != k.shape[0]):
        raise ValueError(f"flash_attention: k {tuple(k.shape)} / v {tuple(v.shape)} do not match q "
                         f"{tuple(q.shape)}")
    if q.shape[-2] % k.shape[-2]:
        raise ValueError(f"flash_attention: query heads ({q.shape[-2]}) must be a multiple of kv "
                         f"heads ({k.shape[-2]})")
    if q.dtype != k.dtype or q.dtype != v.dtype:
        raise ValueError(f"flash_attention: q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})")
    if cu_seqlens is not None:
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 or int(cu_seqlens[0]) != 0 or int(
                cu_seqlens[-1]) != q.shape[0]:
            raise ValueError(f"flash_attention: cu_seqlens must be 1-D, start at 0 and end at "
                             f"total={q.shape[0]}; got {cu_seqlens.tolist()[:8]}...")
    if window is not None and window < 1:
        raise ValueError(f"flash_attention: window must be >= 1, got {window}")
    if softcap is not None and softcap <= 0:
        raise ValueError(f"flash_attention: softcap must be > 0, got {softcap}")


def flash_attention(q, k, v, *, causal=True, softmax_scale=None, window=None, softcap=None,
                    cu_seqlens=None, max_seqlen=None, impl=None):
    _validate(q, k, v, cu_seqlens, window, softcap)
    if use_triton(q, impl, "flash_attention"):
        raise NotImplementedError("Triton flash attention lands with the attention issue")
    return flash_attention_ref(q, k, v, causal=causal, softmax_scale=softmax_scale, window=window,
                               softcap=softcap, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
