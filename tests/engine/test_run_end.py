"""Where a run ends and how it continues: the metrics row of the step a run stops at (early
stopping, a stop to resume) is written whatever ``log_every``, and the ``best/`` weights of early
stopping stay those of the trajectory a resumed run is on."""

from __future__ import annotations

from ember.engine.trainer import train
from tests.engine._tiny import quiet, rows_of, tiny_config


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


def test_the_step_a_stopped_run_ends_at_is_logged(tiny, tmp_path):
    """A run stopped after step 3 (to --resume) with log_every = 5 lost step 3's row for good:
    the resumed run starts at step 4."""
    cfg = tiny_config(tiny, tmp_path / "r", "max_steps=6", "log_every=5", "eval.metrics=[]",
                      "eval.val_loss=false", "checkpoint.save_final=false")
    assert train(cfg, echo=quiet, progress=False, stop_after=3).steps == 3
    assert _train_steps(tmp_path / "r") == [3]
    train(cfg, resume=True, echo=quiet, progress=False)
    assert _train_steps(tmp_path / "r") == [3, 5, 6]
