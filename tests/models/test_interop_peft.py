"""PEFT adapters as peft 0.21 writes them, loaded by Ember: plain LoRA math loads with PEFT's
logits; anything else (variants, new full embeddings, base-changing inits) is refused
with an EmberError that names it."""

from __future__ import annotations

import json
import shutil
import warnings

import pytest
import torch

from ember import EmberError
from ember.models.loading import load_pretrained
from ember.models.lora import LoRAConfig, apply_lora, load_adapter, lora_modules, save_adapter

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
pytestmark = pytest.mark.filterwarnings("ignore:.*no tokenizer.json")

VOCAB = 96


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """Tiny random Llamas, without and with biases (attention_bias sets q/k/v/o biases), and a
    Phi-3 (fused qkv_proj / gate_up_proj)."""
    root = tmp_path_factory.mktemp("peft_bases")
    out = {}
    phi3 = dict(pad_token_id=None, eos_token_id=2, sliding_window=5)
    kinds = {
        "plain": {},
        "biased": dict(attention_bias=True),
        "tied": dict(tie_word_embeddings=True),
    }
    for name, kw in {**kinds, "phi3": phi3}.items():
        config_cls = transformers.Phi3Config if name == "phi3" else transformers.LlamaConfig
        out[name] = save_random_model(root / name, config_cls, seed=len(name), **kw)
    return out


def save_random_model(folder, config_cls, seed: int, **kw):
    """A tiny transformers model (2 layers, hidden 32) with every weight random (norms around
    1), saved to ``folder``; returns the folder."""
    config = config_cls(vocab_size=VOCAB, hidden_size=32, intermediate_size=48,
                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                        rms_norm_eps=1e-5, **kw)
    model = transformers.AutoModelForCausalLM.from_config(config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_((1 if "norm" in n else 0) + 0.1 * torch.randn(p.shape, generator=g))
    model.save_pretrained(folder)
    return folder


def _peft_adapter(base, out, save_kw=None, edit_base=None, **lora_kw):
    """A PEFT adapter with random A and B (init_lora_weights=False), and PEFT's logits."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = transformers.AutoModelForCausalLM.from_pretrained(base).eval()
        lora_kw.setdefault("init_lora_weights", False)
        pm = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=8, **lora_kw))
        if edit_base is not None:
            edit_base(pm.base_model.model)
        pm.save_pretrained(out, **(save_kw or {}))
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return ids, pm.eval()(ids).logits


def _double_embedding(model):
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(2)


def _double_token_base(model):
    with torch.no_grad():
        model.model.embed_tokens.token_adapter.base_layer.weight.mul_(2)


@pytest.mark.parametrize(
    "case,base,kw",
    [
        # bias="all"/"lora_only" on a model without biases saves a plain LoRA (was refused)
        ("bias_all_no_biases", "plain", dict(target_modules="all-linear", bias="all")),
        ("bias_lora_only_no_biases", "plain", dict(target_modules=["q_proj"], bias="lora_only")),
        # save_embedding_layers=True with the base's own embedding: a no-op copy (was refused)
        (
            "unchanged_embeddings",
            "plain",
            dict(target_modules=["v_proj"], save_kw=dict(save_embedding_layers=True)),
        ),
        (
            "orthogonal_init",
            "plain",
            dict(target_modules=["q_proj"], init_lora_weights="orthogonal"),
        ),
    ],
)
def test_plain_lora_math_loads_with_peft_logits(bases, tmp_path, case, base, kw):
    ids, ref = _peft_adapter(bases[base], tmp_path / case, **kw)
    model, _ = load_pretrained(bases[base])
    load_adapter(model, tmp_path / case)
    with torch.no_grad():
        assert (model.eval()(ids) - ref).abs().max().item() <= 1e-4


@pytest.mark.parametrize(
    "case,base,kw,needle",
    [
        # (modules_to_save on a tied model, which PEFT unties, now loads untied:
        # tests/models/test_peft_tied_saved.py)
        (
            "modules_to_save_norm",
            "plain",
            dict(target_modules=["q_proj"], modules_to_save=["norm"]),
            "modules_to_save",
        ),
        # (LoRA on the head of a tied model without ensure_weight_tying, its own adapter on
        # the shared matrix, now loads untied: tests/models/test_peft_tied_saved.py)
        (
            "new_embeddings",
            "plain",
            dict(
                target_modules=["q_proj"],
                edit_base=_double_embedding,
                save_kw=dict(save_embedding_layers=True),
            ),
            "embedding or output head",
        ),
        (  # the base inside PEFT's trainable-tokens wrapper, which PEFT loads back over the base
            "new_embeddings_beside_tokens",
            "plain",
            dict(
                target_modules=["q_proj"],
                trainable_token_indices=[3],
                edit_base=_double_token_base,
                save_kw=dict(save_embedding_layers=True),
            ),
            r"embedding or output head \(\['base_model.model.model.embed_tokens.token_adapter",
        ),
    ],
)
def test_what_plain_lora_cannot_hold_is_refused(bases, tmp_path, case, base, kw, needle):
    _peft_adapter(bases[base], tmp_path / case, **kw)
    model, _ = load_pretrained(bases[base])
    with pytest.raises(EmberError, match=needle):
        load_adapter(model, tmp_path / case)


@pytest.mark.parametrize(
    "field,value,needle",
    [
        # LoRA variants of peft 0.21 whose forward differs (were loaded as plain LoRA)
        ("alora_invocation_tokens", [5, 6], "alora_invocation_tokens"),
        ("use_bdlora", {"nblocks": 2}, "use_bdlora"),
        ("kasa_config", {}, "kasa_config"),  # an empty sub-config still turns KaSA on in PEFT
        ("arrow_config", None, None),  # null: off
        ("init_lora_weights", "lora_ga", "modified base model"),  # subtracts B A from the base
        ("a_future_peft_field", {"on": True}, "a_future_peft_field"),
    ],
)
def test_adapter_config_fields_that_change_the_math(bases, tmp_path, field, value, needle):
    ids, ref = _peft_adapter(bases["plain"], tmp_path / "ad", target_modules=["q_proj"])
    path = tmp_path / "ad" / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), field: value}))
    model, _ = load_pretrained(bases["plain"])
    if needle is None:
        load_adapter(model, tmp_path / "ad")
        with torch.no_grad():
            assert (model.eval()(ids) - ref).abs().max().item() <= 1e-4
    else:
        with pytest.raises(EmberError, match=needle):
            load_adapter(model, tmp_path / "ad")


@pytest.mark.parametrize("kind", ["IA3", "LOHA", "PREFIX_TUNING", "PROMPT_TUNING"])
def test_other_peft_types_are_refused_with_what_to_do(bases, tmp_path, kind):
    """Adapters of other PEFT types are refused by name with the way out: the prompt-tuning
    loader, or PEFT's merge for the kinds that change weights, which then loads with PEFT's
    logits (nothing to merge for those that change the inputs)."""
    configs = {
        "IA3": lambda: peft.IA3Config(target_modules=["k_proj", "down_proj"],
                                      feedforward_modules=["down_proj"], init_ia3_weights=False),
        "LOHA": lambda: peft.LoHaConfig(r=2, target_modules=["q_proj"], init_weights=False),
        "PREFIX_TUNING": lambda: peft.PrefixTuningConfig(num_virtual_tokens=3,
                                                         task_type="CAUSAL_LM"),
        "PROMPT_TUNING": lambda: peft.PromptTuningConfig(num_virtual_tokens=3,
                                                         task_type="CAUSAL_LM"),
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = transformers.AutoModelForCausalLM.from_pretrained(bases["plain"]).eval()
        pm = peft.get_peft_model(hf, configs[kind]())
        pm.save_pretrained(tmp_path / "ad")
    model, _ = load_pretrained(bases["plain"])
    needle = {"PROMPT_TUNING": "load_prompt_adapter", "PREFIX_TUNING": "no merged model"}
    with pytest.raises(EmberError, match=f"peft_type is '{kind}'.*"
                                         f"{needle.get(kind, 'merge_and_unload')}"):
        load_adapter(model, tmp_path / "ad")
    if kind in needle:
        return
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = pm.eval()(ids).logits
        merged = pm.merge_and_unload()
    merged.save_pretrained(tmp_path / "merged")
    model, _ = load_pretrained(tmp_path / "merged")
    with torch.no_grad():
        assert (model.eval()(ids) - ref).abs().max().item() <= 1e-4


def test_fan_in_fan_out_on_linear_layers_is_ignored_as_peft_ignores_it(bases, tmp_path):
    """fan_in_fan_out=True (for GPT-2's Conv1D) in an adapter for nn.Linear projections: PEFT
    warns, sets it False and computes plain LoRA; Ember refused the adapter."""
    ids, ref = _peft_adapter(bases["plain"], tmp_path / "ad", target_modules=["q_proj", "v_proj"])
    path = tmp_path / "ad" / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "fan_in_fan_out": True}))
    assert (_peft_logits(bases["plain"], tmp_path / "ad", ids) - ref).abs().max().item() == 0
    model, _ = load_pretrained(bases["plain"])
    load_adapter(model, tmp_path / "ad")
    with torch.no_grad():
        assert (model.eval()(ids) - ref).abs().max().item() <= 1e-5


def test_an_adapter_folder_loads_as_transformers_loads_it(bases, tmp_path):
    """transformers' from_pretrained(adapter folder) loads base_model_name_or_path with the
    adapter applied, with or without a model's config.json and weights beside the adapter;
    Ember's load_pretrained does the same (was: "config.json not found", or the model alone)."""
    ids, ref = _peft_adapter(bases["plain"], tmp_path / "ad", target_modules="all-linear")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ad").eval()
    with torch.no_grad():
        assert (hf(ids).logits - ref).abs().max().item() == 0
    model, _ = load_pretrained(tmp_path / "ad")
    assert lora_modules(model)
    with torch.no_grad():
        assert (model(ids) - ref).abs().max().item() <= 1e-5
    # beside a model folder's files too (both saved to one output folder): transformers applies
    # the adapter all the same (Ember silently loaded the folder's model without it)
    for f in bases["plain"].iterdir():
        shutil.copy(f, tmp_path / "ad")
    model, _ = load_pretrained(tmp_path / "ad")
    with torch.no_grad():
        assert (model(ids) - ref).abs().max().item() <= 1e-5
    path = tmp_path / "ad" / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()),
                                "base_model_name_or_path": str(tmp_path / "gone")}))
    with pytest.raises(EmberError, match="PEFT adapter for the base model .*gone"):
        load_pretrained(tmp_path / "ad")


def _peft_logits(base, adapter, ids):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = transformers.AutoModelForCausalLM.from_pretrained(base).eval()
        pm = peft.PeftModel.from_pretrained(hf, adapter).eval()
    with torch.no_grad():
        return pm(ids).logits


@pytest.mark.parametrize(
    "kw",
    [
        dict(
            target_modules="all-linear", rank_pattern={"qkv_proj": 2}, alpha_pattern={"o_proj": 3}
        ),
        dict(target_modules=["gate_up_proj", "qkv_proj"], use_rslora=True),
    ],
    ids=["all_linear_patterns", "fused_only_rslora"],
)
def test_phi3_fused_adapters_round_trip_through_peft(bases, tmp_path, kw):
    """PEFT's LoRA on Phi-3's qkv_proj / gate_up_proj loads split over Ember's q/k/v and gate/up,
    and Ember writes it back fused; both load with PEFT's logits."""
    ids, ref = _peft_adapter(bases["phi3"], tmp_path / "peft", **kw)
    model, _ = load_pretrained(bases["phi3"])
    load_adapter(model, tmp_path / "peft")
    with torch.no_grad():
        assert (model.eval()(ids) - ref).abs().max().item() <= 1e-4
    save_adapter(model, tmp_path / "ember")
    assert (_peft_logits(bases["phi3"], tmp_path / "ember", ids) - ref).abs().max().item() <= 1e-4


@pytest.mark.parametrize("targets,rslora", [(("q", "v", "up"), False), (("k", "gate", "up"), True)])
def test_phi3_ember_adapters_on_some_fused_parts_load_in_peft(bases, tmp_path, targets, rslora):
    """Ember trains q/k/v with separate A's (and may skip some): exported block-diagonally."""
    model, _ = load_pretrained(bases["phi3"])
    apply_lora(model, LoRAConfig(rank=3, alpha=5, targets=targets, use_rslora=rslora))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.copy_(0.1 * torch.randn(m.lora_B.shape, generator=g))
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model.eval()(ids)
    save_adapter(model, tmp_path / "ember")
    assert (_peft_logits(bases["phi3"], tmp_path / "ember", ids) - ours).abs().max().item() <= 1e-4


def _train_saved_copies(model):
    """Move PEFT's modules_to_save copies away from the base weights, as training would."""
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "modules_to_save" in n:
                p.add_(0.1 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("modules", [["lm_head"], ["embed_tokens", "lm_head"]])
def test_modules_to_save_round_trip_through_peft(bases, tmp_path, modules):
    """Trained full copies of the head / embedding (modules_to_save) used to be refused: they
    replace the model's own weights, and save_adapter writes them back for PEFT."""
    ids, ref = _peft_adapter(
        bases["plain"],
        tmp_path / "peft",
        target_modules=["q_proj"],
        modules_to_save=modules,
        edit_base=_train_saved_copies,
    )
    model, _ = load_pretrained(bases["plain"])
    load_adapter(model, tmp_path / "peft")
    with torch.no_grad():
        assert (model.eval()(ids) - ref).abs().max().item() <= 1e-4
    save_adapter(model, tmp_path / "ember")
    saved = json.loads((tmp_path / "ember" / "adapter_config.json").read_text())
    assert saved["modules_to_save"] == sorted(modules)
    assert (_peft_logits(bases["plain"], tmp_path / "ember", ids) - ref).abs().max().item() <= 1e-4
