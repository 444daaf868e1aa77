"""Where a run ends and how it continues: the metrics row of the step a run stops at (early
stopping, a stop to resume) is written whatever ``log_every``, and the ``best/`` weights of early
stopping stay those of the trajectory a resumed run is on."""

from __future__ import annotations

import math
import shutil

import pytest
import torch

from ember import EmberError
from ember.engine import dcp
from ember.engine.best import best_root
from ember.engine.state import load_run_model
from ember.engine.trainer import train
from tests.engine._tiny import checkpoint_weights, hf_lr_factors, quiet, rows_of, tiny_config


def _train_steps(run) -> list[int]:
    return [r["step"] for r in rows_of(run) if r["kind"] == "train"]


def test_the_step_early_stopping_ends_at_is_logged_with_log_every(tiny, tmp_path):
    """log_every = 5 and early stopping at step 4: the run's last step had an eval row but no
    train row (only multiples of log_every and the last step of the full run were logged)."""
    cfg = tiny_config(tiny, tmp_path / "es", "max_steps=20", "optim.lr=1e-9", "log_every=5",
                      "eval.every_steps=2", 'eval.early_stopping="val_loss"', "eval.patience=2",
                      "eval.min_delta=0.1", "eval.metrics=[]", "checkpoint.save_final=false")
    res = train(cfg, echo=quiet, progress=False)
    assert res.stopped_early and res.steps == 4
    assert _train_steps(tmp_path / "es") == [2, 4]  # the steps evaluated, 4 where it stopped
    evals = [r["step"] for r in rows_of(tmp_path / "es") if r["kind"] == "eval"]
    assert evals[-1] == 4


def test_early_stopping_that_cannot_act_says_so(tiny, tmp_path):
    """eval.every_steps >= the run's steps: no evaluation before the end, so early stopping never
    acts; the run says so (it said nothing)."""
    said = []
    cfg = tiny_config(tiny, tmp_path / "n", "max_steps=3", "eval.every_steps=5",
                      'eval.early_stopping="val_loss"', "eval.metrics=[]",
                      "checkpoint.save_final=false")
    train(cfg, echo=said.append, progress=False)
    assert any("cannot stop this run" in str(m) for m in said), said
    said.clear()
    train(tiny_config(tiny, tmp_path / "m", "max_steps=6", "eval.every_steps=2",
                      'eval.early_stopping="val_loss"', "eval.metrics=[]",
                      "checkpoint.save_final=false"), echo=said.append, progress=False)
    assert not any("cannot stop this run" in str(m) for m in said)


def test_the_step_a_stopped_run_ends_at_is_logged(tiny, tmp_path):
    """A run stopped after step 3 (to --resume) with log_every = 5 lost step 3's row for good:
    the resumed run starts at step 4. That row (the mean of steps 1-3) stands in for the step-5
    row until the resume, which logs the step-5 row of the uninterrupted run (the mean of steps
    1-5; was: of steps 4-5, beside the step-3 row), in TensorBoard too."""
    from tests.engine.test_trainer import _tensorboard

    extra = ("max_steps=6", "log_every=5", "eval.metrics=[]", "eval.val_loss=false",
             "checkpoint.save_final=false", "tensorboard=true")
    train(tiny_config(tiny, tmp_path / "a", *extra), echo=quiet, progress=False)
    cfg = tiny_config(tiny, tmp_path / "r", *extra)
    assert train(cfg, echo=quiet, progress=False, stop_after=3).steps == 3
    assert _train_steps(tmp_path / "r") == [3]
    train(cfg, resume=True, echo=quiet, progress=False)
    assert _train_steps(tmp_path / "r") == _train_steps(tmp_path / "a") == [5, 6]
    assert rows_of(tmp_path / "r", timing=False) == rows_of(tmp_path / "a", timing=False)
    tb_a, tb_r = _tensorboard(tmp_path / "a"), _tensorboard(tmp_path / "r")
    assert tb_r["train/loss"] == tb_a["train/loss"] and len(tb_a["train/loss"]) == 2


def _weights_equal(model, saved: dict) -> bool:
    params = dict(model.named_parameters())
    return bool(saved) and all(torch.equal(params[k], v) for k, v in saved.items())


ES = ('eval.early_stopping="val_loss"', "eval.patience=10", "eval.metrics=[]", "optim.lr=1e-2",
      "checkpoint.save_final=false")


def test_resume_drops_the_best_weights_of_the_abandoned_steps(tiny, tmp_path):
    """A run killed between keeping step 6's best weights and checkpointing step 6 resumes from
    step 4's checkpoint; best/step_6 is of a trajectory that no longer exists. The resumed run
    (evaluating every 5 steps now) keeps step 5 as its best and stops: its weights (`ember
    eval` / `export` of a run without final/) were best/step_6's, the newest folder in best/."""
    run = tmp_path / "r"
    cfg = tiny_config(tiny, run, "max_steps=8", "eval.every_steps=2", "checkpoint.every_steps=2",
                      *ES)
    assert train(cfg, echo=quiet, progress=False, stop_after=6).steps == 6
    assert dcp.step_dir(best_root(run), 6).is_dir()
    shutil.rmtree(dcp.step_dir(dcp.checkpoint_root(run), 6))  # the kill
    cfg5 = tiny_config(tiny, run, "max_steps=8", "eval.every_steps=5", "checkpoint.every_steps=2",
                       *ES)
    assert train(cfg5, resume=True, echo=quiet, progress=False, stop_after=5).steps == 5
    model, _, _ = load_run_model(run, "cpu")
    assert _weights_equal(model, checkpoint_weights(run, tmp_path, step=5))
    assert [s for s, _ in dcp.list_checkpoints(best_root(run))] == [5]


def test_a_new_run_does_not_end_with_an_earlier_runs_best_weights(tiny, tmp_path):
    """A run that died before its first checkpoint leaves best/ behind; a new run in the same
    directory (allowed: no checkpoints) ended, when stopped, with the dead run's best weights
    (a later step than its own best)."""
    run = tmp_path / "r"
    dead = tiny_config(tiny, run, "max_steps=8", "eval.every_steps=2", *ES)
    train(dead, echo=quiet, progress=False, stop_after=6)
    shutil.rmtree(dcp.checkpoint_root(run))  # it died before checkpointing
    new = tiny_config(tiny, run, "max_steps=8", "eval.every_steps=2", "seed=7", *ES)
    assert train(new, echo=quiet, progress=False, stop_after=2).steps == 2
    model, _, _ = load_run_model(run, "cpu")
    assert _weights_equal(model, checkpoint_weights(run, tmp_path, step=2))


def test_a_stop_at_the_step_early_stopping_ends_at_resumes_as_finished(tiny, tmp_path):
    """Early stopping ends the run at step 2 where a stop (preemption, stop_after) also came:
    its checkpoint did not record the early stop, so --resume trained on past it (other rows,
    other final weights than the run that was not stopped)."""
    extra = ("max_steps=6", "optim.lr=1e-9", "eval.every_steps=2", "eval.patience=1",
             'eval.early_stopping="val_loss"', "eval.min_delta=0.1", "eval.metrics=[]")
    a = train(tiny_config(tiny, tmp_path / "a", *extra), echo=quiet, progress=False)
    assert a.stopped_early and a.steps == 2
    cfg_b = tiny_config(tiny, tmp_path / "b", *extra)
    assert train(cfg_b, echo=quiet, progress=False, stop_after=2).steps == 2
    b = train(cfg_b, resume=True, echo=quiet, progress=False)
    assert b.stopped_early and b.steps == 2
    assert rows_of(tmp_path / "a", timing=False) == rows_of(tmp_path / "b", timing=False)
    wa = dict(load_run_model(tmp_path / "a", "cpu")[0].named_parameters())
    wb = dict(load_run_model(tmp_path / "b", "cpu")[0].named_parameters())
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_a_negative_min_delta_is_refused(tiny, tmp_path):
    """eval.min_delta = -1 counted any score within 1 of the best as an improvement (a run that
    never early-stops); transformers' EarlyStoppingCallback compares |delta| > threshold, so a
    negative threshold means 0 there. A clear error instead of either."""
    import pytest

    from ember import EmberError

    with pytest.raises(EmberError, match="eval.min_delta must be >= 0"):
        tiny_config(tiny, tmp_path / "r", 'eval.early_stopping="val_loss"', "eval.min_delta=-1",
                    "eval.every_steps=1")


def _stops_as_transformers(tiny, tmp_path, cases):
    """Ember's stop decisions on each case's evaluations (values, patience, min_delta, mode)
    equal transformers' (``_hf_stops``)."""
    from ember.engine.state import Progress
    from ember.engine.trainer import Trainer

    for values, patience, delta, mode in cases:
        cfg = tiny_config(tiny, tmp_path / "r", 'eval.early_stopping="val_loss"',
                          f"eval.patience={patience}", f"eval.min_delta={delta}",
                          f'eval.mode="{mode}"', "eval.every_steps=1", "eval.metrics=[]")
        t = Trainer(cfg, echo=quiet, progress=False)
        t.cfg, t.info, t.model, prog = cfg, None, None, Progress()
        ours = [t._early_stop({"val_loss": v}, prog, i) for i, v in enumerate(values)]
        hf = _hf_stops(values, patience, delta, mode == "max")
        assert ours == hf, (values, ours, hf)


def _hf_stops(values, patience, threshold, greater):
    """transformers' EarlyStoppingCallback on these evaluations, the Trainer moving its
    best_metric after each (its own ``Trainer._determine_best_metric``)."""
    from types import SimpleNamespace

    from transformers import (
        EarlyStoppingCallback,
        Trainer,
        TrainerControl,
        TrainerState,
        TrainingArguments,
    )

    args = TrainingArguments(output_dir="unused", metric_for_best_model="loss",
                             greater_is_better=greater, load_best_model_at_end=True,
                             eval_strategy="steps", save_strategy="steps", report_to=[])
    cb, state, out = EarlyStoppingCallback(patience, threshold), TrainerState(), []
    for v in values:
        control = TrainerControl()
        cb.on_evaluate(args, state, control, metrics={"eval_loss": v})
        out.append(control.should_training_stop)
        Trainer._determine_best_metric(SimpleNamespace(args=args, state=state),
                                       {"eval_loss": v}, None)
    return out


def test_patience_counts_as_transformers_early_stopping_callback(tiny, tmp_path, monkeypatch):
    """Patience is reset by an improvement of more than min_delta on the best so far, and the
    best moves on any improvement (transformers): steady gains smaller than min_delta stop the
    run. Ember measured min_delta from the last score that had beaten it by min_delta, so
    3.0, 2.6, 2.4, 2.3 with min_delta 0.5 never stopped (2.4 is 0.6 below 3.0)."""
    import ember.engine.trainer_eval as trainer_eval  # _early_stop looks save_best up there

    monkeypatch.setattr(trainer_eval, "save_best", lambda *a: None)
    cases = [([3.0, 2.6, 2.4, 2.3, 2.2], 2, 0.5, "min"), ([3.0, 2.8, 2.7, 2.9], 2, 0.5, "min"),
             ([3.0, 2.0, 2.1, 1.95, 1.9, 1.7], 2, 0.1, "min"),
             ([0.1, 0.3, 0.35, 0.38, 0.5, 0.52], 2, 0.1, "max"),
             ([0.5, 0.5, 0.6, 0.55, 0.58, 0.61, 0.9], 3, 0.02, "max")]
    _stops_as_transformers(tiny, tmp_path, cases)


def test_patience_edge_cases_count_as_transformers(tiny, tmp_path, monkeypatch):
    """An improvement of exactly min_delta in decimal (1.77 then 1.72, min_delta 0.05) is one
    for transformers (|1.72 - 1.77| > 0.05 in floats) and was none for Ember (1.72 < 1.77 -
    0.05 is false), which stopped a run transformers continues; and a first evaluation that is
    NaN resets patience there (nothing to beat yet) but counted as a bad one here."""
    import ember.engine.trainer_eval as trainer_eval  # _early_stop looks save_best up there

    monkeypatch.setattr(trainer_eval, "save_best", lambda *a: None)
    nan = float("nan")
    cases = [([1.77, 1.72, 1.7], 1, 0.05, "min"), ([4.1, 4.3, 4.35], 1, 0.2, "max"),
             ([2.0, 1.9, 1.8, 1.7, 1.6], 1, 0.1, "min"), ([0.5, 0.8, 1.1, 1.2], 1, 0.3, "max"),
             ([nan, nan, 2.0, 2.5], 2, 0.0, "min"), ([nan, 0.4, nan, nan], 2, 0.0, "max"),
             ([nan, 3.0, 2.9, nan], 2, 0.05, "min")]
    _stops_as_transformers(tiny, tmp_path, cases)


def test_resume_with_another_early_stopping_score_starts_its_count_again(tiny, tmp_path):
    """A run early-stopping on val_loss, resumed on perplexity (eval may change on resume): the
    checkpoint's best was a val_loss (~4.9) that no perplexity (~130) beats, so the resumed run
    stopped at its first evaluation while perplexity was improving. Now its patience counts as
    transformers' EarlyStoppingCallback on the evaluations after the resume."""
    base = ("max_steps=6", "eval.every_steps=2", "checkpoint.every_steps=2", "eval.patience=1",
            "eval.metrics=[]", "optim.lr=1e-2", "checkpoint.save_final=false",
            "eval.before=false")
    run = tmp_path / "r"
    train(tiny_config(tiny, run, *base, 'eval.early_stopping="val_loss"'), echo=quiet,
          progress=False, stop_after=2)
    said = []
    res = train(tiny_config(tiny, run, *base, 'eval.early_stopping="perplexity"'), resume=True,
                echo=said.append, progress=False)
    assert any("start again at step 2" in line for line in said), said
    after = [r["perplexity"] for r in rows_of(run) if r["kind"] == "eval" and r["step"] > 2]
    hf = _hf_stops(after, 1, 0.0, greater=False)
    stop = hf.index(True) if True in hf else len(after) - 1
    assert (res.steps, res.stopped_early) == (4 + 2 * stop, True in hf), (after, hf)


def test_early_stopping_turned_off_then_on_again_starts_its_count_again(tiny, tmp_path,
                                                                          monkeypatch):
    """A checkpoint of a run resumed without early stopping still holds the best val_loss of
    the run before it; turned on again (on perplexity) the count started from that val_loss.
    After the resume it counts as a fresh EarlyStoppingCallback on the evaluations."""
    import ember.engine.trainer_eval as trainer_eval  # _early_stop looks save_best up there
    from ember.engine.best import restart_best
    from ember.engine.config import EvalConfig
    from ember.engine.state import Progress
    from ember.engine.trainer import Trainer

    monkeypatch.setattr(trainer_eval, "save_best", lambda *a: None)
    cfg = tiny_config(tiny, tmp_path / "r", 'eval.early_stopping="perplexity"',
                      "eval.patience=1", "eval.every_steps=1", "eval.metrics=[]")
    t = Trainer(cfg, echo=quiet, progress=False)
    t.cfg, t.info, t.model = cfg, None, None
    prog = Progress(step=4, best=4.9, bad_evals=0, best_step=2, best_scores={"val_loss": 4.9})
    note = restart_best(prog, EvalConfig(metrics=()), cfg.eval)
    values = [130.0, 120.0, 125.0]
    ours = [t._early_stop({"perplexity": v}, prog, 5 + i) for i, v in enumerate(values)]
    assert ours == _hf_stops(values, 1, 0.0, greater=False)
    assert "the checkpoint's was none" in note
    assert restart_best(Progress(), EvalConfig(metrics=()), cfg.eval) is None  # nothing held


def _hf_step_sizes(n_batches: int, grad_accum: int, epochs: float, out,
                   max_steps: int = -1) -> list[int]:
    """The micro-batches of each optimizer step of transformers' Trainer (batch size 1)."""
    import transformers
    from transformers import Trainer, TrainerCallback, TrainingArguments

    cfg = transformers.LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=16,
                                   num_hidden_layers=1, num_attention_heads=2,
                                   num_key_value_heads=1)
    ids = torch.tensor([1, 2, 3])
    data = [{"input_ids": ids, "labels": ids}] * n_batches
    sizes, cur = [], [0]

    class Count(TrainerCallback):
        def on_substep_end(self, args, state, control, **kw):
            cur[0] += 1

        def on_step_end(self, args, state, control, **kw):
            sizes.append(cur[0] + 1)
            cur[0] = 0

    args = TrainingArguments(output_dir=str(out), per_device_train_batch_size=1,
                             gradient_accumulation_steps=grad_accum, num_train_epochs=epochs,
                             max_steps=max_steps,
                             report_to=[], save_strategy="no", use_cpu=True,
                             logging_strategy="no", learning_rate=1e-9, disable_tqdm=True)
    Trainer(model=transformers.LlamaForCausalLM(cfg), args=args, train_dataset=data,
            callbacks=[Count()]).train()
    return sizes


class _Plan:
    """A stand-in for PackedBatches: ``n`` batches every epoch."""

    def __init__(self, n):
        self.n = n

    def plan(self, epoch):
        return [[0]] * self.n


def test_epoch_steps_are_transformers_trainers(tmp_path):
    """When epochs decide, every epoch ends with a partial accumulation step and no step spans
    two epochs, as transformers' Trainer: 2 epochs of 5 batches at grad_accum 4 are steps of
    4, 1, 4, 1 batches (Ember took 4, 4, 2: 3 steps, a schedule of another length)."""
    from ember.engine.runtime import epoch_step_sizes

    for n, ga, epochs in [(5, 4, 2), (7, 4, 2), (5, 4, 1.5), (6, 3, 2), (3, 4, 3), (5, 2, 0.5)]:
        want = _hf_step_sizes(n, ga, epochs, tmp_path / "hf")
        assert epoch_step_sizes(_Plan(n), epochs, ga) == want, (n, ga, epochs, want)


def test_an_epoch_ends_with_its_own_partial_step(tiny, tmp_path):
    """Through a run: 2 epochs (file order: the same batches each epoch), grad_accum 4 on a
    number of batches that 4 does not divide: the epoch's last step ends exactly at the epoch's
    tokens, and the run at twice that."""
    from ember.engine.data import PackedBatches
    from ember.engine.trainer import Trainer

    cfg = tiny_config(tiny, tmp_path / "r", f'data.train=["{tiny["small"]}"]', "grad_accum=4",
                      "epochs=2", 'data.order="file"', "data.max_seq_len=16",
                      "data.tokens_per_batch=16", "eval.metrics=[]", "eval.val_loss=false",
                      "checkpoint.save_final=false")
    t = Trainer(cfg, echo=quiet, progress=False)
    res = t.run()
    n = len(PackedBatches.from_config(t.datasets.train, t.cfg.data).plan(0))
    assert n % 4 and res.steps == 2 * -(-n // 4)
    tokens = [r["tokens"] for r in rows_of(tmp_path / "r") if r["kind"] == "train"]
    epoch = sum(len(e) for e in t.datasets.train)
    assert tokens[res.steps // 2 - 1] == epoch and tokens[-1] == 2 * epoch


def test_resume_across_epochs_with_partial_steps_is_exact(tiny, tmp_path):
    """2 shuffled epochs at grad_accum 3 on a number of batches 3 does not divide (each epoch
    ends with a partial step), LoRA dropout, evaluations in between: stopped halfway and
    resumed, the rows and final weights are those of the run not stopped."""
    extra = (f'data.train=["{tiny["small"]}"]', "epochs=2", "grad_accum=3",
             'data.packing="greedy"', "data.seed=3", "data.max_seq_len=16",
             "data.tokens_per_batch=16", "lora.dropout=0.1", "eval.metrics=[]",
             "eval.every_steps=2")
    a = train(tiny_config(tiny, tmp_path / "a", *extra), echo=quiet, progress=False)
    assert a.steps >= 4
    cfg_b = tiny_config(tiny, tmp_path / "b", *extra)
    stop = a.steps // 2
    assert train(cfg_b, echo=quiet, progress=False, stop_after=stop).steps == stop
    train(cfg_b, resume=True, echo=quiet, progress=False)
    assert rows_of(tmp_path / "a", timing=False) == rows_of(tmp_path / "b", timing=False)
    wa = dict(load_run_model(tmp_path / "a", "cpu")[0].named_parameters())
    wb = dict(load_run_model(tmp_path / "b", "cpu")[0].named_parameters())
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_a_resume_with_another_max_steps_says_so_and_schedules_as_transformers(tiny, tmp_path):
    """A 4-step run (cosine, warmup_ratio 0.25: 1 warmup step) stopped after step 3 and resumed
    with max_steps = 8 takes from step 4 on the lrs of transformers' get_scheduler for 8 steps
    (2 warmup steps), as its Trainer resumed with another max_steps, and says so (was: without a
    word); resumed again with max_steps = 2 it has nothing to train and says that."""
    run = tmp_path / "r"
    extra = ("optim.lr=1e-3", 'optim.schedule="cosine"', "optim.warmup_ratio=0.25",
             "eval.metrics=[]", "eval.val_loss=false", "checkpoint.save_final=false")
    assert train(tiny_config(tiny, run, "max_steps=4", *extra), echo=quiet, progress=False,
                 stop_after=3).steps == 3
    out = []
    train(tiny_config(tiny, run, "max_steps=8", *extra), resume=True, echo=out.append,
          progress=False)
    lrs = [r["lr"] for r in rows_of(run) if r["kind"] == "train"]
    old, new = hf_lr_factors("cosine", 4, 1), hf_lr_factors("cosine", 8, 2)
    assert lrs == pytest.approx([1e-3 * f for f in old[:3] + new[3:]], rel=1e-12, abs=0)
    assert [n for n in out if "8 steps long" in n and "was 4" in n]
    out = []
    res = train(tiny_config(tiny, run, "max_steps=2", *extra), resume=True, echo=out.append,
                progress=False)
    assert res.steps == 3 and [n for n in out if "nothing is left to train" in n]


def test_max_steps_steps_are_transformers_trainers(tmp_path):
    """Under max_steps too no step spans two epochs: transformers' Trainer still ends every
    epoch with its partial step, so 5 batches an epoch at grad_accum 4 for 5 steps are steps of
    4, 1, 4, 1, 4 batches (Ember took 4 at every step, across the epochs)."""
    from ember.engine.runtime import StepSizes

    for n, ga, steps in [(5, 4, 5), (7, 4, 3), (6, 3, 4), (3, 4, 3), (1, 2, 2), (8, 4, 3)]:
        want = _hf_step_sizes(n, ga, 1.0, tmp_path / "hf", max_steps=steps)
        sizes = StepSizes(_Plan(n), ga, max_steps=steps)
        assert len(sizes) == steps and [sizes[i] for i in range(steps)] == want, (n, ga, want)


def test_max_steps_of_whole_epochs_is_the_epochs_run(tiny, tmp_path):
    """A run of max_steps = the steps of 2 epochs (grad_accum 4 on a number of batches 4 does
    not divide) is the 2-epoch run, step for step."""
    extra = (f'data.train=["{tiny["small"]}"]', "grad_accum=4", "data.max_seq_len=16",
             "data.tokens_per_batch=16", "eval.metrics=[]", "eval.val_loss=false",
             "checkpoint.save_final=false", "threads=1")
    a = train(tiny_config(tiny, tmp_path / "a", *extra, "epochs=2"), echo=quiet, progress=False)
    train(tiny_config(tiny, tmp_path / "b", *extra, f"max_steps={a.steps}"), echo=quiet,
          progress=False)
    rows = [rows_of(tmp_path / r, timing=False) for r in ("a", "b")]
    assert rows[0] == rows[1] and len(rows[0]) == a.steps


def test_a_new_run_never_writes_over_a_finished_runs_final_output(tiny, tmp_path):
    """A finished run whose checkpoints were deleted to save space (final/ kept) was silently
    overwritten by the next run into the same folder; now it is refused, also under --resume
    (which found no checkpoint and started from step 0), and nothing in final/ changes."""
    run = tmp_path / "r"
    cfg = tiny_config(tiny, run, "max_steps=1", "eval.metrics=[]")
    train(cfg, echo=quiet, progress=False)
    shutil.rmtree(run / "checkpoints")
    adapter = run / "final" / "adapter" / "adapter_model.safetensors"
    before = adapter.read_bytes()
    for resume in (False, True):
        with pytest.raises(EmberError, match="final/ output"):
            train(cfg, resume=resume, echo=quiet, progress=False)
    assert adapter.read_bytes() == before
    shutil.rmtree(run / "final")  # moved away: the folder is free again
    assert train(cfg, echo=quiet, progress=False).steps == 1


def test_resume_inside_a_log_every_window_logs_the_same_means(tiny, tmp_path):
    """log_every = 3 logs the mean loss of 3 steps (transformers' logging_steps): a run resumed
    from its step-2 checkpoint (a crash after it) logs at step 3 the mean of steps 1-3 as the run
    that went on, not of step 3 alone (the window's sums are in the checkpoint)."""
    extra = ("max_steps=6", "log_every=3", "checkpoint.every_steps=2", "checkpoint.keep_last=5",
             "checkpoint.save_final=false", "eval.metrics=[]", "eval.val_loss=false",
             "optim.lr=1e-2")
    train(tiny_config(tiny, tmp_path / "a", *extra), echo=quiet, progress=False)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(dcp.step_dir(dcp.checkpoint_root(tmp_path / "b"), 4))
    train(tiny_config(tiny, tmp_path / "b", *extra), resume=True, echo=quiet, progress=False)
    a, b = rows_of(tmp_path / "a", timing=False), rows_of(tmp_path / "b", timing=False)
    assert [r["step"] for r in a if r["kind"] == "train"] == [3, 6]
    assert a == b


def test_a_fraction_of_an_epoch_rounds_as_transformers_trainer(tmp_path):
    """transformers' Trainer runs ceil(epochs * steps per epoch) steps, the float product: 0.07
    epochs of 100 steps are 8 steps (7.000000000000001), 1.1 epochs of 50 are 56; Ember rounded
    the fraction in decimal first (7 and 55: another schedule length)."""
    from ember.engine.runtime import epoch_step_sizes

    want = _hf_step_sizes(100, 1, 0.07, tmp_path / "hf")
    assert epoch_step_sizes(_Plan(100), 0.07, 1) == want == [1] * 8
    assert len(epoch_step_sizes(_Plan(50), 1.1, 1)) == math.ceil(1.1 * 50) == 56


def test_a_final_export_older_than_the_newest_checkpoint_is_noted(tiny, tmp_path, monkeypatch,
                                                                 capsys):
    """A finished run (final/ at step 2) resumed with a larger max_steps that stops before its
    own export: eval / export / generate used the step-2 final/ without a word while a step-4
    checkpoint existed. final/run_end.json records the end final/ was written at; a newer
    checkpoint is noted (final/ is still what loads); a completed resume brings it up to date."""
    from ember.engine import trainer as trainer_mod
    from ember.engine.config import load_config
    from ember.engine.fingerprint import stale_final

    run = tmp_path / "run"
    cfg = tiny_config(tiny, run, "max_steps=2", "checkpoint.every_steps=1", "eval.metrics=[]")
    train(cfg, echo=quiet, progress=False)
    assert stale_final(run) is None
    real_export = trainer_mod.export_final

    def no_export(*args, **kwargs):
        raise KeyboardInterrupt  # the resume stops before its export

    monkeypatch.setattr(trainer_mod, "export_final", no_export)
    with pytest.raises(KeyboardInterrupt):
        train(load_config(run, ["max_steps=4"]), resume=True, echo=quiet, progress=False)
    said = []
    load_run_model(run, "cpu", echo=said.append)
    assert any("step 2" in m and "step 4 is newer" in m and "--resume" in m for m in said), said
    with pytest.warns(UserWarning, match="newer"):
        load_run_model(run, "cpu")
    from ember.engine.cli import main

    for flag in ("--adapter", "--merged"):  # each export says it once
        capsys.readouterr()
        assert main(["export", flag, str(tmp_path / flag.strip("-")), str(run)]) == 0
        assert capsys.readouterr().err.count("step 4 is newer") == 1, flag
    monkeypatch.setattr(trainer_mod, "export_final", real_export)
    train(load_config(run, ["max_steps=4"]), resume=True, echo=quiet, progress=False)
    assert stale_final(run) is None
