"""A run read back (``ember eval`` / ``export`` / ``generate --run``: ``state.load_run_model``)
re-reads the base its adapter / frozen layers apply to from model.name: one whose files changed
since the run is refused naming the model (was: the trained adapter silently combined with the
other base). A checkpoint records the base's fingerprint, a final adapter ``final/base.json``;
the same weights in other file bytes load, and a final adapter written before base.json loads as
before (a checkpoint is checked by the resume's fingerprint, which checkpoints held already)."""

from __future__ import annotations

import json
import shutil

import pytest
from safetensors.torch import load_file, save_file

from ember import EmberError
from ember.engine.state import load_run_model
from ember.engine.trainer import train
from tests.engine._tiny import quiet, tiny_config

FAST = ("max_steps=2", "eval.metrics=[]", "eval.val_loss=false", "checkpoint.every_steps=1")


def _changed(file):
    """Rewrite one tensor of a safetensors file scaled by 1.01 (a retrained / requantized model
    saved over it); returns a function that writes the original weights back in other bytes."""
    weights = load_file(file)
    key = next(k for k in sorted(weights) if "layers.1.self_attn.q_proj" in k)
    save_file({**weights, key: weights[key] * 1.01}, file, metadata={"format": "pt"})
    return lambda: save_file(weights, file, metadata={"format": "pt", "note": "rewritten"})


def _trained_on_a_copy(tiny, tmp_path, *sets):
    """(the model folder, the run directory) of a run trained on a copy of the tiny model,
    which the test then changes."""
    model = shutil.copytree(tiny["model"], tmp_path / "model")
    run = tmp_path / "r"
    train(tiny_config(dict(tiny, model=str(model)), run, *FAST, *sets), echo=quiet,
          progress=False)
    return model, run


@pytest.mark.parametrize("method", ["lora", "prompt"])
def test_a_run_over_a_changed_base_is_refused(tiny, tmp_path, method):
    model, run = _trained_on_a_copy(tiny, tmp_path, f'method="{method}"')
    assert json.loads((run / "final" / "base.json").read_text())["model"] == str(model)
    load_run_model(run, "cpu")
    restore = _changed(model / "model.safetensors")
    with pytest.raises(EmberError, match=rf"base model {model}.*differ.*final/adapter"):
        load_run_model(run, "cpu")
    (run / "final" / "base.json").unlink()  # a run written before it: loads as before
    load_run_model(run, "cpu")
    shutil.rmtree(run / "final")  # the newest checkpoint's trained weights instead
    with pytest.raises(EmberError, match=rf"base model {model}.*differ.*checkpoints/step_0*2 was"):
        load_run_model(run, "cpu")
    restore()
    load_run_model(run, "cpu")


def test_a_pissa_checkpoint_is_checked_by_the_files_its_residual_comes_from(
    tiny, tmp_path, monkeypatch
):
    """The residual base recomputed on another device may differ in its last bits (its resume
    fingerprint then too): the base files are the same, so the run loads; other files do not."""
    model, run = _trained_on_a_copy(tiny, tmp_path, 'lora.init="pissa"',
                                    "checkpoint.save_final=false", 'lora.targets=["q"]')
    with monkeypatch.context() as m:
        m.setattr("ember.engine.state.base_fingerprint", lambda *a, **k: "another residual")
        load_run_model(run, "cpu")
    restore = _changed(model / "model.safetensors")
    with pytest.raises(EmberError, match=rf"base model {model}.*differs from the one"):
        load_run_model(run, "cpu")
    # trained on a GPU: the files' fingerprint is the same on any device, still refused
    toml = run / "config.toml"
    toml.write_text(toml.read_text().replace('device = "cpu"', 'device = "cuda"'))
    assert 'device = "cuda"' in toml.read_text()
    with pytest.raises(EmberError, match=rf"base model {model}.*differs from the one"):
        load_run_model(run, "cpu")
    restore()
    # a checkpoint with only the residual's fingerprint (as before base_files): it may round
    # otherwise on a CPU, so a warning
    monkeypatch.setattr("ember.engine.run_model._recorded_prints", lambda *a: {"base": "cuda's"})
    with pytest.warns(UserWarning, match="or only seems to: the run computed its residual base"):
        load_run_model(run, "cpu")


def test_best_weights_are_checked_by_the_runs_checkpoint(tiny, tmp_path):
    """eval.early_stopping without a final export: the best evaluation's weights (best/, which
    record no fingerprint) are checked against the run's newest checkpoint's."""
    model, run = _trained_on_a_copy(tiny, tmp_path, "checkpoint.save_final=false",
                                    "eval.val_loss=true", 'eval.early_stopping="val_loss"',
                                    "eval.every_steps=1")
    load_run_model(run, "cpu")
    _changed(model / "model.safetensors")
    with pytest.raises(EmberError, match=r"differs from the one .*best/step_0*\d was trained"):
        load_run_model(run, "cpu")
