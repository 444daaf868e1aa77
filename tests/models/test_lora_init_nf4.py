"""Base-changing LoRA inits on a 4-bit (NF4) base, with PEFT 0.21 + bitsandbytes as the oracle:
OLoRA (PEFT's ``olora_init`` dequantizes the 4-bit weight, takes its QR, and quantizes the fp32
residual again) gives PEFT's A, B and bnb's residual bytes; PiSSA on a 4-bit base is refused, as
PEFT refuses it (QPiSSA decomposes the dense weight)."""

from __future__ import annotations

import warnings

import pytest
import torch

from ember import EmberError
from ember.kernels._dispatch import one_cpu_thread
from ember.models.loading import iter_dense_weights, load_pretrained
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


def _peft_qpissa(base, tmp_path, dtype, **kw):
    """PEFT's QPiSSA recipe: pissa on the dense model, its starting adapter and its residual
    model saved, the residual loaded in 4 bit with the adapter on it. PEFT decomposes on one
    thread, as Ember does (the SVD's last bits follow the thread count)."""
    with warnings.catch_warnings(), one_cpu_thread(torch.device("cpu")):
        warnings.simplefilter("ignore")
        hf = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
        pm = peft.get_peft_model(hf, peft.LoraConfig(init_lora_weights="pissa", **kw))
        pm.peft_config["default"].init_lora_weights = True
        pm.save_pretrained(tmp_path / "pissa_init")
        pm.unload().save_pretrained(tmp_path / "residual")
        return peft.PeftModel.from_pretrained(_bnb(tmp_path / "residual", dtype),
                                              tmp_path / "pissa_init").eval()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_qpissa_is_peft_s_recipe(base, tmp_path, dtype):
    """A, B and the residual's NF4 bytes are those of PEFT's recipe, read from the dense
    weights one at a time (iter_dense_weights); fp32 logits within 1e-4 of PEFT's."""
    pm = _peft_qpissa(base, tmp_path, dtype, r=4, lora_alpha=8, target_modules=list(TARGETS))
    model, _ = load_pretrained(base, dtype, quantize="nf4")
    apply_lora(model, LoRAConfig(rank=4, alpha=8, targets=TARGETS, init="pissa"),
               dense_weights=lambda keys: iter_dense_weights(base, keys)).eval()
    for name, m in lora_modules(model).items():
        layer = pm.base_model.model.get_submodule(hf_module_name(name, model.cfg))
        assert m.lora_A.dtype == torch.float32
        assert torch.equal(m.lora_A, layer.lora_A["default"].weight.float()), name
        assert torch.equal(m.lora_B, layer.lora_B["default"].weight.float()), name
        q, theirs = m.base.quant_weight, layer.base_layer.weight
        assert q.dtype == theirs.quant_state.dtype == dtype
        assert torch.equal(q.packed.flatten(), theirs.data.flatten()), name
        assert torch.equal(q.state.nested_absmax, theirs.quant_state.state2.absmax), name
    if dtype == torch.float32:  # (bf16: the same weights, each library's bf16 rounding)
        d = (_logits(model) - _logits(pm)).abs().max().item()
        assert d <= 1e-4, d


def test_qpissa_niter_draws_as_the_dense_path(base):
    """pissa_niter_K on an NF4 base draws what the dense path draws from the same seed: module
    by module in the model's order (the dense weights come in the checkpoint's order, where
    layers.0.mlp.down_proj precedes layers.0.self_attn.q_proj)."""
    cfg = LoRAConfig(rank=4, alpha=8, targets=("embed_tokens", *TARGETS), init="pissa_niter_2")
    torch.manual_seed(3)
    dense = apply_lora(load_pretrained(base)[0], cfg)
    after = torch.rand(3)
    torch.manual_seed(3)
    nf4 = apply_lora(load_pretrained(base, quantize="nf4")[0], cfg,
                     dense_weights=lambda keys: iter_dense_weights(base, keys))
    assert torch.equal(torch.rand(3), after)  # the RNG left where the dense path leaves it
    mods = lora_modules(nf4)
    for name, m in lora_modules(dense).items():
        for k, p in m.adapter_params().items():
            assert torch.equal(p, mods[name].adapter_params()[k]), (name, k)


def test_dense_weights_read_only_the_keys_asked(base, tmp_path, monkeypatch):
    """QPiSSA read every tensor of the base checkpoint again (the embedding, the head, every
    projection, of every shard) to decompose a few: on a 4-layer, 12-shard model 39 tensors,
    2.9 MB, for q_proj / v_proj's 8 (0.39 MB). Now only those, shards without them unopened."""
    import ember.models.safetensors_io as sio

    multi = tmp_path / "multi"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = transformers.AutoModelForCausalLM.from_pretrained(base)
    hf.save_pretrained(multi, max_shard_size="20KB")
    assert len(list(multi.glob("*.safetensors"))) > 3
    full = dict(iter_dense_weights(multi))
    keys = {"layers.1.attn.q_proj.weight", "layers.0.mlp.down_proj.weight"}
    read, real = [], sio.open_weights

    class Counted:
        def __init__(self, path):
            self.f = real(path)

        def __enter__(self):
            self.f.__enter__()
            return self

        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def get_tensor(self, key):
            read.append(key)
            return self.f.get_tensor(key)

    monkeypatch.setattr(sio, "open_weights", Counted)
    part = dict(iter_dense_weights(multi, keys))
    assert part.keys() == keys and all(torch.equal(part[k], full[k]) for k in keys)
    assert sorted(read) == ["model.layers.0.mlp.down_proj.weight",
                            "model.layers.1.self_attn.q_proj.weight"]


@pytest.fixture(scope="module")
def bnb_plain(base):
    """(transformers' bnb NF4 logits, NF4's own error: the dense model against them)."""
    plain = _logits(_bnb(base))
    dense, _ = load_pretrained(base)
    return plain, (_logits(dense.eval()) - plain).abs().max().item()


@pytest.mark.parametrize("init", ["olora", "pissa_niter_2"])
def test_nf4_adapter_exports_for_peft(base, bnb_plain, tmp_path, init):
    """A moved adapter (as if trained) exports as the rank-2r LoRA on the original model
    (PEFT's conversion): on its NF4 copy (transformers' bnb model) PEFT computes Ember's logits
    within NF4's own error, the residual's re-quantization being the difference."""
    model, _ = load_pretrained(base, quantize="nf4")
    apply_lora(model, LoRAConfig(rank=4, alpha=8, targets=TARGETS, init=init),
               dense_weights=lambda keys: iter_dense_weights(base, keys))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.add_(0.3 * torch.randn(m.lora_B.shape, generator=g))
    ours = _logits(model.eval())
    save_adapter(model, tmp_path / "ad")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.PeftModel.from_pretrained(_bnb(base), tmp_path / "ad").eval()
    assert pm.peft_config["default"].r == 8
    plain, nf4_err = bnb_plain
    d = (ours - _logits(pm)).abs().max().item()
    assert d < nf4_err and (ours - plain).abs().max() > 3 * nf4_err, (d, nf4_err)


def test_pissa_on_nf4_refusals(base, tmp_path):
    with pytest.raises(EmberError, match="'loftq' is not supported.*'pissa' with model.quantize"):
        LoRAConfig(init="loftq")
    model, _ = load_pretrained(base, quantize="nf4")
    with pytest.raises(EmberError, match="'pissa' on a 4-bit.*full-precision.*'olora'"):
        apply_lora(model, LoRAConfig(rank=4, targets=("q_proj",), init="pissa"))
    with pytest.raises(EmberError, match="have no.*layers.0.attn.q_proj.weight"):
        apply_lora(model, LoRAConfig(rank=4, targets=("q_proj",), init="pissa"),
                   dense_weights=lambda keys: iter([]))
    _bnb(base).save_pretrained(tmp_path / "bnb")
    with pytest.raises(EmberError, match="bitsandbytes 4-bit checkpoint.*unquantized model"):
        next(iter_dense_weights(tmp_path / "bnb"))
