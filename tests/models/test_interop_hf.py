"""Interop regressions against transformers on checkpoints as other tools write them: each case
either matches transformers' logits (fp32, <= 1e-4) or is refused with an EmberError that names
the feature."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

from ember import EmberError
from ember.models.loading import load_pretrained, read_config, save_pretrained
from ember.models.transformer import KVCache

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.filterwarnings("ignore:.*no tokenizer.json")

from tests.models.test_hf import BASE as _HF_BASE  # noqa: E402
from tests.models.test_hf import VOCAB  # noqa: E402

BASE = {**_HF_BASE, "hidden_size": 48}


def randomize_(model, seed: int) -> None:
    """Every weight random (norms around 1, the rest around 0), seeded: no parameter is left at
    an init that could hide a mapping mistake (a zero bias, a unit norm)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.2 * noise if "norm" in n else 0.1 * noise)


def _save(tmp_path, name: str, config_cls: str = "LlamaConfig", **kw):
    """A tiny random transformers model (every weight randomized, norms around 1), saved."""
    config = getattr(transformers, config_cls)(**{**BASE, **kw})
    model = transformers.AutoModelForCausalLM.from_config(config)
    randomize_(model, len(name))
    folder = tmp_path / name
    model.save_pretrained(folder)
    return folder


def _hf_logits(folder, ids):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = transformers.AutoModelForCausalLM.from_pretrained(
            folder, attn_implementation="eager"
        ).eval()
    with torch.no_grad():
        return hf(ids).logits


def _assert_parity_and_export(model, folder, ids, tmp_path):
    """Ember's logits equal transformers' on ``folder``, and on Ember's own export of it."""
    with torch.no_grad():
        ours = model(ids)
    assert (ours - _hf_logits(folder, ids)).abs().max().item() <= 1e-4
    save_pretrained(model, tmp_path / "export")
    assert read_config(tmp_path / "export") == model.cfg
    with torch.no_grad():
        assert (ours - _hf_logits(tmp_path / "export", ids)).abs().max().item() <= 1e-4


def _ids(T: int = 16):
    return torch.randint(0, VOCAB, (2, T), generator=torch.Generator().manual_seed(T))


@pytest.mark.parametrize("same", [True, False], ids=["head_equals_embedding", "head_differs"])
def test_tied_config_with_a_stored_lm_head(tmp_path, same):
    """tie_word_embeddings=true but model.safetensors also holds lm_head.weight: transformers
    ties them when equal and keeps them apart when not; Ember used to drop the head silently."""
    folder = _save(tmp_path, "tied", tie_word_embeddings=True)
    sd = load_file(folder / "model.safetensors")
    emb = sd["model.embed_tokens.weight"]
    sd["lm_head.weight"] = emb.clone() if same else torch.randn(emb.shape) * 0.1
    save_file(sd, folder / "model.safetensors", metadata={"format": "pt"})
    ids = _ids()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, _ = load_pretrained(folder)
    untied = [w for w in caught if "tie_word_embeddings=true" in str(w.message)]
    assert model.cfg.tie_word_embeddings == same and len(untied) == (0 if same else 1)
    with torch.no_grad():
        assert (model(ids) - _hf_logits(folder, ids)).abs().max().item() <= 1e-4


def test_saved_rope_buffers_are_ignored_as_transformers_ignores_them(tmp_path):
    """Conversions that saved RoPE's inv_freq, per layer or the model's one: transformers ignores
    every ``rotary_emb.inv_freq`` key; Ember refused the model-level one as unexpected."""
    folder = _save(tmp_path, "buffers", num_hidden_layers=2)
    sd = load_file(folder / "model.safetensors")
    junk = torch.ones(BASE["hidden_size"] // BASE["num_attention_heads"] // 2)
    sd["model.rotary_emb.inv_freq"] = junk
    sd["model.layers.1.self_attn.rotary_emb.inv_freq"] = junk.clone()
    save_file(sd, folder / "model.safetensors", metadata={"format": "pt"})
    model, _ = load_pretrained(folder)
    with torch.no_grad():
        assert (model(_ids()) - _hf_logits(folder, _ids())).abs().max().item() <= 1e-4


def _moe_layouts_mixed(folder, fused: bool) -> str:
    """Add a second copy, under the other key layout and with other values, of a weight the
    checkpoint already holds; the stored key it duplicates."""
    sd = load_file(folder / "model.safetensors")
    if fused:  # a transformers 5 expert stack beside the per-expert keys of the same layer
        n = sum(k.startswith("model.layers.0.mlp.experts.") and k.endswith(".down_proj.weight")
                for k in sd)
        one = sd["model.layers.0.mlp.experts.0.down_proj.weight"]
        sd["model.layers.0.mlp.experts.down_proj"] = torch.randn(n, *one.shape) * 0.1
        dup = "model.layers.0.mlp.experts.0.down_proj.weight"
    else:  # Mixtral's router under its transformers 5 name beside the stored block_sparse_moe one
        dup = "model.layers.0.block_sparse_moe.gate.weight"
        sd["model.layers.0.mlp.gate.weight"] = torch.randn(sd[dup].shape) * 0.1
    save_file(sd, folder / "model.safetensors", metadata={"format": "pt"})
    return dup


@pytest.mark.parametrize("config_cls,kw,fused", [
    ("MixtralConfig", dict(num_local_experts=4, num_experts_per_tok=2), False),
    ("Qwen3MoeConfig", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32), True),
])
def test_a_weight_stored_twice_under_two_layouts_is_refused(tmp_path, config_cls, kw, fused):
    """A checkpoint holding one weight twice, under the old and the new key layout, with other
    values: transformers keeps one of them without a word (Mixtral: no unexpected key) or fails
    (Qwen3-MoE); Ember loaded whichever came last in the file, a silent wrong model."""
    folder = _save(tmp_path, "mixed", config_cls, **kw)
    dup = _moe_layouts_mixed(folder, fused)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _, info = transformers.AutoModelForCausalLM.from_pretrained(
                folder, output_loading_info=True)
        assert not info["unexpected_keys"]  # the other copy is dropped silently
    except AttributeError:  # transformers 5.23's stacked-expert conversion of the mixed layer
        assert fused
    with pytest.raises(EmberError, match="stored") as err:
        load_pretrained(folder)
    assert dup in str(err.value)


YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0}
ROPE_CASES = {  # name -> (config class, kwargs); T=24 runs past original_max_position_embeddings
    "llama_yarn": (
        "LlamaConfig",
        dict(rope_parameters={**YARN, "original_max_position_embeddings": 16}),
    ),
    "llama_yarn_default_context": ("LlamaConfig", dict(rope_parameters=YARN)),
    "qwen3_yarn_deepseek_mscale": (
        "Qwen3Config",
        dict(
            head_dim=16,
            rope_parameters={
                **YARN,
                "original_max_position_embeddings": 16,
                "mscale": 0.707,
                "mscale_all_dim": 1.0,
                "beta_fast": 16.0,
                "beta_slow": 2.0,
                "truncate": False,
            },
        ),
    ),
    "qwen2_yarn_attention_factor": (
        "Qwen2Config",
        dict(
            rope_parameters={**YARN, "original_max_position_embeddings": 8, "attention_factor": 0.8}
        ),
    ),
}


@pytest.mark.parametrize("case", list(ROPE_CASES))
def test_yarn_rope_matches_transformers_and_exports(tmp_path, case):
    """YaRN (Qwen2.5/Qwen3 long-context configs) used to be refused."""
    cls, kw = ROPE_CASES[case]
    folder = _save(tmp_path, case, cls, **kw)
    ids = _ids(24)
    model, _ = load_pretrained(folder)
    assert model.cfg.rope_scaling.kind == "yarn"
    _assert_parity_and_export(model, folder, ids, tmp_path)


DYNAMIC = {"rope_type": "dynamic", "rope_theta": 1000.0, "factor": 3.0}


@pytest.mark.parametrize("case,cls,kw", [
    ("llama", "LlamaConfig", dict(rope_parameters=DYNAMIC)),
    ("qwen2_legacy_4x", "Qwen2Config", dict(rope_scaling={"type": "dynamic", "factor": 2.5})),
    ("gemma2_windows", "Gemma2Config", dict(rope_parameters=DYNAMIC, head_dim=8,
                                           sliding_window=6)),
])
def test_dynamic_ntk_rope_matches_transformers(tmp_path, case, cls, kw, one_thread):
    """dynamic NTK (the RoPE base grows with a forward's length past max_position_embeddings)
    used to be refused. Short and long forwards, the export, and decoding across the boundary
    (KV-cached decoding), where every step grows the base again."""
    folder = _save(tmp_path, case, cls, max_position_embeddings=16, **kw)
    model, _ = load_pretrained(folder)
    assert model.cfg.rope_scaling.kind == "dynamic"
    with torch.no_grad():
        short = _ids(12)
        assert (model(short) - _hf_logits(folder, short)).abs().max().item() <= 1e-4
    _assert_parity_and_export(model, folder, _ids(32), tmp_path)
    ids = _ids(18)
    with warnings.catch_warnings(), torch.no_grad():  # KV-cached decoding as generation does it
        warnings.simplefilter("ignore")
        hf = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
        out = hf(ids[:, :15], use_cache=True)
        cache = KVCache(model.cfg, 2, 18, "cpu", torch.float32)
        model(ids[:, :15], cache=cache)
        for t in range(15, 18):
            out = hf(ids[:, t:t + 1], past_key_values=out.past_key_values, use_cache=True)
            step = model(ids[:, t:t + 1], cache=cache)
            assert (step - out.logits).abs().max().item() <= 1e-4, t


PHI3 = dict(pad_token_id=None, bos_token_id=1, eos_token_id=2)


@pytest.mark.parametrize(
    "case,kw",
    [
        ("phi3_window", dict(sliding_window=5)),  # Phi-3-mini-4k has a 2047-token window
        # official Phi-3 configs say attention_bias=false; transformers ignores it either way
        (
            "phi3_tied_mha",
            dict(tie_word_embeddings=True, num_key_value_heads=4, attention_bias=True),
        ),
    ],
)
def test_phi3_fused_projections_load_and_export(tmp_path, case, kw):
    """Phi-3 (fused qkv_proj / gate_up_proj) used to be refused as an unknown model_type."""
    folder = _save(tmp_path, case, "Phi3Config", **PHI3, **kw)
    ids = _ids(24)
    model, _ = load_pretrained(folder)
    assert model.cfg.model_type == "phi3" and model.cfg.sliding_window == kw.get("sliding_window")
    with torch.no_grad():
        ours = model(ids)
    assert (ours - _hf_logits(folder, ids)).abs().max().item() <= 1e-4
    save_pretrained(model, tmp_path / "export")
    stored = load_file(folder / "model.safetensors")
    exported = load_file(tmp_path / "export" / "model.safetensors")
    assert set(exported) == set(stored) and all(torch.equal(exported[k], stored[k]) for k in stored)
    # QLoRA base: quantized while loading (fused weights quantized whole, as bnb does); saved
    # in bnb's format (fused again) or dequantized
    nf4, _ = load_pretrained(folder, quantize="nf4")
    for out, kw in (("nf4", {}), ("dense", {"dequantize": True})):
        save_pretrained(nf4, tmp_path / out, **kw)
        with torch.no_grad():
            assert (nf4(ids) - _hf_logits(tmp_path / out, ids)).abs().max().item() <= 1e-4


def test_phi3_residual_dropout_acts_in_training_as_transformers(tmp_path, one_thread):
    """Phi-3's resid_pdrop (transformers drops the attention and MLP outputs in training; its
    embd_pdrop is never applied) used to be refused: eval forwards equal transformers', training
    forwards draw the same masks, the export keeps it."""
    folder = _save(tmp_path, "phi3", "Phi3Config", **PHI3, resid_pdrop=0.2, embd_pdrop=0.1)
    ids = _ids()
    model, _ = load_pretrained(folder)
    assert model.cfg.resid_dropout == 0.2 and model.cfg.embed_dropout == 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = transformers.AutoModelForCausalLM.from_pretrained(
            folder, attn_implementation="eager").train()
    with torch.no_grad():
        assert (model(ids) - _hf_logits(folder, ids)).abs().max().item() <= 1e-4
        model.train()
        torch.manual_seed(0)
        ours = model(ids)
        torch.manual_seed(0)
        assert (ours - hf(ids).logits).abs().max().item() <= 1e-4
        assert (ours - model.eval()(ids)).abs().max().item() > 1e-2  # it did drop
    save_pretrained(model, tmp_path / "export")
    assert json.loads((tmp_path / "export" / "config.json").read_text())["resid_pdrop"] == 0.2
    assert read_config(tmp_path / "export") == model.cfg


@pytest.mark.parametrize(
    "change,needle",
    [
        ({"rope_scaling": {"type": "su", "short_factor": [1.0] * 6}}, "longrope.*long_factor"),
        # 12 * 0.3 = 3.6: an odd rotary dim, which transformers would pad to 4 by accident
        ({"rope_parameters": {"rope_type": "default", "partial_rotary_factor": 0.3}}, "partial"),
        ({"resid_pdrop": 1.0}, "resid_pdrop must be in"),
        (
            {
                "quantization_config": {
                    "quant_method": "bitsandbytes",
                    "load_in_4bit": True,
                    "bnb_4bit_quant_type": "nf4",
                }
            },
            "no 4-bit weights",  # (bnb's own Phi-3 checkpoints: test_bnb_variants.py)
        ),
    ],
)
def test_phi3_what_ember_cannot_compute_is_refused(tmp_path, change, needle):
    folder = _save(tmp_path, "phi3", "Phi3Config", **PHI3)
    path = folder / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **change}))
    with pytest.raises(EmberError, match=needle):
        load_pretrained(folder)


@pytest.mark.parametrize(
    "case,kw",
    [
        ("gemma_mqa", dict(head_dim=16, num_key_value_heads=1)),
        ("gemma_untied_bias_legacy_gelu", dict(tie_word_embeddings=False, attention_bias=True)),
    ],
)
def test_gemma_loads_and_exports(tmp_path, case, kw):
    """Gemma (v1): (1 + w) norms, sqrt(hidden) embedding scale, GeGLU; was refused."""
    folder = _save(tmp_path, case, "GemmaConfig", **kw)
    if "legacy" in case:  # the original Gemma releases say "gelu" and mean the tanh GELU
        path = folder / "config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "hidden_act": "gelu"}))
    ids = _ids()
    model, _ = load_pretrained(folder)
    assert model.cfg.norm_offset == 1.0 and model.cfg.activation == "gelu_tanh"
    _assert_parity_and_export(model, folder, ids, tmp_path)


@pytest.mark.parametrize(
    "config_cls,model_type",
    [
        ("CohereConfig", "cohere"),
        ("GPTNeoXConfig", "gpt_neox"),
    ],
)
def test_unsupported_families_are_refused_by_name(tmp_path, config_cls, model_type):
    folder = _save(tmp_path, model_type, config_cls, pad_token_id=None, eos_token_id=2)
    with pytest.raises(EmberError, match=f"model_type '{model_type}' is not supported"):
        load_pretrained(folder)


def test_auto_map_of_a_native_model_type_loads_as_the_native_model(tmp_path):
    """Official Phi-3 repos ship auto_map (remote code); like transformers without
    trust_remote_code, the native implementation is used, with a warning, and no code runs."""
    folder = _save(tmp_path, "phi3", "Phi3Config", **PHI3)
    path = folder / "config.json"
    auto = {"AutoConfig": "configuration_phi3.Phi3Config",
            "AutoModelForCausalLM": "modeling_phi3.Phi3ForCausalLM"}
    path.write_text(json.dumps({**json.loads(path.read_text()), "auto_map": auto}))
    (folder / "modeling_phi3.py").write_text("raise SystemExit('remote code ran')\n")
    ids = _ids(24)
    with pytest.warns(UserWarning, match="auto_map"):
        model, _ = load_pretrained(folder)
    with torch.no_grad():
        assert (model(ids) - _hf_logits(folder, ids)).abs().max().item() <= 1e-4


def test_export_keeps_the_stop_ids_of_generation_config(tmp_path):
    """generation_config.json often stops at more ids than config.json's eos (Gemma-2-it:
    [1, 107] for <end_of_turn>, Llama 3: <|eot_id|>, Qwen2.5: <|endoftext|>); an export wrote
    config.json's eos alone, so transformers' generate and a reload here ran past end of turn."""
    from ember.models.tokenizer import load_tokenizer, tokenizer_from_gguf
    from tests.models.test_gguf import tiny_tokenizer_md

    folder = _save(tmp_path, "eos", eos_token_id=2, bos_token_id=1)
    tokenizer_from_gguf(tiny_tokenizer_md()).save_pretrained(folder)
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    model, tok = load_pretrained(folder)
    assert tok.eos_token_ids == {0, 2} and model.cfg.eos_token_id == 2
    out = save_pretrained(model, tmp_path / "export", tok)
    assert transformers.GenerationConfig.from_pretrained(out).eos_token_id == [2, 0]
    assert load_tokenizer(out).eos_token_ids == {0, 2}
    assert read_config(out).eos_token_id == 2  # config.json as it was


def _cache_snapshot(tmp_path, cache, repo_id: str):
    """A tiny model saved as huggingface_hub caches repo_id's main revision; its snapshot folder."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / "0123456789abcdef0123456789abcdef01234567"
    snapshot.parent.mkdir(parents=True)
    _save(tmp_path, "src").rename(snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(snapshot.name)
    return snapshot


def test_a_hub_id_loads_from_the_local_hugging_face_cache(tmp_path, monkeypatch):
    """"org/name" as transformers users write it: the snapshot already in the Hugging Face cache
    (as huggingface_hub finds it offline) loads; Ember said "not found". Nothing is fetched."""
    import os

    hub = pytest.importorskip("huggingface_hub")
    cache = tmp_path / "hf" / "hub"
    _cache_snapshot(tmp_path, cache, "tiny-org/tiny-llama")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    want = hub.snapshot_download("tiny-org/tiny-llama", local_files_only=True, cache_dir=cache)
    from ember.models.hub import resolve_model

    assert os.path.samefile(resolve_model("tiny-org/tiny-llama"), want)
    model, _ = load_pretrained("tiny-org/tiny-llama")
    ids = _ids()
    with torch.no_grad():
        assert (model(ids) - _hf_logits(want, ids)).abs().max().item() <= 1e-4
    with pytest.raises(EmberError, match="not a Hugging Face Hub id in the local"):
        resolve_model("tiny-org/absent")


@pytest.mark.parametrize("env", ["XDG_CACHE_HOME", "HF_HOME"])
def test_hub_cache_location_as_huggingface_hub_finds_it(tmp_path, monkeypatch, env):
    """Without HF_HUB_CACHE / HF_HOME, huggingface_hub caches under $XDG_CACHE_HOME/huggingface:
    Ember looked in ~/.cache/huggingface and said "not found". The oracle is huggingface_hub
    itself (a fresh process: it reads the variables at import)."""
    import os
    import subprocess
    import sys

    pytest.importorskip("huggingface_hub")
    from ember.models.hub import resolve_model

    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv(env, str(tmp_path / "home"))
    cache = tmp_path / "home" / ("huggingface/hub" if env == "XDG_CACHE_HOME" else "hub")
    _cache_snapshot(tmp_path, cache, "tiny-org/xdg-llama")
    want = subprocess.run(
        [sys.executable, "-c", "import huggingface_hub as h; print(h.snapshot_download("
         "'tiny-org/xdg-llama', local_files_only=True))"],
        capture_output=True, text=True, check=True, env=dict(os.environ)).stdout.strip()
    assert os.path.samefile(resolve_model("tiny-org/xdg-llama"), want)


def test_a_cached_hub_snapshot_wins_over_the_builtin_alias_of_its_id(tmp_path, monkeypatch):
    """"HuggingFaceTB/SmolLM2-135M-Instruct" is also an alias of the built-in Q4_1 GGUF; with the
    repo's snapshot in the Hugging Face cache, its full-precision weights load (the alias won,
    silently swapping in 4-bit weights)."""
    from ember.models.hub import resolve_model

    cache = tmp_path / "hf" / "hub"
    snapshot = _cache_snapshot(tmp_path, cache, "HuggingFaceTB/SmolLM2-135M-Instruct")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("EMBER_CACHE", str(tmp_path / "ember"))  # where a GGUF import would go
    assert resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct") == snapshot


def test_export_replaces_a_folder_with_named_chat_templates(tmp_path):
    """transformers 5 saves named chat templates in additional_chat_templates/: re-exporting over
    such a model folder was refused as holding foreign files."""
    folder = _save(tmp_path, "named")
    (folder / "additional_chat_templates").mkdir()
    (folder / "additional_chat_templates" / "tool_use.jinja").write_text("{{ tools }}")
    model, _ = load_pretrained(folder)
    save_pretrained(model, folder)
    assert not (folder / "additional_chat_templates").exists()  # replaced as a whole
    (folder / "notes.txt").write_text("mine")  # not a model's file: kept, as transformers does
    save_pretrained(model, folder)
    assert (folder / "notes.txt").read_text() == "mine" and (folder / "model.safetensors").is_file()


def test_custom_code_of_an_unknown_model_type_is_refused_without_running_it(tmp_path):
    """A model only its repo's code implements (auto_map, an unknown model_type): transformers
    refuses it without trust_remote_code, Ember refuses it naming the custom code, and neither
    runs the code."""
    folder = _save(tmp_path, "custom")
    path = folder / "config.json"
    auto = {"AutoConfig": "configuration_frob.FrobConfig",
            "AutoModelForCausalLM": "modeling_frob.FrobForCausalLM"}
    path.write_text(json.dumps({**json.loads(path.read_text()), "auto_map": auto,
                                "model_type": "frob", "architectures": ["FrobForCausalLM"]}))
    for name in ("configuration_frob.py", "modeling_frob.py"):
        (folder / name).write_text("raise SystemExit('remote code ran')\n")
    with pytest.raises(ValueError, match="trust_remote_code"):
        transformers.AutoConfig.from_pretrained(folder, trust_remote_code=False)
    with pytest.raises(EmberError, match="model_type 'frob' is not supported.*custom modeling "
                                         "code.*never runs"):
        load_pretrained(folder)


_TYPES = ["sliding_attention", "full_attention"]
GENERATION_CASES = {  # families whose KV-cache decoding had no transformers generate() oracle
    "mistral_window": ("MistralConfig", dict(sliding_window=5)),
    "ministral_types_hd": ("MinistralConfig", dict(head_dim=16, sliding_window=5,
                                                   layer_types=_TYPES)),
    "qwen2_mixed_sliding": ("Qwen2Config", dict(use_sliding_window=True, sliding_window=5,
                                                max_window_layers=1)),
    "qwen3_window_hd": ("Qwen3Config", dict(head_dim=16, use_sliding_window=True,
                                            sliding_window=5, max_window_layers=0)),
    "gemma_mqa": ("GemmaConfig", dict(head_dim=16, num_key_value_heads=1)),
    "phi3_window": ("Phi3Config", dict(**PHI3, sliding_window=5)),
}


@pytest.mark.parametrize("case", list(GENERATION_CASES))
def test_greedy_generation_matches_transformers_generate(tmp_path, case, one_thread):
    """A left-padded batch of prompts of different lengths, decoded with the KV cache for 12
    tokens, past the sliding window (5) where the family has one: each row's tokens are those
    of transformers' ``generate(do_sample=False)`` on that prompt alone."""
    cls, kw = GENERATION_CASES[case]
    assert_greedy_equals_transformers(_save(tmp_path, case, cls, **kw),
                                      [_ids(n)[0, :n].tolist() for n in (9, 3, 13)])


def assert_greedy_equals_transformers(folder, prompts: list[list[int]], new: int = 12) -> None:
    """Ember's batched (left-padded, KV-cache) greedy tokens for ``prompts`` equal transformers'
    ``generate(do_sample=False)`` (eager attention) on each prompt alone."""
    from ember.models.generate import generate_ids

    model, _ = load_pretrained(folder)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = transformers.AutoModelForCausalLM.from_pretrained(
            folder, attn_implementation="eager").eval()
    out = generate_ids(model, prompts, max_new_tokens=new)
    for prompt, got in zip(prompts, out, strict=True):
        with torch.no_grad():
            want = hf.generate(torch.tensor([prompt]), max_new_tokens=new, do_sample=False,
                               eos_token_id=None, pad_token_id=0)[0, len(prompt):]
        assert got == want.tolist()


@pytest.mark.parametrize("head", ["equal", "last_differs", "signed_zero", "nan", "bf16",
                                  "bf16_differs", "bin_differs"])
def test_tied_stored_head_compared_in_row_blocks(tmp_path, monkeypatch, head):
    """The stored head is compared with the embedding a few rows at a time (not two V x D
    tensors and their fp32 copies), as values: -0.0 equals 0.0 (tied), a NaN equals nothing
    (untied), a difference in the last row of the last block unties."""
    from ember.models import safetensors_io

    monkeypatch.setattr(safetensors_io, "_HEAD_BLOCK_BYTES", 3 * BASE["hidden_size"] * 4)
    folder = _save(tmp_path, "tied", tie_word_embeddings=True)
    sd = load_file(folder / "model.safetensors")
    emb = sd["model.embed_tokens.weight"]
    emb[3, 1], emb[-1, 0] = 0.0, 1.0
    sd["lm_head.weight"] = lm = emb.clone()
    if head == "last_differs":
        lm[-1, -1] += 1
    elif head == "signed_zero":
        lm[3, 1] = -0.0
    elif head == "nan":
        emb[-1, 0], lm[-1, 0] = float("nan"), float("nan")
    elif head.startswith("bf16"):  # a bf16 embedding beside an fp32 head; or both bf16
        sd["model.embed_tokens.weight"] = emb = emb.bfloat16()
        sd["lm_head.weight"] = lm = emb.float() if head == "bf16" else emb.clone()
        lm[-1, -1] += 0 if head == "bf16" else 1
    if head == "bin_differs":
        lm[-1, -1] += 1
        (folder / "model.safetensors").unlink()
        torch.save(sd, folder / "pytorch_model.bin")
    else:
        save_file(sd, folder / "model.safetensors", metadata={"format": "pt"})
    cfg = read_config(folder)
    ckpt = safetensors_io.scan_checkpoint(folder)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = safetensors_io.untie_if_head_differs(ckpt, cfg)
    assert out.tie_word_embeddings == (head in ("equal", "signed_zero", "bf16"))
