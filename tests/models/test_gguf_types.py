"""Every ggml tensor type a GGUF file may hold, against ``gguf.quants``: Ember dequantizes it to
the same values, or (where the gguf package cannot either) refuses it up front with an error that
names the file, the tensor and the type."""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, quants
from gguf import GGMLQuantizationType as Q

from ember import EmberError
from ember.models import gguf as ember_gguf
from ember.models import gguf_reader
from ember.models.gguf import dequantize, import_gguf, load_gguf
from tests.models import test_gguf
from tests.models.test_gguf import write_tiny_gguf


def _random_blocks(qt: Q, n_blocks: int, rng: np.random.Generator) -> np.ndarray:
    """Random bytes of ``n_blocks`` blocks; NaN / inf scales dequantize to NaN / inf on both
    sides (compared as equal where both are NaN)."""
    _, size = GGML_QUANT_SIZES[qt]
    return rng.integers(0, 256, size=(n_blocks, size), dtype=np.uint8)


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # NaN scales, both sides
@pytest.mark.parametrize("qt", list(GGML_QUANT_SIZES), ids=lambda q: q.name)
def test_every_type_dequantizes_as_gguf_quants_or_is_refused(qt):
    rng = np.random.default_rng()
    block, _ = GGML_QUANT_SIZES[qt]
    rows, per_row = 3, 5  # 5 blocks a row: not a multiple of 256 for the 32-element types
    raw = _random_blocks(qt, rows * per_row, rng).reshape(rows, -1)
    if qt == Q.F64:  # finite doubles (random bytes would overflow the cast to fp32)
        raw = rng.standard_normal((rows, per_row)).view(np.uint8)
    shape = (rows, block * per_row)
    try:
        ref = quants.dequantize(raw, qt)
    except NotImplementedError:
        ref = None
    if qt == Q.F64:  # gguf.quants has no F64; the file's doubles, cast as every other type
        ref = raw.view(np.float64).astype(np.float32)
    if ref is None:
        with pytest.raises(EmberError, match=f"tensor type {qt.name} "):
            dequantize(torch.from_numpy(raw.reshape(-1).copy()), qt, shape)
        return
    ours = dequantize(torch.from_numpy(raw.reshape(-1).copy()), qt, shape)
    assert ours.dtype == torch.float32 and tuple(ours.shape) == shape
    np.testing.assert_array_equal(ours.numpy(), np.asarray(ref, dtype=np.float32))
    # a 1-D tensor (a norm or bias written in the type) too
    one = dequantize(torch.from_numpy(raw[0].copy()), qt, (block * per_row,))
    np.testing.assert_array_equal(one.numpy(), np.asarray(ref, dtype=np.float32)[0])


def _with_raw_type(monkeypatch, kind: str, qt: Q) -> None:
    """Make write_tiny_gguf store tensor ``kind`` as random blocks of ``qt`` (which gguf.quants
    cannot quantize), expected to load as zeros (never compared: the load must fail)."""
    block, size = GGML_QUANT_SIZES[qt]

    def quantize(arr, q):
        if q != qt:
            return quants.quantize(arr, q)
        return np.random.default_rng().integers(
            0, 256, (arr.shape[0], arr.shape[1] // block * size), dtype=np.uint8)

    def dequant(raw, q):
        if q != qt:
            return quants.dequantize(raw, q)
        return np.zeros((raw.shape[0], raw.shape[1] // size * block), np.float32)

    monkeypatch.setattr(test_gguf, "quants", types.SimpleNamespace(quantize=quantize,
                                                                   dequantize=dequant))
    monkeypatch.setitem(test_gguf.TINY_TYPES, kind, qt)


@pytest.mark.parametrize("qt", [Q.Q8_K, Q.I32], ids=lambda q: q.name)
def test_a_type_gguf_cannot_dequantize_is_refused_up_front_naming_the_tensor(qt, tmp_path,
                                                                            monkeypatch):
    """Was: 'GGUF tensor type Q8_K cannot be dequantized' without the tensor or the file, raised
    only when that tensor's turn came (after dequantizing every tensor before it)."""
    with pytest.raises(NotImplementedError):  # the oracle cannot either
        quants.dequantize(np.zeros((1, GGML_QUANT_SIZES[qt][1]), np.uint8), qt)
    _with_raw_type(monkeypatch, "ffn_gate", qt)
    path = tmp_path / "m.gguf"
    write_tiny_gguf(path, hidden=256, heads=4, kv_heads=2)  # ffn_gate rows: 256, one K block
    calls = []
    real = gguf_reader.dequantize  # (looked up there, by GGUFFile.tensor)
    monkeypatch.setattr(gguf_reader, "dequantize", lambda *a: calls.append(a) or real(*a))
    want = rf"m\.gguf: tensor 'blk\.0\.ffn_gate\.weight': GGUF tensor type {qt.name} "
    with pytest.raises(EmberError, match=want):
        load_gguf(path)
    assert calls == []  # refused before any tensor was dequantized
    with pytest.raises(EmberError, match=want):
        import_gguf(path, tmp_path / "out")
    assert calls == [] and not (tmp_path / "out").exists()
    with ember_gguf.GGUFFile(path) as g, pytest.raises(EmberError, match=want):
        g.tensor("blk.0.ffn_gate.weight")


def test_iq_and_tq_tensors_in_a_model_load_as_transformers_loads_them(tmp_path, monkeypatch):
    """Tensors of types only gguf.quants' numpy code dequantizes (IQ4_NL, TQ2_0, IQ4_XS: random
    blocks with finite scales), in a file that mixes them with other types per kind, load
    exactly and give transformers' GGUF logits."""
    from tests.models.test_gguf import transformers_gguf_model
    from tests.models.test_gguf_families import _ember

    scale_at = {Q.IQ4_NL: 0, Q.IQ4_XS: 0, Q.TQ2_0: -2}  # the fp16 scale's byte offset

    def quantize(arr, q):  # random blocks, each row's a function of the row (so the Q/K row
        if q not in scale_at:  # permutation commutes with it, as with a real quantizer)
            return quants.quantize(arr, q)
        block, size = GGML_QUANT_SIZES[q]
        rows = []
        for row in arr:
            rng = np.random.default_rng(list(row.view(np.uint32)[:8]))
            raw = rng.integers(0, 256, (len(row) // block, size), dtype=np.uint8)
            if q == Q.IQ4_XS:  # scales_h / scales_l: 6-bit sub-block scales, kept small
                raw[:, 2:8] = 0
            d = (rng.uniform(0.5, 1.0, len(raw)) * 2e-3).astype(np.float16)
            at = scale_at[q] % size
            raw[:, at:at + 2] = d[:, None].view(np.uint8)
            rows.append(raw.reshape(-1))
        return np.stack(rows)

    monkeypatch.setattr(test_gguf, "quants", types.SimpleNamespace(
        quantize=quantize, dequantize=quants.dequantize))
    for kind, qt in {"attn_q": Q.IQ4_NL, "ffn_up": Q.TQ2_0, "ffn_gate": Q.IQ4_XS}.items():
        monkeypatch.setitem(test_gguf.TINY_TYPES, kind, qt)
    path = tmp_path / "iq.gguf"
    expected = write_tiny_gguf(path, hidden=256, heads=4, kv_heads=2)
    cfg, sd, _ = load_gguf(path)
    assert all(torch.isfinite(v).all() for v in sd.values())
    for k in expected:
        assert torch.equal(sd[k], expected[k]), k
    ids = torch.randint(0, cfg.vocab_size, (1, 9))
    with torch.no_grad():
        theirs = transformers_gguf_model(tmp_path, path.name)(ids).logits
    assert (_ember(cfg, sd, ids) - theirs).abs().max().item() <= 1e-4
