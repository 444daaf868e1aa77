"""A run stopped after step 1 and resumed with ``ember train RUN_DIR --resume`` rebuilds its
model from model.name's config.json: a checkpoint records the model's architecture (the
``ModelConfig`` it was trained as: the MLP activation, Gemma 3's scaled sliding-layer RoPE...),
so a resume onto a config.json edited since is refused naming each field (was: only the
weights were fingerprinted, and the run went on silently as another model); the same config
resumes and its final export keeps the activation and the sliding layers' RoPE."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

from ember import EmberError
from ember.engine.cli import main
from ember.engine.trainer import train
from tests.engine._tiny import make_tiny_model, quiet, tiny_config

FAST = ("max_steps=2", "eval.metrics=[]", "eval.val_loss=false")
LOCAL = {"rope_type": "yarn", "rope_theta": 1000.0, "factor": 2.0}


def _gemma3(tmp_path):
    """The tiny fixture's tokenizer beside a random 2-layer Gemma 3 (relu2 MLP, YaRN-scaled
    sliding layers) of its vocabulary."""
    folder = make_tiny_model(tmp_path / "model")
    vocab = json.loads((folder / "config.json").read_text())["vocab_size"]
    cfg = transformers.Gemma3TextConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, sliding_window=4,
        layer_types=["sliding_attention", "full_attention"], hidden_activation="relu2",
        rope_parameters={"sliding_attention": LOCAL,
                         "full_attention": {"rope_type": "default", "rope_theta": 1e4}},
        max_position_embeddings=256, eos_token_id=1, pad_token_id=0)  # fmt: skip
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(folder)
    return folder


def test_resume_keeps_the_activation_and_sliding_rope(tiny, tmp_path):
    model = _gemma3(tmp_path)
    cfg = tiny_config(dict(tiny, model=str(model)), tmp_path / "r", *FAST)
    assert train(cfg, echo=quiet, progress=False, stop_after=1).steps == 1
    ckpt = max((tmp_path / "r" / "checkpoints").glob("step_*"))
    arch = torch.load(ckpt / "extra.pt", weights_only=True)["model_config"]
    assert arch["activation"] == "relu2"
    assert arch["rope_local_scaling"]["kind"] == "yarn" and arch["rope_local_theta"] == 1000.0
    assert main(["train", str(tmp_path / "r"), "--resume"]) == 0
    assert json.loads((tmp_path / "r" / "final" / "run_end.json").read_text())["step"] == 2
    assert main(["export", str(tmp_path / "r"), "--merged", str(tmp_path / "merged")]) == 0
    final = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert final["hidden_activation"] == "relu2"
    assert {k: final["rope_parameters"]["sliding_attention"][k] for k in LOCAL} == LOCAL


@pytest.mark.parametrize(("field", "value", "named"), [
    ("hidden_activation", "gelu_pytorch_tanh", "activation"),
    ("rope_parameters", {"sliding_attention": {"rope_type": "default", "rope_theta": 1000.0},
                         "full_attention": {"rope_type": "default", "rope_theta": 1e4}},
     "rope_local_scaling"),
])  # fmt: skip
def test_resume_onto_an_edited_config_is_refused(tiny, tmp_path, field, value, named):
    model = _gemma3(tmp_path)
    cfg = tiny_config(dict(tiny, model=str(model)), tmp_path / "r", *FAST)
    assert train(cfg, echo=quiet, progress=False, stop_after=1).steps == 1
    raw = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**raw, field: value}))
    with pytest.raises(EmberError, match=f"cannot resume .*config.json.*{named}"):
        train(cfg, resume=True, echo=quiet, progress=False)
