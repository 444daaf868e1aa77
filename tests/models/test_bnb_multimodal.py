"""bitsandbytes checkpoints of multimodal Gemma 3 (Gemma3ForConditionalGeneration, as
transformers + bitsandbytes save them): the language model loads text-only, 4-bit weights as NF4
with transformers' text logits, 8-bit weights dequantized as bitsandbytes does (was: refused).
A merged multimodal export cannot copy a quantized vision tower and says so."""

from __future__ import annotations

import warnings

import pytest
import torch

from ember import EmberError
from ember.models.loading import load_pretrained, save_pretrained
from ember.models.nf4 import Linear4bit
from tests.models.test_gemma3_multimodal import _diff, _ids, save_multimodal

transformers = pytest.importorskip("transformers")
bnbf = pytest.importorskip("bitsandbytes.functional")
pytestmark = pytest.mark.filterwarnings("ignore:.*no tokenizer.json",
                                        "ignore:.*vision tower / projector")


def _quantized(tmp_path, **qc):
    dense = save_multimodal(tmp_path / "dense")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = transformers.Gemma3ForConditionalGeneration.from_pretrained(
            dense, quantization_config=transformers.BitsAndBytesConfig(**qc), device_map="cpu",
            attn_implementation="eager").eval()
    hf.save_pretrained(tmp_path / "bnb")
    return dense, tmp_path / "bnb", hf


def test_4bit_checkpoint_loads_the_language_model(tmp_path):
    _, folder, hf = _quantized(tmp_path, load_in_4bit=True, bnb_4bit_quant_type="nf4",
                               bnb_4bit_compute_dtype=torch.float32)
    model, _ = load_pretrained(folder)
    q = hf.model.language_model.layers[2].mlp.down_proj.weight
    assert isinstance(model.layers[2].mlp.down_proj, Linear4bit)
    assert torch.equal(model.layers[2].mlp.down_proj.quant_weight.dequantize(),
                       bnbf.dequantize_4bit(q.data, q.quant_state))
    ids = _ids()
    with torch.no_grad():
        assert _diff(model(ids), hf(input_ids=ids).logits) <= 1e-4
    with pytest.raises(EmberError, match="is a bitsandbytes checkpoint, whose quantized vision"):
        save_pretrained(model, tmp_path / "merged", dequantize=True, multimodal_base=folder)


def test_8bit_checkpoint_loads_dequantized(tmp_path):
    dense, folder, hf = _quantized(tmp_path, load_in_8bit=True)
    oracle = transformers.Gemma3ForConditionalGeneration.from_pretrained(
        dense, attn_implementation="eager").eval()
    int8 = {f"{n}.weight": bnbf.int8_vectorwise_dequant(m.weight.data, m.weight.SCB)
            for n, m in hf.named_modules()
            if getattr(m, "weight", None) is not None and m.weight.dtype == torch.int8}
    assert not oracle.load_state_dict(int8, strict=False).unexpected_keys
    model, _ = load_pretrained(folder, "float32")
    ids = _ids(seed=1)
    with torch.no_grad():
        assert _diff(model(ids), oracle(input_ids=ids).logits) <= 1e-4
