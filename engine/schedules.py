"""The lr schedules of ``[optim]``, each transformers' ``get_scheduler`` to the step (the tests'
oracle): ``lr_factor`` is the multiplier of the peak lr at an optimizer step, a pure function of
the step (less the steps skipped: ``engine/guards.py``) and the run's length, so a resume, with
the same or another max_steps, follows the schedule of the run's length from there.

    "cosine"        transformers' cosine / cosine_with_min_lr; ``cycles`` > 1: its
                    cosine_with_restarts (hard restarts, its num_cycles); ``schedule_shift`` 1:
                    its cosine_warmup_with_min_lr (every step at the lr of the next step;
                    ``warmup_start_ratio``: its warmup_lr_rate);
                    ``cosine_waves``: their num_cycles (0.5: peak to floor; wsd's cosine too)
    "linear"        linear / polynomial (``decay_power``: its power, lr_end = lr * min_lr_ratio)
    "constant"      constant_with_warmup (transformers' "constant" ignores the warmup: Ember's
                    "constant" with warmup_steps = 0)
    "wsd"           warmup_stable_decay: the peak until the last ``decay_steps`` steps (or for
                    ``stable_steps`` after the warmup), which decay to lr * min_lr_ratio; its
                    warmup (``warmup_type``) rises from lr * min_lr_ratio too
    "inverse_sqrt"  inverse_sqrt: the peak * sqrt(timescale / (step - warmup + timescale))
"""

from __future__ import annotations

import math

from ember import EmberError

SCHEDULES = ("cosine", "linear", "constant", "wsd", "inverse_sqrt")
DECAY_TYPES = ("linear", "cosine", "1-sqrt")  # wsd's warmup_type too

# transformers' lr_scheduler_type names and the Ember setting that gives the same lr at every step
HF_SCHEDULE_NAMES = {
    "cosine_with_min_lr": "schedule = \"cosine\" with optim.min_lr_ratio = its min_lr_rate "
                          "(or min_lr / lr) and optim.cosine_waves = its num_cycles",
    "cosine_with_restarts": "schedule = \"cosine\" with optim.cycles = its num_cycles",
    "constant_with_warmup": "schedule = \"constant\" (warmup: optim.warmup_steps or "
                            "optim.warmup_ratio)",
    "polynomial": "schedule = \"linear\" with optim.decay_power = its power and "
                  "optim.min_lr_ratio = lr_end / lr (its default lr_end: 1e-7)",
    "warmup_stable_decay": "schedule = \"wsd\" with optim.decay_steps = its num_decay_steps (or "
                           "optim.decay_ratio of the run), optim.decay_type = its decay_type and "
                           "optim.min_lr_ratio = its min_lr_ratio, optim.warmup_type = its "
                           "warmup_type and optim.stable_steps = its num_stable_steps (left "
                           "out: the stable phase is the rest of the run); its num_cycles: "
                           "optim.cosine_waves",
    "cosine_warmup_with_min_lr": "schedule = \"cosine\" with optim.schedule_shift = 1 and "
                                 "optim.min_lr_ratio = its min_lr_rate (or min_lr / lr), "
                                 "optim.cosine_waves = its num_cycles and "
                                 "optim.warmup_start_ratio = its warmup_lr_rate",
}
# transformers' lr_scheduler_type names that no Ember setting gives, and why
HF_SCHEDULES_REFUSED = {
    "reduce_lr_on_plateau": "it cuts the lr when the eval metric stops improving, so the lr "
                            "depends on the evaluations, not on the step; in Ember the lr is a "
                            "function of the step: stop on a plateau with eval.early_stopping "
                            "(eval.patience), or decay with schedule = \"cosine\" / \"linear\" "
                            "/ \"wsd\"",
    "greedy": "it raises the lr while the eval metric improves and cuts it on a plateau "
              "(GreedyLR), so the lr depends on the evaluations, not on the step; in Ember the "
              "lr is a function of the step: schedule = \"cosine\" / \"linear\" / \"wsd\" / "
              "\"constant\", and eval.early_stopping to stop on a plateau",
}


def check_schedule(o) -> None:
    """``OptimConfig``'s schedule settings: a clear error for each bad value."""
    if o.schedule in HF_SCHEDULE_NAMES:
        raise EmberError(f"optim.schedule = {o.schedule!r} is transformers' lr_scheduler_type; "
                         f"in Ember: {HF_SCHEDULE_NAMES[o.schedule]}")
    if o.schedule in HF_SCHEDULES_REFUSED:
        raise EmberError(f"optim.schedule = {o.schedule!r} (transformers' lr_scheduler_type) has "
                         f"no Ember equivalent: {HF_SCHEDULES_REFUSED[o.schedule]}")
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
    if o.warmup_type not in DECAY_TYPES:
        raise EmberError(f"optim.warmup_type must be one of {', '.join(map(repr, DECAY_TYPES))}, "
                         f"got {o.warmup_type!r}")
    if o.stable_steps is not None and (isinstance(o.stable_steps, bool)
                                       or not isinstance(o.stable_steps, int)
                                       or o.stable_steps < 0):
        raise EmberError(f"optim.stable_steps must be an integer >= 0 (or left out: the stable "
                         f"phase is the run's steps between the warmup and the decay), got "
                         f"{o.stable_steps!r}")
    if o.schedule_shift not in (0, 1) or isinstance(o.schedule_shift, bool):
        raise EmberError(f"optim.schedule_shift must be 0 or 1 (1: transformers' "
                         f"cosine_warmup_with_min_lr), got {o.schedule_shift!r}")
    if not (o.cosine_waves > 0 and math.isfinite(o.cosine_waves)):
        raise EmberError(f"optim.cosine_waves must be a finite number > 0 (0.5: one decay from "
                         f"the peak to the floor), got {o.cosine_waves!r}")
    if o.cycles > 1 and o.cosine_waves != 0.5:
        raise EmberError(f"optim.cycles = {o.cycles} (hard restarts, each a half-wave) and "
                         f"optim.cosine_waves = {o.cosine_waves} (one cosine of that many waves) "
                         "are two shapes: set one of them")
    if o.warmup_start_ratio is not None and not 0 <= o.warmup_start_ratio <= 1:
        raise EmberError(f"optim.warmup_start_ratio must be in [0, 1] (or left out), got "
                         f"{o.warmup_start_ratio}")
    if o.timescale is not None and (isinstance(o.timescale, bool) or o.timescale < 1):
        raise EmberError(f"optim.timescale must be an integer >= 1 (or left out: the warmup's "
                         f"steps, else 10000), got {o.timescale!r}")


def warmup_steps(optim, total: int) -> int:
    """``optim.warmup_steps``, else ``optim.warmup_ratio`` of ``total`` steps rounded up, exactly
    as transformers' ``TrainingArguments.get_warmup_steps`` (0.05 of 10 steps is 1 warmup step,
    of 50 steps 3; its float product too: 0.07 * 100 is 7.000000000000001, 8 steps), so a run's
    lr is the one transformers gives at every step."""
    return ratio_steps(optim.warmup_steps, optim.warmup_ratio, total)


def ratio_steps(steps: int | None, ratio: float, total: int) -> int:
    """``steps`` when given, else ``ratio`` of ``total`` steps rounded up (transformers' rule)."""
    return steps if steps is not None else math.ceil(total * ratio)


def schedule_options(o, total: int, warmup: int) -> dict:
    """``lr_factor``'s keyword arguments from ``o`` (an ``OptimConfig``) for a ``total``-step run
    with ``warmup`` warmup steps: decay_ratio of the run rounded up (as warmup_ratio), wsd's
    stable phase (transformers' num_stable_steps: the rest of the run when not given), the
    inverse square root's timescale (transformers' default: the warmup, else 10000)."""
    decay = ratio_steps(o.decay_steps, o.decay_ratio, total)
    stable = o.stable_steps if o.stable_steps is not None else total - warmup - decay
    return dict(cycles=o.cycles, power=o.decay_power, decay_steps=decay, stable_steps=stable,
                decay_type=o.decay_type, warmup_type=o.warmup_type,
                timescale=o.timescale,
                shift=o.schedule_shift if o.schedule == "cosine" else 0, waves=o.cosine_waves,
                warmup_start=o.warmup_start_ratio if uses_warmup_start(o) else None)


def uses_warmup_start(o) -> bool:
    """Whether ``o.warmup_start_ratio`` applies: transformers' warmup_lr_rate is
    cosine_warmup_with_min_lr's only ("cosine" with schedule_shift 1)."""
    return o.schedule == "cosine" and o.schedule_shift == 1


def wsd_note(o, total: int, warmup: int) -> str | None:
    """A "wsd" run whose ``stable_steps`` make the phases end before or after the run (the
    warning transformers gives for num_stable_steps): the note that says what the lr does."""
    if o.schedule != "wsd" or o.stable_steps is None:
        return None
    decay = schedule_options(o, total, warmup)["decay_steps"]
    end = warmup + o.stable_steps + decay
    phases = f"warmup {warmup} + stable {o.stable_steps} + decay {decay} = {end} steps"
    if end < total:
        return (f"note: optim.stable_steps: the schedule's phases ({phases}) end before the "
                f"run's {total} steps: the last {total - end} at lr * min_lr_ratio, as "
                "transformers' num_stable_steps; leave stable_steps out for the decay to end "
                "with the run")
    if end > total:
        return (f"note: optim.stable_steps: the schedule's phases ({phases}) outlast the run's "
                f"{total} steps: the run ends before its decay does, as transformers' "
                "num_stable_steps; leave stable_steps out for the decay to end with the run")
    return None


def _decay(kind: str, progress: float, waves: float = 0.5) -> float:
    if kind == "linear":
        return 1.0 - progress
    if kind == "cosine":  # transformers' num_cycles: waves (0.5: one half-wave, peak to floor)
        return 0.5 * (1.0 + math.cos(math.pi * float(waves) * 2.0 * progress))
    return 1.0 - math.sqrt(progress)  # "1-sqrt"


def lr_factor(step: int, total: int, warmup: int, schedule: str, min_ratio: float, *,
              cycles: int = 1, power: float = 1.0, decay_steps: int = 0,
              stable_steps: int | None = None, decay_type: str = "cosine",
              warmup_type: str = "linear", timescale: int | None = None, shift: int = 0,
              waves: float = 0.5, warmup_start: float | None = None) -> float:
    """Multiplier of the peak lr for optimizer step ``step`` (0-based) of ``total``: transformers'
    ``get_scheduler``, whose linear warmup gives step k ``k / warmup`` of the peak (the first step
    at lr 0, the peak at step ``warmup``; "wsd": from ``min_ratio``). ``shift`` 1: the lr of step
    ``step + 1`` (transformers' cosine_warmup_with_min_lr: warmup (k + 1) / warmup, its decay's
    progress (k - warmup + 1) / (total - warmup), the last step at the floor); with its
    warmup_lr_rate (``warmup_start``) the warmup is start + (1 - start) * k / (warmup - 1)."""
    if warmup_start is not None and step < warmup:  # its warmup_lr_rate: step k, not k + 1
        return warmup_start + (1 - warmup_start) * step / max(1, warmup - 1)
    step += shift
    if schedule == "wsd":  # transformers' _get_wsd_scheduler_lambda
        if step < warmup:
            p = step / warmup
            if warmup_type == "linear":
                rise = p
            elif warmup_type == "cosine":
                rise = 0.5 * (1.0 - math.cos(math.pi * p))
            else:  # "1-sqrt"
                rise = 1.0 - math.sqrt(1.0 - p)
            return max(0.0, min_ratio + (1 - min_ratio) * rise)
        if stable_steps is None:
            stable_steps = total - warmup - decay_steps
        start = warmup + stable_steps
        if step < start:
            return 1.0
        if step >= start + decay_steps:
            return min_ratio
        decay = _decay(decay_type, (step - start) / max(1, decay_steps), waves)
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
        decay = _decay("cosine", progress, waves)
    return min_ratio + (1 - min_ratio) * decay
