"""Base-changing LoRA inits on a 4-bit (NF4) base, with PEFT 0.21 + bitsandbytes as the oracle:
OLoRA (PEFT's ``olora_init`` dequantizes the 4-bit weight, takes its QR, and quantizes the fp32
residual again) gives PEFT's A, B and bnb's residual bytes; PiSSA on a 4-bit base is refused, as
PEFT refuses it (QPiSSA decomposes the dense weight)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn

from ember import EmberError
from ember.models.loading import load_pretrained
from ember.models.lora import LoRAConfig, apply_lora, hf_module_name, lora_modules, save_adapter
from tests.models.test_interop_peft import VOCAB, save_random_model

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
pytest.importorskip("bitsandbytes")
pytestmark = pytest.mark.filterwarnings("ignore:.*no tokenizer.json")

TARGETS = ("q_proj", "v_proj", "down_proj")
IDS = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))


def _bnb(folder, dtype=torch.float32, double_quant=True):
    qcfg = transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.AutoModelForCausalLM.from_pretrained(
            folder, quantization_config=qcfg, device_map="cpu", dtype=dtype).eval()


def _logits(model, ids=IDS):
    with torch.no_grad():
        out = model(ids)
    return getattr(out, "logits", out).double()


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return save_random_model(tmp_path_factory.mktemp("nf4init") / "m", transformers.LlamaConfig,
                             seed=7)


@pytest.mark.parametrize("double_quant", [True, False], ids=["dq", "no_dq"])
def test_olora_on_nf4_is_peft_s(base, double_quant):
    """A, B equal PEFT's; the re-quantized residual is bnb's, byte for byte (absmax, the quant
    state's float32 dtype); the logits are PEFT's."""
    kw = dict(r=4, lora_alpha=8, target_modules=list(TARGETS), init_lora_weights="olora")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(_bnb(base, double_quant=double_quant),
                                 peft.LoraConfig(**kw)).eval()
    model, _ = load_pretrained(base, quantize="nf4", double_quant=double_quant)
    apply_lora(model, LoRAConfig(rank=4, alpha=8, targets=TARGETS, init="olora")).eval()
    for name, m in lora_modules(model).items():
        layer = pm.base_model.model.get_submodule(hf_module_name(name, model.cfg))
        assert m.lora_A.dtype == torch.float32
        torch.testing.assert_close(m.lora_A, layer.lora_A["default"].weight, rtol=0, atol=1e-6)
        torch.testing.assert_close(m.lora_B, layer.lora_B["default"].weight, rtol=0, atol=1e-6)
        q, theirs = m.base.quant_weight, layer.base_layer.weight
        qs = theirs.quant_state
        assert q.dtype == qs.dtype == torch.float32
        assert torch.equal(q.packed.flatten(), theirs.data.flatten()), name
        assert torch.equal(q.state.absmax, qs.absmax), name
        if double_quant:
            assert torch.equal(q.state.nested_absmax, qs.state2.absmax), name
    d = (_logits(model) - _logits(pm)).abs().max().item()
    assert d <= 1e-4, d


def test_olora_on_nf4_trains_and_exports(base, tmp_path):
    """A trained OLoRA adapter on an NF4 base exports as the rank-2r LoRA on the original 4-bit
    base (PEFT's conversion): PEFT on transformers' bnb model computes Ember's logits within the
    residual's own re-quantization error."""
    model, _ = load_pretrained(base, quantize="nf4")
    apply_lora(model, LoRAConfig(rank=4, alpha=8, targets=TARGETS, init="olora"))
    before = _logits(model.eval())
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model.train()
    for _ in range(2):
        opt.zero_grad()
        logits = model(IDS[:, :-1])
        nn.functional.cross_entropy(logits.flatten(0, 1), IDS[:, 1:].flatten()).backward()
        opt.step()
    ours = _logits(model.eval())
    assert (ours - before).abs().max() > 1e-2
    save_adapter(model, tmp_path / "ad")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = _bnb(base)
        plain = _logits(hf)
        pm = peft.PeftModel.from_pretrained(hf, tmp_path / "ad").eval()
    assert pm.peft_config["default"].r == 8
    d = (ours - _logits(pm)).abs().max().item()
    # the residual's re-quantization error: NF4's own (the dense model against its NF4 copy)
    dense, _ = load_pretrained(base)
    nf4_err = (_logits(dense.eval()) - plain).abs().max().item()
    assert d < nf4_err, (d, nf4_err)


def test_pissa_on_nf4_refused(base):
    model, _ = load_pretrained(base, quantize="nf4")
    with pytest.raises(EmberError, match="'pissa' on a 4-bit.*'olora'"):
        apply_lora(model, LoRAConfig(rank=4, targets=("q_proj",), init="pissa"))
