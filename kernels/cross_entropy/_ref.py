"""PyTorch paths: the full-logits oracle (``linear_cross_entropy_ref``) and the chunked
implementation (``linear_cross_entropy_chunked``), which is the CPU path and never holds the
(N, V) logits."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from ember.kernels._dispatch import autocast_dtype, cast_floats, no_autocast
from ember.kernels.cross_entropy._common import (
    Options,
    make_options,
    reduce_rows,
    row_grad,
    row_loss,
    validate,
)

# Logits per chunk of the chunked path: 4M fp32 values (16 MiB) plus a few temporaries of that
# size, whatever N and V are.
CHUNK_ELEMS = 1 << 22
CHUNK_VOCAB = 4096


def linear_cross_entropy_ref(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                             bias: torch.Tensor | None = None, ignore_index: int = -100,
                             reduction: str = "mean", label_smoothing: float = 0.0,
                             z_loss: float = 0.0, softcap: float | None = None,
                             return_lse: bool = False):
    """The spec: materializes the logits, ``F.cross_entropy`` on fp32 logits, z-loss and softcap
    written out. hidden (..., D) and weight (V, D) fp32/fp16/bf16, labels (...) int64/int32; fp32
    loss (scalar, or labels' shape for 'none') and lse. Test oracle only; it holds (N, V) fp32
    logits and their gradient."""
    logits = F.linear(hidden, weight, bias).float()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    valid = labels != ignore_index
    lse = torch.logsumexp(logits, -1)
    # F.cross_entropy takes int64 targets only; int32 labels are part of the contract.
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1).long(),
                           ignore_index=ignore_index, reduction="none",
                           label_smoothing=label_smoothing).view(labels.shape)
    if z_loss:
        loss = loss + z_loss * lse.pow(2) * valid
    loss = reduce_rows(loss, valid, reduction)
    return (loss, lse) if return_lse else loss


def _chunk_logits(h, w, b, softcap):
    """Logits of one chunk in fp32: the matmul runs in the input dtype with fp32 accumulation,
    exactly like ``F.linear`` in the oracle; softcap applied."""
    z = F.linear(h, w, b).float()
    return softcap * torch.tanh(z / softcap) if softcap is not None else z


def _label_logits(t, ys):
    """(rows,) each row's label logit from a chunk's logits t, 0 where the label (ys: labels
    minus the chunk start) falls outside the chunk."""
    inside = (ys >= 0) & (ys < t.shape[1])
    idx = ys.clamp(0, t.shape[1] - 1)
    return torch.where(inside, t.gather(1, idx[:, None]).squeeze(1), 0.0)


def _fwd_body(h, w, b, ys, m, s, tgt, tot, softcap: float | None, smooth: bool):
    """Folds one (rows, vocabulary) chunk into the running max m, sum of exponentials s, label
    logit tgt and sum of logits tot (all fp32 (rows,)). ys = labels - chunk start."""
    t = _chunk_logits(h, w, b, softcap)
    m_new = torch.maximum(m, t.amax(1))
    s = s * torch.exp(m - m_new) + torch.exp(t - m_new[:, None]).sum(1)
    tgt = tgt + _label_logits(t, ys)
    if smooth:
        tot = tot + t.sum(1)
    return m_new, s, tgt, tot


def _bwd_body(h, w, b, ys, lse, g, softcap: float | None, eps: float, z_loss: float, vocab: int):
    """dlogits of one chunk (in the input dtype, for the matmuls) and its fp32 column sums (dbias).
    lse, g: fp32 (rows, 1)."""
    t = _chunk_logits(h, w, b, softcap)
    d = torch.exp(t - lse)
    if z_loss:
        d = d * (1.0 + 2.0 * z_loss * lse)
    if eps:
        d = d - eps / vocab
    inside = ((ys >= 0) & (ys < t.shape[1])).float()[:, None]
    idx = ys.clamp(0, t.shape[1] - 1)[:, None]
    d = d.scatter_add(1, idx, inside * -(1.0 - eps)) * g
    if softcap is not None:
        d = d * (1.0 - (t / softcap) ** 2)
    return d.to(h.dtype), d.sum(0)


def _fwd_grad_body(h, w, b, ys, m, s, tgt, tot, acc, sacc, softcap: float | None, smooth: bool):
    """``_fwd_body`` plus, for a frozen head, the pieces of dhidden (fp32 (rows, D)):
    acc = sum_v exp(l_v - m) c_v W_v, rescaled as the running max m moves (flash attention's
    output accumulator, with W as the values), and with label smoothing sacc = sum_v c_v W_v;
    c_v = 1 - (l_v / softcap)^2, or 1."""
    t = _chunk_logits(h, w, b, softcap)
    m_new = torch.maximum(m, t.amax(1))
    p = torch.exp(t - m_new[:, None])
    scale = torch.exp(m - m_new)
    s = s * scale + p.sum(1)
    c = 1.0 - (t / softcap) ** 2 if softcap is not None else None
    acc.mul_(scale[:, None])
    _mm_into(acc, (p if c is None else p * c).to(w.dtype), w, first=False)
    tgt = tgt + _label_logits(t, ys)
    if smooth:
        tot = tot + t.sum(1)
        if c is not None:
            _mm_into(sacc, c.to(w.dtype), w, first=False)
    return m_new, s, tgt, tot


_EAGER = (_fwd_body, _bwd_body, _fwd_grad_body)


@functools.cache
def _compiled_bodies():
    # One graph per chunk shape (full and ragged last chunks); the chunk start never reaches
    # the compiled code (labels arrive pre-shifted), so it does not trigger recompiles.
    return tuple(torch.compile(f, dynamic=False) for f in _EAGER)


def _mm_into(dst: torch.Tensor, a: torch.Tensor, b: torch.Tensor, first: bool) -> None:
    """dst (=|+=) a @ b. dst is fp32 or a's dtype; a low-precision product added to an fp32
    accumulator is rounded once per chunk."""
    if dst.dtype == a.dtype:
        if first:
            torch.mm(a, b, out=dst)
        else:
            dst.addmm_(a, b)
    elif first:
        dst.copy_(a @ b)
    else:
        dst.add_(a @ b)


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Forward: online log-sum-exp over vocabulary chunks, per row chunk. Saves hidden, weight,
    bias, labels and the fp32 lse (N,). Backward recomputes each chunk's logits; dhidden and
    dweight accumulate in fp32 when more than one chunk contributes to them, else are written
    once in the input dtype; dbias accumulates in fp32."""

    @staticmethod
    def forward(ctx, h, w, b, y, o: Options, rows: int, vocab: int, bodies, grad_in_forward):
        n, v = h.shape[0], w.shape[0]
        valid = y != o.ignore_index
        y = y.long()
        lse = torch.empty(n, device=h.device, dtype=torch.float32)
        loss = torch.empty(n, device=h.device, dtype=torch.float32)
        # A frozen head (only hidden needs a gradient): dhidden per unit row gradient is built
        # here, in the same vocabulary walk (2 head matmuls per chunk, not 1 now + 2 later).
        dh1 = (torch.empty(h.shape, device=h.device, dtype=torch.float32) if grad_in_forward
               else None)
        smooth = bool(o.label_smoothing)
        wsum = w.float().sum(0) if grad_in_forward and smooth and o.softcap is None else None
        for r0 in range(0, n, rows):
            hr, yr = h[r0:r0 + rows], y[r0:r0 + rows]
            m = torch.full((hr.shape[0],), float("-inf"), device=h.device)
            s, tgt, tot = torch.zeros_like(m), torch.zeros_like(m), torch.zeros_like(m)
            if grad_in_forward:
                acc = dh1[r0:r0 + rows].zero_()
                sacc = torch.zeros_like(acc) if smooth and o.softcap is not None else None
            for v0 in range(0, v, vocab):
                bc = None if b is None else b[v0:v0 + vocab]
                args = (hr, w[v0:v0 + vocab], bc, yr - v0, m, s, tgt, tot)
                if grad_in_forward:
                    m, s, tgt, tot = bodies[2](*args, acc, sacc, o.softcap, smooth)
                else:
                    m, s, tgt, tot = bodies[0](*args, o.softcap, smooth)
            lse[r0:r0 + rows] = m + torch.log(s)
            loss[r0:r0 + rows] = row_loss(lse[r0:r0 + rows], tgt, tot, valid[r0:r0 + rows], v, o)
            if grad_in_forward:
                _finish_dhidden(acc, sacc if sacc is not None else wsum, s, lse[r0:r0 + rows],
                                tgt, w, yr, valid[r0:r0 + rows], o, v)
        if grad_in_forward:
            ctx.save_for_backward(dh1, y)
        else:
            ctx.save_for_backward(h, w, b, y, lse)
        ctx.o, ctx.rows, ctx.vocab, ctx.bodies = o, rows, vocab, bodies
        ctx.grad_in_forward, ctx.h_dtype = grad_in_forward, h.dtype
        ctx.mark_non_differentiable(lse)
        return reduce_rows(loss, valid, o.reduction), lse

    @staticmethod
    @once_differentiable
    def backward(ctx, dloss, _dlse):
        o = ctx.o
        if ctx.grad_in_forward:
            dh1, y = ctx.saved_tensors
            g = row_grad(dloss, y != o.ignore_index, o.reduction)
            return ((dh1 * g[:, None]).to(ctx.h_dtype), None, None, None, None, None, None, None,
                    None)
        h, w, b, y, lse = ctx.saved_tensors
        rows, vocab, bwd_body = ctx.rows, ctx.vocab, ctx.bodies[1]
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        n, v = h.shape[0], w.shape[0]
        g = row_grad(dloss, y != o.ignore_index, o.reduction)
        lowp = h.dtype != torch.float32

        def grad_buffer(shape, accumulates):
            dtype = torch.float32 if (accumulates and lowp) else h.dtype
            return torch.empty(shape, device=h.device, dtype=dtype)

        dh = grad_buffer(h.shape, v > vocab) if need_h else None
        dw = grad_buffer(w.shape, n > rows) if need_w else None
        db = torch.zeros(v, device=h.device, dtype=torch.float32) if need_b else None
        if n == 0 and need_w:
            dw.zero_()
        for r0 in range(0, n, rows):
            hr, yr = h[r0:r0 + rows], y[r0:r0 + rows]
            lr, gr = lse[r0:r0 + rows, None], g[r0:r0 + rows, None]
            for v0 in range(0, v, vocab):
                wc = w[v0:v0 + vocab]
                d, dsum = bwd_body(hr, wc, None if b is None else b[v0:v0 + vocab], yr - v0, lr,
                                   gr, o.softcap, o.label_smoothing, o.z_loss, v)
                if need_b:
                    db[v0:v0 + vocab] += dsum
                if need_h:
                    _mm_into(dh[r0:r0 + rows], d, wc, first=v0 == 0)
                if need_w:
                    _mm_into(dw[v0:v0 + vocab], d.t(), hr, first=r0 == 0)
        return (dh.to(h.dtype) if need_h else None, dw.to(w.dtype) if need_w else None,
                db.to(b.dtype) if need_b else None, None, None, None, None, None, None)


def _finish_dhidden(acc, smooth_sum, s, lse, tgt, w, y, valid, o: Options, vocab: int) -> None:
    """acc (rows, D) fp32 from ``_fwd_grad_body`` becomes dloss_row / dhidden in place:
    (1 + 2 z lse) sum_v softmax_v c_v W_v - eps / V sum_v c_v W_v - (1 - eps) c_y W_y, 0 on
    ignored rows; ``smooth_sum``: sum_v c_v W_v, (rows, D) or (D,) without softcap."""
    acc.div_(s[:, None])
    if o.z_loss:
        acc.mul_((1.0 + 2.0 * o.z_loss * lse)[:, None])
    eps = o.label_smoothing
    if eps:
        acc.sub_(smooth_sum, alpha=eps / vocab)
    c_y = 1.0 - (tgt / o.softcap) ** 2 if o.softcap is not None else torch.ones_like(tgt)
    # Every row's label row of W (an ignored row's clamped label is zeroed just after): no
    # nonzero(), whose data-dependent size crashed torch.compile(fullgraph=True) inside dynamo.
    label_rows = w.index_select(0, y.clamp(0, w.shape[0] - 1)).float()
    acc.add_(label_rows.mul_((c_y * -(1.0 - eps))[:, None]))
    acc.mul_(valid[:, None])


def chunk_sizes(n: int, v: int, rows: int | None, vocab: int | None) -> tuple[int, int]:
    vocab = min(v, vocab or CHUNK_VOCAB)
    rows = rows or max(1, CHUNK_ELEMS // vocab)
    if rows < 1 or vocab < 1:
        raise ValueError(f"chunk sizes must be >= 1, got chunk_rows={rows}, chunk_vocab={vocab}")
    return max(1, min(n, rows)), vocab


def linear_cross_entropy_chunked(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                                 *, bias: torch.Tensor | None = None, ignore_index: int = -100,
                                 reduction: str = "mean", label_smoothing: float = 0.0,
                                 z_loss: float = 0.0, softcap: float | None = None,
                                 return_lse: bool = False, chunk_rows: int | None = None,
                                 chunk_vocab: int | None = None, compiled: bool = False):
    """Same contract as ``linear_cross_entropy``, in PyTorch, a (chunk_rows, chunk_vocab) block
    of logits at a time (defaults: 4096 vocabulary entries x 1024 rows). Never allocates a tensor
    of N x V elements; extra memory is a few blocks plus fp32 accumulators for the gradients
    (dhidden (N, D) when V > chunk_vocab, dweight (V, D) when N > chunk_rows, dbias (V,)) when
    the inputs are not fp32. ``compiled=True`` runs the per-chunk math through ``torch.compile``
    (fused softmax/gradient elementwise work on GPU; one compile per chunk shape)."""
    op = "linear_cross_entropy_chunked"
    o = make_options(op, ignore_index, reduction, label_smoothing, z_loss, softcap)
    hidden, weight, bias = cast_floats(autocast_dtype(hidden), hidden, weight, bias)
    validate(op, hidden, weight, labels, bias, o.ignore_index)
    with no_autocast(hidden):
        return _chunked(hidden, weight, labels, bias, o, return_lse, chunk_rows, chunk_vocab,
                        compiled)


def _chunked(hidden, weight, labels, bias, o: Options, return_lse: bool, chunk_rows=None,
             chunk_vocab=None, compiled=False):
    d = hidden.shape[-1]
    h2 = hidden.reshape(-1, d)
    rows, vocab = chunk_sizes(h2.shape[0], weight.shape[0], chunk_rows, chunk_vocab)
    bodies = _compiled_bodies() if compiled else _EAGER
    # Only hidden needs a gradient (a frozen head, as in LoRA): build it during the forward.
    grad_in_forward = (torch.is_grad_enabled() and h2.requires_grad and not weight.requires_grad
                       and (bias is None or not bias.requires_grad))
    loss, lse = _ChunkedLinearCrossEntropy.apply(h2, weight, bias, labels.reshape(-1), o, rows,
                                                 vocab, bodies, grad_in_forward)
    if o.reduction == "none":
        loss = loss.view(labels.shape)
    lse = lse.view(labels.shape)
    return (loss, lse) if return_lse else loss
