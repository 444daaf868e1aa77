"""Interop regressions against transformers on checkpoints as other tools write them: each case
either matches transformers' logits (fp32, <= 1e-4) or is refused with an EmberError that names
the feature."""

from __future__ import annotations

import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

from ember.models.loading import load_pretrained

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.filterwarnings("ignore:.*no tokenizer.json")

VOCAB = 96
BASE = dict(
    vocab_size=VOCAB,
    hidden_size=48,
    intermediate_size=72,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    rms_norm_eps=1e-5,
)


def _save(tmp_path, name: str, config_cls: str = "LlamaConfig", **kw):
    """A tiny random transformers model (every weight randomized, norms around 1), saved."""
    config = getattr(transformers, config_cls)(**{**BASE, **kw})
    model = transformers.AutoModelForCausalLM.from_config(config)
    g = torch.Generator().manual_seed(len(name))
    with torch.no_grad():
        for n, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.2 * noise if "norm" in n else 0.1 * noise)
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
