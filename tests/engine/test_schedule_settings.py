"""Optimizer and schedule settings against transformers: each name of ``get_scheduler`` /
TrainingArguments' ``optim`` that Ember gives is refused with the Ember setting that gives it,
and that setting's lr is transformers' at every step (the oracle); bad numbers are refused; a
setting a schedule ignores, and a warmup as long as the run, are said."""

from __future__ import annotations

import pytest

from ember import EmberError
from ember.engine.config import HF_SCHEDULE_NAMES, OptimConfig
from ember.engine.runtime import lr_factor
from ember.engine.trainer import train
from tests.engine._tiny import hf_lr_factors, rows_of, tiny_config

# transformers' name and kwargs (peak lr 1), Ember's (schedule, min_lr_ratio)
CASES = [("polynomial", dict(power=1.0, lr_end=0.1), ("linear", 0.1)),
         ("polynomial", dict(power=1.0, lr_end=0.0), ("linear", 0.0)),
         ("cosine_with_min_lr", dict(min_lr_rate=0.2), ("cosine", 0.2)),
         ("cosine_with_min_lr", dict(min_lr=0.3), ("cosine", 0.3)),
         ("constant_with_warmup", {}, ("constant", 0.0))]


@pytest.mark.parametrize("name,kw,ours", CASES)
def test_the_named_equivalent_is_transformers_schedule(name, kw, ours):
    """The setting the refusal names gives transformers' lr at every step (linear decay to
    lr * min_lr_ratio is transformers' polynomial schedule of power 1 to lr_end)."""
    schedule, min_ratio = ours
    assert schedule in HF_SCHEDULE_NAMES[name] and (not min_ratio
                                                    or "min_lr_ratio" in HF_SCHEDULE_NAMES[name])
    for total, warmup in [(10, 2), (7, 0), (37, 4), (3, 1), (12, 11)]:
        hf = hf_lr_factors(name, total, warmup, **kw)
        got = [lr_factor(k, total, warmup, schedule, min_ratio) for k in range(total)]
        assert got == pytest.approx(hf, rel=1e-12, abs=1e-12), (total, warmup)


@pytest.mark.parametrize("name", sorted(HF_SCHEDULE_NAMES))
def test_transformers_names_are_refused_with_the_ember_setting(name):
    """transformers' name given as optim.schedule (a config ported from TrainingArguments)
    was refused with the list of Ember's names only; now the message says which Ember setting
    gives that schedule."""
    with pytest.raises(EmberError, match=f"'{name}' is transformers' lr_scheduler_type; in "
                                         "Ember: .*schedule = "):
        OptimConfig(schedule=name)


def test_min_lr_ratio_with_a_constant_schedule_is_said():
    """schedule "constant" never decays: a min_lr_ratio given with it was silently ignored; the
    run now says so (``unused_settings``, as for other ignored keys)."""
    from ember.engine.config import load_config
    from ember.engine.config_doc import unused_settings

    notes = unused_settings(load_config(None, ['optim.schedule="constant"',
                                               "optim.min_lr_ratio=0.1"]))
    assert notes == ['optim.min_lr_ratio ignored: it sets where a "cosine" / "linear" decay '
                     'ends, and optim.schedule = "constant" never decays']
    assert unused_settings(load_config(None, ['optim.schedule="linear"',
                                              "optim.min_lr_ratio=0.1"])) == []
    assert unused_settings(load_config(None, ['optim.schedule="constant"'])) == []


@pytest.mark.parametrize("name,ours", [("adamw_torch", "adamw"), ("adamw_torch_fused", "adamw"),
                                       ("adamw_bnb_8bit", "adamw_8bit"),
                                       ("paged_adamw_8bit", "adamw_8bit")])
def test_transformers_optim_names_are_refused_with_the_ember_name(name, ours):
    """TrainingArguments' optim (a name transformers takes) given as optim.name: refused with
    Ember's name of the same update (was: the list of Ember's names only)."""
    from transformers.training_args import OptimizerNames

    assert name in {o.value for o in OptimizerNames}
    with pytest.raises(EmberError, match=f"'{name}' is transformers' optim; in Ember: "
                                         f"optim.name = '{ours}'"):
        OptimConfig(name=name)
    OptimConfig(name=ours)


@pytest.mark.parametrize("key,value", [("weight_decay", -0.1), ("weight_decay", float("nan")),
                                       ("weight_decay", float("inf")), ("eps", 0.0),
                                       ("eps", float("nan")), ("max_grad_norm", -1.0),
                                       ("max_grad_norm", float("nan"))])
def test_bad_optimizer_numbers_are_named(key, value):
    """Each bad value is refused naming its key and value; NaN passed the old checks (a NaN
    weight decay or clipping norm turned every weight NaN at the first step)."""
    with pytest.raises(EmberError, match=rf"optim\.{key} must be a finite number .*got"):
        OptimConfig(**{key: value})
    OptimConfig(max_grad_norm=float("inf"))  # no clipping, as 0


def test_a_warmup_as_long_as_the_run_is_said(tiny, tmp_path):
    """max_steps = 1 with the default warmup_ratio (0.05: 1 warmup step, rounded up as
    transformers does): the step is at lr 0, as transformers' schedule gives it, so the run
    trains nothing; it said nothing."""
    said = []
    train(tiny_config(tiny, tmp_path / "r", f'data.train=["{tiny["small"]}"]', "max_steps=1",
                      'method="full"', "eval.metrics=[]", "eval.before=false",
                      "eval.val_loss=false", "checkpoint.save_final=false"),
          echo=said.append, progress=False)
    assert [r["lr"] for r in rows_of(tmp_path / "r") if r["kind"] == "train"] == [0.0]
    assert hf_lr_factors("cosine", 1, 1) == [0.0]
    notes = [m for m in said if "covers the whole" in m]
    assert len(notes) == 1 and "nothing trains" in notes[0], said
