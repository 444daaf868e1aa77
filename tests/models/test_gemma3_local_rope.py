"""Gemma 3 with scaled RoPE on its sliding layers (transformers 5: ``rope_parameters`` per layer
type) against transformers: logits past the original context, the export read back, and the
kinds Ember does not run on sliding layers refused naming them."""

from __future__ import annotations

import json

import pytest
import torch

from ember import EmberError
from ember.models.loading import load_pretrained, read_config, save_pretrained
from ember.models.transformer import Transformer
from tests.models.test_interop_hf import BASE, _hf_logits, randomize_

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.filterwarnings("ignore:.*no tokenizer.json")

FULL = {"rope_type": "default", "rope_theta": 10000.0}
LOCAL = {
    "linear": {"rope_type": "linear", "factor": 4.0},
    "llama3": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8,
    },
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
}


def _save(tmp_path, name, local, full=FULL):
    config = transformers.Gemma3TextConfig(
        **{**BASE, "head_dim": 12},
        sliding_window=6,
        layer_types=["sliding_attention", "full_attention"],
        rope_parameters={
            "full_attention": full,
            "sliding_attention": {**local, "rope_theta": 1000.0},
        },
    )
    model = transformers.AutoModelForCausalLM.from_config(config)
    randomize_(model, 3)
    model.save_pretrained(tmp_path / name)
    return tmp_path / name


def _close(a, b):
    return (a - b).abs().max().item() <= 1e-5 * max(1.0, b.abs().max().item())


@pytest.mark.parametrize(
    "kind,full",
    [
        ("linear", FULL),
        ("llama3", FULL),
        ("yarn", FULL),
        # both layer types scaled, each its own way
        (
            "linear",
            {
                "rope_type": "yarn",
                "factor": 2.0,
                "original_max_position_embeddings": 16,
                "rope_theta": 10000.0,
            },
        ),
    ],
)
def test_scaled_rope_on_sliding_layers_matches_transformers(tmp_path, kind, full):
    """Was refused ("RoPE scaling on Gemma 3's sliding-attention layers is not supported")."""
    folder = _save(tmp_path, kind, LOCAL[kind], full)
    model, _ = load_pretrained(folder)
    assert model.cfg.rope_local_scaling.kind == kind
    ids = torch.randint(0, BASE["vocab_size"], (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, ref = model(ids), _hf_logits(folder, ids)
        assert _close(ours, ref)
        unscaled = Transformer(model.cfg.replace(rope_local_scaling=None))
        unscaled.load_state_dict(model.state_dict())
        assert not _close(unscaled(ids), ref)  # the sliding layers' scaling shows
    save_pretrained(model, tmp_path / "export")
    raw = json.loads((tmp_path / "export" / "config.json").read_text())
    assert raw["rope_parameters"]["sliding_attention"]["rope_type"] == kind
    assert read_config(tmp_path / "export") == model.cfg
    assert _close(ours, _hf_logits(tmp_path / "export", ids))


def _rewrite_local(folder, local):
    path = folder / "config.json"
    raw = json.loads(path.read_text())
    raw["rope_parameters"]["sliding_attention"] = {**local, "rope_theta": 1000.0}
    path.write_text(json.dumps(raw))


@pytest.mark.parametrize("key", ["rope_type", "type"])
@pytest.mark.parametrize(
    "local",
    [
        {"rope_type": "dynamic", "factor": 2.0},
        {
            "rope_type": "longrope",
            "short_factor": [1.0] * 6,
            "long_factor": [2.0] * 6,
            "original_max_position_embeddings": 16,
        },
    ],
)
def test_sequence_dependent_rope_on_sliding_layers_is_refused(tmp_path, local, key):
    """The legacy key "type" (transformers 5 honours it in a per-layer-type dict) is refused as
    "rope_type" is (was: a message about rope_local_scaling / rope_local_theta)."""
    folder = _save(tmp_path, "m", {"rope_type": "linear", "factor": 2.0})
    kind = local["rope_type"]
    _rewrite_local(folder, {key: kind, **{k: v for k, v in local.items() if k != "rope_type"}})
    with pytest.raises(EmberError, match=f"sliding_attention.*{kind}"):
        load_pretrained(folder)


def test_legacy_type_key_on_sliding_layers_matches_transformers(tmp_path):
    """{"type": "yarn", "truncate": false} in sliding_attention: transformers 5 builds the yarn
    table from "type" and truncates (the flag is read beside the per-layer-type dicts); Ember
    read the kind from "rope_type" only, kept truncate=false and its inv_freq differed by 0.049.
    A partial_rotary_factor beside it is refused as it is with "rope_type"."""
    folder = _save(tmp_path, "m", LOCAL["yarn"])
    yarn = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}
    _rewrite_local(folder, {**yarn, "truncate": False})
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder).model.rotary_emb
    with pytest.warns(UserWarning, match="truncate=false"):
        model, _ = load_pretrained(folder)
    assert model.cfg.rope_local_scaling.kind == "yarn"
    assert model.cfg.rope_local_scaling.truncate
    torch.testing.assert_close(model.inv_freq_local, hf.sliding_attention_inv_freq)
    _rewrite_local(folder, {**yarn, "partial_rotary_factor": 0.5})
    with pytest.raises(EmberError, match="partial_rotary_factor.*sliding_attention"):
        load_pretrained(folder)


def test_gguf_export_refuses_scaled_sliding_rope(tmp_path):
    """llama.cpp's gemma3 has no key for a scaling of the sliding layers' RoPE: refused naming
    the field, not written as an unscaled table."""
    from ember.models.gguf_export import save_gguf
    from ember.models.tokenizer import tokenizer_from_gguf
    from tests.models.test_gguf import VOCAB, tiny_tokenizer_md

    folder = _save(tmp_path, "m", LOCAL["linear"])
    model, _ = load_pretrained(folder)
    model = Transformer(
        model.cfg.replace(  # llama.cpp's layer pattern: both layers slide
            vocab_size=VOCAB, tie_word_embeddings=True, layer_types=("sliding_attention",) * 2
        )
    )
    with pytest.raises(EmberError, match="rope_local_scaling"):
        save_gguf(
            model.init_weights(std=0.1, seed=0),
            tokenizer_from_gguf(tiny_tokenizer_md()),
            tmp_path / "m.gguf",
        )


def test_unused_sliding_rope_scaling_warns(tmp_path):
    """No layer slides: transformers never builds the sliding table, so its scaling is unused
    and an export writes the default RoPE there. Was dropped silently; now a warning says so,
    as the equivalent drop of an unused full-attention LongRoPE does."""
    config = transformers.Gemma3TextConfig(
        **{**BASE, "head_dim": 12},
        sliding_window=6,
        layer_types=["full_attention"] * 2,
        rope_parameters={"full_attention": FULL, "sliding_attention": {**LOCAL["yarn"]}},
    )
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "m")
    with pytest.warns(UserWarning, match="sliding_attention.*'yarn'.*unused.*default RoPE"):
        model, _ = load_pretrained(tmp_path / "m")
    assert model.cfg.rope_local_scaling is None
    save_pretrained(model, tmp_path / "export")
    raw = json.loads((tmp_path / "export" / "config.json").read_text())
    assert raw["rope_parameters"]["sliding_attention"]["rope_type"] == "default"
