"""model.rope_scaling / model.rope_factor in runs: every path that rebuilds a run's model (run
directory, merged export) has the extended context; documents longer than a model's context are
warned about. The scaling itself is checked against transformers in
tests/models/test_context.py."""

from __future__ import annotations

import json
import shutil

import pytest

from ember import EmberError
from ember.engine.cli import main
from ember.engine.state import load_run_model
from ember.engine.trainer import train
from tests.engine._tiny import tiny_config


def test_runs_train_and_reload_with_it(tiny, tmp_path):
    ext = ('model.rope_scaling="yarn"', "model.rope_factor=2.0", "max_steps=1", "eval.metrics=[]")
    for method in ("lora", "full"):
        run = tmp_path / method
        train(tiny_config(tiny, run, f'method="{method}"', *ext), echo=lambda *a: None,
              progress=False)
        model, _, _ = load_run_model(run, "cpu")
        rs = model.cfg.rope_scaling
        assert (rs.kind, rs.factor, rs.original_max_position_embeddings) == ("yarn", 2.0, 256)
        assert model.cfg.max_position_embeddings == 512
    assert main(["export", str(tmp_path / "lora"), "--merged", str(tmp_path / "merged")]) == 0
    rp = json.loads((tmp_path / "merged" / "config.json").read_text())["rope_parameters"]
    assert rp["rope_type"] == "yarn" and rp["original_max_position_embeddings"] == 256

    short = tmp_path / "short"
    shutil.copytree(tiny["model"], short)
    cfg = json.loads((short / "config.json").read_text())
    (short / "config.json").write_text(json.dumps({**cfg, "max_position_embeddings": 8}))
    said = []
    train(tiny_config(tiny, tmp_path / "w", f'model.name="{short}"', "max_steps=1",
                      "eval.metrics=[]", "eval.before=false"), echo=said.append, progress=False)
    assert any("longer than the model's context (8 tokens" in s and "rope_factor" in s
               for s in said)


@pytest.mark.parametrize("sets, match", [
    (('model.rope_scaling="yarn"',), "go together"),
    (('model.rope_scaling="ntk"', "model.rope_factor=2.0"), "model.rope_scaling must be one of"),
    (('model.rope_scaling="linear"', "model.rope_factor=0.5"), "must be > 1"),
])
def test_config_errors(tiny, tmp_path, sets, match):
    with pytest.raises(EmberError, match=match):
        tiny_config(tiny, tmp_path, *sets)
