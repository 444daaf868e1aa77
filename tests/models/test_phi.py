"""Phi-1 / Phi-1.5 / Phi-2 (transformers' PhiForCausalLM) against transformers and peft on tiny
random models: logits (fp32, <= 1e-4) over the config variants, export back to a folder
transformers loads to the same logits, exact state-dict round trip, a LoRA step's gradients,
PEFT adapters both ways, NF4 loading, greedy generation, and the config fields refused."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
import torch.nn.functional as F

from ember import EmberError
from ember.models.hf import config_from_hf, from_hf_state_dict, to_hf_state_dict
from ember.models.loading import load_pretrained, read_config, save_pretrained
from ember.models.lora import LoRAConfig, apply_lora, load_adapter, lora_modules, save_adapter

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
pytestmark = pytest.mark.filterwarnings("ignore:.*no tokenizer.json")

VOCAB = 96
BASE = dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=72, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=64)
CASES = {  # phi-2 is partial rotary 0.4, phi-1.5 0.5; GQA and tying are transformers options
    "phi2_like": dict(partial_rotary_factor=0.4, num_key_value_heads=4),
    "phi15_gqa": dict(partial_rotary_factor=0.5, num_key_value_heads=2),
    "qk_layernorm_full_rotary": dict(partial_rotary_factor=1.0, num_key_value_heads=2,
                                     qk_layernorm=True),
    "tied_mqa": dict(partial_rotary_factor=0.5, num_key_value_heads=1, tie_word_embeddings=True,
                     qk_layernorm=True),
}


def _quiet():
    w = warnings.catch_warnings()
    w.__enter__()
    warnings.simplefilter("ignore")
    return w


def _randomize(model, seed: int) -> None:
    """Every weight random, biases included (norm weights around 1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.2 * noise if "layernorm.weight" in n else 0.1 * noise)


def _save(folder, seed: int = 0, **kw):
    hf = transformers.PhiForCausalLM(transformers.PhiConfig(**{**BASE, **kw}))
    _randomize(hf, seed)
    hf.save_pretrained(folder)
    return folder


def _hf(folder):
    w = _quiet()
    try:
        return transformers.AutoModelForCausalLM.from_pretrained(
            folder, attn_implementation="eager").eval()
    finally:
        w.__exit__(None, None, None)


def _ids(T: int = 17, B: int = 2, seed: int = 0):
    return torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


def _err(a, b) -> float:
    return (a - b).abs().max().item()


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("phi")
    return {name: _save(root / name, seed=i + 1, **kw) for i, (name, kw) in
            enumerate(CASES.items())}


@pytest.mark.parametrize("case", list(CASES))
def test_logits_parity_and_export(folders, tmp_path, case):
    ids = _ids()
    model, _ = load_pretrained(folders[case])
    cfg = model.cfg
    assert (cfg.model_type, cfg.norm, cfg.parallel_block, cfg.gated_mlp) == (
        "phi", "layernorm", True, False)
    assert cfg.partial_rotary_factor == CASES[case]["partial_rotary_factor"]
    assert cfg.num_params() == sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        ref = _hf(folders[case])(ids).logits
        ours = model(ids)
    assert _err(ours, ref) <= 1e-4
    save_pretrained(model, tmp_path / "export")
    assert read_config(tmp_path / "export") == cfg
    with torch.no_grad():
        assert _err(_hf(tmp_path / "export")(ids).logits, ref) <= 1e-4


@pytest.mark.parametrize("case", ["phi2_like", "tied_mqa"])
def test_state_dict_round_trip_is_exact(folders, case):
    hf = _hf(folders[case])
    sd = {k: v for k, v in hf.state_dict().items()
          if not (hf.config.tie_word_embeddings and k == "lm_head.weight")}
    cfg = config_from_hf(hf.config.to_dict())
    ember = from_hf_state_dict(sd, cfg)
    assert "head_bias" in ember and ("lm_head.weight" in ember) != cfg.tie_word_embeddings
    back = to_hf_state_dict(ember, cfg)
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)


def test_transformers_4x_config_style_loads(folders, tmp_path):
    """rope_theta / partial_rotary_factor at the top level (4.x), no rope_parameters; a missing
    partial_rotary_factor is transformers' default 0.5."""
    raw = json.loads((folders["phi2_like"] / "config.json").read_text())
    raw.pop("rope_parameters")
    raw.update(rope_theta=10000.0, partial_rotary_factor=0.4, torch_dtype="float32")
    assert config_from_hf(raw).partial_rotary_factor == 0.4
    raw.pop("partial_rotary_factor")
    assert config_from_hf(raw).partial_rotary_factor == 0.5
    assert transformers.PhiConfig.from_dict(raw).rope_parameters["partial_rotary_factor"] == 0.5


def test_phi2_dropout_config_loads_and_drops_only_in_training(folders, tmp_path):
    """phi-2's config.json has resid_pdrop=0.1: it loads (refusing it would refuse phi-2), eval
    forwards equal transformers', training forwards drop as transformers' do, export keeps it."""
    raw = json.loads((folders["phi15_gqa"] / "config.json").read_text())
    raw.update(resid_pdrop=0.1, embd_pdrop=0.05)
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps(raw))
    (tmp_path / "m" / "model.safetensors").symlink_to(folders["phi15_gqa"] / "model.safetensors")
    model, _ = load_pretrained(tmp_path / "m")
    assert (model.cfg.resid_dropout, model.cfg.embed_dropout) == (0.1, 0.05)
    ids = _ids()
    with torch.no_grad():
        ref = _hf(tmp_path / "m")(ids).logits
        assert _err(model.eval()(ids), ref) <= 1e-4
        model.train()
        torch.manual_seed(0)
        a = model(ids)
        torch.manual_seed(0)
        assert torch.equal(model(ids), a) and _err(a, ref) > 1e-2
        hf = _hf(tmp_path / "m").train()  # same draws in the same order as transformers
        torch.manual_seed(0)
        assert _err(hf(ids).logits, a) <= 1e-4
        for block in model.layers:  # the embedding dropout alone
            block.resid_dropout = 0.0
        assert _err(model(ids), ref) > 1e-2
        model.embed_dropout = 0.0  # then nothing random is left (read as blocks read theirs)
        assert _err(model(ids), ref) <= 1e-4
        for block in model.layers:  # the residual dropout alone
            block.resid_dropout = 0.1
        assert _err(model(ids), ref) > 1e-2
        model.embed_dropout = 0.05
    save_pretrained(model.eval(), tmp_path / "export")
    out = json.loads((tmp_path / "export" / "config.json").read_text())
    assert (out["resid_pdrop"], out["embd_pdrop"], out["attention_dropout"]) == (0.1, 0.05, 0.0)


@pytest.mark.parametrize("change,needle", [
    (dict(attention_dropout=1.0), r"attention_dropout must be in \[0, 1\)"),
    (dict(rope_scaling={"rope_type": "su"}), "rope type 'su' is not supported"),  # phi3's name
    # another head_dim loads (tests/models/test_phi_rope.py), not with q/k LayerNorms
    (dict(head_dim=16, qk_layernorm=True), "head_dim=16 differs"),
    (dict(rms_norm_eps=1e-6), r"\['rms_norm_eps'\] are not supported for model_type 'phi'"),
    (dict(architectures=["PhiForTokenClassification"]), "only \\['PhiForCausalLM'\\]"),
    (dict(hidden_act="prelu"), "hidden_act 'prelu' is not supported for phi"),  # said llama
    (dict(resid_pdrop=1.0), "resid_pdrop must be in"),
    (dict(qk_layernorm="yes"), "qk_layernorm must be true or false"),
    (dict(quantization_config={"quant_method": "bitsandbytes", "load_in_4bit": True,
                               "bnb_4bit_quant_type": "int4"}), "int4"),
])
def test_configs_ember_cannot_compute_are_refused(folders, change, needle):
    raw = json.loads((folders["phi2_like"] / "config.json").read_text())
    with pytest.raises(EmberError, match=needle):
        config_from_hf({**raw, **change})


def test_classifier_exports_and_loads_as_transformers_phi_classifier(folders, tmp_path):
    """A Phi classifier (add_classification_head + LoRA): its SEQ_CLS adapter, its merged folder
    and a PhiForSequenceClassification folder transformers wrote all give transformers' class
    logits. The merged export used to crash (AttributeError: score.weight had no Phi HF name) and
    PhiForSequenceClassification folders were refused."""
    from ember.models.heads import add_classification_head, classify
    from ember.models.lora import merge_lora

    ids = _ids(seed=3)
    ids[1, 12:] = 0  # right padding (pad_token_id 0)
    folder = _save(tmp_path / "base", seed=7, pad_token_id=0)
    model, _ = load_pretrained(folder)
    add_classification_head(model, ["neg", "pos", "mixed"], seed=0)
    apply_lora(model, LoRAConfig(rank=4, alpha=8, targets=("q", "fc1")))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.copy_(0.1 * torch.randn(m.lora_B.shape, generator=g))
    model.eval()
    with torch.no_grad():
        ours = classify(model, ids)
    save_adapter(model, tmp_path / "adapter")
    w = _quiet()
    try:
        hf = transformers.AutoModelForSequenceClassification.from_pretrained(
            folder, num_labels=3, attn_implementation="eager")
        peft_model = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
        merge_lora(model)
        save_pretrained(model, tmp_path / "merged")
        merged = transformers.AutoModelForSequenceClassification.from_pretrained(
            tmp_path / "merged", attn_implementation="eager").eval()
    finally:
        w.__exit__(None, None, None)
    with torch.no_grad():
        assert _err(ours, peft_model(ids).logits) <= 1e-5
        assert _err(ours, merged(ids).logits) <= 1e-5
    assert merged.config.id2label == {0: "neg", 1: "pos", 2: "mixed"}
    reloaded, _ = load_pretrained(tmp_path / "merged")
    assert reloaded.cfg == model.cfg
    with torch.no_grad():
        assert _err(classify(reloaded, ids), ours) <= 1e-5


def test_export_of_other_families_refuses_phi_fields(folders):
    model, _ = load_pretrained(folders["phi2_like"])
    with pytest.raises(EmberError, match="no equivalent of norm='layernorm'"):
        from ember.models.hf import config_to_hf
        config_to_hf(model.cfg.replace(model_type="llama"))
    with pytest.raises(EmberError, match="model_type 'phi': it has no equivalent of norm='rms'"):
        config_to_hf(model.cfg.replace(norm="rms"))


@pytest.mark.parametrize("change", [
    dict(nope_layers=(1,)), dict(residual_multiplier=0.5), dict(attention_multiplier=0.3),
    dict(logits_scaling=2.0), dict(pre_norms=False)])
def test_phi_export_refuses_fields_phi_cannot_express(folders, change):
    """SmolLM3's NoPE layers, Granite's multipliers and OLMo2's missing pre-norms on a phi config
    used to be dropped from the export without a word (the other families refused them)."""
    model, _ = load_pretrained(folders["phi15_gqa"])
    from ember.models.hf import config_to_hf
    with pytest.raises(EmberError, match=f"model_type 'phi'.*{next(iter(change))}"):
        config_to_hf(model.cfg.replace(**change))


# --- LoRA, PEFT ------------------------------------------------------------------------------

PHI_TARGETS = ["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"]


def _peft_model(folder, **kw):
    w = _quiet()
    try:
        kw.setdefault("init_lora_weights", False)
        return peft.get_peft_model(_hf(folder), peft.LoraConfig(r=4, lora_alpha=8, **kw))
    finally:
        w.__exit__(None, None, None)


def _peft_logits(folder, adapter, ids):
    w = _quiet()
    try:
        pm = peft.PeftModel.from_pretrained(_hf(folder), adapter).eval()
    finally:
        w.__exit__(None, None, None)
    with torch.no_grad():
        return pm(ids).logits


@pytest.mark.parametrize("case,kw", [
    ("phi2_like", dict(target_modules="all-linear")),
    ("qk_layernorm_full_rotary", dict(target_modules=["dense", "fc1"], bias="lora_only")),
])
def test_peft_adapter_loads_with_peft_logits_and_saves_back(folders, tmp_path, case, kw):
    pm = _peft_model(folders[case], **kw)
    if kw.get("bias") == "lora_only":  # trained biases of the adapted modules
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if n.endswith("base_layer.bias"):
                    p.add_(0.05)
    pm.save_pretrained(tmp_path / "peft")
    ids = _ids()
    with torch.no_grad():
        ref = pm.eval()(ids).logits
    model, _ = load_pretrained(folders[case])
    load_adapter(model, tmp_path / "peft")
    expect = 6 if kw["target_modules"] == "all-linear" else 2
    assert len(lora_modules(model)) == 2 * expect
    with torch.no_grad():
        assert _err(model.eval()(ids), ref) <= 1e-4
    save_adapter(model, tmp_path / "ember")
    assert _err(_peft_logits(folders[case], tmp_path / "ember", ids), ref) <= 1e-4


def test_ember_adapter_with_phi_target_names_loads_in_peft(folders, tmp_path):
    model, _ = load_pretrained(folders["tied_mqa"])
    apply_lora(model, LoRAConfig(rank=3, alpha=6, targets=PHI_TARGETS))
    names = sorted(lora_modules(model))
    assert names[:6] == sorted(f"layers.0.{p}" for p in (
        "attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj", "mlp.up_proj",
        "mlp.down_proj"))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.copy_(0.1 * torch.randn(m.lora_B.shape, generator=g))
    ids = _ids()
    with torch.no_grad():
        ours = model.eval()(ids)
    save_adapter(model, tmp_path / "ember")
    cfg = json.loads((tmp_path / "ember" / "adapter_config.json").read_text())
    assert sorted(cfg["target_modules"]) == sorted(PHI_TARGETS)
    assert _err(_peft_logits(folders["tied_mqa"], tmp_path / "ember", ids), ours) <= 1e-4


def test_phi_target_names_only_alias_on_phi(tmp_path):
    folder = tmp_path / "llama"
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**BASE))
    hf.save_pretrained(folder)
    model, _ = load_pretrained(folder)
    with pytest.raises(EmberError, match=r"LoRA targets \['fc1'\] match no linear module"):
        apply_lora(model, LoRAConfig(targets=["q_proj", "fc1"]))


def test_lora_step_gradients_match_peft(folders):
    """One LoRA training step (every projection, random A and B): the loss and every adapter
    gradient equal transformers + peft's (eval mode: dropout off in both)."""
    folder = folders["phi2_like"]
    pm = _peft_model(folder, target_modules=PHI_TARGETS)
    model, _ = load_pretrained(folder)
    apply_lora(model, LoRAConfig(rank=4, alpha=8, targets=PHI_TARGETS))
    theirs = {}
    for n, p in pm.named_parameters():
        if "lora_" in n:
            key = n.removeprefix("base_model.model.model.").replace(".default", "")
            theirs[key] = p
    from ember.models.peft_keys import ember_module_name
    pairs = {}
    with torch.no_grad():
        for key, p in theirs.items():
            mod, kind = key.rsplit(".", 2)[0], key.rsplit(".", 2)[1]
            name = ember_module_name(mod)
            getattr(model.get_submodule(name), kind).copy_(p)
            pairs[(name, kind)] = p
    ids = _ids(T=13)
    labels = _ids(T=13, seed=5)
    pm.eval()
    ref = pm(ids, labels=labels).loss
    ref.backward()
    logits = model.eval()(ids)
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1))
    loss.backward()
    assert abs(loss.item() - ref.item()) <= 1e-5
    assert len(pairs) == 2 * 6 * 2
    worst = max(_err(getattr(model.get_submodule(n), k).grad, p.grad)
                for (n, k), p in pairs.items())
    assert worst <= 1e-5, worst


def test_greedy_generation_matches_transformers(folders):
    from ember.models.generate import generate_ids

    folder = folders["phi15_gqa"]
    ids = _ids(T=7, B=1, seed=3)
    with torch.no_grad():
        ref = _hf(folder).generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12,
                                   do_sample=False, eos_token_id=None, pad_token_id=0)
    ref = ref[0, 7:].tolist()
    model, _ = load_pretrained(folder)
    ours = generate_ids(model.eval(), [ids[0].tolist()], max_new_tokens=12, eos_token_ids=())
    assert ours[0] == ref


def test_nf4_quantize_while_loading_keeps_biases(folders):
    """quantize='nf4': the projections (biased) become NF4, norms / biases / head stay; logits
    equal a dense model holding the dequantized weights."""
    from ember.models.nf4 import is_quantized

    folder = folders["phi2_like"]
    q, _ = load_pretrained(folder, quantize="nf4")
    assert is_quantized(q)
    dense, _ = load_pretrained(folder)
    with torch.no_grad():
        for name, m in q.named_modules():
            if hasattr(m, "quant_weight"):
                ref = dense.get_submodule(name)
                ref.weight.copy_(m.quant_weight.dequantize(torch.float32))
                assert torch.equal(m.bias, ref.bias), name
    ids = _ids()
    with torch.no_grad():
        assert _err(q(ids), dense(ids)) <= 1e-4
    apply_lora(q, LoRAConfig(rank=2, alpha=4, targets=("all-linear",)))
    assert len(lora_modules(q)) == 2 * 6


def test_bitsandbytes_checkpoint_both_ways(folders, tmp_path):
    """transformers + bitsandbytes' NF4 phi checkpoint loads with its logits, and Ember's
    quantize-while-loading saves the same bytes."""
    from safetensors.torch import load_file

    folder = folders["phi2_like"]
    qcfg = transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32)
    w = _quiet()
    try:
        hf_q = transformers.PhiForCausalLM.from_pretrained(folder, quantization_config=qcfg,
                                                           device_map="cpu").eval()
        hf_q.save_pretrained(tmp_path / "bnb")
    finally:
        w.__exit__(None, None, None)
    ids = _ids()
    with torch.no_grad():
        ref = hf_q(ids).logits
    model, _ = load_pretrained(tmp_path / "bnb")
    with torch.no_grad():
        assert _err(model(ids), ref) <= 1e-4
    ours, _ = load_pretrained(folder, quantize="nf4")
    save_pretrained(ours, tmp_path / "ember")
    a, b = load_file(tmp_path / "ember" / "model.safetensors"), load_file(
        tmp_path / "bnb" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_accelerate_hf_refuses_phi(folders):
    """The HF backend swaps RMSNorm / gated-MLP / RoPE kernels; Phi has none of those modules."""
    from ember.models import accelerate_hf

    with pytest.raises(EmberError, match="PhiForCausalLM is not a supported model"):
        accelerate_hf(_hf(folders["phi2_like"]))


PHI2_CONFIG = {  # microsoft/phi-2's config.json (transformers 4.37 style)
    "_name_or_path": "microsoft/phi-2", "architectures": ["PhiForCausalLM"],
    "attention_dropout": 0.0, "bos_token_id": 50256, "embd_pdrop": 0.0, "eos_token_id": 50256,
    "hidden_act": "gelu_new", "hidden_size": 2560, "initializer_range": 0.02,
    "intermediate_size": 10240, "layer_norm_eps": 1e-05, "max_position_embeddings": 2048,
    "model_type": "phi", "num_attention_heads": 32, "num_hidden_layers": 32,
    "num_key_value_heads": 32, "partial_rotary_factor": 0.4, "qk_layernorm": False,
    "resid_pdrop": 0.1, "rope_scaling": None, "rope_theta": 10000.0,
    "tie_word_embeddings": False, "torch_dtype": "float16", "transformers_version": "4.37.0",
    "use_cache": True, "vocab_size": 51200,
}


@pytest.mark.parametrize("change", [{}, dict(  # microsoft/phi-1_5's differences
    bos_token_id=None, eos_token_id=None, hidden_size=2048, intermediate_size=8192,
    num_hidden_layers=24, num_key_value_heads=None, partial_rotary_factor=0.5, resid_pdrop=0.0,
    torch_dtype="float32")], ids=["phi-2", "phi-1_5"])
def test_released_configs_parse_as_transformers_reads_them(change):
    raw = {**PHI2_CONFIG, **change}
    cfg = config_from_hf(raw)
    hf = transformers.PhiConfig.from_dict(raw)
    assert (cfg.hidden_size, cfg.num_layers, cfg.num_kv_heads, cfg.rotary_dim, cfg.resid_dropout,
            cfg.rms_norm_eps, cfg.eos_token_id) == (
        hf.hidden_size, hf.num_hidden_layers, hf.num_key_value_heads,
        int(hf.hidden_size // hf.num_attention_heads * hf.rope_parameters["partial_rotary_factor"]),
        hf.resid_pdrop, hf.layer_norm_eps, hf.eos_token_id)
    assert cfg.num_params() == {2560: 2_779_683_840, 2048: 1_418_270_720}[cfg.hidden_size]


def test_auto_map_loads_as_the_native_phi_with_a_warning():
    with pytest.warns(UserWarning, match="loading it as a standard phi model"):
        cfg = config_from_hf({**PHI2_CONFIG, "auto_map": {"AutoConfig": "x.PhiConfig"}})
    assert cfg.model_type == "phi"
