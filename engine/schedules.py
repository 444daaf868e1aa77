"""The lr schedules of ``[optim]``, each transformers' ``get_scheduler`` to the step (the tests'
oracle): ``lr_factor`` is the multiplier of the peak lr at an optimizer step, a pure function of
the step (less the steps skipped: ``engine/guards.py``) and the run's length, so a resume, with
the same or another max_steps, follows the schedule of the run's length from there.

    "cosine"        transformers' cosine / cosine_with_min_lr; ``cycles`` > 1: its
                    cosine_with_restarts (hard restarts, its num_cycles)
    "linear"        linear / polynomial (``decay_power``: its power, lr_end = lr * min_lr_ratio)
    "constant"      constant_with_warmup
    "wsd"           warmup_stable_decay: the peak until the last ``decay_steps`` steps, which
                    decay to lr * min_lr_ratio; its warmup rises from lr * min_lr_ratio too
    "inverse_sqrt"  inverse_sqrt: the peak * sqrt(timescale / (step - warmup + timescale))
"""

from __future__ import annotations

import math

from ember import EmberError

SCHEDULES = ("cosine", "linear", "constant", "wsd", "inverse_sqrt")
DECAY_TYPES = ("linear", "cosine", "1-sqrt")

# transformers' lr_scheduler_type names and the Ember setting that gives the same lr at every step
HF_SCHEDULE_NAMES = {
    "cosine_with_min_lr": "schedule = \"cosine\" with optim.min_lr_ratio = its min_lr_rate "
                          "(or min_lr / lr)",
    "cosine_with_restarts": "schedule = \"cosine\" with optim.cycles = its num_cycles",
    "constant_with_warmup": "schedule = \"constant\" (warmup: optim.warmup_steps or "
                            "optim.warmup_ratio)",
    "polynomial": "schedule = \"linear\" with optim.decay_power = its power and "
                  "optim.min_lr_ratio = lr_end / lr (its default lr_end: 1e-7)",
    "warmup_stable_decay": "schedule = \"wsd\" with optim.decay_steps = its num_decay_steps (or "
                           "optim.decay_ratio of the run), optim.decay_type = its decay_type and "
                           "optim.min_lr_ratio = its min_lr_ratio (its warmup_type \"linear\"; "
                           "the stable phase is the rest of the run)",
}


def check_schedule(o) -> None:
    """``OptimConfig``'s schedule settings: a clear error for each bad value."""
    if o.schedule in HF_SCHEDULE_NAMES:
        raise EmberError(f"optim.schedule = {o.schedule!r} is transformers' lr_scheduler_type; "
                         f"in Ember: {HF_SCHEDULE_NAMES[o.schedule]}")
    if o.schedule not in SCHEDULES:
        raise EmberError(f"optim.schedule must be one of {', '.join(map(repr, SCHEDULES))}, got "
                         f"{o.schedule!r}")
    if not 0 <= o.min_lr_ratio <= 1:
        raise EmberError(f"optim.min_lr_ratio must be in [0, 1], got {o.min_lr_ratio}")
    if isinstance(o.cycles, bool) or not isinstance(o.cycles, int) or o.cycles < 1:
        raise EmberError(f"optim.cycles must be an integer >= 1 (1: one cosine decay, no "
                         f"restart), got {o.cycles!r}")
    if not (o.decay_power > 0 and math.isfinite(o.decay_power)):
        raise EmberError(f"optim.decay_power must be a finite number > 0, got {o.decay_power!r}")
    if o.decay_steps is not None and o.decay_steps < 0:
        raise EmberError(f"optim.decay_steps must be >= 0 (or left out for decay_ratio), got "
                         f"{o.decay_steps}")
    if not 0 <= o.decay_ratio <= 1:
        raise EmberError(f"optim.decay_ratio must be in [0, 1], got {o.decay_ratio}")
    if o.decay_type not in DECAY_TYPES:
        raise EmberError(f"optim.decay_type must be one of {', '.join(map(repr, DECAY_TYPES))}, "
                         f"got {o.decay_type!r}")
    if o.timescale is not None and (isinstance(o.timescale, bool) or o.timescale < 1):
        raise EmberError(f"optim.timescale must be an integer >= 1 (or left out: the warmup's "
                         f"steps, else 10000), got {o.timescale!r}")


def schedule_options(o, total: int, warmup: int) -> dict:
    """``lr_factor``'s keyword arguments from ``o`` (an ``OptimConfig``) for a ``total``-step run
    with ``warmup`` warmup steps: decay_ratio of the run rounded up (as warmup_ratio), the
    inverse square root's timescale (transformers' default: the warmup, else 10000)."""
    decay = o.decay_steps if o.decay_steps is not None else math.ceil(total * o.decay_ratio)
    return dict(cycles=o.cycles, power=o.decay_power, decay_steps=decay,
                decay_type=o.decay_type, timescale=o.timescale or warmup or 10_000)


def _decay(kind: str, progress: float) -> float:
    if kind == "linear":
        return 1.0 - progress
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0 - math.sqrt(progress)  # "1-sqrt"


def lr_factor(step: int, total: int, warmup: int, schedule: str, min_ratio: float, *,
              cycles: int = 1, power: float = 1.0, decay_steps: int = 0,
              decay_type: str = "cosine", timescale: int | None = None) -> float:
    """Multiplier of the peak lr for optimizer step ``step`` (0-based) of ``total``: transformers'
    ``get_scheduler``, whose linear warmup gives step k ``k / warmup`` of the peak (the first step
    at lr 0, the peak at step ``warmup``; "wsd": from ``min_ratio``)."""
    if schedule == "wsd":  # transformers' _get_wsd_scheduler_lambda, warmup_type "linear"
        if step < warmup:
            return min_ratio + (1 - min_ratio) * step / warmup
        start = total - decay_steps  # warmup + its num_stable_steps
        if step < start:
            return 1.0
        if step >= total:
            return min_ratio
        decay = _decay(decay_type, (step - start) / max(1, decay_steps))
        return max(0.0, min_ratio + (1 - min_ratio) * decay)
    if step < warmup:
        return step / warmup
    if schedule == "constant":
        return 1.0
    if schedule == "inverse_sqrt":
        timescale = timescale or warmup or 10_000
        return 1.0 / math.sqrt((step + timescale - warmup) / timescale)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "linear":
        decay = (1 - progress) ** power
    elif cycles > 1:  # transformers' hard restarts: each cycle a whole cosine from the peak
        decay = 0.0 if progress >= 1 else 0.5 * (1 + math.cos(math.pi * (cycles * progress % 1)))
    else:
        decay = 0.5 * (1 + math.cos(math.pi * progress))
    return min_ratio + (1 - min_ratio) * decay
