"""The training loop: SFT, distillation or preference pairs (``engine/objectives.py``) with LoRA
or full fine-tuning, in one process or under torchrun (FSDP2), with evaluation, checkpoints,
exact resume and guards.

One optimizer step = ``grad_accum`` packed micro-batches of ``data.tokens_per_batch`` tokens per
process (an epoch's last step: those left, as transformers' Trainer, with epochs or max_steps;
``runtime.StepSizes``). The loss of every micro-batch is divided by the answer tokens
(preference objectives: the pairs, KTO the examples) of the whole step, all processes together
(``losses.sft_loss``), so accumulation is token-weighted: 4 micro-batches of 1 example give the
gradients of 1 batch of 4, and N processes give those of one process taking their
N * grad_accum batches (``engine/distributed.py``).

Setup order (STYLE.md): join torchrun's process group (it picks each rank's device) -> build the
model with LoRA / frozen parts -> activation checkpointing (``[activations]``) -> ``fully_shard``
per block, then the root (only with more than one process; ``[dist]``) -> the optimizer over the
(sharded) parameters.

Run directory (``cfg.out_dir``), written by rank 0::

    config.toml          the resolved config
    metrics.jsonl        one JSON row per logged step ("kind": "train": the mean loss of the steps
                         since the previous row, as transformers' logging_steps) and per
                         evaluation ("eval")
    data/                the generated task splits (``[task]``)
    checkpoints/step_N/  sharded checkpoints (``engine/state.py`` on ``engine/dcp.py``)
    best/step_N/         eval.early_stopping: the best evaluation's weights, exported at the end
    final/adapter/       PEFT adapter (LoRA, prompt tuning), or final/model/ (full fine-tuning)
    metrics.png          loss and metric curves (when matplotlib is installed)

Resume (``resume=True``) continues from the newest complete checkpoint, with any number of
processes; on CPU the continued run logs the same losses as an uninterrupted one.

Guards in the loop (``engine/guards.py``): a step with a NaN/inf loss or gradient norm is skipped
and counted (fp16: the GradScaler's skips too), ``guards.max_nonfinite_in_a_row`` of them in a row
stop the run (the scaler's only at a loss scale <= 1: above, it is calibrating); a CUDA
out-of-memory error becomes a message with the numbers and the remedies; SIGTERM / SIGINT finish
the current step, write a checkpoint, print the command that resumes and return (exit status 0).

Under torchrun the frozen teacher (distillation) and the reference copy (DPO with full
fine-tuning) are sharded like the model (``distributed.shard_frozen``): each rank holds 1 / N of
them. Evaluation is shared out too: each rank scores every N-th validation batch and the sums are
all-reduced (``evaluation.eval_batches``), and generation metrics complete every N-th example,
decoding in lock step, with the predictions gathered (``evaluation.generation_eval``). A sharded
forward is a collective, so every rank makes as many forward calls (a rank with less to do
makes calls whose results count for nothing); rank 0's scores are used by all. A classification
head's evaluation shares out its batches the same way (``classification.predict``).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ember import EmberError
from ember.engine.best import restart_best, restore_best
from ember.engine.config import TrainConfig
from ember.engine.config_doc import unused_settings
from ember.engine.data import PackedBatches
from ember.engine.distributed import (
    broadcast_object,
    init_distributed,
    rank0_echo,
    step_share,
)
from ember.engine.guards import GracefulStop, NonFiniteGuard, resume_command
from ember.engine.objectives import make_objective
from ember.engine.runlog import MetricsLog, format_scores
from ember.engine.runtime import (
    StepSizes,
    autocast_for,
    cpu_has_bf16,  # noqa: F401 (bench/train.py imports it from here)
    length_note,
    make_optimizer,
    memory_gib,
    resolve,
    router_aux_coef,
)
from ember.engine.schedules import lr_factor, schedule_options, warmup_steps, wsd_note
from ember.engine.state import (
    Progress,
    check_data,
    check_fingerprints,
    checkpoint_config,
    export_final,
    open_run,
    read_extra,
    restore,
    save,
)
from ember.engine.trainer_eval import EvalMixin
from ember.engine.trainer_setup import SetupMixin
from ember.engine.trainer_step import StepMixin, StepStats  # noqa: F401 (re-exported)
from ember.models.hf_config_export import check_classifier_exportable


@dataclass
class RunResult:
    run_dir: Path
    steps: int
    before: dict
    after: dict
    stopped_early: bool
    seconds: float


class Trainer(SetupMixin, StepMixin, EvalMixin):
    """``Trainer(cfg).run()`` trains, evaluates and saves; see the module docstring."""

    def __init__(self, cfg: TrainConfig, *, resume: bool = False, echo=print,
                 progress: bool | None = None, stop_after: int | None = None):
        self.raw_cfg, self.resume, self.echo = cfg, resume, echo
        self.progress = sys.stderr.isatty() if progress is None else progress
        # Leave after this step with a checkpoint, as a preempted job would (resume continues).
        self.stop_after = stop_after
        self.ckpt_best = None  # the best step the newest checkpoint records (best/ keeps it)

    # --- setup: SetupMixin (trainer_setup.py); one optimizer step: StepMixin (trainer_step.py)
    # --- the loop ------------------------------------------------------------------------------
    def run(self) -> RunResult:
        t_start = time.perf_counter()
        cfg = self.cfg = resolve(self.raw_cfg)
        info = self.info = init_distributed(cfg.device, cfg.dist.timeout_minutes)
        self.echo = rank0_echo(self.echo, info)
        if not self.resume:  # a run directory's config.toml holds every key
            for line in unused_settings(self.raw_cfg):
                self.echo(f"note: {line}")
        if cfg.threads is not None:
            torch.set_num_threads(cfg.threads)
        latest = open_run(cfg, info, resume=self.resume, echo=self.echo)
        self.log = MetricsLog(cfg.out_dir, main=info.is_main, tensorboard=cfg.tensorboard)
        self.device, self.autocast = info.device, autocast_for(info.device, cfg.precision)
        # Before _build seeds the run: loading a teacher / reference leaves the RNG as SFT's.
        self.objective = make_objective(cfg, info, trained=latest is not None)
        self.model = model = self._build(cfg, info)
        extra = None if latest is None else read_extra(latest)  # read once for the resume
        if latest is not None:  # before the data and a reference precompute (minutes): refused
            check_fingerprints(latest, cfg, extra, base=self.base_print,
                               frozen=self.frozen_prints, model_config=self.model_config)
        self.aux_coef = router_aux_coef(cfg, model)
        self.objective.check_model(model, self.tokenizer)
        if cfg.checkpoint.save_final:  # now, not after training: final/ is the export
            try:
                check_classifier_exportable(model.cfg, "export (final/)")
            except EmberError as e:
                raise EmberError(f"{e} (or set checkpoint.save_final = false)") from None
        self.datasets = self._datasets(cfg, info, self.tokenizer)
        self._check_eval_data()
        self._check_context(model)
        # Every rank follows one process's batches (steps, epochs, data position) and takes its
        # share of each step's (step_share): the run of one process with grad_accum * N.
        batches = PackedBatches.from_config(self.datasets.train, cfg.data)
        per_epoch = len(batches.plan(0))
        per_step = cfg.grad_accum * info.world_size
        if latest is not None:  # other training data: refused before a precompute (minutes)
            check_data(latest, batches, per_step, info.world_size, extra)
        self.objective.prepare(model, self.datasets, cfg.data.tokens_per_batch, self.device,
                               self.autocast, self.echo,
                               prints={"base": self.base_print, **self.frozen_prints})
        # Each epoch's last step takes only the micro-batches left (HF Trainer's partial
        # accumulation, with epochs or max_steps), so 2 epochs of 5 batches at grad_accum 4 are
        # 4 steps of 4, 1, 4, 1 batches (not 3 steps, nor 8 batches an epoch).
        step_sizes = StepSizes(batches, per_step, epochs=cfg.epochs, max_steps=cfg.max_steps)
        total = len(step_sizes)
        if cfg.eval.early_stopping and cfg.eval.every_steps >= total:
            self.echo(f"note: eval.every_steps = {cfg.eval.every_steps} >= the run's {total} "
                      f"steps: no evaluation before the last step, so eval.early_stopping "
                      f"({cfg.eval.early_stopping}) cannot stop this run; lower eval.every_steps")
        o = cfg.optim
        warmup = warmup_steps(o, total)
        shape = schedule_options(o, total, warmup)
        if warmup >= total + shape["shift"]:  # transformers' too: its first warmup step at lr 0
            # wsd's warmup starts at lr * min_lr_ratio (transformers' _get_wsd_scheduler_lambda),
            # a shifted one at lr / warmup (its cosine_warmup_with_min_lr)
            floor = o.lr * lr_factor(0, total, warmup, o.schedule, o.min_lr_ratio, **shape)
            self.echo(f"note: the warmup ({warmup} steps) covers the whole {total}-step run: the "
                      f"lr rises from {floor:g} and never reaches optim.lr = {o.lr:g}"
                      + (f" (the one step is at lr {floor:g}"
                         + (": nothing trains)" if floor == 0 else ")") if total == 1 else "")
                      + "; lower optim.warmup_steps / optim.warmup_ratio, or train more steps")
        if note := wsd_note(o, total, warmup):
            self.echo(note)
        opt = make_optimizer(model, o, self.device, embedding_lr=cfg.lora.embedding_lr
                             if cfg.method == "lora" else None)
        params = [p for g in opt.param_groups for p in g["params"]]
        scaler = torch.amp.GradScaler("cuda") if cfg.precision == "fp16" else None
        guard = NonFiniteGuard(cfg.guards.max_nonfinite_in_a_row)
        self.last_samples, self.last_gen, self.last_answers = [], None, []
        ckpt_state = dict(batches=batches, guard=guard, scaler=scaler, base=self.base_print,
                          frozen=self.frozen_prints, base_files=self.base_files,
                          model_config=self.model_config)

        prog = Progress()
        if latest is not None:
            prog = restore(latest, info, model, opt, **ckpt_state, extra=extra)
            self.objective.load_state(latest, info)  # TR-DPO's mixed reference
            self.echo(f"resumed from {latest} (step {prog.step} of {total})")
            was = checkpoint_config(latest)
            old_total = total if (was.epochs, was.max_steps) == (cfg.epochs, cfg.max_steps) else (
                len(StepSizes(batches, per_step, epochs=was.epochs, max_steps=was.max_steps)))
            for note in (restart_best(prog, was.eval, cfg.eval),
                         length_note(prog.step, old_total, total)):
                if note:
                    self.echo(note)
        self._keep_checkpointed_best(prog)  # none for a new run
        self.log.start(prog.step, drop_stop_row=bool(prog.log_window))
        ranks = "" if not info.distributed else f" per process, x{info.world_size} processes"
        self.echo(f"{total} steps ({per_epoch} batches of <= {cfg.data.tokens_per_batch} tokens "
                  f"per epoch, grad_accum {cfg.grad_accum}{ranks}), lr {o.lr:g} "
                  f"{o.schedule}, warmup {warmup}")

        if prog.step == 0 and cfg.eval.before:
            prog.before = self.evaluate(0)
            self._early_stop(prog.before, prog, 0)  # the base model is the baseline to beat
            if prog.before:
                self.echo(f"before fine-tuning: {format_scores(prog.before)}{self._gen_note()}")

        model.train()
        stream = self._stream(batches)
        bar = None
        if self.progress and info.is_main:
            from tqdm import tqdm

            bar = tqdm(total=total, initial=prog.step, unit="step", dynamic_ncols=True, leave=True)
        say = bar.write if bar is not None else self.echo
        last_eval, scores = None, {}
        # An early-stopped run stays stopped unless eval.early_stopping / patience now let it go on
        stopped = prog.stopped and cfg.eval.early_stopping is not None and (
            prog.bad_evals >= cfg.eval.patience)
        if latest is not None and (prog.step >= total or stopped):  # a finished run: its last
            scores = broadcast_object(self.log.last_eval(prog.step), info)  # evaluation is
            last_eval = prog.step if scores else None  # logged already
        t_train = time.perf_counter()
        seconds0, step0 = prog.seconds, prog.step
        with GracefulStop(echo=say) as signals:
            while prog.step < total and not stopped:
                t0 = time.perf_counter()
                n = step_sizes[prog.step]
                window = [next(stream) for _ in range(n)]
                mine, passes = step_share(window, info)
                micro = [batches.collate(idx) for idx in mine]
                # A rank with fewer of the step's batches: passes on a real batch that add 0
                pad = [batches.collate(window[0])] * (passes - len(mine))
                # A skipped step (fp16's scaler found inf/NaN, or the guard) does not advance
                # the schedule, as transformers' Trainer steps its scheduler only when the
                # optimizer step was not skipped; the step still counts toward max_steps.
                lr = o.lr * lr_factor(prog.step - guard.skipped, total, warmup, o.schedule,
                                      o.min_lr_ratio, **shape)
                for g in opt.param_groups:
                    g["lr"] = lr * g.get("lr_ratio", 1.0)
                s = self._step(micro, prog.step + 1, opt, params, scaler, guard, signals, pad)
                prog.step += 1
                self.objective.end_step(model, prog.step)  # TR-DPO's reference update
                prog.tokens += s.tokens
                step, dt = prog.step, time.perf_counter() - t0
                if not s.applied:
                    scale = (f", fp16 loss scale lowered to {scaler.get_scale():g}"
                             if scaler else "")
                    say(f"step {step}: loss {s.loss}, gradient norm {s.grad_norm}: skipped "
                        f"({guard.in_a_row} in a row, {guard.skipped} in total{scale})")
                evaluating = bool(cfg.eval.every_steps) and step % cfg.eval.every_steps == 0 and (
                    step < total)
                leave = step < total and (s.stop or (self.stop_after is not None
                                                     and step >= self.stop_after))
                # The step a run may end at (an evaluation that early-stops, a stop) is logged too
                values = {"loss": s.loss, **s.extra}
                if s.applied:
                    window = prog.log_window
                    for k, v in values.items():
                        total_k, n_k = window.get(k, (0.0, 0))
                        window[k] = [total_k + v, n_k + 1]
                regular = (step % cfg.log_every == 0 or step == total or not s.applied
                           or evaluating)
                if regular or leave:
                    if s.applied:  # a stop's row between two log_every rows keeps the window
                        values = self._log_means(prog, keep=not regular)  # (for the resume)
                    elif prog.log_window:  # the applied steps before it: their own row first
                        # (at the last applied one), else a run ending here never logged them
                        self.log.write({"kind": "train", "step": step - guard.in_a_row,
                                        **self._log_means(prog)})
                    self.log.write({"kind": "train", "step": step, "loss": values["loss"],
                                    "lr": lr, "grad_norm": s.grad_norm, "tokens": prog.tokens,
                                    "loss_tokens": s.loss_tokens, "tokens_per_s": s.tokens / dt,
                                    "seconds": seconds0 + time.perf_counter() - t_train,
                                    **values,
                                    **({} if s.applied else {"skipped": True}),
                                    # the lr schedule is this many steps behind the step
                                    **({"skipped_steps": guard.skipped} if guard.skipped
                                       else {})})
                status = (f"loss {s.loss:.4f} | {s.tokens / dt:,.0f} tok/s | "
                          f"mem {memory_gib(self.device):.1f} GiB")
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix_str(status)
                elif step % max(1, total // 10) == 0 or step == total:
                    # No terminal (logs, CI): a line every tenth of the run instead of a bar.
                    spent = time.perf_counter() - t_train
                    eta = spent / (step - step0) * (total - step)
                    self.echo(f"step {step}/{total}: {status} | ETA {eta:.0f} s")
                if evaluating:
                    scores, last_eval = self.evaluate(step), step
                    say(f"step {step}: {format_scores(scores)}")
                    stopped = self._early_stop(scores, prog, step)
                # A stop at the step early stopping ends at: its checkpoint says the run is over
                prog.stopped = stopped
                every = cfg.checkpoint.every_steps
                if leave or (every and step % every == 0 and step < total and not stopped):
                    prog.seconds = seconds0 + time.perf_counter() - t_train
                    path = self._checkpoint(opt, prog, ckpt_state)
                if leave:
                    if bar is not None:
                        bar.close()
                    resume = resume_command(cfg.out_dir, info.world_size, info.nnodes)
                    self.echo(signals.message(step, path, resume) if s.stop else
                              f"stopped after step {step}; continue with: {resume}")
                    return RunResult(cfg.out_dir, step, prog.before, {}, False,
                                     time.perf_counter() - t_start)
        if bar is not None:
            bar.close()
        prog.seconds = seconds0 + time.perf_counter() - t_train
        if last_eval != prog.step:
            scores = self.evaluate(prog.step)
            self._early_stop(scores, prog, prog.step)  # the last step may be the best
        prog.stopped = stopped
        if stopped:
            self.echo(f"early stopping at step {prog.step}: no {cfg.eval.early_stopping} "
                      f"improvement in {cfg.eval.patience} evaluations")
        self.echo(f"after fine-tuning ({prog.step} steps, {prog.seconds:.0f} s): "
                  f"{format_scores(scores)}{self._gen_note()}")
        self._echo_samples()
        if cfg.checkpoint.save_final:
            self._checkpoint(opt, prog, ckpt_state)
        if cfg.eval.early_stopping and prog.best_step not in (None, prog.step):
            if restore_best(cfg.out_dir, prog.best_step, model, info):
                scores = prog.best_scores
                self.echo(f"restored the weights of step {prog.best_step}, the best "
                          f"{cfg.eval.early_stopping}: {format_scores(scores)}")
            else:
                self.echo(f"warning: the best weights (step {prog.best_step}) are gone from "
                          f"{cfg.out_dir / 'best'}; keeping the last step's")
        if cfg.checkpoint.save_final:
            out = export_final(model, cfg, self.tokenizer, info, step=prog.step)
            self.echo(f"saved {out}")
        if cfg.plot:
            self.log.plot(self.echo)
        self.log.close()
        self.echo(f"done in {time.perf_counter() - t_start:.0f} s")
        return RunResult(cfg.out_dir, prog.step, prog.before, scores, stopped,
                         time.perf_counter() - t_start)

    @staticmethod
    def _log_means(prog: Progress, keep: bool = False) -> dict:
        """The loss and metrics a train row logs: their means over the applied steps since the
        previous row (transformers' Trainer logs the mean loss of its ``logging_steps``, TRL
        its metrics' means), not the last step's alone; the window starts again (``keep``: not,
        a stop's row: the resumed run logs the whole window where an uninterrupted one does)."""
        means = {k: total / n for k, (total, n) in prog.log_window.items()}
        if not keep:
            prog.log_window = {}
        return means

    def _checkpoint(self, opt, prog: Progress, ckpt_state: dict):
        path = save(self.cfg, self.info, self.model, opt, progress=prog, **ckpt_state,
                    write_more=lambda folder: self.objective.save_state(folder, self.info))
        self._keep_checkpointed_best(prog)
        return path

    def _stream(self, batches: PackedBatches):
        while True:
            yield from batches.indices()


def train(cfg: TrainConfig, *, resume: bool = False, echo=print, progress: bool | None = None,
          stop_after: int | None = None) -> RunResult:
    return Trainer(cfg, resume=resume, echo=echo, progress=progress, stop_after=stop_after).run()
