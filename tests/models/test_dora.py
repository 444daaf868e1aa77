"""DoRA (``LoRAConfig.use_dora``) against PEFT 0.21's ``use_dora=True`` on tiny random Llamas, fp32:
PEFT's adapters load with PEFT's logits, Ember's load in PEFT with Ember's, gradients of A, B and
the magnitude match, dropout and biases follow PEFT, merging is exact, an NF4 base works, and
``ember train`` with ``lora.use_dora = true`` learns."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from ember import EmberError
from ember.models.loading import load_pretrained
from ember.models.lora import (
    LoRAConfig,
    LoRALinear,
    apply_lora,
    load_adapter,
    lora_modules,
    lora_parameters,
    merge_lora,
    save_adapter,
)
from ember.models.transformer import _fusable
from tests.engine import conftest as engine_fixtures
from tests.models.test_interop_peft import VOCAB, save_random_model

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
pytestmark = pytest.mark.filterwarnings("ignore:.*no tokenizer.json")

TOL = 1e-5
tiny = engine_fixtures.tiny  # the engine tests' tiny model folder and JSONL files


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """Tiny random Llamas without and with q/k/v/o biases (norms random too)."""
    root = tmp_path_factory.mktemp("dora_bases")
    out = {}
    for name, kw in {"plain": {}, "biased": dict(attention_bias=True, mlp_bias=True)}.items():
        out[name] = save_random_model(root / name, transformers.LlamaConfig, seed=len(name), **kw)
    return out


def _ids(seed=0):
    return torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(seed))


def _hf(base):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.AutoModelForCausalLM.from_pretrained(base).eval()


def _peft_dora(base, out, **kw):
    """A PEFT DoRA adapter with random A, B and magnitude (not the row norms), saved to ``out``."""
    kw.setdefault("target_modules", "all-linear")
    pm = peft.get_peft_model(_hf(base), peft.LoraConfig(
        r=4, lora_alpha=8, use_dora=True, init_lora_weights=False, **kw))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_magnitude_vector" in n:
                p.mul_(1 + 0.5 * torch.rand(p.shape, generator=g))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm.save_pretrained(out)
    return pm.eval()


def _randomize(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_A.normal_(0, 0.3, generator=g)
            m.lora_B.normal_(0, 0.3, generator=g)
            m.lora_magnitude.mul_(1 + 0.5 * torch.rand(m.lora_magnitude.shape, generator=g))
    return model


@pytest.mark.parametrize("kind", ["plain", "biased"])
def test_peft_dora_adapter_loads_with_peft_logits(bases, tmp_path, kind):
    pm = _peft_dora(bases[kind], tmp_path / "a")
    keys = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    mag_key = "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"
    assert mag_key in keys and keys[mag_key].shape == (32,)  # what peft 0.21 writes
    ids = _ids()
    with torch.no_grad():
        ref = pm(ids).logits
    model, _ = load_pretrained(bases[kind], "float32")
    load_adapter(model, tmp_path / "a")
    mods = lora_modules(model)
    assert len(mods) == 14 and all(m.use_dora for m in mods.values())
    assert not _fusable([mods["layers.0.attn.q_proj"], mods["layers.0.attn.k_proj"],
                         mods["layers.0.attn.v_proj"]])
    with torch.no_grad():
        got = model.eval()(ids)
    assert (got - ref).abs().max() <= TOL

    # The same A and B as plain LoRA compute something else: the rescale is really applied.
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": False}))
    save_file({k: v for k, v in keys.items() if "magnitude" not in k},
              str(tmp_path / "plain" / "adapter_model.safetensors"))
    lora, _ = load_pretrained(bases[kind], "float32")
    load_adapter(lora, tmp_path / "plain")
    with torch.no_grad():
        assert (lora.eval()(ids) - ref).abs().max() > 100 * TOL


def test_ember_dora_adapter_loads_in_peft(bases, tmp_path):
    model, _ = load_pretrained(bases["biased"], "float32")
    apply_lora(model, LoRAConfig(rank=4, alpha=8, targets=("q", "v", "down"), use_dora=True))
    _randomize(model)
    save_adapter(model, tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert cfg["use_dora"] is True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.PeftModel.from_pretrained(_hf(bases["biased"]), tmp_path / "a").eval()
    q = pm.base_model.model.model.layers[1].self_attn.q_proj
    assert torch.equal(q.lora_magnitude_vector["default"].weight,
                       lora_modules(model)["layers.1.attn.q_proj"].lora_magnitude)
    ids = _ids(1)
    with torch.no_grad():
        assert (model.eval()(ids) - pm(ids).logits).abs().max() <= TOL
    again, _ = load_pretrained(bases["biased"], "float32")  # and back: the same tensors
    load_adapter(again, tmp_path / "a")
    for n, m in lora_modules(again).items():
        for k, p in m.adapter_params().items():
            assert torch.equal(p, lora_modules(model)[n].adapter_params()[k]), (n, k)


def test_gradients_match_peft(bases, tmp_path):
    pm = _peft_dora(bases["biased"], tmp_path / "a", target_modules=["q_proj", "o_proj", "up_proj"])
    pm.train()
    model, _ = load_pretrained(bases["biased"], "float32")
    load_adapter(model, tmp_path / "a")
    model.train()
    ids = _ids(2)
    w = torch.randn(2, 12, VOCAB, generator=torch.Generator().manual_seed(3))
    (pm(ids).logits * w).sum().backward()
    (model(ids) * w).sum().backward()
    named = dict(pm.named_parameters())
    checked = 0
    for n, m in lora_modules(model).items():
        hf = "base_model.model.model." + n.replace("attn", "self_attn")
        for ours, theirs in (("lora_A", "lora_A.default.weight"),
                             ("lora_B", "lora_B.default.weight"),
                             ("lora_magnitude", "lora_magnitude_vector.default.weight")):
            g_ref = named[f"{hf}.{theirs}"].grad
            g = getattr(m, ours).grad
            assert g is not None and g.abs().max() > 0
            assert (g - g_ref).abs().max() <= TOL * max(1.0, g_ref.abs().max()), (n, ours)
            checked += 1
    assert checked == 3 * 3 * 2
    assert {id(p) for p in lora_parameters(model)} == {
        id(p) for p in model.parameters() if p.requires_grad}


def test_dropout_and_bias_follow_peft():
    """PEFT with dropout: the base sees x, the rescaled base and the update see dropout(x); one
    mask drawn, so the same seed gives the same output and gradients."""
    torch.manual_seed(0)
    holder = nn.Sequential()
    holder.proj = nn.Linear(24, 20, bias=True)
    pm = peft.get_peft_model(copy.deepcopy(holder), peft.LoraConfig(
        r=3, lora_alpha=6, lora_dropout=0.4, use_dora=True, init_lora_weights=False,
        target_modules=["proj"]))
    peft_mod = pm.base_model.model.proj
    with torch.no_grad():
        peft_mod.lora_magnitude_vector["default"].weight.mul_(1.3)
    ours = LoRALinear(copy.deepcopy(holder.proj), 3, 6.0, dropout=0.4, use_dora=True)
    with torch.no_grad():
        ours.lora_A.copy_(peft_mod.lora_A["default"].weight)
        ours.lora_B.copy_(peft_mod.lora_B["default"].weight)
        ours.lora_magnitude.copy_(peft_mod.lora_magnitude_vector["default"].weight)
    x = torch.randn(5, 24)
    for train in (True, False):
        pm.train(train)
        ours.train(train)
        torch.manual_seed(7)
        ref = pm(x)
        torch.manual_seed(7)
        got = ours(x)
        assert (got - ref).abs().max() <= TOL, train
    torch.manual_seed(7)
    pm.train()(x).square().sum().backward()
    torch.manual_seed(7)
    ours.train()(x).square().sum().backward()
    for a, b in ((ours.lora_A, peft_mod.lora_A["default"].weight),
                 (ours.lora_B, peft_mod.lora_B["default"].weight),
                 (ours.lora_magnitude, peft_mod.lora_magnitude_vector["default"].weight)):
        assert (a.grad - b.grad).abs().max() <= TOL * max(1.0, b.grad.abs().max())


def test_new_dora_is_the_base_and_merges_exactly(bases):
    model, _ = load_pretrained(bases["biased"], "float32")
    ids = _ids(4)
    with torch.no_grad():
        base = model.eval()(ids)
    apply_lora(model, LoRAConfig(rank=4, alpha=8, use_dora=True))
    q = lora_modules(model)["layers.0.attn.q_proj"]
    assert torch.allclose(q.lora_magnitude, q.base.weight.norm(dim=1))  # ||W|| per output row
    with torch.no_grad():
        assert (model(ids) - base).abs().max() <= TOL  # B = 0, m = ||W||: the base model
        _randomize(model)
        unmerged = model(ids)
    assert (unmerged - base).abs().max() > 100 * TOL
    bias = model.get_submodule("layers.0.attn.q_proj").base.bias.clone()
    merge_lora(model)
    assert not lora_modules(model)
    assert torch.equal(model.get_submodule("layers.0.attn.q_proj").bias, bias)
    with torch.no_grad():
        assert (model(ids) - unmerged).abs().max() <= TOL


def test_adapters_disabled_is_the_base(bases):
    from ember.engine.losses import adapters_disabled

    model, _ = load_pretrained(bases["plain"], "float32")
    ids = _ids(5)
    with torch.no_grad():
        base = model.eval()(ids)
        apply_lora(model, LoRAConfig(rank=4, alpha=8, use_dora=True))
        _randomize(model)
        with adapters_disabled(model):
            assert torch.equal(model(ids), base)
        assert (model(ids) - base).abs().max() > 100 * TOL


def test_nf4_base(bases):
    from ember.models.nf4 import dequantize_model_, quantize_model_

    model, _ = load_pretrained(bases["plain"], "float32")
    quantize_model_(model)
    dense = copy.deepcopy(model)
    dequantize_model_(dense, torch.float32)
    apply_lora(model, LoRAConfig(rank=4, alpha=8, use_dora=True))
    apply_lora(dense, LoRAConfig(rank=4, alpha=8, use_dora=True))
    for m in (model, dense):
        _randomize(m)
    nf4_q = lora_modules(model)["layers.0.attn.q_proj"]
    dense_q = lora_modules(dense)["layers.0.attn.q_proj"]
    assert hasattr(nf4_q.base, "quant_weight")
    assert torch.allclose(nf4_q.weight_norm(), dense_q.weight_norm())  # dequantized for the norm
    ids = _ids(6)
    model.train()(ids).sum().backward()
    assert all(p.grad is not None for p in lora_parameters(model))
    with torch.no_grad():
        got = model.eval()(ids)
        assert (got - dense.eval()(ids)).abs().max() <= 1e-4
        merge_lora(model)
        assert (model(ids) - got).abs().max() <= 1e-4


@pytest.mark.parametrize("targets", [("q", "k", "v", "o", "gate", "up", "down"),
                                     ("q", "v", "up")])
def test_phi3_fused_projections_both_ways(tmp_path, targets):
    """Phi-3 fuses q/k/v and gate/up: PEFT's DoRA adapter on qkv_proj / gate_up_proj loads (its
    magnitude split by rows), and Ember's adapter goes back fused, also when only some parts have
    an adapter (the others contribute their base rows' norms: rescaling 1)."""
    base = save_random_model(tmp_path / "phi3", transformers.Phi3Config, seed=3,
                             pad_token_id=0, tie_word_embeddings=False)
    pm = _peft_dora(base, tmp_path / "peft", target_modules=["qkv_proj", "gate_up_proj",
                                                              "o_proj", "down_proj"])
    ids = _ids(2)
    model, _ = load_pretrained(base, "float32")
    load_adapter(model, tmp_path / "peft")
    assert len(lora_modules(model)) == 14
    with torch.no_grad():
        assert (model.eval()(ids) - pm(ids).logits).abs().max() <= TOL
    ours, _ = load_pretrained(base, "float32")
    apply_lora(ours, LoRAConfig(rank=4, alpha=8, targets=targets, use_dora=True))
    _randomize(ours, seed=5)
    save_adapter(ours, tmp_path / "ember")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back = peft.PeftModel.from_pretrained(_hf(base), tmp_path / "ember").eval()
    with torch.no_grad():
        diff = (ours.eval()(ids) - back(ids).logits).abs().max()
    assert diff <= TOL, diff


def test_refused(bases, tmp_path):
    with pytest.raises(EmberError, match="use_dora"):
        LoRAConfig(use_dora="yes")
    _peft_dora(bases["plain"], tmp_path / "a", target_modules=["q_proj"])
    t = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    save_file({k: v for k, v in t.items() if "magnitude" not in k},
              str(tmp_path / "a" / "adapter_model.safetensors"))
    model, _ = load_pretrained(bases["plain"], "float32")
    with pytest.raises(EmberError, match="lora_magnitude_vector is missing"):
        load_adapter(model, tmp_path / "a")


def test_peft_dora_on_the_head_is_refused_with_the_way_out(bases, tmp_path):
    """PEFT's DoRA on lm_head (not in Ember; on embed_tokens it loads:
    tests/models/test_peft_variants.py) is refused with PEFT's merge as the way out (the hint
    said to change the targets, which a user holding the file cannot), and the merged model
    loads with PEFT's logits."""
    pm = _peft_dora(bases["plain"], tmp_path / "a", target_modules=["q_proj", "lm_head"])
    model, _ = load_pretrained(bases["plain"], "float32")
    with pytest.raises(EmberError, match="DoRA .* on \\['lm_head'\\].*merge_and_unload"):
        load_adapter(model, tmp_path / "a")
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = pm(ids).logits
        pm.merge_and_unload().save_pretrained(tmp_path / "merged")
    merged, _ = load_pretrained(tmp_path / "merged")
    with torch.no_grad():
        assert (merged(ids) - ref).abs().max().item() <= 1e-4


def test_ember_train_with_dora_learns(tiny, tmp_path):
    from ember.engine.runtime import build_model
    from ember.engine.trainer import resolve, train
    from tests.engine._tiny import quiet, rows_of, tiny_config

    small = tiny["small"]
    cfg = tiny_config(tiny, tmp_path / "run", "lora.use_dora=true", "max_steps=12",
                      "optim.lr=1e-2", "optim.warmup_steps=1", "eval.metrics=[]",
                      f'data.train=["{small}"]', f'data.validation="{small}"')
    res = train(cfg, echo=quiet, progress=False)
    losses = [r["loss"] for r in rows_of(tmp_path / "run") if r["kind"] == "train"]
    assert len(losses) == 12 and sum(losses[-3:]) < sum(losses[:3]) * 0.9, losses
    assert res.after["val_loss"] < res.before["val_loss"]
    adapter = tmp_path / "run" / "final" / "adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["use_dora"] is True
    saved = load_file(str(adapter / "adapter_model.safetensors"))
    mags = {k: v for k, v in saved.items() if k.endswith("lora_magnitude_vector")}
    assert len(mags) == 2 * 7
    base, _ = load_pretrained(tiny["model"], "float32")
    w = base.get_submodule("layers.0.attn.q_proj").weight
    assert not torch.allclose(  # the magnitude trained away from ||W||
        mags["base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"],
        w.norm(dim=1))

    # A next stage continues the DoRA adapter as DoRA (model.init), from its trained magnitude.
    nxt = resolve(tiny_config(tiny, tmp_path / "next", f'model.init="{tmp_path / "run"}"',
                              "max_steps=1", "eval.metrics=[]", f'data.train=["{small}"]'))
    assert nxt.lora.use_dora
    q = lora_modules(build_model(nxt, "cpu")[0])["layers.0.attn.q_proj"]
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"
    assert q.use_dora and torch.equal(q.lora_magnitude.detach(), mags[key])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_embedding_dora_norm_is_exact_without_a_vocab_sized_matrix(dtype):
    """DoRA's embedding norm ||E + s (B A)^T|| per hidden dim, expanded (no (V, D) matrix, E in
    row blocks): nearer the fp64 norm than PEFT's fp32 one over the (V, D) sum (1.2e-6 against
    9e-6 relative here), and the module starts as the base embedding bit for bit."""
    from ember.models.lora_embed import LoRAEmbedding

    g = torch.Generator().manual_seed(0)
    base = nn.Embedding(70_001, 60).to(dtype)  # rows past one 16 MB block, V not a power of 2
    with torch.no_grad():
        base.weight.copy_(0.02 * torch.randn(base.weight.shape, generator=g))
    emb = LoRAEmbedding(base, 4, 8.0, use_dora=True)
    ids = torch.randint(0, 70_001, (2, 7), generator=g)
    assert torch.equal(emb(ids), base(ids))
    with torch.no_grad():
        emb.lora_embedding_A.copy_(0.02 * torch.randn(emb.lora_embedding_A.shape, generator=g))
    A, B, E = (t.detach().double() for t in (emb.lora_embedding_A, emb.lora_embedding_B,
                                             base.weight))
    want = torch.linalg.norm(E + emb.scale * (B @ A).t(), dim=0)
    peft = torch.linalg.norm(base.weight.float() + emb.delta_weight(), dim=0)
    got = emb.weight_norm()
    assert got.dtype == torch.float32 and got.shape == (60,)
    err, peft_err = (((t.double() - want).abs() / want).max().item() for t in (got, peft))
    assert err < 2e-6 and err < peft_err, (err, peft_err)
