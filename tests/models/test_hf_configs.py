"""config.json variations of published checkpoints against transformers: activations and Gemma 3's
attention softcap, each read as transformers 5 computes it (logits <= 1e-4, fp32, and Ember's
export loads back with the same logits) or refused with an EmberError that names the field."""

from __future__ import annotations

import dataclasses
import json
import warnings

import pytest
import torch

from ember import EmberError
from ember.models.loading import load_pretrained, save_pretrained
from ember.models.transformer import Transformer
from tests.models.test_interop_hf import PHI3, _assert_parity_and_export, _ids, _save

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.filterwarnings("ignore:.*no tokenizer.json")


@pytest.mark.parametrize(
    "cls,key,act,ours",
    [
        ("LlamaConfig", "hidden_act", "gelu_pytorch_tanh", "gelu_tanh"),
        ("Qwen2Config", "hidden_act", "gelu_new", "gelu_tanh"),
        ("Phi3Config", "hidden_act", "gelu_fast", "gelu_tanh"),
        ("MistralConfig", "hidden_act", "swish", "silu"),
        ("Gemma2Config", "hidden_activation", "gelu_new", "gelu_tanh"),
    ],
)
def test_activations_ember_computes_load_and_export(tmp_path, cls, key, act, ours):
    """transformers' other names of SiLU and the tanh GELU; non-Gemma families with the tanh GELU
    (any family takes any hidden_act) used to be refused, "swish" and "gelu_new" everywhere."""
    folder = _save(tmp_path, f"{cls}-{act}", cls, **(PHI3 if cls == "Phi3Config" else {}),
                   **{key: act})
    model, _ = load_pretrained(folder)
    assert model.cfg.activation == ours
    _assert_parity_and_export(model, folder, _ids(), tmp_path)


@pytest.mark.parametrize(
    "cls,change,needle",
    [
        # (any other ACT2FN name loads: tests/models/test_activations.py)
        ("LlamaConfig", {"hidden_act": "prelu"}, "hidden_act 'prelu' is not supported"),
        ("Gemma2Config", {"hidden_activation": "xielu"}, "hidden_activation 'xielu' is not"),
        # transformers 5's Gemma computes hidden_act (SiLU here); Ember used to read
        # hidden_activation first and compute the tanh GELU, silently different
        ("GemmaConfig", {"hidden_act": "silu", "hidden_activation": "gelu_pytorch_tanh"},
         "hidden_act 'silu' and hidden_activation 'gelu_pytorch_tanh' differ"),
        # 4.x computed hidden_activation (exact GELU), 5.x hidden_act (the tanh GELU)
        ("GemmaConfig", {"hidden_act": "gelu", "hidden_activation": "gelu"}, "differ"),
    ],
)
def test_activations_ember_cannot_compute_are_refused(tmp_path, cls, change, needle):
    folder = _save(tmp_path, "act", cls)
    path = folder / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **change}))
    with pytest.raises(EmberError, match=needle):
        load_pretrained(folder)


def test_gemma3_attn_logit_softcapping_is_ignored_as_transformers_does(tmp_path):
    """transformers' Gemma 3 attention never applies attn_logit_softcapping (it applies the final
    logit cap); Ember applied both, so logits differed from transformers'."""
    folder = _save(tmp_path, "gemma3", "Gemma3TextConfig", sliding_window=5,
                   attn_logit_softcapping=2.0, final_logit_softcapping=3.0)
    with pytest.warns(UserWarning, match="attn_logit_softcapping=2.0 is ignored"):
        model, _ = load_pretrained(folder)
    assert model.cfg.attn_softcap is None and model.cfg.final_softcap == 3.0
    ids = _ids()
    _assert_parity_and_export(model, folder, ids, tmp_path)
    capped = Transformer(model.cfg.replace(attn_softcap=2.0))
    capped.load_state_dict(model.state_dict())
    with torch.no_grad():  # the cap bites on these weights: applying it would show
        assert (capped(ids) - model(ids)).abs().max().item() > 1e-2


@pytest.mark.parametrize(
    "cls,field",
    [("Phi3Config", "rms_norm_eps"), ("LlamaConfig", "rms_norm_eps"),
     ("Gemma2Config", "rms_norm_eps"), ("Qwen2Config", "initializer_range")],
)
def test_fields_a_config_json_omits_take_transformers_class_defaults(tmp_path, cls, field):
    """A config.json without rms_norm_eps: Phi3Config's default is 1e-5 (the other families'
    1e-6); Ember used 1e-6 for every family. Without initializer_range, the export wrote 0.02, so
    the exported config read back differently."""
    folder = _save(tmp_path, cls, cls, **(PHI3 if cls == "Phi3Config" else {}))
    path = folder / "config.json"
    raw = json.loads(path.read_text())
    del raw[field]
    path.write_text(json.dumps(raw))
    model, _ = load_pretrained(folder)
    assert model.cfg.rms_norm_eps == (raw.get("rms_norm_eps")
                                      or getattr(transformers, cls)().rms_norm_eps)
    _assert_parity_and_export(model, folder, _ids(), tmp_path)


@pytest.mark.parametrize("archs", [["LLaMAForCausalLM"], ["MistralForCausalLM"], ["LlamaModel"]])
def test_architectures_is_read_as_automodelforcausallm_reads_it(tmp_path, archs):
    """AutoModelForCausalLM builds the model from model_type, whatever architectures says (old
    Llama conversions: "LLaMAForCausalLM"); Ember refused any other name. A bare LlamaModel (no
    "model." prefix, no head) stays refused."""
    folder = _save(tmp_path, "llama")
    path = folder / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "architectures": archs}))
    if archs == ["LlamaModel"]:
        with pytest.raises(EmberError, match="architectures \\['LlamaModel'\\] is not supported"):
            load_pretrained(folder)
        return
    with pytest.warns(UserWarning, match="loading it as model_type 'llama'"):
        model, _ = load_pretrained(folder)
    _assert_parity_and_export(model, folder, _ids(), tmp_path)


def test_early_llama_conversion_config_loads(tmp_path):
    """The first Llama conversions' config.json: pad_token_id -1 (no pad token; was refused as
    negative) and max_sequence_length (transformers ignores it; was refused as unknown)."""
    folder = _save(tmp_path, "llama1")
    path = folder / "config.json"
    raw = {**json.loads(path.read_text()), "pad_token_id": -1, "max_sequence_length": 2048}
    path.write_text(json.dumps(raw))
    model, _ = load_pretrained(folder)
    assert model.cfg.pad_token_id is None
    _assert_parity_and_export(model, folder, _ids(), tmp_path)


def test_gemma3_yarn_truncate_false_is_ignored_as_transformers_does(tmp_path):
    """transformers 5's YaRN reads ``truncate`` from the top level of rope_parameters, which for
    Gemma 3 holds the per-layer-type dicts, so a full-attention YaRN with truncate=false still
    truncates; Ember applied the flag and its logits differed from transformers' (by ~2 here)."""
    yarn = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4, "truncate": False,
            "original_max_position_embeddings": 16, "beta_fast": 7.3, "beta_slow": 1.7}
    folder = _save(tmp_path, "gemma3_yarn", "Gemma3TextConfig", hidden_size=128,
                   num_attention_heads=2, num_key_value_heads=1, head_dim=64, sliding_window=5,
                   layer_types=["sliding_attention", "full_attention"],
                   rope_parameters={"full_attention": yarn,
                                    "sliding_attention": {"rope_type": "default",
                                                          "rope_theta": 1e4}})
    with pytest.warns(UserWarning, match="truncate=false is ignored"):
        model, _ = load_pretrained(folder)
    assert model.cfg.rope_scaling.truncate
    ids = _ids(40)
    _assert_parity_and_export(model, folder, ids, tmp_path)
    untruncated = Transformer(model.cfg.replace(
        rope_scaling=dataclasses.replace(model.cfg.rope_scaling, truncate=False)))
    untruncated.load_state_dict(model.state_dict())
    with torch.no_grad():  # the flag matters on this config: applying it would show
        assert (untruncated(ids) - model(ids)).abs().max().item() > 1e-2
    with pytest.raises(EmberError, match="truncate=False"):
        save_pretrained(untruncated, tmp_path / "untruncated")


MINISTRAL_TYPES = ["sliding_attention", "full_attention", "sliding_attention"]


@pytest.mark.parametrize("model_type", ["ministral", "mistral"])
def test_ministral_windows_per_layer_load_and_export(tmp_path, model_type):
    """Ministral (Mistral with the sliding window on the layers ``layer_types`` marks): model_type
    "ministral", or "mistral" with layer_types, which transformers' AutoConfig loads as
    ministral (Ministral-8B's config.json). Both were refused ('layer_types' not supported /
    unknown model_type); now transformers' logits, and the export loads back alike."""
    cls = "MinistralConfig" if model_type == "ministral" else "MistralConfig"
    folder = _save(tmp_path, model_type, cls, num_hidden_layers=3, head_dim=12, sliding_window=5,
                   layer_types=MINISTRAL_TYPES)
    raw = json.loads((folder / "config.json").read_text())
    assert (raw["model_type"], raw["layer_types"]) == (model_type, MINISTRAL_TYPES)
    model, _ = load_pretrained(folder)
    assert model.cfg.layer_types == tuple(MINISTRAL_TYPES) and model.cfg.sliding_window == 5
    _assert_parity_and_export(model, folder, _ids(20), tmp_path)
    out = json.loads((tmp_path / "export" / "config.json").read_text())
    assert (out["model_type"], out["layer_types"]) == (model_type, MINISTRAL_TYPES)
    uniform = Transformer(model.cfg.replace(layer_types=None))  # the window on every layer
    uniform.load_state_dict(model.state_dict())
    with torch.no_grad():  # the per-layer window matters here: ignoring it would show
        assert (uniform(_ids(20)) - model(_ids(20))).abs().max().item() > 1e-2


def test_ministral_without_sliding_layers_exports_a_config_transformers_runs(tmp_path):
    """A ministral config.json whose layer_types slide nowhere: transformers' Ministral builds its
    sliding mask whatever the layers say, so it needs a sliding_window; Ember's export wrote
    null (there is no window to keep) and transformers' forward on it raised "Could not find a
    `sliding_window` argument in the config"."""
    folder = _save(tmp_path, "ministral", "MinistralConfig", head_dim=12, sliding_window=5,
                   layer_types=["full_attention", "full_attention"])
    model, _ = load_pretrained(folder)
    assert model.cfg.sliding_window is None and model.cfg.layer_types is None
    _assert_parity_and_export(model, folder, _ids(), tmp_path)
    out = json.loads((tmp_path / "export" / "config.json").read_text())
    assert out["model_type"] == "ministral" and out["layer_types"] == ["full_attention"] * 2


def test_mixtral_layer_types_stays_refused(tmp_path):
    """Mistral's layer_types is not Mixtral's: transformers' Mixtral has no per-layer windows."""
    folder = _save(tmp_path, "mixtral", "MixtralConfig", num_local_experts=4,
                   num_experts_per_tok=2, sliding_window=5)
    path = folder / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()),
                                "layer_types": ["sliding_attention", "full_attention"]}))
    with pytest.raises(EmberError, match=r"\['layer_types'\] are not supported for model_type "
                                         "'mixtral'"):
        load_pretrained(folder)


@pytest.mark.parametrize("cls", ["LlamaConfig", "GemmaConfig", "GraniteConfig", "Olmo2Config"])
@pytest.mark.parametrize("window", [None, 4])
def test_sliding_window_families_without_one_ignore_it(tmp_path, cls, window):
    """transformers' Llama/Gemma/Granite/OLMo2 attention never reads config.sliding_window (some
    Llama conversions carry one, often null); it was refused as an unknown field. Ember now
    computes what transformers computes (no window, checked at 20 tokens > 4), with a warning
    when the value is not null."""
    folder = _save(tmp_path, f"{cls}-{window}", cls)
    path = folder / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "sliding_window": window}))
    if window is None:
        model, _ = load_pretrained(folder)
    else:
        with pytest.warns(UserWarning, match="sliding_window=4 is ignored"):
            model, _ = load_pretrained(folder)
    assert model.cfg.sliding_window is None
    _assert_parity_and_export(model, folder, _ids(20), tmp_path)


def test_bookkeeping_fields_of_other_tools_load(tmp_path):
    """Unsloth's merged checkpoints carry unsloth_version (some unsloth_fixed), hub snapshots
    _commit_hash, older transformers _attn_implementation: none changes the computation, and
    each was refused as an unknown field."""
    folder = _save(tmp_path, "unsloth", "LlamaConfig")
    path = folder / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "unsloth_version": "2025.3.19",
                                "unsloth_fixed": True, "_commit_hash": "0" * 40,
                                "_attn_implementation": "sdpa"}))
    model, _ = load_pretrained(folder)
    _assert_parity_and_export(model, folder, _ids(), tmp_path)


def test_smollm3_published_max_window_layers_loads(tmp_path):
    """SmolLM3-3B's config.json carries max_window_layers (28), which transformers' SmolLM3
    never reads; Ember refused the published checkpoint as an unknown field."""
    folder = _save(tmp_path, "smollm3", "SmolLM3Config", num_hidden_layers=4,
                   no_rope_layer_interval=4, use_sliding_window=False, sliding_window=None,
                   pad_token_id=0)
    path = folder / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "max_window_layers": 28}))
    model, _ = load_pretrained(folder)
    assert model.cfg.nope_layers == (3,)
    _assert_parity_and_export(model, folder, _ids(20), tmp_path)


@pytest.mark.parametrize("cls,key", [("LlamaConfig", "rope_theta"),
                                     ("Gemma3TextConfig", "rope_local_base_freq")])
@pytest.mark.parametrize("theta", [-1.0, 0.0])
def test_a_rope_base_transformers_turns_into_nan_is_refused(tmp_path, cls, key, theta):
    """rope_theta <= 0 (or Gemma 3's local base): transformers' frequencies base ** (-2i / d)
    are NaN / inf, and so are its logits; Ember loaded the config and computed NaN too."""
    kw = {"sliding_window": 5} if cls == "Gemma3TextConfig" else {}
    folder = _save(tmp_path, "theta", cls, **kw)
    path = folder / "config.json"
    raw = json.loads(path.read_text())
    raw.pop("rope_parameters", None)
    path.write_text(json.dumps({**raw, key: theta}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        assert not hf(_ids(20)).logits.isfinite().all()
    with pytest.raises(EmberError, match=f"rope_theta must be a positive finite number.*{theta}"):
        load_pretrained(folder)


@pytest.mark.parametrize("cls", ["Qwen2MoeConfig", "Qwen3MoeConfig"])
def test_moe_mlp_only_layers_null_is_no_dense_layer(tmp_path, cls):
    """mlp_only_layers: null is transformers' default ([]: every layer sparse); Ember refused
    the config ("must be a list of layer indices")."""
    folder = _save(tmp_path, cls, cls, num_experts=4, num_experts_per_tok=2,
                   moe_intermediate_size=24, shared_expert_intermediate_size=32)
    path = folder / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "mlp_only_layers": None}))
    model, _ = load_pretrained(folder)
    assert model.cfg.mlp_only_layers == ()
    _assert_parity_and_export(model, folder, _ids(), tmp_path)


@pytest.mark.parametrize("cls", ["GemmaConfig", "Gemma2Config", "Phi3Config"])
def test_an_omitted_pad_token_id_takes_transformers_class_default(tmp_path, cls):
    """A config.json without pad_token_id: transformers' Gemma / Gemma 2 / Phi-3 default it (0,
    32000) and build the embedding with that padding_idx, so looking the pad token up adds
    nothing to its row's gradient. Ember read no pad token and trained that row."""
    kw = dict(PHI3, vocab_size=32064) if cls == "Phi3Config" else {}
    folder = _save(tmp_path, cls, cls, **kw)
    path = folder / "config.json"
    raw = json.loads(path.read_text())
    del raw["pad_token_id"]
    path.write_text(json.dumps(raw))
    pad = getattr(transformers, cls)().pad_token_id
    model, _ = load_pretrained(folder)
    assert model.cfg.pad_token_id == pad is not None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = transformers.AutoModelForCausalLM.from_pretrained(folder)
    ids = _ids()
    ids[:, ::3] = pad  # the pad token is looked up
    w = torch.randn(*ids.shape, hf.config.vocab_size, generator=torch.Generator().manual_seed(0))
    (hf(ids).logits * w).sum().backward()
    (model(ids) * w).sum().backward()
    want = hf.model.embed_tokens.weight.grad
    assert (model.embed.weight.grad - want).abs().max().item() <= 1e-4 * want.abs().max().item()


@pytest.mark.parametrize("cls", ["Gemma2Config", "Gemma3TextConfig"])
def test_gemma_sliding_layers_without_a_window_are_refused(tmp_path, cls):
    """sliding_window null with sliding layers (the default pattern): transformers' forward
    fails building their mask; Ember computed full attention there and exported a folder
    transformers cannot run."""
    folder = _save(tmp_path, cls, cls, sliding_window=5)
    path = folder / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "sliding_window": None}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = transformers.AutoModelForCausalLM.from_pretrained(folder)
    with pytest.raises(TypeError):
        hf(_ids())
    with pytest.raises(EmberError, match="sliding_window is null but layer_types"):
        load_pretrained(folder)


_SIZES = dict(vocab_size=32, hidden_size=16, intermediate_size=24, num_layers=1, num_heads=2,
              num_kv_heads=1)


@pytest.mark.parametrize("name,value", [("num_kv_heads", 0), ("num_heads", 0), ("hidden_size", 0),
                                        ("head_dim", 0), ("vocab_size", -1), ("num_layers", 0),
                                        ("intermediate_size", 0), ("num_heads", 2.5),
                                        ("sliding_window", 0)])
def test_invalid_sizes_are_a_clear_error_not_zero_division(name, value):
    """ModelConfig built directly with a zero / negative / fractional size used to raise a raw
    ZeroDivisionError (num_kv_heads=0, num_heads=0) or build a model that fails later (a
    sliding_window of 0 in the attention kernel's words, at the first forward)."""
    from ember.models.config import ModelConfig

    with pytest.raises(EmberError, match=f"ModelConfig.{name} must be a positive integer"):
        ModelConfig(**{**_SIZES, name: value})



@pytest.mark.parametrize("eps", [0.0, -1e-6, float("inf"), float("nan")])
def test_an_rms_norm_eps_the_norm_refuses_is_named_when_the_config_loads(eps):
    """rms_norm_eps 0 (or negative, inf, NaN): the model built and then failed at its first
    forward, inside rms_norm; a layernorm model (Phi) takes eps 0 as torch's LayerNorm does."""
    from ember.models.config import ModelConfig

    with pytest.raises(ValueError, match="rms_norm_eps must be > 0 and finite"):
        ModelConfig(**_SIZES, rms_norm_eps=eps)
    ModelConfig(**_SIZES, rms_norm_eps=0.0, norm="layernorm")


_YARN = {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}
_LLAMA3 = {"rope_type": "llama3", "rope_theta": 1e4, "factor": 4.0, "low_freq_factor": 1.0,
           "high_freq_factor": 4.0}


@pytest.mark.parametrize("cls,rope", [
    ("LlamaConfig", _YARN),
    ("Qwen3Config", {**_YARN, "original_max_position_embeddings": 32}),
    ("MistralConfig", {**_LLAMA3, "original_max_position_embeddings": 32}),
])
def test_a_top_level_original_context_overrides_the_rope_dict_s_as_in_transformers(
        tmp_path, cls, rope):
    """transformers 5.24 builds every family's RoPE from a flat llama3 / yarn / longrope dict
    whose original_max_position_embeddings is the config's top-level field when config.json
    has one (``standardize_rope_params``, run again as the model is built), over the dict's
    own value. Ember read the top-level field for phi3 only and took the dict's (else
    max_position_embeddings, 64): logits differed from transformers' by 0.5-2."""
    folder = _save(tmp_path, cls, cls, rope_parameters=rope)
    path = folder / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()),
                                "original_max_position_embeddings": 8}))
    model, _ = load_pretrained(folder)
    assert model.cfg.rope_scaling.original_max_position_embeddings == 8
    _assert_parity_and_export(model, folder, _ids(20), tmp_path)


@pytest.mark.parametrize("rope", [
    {"rope_parameters": {"rope_type": "yarn", "factor": 4.0,
                         "original_max_position_embeddings": 8}},
    # a legacy rope_scaling replaces rope_parameters whole, its rope_theta included
    {"rope_parameters": {"rope_type": "default", "rope_theta": 5e3},
     "rope_scaling": {"rope_type": "linear", "factor": 2.0}},
])
def test_mixtral_rope_dict_without_a_base_takes_mixtral_s_default(tmp_path, rope):
    """transformers fills a rope dict's missing rope_theta from the config class's default,
    1e6 for Mixtral; Ember took Mixtral's default only when config.json had no rope_parameters
    at all, else Llama's 1e4: logits differed by 1.7."""
    # head_dim: transformers' Mixtral YaRN fails without one
    folder = _save(tmp_path, "mixtral", "MixtralConfig", num_local_experts=4,
                   num_experts_per_tok=2, head_dim=16)
    path = folder / "config.json"
    raw = {k: v for k, v in json.loads(path.read_text()).items()
           if k not in ("rope_theta", "rope_parameters")}
    path.write_text(json.dumps({**raw, **rope}))
    model, _ = load_pretrained(folder)
    assert model.cfg.rope_theta == 1e6
    _assert_parity_and_export(model, folder, _ids(20), tmp_path)
