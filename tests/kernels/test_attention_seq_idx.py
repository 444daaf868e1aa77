"""flash_attention(seq_idx=...): packed documents given as per-token document ids (transformers'
``seq_idx``), against the cu_seqlens transformers' DataCollatorWithFlattening builds for the same
batch and against an explicit block-diagonal mask computed in fp32."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import DataCollatorWithFlattening

from ember.kernels.attention import _from_seq_idx, flash_attention, flash_attention_ref
from tests.kernels.test_attention import _check
from tests.numerics import assert_close_to_ref, grads


def _ids(lengths):
    return torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)]).int()


def _masked_ref(q, k, v, seq_idx, causal):
    """fp32 attention of (B, T, H, D) with an explicit mask: same id and (causal) j <= i."""
    qf, kf, vf = (t.double().transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
    kf = kf.repeat_interleave(q.shape[2] // k.shape[2], dim=1)
    vf = vf.repeat_interleave(q.shape[2] // k.shape[2], dim=1)
    s = qf @ kf.transpose(-1, -2) / math.sqrt(q.shape[-1])
    keep = seq_idx[:, :, None] == seq_idx[:, None, :]  # (B, T, T)
    if causal:
        keep &= torch.ones_like(keep[0]).tril()
    s = s.masked_fill(~keep[:, None], float("-inf"))
    return (s.softmax(-1) @ vf).transpose(1, 2)


def test_matches_transformers_collator_cu_seqlens():
    collate = DataCollatorWithFlattening(return_seq_idx=True, return_flash_attn_kwargs=True)
    batch = collate([{"input_ids": list(range(n))} for n in (3, 1, 5, 2)])
    seq_idx = batch["seq_idx"]  # (1, total)
    q = torch.randn(*seq_idx.shape, 2, 8)
    *_, cu, longest = _from_seq_idx(q, q, q, seq_idx, None, None)
    assert cu.tolist() == batch["cu_seq_lens_q"].tolist()
    assert longest == batch["max_length_q"]


@pytest.mark.parametrize("causal", [True, False])
def test_rows_of_documents_match_explicit_mask(causal):
    # (B, T) ids: each row packs documents; ids restart per row and equal ids across a row
    # boundary are still two documents.
    seq_idx = torch.stack([_ids([5, 17, 1, 9]), _ids([0, 32])[:32] * 0 + 3])
    q, k, v = (torch.randn(2, 32, h, 16) for h in (4, 2, 2))
    _check(q, k, v, seq_idx=seq_idx, causal=causal)  # triton vs ref (fp32 and low precision)
    do = torch.randn(q.shape)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = flash_attention(*leaves, seq_idx=seq_idx, causal=causal, impl="triton")
    want = [t.clone().double().requires_grad_() for t in (q, k, v)]
    ref = _masked_ref(*want, seq_idx, causal)
    for name, o, g in zip(("out", "dq", "dk", "dv"), (out, *grads(out, leaves, do)),
                          (ref, *grads(ref, want, do.double())), strict=True):
        assert_close_to_ref(name, o, g.float(), g)


def test_flat_ids_with_window_and_fp16():
    seq_idx = _ids([7, 1, 20, 12])
    q = torch.randn(40, 2, 32).half()
    k, v = torch.randn(2, 40, 1, 32).half()
    _check(q, k, v, seq_idx=seq_idx, causal=True, window=5, softcap=3.0)
    cu = torch.tensor([0, 7, 8, 28, 40], dtype=torch.int32)
    same = flash_attention_ref(q, k, v, cu_seqlens=cu, window=5, softcap=3.0)
    torch.testing.assert_close(flash_attention_ref(q, k, v, seq_idx=seq_idx, window=5,
                                                   softcap=3.0), same, rtol=0, atol=0)


def test_no_tokens():
    q = torch.randn(2, 0, 2, 8, requires_grad=True)
    out = flash_attention(q, q, q, seq_idx=torch.zeros(2, 0, dtype=torch.int32), impl="triton")
    assert out.shape == q.shape
    out.sum().backward()


def test_bad_seq_idx():
    q = torch.randn(1, 6, 2, 8)
    ids = torch.tensor([[0, 0, 1, 1, 2, 2]])
    with pytest.raises(ValueError, match="not both"):
        flash_attention(q, q, q, seq_idx=ids, cu_seqlens=torch.tensor([0, 6]))
    with pytest.raises(ValueError, match="not both"):
        flash_attention(q, q, q, seq_idx=ids, max_seqlen=6)
    with pytest.raises(ValueError, match="non-decreasing.*row 0 goes from 1 to 0 at position 4"):
        flash_attention(q, q, q, seq_idx=torch.tensor([[0, 0, 1, 1, 0, 0]]), impl="triton")
    with pytest.raises(ValueError, match="integer"):
        flash_attention(q, q, q, seq_idx=ids.float())
    with pytest.raises(ValueError, match=r"seq_idx must be \(B, T\)"):
        flash_attention(q, q, q, seq_idx=ids[0])
    with pytest.raises(ValueError, match=r"seq_idx must be \(B, T\)"):
        flash_attention(q, q[:, :5], q[:, :5], seq_idx=ids)
