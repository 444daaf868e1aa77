"""Optimizer and schedule settings against transformers: each name of ``get_scheduler`` /
TrainingArguments' ``optim`` that Ember gives is refused with the Ember setting that gives it,
and that setting's lr is transformers' at every step (the oracle); bad numbers are refused; a
setting a schedule ignores, and a warmup as long as the run, are said."""

from __future__ import annotations

import warnings

import pytest

from ember import EmberError
from ember.engine.config import OptimConfig
from ember.engine.runtime import length_note
from ember.engine.schedules import (
    HF_SCHEDULE_NAMES,
    HF_SCHEDULES_REFUSED,
    SCHEDULES,
    lr_factor,
    schedule_options,
    wsd_note,
)
from ember.engine.trainer import train
from tests.engine._tiny import hf_lr_factors, rows_of, tiny_config

# transformers' name and kwargs (peak lr 1), Ember's optim settings
CASES = [("polynomial", dict(power=1.0, lr_end=0.1), dict(schedule="linear", min_lr_ratio=0.1)),
         ("polynomial", dict(power=1.0, lr_end=0.0), dict(schedule="linear")),
         ("polynomial", dict(power=2.0, lr_end=0.1),
          dict(schedule="linear", decay_power=2.0, min_lr_ratio=0.1)),
         ("polynomial", dict(power=0.5), dict(schedule="linear", decay_power=0.5,
                                              min_lr_ratio=1e-7)),
         ("cosine_with_min_lr", dict(min_lr_rate=0.2), dict(schedule="cosine", min_lr_ratio=0.2)),
         ("cosine_with_min_lr", dict(min_lr=0.3), dict(schedule="cosine", min_lr_ratio=0.3)),
         ("constant_with_warmup", {}, dict(schedule="constant")),
         ("cosine_with_restarts", dict(num_cycles=3), dict(schedule="cosine", cycles=3)),
         ("cosine_with_restarts", dict(num_cycles=1), dict(schedule="cosine")),
         ("cosine_with_restarts", {}, dict(schedule="cosine")),
         *[("warmup_stable_decay", dict(num_decay_steps=3, decay_type=t, min_lr_ratio=m),
            dict(schedule="wsd", decay_steps=3, decay_type=t, min_lr_ratio=m))
           for t in ("linear", "cosine", "1-sqrt") for m in (0.0, 0.1)],
         ("warmup_stable_decay", dict(num_decay_steps=0), dict(schedule="wsd", decay_steps=0)),
         ("inverse_sqrt", {}, dict(schedule="inverse_sqrt")),
         ("inverse_sqrt", dict(timescale=5), dict(schedule="inverse_sqrt", timescale=5)),
         ("cosine_warmup_with_min_lr", dict(min_lr_rate=0.2),
          dict(schedule="cosine", schedule_shift=1, min_lr_ratio=0.2)),
         ("cosine_warmup_with_min_lr", dict(min_lr_rate=0.0),
          dict(schedule="cosine", schedule_shift=1, min_lr_ratio=0.0)),
         *[("warmup_stable_decay", dict(num_decay_steps=2, warmup_type=w, decay_type=t,
                                        min_lr_ratio=m),
            dict(schedule="wsd", decay_steps=2, warmup_type=w, decay_type=t, min_lr_ratio=m))
           for w in ("cosine", "1-sqrt") for t in ("linear", "1-sqrt") for m in (0.0, 0.1)],
         *[("warmup_stable_decay", dict(num_decay_steps=2, num_stable_steps=n, min_lr_ratio=0.1),
            dict(schedule="wsd", decay_steps=2, stable_steps=n, min_lr_ratio=0.1))
           for n in (0, 3, 40)],
         ("cosine", dict(num_cycles=1.0), dict(schedule="cosine", cosine_waves=1.0)),
         ("cosine", dict(num_cycles=0.3), dict(schedule="cosine", cosine_waves=0.3)),
         ("cosine_with_min_lr", dict(min_lr_rate=0.1, num_cycles=1.5),
          dict(schedule="cosine", min_lr_ratio=0.1, cosine_waves=1.5)),
         ("cosine_warmup_with_min_lr", dict(min_lr_rate=0.1, num_cycles=1.0),
          dict(schedule="cosine", schedule_shift=1, min_lr_ratio=0.1, cosine_waves=1.0)),
         *[("cosine_warmup_with_min_lr", dict(min_lr_rate=0.1, warmup_lr_rate=r),
            dict(schedule="cosine", schedule_shift=1, min_lr_ratio=0.1, warmup_start_ratio=r))
           for r in (0.0, 0.3)],
         ("warmup_stable_decay", dict(num_decay_steps=3, num_cycles=1.0, min_lr_ratio=0.1),
          dict(schedule="wsd", decay_steps=3, cosine_waves=1.0, min_lr_ratio=0.1))]


def _ours(settings: dict, total: int, warmup: int) -> list[float]:
    o = OptimConfig(**settings)
    shape = schedule_options(o, total, warmup)
    return [lr_factor(k, total, warmup, o.schedule, o.min_lr_ratio, **shape)
            for k in range(total)]


@pytest.mark.parametrize("name,kw,ours", CASES)
def test_the_named_equivalent_is_transformers_schedule(name, kw, ours):
    """The setting the refusal names gives transformers' lr at every step (linear decay to
    lr * min_lr_ratio is transformers' polynomial schedule of power 1 to lr_end). transformers'
    polynomial of another power, cosine_with_restarts, warmup_stable_decay and inverse_sqrt were
    refused or missing: now optim.decay_power, optim.cycles, schedule "wsd" (decay_steps /
    decay_ratio, decay_type, min_lr_ratio, which wsd's warmup starts from) and "inverse_sqrt"
    (timescale) give them, every step equal, the warmup too and a warmup as long as the run.
    This session: cosine_warmup_with_min_lr (optim.schedule_shift = 1), wsd's warmup_type and
    num_stable_steps, and num_cycles of the cosines other than 0.5 (optim.cosine_waves)."""
    if name in HF_SCHEDULE_NAMES:
        text = HF_SCHEDULE_NAMES[name]
        assert f'schedule = "{ours["schedule"]}"' in text
        assert all(f"optim.{k}" in text for k in ours if k != "schedule"), text
    for total, warmup in [(10, 2), (7, 0), (37, 4), (3, 1), (12, 11), (5, 5)]:
        if name == "polynomial" and total == warmup:
            continue  # transformers divides by total - warmup = 0 (never reached by a run)
        with warnings.catch_warnings():  # num_stable_steps with num_training_steps: it says so
            warnings.simplefilter("ignore", UserWarning)
            hf = hf_lr_factors(name, total, warmup, **kw)
        assert _ours(ours, total, warmup) == pytest.approx(hf, rel=1e-12, abs=1e-12), (
            total, warmup)


def test_wsd_decay_ratio_and_a_resume_with_another_length():
    """decay_ratio: the last ceil(ratio * steps) steps decay (as warmup_ratio's rounding); a
    resume with another max_steps follows the new length's schedule from there, as
    transformers' Trainer rebuilds its scheduler for the new num_training_steps."""
    settings = dict(schedule="wsd", decay_ratio=0.25, decay_type="linear", min_lr_ratio=0.1)
    for total in (10, 7, 37, 4):
        hf = hf_lr_factors("warmup_stable_decay", total, 2, num_decay_steps=-(-total // 4),
                           decay_type="linear", min_lr_ratio=0.1)
        assert _ours(settings, total, 2) == pytest.approx(hf, rel=1e-12, abs=1e-12), total
    before, after = _ours(settings, 10, 2), _ours(settings, 16, 2)
    hf = hf_lr_factors("warmup_stable_decay", 16, 2, num_decay_steps=4, decay_type="linear",
                       min_lr_ratio=0.1)
    assert after[5:] == pytest.approx(hf[5:], rel=1e-12) and before[5:] != after[5:10]


@pytest.mark.parametrize("settings,match", [
    (dict(cycles=0), "optim.cycles must be an integer >= 1"),
    (dict(cycles=1.5), "optim.cycles must be an integer >= 1"),
    (dict(decay_power=0.0), "optim.decay_power must be a finite number > 0"),
    (dict(decay_power=float("nan")), "optim.decay_power must be a finite number > 0"),
    (dict(decay_steps=-1), r"optim.decay_steps must be >= 0"),
    (dict(decay_ratio=1.5), r"optim.decay_ratio must be in \[0, 1\]"),
    (dict(decay_type="exp"), "optim.decay_type must be one of 'linear', 'cosine', '1-sqrt'"),
    (dict(timescale=0), "optim.timescale must be an integer >= 1"),
    (dict(warmup_type="exp"), "optim.warmup_type must be one of 'linear', 'cosine', '1-sqrt'"),
    (dict(stable_steps=-1), "optim.stable_steps must be an integer >= 0"),
    (dict(stable_steps=2.5), "optim.stable_steps must be an integer >= 0"),
    (dict(schedule_shift=2), "optim.schedule_shift must be 0 or 1"),
    (dict(cosine_waves=0.0), "optim.cosine_waves must be a finite number > 0"),
    (dict(warmup_start_ratio=1.5), r"optim.warmup_start_ratio must be in \[0, 1\]"),
    (dict(cosine_waves=float("inf")), "optim.cosine_waves must be a finite number > 0"),
    (dict(cycles=2, cosine_waves=1.0), "are two shapes: set one of them"),
    (dict(schedule="step"), "optim.schedule must be one of 'cosine', 'linear', 'constant', "
                            "'wsd', 'inverse_sqrt'")])
def test_bad_schedule_settings_are_named(settings, match):
    with pytest.raises(EmberError, match=match):
        OptimConfig(**settings)


def test_a_schedule_s_setting_given_to_another_is_said():
    """optim.cycles / decay_power / decay_* / timescale given with a schedule that has no use
    for them (a port of lr_scheduler_kwargs to the wrong schedule) is said, as min_lr_ratio with
    "constant"; so is min_lr_ratio with "inverse_sqrt" (it never decays to a floor)."""
    from ember.engine.config import load_config
    from ember.engine.config_doc import unused_settings

    def notes(*sets: str) -> list[str]:
        return unused_settings(load_config(None, list(sets)))

    assert notes('optim.schedule="linear"', "optim.cycles=3") == [
        'optim.cycles ignored: it applies to optim.schedule = "cosine"']
    assert notes("optim.decay_power=2.0") == [
        'optim.decay_power ignored: it applies to optim.schedule = "linear"']
    assert notes("optim.decay_steps=3", 'optim.decay_type="linear"') == [
        'optim.decay_steps, optim.decay_type ignored: they apply to optim.schedule = "wsd"']
    assert notes('optim.schedule="linear"', "optim.schedule_shift=1") == [
        'optim.schedule_shift ignored: it applies to optim.schedule = "cosine"']
    assert notes('optim.warmup_type="cosine"', "optim.stable_steps=3") == [
        'optim.stable_steps, optim.warmup_type ignored: they apply to optim.schedule = "wsd"']
    assert notes('optim.schedule="wsd"', 'optim.warmup_type="1-sqrt"', "optim.stable_steps=3",
                 "optim.decay_steps=2") == []
    assert notes("optim.schedule_shift=1", "optim.min_lr_ratio=0.1") == []
    assert notes('optim.schedule="linear"', "optim.cosine_waves=1.0") == [
        'optim.cosine_waves ignored: it shapes a cosine: optim.schedule = "cosine", or "wsd" '
        'with optim.decay_type = "cosine"']
    assert len(notes('optim.schedule="wsd"', 'optim.decay_type="linear"',
                     "optim.cosine_waves=1.0")) == 1
    assert notes('optim.schedule="wsd"', "optim.cosine_waves=1.0") == []
    assert notes("optim.warmup_start_ratio=0.1") == [
        'optim.warmup_start_ratio ignored: it applies to optim.schedule = "cosine" with '
        "optim.schedule_shift = 1 (transformers' cosine_warmup_with_min_lr's warmup_lr_rate)"]
    assert notes("optim.schedule_shift=1", "optim.warmup_start_ratio=0.1") == []
    assert notes('optim.schedule="wsd"', "optim.timescale=4") == [
        'optim.timescale ignored: it applies to optim.schedule = "inverse_sqrt"']
    assert notes('optim.schedule="inverse_sqrt"', "optim.min_lr_ratio=0.1") == [
        'optim.min_lr_ratio ignored: optim.schedule = "inverse_sqrt" decays without a floor']
    assert notes('optim.schedule="wsd"', "optim.decay_ratio=0.2", "optim.min_lr_ratio=0.1",
                 'optim.decay_type="1-sqrt"') == []
    assert notes('optim.schedule="cosine"', "optim.cycles=2", "optim.min_lr_ratio=0.1") == []


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


@pytest.mark.parametrize("kind", ["cosine", "wsd", "shift"])
def test_a_warmup_as_long_as_the_run_is_said(tiny, tmp_path, kind):
    """max_steps = 1 with the default warmup_ratio (0.05: 1 warmup step, rounded up as
    transformers does): the step is at lr 0, as transformers' schedule gives it, so the run
    trains nothing; it said nothing. A "wsd" warmup starts at lr * min_lr_ratio (transformers'
    too): the note says that lr, and that the step trains. schedule_shift = 1 (transformers'
    cosine_warmup_with_min_lr): the one step is at the peak, (0 + 1) / 1, and nothing is said."""
    said = []
    extra = {"cosine": (), "wsd": ('optim.schedule="wsd"', "optim.min_lr_ratio=0.1"),
             "shift": ("optim.schedule_shift=1",)}[kind]
    train(tiny_config(tiny, tmp_path / "r", f'data.train=["{tiny["small"]}"]', "max_steps=1",
                      'method="full"', "eval.metrics=[]", "eval.before=false",
                      "eval.val_loss=false", "checkpoint.save_final=false", "optim.lr=1e-3",
                      *extra),
          echo=said.append, progress=False)
    lr = [r["lr"] for r in rows_of(tmp_path / "r") if r["kind"] == "train"]
    want = {"cosine": 0.0, "wsd": 1e-4, "shift": 1e-3}[kind]
    assert lr == pytest.approx([want])
    assert hf_lr_factors("cosine", 1, 1) == [0.0]
    assert hf_lr_factors("cosine_warmup_with_min_lr", 1, 1, min_lr_rate=0.0) == [1.0]
    notes = [m for m in said if "covers the whole" in m]
    if kind == "shift":
        assert notes == [], said
        return
    assert len(notes) == 1 and ("nothing trains" in notes[0]) != (kind == "wsd"), said
    assert f"rises from {want:g}" in notes[0]


def test_a_wsd_run_resumed_with_another_length_logs_transformers_lr(tiny, tmp_path):
    """The trainer's lr at each step of a "wsd" run (a 2-step cosine warmup from 0.1 of the
    peak, decay_ratio 0.5, 1-sqrt decay to 0.1) stopped after step 2 of 4 and resumed with
    max_steps = 6: steps 1-2 on transformers' 4-step schedule (2 decay steps), 3-6 on its
    6-step one (3 decay steps); the resume's note says the decay_ratio's decay is rescaled."""
    run = tmp_path / "r"
    extra = (f'data.train=["{tiny["small"]}"]', "optim.lr=1e-3", 'optim.schedule="wsd"',
             "optim.warmup_steps=2", 'optim.warmup_type="cosine"', "optim.decay_ratio=0.5",
             'optim.decay_type="1-sqrt"',
             "optim.min_lr_ratio=0.1", "eval.metrics=[]", "eval.val_loss=false",
             "checkpoint.save_final=false", "data.max_seq_len=32", "data.tokens_per_batch=32")
    assert train(tiny_config(tiny, run, "max_steps=4", *extra), echo=lambda m: None,
                 progress=False, stop_after=2).steps == 2
    said = []
    train(tiny_config(tiny, run, "max_steps=6", *extra), resume=True, echo=said.append,
          progress=False)
    lrs = [r["lr"] for r in rows_of(run) if r["kind"] == "train"]
    kw = dict(warmup_type="cosine", decay_type="1-sqrt", min_lr_ratio=0.1)
    old = hf_lr_factors("warmup_stable_decay", 4, 2, num_decay_steps=2, **kw)
    new = hf_lr_factors("warmup_stable_decay", 6, 2, num_decay_steps=3, **kw)
    assert lrs == pytest.approx([1e-3 * f for f in old[:2] + new[2:]], rel=1e-12, abs=0)
    assert lrs[:3] == pytest.approx([1e-4, 5.5e-4, 1e-3]) and lrs[-1] < 1e-3  # warmup from min
    assert any("6-step schedule" in m and "decay_ratio" in m for m in said), said


def test_every_transformers_schedule_name_is_ember_s_or_said():
    """Every lr_scheduler_type transformers has is an Ember schedule, refused with the Ember
    setting that gives it (cosine_warmup_with_min_lr: optim.schedule_shift = 1, was refused with
    the list of Ember's names only), or refused saying why none does: reduce_lr_on_plateau and
    greedy move the lr with the eval metric (Trainer steps them on metric_for_best_model at each
    evaluation: an lr that is no function of the step)."""
    from transformers.trainer_utils import SchedulerType

    names = {t.value for t in SchedulerType}
    assert names <= set(SCHEDULES) | set(HF_SCHEDULE_NAMES) | set(HF_SCHEDULES_REFUSED), names
    with pytest.raises(EmberError, match="'reduce_lr_on_plateau' .* no Ember equivalent: .*"
                                         "eval.early_stopping"):
        OptimConfig(schedule="reduce_lr_on_plateau")
    with pytest.raises(EmberError, match="'greedy' .* no Ember equivalent: it raises the lr "
                                         ".*eval.early_stopping"):
        OptimConfig(schedule="greedy")


def test_transformers_constant_is_ember_constant_without_warmup():
    """transformers' "constant" ignores any warmup (get_scheduler never passes it one): Ember's
    "constant" with warmup_steps = 0; with a warmup it is constant_with_warmup (in CASES)."""
    for total, warmup in [(10, 2), (5, 5)]:
        assert hf_lr_factors("constant", total, warmup) == [1.0] * total
        assert _ours(dict(schedule="constant", warmup_steps=0), total, 0) == [1.0] * total


def test_wsd_stable_steps_that_miss_the_run_s_end_are_said():
    """optim.stable_steps fixes the decay's start (transformers' num_stable_steps, which warns
    when num_training_steps is given too): phases that end before the run leave its last steps
    at the floor, phases that outlast it cut the decay; either is said, naming the steps."""
    o = OptimConfig(schedule="wsd", stable_steps=3, decay_steps=2, min_lr_ratio=0.1)
    short = wsd_note(o, 10, 2)
    assert "warmup 2 + stable 3 + decay 2 = 7 steps" in short and "the last 3 at lr" in short
    assert "ends before its decay does" in wsd_note(o, 6, 2)
    assert wsd_note(o, 7, 2) is None
    assert wsd_note(OptimConfig(schedule="wsd", decay_steps=2), 10, 2) is None
    assert _ours(dict(schedule="wsd", stable_steps=3, decay_steps=2, min_lr_ratio=0.1), 10, 2)[
        7:] == [0.1] * 3


def test_a_resume_note_names_the_rescaled_decay_ratio():
    """A resume with another length rescales a "wsd" decay_ratio's decay as it does a
    warmup_ratio's warmup (schedule_options on the new total: tested above); the note named
    only the warmup."""
    note = length_note(4, 10, 16)
    assert "decay_ratio" in note and "warmup_ratio" in note
