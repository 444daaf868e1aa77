"""LoRA dropout in training forwards against transformers + peft 0.21 under the same seed: PEFT
draws one mask per adapted module, in module order; on Phi-3 its LoRA on the fused ``qkv_proj`` /
``gate_up_proj`` draws ONE mask for all parts, which Ember (q/k/v and gate/up kept apart) must
share the same way, fused kernels (TRITON_INTERPRET) and DoRA included."""

from __future__ import annotations

import warnings

import pytest
import torch

from ember.models.loading import load_pretrained
from ember.models.lora import load_adapter

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
pytestmark = pytest.mark.filterwarnings("ignore:.*no tokenizer.json")

VOCAB = 96


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Identical reductions in both models' matmuls."""


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("drop_bases")
    out = {}
    for name, cls, kw in (("phi3", transformers.Phi3Config, dict(pad_token_id=None,
                                                                  eos_token_id=2)),
                          ("llama", transformers.LlamaConfig, {})):
        config = cls(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, **kw)
        model = transformers.AutoModelForCausalLM.from_config(config)
        g = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_((1 if "norm" in n else 0) + 0.1 * torch.randn(p.shape, generator=g))
        model.save_pretrained(root / name)
        out[name] = root / name
    return out


@pytest.mark.parametrize("base,dora", [("phi3", False), ("phi3", True), ("llama", False)])
@pytest.mark.parametrize("fused", [True, False])
def test_training_forward_draws_peft_masks(bases, tmp_path, base, dora, fused):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = transformers.AutoModelForCausalLM.from_pretrained(bases[base],
                                                               attn_implementation="eager")
        pm = peft.get_peft_model(hf, peft.LoraConfig(
            r=4, lora_alpha=8, lora_dropout=0.3, init_lora_weights=False, use_dora=dora,
            target_modules="all-linear"))
        pm.save_pretrained(tmp_path / "ad")
    model, _ = load_pretrained(bases[base])
    load_adapter(model, tmp_path / "ad")
    model.set_fused_lora(fused).train()
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    pm.train()
    torch.manual_seed(7)
    ref = pm(ids).logits
    torch.manual_seed(7)
    got = model(ids)
    after_ours = torch.rand(4)
    assert (got - ref).abs().max().item() <= 1e-4
    # as many draws: the global RNG ends where PEFT's left it (the next step's masks agree too)
    torch.manual_seed(7)
    pm(ids)
    assert torch.equal(after_ours, torch.rand(4))
    # the dropout is really drawn: another seed gives other logits
    torch.manual_seed(8)
    assert (model(ids) - ref).abs().max().item() > 1e-3


@pytest.mark.parametrize("base", ["phi3", "llama"])
def test_adapters_disabled_draw_no_lora_masks(bases, tmp_path, base):
    """A training forward with the adapters off (DPO's reference, ``adapters_disabled``) is the
    base alone and draws no LoRA dropout masks, as PEFT's ``disable_adapter``: the global RNG
    ends where PEFT's does, so the policy's next masks are PEFT's too."""
    from ember.engine.losses import adapters_disabled

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = transformers.AutoModelForCausalLM.from_pretrained(bases[base],
                                                               attn_implementation="eager")
        pm = peft.get_peft_model(hf, peft.LoraConfig(
            r=4, lora_alpha=8, lora_dropout=0.3, init_lora_weights=False,
            target_modules="all-linear"))
        pm.save_pretrained(tmp_path / "ad")
    model, _ = load_pretrained(bases[base])
    load_adapter(model, tmp_path / "ad")
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    pm.train()
    model.train()
    with torch.no_grad():
        torch.manual_seed(7)
        with pm.disable_adapter():
            ref = pm(ids).logits
        ref_next = pm(ids).logits  # the adapters back on: masks drawn after the reference's
        torch.manual_seed(7)
        with adapters_disabled(model):
            got = model(ids)
        got_next = model(ids)
    assert (got - ref).abs().max().item() <= 1e-4
    assert (got_next - ref_next).abs().max().item() <= 1e-4
