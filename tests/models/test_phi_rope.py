"""Phi-1/1.5/2 (transformers' PhiForCausalLM) with RoPE scaling and an own ``head_dim``, against
transformers 5 on tiny random models: every RoPE type transformers computes for phi (linear,
dynamic NTK, YaRN, LongRoPE, Llama-3's), each over the partially rotated width, and
head_dim != hidden / heads (without q/k LayerNorms, which transformers sizes hidden / heads).
Logits (fp32, <= 1e-4) on both sides of the original context, the export (config.json that
transformers reloads to the same logits), greedy generation with the KV cache across the
switch, and a gradient. These configs were refused ("RoPE scaling ... is not supported for
model_type 'phi'", "head_dim=... differs")."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch

from ember import EmberError
from ember.models.generate import generate_ids
from ember.models.hf import config_from_hf
from ember.models.loading import load_pretrained, read_config, save_pretrained
from tests.models.test_longrope import _hf_load as _hf
from tests.models.test_longrope import _ids

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.filterwarnings("ignore:.*no tokenizer.json")

VOCAB, ORIG, MAX_POS = 96, 16, 32
BASE = dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=72, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=MAX_POS,
            bos_token_id=1, eos_token_id=2)


def _longrope(n: int) -> dict:
    return dict(rope_type="longrope", original_max_position_embeddings=ORIG,
                short_factor=[round(1 + 0.15 * i, 3) for i in range(n)],
                long_factor=[round(1.5 + 1.25 * i, 3) for i in range(n)])


# name -> (partial_rotary_factor, head_dim or None, rope dict without theta / partial)
CASES = {
    "linear": (0.5, None, dict(rope_type="linear", factor=2.0)),
    "dynamic": (0.4, None, dict(rope_type="dynamic", factor=2.0)),
    "yarn": (0.5, None, dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=8)),
    "longrope": (0.5, None, _longrope(3)),  # rotary dim int(12 * 0.5) = 6: 3 frequencies
    "llama3": (1.0, None, dict(rope_type="llama3", factor=4.0, low_freq_factor=1.0,
                               high_freq_factor=4.0, original_max_position_embeddings=ORIG)),
    "head_dim": (0.5, 20, dict(rope_type="default")),  # 4 heads of 20 on a 48-wide model
    "head_dim_longrope": (0.4, 20, _longrope(4)),  # rotary dim 8
}


def _hf_model(tmp_path, case: str):
    prf, hd, rope = CASES[case]
    kw = {} if hd is None else dict(head_dim=hd)
    config = transformers.PhiConfig(**BASE, **kw, rope_parameters=dict(
        rope, rope_theta=100.0, partial_rotary_factor=prf))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = transformers.PhiForCausalLM(config)
    g = torch.Generator().manual_seed(len(case))
    with torch.no_grad():
        for n, p in hf.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.2 * noise if "layernorm.weight" in n else 0.15 * noise)
    hf.save_pretrained(tmp_path / "hf")
    return _hf(tmp_path / "hf"), tmp_path / "hf"


def _err(ours, hf, ids) -> float:
    with torch.no_grad():
        return (ours(ids) - hf(ids).logits).abs().max().item()


@pytest.mark.parametrize("case", list(CASES))
def test_phi_rope_scaling_and_head_dim_match_transformers(tmp_path, case):
    """T = 12 (inside the original context), 20 (past it: LongRoPE's long table) and 40 (past
    max_position_embeddings: dynamic NTK's grown base); then the export and generation."""
    hf, folder = _hf_model(tmp_path, case)
    model, _ = load_pretrained(folder)
    prf, hd, rope = CASES[case]
    assert model.cfg.partial_rotary_factor == prf and model.cfg.model_type == "phi"
    assert model.cfg.head_dim == (hd or 12)
    kind = rope["rope_type"]
    assert (model.cfg.rope_scaling.kind if model.cfg.rope_scaling else "default") == kind
    for T in (12, 20, 40):
        assert _err(model, hf, _ids(T)) <= 1e-4, T
    save_pretrained(model, tmp_path / "export")
    assert read_config(tmp_path / "export") == model.cfg
    raw = json.loads((tmp_path / "export" / "config.json").read_text())
    assert raw["rope_parameters"]["rope_type"] == kind
    assert raw["rope_parameters"]["partial_rotary_factor"] == prf
    assert _err(model, _hf(tmp_path / "export"), _ids(40)) <= 1e-4
    # transformers 4.x's spelling of the export (rope_scaling + top-level fields) reads the same
    legacy = {k: v for k, v in raw.items() if k != "rope_parameters"}
    assert config_from_hf(legacy) == model.cfg
    prompt = _ids(10, 1)[0].tolist()  # generation crosses ORIG (LongRoPE's cache rebuild)
    with torch.no_grad():
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=14, do_sample=False,
                          eos_token_id=None, pad_token_id=0)[0, 10:].tolist()
    assert generate_ids(model, [prompt], max_new_tokens=14, eos_token_ids=()) == [ref]


def test_phi_longrope_gradient_matches_transformers(tmp_path):
    hf, folder = _hf_model(tmp_path, "head_dim_longrope")
    model, _ = load_pretrained(folder)
    ids = _ids(20, 1)
    loss_hf = hf(ids, labels=ids).loss
    logits = model(ids)
    loss = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:])
    assert abs(loss.item() - loss_hf.item()) <= 1e-5
    loss.backward()
    loss_hf.backward()
    ours = model.layers[0].attn.q_proj.weight.grad
    ref = hf.model.layers[0].self_attn.q_proj.weight.grad
    assert (ours - ref).abs().max().item() <= 1e-5 * max(1.0, ref.abs().max().item())


def test_phi_head_dim_with_qk_layernorm_stays_refused(tmp_path):
    """transformers sizes Phi's q/k LayerNorms hidden / heads: with another head_dim it cannot
    run the config, so Ember refuses it (loading and exporting)."""
    raw = transformers.PhiConfig(**BASE, head_dim=20, qk_layernorm=True).to_dict()
    with pytest.raises(RuntimeError), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        transformers.PhiForCausalLM(transformers.PhiConfig.from_dict(raw))(_ids(4))
    with pytest.raises(EmberError, match="head_dim=20 differs .* q/k LayerNorms"):
        config_from_hf(raw)
    cfg = config_from_hf({**raw, "qk_layernorm": False}).replace(qk_norm=True)
    from ember.models.hf import config_to_hf
    with pytest.raises(EmberError, match="head_dim=20 with q/k norms"):
        config_to_hf(cfg)


@pytest.mark.parametrize("family", ["phi", "llama", "qwen2", "gemma"])
def test_top_level_original_max_position_embeddings_is_read_as_transformers_builds_the_model(
        family):
    """A top-level ``original_max_position_embeddings`` outside Phi-3: transformers 5.24's
    config keeps the rope dict's value (or max_position_embeddings), but building the model
    standardizes the rope dict again and puts the top-level value over it, and the RoPE is
    computed from that. Ember used to read the config as without the field (the config object
    was its oracle), so its YaRN differed from the model's."""
    raw = dict(BASE, model_type=family, rope_scaling=dict(rope_type="yarn", factor=4.0))
    for rope in (None, raw["rope_scaling"]):
        plain = {k: v for k, v in raw.items() if rope or k != "rope_scaling"}
        extra = dict(plain, original_max_position_embeddings=ORIG // 2)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            hf = transformers.AutoModelForCausalLM.from_config(  # (it edits the rope dict)
                transformers.AutoConfig.for_model(**copy.deepcopy(extra)))
        want = hf.config.rope_parameters
        cfg = config_from_hf(extra)
        if rope is None:
            assert want["rope_type"] == "default" and cfg == config_from_hf(plain)
        else:
            assert want["original_max_position_embeddings"] == ORIG // 2
            assert cfg.rope_scaling.original_max_position_embeddings == ORIG // 2


def test_phi_yarn_with_top_level_original_context_matches_transformers(tmp_path):
    hf, folder = _hf_model(tmp_path, "yarn")
    raw = json.loads((folder / "config.json").read_text())
    # over the rope dict's 8 (transformers 5.24); 64 moves YaRN's correction range here, 16 not
    raw["original_max_position_embeddings"] = 64
    (folder / "config.json").write_text(json.dumps(raw))
    model, _ = load_pretrained(folder)
    assert model.cfg.rope_scaling.original_max_position_embeddings == 64
    assert _err(model, _hf(folder), _ids(20)) <= 1e-4


@pytest.mark.parametrize("family", ["phi", "phi3"])
def test_phi_odd_head_dim_with_an_even_rotary_part_matches_transformers(tmp_path, family):
    """hidden 40 over 8 heads: head_dim 5, of which int(5 * 0.4) = 2 dims rotate. transformers'
    Phi and Phi-3 rotate only that part (Phi sizes its q/k LayerNorms 5), so they run; Ember
    refused it ("head_dim must be even for RoPE"). Logits, every weight's gradient, the export."""
    kw = dict(BASE, hidden_size=40, num_attention_heads=8, num_key_value_heads=4,
              partial_rotary_factor=0.4)
    config = (transformers.PhiConfig(**kw, qk_layernorm=True) if family == "phi"
              else transformers.Phi3Config(**kw, pad_token_id=0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = transformers.AutoModelForCausalLM.from_config(config)
    hf.save_pretrained(tmp_path / "hf")
    hf = _hf(tmp_path / "hf")
    model, _ = load_pretrained(tmp_path / "hf")
    assert (model.cfg.head_dim, model.cfg.rotary_dim) == (5, 2)
    ids = _ids(12)
    logits, ref = model(ids), hf(ids, labels=ids)
    assert (logits - ref.logits).abs().max().item() <= 1e-4
    torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB),
                                      ids[:, 1:].reshape(-1)).backward()
    ref.loss.backward()
    from ember.models.hf import to_hf_state_dict
    ours = to_hf_state_dict({n: p.grad for n, p in model.named_parameters()}, model.cfg)
    theirs = dict(hf.named_parameters())
    assert set(ours) == set(theirs)
    diffs = {k: (g - theirs[k].grad).abs().max().item() for k, g in ours.items()}
    assert max(diffs.values()) <= 1e-5, {k: v for k, v in diffs.items() if v > 1e-5}
    save_pretrained(model, tmp_path / "export")
    assert read_config(tmp_path / "export") == model.cfg
    assert _err(model, _hf(tmp_path / "export"), ids) <= 1e-4


def test_an_odd_rotary_dim_on_phi3_is_refused_without_claiming_transformers_fails():
    """transformers' Phi-3 runs int(12 * 0.75) = 9 (5 frequencies over 10 dims); Ember's refusal
    said transformers could not run it."""
    cfg = transformers.Phi3Config(
        vocab_size=96, hidden_size=48, intermediate_size=72, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, pad_token_id=None, bos_token_id=1,
        eos_token_id=2, partial_rotary_factor=0.75)
    hf = transformers.Phi3ForCausalLM(cfg)
    assert hf(torch.tensor([[1, 2, 3]])).logits.isfinite().all()  # the oracle runs it
    with pytest.raises(EmberError, match=r"= 9 dims .* must be even; transformers' Phi-3 rotates"):
        config_from_hf(json.loads(cfg.to_json_string()))


def test_an_odd_rotary_dim_stays_refused_as_transformers_fails():
    """head_dim 5 fully rotated (Llama), or int(6 * 0.5) = 3 dims (Phi): transformers builds
    ceil(R / 2) frequencies, one more than the rotated half, and fails at the first forward."""
    llama = dict(BASE, model_type="llama", hidden_size=40, num_attention_heads=8,
                 num_key_value_heads=8)
    with pytest.raises(EmberError, match=r"= 5 dims .* must be even"):
        config_from_hf(llama)
    with pytest.raises(EmberError, match=r"= 3 dims .* must be even"):
        config_from_hf(dict(llama, model_type="phi", head_dim=6, partial_rotary_factor=0.5))
    with pytest.raises(RuntimeError), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        transformers.PhiForCausalLM(transformers.PhiConfig(
            **dict(BASE, head_dim=6), partial_rotary_factor=0.5))(_ids(4))
