"""PiSSA / OLoRA inits (``lora.init = "pissa" | "pissa_niter_K" | "olora"``) against PEFT 0.21:
the starting A, B and residual base are PEFT's, and the trained adapter exports as the plain
rank-2r LoRA on the original base that PEFT's ``path_initial_model_for_weight_conversion``
writes."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
import transformers
from safetensors.torch import load_file

from ember import EmberError
from ember.models.loading import load_pretrained
from ember.models.lora import (
    LoRAConfig,
    apply_lora,
    hf_module_name,
    lora_modules,
    merge_lora,
    save_adapter,
)
from ember.models.lora_init import base_changing_init
from ember.models.nf4 import quantize_model_
from ember.models.transformer import Transformer
from tests.models.test_interop_peft import VOCAB, save_random_model

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.filterwarnings("ignore:.*no tokenizer.json")

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ADAPTER = "adapter_model.safetensors"
IDS = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("pissa_bases")
    return {"plain": save_random_model(root / "plain", transformers.LlamaConfig, seed=3),
            "tied": save_random_model(root / "tied", transformers.LlamaConfig, seed=4,
                                      tie_word_embeddings=True)}


def _peft_model(base, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = transformers.AutoModelForCausalLM.from_pretrained(base).eval()
        return peft.get_peft_model(hf, peft.LoraConfig(r=4, target_modules=TARGETS, **kw)).eval()


def _ember(base, **kw):
    model, _ = load_pretrained(base)
    return apply_lora(model, LoRAConfig(rank=4, targets=tuple(TARGETS), **kw)).eval()


def _peft_layer(pm, model, name):
    return pm.base_model.model.get_submodule(hf_module_name(name, model.cfg))


# (pissa without rsLoRA and olora with it: test_export_is_peft_s_conversion compares the inits)
@pytest.mark.parametrize("init,kw", [
    ("pissa", dict(lora_alpha=6, use_rslora=True)),
    ("olora", dict(lora_alpha=3)),
], ids=["pissa_rslora", "olora"])
def test_init_is_peft_s(bases, init, kw):
    """A, B and the residual base equal PEFT's (alpha != r, rsLoRA scales), and the model still
    computes the original function."""
    pm = _peft_model(bases["plain"], init_lora_weights=init, **kw)
    model = _ember(bases["plain"], init=init, alpha=kw["lora_alpha"],
                   use_rslora=kw.get("use_rslora", False))
    for name, m in lora_modules(model).items():
        layer = _peft_layer(pm, model, name)
        for mine, theirs in ((m.lora_A, layer.lora_A["default"].weight),
                             (m.lora_B, layer.lora_B["default"].weight),
                             (m.base.weight, layer.base_layer.weight)):
            torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-6)
    original, _ = load_pretrained(bases["plain"])
    with torch.no_grad():
        torch.testing.assert_close(model(IDS), original.eval()(IDS), rtol=0, atol=1e-5)


def test_pissa_niter_draws_as_peft(bases):
    """pissa_niter_K: torch.svd_lowrank from the same RNG state gives PEFT's pissa_init."""
    pm = _peft_model(bases["plain"], lora_alpha=6)  # a plain init: pissa_init is called below
    layer = pm.base_model.model.model.layers[1].mlp.down_proj
    w = layer.base_layer.weight.detach().clone()
    torch.manual_seed(7)
    layer.pissa_init("default", "pissa_niter_3")
    torch.manual_seed(7)
    A, B, residual = base_changing_init(w, 4, 6 / 4, "pissa_niter_3")
    for mine, theirs in ((A, layer.lora_A["default"].weight), (B, layer.lora_B["default"].weight),
                         (residual, layer.base_layer.weight)):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-6)
    model = _ember(bases["plain"], init="pissa_niter_2", alpha=8)  # the function is kept
    original, _ = load_pretrained(bases["plain"])
    with torch.no_grad():
        torch.testing.assert_close(model(IDS), original.eval()(IDS), rtol=0, atol=1e-5)


def _train(model, pm=None):
    """Random steps away from the init, copied into PEFT's model too."""
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, m in lora_modules(model).items():
            for p in m.adapter_params().values():
                p.add_(0.05 * torch.randn(p.shape, generator=g))
            if pm is not None:
                layer = _peft_layer(pm, model, name)
                layer.lora_A["default"].weight.copy_(m.lora_A)
                layer.lora_B["default"].weight.copy_(m.lora_B)


@pytest.mark.parametrize("init,rslora", [("pissa", False), ("olora", True)])
def test_export_is_peft_s_conversion(bases, tmp_path, init, rslora):
    """The exported adapter is PEFT's path_initial_model_for_weight_conversion output (tensors,
    r, lora_alpha) and loads on the ORIGINAL base with the trained model's logits; merged, the
    model is the original weights plus that update."""
    pm = _peft_model(bases["plain"], init_lora_weights=init, lora_alpha=8, use_rslora=rslora)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm.save_pretrained(tmp_path / "init")
    model = _ember(bases["plain"], init=init, alpha=8, use_rslora=rslora)
    _train(model, pm)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm.save_pretrained(tmp_path / "peft", path_initial_model_for_weight_conversion=tmp_path
                           / "init")
    save_adapter(model, tmp_path / "ember")
    mine, theirs = (load_file(tmp_path / d / ADAPTER) for d in ("ember", "peft"))
    assert set(mine) == set(theirs)
    for k in mine:
        torch.testing.assert_close(mine[k], theirs[k], rtol=0, atol=1e-6)
    cfg = {d: json.loads((tmp_path / d / "adapter_config.json").read_text()) for d in ("ember",
                                                                                        "peft")}
    for key in ("r", "lora_alpha", "init_lora_weights", "use_rslora"):
        assert cfg["ember"][key] == pytest.approx(cfg["peft"][key]), key
    assert cfg["ember"]["r"] == 8 and cfg["ember"]["init_lora_weights"] is True
    with torch.no_grad():
        trained = model(IDS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = transformers.AutoModelForCausalLM.from_pretrained(bases["plain"]).eval()
        loaded = peft.PeftModel.from_pretrained(hf, tmp_path / "ember").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(IDS).logits, trained, rtol=0, atol=1e-4)
        merge_lora(model)
        torch.testing.assert_close(model(IDS), trained, rtol=0, atol=1e-4)
    original, _ = load_pretrained(bases["plain"])
    w0 = original.get_submodule("layers.0.attn.q_proj").weight
    assert (model.get_submodule("layers.0.attn.q_proj").weight - w0).abs().max() < 0.5


def test_dora_and_tied_embedding_export(bases, tmp_path):
    """DoRA's magnitude starts at ||W|| over the residual (as PEFT's, whose DoRA init follows
    PiSSA's) and is exported as it is; an embedding adapter (PEFT: A zero, B normal whatever the
    init) is padded with zeros to rank 2r. Both load on the original base with Ember's logits
    (PEFT's own conversion would drop the magnitude and the embedding's adapter)."""
    pm = _peft_model(bases["plain"], init_lora_weights="pissa", lora_alpha=8, use_dora=True)
    model = _ember(bases["plain"], init="pissa", alpha=8, use_dora=True)
    for name, m in lora_modules(model).items():
        mag = _peft_layer(pm, model, name).lora_magnitude_vector["default"].weight
        torch.testing.assert_close(m.lora_magnitude, mag, rtol=0, atol=1e-5)
    for base, kw in (("plain", dict(use_dora=True)), ("tied", {})):
        model, _ = load_pretrained(bases[base])
        targets = ("q_proj", "down_proj") + (("embed_tokens",) if base == "tied" else ())
        apply_lora(model, LoRAConfig(rank=4, alpha=8, targets=targets, init="pissa", **kw))
        _train(model.eval())
        save_adapter(model, tmp_path / base)
        with torch.no_grad():
            trained = model(IDS)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            hf = transformers.AutoModelForCausalLM.from_pretrained(bases[base]).eval()
            loaded = peft.PeftModel.from_pretrained(hf, tmp_path / base).eval()
        with torch.no_grad():
            torch.testing.assert_close(loaded(IDS).logits, trained, rtol=0, atol=1e-4)


def test_residual_is_deterministic(bases):
    """A resume rebuilds the residual base from the model folder: bit for bit the same (the
    run's base fingerprint checks it)."""
    from ember.engine.state import base_fingerprint

    a, b = (_ember(bases["plain"], init="pissa", alpha=8) for _ in range(2))
    assert base_fingerprint(a) == base_fingerprint(b)
    for (n, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(x, y), n
    plain = _ember(bases["plain"], alpha=8)
    assert base_fingerprint(plain) != base_fingerprint(a)


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_2", "olora"])
def test_residual_does_not_depend_on_the_thread_count(init):
    """The residual base (and A, B) came out otherwise with another CPU thread count (LAPACK's
    SVD / QR and the B @ A product split their work by threads; e.g. pissa on a 96 x 64 weight,
    olora on 64 x 64): a run started in one process (torch's default: every core) was refused
    when continued under torchrun (OMP_NUM_THREADS=1 per rank) or with another ``threads``, its
    base fingerprint differing. Decomposed on one thread, the same bits at any count."""
    before = torch.get_num_threads()
    weights = [torch.randn(out, inp, generator=torch.Generator().manual_seed(i)) * 0.05
               for i, (out, inp) in enumerate([(96, 64), (64, 64), (64, 96), (200, 72)])]
    got = {}
    try:
        for n in (1, 3):
            torch.set_num_threads(n)
            torch.manual_seed(0)  # (pissa_niter_K's random draw)
            got[n] = [base_changing_init(w, 4, 2.0, init) for w in weights]
            assert torch.get_num_threads() == n  # left as the caller set it
    finally:
        torch.set_num_threads(before)
    for one, three in zip(got[1], got[3], strict=True):
        for x, y in zip(one, three, strict=True):
            assert torch.equal(x, y)


def test_bf16_base_is_peft_s(tmp_path):
    """A bf16 base: the residual is rounded to bf16 and A, B through it, as PEFT casts them.
    PEFT decomposes on one thread here too: its last bits (before the bf16 rounding) depend on
    the thread count, Ember's are those of one thread at any count."""
    base = save_random_model(tmp_path / "b", transformers.LlamaConfig, seed=6,
                             torch_dtype=torch.bfloat16)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            hf = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
            pm = peft.get_peft_model(hf, peft.LoraConfig(
                r=4, lora_alpha=8, target_modules=["v_proj"], init_lora_weights="pissa"))
    finally:
        torch.set_num_threads(threads)
    model, _ = load_pretrained(base, dtype=torch.bfloat16)
    apply_lora(model, LoRAConfig(rank=4, alpha=8, targets=("v_proj",), init="pissa"))
    for name, m in lora_modules(model).items():
        layer = _peft_layer(pm, model, name)
        assert m.base.weight.dtype == torch.bfloat16 and m.lora_A.dtype == torch.float32
        assert torch.equal(m.base.weight, layer.base_layer.weight)
        assert torch.equal(m.lora_A, layer.lora_A["default"].weight.float())
        assert torch.equal(m.lora_B, layer.lora_B["default"].weight.float())


def test_refusals(bases, tmp_path):
    with pytest.raises(EmberError, match="'pissa_niter_K', 'olora'.*got 'svd'"):
        LoRAConfig(init="svd")
    LoRAConfig(init="pissa_niter_16")
    model, _ = load_pretrained(bases["plain"])
    quantize_model_(model)
    with pytest.raises(EmberError, match="4-bit.*needs the full-precision weights"):
        apply_lora(model, LoRAConfig(rank=4, targets=("q_proj",), init="pissa"))
    model, _ = load_pretrained(bases["plain"])
    with pytest.raises(EmberError, match="rank 40 exceeds.*<= 16"):
        apply_lora(model, LoRAConfig(rank=40, targets=("k_proj",), init="olora"))
    phi3 = save_random_model(tmp_path / "phi3", transformers.Phi3Config, seed=1,
                             pad_token_id=None, eos_token_id=2)
    model, _ = load_pretrained(phi3)
    with pytest.raises(EmberError, match="on Phi-3: PEFT decomposes the fused qkv_proj"):
        apply_lora(model, LoRAConfig(rank=4, targets=("q_proj",), init="pissa"))


def test_fsdp_export_model_on_meta(bases, tmp_path):
    """state._unsharded builds the export model on the meta device and applies lora there: no
    decomposition of meta weights; the starting adapters come from the trained model's
    peft_base_init (carried as a peft_* attribute)."""
    trained = _ember(bases["plain"], init="olora", alpha=8)
    _train(trained)
    with torch.device("meta"):
        model = Transformer(trained.cfg)
        apply_lora(model, LoRAConfig(rank=4, targets=tuple(TARGETS), init="olora", alpha=8))
    model.load_state_dict({k: v for k, v in trained.state_dict().items() if "lora_" in k},
                          strict=False, assign=True)
    model.peft_base_init = trained.peft_base_init
    save_adapter(model, tmp_path / "meta")
    save_adapter(trained, tmp_path / "live")
    a, b = (load_file(tmp_path / d / ADAPTER) for d in ("meta", "live"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_moe_attention_only(tmp_path):
    """On a mixture-of-experts model PiSSA adapts the attention (PEFT's logits after export) and
    is refused on the experts (PEFT's target_parameters)."""
    from tests.models.test_moe import _hf_model, _ids, _load

    _hf_model("mixtral").save_pretrained(tmp_path / "m")
    with pytest.raises(EmberError, match="not supported on the experts"):
        apply_lora(_load(tmp_path / "m"), LoRAConfig(rank=2, targets=("up",), init="pissa"))
    model = apply_lora(_load(tmp_path / "m"), LoRAConfig(rank=2, targets=("q", "o"), init="pissa"))
    _train(model.eval())
    save_adapter(model, tmp_path / "ad")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
        pm = peft.PeftModel.from_pretrained(hf, tmp_path / "ad").eval()
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(pm(ids).logits, model(ids), rtol=0, atol=1e-4)
