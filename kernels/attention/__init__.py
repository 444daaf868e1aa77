"""Attention: softmax(scale * q k^T [+ masks, softcap]) v, causal / sliding window / GQA / packed.

Contract:
- Padded mode: q (B, T, Hq, D), k and v (B, S, Hkv, D), Hq a multiple of Hkv (query head h uses kv
  head h // (Hq // Hkv)); output (B, T, Hq, D) in q.dtype.
- Varlen (packed) mode: ``cu_seqlens`` int32 (n_docs + 1,) cumulative lengths starting at 0;
  q (total, Hq, D), k/v (total, Hkv, D); token i of document d only attends within d.
- Document-id mode: ``seq_idx`` int (B, T) with q (B, T, Hq, D), k/v (B, T, Hkv, D), or (total,)
  with q (total, Hq, D): the index of the document each token belongs to (transformers'
  ``DataCollatorWithFlattening(return_seq_idx=True)`` gives (1, total)). Each document is one
  contiguous run of equal ids, non-decreasing within a row (a row start always starts a new
  document); it is converted to ``cu_seqlens`` / ``max_seqlen`` with one host read of seq_idx
  (pass ``cu_seqlens`` and ``max_seqlen`` instead for a sync-free step). Output shaped like q.
- ``causal``: query i sees keys j <= i (positions counted inside each document; with S != T in
  padded mode the query block is aligned to the end of the keys, as flash-attn does).
- ``window=W``: query i sees keys j with i - j < W (W keys including itself; HF's
  ``sliding_window``); without ``causal`` also j - i < W.
- ``softcap=c``: scores s become c * tanh(s / c) before masking (Gemma 2).
- A query row that sees no key (causal with S < T) gets output 0 and zero gradients; a NaN/inf
  in q or in a key it sees makes its output NaN (a row of only -inf scores too, as softmax).

Triton path (``_fwd.py``, ``_bwd.py``, shared device helpers in ``_common.py``): FA2-style. The
forward saves the output and the natural-log LSE per query row (fp32, (B, Hq, T); (1, Hq, total) in
varlen mode). The backward runs ``delta = rowsum(dO * O)``, then a dK/dV kernel (one program per key
block and kv head, looping over its query-head group, so GQA gradients are reduced without atomics
and K/V are never repeated) and a dQ kernel. Fully masked blocks are skipped (causal: blocks above
the diagonal; window: blocks outside it); only blocks crossing a mask boundary evaluate the mask.
Limits: head_dim <= 256 (non-powers of two are padded to the next power of two inside the kernel);
fp16/bf16 (fp32 is supported for tests, at IEEE fp32 matmul speed); inputs need a contiguous last
dim (other strides are handled; a strided last dim is copied); offsets inside one sequence are
int32, so (tokens - 1) x token stride of q, k, v and out must stay below 2^31 (refused otherwise);
at most 65535 sequences (documents) and 65535 heads per call (grid axes 2 and 1). In varlen mode
``max_seqlen`` must be at least the longest document: when given on CUDA, ``cu_seqlens`` is trusted
without a device sync. Under torch.compile (and on fake/meta tensors) ``cu_seqlens`` is never read
on the host: it is checked with a device-side assert, the reference attends under a block-diagonal
mask (O(total^2); eager keeps the per-document split), and the Triton path needs ``max_seqlen``.
``seq_idx`` always takes one host read (pass ``cu_seqlens`` and ``max_seqlen`` to compile).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from ember.kernels import _dispatch
from ember.kernels._dispatch import check_dtype, check_tensors, use_triton
from ember.kernels.attention import _bwd, _fwd, _segments
from ember.kernels.attention._segments import visibility as _mask


def _attend_ref(q, k, v, causal, scale, window, softcap, keep=None):
    """q (B, T, Hq, D), k/v (B, S, Hkv, D) -> (B, T, Hq, D); fp32 math with an explicit mask
    (``keep``: a given (T, S) mask instead of the causal/window one)."""
    T, S, hq, hkv = q.shape[1], k.shape[1], q.shape[2], k.shape[2]
    qf, kf, vf = (t.float().transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
    if hq != hkv:
        kf = kf.repeat_interleave(hq // hkv, dim=1)
        vf = vf.repeat_interleave(hq // hkv, dim=1)
    s = torch.matmul(qf, kf.transpose(-1, -2)) * scale  # (B, H, T, S)
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    if keep is None:
        keep = _mask(T, S, q.device, causal, window)
    # Rows with no visible key give 0 (a softmax over only -inf is NaN); a NaN in q or k stays
    # NaN, as in the kernels and SDPA, so a broken step is seen and skipped, not trained on.
    empty = ~keep.any(dim=-1, keepdim=True)  # (T, 1)
    s = s.masked_fill(~keep, float("-inf")).masked_fill(empty, 0.0)
    p = torch.softmax(s, dim=-1).masked_fill(empty, 0.0)
    return torch.matmul(p, vf).transpose(1, 2).to(q.dtype)


def _nonfinite(x: torch.Tensor) -> torch.Tensor:
    """x.sum(-1, keepdim=True) of x * (x - x): 0 where a row is finite, NaN (value and gradient)
    where it holds a NaN or inf."""
    return (x * (x - x)).sum(-1, keepdim=True)


def _packed_ref(q, k, v, cu_seqlens, causal, scale, window, softcap):
    """Varlen attention without reading cu_seqlens on the host (torch.compile, fake tensors):
    all tokens as one sequence under a block-diagonal mask. O(total^2) scores, so eager runs
    keep the per-document split."""
    total = q.shape[0]
    pos = torch.arange(total, device=q.device)
    doc = torch.searchsorted(cu_seqlens[1:].to(q.device, torch.int64), pos, right=True)
    keep = _mask(total, total, q.device, causal, window, doc)
    return _attend_ref(q[None], k[None], v[None], causal, scale, window, softcap, keep)[0]


def _from_seq_idx(q, k, v, seq_idx, cu_seqlens, max_seqlen):
    """Per-token document ids -> (q, k, v) as (total, H, D), cu_seqlens (int32, on q's device),
    max_seqlen (None when there are no tokens). One host read of seq_idx."""
    check_tensors("flash_attention", q=q, k=k, v=v, seq_idx=seq_idx)
    if cu_seqlens is not None or max_seqlen is not None:
        raise ValueError("flash_attention: pass either seq_idx (per-token document ids) or "
                         "cu_seqlens/max_seqlen, not both: seq_idx is converted to cu_seqlens and "
                         "max_seqlen")
    if seq_idx.dtype == torch.bool or seq_idx.is_floating_point() or seq_idx.is_complex():
        raise ValueError(f"flash_attention: seq_idx must be an integer tensor of document ids, "
                         f"got {seq_idx.dtype}")
    if seq_idx.dim() not in (1, 2) or q.dim() != seq_idx.dim() + 2 or (
            tuple(q.shape[:seq_idx.dim()]) != tuple(seq_idx.shape)) or (
            tuple(k.shape[:seq_idx.dim()]) != tuple(seq_idx.shape)) or (
            tuple(v.shape[:seq_idx.dim()]) != tuple(seq_idx.shape)):
        raise ValueError(f"flash_attention: seq_idx must be (B, T) with q (B, T, H, D) and k/v "
                         f"(B, T, Hkv, D), or (total,) with q (total, H, D) and k/v "
                         f"(total, Hkv, D); got seq_idx {tuple(seq_idx.shape)}, q "
                         f"{tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    # (under torch.compile the read is a graph break, as it was: only a shape-only tensor stops)
    if _dispatch.no_host_values(seq_idx) and not torch.compiler.is_compiling():
        raise ValueError("flash_attention: seq_idx is read on the host, and a meta/fake tensor has "
                         "no values; pass cu_seqlens and max_seqlen instead")
    ids = seq_idx.detach().to("cpu", torch.int64)  # the one host read
    ids = ids.reshape(-1, ids.shape[-1]) if ids.numel() else ids.new_zeros(0, 1)
    step = ids[:, 1:] - ids[:, :-1]
    if (step < 0).any():
        row, col = (step < 0).nonzero()[0].tolist()
        raise ValueError(f"flash_attention: seq_idx must be non-decreasing within each row (each "
                         f"document one contiguous run of equal ids); row {row} goes from "
                         f"{ids[row, col].item()} to {ids[row, col + 1].item()} at position "
                         f"{col + 1}. Reorder the tokens so each document is contiguous")
    new_doc = torch.ones_like(ids, dtype=torch.bool)  # a row start is always a document start
    new_doc[:, 1:] = step != 0
    total = ids.numel()
    starts = new_doc.reshape(-1).nonzero().reshape(-1)
    cu = torch.cat([starts if total else starts.new_zeros(1), torch.tensor([total])])
    longest = int((cu[1:] - cu[:-1]).max()) if total else 0
    flat = [t.reshape(total, *t.shape[seq_idx.dim():]) for t in (q, k, v)]
    return (*flat, cu.to(device=q.device, dtype=torch.int32), longest or None)


def flash_attention_ref(q, k, v, *, causal=True, softmax_scale=None, window=None, softcap=None,
                        cu_seqlens=None, max_seqlen=None, seq_idx=None):
    """The spec of ``flash_attention`` (same arguments, shapes and dtypes): SDPA or an explicit
    (T, S) mask per sequence, output in q.dtype. Plain autograd (double backward works)."""
    if seq_idx is not None:
        qf, kf, vf, cu, longest = _from_seq_idx(q, k, v, seq_idx, cu_seqlens, max_seqlen)
        return flash_attention_ref(qf, kf, vf, causal=causal, softmax_scale=softmax_scale,
                                   window=window, softcap=softcap, cu_seqlens=cu,
                                   max_seqlen=longest).reshape(q.shape)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    if cu_seqlens is None:
        if softcap is None and window is None and q.shape[1] == k.shape[1] and (
                scale > 0 or not causal):
            # Fast path: SDPA handles GQA and causal on CPU without an explicit (T, S) mask.
            # Not for causal with a scale <= 0: torch's CPU flash kernel then answers NaN for
            # every row but the last (its masked -inf times the scale); the explicit mask is
            # right for any finite scale.
            qt = q.transpose(1, 2)
            out = F.scaled_dot_product_attention(
                qt, k.transpose(1, 2), v.transpose(1, 2), is_causal=causal,
                scale=scale, enable_gqa=q.shape[2] != k.shape[2])
            # torch's CPU flash kernel gives a finite row for a query with a NaN/inf, and zero
            # rows for a head whose every key has one (sequences under 16 tokens: a NaN in
            # k_proj), with finite gradients; the math backend, the explicit-mask path and the
            # kernels give NaN. Carry both over (a key to the rows that see it: all, or causal
            # from it on), so a broken step is seen (and skipped) instead of trained on.
            # x * (x - x) is exactly 0 for a finite x and NaN otherwise, and so is its gradient.
            bad_q = _nonfinite(qt)  # (B, Hq, T, 1)
            bad_k = _nonfinite(k.transpose(1, 2))  # (B, Hkv, S, 1)
            bad_k = bad_k.cumsum(2) if causal else bad_k.sum(2, keepdim=True)
            if q.shape[2] != k.shape[2]:
                bad_k = bad_k.repeat_interleave(q.shape[2] // k.shape[2], dim=1)
            # In out's dtype: under autocast q, k are fp32 and SDPA's out bf16.
            return (out + (bad_q + bad_k).to(out.dtype)).transpose(1, 2)
        return _attend_ref(q, k, v, causal, scale, window, softcap)
    if _dispatch.no_host_values(cu_seqlens):
        return _packed_ref(q, k, v, cu_seqlens, causal, scale, window, softcap)
    bounds = cu_seqlens.tolist()
    lens = [b - a for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    # Short documents: a few segments in one masked batched matmul (_segments); longer ones:
    # one SDPA call each. Outputs in SDPA's dtype (the autocast dtype under autocast).
    lay = _segments.layout(tuple(bounds), q.shape[0], causal, window, q.device)
    alone = lay.alone
    dev = q.device.type
    out_dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else q.dtype
    outs = []
    if lay.idx is not None:
        outs.append(_segments.segment_attention(q, k, v, lay, scale=scale,
                                                softcap=softcap).to(out_dtype))
    if len(alone) > 1 and bounds[0] == 0 and bounds[-1] == q.shape[0]:
        # One split per tensor: its backward is one concatenation, where a slice per document
        # would zero-fill and add a full-size gradient per document.
        pieces = dict(enumerate(zip(*(t.split(lens) for t in (q, k, v)), strict=True)))
    else:
        pieces = {i: tuple(t[bounds[i]:bounds[i + 1]] for t in (q, k, v)) for i in alone}
    for i in alone:
        qd, kd, vd = pieces[i]
        outs.append(flash_attention_ref(qd[None], kd[None], vd[None], causal=causal,
                                        softmax_scale=scale, window=window,
                                        softcap=softcap)[0].to(out_dtype))
    if not outs:
        # No tokens: an empty output that is still part of the graph (a plain new_zeros made
        # out.sum().backward() fail with "does not require grad"), as SDPA's is.
        return q * 0.0 + (k.sum() + v.sum()) * 0.0
    if not alone:  # segments keep the documents' order
        return outs[0]
    return torch.cat(outs)[lay.order]  # back to document order


def _as_int(max_seqlen) -> int:
    """max_seqlen as a Python int >= 1. flash-attn users often pass a 0-d tensor (``lens.max()``):
    the kernels took it as a pointer (a crash inside the launcher), and an int32 one wrapped
    the int32-offset guard's arithmetic into a bogus refusal. One host read on CUDA."""
    if isinstance(max_seqlen, torch.Tensor):
        if max_seqlen.numel() != 1 or max_seqlen.is_floating_point():
            raise ValueError(f"flash_attention: max_seqlen must be an int (or a one-element "
                             f"integer tensor), got a {max_seqlen.dtype} tensor of shape "
                             f"{tuple(max_seqlen.shape)}")
        max_seqlen = max_seqlen.item()
    if isinstance(max_seqlen, bool) or not float(max_seqlen).is_integer() or max_seqlen < 1:
        raise ValueError(f"flash_attention: max_seqlen must be an integer >= 1 (the longest "
                         f"document's length), got {max_seqlen!r}")
    return int(max_seqlen)


def _validate(q, k, v, cu_seqlens, max_seqlen, window, softcap, softmax_scale=None,
              causal=True):
    """Raises on bad input; returns max_seqlen (computed from cu_seqlens when not given)."""
    check_tensors("flash_attention", q=q, k=k, v=v)
    if cu_seqlens is not None:
        check_tensors("flash_attention", cu_seqlens=cu_seqlens)
    want = 3 if cu_seqlens is not None else 4
    if q.dim() != want or k.dim() != want or v.dim() != want:
        layout = "(total, H, D) with cu_seqlens" if want == 3 else "(B, T, H, D)"
        raise ValueError(f"flash_attention: q, k, v must be {layout}; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape != v.shape or q.shape[-1] != k.shape[-1] or q.shape[0] != k.shape[0] or (
            want == 3 and q.shape[0] != k.shape[0]):
        raise ValueError(f"flash_attention: k {tuple(k.shape)} / v {tuple(v.shape)} do not match q "
                         f"{tuple(q.shape)}")
    if q.shape[-1] == 0:
        raise ValueError(f"flash_attention: head_dim must be >= 1, got q {tuple(q.shape)}")
    if k.shape[-2] == 0 or q.shape[-2] % k.shape[-2]:
        raise ValueError(f"flash_attention: query heads ({q.shape[-2]}) must be a multiple of kv "
                         f"heads ({k.shape[-2]})")
    if q.device != k.device or q.device != v.device:
        raise ValueError(f"flash_attention: q, k, v must be on the same device, got {q.device}, "
                         f"{k.device}, {v.device}")
    # "no" was bool("no") = True on the Triton path (silently causal), a TypeError in SDPA
    if causal not in (True, False):
        raise ValueError(f"flash_attention: causal must be a bool, got {causal!r}")
    if q.dtype != k.dtype or q.dtype != v.dtype:
        raise ValueError(f"flash_attention: q, k, v dtypes differ ({q.dtype}, {k.dtype}, "
                         f"{v.dtype})")
    if not q.is_floating_point():
        raise ValueError(f"flash_attention: q, k, v must be floating point (fp16/bf16/fp32), got "
                         f"{q.dtype}")
    # bool is an int (True was taken as window=1); inf crashed in int() with an OverflowError.
    if window is not None and (isinstance(window, bool) or not math.isfinite(window)
                               or window < 1 or window != int(window)):
        raise ValueError(f"flash_attention: window must be an integer >= 1 (None for no window), "
                         f"got {window!r}")
    # NaN passed "<= 0" and inf gives inf * tanh(0) = NaN: both made every output NaN silently.
    if softcap is not None and not (math.isfinite(softcap) and softcap > 0):
        raise ValueError(f"flash_attention: softcap must be > 0 and finite (Gemma 2 uses 50.0; "
                         f"None for no softcap), got {softcap}")
    if softmax_scale is not None and not math.isfinite(softmax_scale):
        raise ValueError(f"flash_attention: softmax_scale must be finite (None for "
                         f"1/sqrt(head_dim)), got {softmax_scale}")
    if cu_seqlens is not None:
        if (cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 or cu_seqlens.is_floating_point()
                or cu_seqlens.is_complex() or cu_seqlens.dtype == torch.bool):
            raise ValueError(f"flash_attention: cu_seqlens must be a 1-D integer tensor of "
                             f"n_docs + 1 offsets; got shape {tuple(cu_seqlens.shape)}, "
                             f"dtype {cu_seqlens.dtype}")
        if max_seqlen is not None:
            max_seqlen = _as_int(max_seqlen)
        if _dispatch.no_host_values(cu_seqlens):
            # torch.compile / fake tensors: a host read breaks the graph; checked on the device.
            cu = cu_seqlens.to(torch.int64)
            lens = cu[1:] - cu[:-1]
            ok = (cu[0] == 0) & (cu[-1] == q.shape[0]) & (lens >= 0).all()
            if max_seqlen is not None:
                ok &= lens.max() <= max_seqlen
            torch._assert_async(ok, f"flash_attention: cu_seqlens must start at 0, never "
                                f"decrease and end at total={q.shape[0]}, with no document "
                                f"longer than max_seqlen={max_seqlen}")
            return max_seqlen
        if not cu_seqlens.is_cuda or max_seqlen is None:
            # One host read; skipped on CUDA when max_seqlen is given, to keep the step sync-free.
            bounds = cu_seqlens.tolist()
            if bounds[0] != 0 or bounds[-1] != q.shape[0] or any(
                    b < a for a, b in zip(bounds[:-1], bounds[1:], strict=True)):
                raise ValueError(f"flash_attention: cu_seqlens must start at 0, never decrease and "
                                 f"end at total={q.shape[0]}; got {bounds[:8]}...")
            longest = max(b - a for a, b in zip(bounds[:-1], bounds[1:], strict=True))
            if max_seqlen is not None and max_seqlen < longest:
                raise ValueError(f"flash_attention: max_seqlen={max_seqlen} is shorter than the "
                                 f"longest document ({longest})")
            return longest if max_seqlen is None else max_seqlen
    return max_seqlen


def _check_int32_offsets(q, k, v, cu_seqlens, max_seqlen) -> None:
    """The kernels address a token inside its sequence as ``row * stride_t + d`` in int32 (the
    batch / document / head offsets are int64): refuse sequences whose offsets would wrap."""
    t_len = max_seqlen if cu_seqlens is not None else q.shape[1]
    s_len = max_seqlen if cu_seqlens is not None else k.shape[1]
    d = q.shape[-1]
    # out (and a contiguous dout) are (.., Hq, D) per token: stride Hq * D.
    for name, n, stride in (("q", t_len, q.stride(-3)), ("k", s_len, k.stride(-3)),
                            ("v", s_len, v.stride(-3)), ("out", t_len, q.shape[-2] * d)):
        if (n - 1) * stride + d >= 2**31:
            raise ValueError(f"flash_attention: {name} spans {n} tokens x {stride} elements per "
                             "token, past the kernels' int32 in-sequence offsets (2^31); split the "
                             "sequence, use fewer heads per call, or impl='ref'")


class _FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, scale, window, softcap, cu_seqlens, max_seqlen):
        opts = dict(causal=causal, scale=scale, window=window, softcap=softcap,
                    cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
        out, lse = _fwd.attn_fwd(q, k, v, **opts)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.opts = opts
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        t_len = ctx.opts["max_seqlen"] if ctx.opts["cu_seqlens"] is not None else q.shape[1]
        if dout.stride(-1) != 1 or (t_len - 1) * dout.stride(-3) + q.shape[-1] >= 2**31:
            # e.g. an expanded gradient of .sum(); a contiguous dout has out's checked strides
            dout = dout.contiguous()
        need = ctx.needs_input_grad
        dq, dk, dv = _bwd.attn_bwd(dout, q, k, v, out, lse, **ctx.opts, need_dq=need[0],
                                   need_dkdv=need[1] or need[2])
        return dq, dk, dv, None, None, None, None, None, None


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True,
                    softmax_scale: float | None = None, window: int | None = None,
                    softcap: float | None = None, cu_seqlens: torch.Tensor | None = None,
                    max_seqlen: int | None = None, seq_idx: torch.Tensor | None = None,
                    impl: str | None = None) -> torch.Tensor:
    """softmax(scale q k^T [softcap, causal / window masks]) v; differentiable in q, k and v.

    Padded: q (B, T, Hq, D), k/v (B, S, Hkv, D) with Hq a multiple of Hkv (GQA/MQA); varlen:
    q (total, Hq, D), k/v (total, Hkv, D) and ``cu_seqlens`` (n_docs + 1,) int32/int64 offsets.
    Or per-token document ids ``seq_idx`` (B, T) / (total,) (transformers' name, as
    ``DataCollatorWithFlattening(return_seq_idx=True)`` gives it), non-decreasing within a row,
    with q laid out as (B, T, Hq, D) / (total, Hq, D): converted to cu_seqlens with one host read.
    fp16/bf16 (fp32 accepted); output shaped like q in q.dtype. ``window=W``: a query sees W keys
    (itself included), as transformers' ``sliding_window``. See the module docstring."""
    if seq_idx is not None:
        qf, kf, vf, cu, longest = _from_seq_idx(q, k, v, seq_idx, cu_seqlens, max_seqlen)
        return flash_attention(qf, kf, vf, causal=causal, softmax_scale=softmax_scale,
                               window=window, softcap=softcap, cu_seqlens=cu, max_seqlen=longest,
                               impl=impl).reshape(q.shape)
    # Under torch.autocast q, k, v in its dtype, as SDPA (the reference) takes them, before the
    # dtype check: SDPA takes an fp32 q with bf16 k/v there, which the check refused.
    q, k, v = _dispatch.cast_floats(_dispatch.autocast_dtype(q), q, k, v)
    max_seqlen = _validate(q, k, v, cu_seqlens, max_seqlen, window, softcap, softmax_scale,
                           causal)
    causal = bool(causal)  # a NumPy or 0-d tensor bool: SDPA takes only a Python bool
    if not use_triton(q, impl, "flash_attention"):
        return flash_attention_ref(q, k, v, causal=causal, softmax_scale=softmax_scale,
                                   window=window, softcap=softcap, cu_seqlens=cu_seqlens,
                                   max_seqlen=max_seqlen)
    check_dtype("flash_attention", "q", q)
    if cu_seqlens is not None and max_seqlen is None:  # not read from cu_seqlens: see _validate
        raise ValueError("flash_attention: under torch.compile (or on fake/meta tensors) the "
                         "Triton kernels need max_seqlen with cu_seqlens (their grid size, "
                         "which cu_seqlens gives only through a host sync); pass max_seqlen")
    if q.shape[-1] > 256:
        raise ValueError(f"flash_attention: the Triton kernel supports head_dim <= 256, got "
                         f"{q.shape[-1]}; use impl='ref'")
    if q.device != k.device or q.device != v.device or (
            cu_seqlens is not None and cu_seqlens.device != q.device):
        raise ValueError("flash_attention: q, k, v and cu_seqlens must be on the same device")
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    if q.numel() == 0 or k.shape[-3] == 0:
        return flash_attention_ref(q, k, v, causal=causal, softmax_scale=scale, window=window,
                                   softcap=softcap, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
    # A window at least as long as the longest sequence hides no key (|i + S - T - j| < max(T,
    # S)): dropped, which also keeps the kernels' int32 block ranges (key + window) from wrapping
    # for huge "no window" values (2^31 - 1 gave wrong outputs and gradients).
    if window is not None and window >= (max_seqlen if cu_seqlens is not None
                                         else max(q.shape[1], k.shape[1])):
        window = None
    n_seq = cu_seqlens.numel() - 1 if cu_seqlens is not None else q.shape[0]
    if max(n_seq, q.shape[-2]) > 65535:
        raise ValueError(f"flash_attention: the Triton kernels take at most 65535 sequences "
                         f"(documents) and 65535 heads per call (CUDA's grid limit), got {n_seq} "
                         f"and {q.shape[-2]}; split the batch or use impl='ref'")
    # The kernels need unit stride on head_dim only (RoPE'd views of fused projections are fine).
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    _check_int32_offsets(q, k, v, cu_seqlens, max_seqlen)
    if cu_seqlens is not None:
        # The kernels read cu_seqlens[b] as CU + b: a strided view (cu[::2]) must be compacted.
        cu_seqlens = cu_seqlens.to(torch.int32).contiguous()
    with _dispatch.no_autocast(q), _dispatch.device_guard(q):
        return _FlashAttention.apply(q, k, v, bool(causal), float(scale),
                                     None if window is None else int(window),
                                     None if softcap is None else float(softcap), cu_seqlens,
                                     max_seqlen)
