"""The packed reference attention's segments (kernels/attention/_segments.py): short documents
side by side in one masked batched matmul, long ones alone. Checked against the explicit-mask
reference run on each document by itself (fp64 inputs, both computing in fp32; output and dq,
dk, dv), for every option, GQA, empty documents, documents longer than a segment, a layout
without padding (reshaped, not gathered) and bounds that do not span the whole tensor."""

from __future__ import annotations

import random

import pytest
import torch

from ember.kernels.attention import _attend_ref, _segments, flash_attention_ref


def _per_document(q, k, v, bounds, **kw):
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    outs = [_attend_ref(q[None, a:b], k[None, a:b], v[None, a:b], kw["causal"],
                        kw["softmax_scale"], kw["window"], kw["softcap"])[0]
            for a, b in zip(bounds[:-1], bounds[1:], strict=True) if b > a]
    return torch.cat(outs)


def _compare(lens, hq, hkv, d, start=0, extra=0, **kw):
    bounds = [start, *(start + torch.tensor(lens).cumsum(0)).tolist()]
    total = bounds[-1] + extra
    q, k, v = (torch.randn(total, h, d, dtype=torch.float64, requires_grad=True)
               for h in (hq, hkv, hkv))
    cu = torch.tensor(bounds, dtype=torch.int32)
    out = flash_attention_ref(q, k, v, cu_seqlens=cu, **kw)
    want = _per_document(q, k, v, bounds, **kw)
    assert out.shape == want.shape and out.dtype == torch.float64
    do = torch.randn_like(want)
    got = torch.autograd.grad(out, (q, k, v), do)
    exp = torch.autograd.grad(want, (q, k, v), do)
    # both compute in fp32 (the reference's spec), summing the GQA groups' dk/dv in another order;
    # a document attended alone goes through SDPA (its CPU kernel: ~3e-6)
    for name, a, b in zip(("out", "dq", "dk", "dv"), (out, *got), (want, *exp), strict=True):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-5, msg=name)


@pytest.mark.parametrize("seed", range(8))
def test_random_packings_match_each_document_alone(seed):
    rng = random.Random(seed)
    lens = [rng.choice([0, 1, 2, 7, 31, 64, 100, 128, 129, 200]) for _ in range(rng.randint(1, 8))]
    lens[rng.randrange(len(lens))] = max(lens[0], 1)  # at least one token
    hq, hkv = rng.choice([(2, 2), (4, 1), (6, 2)])
    kw = dict(causal=rng.random() < 0.7, window=rng.choice([None, 5, 40]),
              softcap=rng.choice([None, 3.0]), softmax_scale=rng.choice([0.25, 0.5]))
    _compare(lens, hq, hkv, 8, **kw)


@pytest.mark.parametrize("kw", [dict(causal=True, window=None, softcap=None),
                                dict(causal=False, window=7, softcap=2.0)])
def test_a_layout_without_padding_is_reshaped_not_gathered(kw):
    bounds = (0, 50, 128, 200, 256)  # two segments of exactly 128 tokens
    cpu = torch.device("cpu")
    assert _segments.layout(bounds, 256, True, None, cpu).dense
    assert not _segments.layout((0, 50, 128, 200, 250), 250, True, None, cpu).dense
    assert not _segments.layout(bounds, 260, True, None, cpu).dense  # tokens after the last
    _compare([50, 78, 72, 56], 4, 2, 8, softmax_scale=0.3, **kw)


@pytest.mark.parametrize(("lens", "start"), [([9, 20, 140], 3), ([50, 78], 0), ([140, 9], 0)])
def test_bounds_inside_a_longer_tensor(lens, start):
    # cu_seqlens not starting at 0 or not ending at the last token (5 more): only the documents'
    # tokens come out ([50, 78] from 0 would be reshaped without padding if it ended at the end)
    _compare(lens, 2, 1, 8, start=start, extra=5, causal=True, window=None, softcap=None,
             softmax_scale=0.35)


def test_plan_segments():
    segs, alone = _segments.plan_segments([60, 60, 10, 0, 200, 128, 5], segment=128)
    assert segs == [[0, 1], [2], [5], [6]] and alone == [4]
    # a long document between two short ones: they still share a segment (a segment's documents
    # are masked from each other by id, not by adjacency)
    assert _segments.plan_segments([3, 129, 3], segment=128) == ([[0, 2]], [1])


def test_under_autocast_the_output_is_in_its_dtype():
    cu = torch.tensor([0, 5, 140], dtype=torch.int32)  # one segment and one long document
    q, k, v = (torch.randn(140, 2, 8) for _ in range(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = flash_attention_ref(q, k, v, causal=True, cu_seqlens=cu)
    assert out.dtype == torch.bfloat16
    ref = torch.cat([_attend_ref(q[None, a:b], k[None, a:b], v[None, a:b], True, 8 ** -0.5,
                                 None, None)[0] for a, b in ((0, 5), (5, 140))])
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)


def test_nan_in_a_key_stays_in_its_document():
    cu = torch.tensor([0, 5, 12, 21], dtype=torch.int32)
    q, k, v = (torch.randn(21, 2, 8) for _ in range(3))
    k[7, 1, 3] = float("nan")  # document 1 (tokens 5..11), its 3rd token
    out = flash_attention_ref(q, k, v, causal=True, cu_seqlens=cu)
    rows = out.isnan().flatten(1).any(1).nonzero().flatten().tolist()
    assert rows == list(range(7, 12))


def test_a_layout_first_built_in_inference_mode_serves_a_training_forward():
    # a distillation teacher's (or DPO reference's) inference_mode forward builds the packing's
    # layout first; the student's forward reuses it and saves it for backward
    cu = torch.tensor([0, 7, 19, 30], dtype=torch.int32)
    q, k, v = (torch.randn(30, 2, 8) for _ in range(3))
    with torch.inference_mode():
        flash_attention_ref(q, k, v, causal=True, cu_seqlens=cu)
    q.requires_grad_()
    flash_attention_ref(q, k, v, causal=True, cu_seqlens=cu).sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()
