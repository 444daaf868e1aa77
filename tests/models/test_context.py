"""Context extension (models/context.py): Ember's linear / YaRN scaling of a model's RoPE gives
transformers' logits for the same rope_scaling, beyond the original context; the exported config
carries it (the engine side: tests/engine/test_context_extension.py)."""

from __future__ import annotations

import json
import re

import pytest
import torch
import transformers

from ember import EmberError
from ember.models.config import RopeScaling
from ember.models.context import extend_context
from ember.models.hf_config import config_from_hf
from ember.models.hf_config_export import config_to_hf
from ember.models.loading import load_pretrained, save_pretrained
from tests.models.test_hf import BASE, LLAMA3, VOCAB, _randomize

T = 150  # > the original context of 64


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    config = transformers.LlamaConfig(**BASE, hidden_size=48)
    model = transformers.AutoModelForCausalLM.from_config(config)
    _randomize(model, seed=11)
    out = tmp_path_factory.mktemp("ctx") / "llama"
    model.save_pretrained(out)
    return out


def _hf(folder, rope: dict | None, max_pos: int):
    config = transformers.AutoConfig.from_pretrained(folder)
    if rope is not None:
        config.rope_parameters = {**config.rope_parameters, **rope}  # (Phi: partial_rotary_factor)
    config.max_position_embeddings = max_pos
    return transformers.AutoModelForCausalLM.from_pretrained(
        folder, config=config, attn_implementation="eager").eval()


@pytest.mark.parametrize("kind", ["linear", "yarn"])
@torch.no_grad()
def test_matches_transformers_beyond_the_original_context(folder, tmp_path, kind):
    ids = torch.randint(0, VOCAB, (1, T), generator=torch.Generator().manual_seed(2))
    with pytest.warns(UserWarning, match="tokenizer"):
        model, _ = load_pretrained(folder, "float32")
    plain = model(ids)
    extend_context(model, kind, 4.0)
    assert model.cfg.max_position_embeddings == 256
    assert all(b.attn.cfg is model.cfg for b in model.layers)
    hf = _hf(folder, {"rope_type": kind, "factor": 4.0, "original_max_position_embeddings": 64},
             256)
    want = hf(ids).logits
    torch.testing.assert_close(model(ids), want, rtol=1e-4, atol=1e-4)
    assert (plain - want).abs().max() > 1e-2  # the scaling matters at these positions
    # exported: transformers reads the scaling from config.json, a later Ember load too
    save_pretrained(model, tmp_path / "out")
    rp = json.loads((tmp_path / "out" / "config.json").read_text())["rope_parameters"]
    assert rp["rope_type"] == kind and rp["factor"] == 4.0
    back = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "out", attn_implementation="eager").eval()
    torch.testing.assert_close(back(ids).logits, want, rtol=1e-4, atol=1e-4)
    with pytest.warns(UserWarning, match="tokenizer"):
        again, _ = load_pretrained(tmp_path / "out", "float32")
    cfg = again.cfg
    assert extend_context(again, kind, 4.0).cfg is cfg  # already extended: unchanged
    assert (cfg.rope_scaling.kind, cfg.rope_scaling.factor, cfg.max_position_embeddings) == (
        kind, 4.0, 256)
    torch.testing.assert_close(again(ids), want, rtol=1e-4, atol=1e-4)


def test_refusals(tmp_path):
    config = transformers.LlamaConfig(**BASE, hidden_size=48, rope_parameters=LLAMA3)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "l3")
    with pytest.warns(UserWarning, match="tokenizer"):
        model, _ = load_pretrained(tmp_path / "l3", "float32")
    with pytest.raises(EmberError, match="already scales RoPE \\(llama3"):
        extend_context(model, "yarn", 2.0)
    for factor in (1.0, "2", float("inf"), float("nan"), True):  # "2": was a TypeError
        with pytest.raises(EmberError, match="must be > 1"):
            extend_context(model, "linear", factor)
    with pytest.raises(EmberError, match="use one of linear, yarn"):
        extend_context(model, "dynamic", 2.0)


def _refuses_extension(folder, family: str, config):
    """A random model of ``config`` saved by transformers and loaded here, whose linear and yarn
    context extensions are refused naming ``family``."""
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    with pytest.warns(UserWarning, match="tokenizer"):
        model, _ = load_pretrained(folder, "float32")
    for kind in ("linear", "yarn"):
        with pytest.raises(EmberError, match=f"context extension of {re.escape(family)} is not "
                                             "supported"):
            extend_context(model, kind, 2.0)
    return model


def test_phi3_takes_longrope_only(tmp_path):
    """transformers' Phi-3 validates rope_parameters to default / longrope: a linear context
    extension exported a config.json that transformers refused to load (and loading such a
    config here computed what transformers would not)."""
    model = _refuses_extension(tmp_path / "p3", "Phi-3",
                               transformers.Phi3Config(**BASE, hidden_size=48, pad_token_id=0))
    scaled = model.cfg.replace(rope_scaling=RopeScaling(kind="linear", factor=2.0))
    with pytest.raises(EmberError, match="linear RoPE scaling \\(transformers' Phi-3 takes"):
        config_to_hf(scaled)
    path = tmp_path / "p3" / "config.json"
    raw = json.loads(path.read_text())
    with pytest.raises(Exception, match="must be one of \\[.longrope.\\]"):  # the oracle
        transformers.Phi3Config(**{**raw, "rope_scaling": {"rope_type": "linear", "factor": 2.0}})
    with pytest.raises(EmberError, match="rope type 'linear' is not one transformers' Phi-3"):
        config_from_hf({**raw, "rope_scaling": {"rope_type": "linear", "factor": 2.0}})


@torch.no_grad()
def test_phi2_linear_extension_matches_transformers(tmp_path):
    """Phi-1/2 read and write RoPE scaling over their partial rotary width (it was refused, as
    their config.json was read without it): a linear extension gives transformers' logits past
    the original context and exports a config transformers loads; YaRN stays refused on a
    partially rotary model."""
    config = transformers.PhiConfig(**{k: v for k, v in BASE.items() if k != "rms_norm_eps"},
                                    hidden_size=48)
    hf = transformers.AutoModelForCausalLM.from_config(config)
    _randomize(hf, seed=12)
    hf.save_pretrained(tmp_path / "phi")
    with pytest.warns(UserWarning, match="tokenizer"):
        model, _ = load_pretrained(tmp_path / "phi", "float32")
    with pytest.raises(EmberError, match="YaRN context extension on a partially rotary"):
        extend_context(model, "yarn", 2.0)
    ids = torch.randint(0, VOCAB, (1, T), generator=torch.Generator().manual_seed(3))
    plain = model(ids)
    extend_context(model, "linear", 4.0)
    want = _hf(tmp_path / "phi", {"rope_type": "linear", "factor": 4.0}, 256)(ids).logits
    torch.testing.assert_close(model(ids), want, rtol=1e-4, atol=1e-4)
    assert (plain - want).abs().max() > 1e-2  # the scaling matters at these positions
    save_pretrained(model, tmp_path / "out")
    back = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "out", attn_implementation="eager").eval()
    torch.testing.assert_close(back(ids).logits, want, rtol=1e-4, atol=1e-4)
