"""Packed (varlen) reference attention for many short documents: the CPU training path.

One PyTorch SDPA call per document costs a fixed ~0.5 ms (forward + backward, bf16, one thread)
however short the document, and its graph is some 40 small ops more: on the CPU bench (SmolLM2-135M,
4 x 128 packed tokens, 14 documents) the attention was 14 SDPA calls per layer and two thirds of
the step's ~16k forward ops. Here consecutive short documents are laid side by side in segments of
at most ``SEGMENT`` tokens, all segments padded to one length and attended in one batched fp32
matmul under a block-diagonal mask and a few dozen ops per layer (idle, bf16, 2 threads: 7.7 vs
11.9 ms of attention for 31 documents of 8-24 tokens, 7.7 vs 8.3 ms for 14 of 16-64; half the
CPU time on a loaded machine). Longer documents keep their own SDPA call (flash: O(T) memory).

Same spec as the per-document path (``flash_attention_ref``): causal or not, window, softcap,
GQA, a NaN in a query or key reaching exactly the rows that see it (one in a value reaches
its whole segment: still seen, the step still skipped); the output in SDPA's dtype
(the autocast dtype under autocast, else q's). Scores are fp32 (never rounded to bf16 as an
autocast matmul would), so the probabilities are at least as exact as SDPA's.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch

# Documents up to this long share segments; a segment's scores are (H, SEGMENT, SEGMENT) fp32, kept
# for backward: H * SEGMENT * 4 bytes per token and layer (SmolLM2: 4.6 KB, next to ~25 KB of the
# layer's other saved activations). Measured (loaded machine, one thread): masked math beat
# per-document SDPA at 128 tokens (2.3 vs 4.6 ms per 128 tokens) and broke even at 256.
SEGMENT = 128


def visibility(T, S, device, causal, window, doc=None):
    """(T, S) bool visibility, the explicit-mask reference's (``_attend_ref``) and the segments';
    ``doc``: per-token document ids (T == S), tokens see their own."""
    i = torch.arange(T, device=device)[:, None] + (S - T)
    j = torch.arange(S, device=device)[None, :]
    keep = torch.ones(T, S, dtype=torch.bool, device=device)
    if causal:
        keep &= j <= i
    if window is not None:
        keep &= (i - j < window) if causal else ((i - j).abs() < window)
    if doc is not None:
        keep &= doc[:, None] == doc[None, :]
    return keep


class Layout(NamedTuple):
    """Where a packing's tokens go: ``idx`` (n, L) the token of each segment slot (padding repeats
    the segment's first token), ``hidden`` (n, 1, 1, L, L) True where a slot must not see
    another, ``take`` the real slots' flat positions in (n * L) (their tokens ascend: segments
    keep the documents' order), ``alone`` the long documents' indices;
    ``dense``: the segments are the tokens 0..total-1 in order without padding (rows of a packer
    filled to one length), so (total, H, D) is reshaped rather than gathered and scattered;
    ``order``: with long documents, the permutation from (segment outputs, then each long
    document's) back to document order."""

    idx: torch.Tensor | None
    hidden: torch.Tensor | None
    take: torch.Tensor | None
    alone: tuple[int, ...]
    dense: bool = False
    order: torch.Tensor | None = None


def plan_segments(lens: list[int], segment: int = SEGMENT) -> tuple[list[list[int]], list[int]]:
    """(segments as lists of document indices in order, each at most ``segment`` tokens;
    the indices of documents longer than that, attended alone). Empty documents are dropped."""
    segs: list[list[int]] = []
    alone: list[int] = []
    fill = segment  # the current segment's length: full, so the first document opens one
    for i, n in enumerate(lens):
        if n == 0:
            continue
        if n > segment:
            alone.append(i)
        elif fill + n > segment:
            segs.append([i])
            fill = n
        else:
            segs[-1].append(i)
            fill += n
    return segs, alone


@functools.lru_cache(maxsize=8)
def layout(bounds: tuple[int, ...], total: int, causal: bool, window: int | None,
           device: torch.device) -> Layout:
    """The segments of a packing (``bounds``: cu_seqlens on the host, over ``total`` tokens),
    built once per step: every layer of the model attends the same packing. Made outside
    inference mode, so that a layout first built by a teacher's or reference's
    ``torch.inference_mode()`` forward can be saved for a training forward's backward."""
    with torch.inference_mode(False):
        return _layout(bounds, total, causal, window, device)


def _layout(bounds: tuple[int, ...], total: int, causal: bool, window: int | None,
            device: torch.device) -> Layout:
    lens = [b - a for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    segs, alone = plan_segments(lens)
    long_tokens = [torch.arange(bounds[i], bounds[i + 1]) for i in alone]
    if not segs:
        order = torch.argsort(torch.cat(long_tokens)) if long_tokens else None
        return Layout(None, None, None, tuple(alone), False,
                      None if order is None else order.to(device))
    idx_rows = [[t for i in seg for t in range(bounds[i], bounds[i + 1])] for seg in segs]
    length = max(len(r) for r in idx_rows)
    # Padding slots repeat the segment's first token (finite whenever the data is) and get a
    # document id of their own (-1 - slot), so they see only themselves and nobody sees them.
    idx = torch.tensor([r + [r[0]] * (length - len(r)) for r in idx_rows])
    doc = torch.tensor([[i for i in seg for _ in range(lens[i])]
                        + list(range(-1 - len(r), -1 - length, -1))
                        for seg, r in zip(segs, idx_rows, strict=True)])
    # same document, causal / window by slot (positions within a segment differ as within the
    # document): (n, L, L)
    keep = (doc[:, :, None] == doc[:, None, :]) & visibility(length, length, "cpu", causal, window)
    take = (doc >= 0).reshape(-1).nonzero().reshape(-1)
    tokens = idx.reshape(-1)[take]
    dense = not alone and take.numel() == idx.numel() == bounds[-1] == total and bounds[0] == 0
    order = torch.argsort(torch.cat([tokens, *long_tokens])).to(device) if alone else None
    return Layout(idx.to(device), (~keep)[:, None, None].to(device), take.to(device),
                  tuple(alone), dense, order)


def segment_attention(q, k, v, lay: Layout, *, scale: float, softcap: float | None):
    """The segmented documents of ``lay`` (q (total, Hq, D), k/v (total, Hkv, D)) -> their
    outputs (n_tokens, Hq, D) fp32, token by token as the segments hold them."""
    n, length = lay.idx.shape
    hq, hkv, d = q.shape[1], k.shape[1], q.shape[2]
    g = hq // hkv
    with torch.autocast(q.device.type, enabled=False):
        # (n, L, H, D) -> (n, Hkv, g * L, D): the g query heads of a kv head stacked, no k/v copy
        qs, ks, vs = ((t.reshape(n, length, *t.shape[1:]) if lay.dense else t[lay.idx]).float()
                      for t in (q, k, v))
        qs = qs.permute(0, 2, 1, 3).reshape(n, hkv, g * length, d)
        ks = ks.permute(0, 2, 3, 1)  # (n, Hkv, D, L)
        vs = vs.transpose(1, 2)  # (n, Hkv, L, D)
        s = torch.matmul(qs, ks).view(n, hkv, g, length, length) * scale
        if softcap is not None:
            s = softcap * torch.tanh(s / softcap)
        p = torch.softmax(s.masked_fill(lay.hidden, float("-inf")), dim=-1)
        out = torch.matmul(p.view(n, hkv, g * length, length), vs)  # (n, Hkv, g * L, D)
    out = out.view(n, hq, length, d).transpose(1, 2).reshape(n * length, hq, d)
    return out if lay.dense else out.index_select(0, lay.take)
