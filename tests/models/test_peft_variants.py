"""LoraConfig variants as users write them (peft 0.21), each found loading wrongly or refused
without cause: PEFT's adapter loads in Ember with PEFT's logits, and Ember's save_adapter of it
loads back in PEFT with the same logits (fp32, <= 1e-4)."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from ember import EmberError
from ember.models.heads import add_classification_head, classify
from ember.models.loading import load_pretrained
from ember.models.lora import LoRAConfig, apply_lora, load_adapter, merge_lora, save_adapter
from tests.models.test_interop_peft import VOCAB, _peft_adapter, _peft_logits, save_random_model

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
pytestmark = pytest.mark.filterwarnings("ignore:.*no tokenizer.json")

SAVE_EMB = dict(save_embedding_layers=True)
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("peft_variant_bases")
    kinds = {
        "plain": (transformers.LlamaConfig, {}),
        "tied": (transformers.LlamaConfig, dict(tie_word_embeddings=True)),
        "biased": (transformers.LlamaConfig, dict(attention_bias=True, mlp_bias=True)),
        "phi3": (transformers.Phi3Config, dict(pad_token_id=None, eos_token_id=2)),
    }
    return {name: save_random_model(root / name, cls, seed=i, **kw)
            for i, (name, (cls, kw)) in enumerate(kinds.items())}


def _train(model):
    """Move what PEFT trains besides A and B (modules_to_save copies, bias="all"/"lora_only"
    biases) away from the base, as training would."""
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "modules_to_save" in n or (n.endswith(".bias") and p.requires_grad):
                p.add_(0.1 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize(
    "base,kw",
    [
        # Llama's target list on Phi-3: PEFT adapts o_proj / down_proj only ("q_proj" is no suffix
        # of "qkv_proj"); Ember matched it against its split q/k/v and refused the adapter.
        ("phi3", dict(target_modules=LLAMA_TARGETS)),
        # alpha_pattern "up_proj" matches no fused module in PEFT, but it reached Ember's split
        # up_proj: a silently wrong scale on gate_up_proj.
        ("phi3", dict(target_modules="all-linear", alpha_pattern={"up_proj": 1, "v_proj": 2},
                      rank_pattern={"q_proj": 2, r"layers\.1\.self_attn\.qkv_proj": 3})),
        # modules_to_save by a dotted name (PEFT matches it as a suffix): was refused
        ("plain", dict(target_modules=["q_proj"], modules_to_save=["model.embed_tokens"])),
        # tied embeddings with PEFT's ensure_weight_tying: one trained copy for both (was refused)
        ("tied", dict(target_modules=["q_proj"], modules_to_save=["embed_tokens"],
                      ensure_weight_tying=True)),
        ("tied", dict(target_modules=["v_proj"], modules_to_save=["lm_head"],
                      ensure_weight_tying=True)),
        # trained base biases saved with the adapter: were refused, now replace the base's
        ("biased", dict(target_modules=["q_proj", "up_proj"], bias="all")),
        ("biased", dict(target_modules=["k_proj", "down_proj"], bias="lora_only")),
        # save_embedding_layers=True beside trainable tokens / modules_to_save: PEFT also saves
        # its wrappers' copies of the base (token_adapter.base_layer, original_module) and of the
        # trained module (modules_to_save.weight), which it ignores or which change nothing on
        # loading; Ember refused them as "new full weights"
        ("plain", dict(target_modules=["q_proj"], trainable_token_indices=[3, 7],
                       save_kw=SAVE_EMB)),
        ("tied", dict(target_modules=["q_proj"], trainable_token_indices=[3], save_kw=SAVE_EMB)),
        ("plain", dict(target_modules=["q_proj"], modules_to_save=["lm_head"], save_kw=SAVE_EMB)),
        ("tied", dict(target_modules=["q_proj"], modules_to_save=["embed_tokens"],
                      save_kw=SAVE_EMB)),
        ("tied", dict(target_modules=["q_proj"], modules_to_save=["embed_tokens"],
                      ensure_weight_tying=True, save_kw=SAVE_EMB)),
    ],
    ids=["phi3_llama_targets", "phi3_part_patterns", "mts_dotted", "tied_embed", "tied_head",
         "bias_all", "bias_lora_only", "tokens_saved_emb", "tied_tokens_saved_emb",
         "mts_head_saved_emb", "tied_mts_saved_emb", "tied_mts_ewt_saved_emb"],
)
def test_peft_variant_round_trips(bases, tmp_path, base, kw):
    ids, ref = _peft_adapter(bases[base], tmp_path / "peft", edit_base=_train, **kw)
    model, _ = load_pretrained(bases[base])
    load_adapter(model, tmp_path / "peft")
    with torch.no_grad():
        assert (model.eval()(ids) - ref).abs().max().item() <= 1e-4
    save_adapter(model, tmp_path / "ember")
    assert (_peft_logits(bases[base], tmp_path / "ember", ids) - ref).abs().max().item() <= 1e-4


def test_tied_modules_to_save_without_weight_tying_unties(bases, tmp_path):
    """PEFT trains a separate copy of the embedding, untying it from the head: Ember unties the
    head too and gets PEFT's logits (was refused; more in test_peft_tied_saved.py)."""
    ids, ref = _peft_adapter(bases["tied"], tmp_path / "peft", target_modules=["q_proj"],
                             modules_to_save=["embed_tokens"], edit_base=_train)
    model, _ = load_pretrained(bases["tied"])
    load_adapter(model, tmp_path / "peft")
    assert model.lm_head is not None and not model.cfg.tie_word_embeddings
    with torch.no_grad():
        assert (model.eval()(ids) - ref).abs().max().item() <= 1e-4


def test_classifier_with_saved_embedding(bases, tmp_path):
    """SEQ_CLS with modules_to_save=["embed_tokens"]: a classifier has no LM head, so nothing is
    tied (was refused as "tied embeddings")."""
    ids = torch.randint(1, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        hf = transformers.AutoModelForSequenceClassification.from_pretrained(
            bases["plain"], num_labels=3, pad_token_id=0)
        pm = peft.get_peft_model(hf, peft.LoraConfig(
            task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["q_proj"],
            modules_to_save=["embed_tokens"], init_lora_weights=False))
        _train(pm)
        pm.save_pretrained(tmp_path / "peft")
    with torch.no_grad():
        ref = pm.eval()(input_ids=ids).logits
    model, _ = load_pretrained(bases["plain"])
    add_classification_head(model, ("a", "b", "c"))
    load_adapter(model, tmp_path / "peft")
    with torch.no_grad():
        assert (classify(model.eval(), ids) - ref).abs().max().item() <= 1e-4


def test_named_adapter_in_subfolder(bases, tmp_path):
    """PEFT saves an adapter not called "default" in a subfolder: the error points there."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = transformers.AutoModelForCausalLM.from_pretrained(bases["plain"])
        pm = peft.get_peft_model(hf, peft.LoraConfig(r=2, target_modules=["q_proj"]), "mine")
        pm.save_pretrained(tmp_path)
    model, _ = load_pretrained(bases["plain"])
    with pytest.raises(EmberError, match=r"adapter\(s\) \['mine'\] in subfolders"):
        load_adapter(model, tmp_path)
    load_adapter(model, tmp_path / "mine")


@pytest.mark.parametrize("base,value", [("plain", "all-linear"), ("plain", "ALL-Linear"),
                                        ("phi3", "all-linear")])
def test_all_linear_written_in_the_config_loads(bases, tmp_path, base, value):
    """adapter_config.json with target_modules "all-linear" (PEFT itself saves the list it
    expands it to; a hand-written or another tool's config keeps the shorthand): PEFT expands it
    on loading (any case; Phi-3's fused qkv_proj / gate_up_proj too), Ember matched the string
    as a regex, targeted nothing and refused every weight as untargeted."""
    ids, ref = _peft_adapter(bases[base], tmp_path / "ad", target_modules="all-linear")
    path = tmp_path / "ad" / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "target_modules": value}))
    assert (_peft_logits(bases[base], tmp_path / "ad", ids) - ref).abs().max().item() <= 1e-5
    model, _ = load_pretrained(bases[base])
    load_adapter(model, tmp_path / "ad")
    with torch.no_grad():
        assert (model.eval()(ids) - ref).abs().max().item() <= 1e-4


@pytest.mark.parametrize(
    "base,saved,ok",
    [("plain", ["q_proj", "v_proj"], True), ("plain", ["k_proj"], False),
     ("phi3", ["o_proj"], False)],
)
@pytest.mark.parametrize("how", ["left_out", "null"])
def test_config_without_target_modules_takes_peft_defaults(bases, tmp_path, base, saved, ok, how):
    """adapter_config.json without target_modules (or null: older or hand-written files): PEFT
    targets its defaults for the model type (TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING:
    q_proj / v_proj on Llama), building fresh adapters there and dropping the file's other
    weights; for a type it has no defaults for (Phi-3) it refuses the config. Ember loaded the
    file's weights whatever they were: on Llama with a k_proj adapter logits 2.3 away from
    PEFT's. Now the defaults are the targets (the weights must match them) and a type without
    defaults is refused, both naming target_modules."""
    ids, ref = _peft_adapter(bases[base], tmp_path / "ad", target_modules=saved)
    path = tmp_path / "ad" / "adapter_config.json"
    config = json.loads(path.read_text())
    if how == "null":
        config["target_modules"] = None
    else:
        del config["target_modules"]
    path.write_text(json.dumps(config))
    model, _ = load_pretrained(bases[base])
    if ok:
        assert (_peft_logits(bases[base], tmp_path / "ad", ids) - ref).abs().max().item() <= 1e-4
        load_adapter(model, tmp_path / "ad")
        with torch.no_grad():
            assert (model.eval()(ids) - ref).abs().max().item() <= 1e-4
        return
    needle = ("no target_modules.*PEFT then targets .*'q_proj', 'v_proj'" if base == "plain"
              else "no target_modules.*PEFT has no default targets for model_type 'phi3'")
    with pytest.raises(EmberError, match=needle):
        load_adapter(model, tmp_path / "ad")


def _scale_magnitudes(model):
    """Move DoRA's magnitudes away from the norms they start at, as training would."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_magnitude" in n:
                p.mul_(1 + 0.3 * torch.rand(p.shape, generator=g))


@pytest.mark.parametrize("base", ["plain", "tied", "bf16"])
def test_dora_on_the_embedding_both_ways_and_merged(bases, tmp_path, base):
    """DoRA on embed_tokens (PEFT's DoraEmbeddingLayer: a magnitude per hidden dim, the norms
    over the vocabulary) was refused by name; it loads with PEFT's logits, saves back to the
    same logits, and merges to PEFT's merge_and_unload bit for bit (a bf16 base too). On a tied
    model without ensure_weight_tying the head keeps the base matrix, as in PEFT."""
    folder = bases["plain" if base == "bf16" else base]
    if base == "bf16":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            transformers.AutoModelForCausalLM.from_pretrained(
                folder, dtype=torch.bfloat16).save_pretrained(tmp_path / "bf16")
        folder = tmp_path / "bf16"
    ids, ref = _peft_adapter(folder, tmp_path / "peft", edit_base=_scale_magnitudes,
                             target_modules=["embed_tokens", "q_proj"], use_dora=True)
    model, _ = load_pretrained(folder)
    load_adapter(model, tmp_path / "peft")
    save_adapter(model, tmp_path / "ember")
    if base != "bf16":  # (PEFT's forward runs in bf16 there, Ember's in fp32)
        with torch.no_grad():
            assert (model.eval()(ids) - ref).abs().max().item() <= 1e-4
        assert (_peft_logits(folder, tmp_path / "ember", ids) - ref).abs().max().item() <= 1e-4
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = transformers.AutoModelForCausalLM.from_pretrained(folder)
        want = peft.PeftModel.from_pretrained(hf, tmp_path / "peft").merge_and_unload()
    merge_lora(model, want.dtype)
    assert torch.equal(model.embed.weight, want.model.embed_tokens.weight)
    assert torch.equal(model.layers[1].attn.q_proj.weight,
                       want.model.layers[1].self_attn.q_proj.weight)


@pytest.mark.parametrize("kw", [dict(target_modules=["lm_head"]),
                                dict(target_modules=["embed_tokens"], ensure_weight_tying=True)])
def test_dora_on_the_head_is_refused_by_name(bases, tmp_path, kw):
    _peft_adapter(bases["tied"], tmp_path / "peft", use_dora=True, **kw)
    model, _ = load_pretrained(bases["tied"])
    with pytest.raises(EmberError, match=r"DoRA \(use_dora\) on \['(lm_head|embed)'\]"):
        load_adapter(model, tmp_path / "peft")
    with pytest.raises(EmberError, match="DoRA"):
        apply_lora(model, LoRAConfig(rank=2, alpha=4, use_dora=True, targets=("embed_tokens",)))


def test_token_classification_adapter_is_refused_by_task_type(bases, tmp_path):
    """A TOKEN_CLS adapter (PEFT on *ForTokenClassification: its score head, with a bias, labels
    every token) was refused for its head's bias ("bias='none' ... fits no bias") or, on a
    causal LM, with the advice to load the base as a sequence classifier: now by task_type."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = transformers.AutoModelForTokenClassification.from_pretrained(bases["plain"],
                                                                          num_labels=3)
        peft.get_peft_model(hf, peft.LoraConfig(task_type="TOKEN_CLS", r=2,
                                                target_modules=["q_proj"])).save_pretrained(
            tmp_path / "tok")
    for head in (True, False):
        model, _ = load_pretrained(bases["plain"])
        if head:
            add_classification_head(model, ("a", "b", "c"))
        with pytest.raises(EmberError, match="task_type 'TOKEN_CLS'.* every token"):
            load_adapter(model, tmp_path / "tok")
