"""A resume rebuilds the frozen models an objective builds (distillation's teacher, DPO's / KTO's
reference: a full fine-tune's frozen copy of model.name, a continued adapter's copy of
model.init) from their files; a checkpoint records a fingerprint of each, so one whose files
changed since the stop is refused naming its setting (was: the run went on silently against
another teacher / reference). The files are rewritten by safetensors (the tool they come from):
one tensor changed is refused; the same weights in other file bytes resume. A checkpoint
written before the fingerprints (no ``frozen`` entry) still resumes."""

from __future__ import annotations

import shutil

import pytest
from safetensors.torch import load_file, save_file

from ember import EmberError
from ember.engine.trainer import train
from tests.engine._tiny import make_tiny_model, quiet, tiny_config

FAST = ("max_steps=3", "eval.metrics=[]", "eval.val_loss=false", "checkpoint.save_final=false")


def _changed(file, part: str):
    """Rewrite one tensor of a safetensors file (the first whose name holds ``part``) scaled by
    1.01; returns a function that writes the original weights back in other file bytes."""
    weights = load_file(file)
    key = next(k for k in sorted(weights) if part in k)
    save_file({**weights, key: weights[key] * 1.01}, file, metadata={"format": "pt"})
    return lambda: save_file(weights, file, metadata={"format": "pt", "note": "rewritten"})


def _refused_then_resumes(cfg, file, part: str, match: str) -> None:
    assert train(cfg, echo=quiet, progress=False, stop_after=1).steps == 1
    restore = _changed(file, part)
    with pytest.raises(EmberError, match=match):
        train(cfg, resume=True, echo=quiet, progress=False)
    restore()
    assert train(cfg, resume=True, echo=quiet, progress=False).steps == 3


def test_a_resume_onto_another_teacher_is_refused(tiny, tmp_path):
    teacher = make_tiny_model(tmp_path / "teacher", seed=1)
    cfg = tiny_config(tiny, tmp_path / "r", 'objective="distill"', f'distill.teacher="{teacher}"',
                      *FAST)
    _refused_then_resumes(cfg, teacher / "model.safetensors", "layers.1.self_attn.q_proj",
                          r"teacher \(distill\.teacher .*\) differs from the one its checkpoint")


@pytest.mark.parametrize("objective", ["dpo", "kto"])
def test_a_full_finetune_resumed_onto_another_reference_is_refused(tiny, prefs, tmp_path,
                                                                    objective):
    """Full fine-tuning trains every weight (no base fingerprint to catch it): its reference is
    a frozen copy of model.name, read again at a resume."""
    model = shutil.copytree(tiny["model"], tmp_path / "model")
    cfg = tiny_config(dict(tiny, model=str(model), train=prefs, val=prefs, test=prefs),
                      tmp_path / "r", 'method="full"', f'objective="{objective}"',
                      "data.max_seq_len=32", "data.tokens_per_batch=96", "optim.lr=1e-3", *FAST)
    _refused_then_resumes(cfg, model / "model.safetensors", "layers.1.self_attn.q_proj",
                          r"reference \(.*model\.name .*\) differs from the one its checkpoint")


def test_a_lora_reference_is_the_base_fingerprinted_already(tiny, prefs, tmp_path):
    """With LoRA the reference is the base under switched-off adapters: the base fingerprint
    (state.base_fingerprint) refuses a resume onto other base weights, naming model.name."""
    model = shutil.copytree(tiny["model"], tmp_path / "model")
    cfg = tiny_config(dict(tiny, model=str(model), train=prefs, val=prefs, test=prefs),
                      tmp_path / "r", 'objective="dpo"', "data.tokens_per_batch=96", *FAST)
    _refused_then_resumes(cfg, model / "model.safetensors", "layers.1.self_attn.q_proj",
                          r"model\.name .*\) differ from those its checkpoint")


def test_a_checkpoint_without_fingerprints_still_resumes(tiny, prefs, tmp_path, monkeypatch):
    """A checkpoint an older Ember wrote (no ``frozen`` entry) resumes, whatever the files."""
    from ember.engine.objectives import SFT

    model = shutil.copytree(tiny["model"], tmp_path / "model")
    cfg = tiny_config(dict(tiny, model=str(model), train=prefs, val=prefs, test=prefs),
                      tmp_path / "r", 'method="full"', 'objective="dpo"', "data.max_seq_len=32",
                      "data.tokens_per_batch=96", "optim.lr=1e-3", *FAST)
    with monkeypatch.context() as m:
        m.setattr(SFT, "fingerprints", lambda self, model: {})
        assert train(cfg, echo=quiet, progress=False, stop_after=1).steps == 1
    _changed(model / "model.safetensors", "layers.1.self_attn.q_proj")
    assert train(cfg, resume=True, echo=quiet, progress=False).steps == 3


def test_a_continued_adapter_resumed_onto_another_reference_is_refused(tiny, prefs, tmp_path):
    """DPO after an SFT adapter (model.init): the reference is that adapter as loaded; the
    checkpoint holds the trained adapter only, so a resume reads model.init again."""
    sft = tmp_path / "sft"
    train(tiny_config(tiny, sft, "max_steps=2", "optim.lr=1e-2", "eval.metrics=[]",
                      "eval.val_loss=false", f'data.train=["{tiny["small"]}"]'),
          echo=quiet, progress=False)
    cfg = tiny_config(dict(tiny, train=prefs, val=prefs, test=prefs), tmp_path / "r",
                      'objective="dpo"', f'model.init="{sft}"', "data.tokens_per_batch=96",
                      *FAST)
    _refused_then_resumes(cfg, sft / "final" / "adapter" / "adapter_model.safetensors", "lora_B",
                          r"reference \(.*model\.init .*\) differs from the one its checkpoint")


@pytest.mark.parametrize("objective,method,match", [
    ("dpo", "full", r"reference \(.*model\.name .*\) differs from the one its checkpoint"),
    ("kto", "lora", r"model\.name .*\) differ from those its checkpoint"),
])
def test_a_changed_reference_is_refused_before_the_precompute(tiny, prefs, tmp_path,
                                                               monkeypatch, objective, method,
                                                               match):
    """precompute_ref_log_probs scores every document with the reference before the first
    step: a resume onto changed files is refused before that pass and before the data is read
    (was: after it, minutes of a real model's forwards spent on a run then refused)."""
    from ember.engine import preference_reference, trainer

    model = shutil.copytree(tiny["model"], tmp_path / "model")
    cfg = tiny_config(dict(tiny, model=str(model), train=prefs, val=prefs, test=prefs),
                      tmp_path / "r", f'method="{method}"', f'objective="{objective}"',
                      f"{objective}.precompute_ref_log_probs=true", "data.max_seq_len=32",
                      "data.tokens_per_batch=96", "optim.lr=1e-3", *FAST)
    assert train(cfg, echo=quiet, progress=False, stop_after=1).steps == 1
    _changed(model / "model.safetensors", "layers.1.self_attn.q_proj")
    spent = []
    real_score, real_data = preference_reference.attach_ref_logps, trainer.Trainer._datasets
    monkeypatch.setattr(preference_reference, "attach_ref_logps",
                        lambda *a, **k: spent.append("precompute") or real_score(*a, **k))
    monkeypatch.setattr(trainer.Trainer, "_datasets",
                        lambda *a, **k: spent.append("data") or real_data(*a, **k))
    with pytest.raises(EmberError, match=match):
        train(cfg, resume=True, echo=quiet, progress=False)
    assert spent == []
