"""The best evaluation's weights, for ``eval.early_stopping``: a run that early-stops on a metric
ends with the weights of the evaluation that scored best on it, as transformers'
``load_best_model_at_end`` does (its ``EarlyStoppingCallback`` requires it), not with those of
the ``patience`` evaluations after it that did not improve.

Each evaluation that beats the best so far at all (transformers keeps its best model the same
way; ``eval.min_delta`` only decides what counts for ``patience``, as EarlyStoppingCallback's
threshold) among those during training (the one before training is the baseline for
``patience``, not weights to end with: a metric that never moves keeps the first evaluation's,
as transformers would), writes the trainable weights to ``<run_dir>/best/step_N/``
(``engine/dcp.py``, any number of processes), so the best survives a stop and ``--resume``.
``best/`` holds the current best and the one the newest checkpoint records: a resume from that
checkpoint drops the best weights of the steps after it (a trajectory being redone), a new run
those of an earlier attempt in its directory. At the end of the run the trainer evaluates the
last step, writes its checkpoint (the exact state to continue from), then loads the best
weights back before exporting ``final/``; the scores it reports as "after" are the best
evaluation's. A run without ``final/`` (``checkpoint.save_final = false``, or stopped before its
end) is evaluated and exported (``ember eval`` / ``ember export``) with these weights too
(``state.run_weights``).
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

from ember.engine import dcp
from ember.engine.distributed import DistInfo, barrier
from ember.engine.metrics import LOWER_IS_BETTER


def best_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "best"


def stop_mode(ev) -> str:
    """``eval.mode`` resolved for ``eval.early_stopping`` (``ev``: an EvalConfig): "min" or
    "max"."""
    if ev.mode != "auto":
        return ev.mode
    return "min" if ev.early_stopping in LOWER_IS_BETTER else "max"


def restart_best(prog, before, now) -> str | None:
    """A resume whose ``eval.early_stopping`` (or mode) differs from the checkpoint's
    (``before``, ``now``: EvalConfigs): the checkpoint's best and patience count are another
    score's (a val_loss of 2.1 compared with perplexities: no improvement ever, so a run
    stopped at the first evaluation after resuming), so they start again (as on the first
    evaluation of a run, or a resume that turns early stopping on); returns the note to show."""
    if now.early_stopping is None:
        return None
    new = (now.early_stopping, stop_mode(now))
    old = None if before.early_stopping is None else (before.early_stopping, stop_mode(before))
    # A checkpoint without early stopping may still hold the best of an earlier one (on, off,
    # then on again): none of the evaluations since counted
    if old == new or (old is None and prog.best is None and prog.best_step is None):
        return None
    prog.best, prog.bad_evals, prog.best_step, prog.best_scores = None, 0, None, {}
    prog.stopped = False
    was = "none" if old is None else f"{old[0]} ({old[1]})"
    return (f"note: eval.early_stopping is now {new[0]} ({new[1]}), the checkpoint's was "
            f"{was}: its best and patience count start again at step {prog.step}")


def improved(value: float, best: float | None, mode: str, min_delta: float) -> bool:
    """``value`` beats ``best`` by more than ``min_delta`` (``mode``: "min" or "max"), tested as
    EarlyStoppingCallback does (better, and ``|value - best| > threshold``: ``value < best -
    min_delta`` rounds otherwise, 1.72 after 1.77 by 0.05 is an improvement there, not here). A
    NaN score (pearson of constant predictions) never improves, and a NaN best is beaten by any
    number (else no later evaluation could ever beat it)."""
    if math.isnan(value):
        return False
    if best is None or math.isnan(best):
        return True
    better = value < best if mode == "min" else value > best
    return better and abs(value - best) > min_delta


def save_best(run_dir: str | Path, step: int, model, info: DistInfo,
              keep: int | None = None) -> Path:
    """Keep ``model``'s trainable weights as the best so far (every rank must call it); the
    other best weights are dropped except ``keep``'s (the best step the newest checkpoint
    records: a run resumed from it needs them)."""
    path = dcp.save(best_root(run_dir), step, model=model, info=info)
    prune_best(run_dir, {step, keep}, info)
    return path


def prune_best(run_dir: str | Path, keep: set, info: DistInfo) -> None:
    """Drop every best-weights folder but those of the steps in ``keep`` (every rank must call
    it): at the start of a run (a new run keeps none of an earlier attempt's, a resumed one the
    best its checkpoint records, not those of the steps after the checkpoint, a trajectory
    being redone), and after each checkpoint (the best it records is the one to keep)."""
    if info.is_main:
        for step, folder in dcp.list_checkpoints(best_root(run_dir)):
            if step not in keep:
                shutil.rmtree(folder, ignore_errors=True)
    barrier(info)


def restore_best(run_dir: str | Path, step: int, model, info: DistInfo) -> bool:
    """Load the best weights (of ``step``) back into ``model`` (every rank must call it); False
    when they are gone (the model keeps its weights)."""
    path = dcp.step_dir(best_root(run_dir), step)
    if not path.is_dir():
        return False
    dcp.load_model_weights(path, model, info)
    return True
