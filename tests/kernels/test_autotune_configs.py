"""Every autotune config a GPU may pick, run in the interpreter.

Under ``TRITON_INTERPRET=1`` each autotuned kernel gets one small config (the interpreter cannot
benchmark), so the tile shapes a GPU's autotuner actually picks (BLOCK_M = BLOCK_N = 128, BLOCK_M
< BLOCK_N in the forward, BLOCK_M > BLOCK_N in dK/dV, 256-wide vocabulary tiles...) never ran on
CPU: a block-range or mask bug that shows only for some tile shape would first show on a GPU, as
a wrong answer. Here each distinct tile is forced alone (an autotuner with one config does not
benchmark) on shapes that leave partial blocks for every tile size, and checked against the
reference under the shared numerics rule. The compile check (test_compile.py) compiles one config
per kernel for sm_80/sm_90; this checks that every config computes the right thing.
"""

from __future__ import annotations

import pytest
import torch
import triton

from ember.kernels.attention import _bwd, _fwd
from ember.kernels.cross_entropy import _triton as lce
from ember.kernels.cross_entropy import linear_cross_entropy
from tests.kernels import test_cross_entropy as ce_tests
from tests.kernels.test_attention import _check, _packed, _qkv
from tests.numerics import assert_close_to_ref


def _tiles(tables) -> list[tuple[int, int]]:
    """The distinct (BLOCK_M, BLOCK_N) of config tables {class: [(bm, bn, warps, stages)]} or
    {class: (bm, bn, warps, stages)}, largest first. num_warps and num_stages change nothing in
    the interpreter, and a tile's block ranges and masks do not depend on the head dim, so one
    run per distinct tile covers every config."""
    cfgs = [c for t in tables for cs in t.values() for c in (cs if isinstance(cs, list) else [cs])]
    return sorted({c[:2] for c in cfgs}, key=lambda t: (-t[0] * t[1], t))


_FWD_TILES = _tiles([_fwd.FWD_CONFIGS, _fwd.FP32_FWD])
_DKDV_TILES = _tiles([_bwd._DKDV, _bwd.FP32_DKDV])
_DQ_TILES = _tiles([_bwd._DQ, _bwd.FP32_DQ])
_RUNS = max(len(_FWD_TILES), len(_DKDV_TILES), len(_DQ_TILES))


def _one(kernel, tile, key):
    return triton.autotune(
        [triton.Config({"BLOCK_M": tile[0], "BLOCK_N": tile[1]}, num_warps=4, num_stages=1)],
        key=key,
    )(kernel)


@pytest.mark.parametrize("run", range(_RUNS))
def test_attention_tiles(monkeypatch, run):
    """Run ``run`` forces the run-th distinct tile of the forward, dK/dV and dQ tables (the
    smallest one again past a shorter list's end) and checks one of three cases with lengths
    just past the largest tile, so every kernel sees a full block and a partial one: causal with
    GQA (training), packed documents with a window and softcap, non-causal with more keys than
    queries and a window (the off-diagonal block ranges)."""
    tiles = [t[min(run, len(t) - 1)] for t in (_FWD_TILES, _DKDV_TILES, _DQ_TILES)]
    for table, kernel, tile in (
        (_fwd._FWD, _fwd._attn_fwd_kernel, tiles[0]),
        (_bwd._DKDV_K, _bwd._attn_bwd_dkdv_kernel, tiles[1]),
        (_bwd._DQ_K, _bwd._attn_bwd_dq_kernel, tiles[2]),
    ):
        monkeypatch.setitem(table, 64, _one(kernel, tile, _fwd._KEY))
    n = max(max(t) for t in tiles) + 3
    d = 24  # head-dim class 64, padded to BLOCK_D 32
    if run % 3 == 0:
        _check(*_qkv(1, n, n, 2, 1, d, torch.float16), causal=True)
    elif run % 3 == 1:
        q, k, v, cu = _packed([n // 3, 0, n], 2, 1, d, torch.float16)
        _check(q, k, v, cu_seqlens=cu, causal=True, window=n // 2, softcap=3.0)
    else:
        _check(*_qkv(1, n - 30, n, 1, 1, d, torch.float16), causal=False, window=n // 3)


_CE_TILES = sorted({(c.kwargs["BLOCK_N"], c.kwargs["BLOCK_V"]) for c in lce._tile_configs(False)})


@pytest.mark.parametrize("tile", _CE_TILES, ids=[f"{n}x{v}" for n, v in _CE_TILES])
def test_linear_cross_entropy_tiles(monkeypatch, tile):
    """Each (BLOCK_N, BLOCK_V) of the fused linear cross-entropy's GPU configs for its forward
    and dlogits kernels, with the GPU's 256-aligned vocabulary splits: rows and vocabulary just
    past a tile, D below BLOCK_D, every option on."""
    cfg = triton.Config({"BLOCK_N": tile[0], "BLOCK_V": tile[1]}, num_warps=4, num_stages=1)
    kernels = {"fwd": lce._lce_fwd_kernel, "dlogits": lce._lce_dlogits_kernel}
    monkeypatch.setattr(
        lce,
        "_tuned",
        lambda name, interp: triton.autotune([cfg], key=["D", "SOFTCAP"])(kernels[name]),
    )
    monkeypatch.setattr(
        lce, "_splits", lambda n, v, device: (triton.cdiv(v, lce.VOCAB_ALIGN), lce.VOCAB_ALIGN)
    )
    # hidden needs no gradient: the dhidden kernel (one fixed config, tested elsewhere) is
    # skipped, and dweight = dlogits^T @ hidden still checks every dlogits tile.
    n, v = tile[0] + 3, lce.VOCAB_ALIGN + tile[1] + 5
    h, w, b, y = ce_tests._inputs(n, 40, v, torch.float16, "cpu", bias=True)
    g = torch.rand(n)
    opts = dict(label_smoothing=0.1, z_loss=1e-3, softcap=5.0, reduction="none")

    def run(dtype, impl):
        wd, bd = (t.to(dtype).requires_grad_() for t in (w, b))
        loss = linear_cross_entropy(h.to(dtype), wd, y, bias=bd, impl=impl, **opts)
        return (loss, *torch.autograd.grad(loss, (wd, bd), g.to(loss.dtype)))

    out, lowp, ref = (
        run(torch.float16, "triton"),
        run(torch.float16, "ref"),
        run(torch.float32, "ref"),
    )
    for name, o, r_lo, r32 in zip(("loss", "dweight", "dbias"), out, lowp, ref, strict=True):
        assert_close_to_ref(name, o, r_lo, r32)
