"""LoraConfig combinations and adapter files (peft 0.21 as the oracle) that Ember loaded wrongly,
saved wrongly or refused without cause: each loads with PEFT's logits and, where Ember saves it
back, loads in PEFT with the same logits; what Ember cannot hold is refused by name."""

from __future__ import annotations

import json
import shutil
import warnings

import pytest
import torch
from safetensors.torch import load_file

from ember import EmberError
from ember.models.heads import add_classification_head, classify
from ember.models.loading import load_pretrained
from ember.models.lora import LoRAConfig, apply_lora, load_adapter, save_adapter
from tests.models.test_interop_peft import VOCAB, _peft_adapter, _peft_logits, save_random_model
from tests.models.test_peft_variants import _train

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
pytestmark = pytest.mark.filterwarnings("ignore:.*no tokenizer.json")

PAD = 5


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("peft_config_bases")
    kinds = {"plain": {}, "tied": dict(tie_word_embeddings=True), "padded": dict(pad_token_id=PAD)}
    out = {name: save_random_model(root / name, transformers.LlamaConfig, seed=i + 3, **kw)
           for i, (name, kw) in enumerate(kinds.items())}
    # Phi-1/2: biases on every projection, the LayerNorms and lm_head
    phi = transformers.PhiForCausalLM(transformers.PhiConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, pad_token_id=None))
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for n, p in phi.named_parameters():
            p.copy_((1 if "layernorm.weight" in n else 0) + 0.1 * torch.randn(p.shape, generator=g))
    phi.save_pretrained(root / "phi")
    return {**out, "phi": root / "phi"}


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """fp32 logits agree (relative to their size: a tied random embedding adapter makes them
    large)."""
    return (a - b).abs().max().item() <= 1e-5 * max(1.0, b.abs().max().item())


def _round_trip(base, tmp_path, **kw) -> None:
    ids, ref = _peft_adapter(base, tmp_path / "peft", **kw)
    model, _ = load_pretrained(base)
    load_adapter(model, tmp_path / "peft")
    with torch.no_grad():
        assert _close(model.eval()(ids), ref)
    save_adapter(model, tmp_path / "ember")
    assert _close(_peft_logits(base, tmp_path / "ember", ids), ref)


def test_modules_to_save_also_in_target_modules(bases, tmp_path):
    """PEFT trains a modules_to_save module whole and puts no adapter on it even when
    target_modules names it too; Ember took the missing adapter for a broken file and refused."""
    _round_trip(bases["plain"], tmp_path, target_modules=["q_proj", "embed_tokens"],
                modules_to_save=["embed_tokens"])


def _train_saved_copies(model) -> None:
    """New values for the trained copies of PEFT's modules_to_save (they start as the base's)."""
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".modules_to_save." in n:
                p.mul_(2)


@pytest.mark.parametrize("mts", [["head"], ["_tokens"], ["model.embed_tokens", "lm_head"]])
def test_modules_to_save_entries_match_as_suffixes_as_peft(bases, tmp_path, mts):
    """PEFT selects modules_to_save by str.endswith on the module names ("head" is lm_head);
    Ember matched whole name segments and refused "head" as unsupported."""
    _round_trip(bases["plain"], tmp_path, target_modules=["q_proj"], modules_to_save=mts,
                edit_base=_train_saved_copies)


@pytest.mark.parametrize("mts", [["lm_.*"], ["rotary_emb"], ["embed_tokens", "lm_.*"]])
def test_modules_to_save_entries_that_save_nothing_load_as_peft(bases, tmp_path, mts):
    """PEFT's _set_trainable selects modules_to_save by str.endswith, never as a regex: "lm_.*"
    selects nothing, "rotary_emb" a module without weights, and PEFT loads the file. Ember read
    "lm_.*" as a regex too (took lm_head for trained and refused the file for lacking it) and
    refused "rotary_emb" as unsupported."""
    edit = _train_saved_copies if "embed_tokens" in mts else None
    _round_trip(bases["plain"], tmp_path, target_modules=["q_proj"], modules_to_save=mts,
                edit_base=edit)


def test_modules_to_save_regex_that_excludes_the_lora_pairs_is_refused(bases, tmp_path):
    """PEFT also reads each entry as a regex to keep LoRA off the modules it names: with ".*"
    it puts LoRA nowhere and refuses the file; Ember refuses it by name too (never loads the
    pairs, nor takes ".*" for embed_tokens and lm_head)."""
    _peft_adapter(bases["plain"], tmp_path / "peft", target_modules=["q_proj"])
    cfg_file = tmp_path / "peft" / "adapter_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg_file.write_text(json.dumps({**cfg, "modules_to_save": [".*"]}))
    ids = torch.zeros(1, 3, dtype=torch.long) + 7
    with pytest.raises(Exception, match="excluded"):
        _peft_logits(bases["plain"], tmp_path / "peft", ids)
    model, _ = load_pretrained(bases["plain"])
    with pytest.raises(EmberError, match=r"modules_to_save=\['\.\*'\] keeps LoRA off"):
        load_adapter(model, tmp_path / "peft")


def _new_token_rows(model) -> None:
    """PEFT starts trainable tokens as the base's own rows: give them new values (global RNG)."""
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "trainable_tokens_delta" in n:
                p.copy_(0.3 * torch.randn_like(p))


@pytest.mark.parametrize("base,indices", [  # ids 15, 44 and 53 are in _peft_adapter's input
    ("plain", [44, 15]), ("tied", [44, 15]),  # tied: PEFT's head sees the embedding's new rows
    ("plain", {"embed_tokens": [53], "lm_head": [4, 7]}), ("plain", {"lm_head": [7, 2]}),
])
def test_trainable_token_indices(bases, tmp_path, base, indices):
    """PEFT's trainable tokens (rows of the embedding / head trained whole beside the LoRA pairs)
    load with PEFT's logits and save back as PEFT's (were refused)."""
    _round_trip(bases[base], tmp_path, target_modules=["q_proj"], edit_base=_new_token_rows,
                trainable_token_indices=indices)
    assert json.loads((tmp_path / "ember" / "adapter_config.json").read_text())[
        "trainable_token_indices"] == indices


def test_trainable_tokens_on_a_tied_head_alone_untie_it(bases, tmp_path):
    """PEFT changes the tied head's rows but not the embedding's: Ember unties the head (was
    refused), with PEFT's logits, and saves back what PEFT loads with the same logits."""
    _round_trip(bases["tied"], tmp_path, target_modules=["q_proj"], edit_base=_new_token_rows,
                trainable_token_indices={"lm_head": [4, 44]})
    assert json.loads((tmp_path / "ember" / "adapter_config.json").read_text())[
        "trainable_token_indices"] == {"lm_head": [4, 44]}


def test_tied_head_patterns_follow_peft(bases, tmp_path):
    """ensure_weight_tying with rank/alpha patterns: PEFT scales the tied head by the patterns'
    value for "lm_head". Set apart from the embedding's it was loaded with the embedding's scale
    (logits off by ~100): refused now; set alike it loads, and Ember's save writes lm_head's
    pattern too (without it PEFT gave the head r / lora_alpha)."""
    _round_trip(bases["tied"], tmp_path / "same", target_modules=["q_proj", "embed_tokens"],
                ensure_weight_tying=True, rank_pattern={"embed_tokens|lm_head": 2},
                alpha_pattern={"embed_tokens|lm_head": 7})
    _peft_adapter(bases["tied"], tmp_path / "apart", target_modules=["q_proj", "embed_tokens"],
                  ensure_weight_tying=True, rank_pattern={"embed_tokens": 2},
                  alpha_pattern={"embed_tokens": 7})
    model, _ = load_pretrained(bases["tied"])
    with pytest.raises(EmberError, match="tied lm_head's update by 2 .* embedding's by 3.5"):
        load_adapter(model, tmp_path / "apart")


def test_config_fields_left_out_take_peft_defaults(bases, tmp_path):
    """An adapter_config.json without lora_alpha (older or hand-written files): PEFT's LoraConfig
    fills in 8 (_peft_adapter's alpha); Ember refused the file ("lora_alpha must be a positive
    number, got None")."""
    ids, ref = _peft_adapter(bases["plain"], tmp_path / "a", target_modules=["q_proj"])
    path = tmp_path / "a" / "adapter_config.json"
    config = json.loads(path.read_text())
    del config["lora_alpha"]
    path.write_text(json.dumps(config))
    assert _close(_peft_logits(bases["plain"], tmp_path / "a", ids), ref)  # PEFT: the same
    model, _ = load_pretrained(bases["plain"])
    load_adapter(model, tmp_path / "a")
    with torch.no_grad():
        assert _close(model.eval()(ids), ref)


def test_bin_adapter_loads_and_errors_name_it(bases, tmp_path):
    """An adapter_model.bin-only folder (older PEFT, safe_serialization=False) loads with PEFT's
    logits; an error about its tensors named adapter_model.safetensors, a file not there."""
    ids, ref = _peft_adapter(bases["plain"], tmp_path / "st", target_modules=["v_proj"])
    sd = load_file(tmp_path / "st" / "adapter_model.safetensors")
    for name, tensors in (("ok", sd), ("bad", {**sd, "base_model.model.model.norm.weight": ref})):
        (tmp_path / name).mkdir()
        shutil.copy(tmp_path / "st" / "adapter_config.json", tmp_path / name)
        torch.save(tensors, tmp_path / name / "adapter_model.bin")
    model, _ = load_pretrained(bases["plain"])
    load_adapter(model, tmp_path / "ok")
    with torch.no_grad():
        assert _close(model.eval()(ids), ref)
    with pytest.raises(EmberError, match=r"adapter_model\.bin: 1 keys match no projection"):
        load_adapter(load_pretrained(bases["plain"])[0], tmp_path / "bad")


def test_loading_over_other_adapters_is_refused(bases, tmp_path):
    """A second load_adapter whose file covers fewer modules than the model's adapters left the
    first adapter's other modules in place: a silent mix of two adapters."""
    _peft_adapter(bases["plain"], tmp_path / "qv", target_modules=["q_proj", "v_proj"])
    ids, ref = _peft_adapter(bases["plain"], tmp_path / "q", target_modules=["q_proj"])
    model, _ = load_pretrained(bases["plain"])
    load_adapter(model, tmp_path / "qv")
    with pytest.raises(EmberError, match=r"already has LoRA adapters on \['layers\.0\.attn\.v_"):
        load_adapter(model, tmp_path / "q")
    load_adapter(model, tmp_path / "qv")  # the same modules: overwritten (resuming)
    fresh, _ = load_pretrained(bases["plain"])
    load_adapter(fresh, tmp_path / "q")
    with torch.no_grad():
        assert _close(fresh.eval()(ids), ref)


@pytest.mark.parametrize("kw", [
    dict(target_modules=["q_proj", "fc1"], bias="all"),
    dict(target_modules=["q_proj", "lm_head"], bias="lora_only"),
    dict(target_modules=["q_proj", "lm_head"]),
    dict(target_modules=["dense"], modules_to_save=["lm_head"]),
], ids=["bias_all", "head_lora_only", "head_lora", "head_saved"])
def test_phi_biases_beyond_the_projections(bases, tmp_path, kw):
    """Phi's LayerNorm and lm_head biases in PEFT's files: bias="all" trains and saves them all,
    a LoRA on lm_head saves its unchanged base_layer.bias, modules_to_save lm_head its trained
    one. Ember mapped projection biases only: each of these was refused."""
    ids, ref = _peft_adapter(bases["phi"], tmp_path / "peft", edit_base=_train, **kw)
    model, _ = load_pretrained(bases["phi"])
    load_adapter(model, tmp_path / "peft")
    with torch.no_grad():
        assert _close(model.eval()(ids), ref)
    save_adapter(model, tmp_path / "ember")
    assert _close(_peft_logits(bases["phi"], tmp_path / "ember", ids), ref)


def _embedding_grads(model, ids, w):
    (model(ids) * w).sum().backward()
    return model.embed.lora_embedding_A.grad, model.embed.lora_embedding_B.grad


def _peft_embedding_grads(base, adapter, ids, w):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = transformers.AutoModelForCausalLM.from_pretrained(base)
        pm = peft.PeftModel.from_pretrained(hf, adapter, is_trainable=True).train()
    (pm(ids).logits * w).sum().backward()
    emb = pm.base_model.model.model.embed_tokens
    return emb.lora_embedding_A["default"].grad, emb.lora_embedding_B["default"].grad


def test_embedding_lora_pad_column_gets_no_gradient(bases, tmp_path):
    """transformers' embed_tokens has padding_idx = pad_token_id and PEFT's LoRA lookup keeps it:
    the pad token's column of lora_embedding_A gets no gradient. Ember's did (pad ids inside a
    sequence, e.g. pad = eos), so its embedding adapter trained apart from PEFT's."""
    base = bases["padded"]
    ids, _ = _peft_adapter(base, tmp_path / "peft", target_modules=["q_proj", "embed_tokens"])
    ids[:, 3] = PAD
    w = torch.randn(2, 12, VOCAB, generator=torch.Generator().manual_seed(1))
    model, _ = load_pretrained(base)  # PEFT's adapter loaded: same gradients
    load_adapter(model, tmp_path / "peft")
    for mine, theirs in zip(_embedding_grads(model.train(), ids, w),
                            _peft_embedding_grads(base, tmp_path / "peft", ids, w), strict=True):
        assert _close(mine, theirs)
    model, _ = load_pretrained(base)  # Ember's own adapter (apply_lora), saved: same in PEFT
    apply_lora(model, LoRAConfig(rank=4, alpha=8, targets=("q", "embed_tokens")))
    with torch.no_grad():
        model.embed.lora_embedding_A.normal_()
    save_adapter(model, tmp_path / "ember")
    mine = _embedding_grads(model.train(), ids, w)
    assert mine[0][:, PAD].abs().max() == 0
    for a, b in zip(mine, _peft_embedding_grads(base, tmp_path / "ember", ids, w), strict=True):
        assert _close(a, b)


def test_classifier_head_takes_no_lora(bases, tmp_path):
    """lora.targets ".*" on a classifier wrapped its score head too, which PEFT's format cannot
    hold (SEQ_CLS saves the head whole): save_adapter failed after training. Patterns now pass
    over the head (it trains whole), as PEFT's modules_to_save does; naming it is an error."""
    model, _ = load_pretrained(bases["plain"])
    add_classification_head(model, ("a", "b", "c"))
    with pytest.raises(EmberError, match="classifier head 'score'"):
        apply_lora(model, LoRAConfig(rank=2, alpha=4, targets=("q", "score")))
    apply_lora(model, LoRAConfig(rank=2, alpha=4, targets=(".*",)))
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in [*model.parameters()]:
            if p.requires_grad or p is model.score.weight:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    save_adapter(model, tmp_path / "ember")
    ids = torch.randint(1, VOCAB, (2, 12), generator=g)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = transformers.AutoModelForSequenceClassification.from_pretrained(
            bases["plain"], num_labels=3, pad_token_id=0)
        pm = peft.PeftModel.from_pretrained(hf, tmp_path / "ember").eval()
    with torch.no_grad():
        assert _close(classify(model.eval(), ids), pm(input_ids=ids).logits)


def test_target_parameters_on_a_dense_model(bases, tmp_path):
    """PEFT's target_parameters on a dense model's weights ("q_proj.weight": LoRA on the
    parameter, the same math as on the module) were refused as "the model has no experts"; they
    load with PEFT's logits, ranks and alphas looked up by the parameter's name as PEFT does."""
    _round_trip(bases["plain"], tmp_path, target_modules=["v_proj"],
                target_parameters=["q_proj.weight", "mlp.down_proj.weight"],
                rank_pattern={"down_proj.weight": 3},
                alpha_pattern={"q_proj.weight": 5, "down_proj": 7})


def _peft_on_bare_model(bases, tmp_path, **lora):
    """PEFT's LoRA (``lora``: LoraConfig fields, random B) on the bare LlamaModel of
    ``bases["plain"]`` (an embedding model's adapter), saved to tmp_path / "peft": (ids, PEFT's
    last hidden states on them)."""
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = transformers.AutoModel.from_pretrained(bases["plain"]).eval()
        pm = peft.get_peft_model(hf, peft.LoraConfig(init_lora_weights=False, **lora))
        pm.save_pretrained(tmp_path / "peft")
    with torch.no_grad():
        return ids, pm.eval()(input_ids=ids).last_hidden_state


def _assert_loads_as_peft(bases, tmp_path, ids, ref):
    model, _ = load_pretrained(bases["plain"])
    load_adapter(model, tmp_path / "peft")
    with torch.no_grad():
        assert _close(model.eval().hidden_states(ids), ref)


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], r"layers\.\d+\.self_attn\.[qv]_proj"])
def test_patterns_match_the_names_peft_saw(bases, tmp_path, targets):
    """PEFT matches rank/alpha patterns against the module names of the model it wrapped: on a
    bare LlamaModel (an embedding model's adapter) "layers.0.self_attn.q_proj", which the
    anchored pattern below selects. Ember matched them against its own "model.layers.0..."
    names, missing the pattern: that adapter got alpha 8 instead of 16. A regex target_modules
    matches those names too (the check that every weight is targeted uses them)."""
    ids, ref = _peft_on_bare_model(bases, tmp_path, r=4, lora_alpha=8, target_modules=targets,
                                   alpha_pattern={r"^layers\.0\.self_attn\.q_proj": 16})
    _assert_loads_as_peft(bases, tmp_path, ids, ref)


@pytest.mark.parametrize("field,value", [
    ("rank_pattern", "q_proj"), ("rank_pattern", {"[": 2}), ("rank_pattern", {"q_proj": 2.5}),
    ("alpha_pattern", {"q_proj": None}), ("alpha_pattern", {"(": 1.0}), ("r", 4.0),
    ("target_modules", 5), ("target_modules", ["q_proj", 3]), ("target_modules", "["),
    ("exclude_modules", "["), ("lora_dropout", "x"), ("lora_dropout", 2.0),
    ("layers_pattern", 5), ("layers_pattern", "["), ("layers_pattern", "layers"),
    ("layers_to_transform", "0"),
])
def test_malformed_config_fields_are_refused_by_name(bases, tmp_path, field, value):
    """adapter_config.json values PEFT itself fails on deep inside (AttributeError, re.error,
    TypeError from torch): Ember names the field (was: the same deep errors)."""
    _peft_adapter(bases["plain"], tmp_path / "ad", target_modules=["q_proj", "v_proj"])
    path = tmp_path / "ad" / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), field: value}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = transformers.AutoModelForCausalLM.from_pretrained(bases["plain"])
        with pytest.raises(Exception):  # noqa: B017  (PEFT's errors are of many kinds)
            peft.PeftModel.from_pretrained(hf, tmp_path / "ad")
    model, _ = load_pretrained(bases["plain"])
    with pytest.raises(EmberError, match=f"{field}=.*fix adapter_config.json"):
        load_adapter(model, tmp_path / "ad")


@pytest.mark.parametrize("edit", [dict(layers_to_transform=[0]), dict(target_modules=["q_proj"]),
                                  dict(exclude_modules=["v_proj"])])
def test_weights_the_config_does_not_target_are_refused(bases, tmp_path, edit):
    """adapter_config narrowed after saving (layers_to_transform, target_modules,
    exclude_modules): PEFT builds adapters from the config and drops the file's other weights,
    so its logits differ from the whole file's; Ember applied every weight in the file, silently
    not PEFT's model. It now names the weights the config does not target."""
    ids, whole = _peft_adapter(bases["plain"], tmp_path / "ad", target_modules=["q_proj", "v_proj"])
    cfg_path = tmp_path / "ad" / "adapter_config.json"
    cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), **edit}))
    theirs = _peft_logits(bases["plain"], tmp_path / "ad", ids)
    assert (theirs - whole).abs().max() > 1e-3  # PEFT dropped some of the weights
    model, _ = load_pretrained(bases["plain"])
    with pytest.raises(EmberError, match="does not target .*model.layers.1.self_attn.q_proj"
                       if "layers_to_transform" in edit else "does not target .*v_proj"):
        load_adapter(model, tmp_path / "ad")


def test_a_full_module_name_in_target_modules_ignores_layers_to_transform(bases, tmp_path):
    """PEFT's check_target_module_exists: a module named in full in target_modules is targeted
    whatever layers_to_transform says (the layer filter applies to suffix matches only). Ember
    applied the filter to it too and refused the adapter's weights as untargeted."""
    ids, ref = _peft_adapter(bases["plain"], tmp_path / "ad", layers_to_transform=[0],
                             target_modules=["model.layers.1.self_attn.q_proj", "v_proj"])
    saved = load_file(tmp_path / "ad" / "adapter_model.safetensors")
    assert any("layers.1.self_attn.q_proj" in k for k in saved)  # PEFT adapted it
    assert not any("layers.1.self_attn.v_proj" in k for k in saved)
    model, _ = load_pretrained(bases["plain"])
    load_adapter(model, tmp_path / "ad")
    with torch.no_grad():
        assert _close(model.eval()(ids), ref)


@pytest.mark.parametrize("pattern", ["layers", ["h", "layers"]])
def test_layers_pattern_finds_the_layer_index_as_peft_does(bases, tmp_path, pattern):
    """PEFT's check_target_module_exists finds the layer index of layers_to_transform after
    layers_pattern (str or list) when one is set: on a bare LlamaModel (an embedding model's
    adapter) "layers.0.self_attn.q_proj" has an index only that way. Ember ignored
    layers_pattern, found no index and refused PEFT's weights as untargeted."""
    ids, ref = _peft_on_bare_model(bases, tmp_path, r=4, lora_alpha=8,
                                   target_modules=["q_proj", "v_proj"], layers_to_transform=[1],
                                   layers_pattern=pattern)
    saved = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert saved and all("layers.1." in k for k in saved)  # PEFT adapted layer 1 only
    _assert_loads_as_peft(bases, tmp_path, ids, ref)


@pytest.mark.parametrize("target", ["all-linear", r".*\.q_proj"])
@pytest.mark.parametrize("edit", [dict(layers_to_transform=[0]),
                                  dict(layers_to_transform=[0], layers_pattern="layers")])
def test_layer_filters_with_a_regex_target_are_refused_as_peft_does(bases, tmp_path, target,
                                                                    edit):
    """PEFT's LoraConfig refuses layers_to_transform / layers_pattern beside a string
    target_modules (a regex, or "all-linear"); Ember loaded such a config, ignoring the filter."""
    _peft_adapter(bases["plain"], tmp_path / "ad", target_modules=target)
    path = tmp_path / "ad" / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "target_modules": target, **edit}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = transformers.AutoModelForCausalLM.from_pretrained(bases["plain"])
        with pytest.raises(ValueError, match="cannot be used when `target_modules` is a str"):
            peft.PeftModel.from_pretrained(hf, tmp_path / "ad")
    model, _ = load_pretrained(bases["plain"])
    with pytest.raises(EmberError, match="layers_.*is set with a regex target_modules"):
        load_adapter(model, tmp_path / "ad")


def test_a_bare_models_adapter_excluding_by_anchored_regex_loads(bases, tmp_path):
    """An adapter saved on a bare LlamaModel whose exclude_modules regex is anchored to the
    names PEFT saw there ("layers.0..."): the modules it excluded have no weights, and Ember,
    matching its own "model.layers.0..." names, took them for weights missing from the file."""
    ids, ref = _peft_on_bare_model(bases, tmp_path, r=4, lora_alpha=8,
                                   target_modules=["q_proj", "v_proj", "embed_tokens"],
                                   exclude_modules=r"^(layers\.0\..*|embed_tokens)")
    saved = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert saved and all("layers.1." in k for k in saved)
    _assert_loads_as_peft(bases, tmp_path, ids, ref)
