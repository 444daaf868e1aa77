"""Multimodal Gemma 3 (Gemma3ForConditionalGeneration): its language model loads text-only with
transformers' text logits (both saved key layouts, Google's sparse config.json), LoRA adapters
export under the multimodal class's module names for PEFT (and PEFT's load back), merged exports
are whole multimodal folders with the vision tower copied bit for bit, ``ember train`` / ``ember
export`` run on such a folder, QLoRA loads it, and other multimodal families stay refused."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

from ember import EmberError
from ember.models.hf import config_from_hf
from ember.models.loading import load_pretrained, save_pretrained
from ember.models.lora import load_adapter, merge_lora, save_adapter
from tests.models.lora_util import lora_with_random_b

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.filterwarnings("ignore:.*no tokenizer.json",
                                        "ignore:.*vision tower / projector")

VOCAB, T = 96, 19
TEXT = dict(hidden_size=48, intermediate_size=72, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=64, rms_norm_eps=1e-5,
            sliding_window=5, sliding_window_pattern=2, query_pre_attn_scalar=12,
            rope_local_base_freq=100.0, rope_scaling={"rope_type": "linear", "factor": 4.0})
VISION = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
              image_size=28, patch_size=14)


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test here on one torch thread (tests/conftest.py: one_thread)."""


def save_multimodal(folder, vocab: int = VOCAB, seed: int = 0, tokenizer=None,
                    dtype=torch.float32):
    """A tiny random Gemma3ForConditionalGeneration (every weight random, norms included; the
    image token inside the text vocabulary) saved by transformers to ``folder``."""
    config = transformers.Gemma3Config(
        text_config=dict(TEXT, vocab_size=vocab), vision_config=VISION, mm_tokens_per_image=4,
        boi_token_index=vocab - 3, eoi_token_index=vocab - 2, image_token_index=vocab - 1)
    model = transformers.Gemma3ForConditionalGeneration(config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():  # Gemma norms are (1 + w): w around 0
            p.copy_((0.3 if "norm" in n else 0.1) * torch.randn(p.shape, generator=g))
    model.to(dtype).save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return folder


def _hf(folder, dtype="auto"):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.Gemma3ForConditionalGeneration.from_pretrained(
            folder, attn_implementation="eager", dtype=dtype).eval()


def _ids(B: int = 2, n: int = T, seed: int = 0):
    ids = torch.randint(0, VOCAB, (B, n), generator=torch.Generator().manual_seed(seed))
    ids[0, 4] = VOCAB - 1  # the image token, as plain text: no pixel_values
    return ids


def _text_logits(hf_model, ids):
    with torch.no_grad():
        return hf_model(input_ids=ids).logits


def _diff(a, b) -> float:
    return (a - b).abs().max().item()


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return save_multimodal(tmp_path_factory.mktemp("g3mm") / "base")


def test_language_model_logits_match_the_multimodal_class(base):
    with pytest.warns(UserWarning, match=r"its 50 vision tower / projector tensors are not"):
        model, _ = load_pretrained(base)
    assert model.cfg.model_type == "gemma3_text" and model.cfg.extra["multimodal"] == "gemma3"
    assert model.cfg.tie_word_embeddings and model.lm_head is None
    assert not any("vision" in n for n, _ in model.named_parameters())
    ids = _ids()
    with torch.no_grad():
        ours = model(ids)
    diff = _diff(ours, _text_logits(_hf(base), ids))
    print(f"multimodal Gemma 3 text logits: max |ember - transformers| = {diff:.2e}")
    assert diff <= 1e-4


def test_both_saved_key_layouts_load(base, tmp_path):
    """transformers 4.52-4.57 saved ``model.language_model.*`` / ``model.vision_tower.*`` and an
    explicit ``lm_head.weight``; 4.50 and 5.x ``language_model.model.*``: the same model."""
    sd = load_file(base / "model.safetensors")
    assert any(k.startswith("language_model.model.layers.") for k in sd)  # what 5.x writes
    renamed = {("model." + k.replace("language_model.model.", "language_model.", 1)
                if not k.startswith("lm_head") else k): v for k, v in sd.items()}
    renamed["lm_head.weight"] = sd["language_model.model.embed_tokens.weight"].clone()
    (tmp_path / "new").mkdir()
    save_file(renamed, tmp_path / "new" / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "new" / "config.json").write_text((base / "config.json").read_text())
    a, _ = load_pretrained(base)
    b, _ = load_pretrained(tmp_path / "new")
    assert a.state_dict().keys() == b.state_dict().keys()
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    both = {**sd, **{k: v.clone() for k, v in renamed.items() if "language_model.layers.0." in k}}
    save_file(both, tmp_path / "new" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(EmberError, match="stored twice"):
        load_pretrained(tmp_path / "new")


def test_googles_sparse_config_json():
    """google/gemma-3-4b-it's config.json lists only what differs from Gemma3TextConfig; the top
    level's tying, dtype and eos apply to the language model."""
    raw = {"architectures": ["Gemma3ForConditionalGeneration"], "boi_token_index": 255999,
           "eoi_token_index": 256000, "eos_token_id": [1, 106], "image_token_index": 262144,
           "initializer_range": 0.02, "mm_tokens_per_image": 256, "model_type": "gemma3",
           "text_config": {"hidden_size": 2560, "intermediate_size": 10240,
                           "model_type": "gemma3_text", "num_hidden_layers": 34,
                           "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
                           "sliding_window": 1024},
           "torch_dtype": "bfloat16", "transformers_version": "4.50.0.dev0",
           "vision_config": {"hidden_size": 1152, "image_size": 896, "model_type":
                             "siglip_vision_model", "num_hidden_layers": 27}}
    cfg = config_from_hf(raw)
    want = transformers.Gemma3Config(**{k: v for k, v in raw.items() if k != "model_type"})
    tc = want.text_config
    assert (cfg.vocab_size, cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads,
            cfg.head_dim) == (tc.vocab_size, tc.hidden_size, tc.num_hidden_layers,
                              tc.num_attention_heads, tc.num_key_value_heads, tc.head_dim)
    assert cfg.layer_types == tuple(tc.layer_types) and cfg.sliding_window == 1024
    assert cfg.rope_scaling.factor == 8.0 and cfg.rope_local_theta == 10_000.0
    assert cfg.tie_word_embeddings and cfg.torch_dtype == "bfloat16"
    assert cfg.eos_token_id == [1, 106] and cfg.pad_token_id == 0
    assert cfg.query_pre_attn_scalar == tc.query_pre_attn_scalar


def test_adapter_exports_for_the_multimodal_class_and_back(base, tmp_path):
    peft = pytest.importorskip("peft")
    model, _ = load_pretrained(base)
    lora_with_random_b(model, ("q_proj", "v_proj", "down_proj"))
    save_adapter(model, tmp_path / "ad")
    keys = load_file(tmp_path / "ad" / "adapter_model.safetensors")
    assert all(k.startswith("base_model.model.model.language_model.layers.") for k in keys)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.PeftModel.from_pretrained(_hf(base), tmp_path / "ad").eval()
    wrapped = [n for n, m in pm.named_modules() if hasattr(m, "lora_A")]
    assert len(wrapped) == 3 * 3 and not any("vision" in n for n in wrapped)
    ids = _ids()
    with torch.no_grad():
        ours = model(ids)
    diff = _diff(ours, _text_logits(pm, ids))
    print(f"multimodal Gemma 3 LoRA: max |ember - PEFT| = {diff:.2e}")
    assert diff <= 1e-4
    again, _ = load_pretrained(base)
    load_adapter(again, tmp_path / "ad")
    with torch.no_grad():
        assert _diff(again(ids), ours) <= 1e-6

    # PEFT's own adapter on the multimodal model (its names; all-linear would reach the vision
    # tower, so the usual regex over the language model) loads into Ember with PEFT's logits
    cfg = peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                          target_modules=r".*language_model.*\.(q_proj|o_proj|up_proj)")
    torch.manual_seed(1)
    theirs = peft.get_peft_model(_hf(base), cfg).eval()
    theirs.save_pretrained(tmp_path / "peft")
    mine, _ = load_pretrained(base)
    load_adapter(mine, tmp_path / "peft")
    with torch.no_grad():
        assert _diff(mine(ids), _text_logits(theirs, ids)) <= 1e-4

    # an adapter that trains the vision tower cannot be held by the text model
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"])
    peft.get_peft_model(_hf(base), cfg).save_pretrained(tmp_path / "vision")
    fresh, _ = load_pretrained(base)
    with pytest.raises(EmberError, match="vision tower or projector"):
        load_adapter(fresh, tmp_path / "vision")


@pytest.mark.parametrize("targets,save_kw", [
    (r".*language_model.*\.(q_proj|embed_tokens)", {}),  # PEFT saves the embedding it adapts
    (r".*language_model.*\.q_proj", dict(save_embedding_layers=True)),
])
def test_peft_adapter_with_the_base_embedding_saved(base, tmp_path, targets, save_kw):
    """PEFT saves the (unchanged) embedding it adapted, or every embedding with
    save_embedding_layers, under the multimodal names (model.language_model.embed_tokens):
    loads with PEFT's logits (was refused as a new embedding: only model.embed_tokens was
    recognised)."""
    peft = pytest.importorskip("peft")
    cfg = peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=targets)
    torch.manual_seed(2)
    theirs = peft.get_peft_model(_hf(base), cfg).eval()
    theirs.save_pretrained(tmp_path / "peft", **save_kw)
    assert any("language_model.embed_tokens" in k and "lora" not in k
               for k in load_file(tmp_path / "peft" / "adapter_model.safetensors"))
    model, _ = load_pretrained(base)
    load_adapter(model, tmp_path / "peft")
    ids = _ids()
    with torch.no_grad():
        assert _diff(model(ids), _text_logits(theirs, ids)) <= 1e-4


def test_peft_trainable_tokens_under_the_multimodal_names(base, tmp_path):
    """trainable_token_indices on the multimodal class: PEFT saves the rows under
    model.language_model.embed_tokens; they load with PEFT's logits and save back so."""
    peft = pytest.importorskip("peft")
    cfg = peft.LoraConfig(r=4, target_modules=r".*language_model.*\.q_proj",
                          trainable_token_indices=[VOCAB - 1, 7])
    theirs = peft.get_peft_model(_hf(base), cfg).eval()
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if "trainable_tokens_delta" in n:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(3)))
    theirs.save_pretrained(tmp_path / "peft")
    model, _ = load_pretrained(base)
    load_adapter(model, tmp_path / "peft")
    ids = _ids()  # holds the image token VOCAB - 1 (as text)
    with torch.no_grad():
        ref = _text_logits(theirs, ids)
        assert _diff(model(ids), ref) <= 1e-4
    save_adapter(model, tmp_path / "ember")
    assert "base_model.model.model.language_model.embed_tokens.token_adapter." \
           "trainable_tokens_delta" in load_file(tmp_path / "ember" / "adapter_model.safetensors")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back = peft.PeftModel.from_pretrained(_hf(base), tmp_path / "ember").eval()
    assert _diff(_text_logits(back, ids), ref) <= 1e-4


def test_peft_modules_to_save_under_the_multimodal_names(base, tmp_path):
    """modules_to_save=["embed_tokens"] with ensure_weight_tying on the multimodal class: PEFT
    names the module model.language_model.embed_tokens; it loads with PEFT's logits and saves
    back under that name (was refused: only model.embed_tokens was recognised)."""
    peft = pytest.importorskip("peft")
    cfg = peft.LoraConfig(r=4, target_modules=r".*language_model.*\.q_proj",
                          modules_to_save=["embed_tokens"], ensure_weight_tying=True)
    theirs = peft.get_peft_model(_hf(base), cfg).eval()
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if "modules_to_save" in n:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    theirs.save_pretrained(tmp_path / "peft")
    model, _ = load_pretrained(base)
    load_adapter(model, tmp_path / "peft")
    ids = _ids()
    with torch.no_grad():
        ref = _text_logits(theirs, ids)
        assert _diff(model(ids), ref) <= 1e-4
    save_adapter(model, tmp_path / "ember")
    assert "base_model.model.model.language_model.embed_tokens.weight" in load_file(
        tmp_path / "ember" / "adapter_model.safetensors")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back = peft.PeftModel.from_pretrained(_hf(base), tmp_path / "ember").eval()
    assert _diff(_text_logits(back, ids), ref) <= 1e-4


def test_merged_export_is_the_whole_multimodal_folder(base, tmp_path):
    model, _ = load_pretrained(base)
    lora_with_random_b(model)
    merge_lora(model)
    out = save_pretrained(model, tmp_path / "merged", multimodal_base=base)
    assert (out / "config.json").read_bytes() == (base / "config.json").read_bytes()
    src, dst = load_file(base / "model.safetensors"), load_file(out / "model.safetensors")
    assert src.keys() == dst.keys()
    vision = [k for k in src if not k.startswith("language_model.")]
    assert len(vision) == 50 and all(
        src[k].dtype == dst[k].dtype
        and torch.equal(src[k].view(torch.uint8), dst[k].view(torch.uint8)) for k in vision)
    ids = _ids()
    with torch.no_grad():
        ours = model(ids)
    diff = _diff(ours, _text_logits(_hf(out), ids))
    print(f"multimodal Gemma 3 merged export: max |ember - transformers| = {diff:.2e}")
    assert diff <= 1e-4
    # without the base: the language model alone, a text-only Gemma3ForCausalLM
    text = save_pretrained(model, tmp_path / "text")
    assert json.loads((text / "config.json").read_text())["architectures"] == [
        "Gemma3ForCausalLM"]
    other, _ = load_pretrained(text)
    with torch.no_grad():
        assert _diff(other(ids), ours) <= 1e-6
    with pytest.raises(EmberError, match="not a multimodal checkpoint"):
        save_pretrained(model, tmp_path / "bad", multimodal_base=text)


def test_merged_export_records_its_dtype(tmp_path):
    """Real Gemma 3 checkpoints are bf16; a model trained in fp32 and exported merged writes
    fp32 language-model weights, so config.json must say float32 (transformers would load them
    rounded to bf16 otherwise); the vision tower stays as stored."""
    base = save_multimodal(tmp_path / "bf16", dtype=torch.bfloat16)
    assert json.loads((base / "config.json").read_text()).get("dtype") == "bfloat16"
    model, _ = load_pretrained(base, dtype=torch.float32)  # as training in fp32 leaves it
    out = save_pretrained(model, tmp_path / "merged", multimodal_base=base)
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "float32"
    assert config.get("text_config", {}).get("dtype") in (None, "float32")
    hf = _hf(out)
    assert hf.model.language_model.layers[0].self_attn.q_proj.weight.dtype == torch.float32
    ids = _ids()
    with torch.no_grad():
        assert _diff(model(ids), _text_logits(hf, ids)) <= 1e-4


def test_qlora_loads_the_language_model(base):
    from ember.models import quantize_model_

    dense, _ = load_pretrained(base)
    quantize_model_(dense)
    nf4, _ = load_pretrained(base, quantize="nf4")
    ids = _ids()
    with torch.no_grad():
        assert _diff(dense(ids), nf4(ids)) <= 1e-5


def test_refusals(base):
    raw = json.loads((base / "config.json").read_text())
    for model_type in ("paligemma", "llava", "gemma3n"):
        with pytest.raises(EmberError, match="multimodal model, which Ember does not load"):
            config_from_hf({**raw, "model_type": model_type})
    with pytest.raises(EmberError, match="Gemma3ForSequenceClassification"):
        config_from_hf({**raw, "architectures": ["Gemma3ForSequenceClassification"]})
    with pytest.raises(EmberError, match=r"\['new_field'\]"):
        config_from_hf({**raw, "new_field": 1})
    with pytest.raises(EmberError, match="final_logit_softcapping"):
        config_from_hf({**raw, "text_config": {**raw["text_config"],
                                               "final_logit_softcapping": 30.0}})
    with pytest.raises(EmberError, match="text_config.model_type"):
        config_from_hf({**raw, "text_config": {**raw["text_config"], "model_type": "gemma2"}})


@pytest.mark.parametrize("method", ["lora", "qlora", "full"])
def test_training_and_export_through_the_cli(tmp_path, method):
    """``ember train`` on a multimodal folder (LoRA, QLoRA, full), then ``ember export``: the
    adapter loads with PEFT on the multimodal class, the merged / full model is a multimodal
    folder with the base's vision tower; both give the run's text logits."""
    peft = pytest.importorskip("peft")
    from ember.engine.cli import main
    from ember.engine.state import load_run_model
    from tests.engine._tiny import cli_train_tiny, make_tiny_model

    _, tok = load_pretrained(make_tiny_model(tmp_path / "llama"))
    base = save_multimodal(tmp_path / "gemma3", vocab=len(tok) + 3, tokenizer=tok)
    run = cli_train_tiny(tmp_path, base, method)
    if method != "full":
        assert main(["export", str(run), "--adapter", str(tmp_path / "ad")]) == 0
    assert main(["export", str(run), "--merged", str(tmp_path / "merged")]) == 0
    model, _, _ = load_run_model(run, "cpu")
    ids = torch.tensor([[5, 9, 17, 33, 2, 70, 11, 40, 8, 3, 19]])
    with torch.no_grad():
        ours = model(ids).float()
    # QLoRA: the merged language model is written in the base's dtype, fp32 here (its NF4 base
    # dequantized into it; config.json says so), as tests/engine/test_qlora_train.py
    merged = _hf(tmp_path / "merged", dtype=torch.float32)
    assert _diff(ours, _text_logits(merged, ids).float()) <= 1e-4
    if method == "qlora":
        assert json.loads((tmp_path / "merged" / "config.json").read_text())["dtype"] == "float32"
    if method == "lora":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pm = peft.PeftModel.from_pretrained(_hf(base), tmp_path / "ad").eval()
        assert _diff(ours, _text_logits(pm, ids)) <= 1e-4
    src, dst = load_file(base / "model.safetensors"), load_file(tmp_path / "merged" /
                                                                "model.safetensors")
    assert src.keys() == dst.keys()
    assert all(torch.equal(src[k], dst[k]) for k in src if not k.startswith("language_model."))
