"""The trainer's evaluations: the scores of one evaluation (validation loss per source, choice
questions, generation metrics on the test or validation split), the checks, before training,
that the configured evaluation and early stopping can be made, and early stopping itself (with
the best evaluation's weights kept in best/: ``engine/best.py``).

``Trainer`` (``engine/trainer.py``) inherits ``EvalMixin``; it sets the attributes used here
(``cfg``, ``datasets``, ``objective``, ``model``, ``tokenizer``, ``device``, ``autocast``,
``info``, ``log``, ``choice_set``, ``last_gen``, ``last_samples``, ``last_answers``, ``echo``,
``ckpt_best``).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from ember import EmberError
from ember.engine.best import improved, prune_best, save_best, stop_mode
from ember.engine.choices import choice_metrics, score_choices
from ember.engine.distributed import broadcast_object
from ember.engine.mixing import per_source_scores

if TYPE_CHECKING:
    from ember.engine.state import Progress


class EvalMixin:
    """Evaluation methods of ``Trainer``."""

    def evaluate(self, step: int) -> dict:
        cfg, ds = self.cfg, self.datasets
        scores: dict[str, float] = {}
        if cfg.eval.val_loss and ds.validation:
            scores.update(self.objective.val_scores(
                self.model, ds.validation, cfg.data.tokens_per_batch, self.device, self.autocast,
                cfg.eval.max_val_batches))
            scores.update(per_source_scores(  # data.validation per source: val_loss/<name>
                self.objective, ds.val_sources, self.model, cfg.data.tokens_per_batch,
                self.device, self.autocast, cfg.eval.max_val_batches))
        if self.choice_set is not None:  # every rank scores every question (lock-step forwards)
            examples, questions = self.choice_set
            scores.update(choice_metrics(score_choices(
                self.model, examples, cfg.data.tokens_per_batch, self.device, self.autocast),
                questions))
        split = self._gen_split()
        if cfg.eval.metrics and split is not None:
            res = self.objective.task_eval(self.model, self.tokenizer, split[1], cfg.eval,
                                           self.autocast)
            scores.update(res.scores)
            self.last_samples, self.last_gen = res.samples, (split[0], res.examples, res.seconds,
                                                             res.unclosed)
            self.last_answers = res.answers
        scores = broadcast_object(scores, self.info)  # early stopping decides alike everywhere
        if scores:
            self.log.write({"kind": "eval", "step": step, **scores})
        return scores

    def _echo_samples(self) -> None:
        """The last evaluation's (prompt, output, reference) samples, with the answer scored
        where a think block was cut from the output."""
        for k, (prompt, pred, ref) in enumerate(self.last_samples):
            scored = self.last_answers[k] if k < len(self.last_answers) else None
            cut = "" if scored is None else f"\n  scored: {scored!r}"
            self.echo(f"  prompt: {prompt!r}\n  output: {pred!r}{cut}\n  answer: {ref!r}")

    def _check_eval_data(self) -> None:
        """Early stopping on a metric no evaluation can produce would never stop, an eval.split
        that is missing fails the first evaluation: say so now."""
        ev, ds = self.cfg.eval, self.datasets
        if ev.metrics:  # eval.split = "test" without a test split, or a split the metrics
            split = self._gen_split()  # cannot score: now, not after training
            if split is not None:
                self.objective.check_task_split(self.model, split[1], ev)
        name = ev.early_stopping
        if name is None:
            return
        if name in ("val_loss", "perplexity"):
            if not (ev.val_loss and ds.validation):
                raise EmberError(f"eval.early_stopping = {name!r} needs validation data and "
                                 "eval.val_loss = true: set data.validation (a file) or "
                                 "data.val_fraction")
        elif name.startswith("choice_"):
            pass  # eval.choices is its own data
        elif self._gen_split() is None:
            raise EmberError(f"eval.early_stopping = {name!r} is measured on the test or "
                             "validation split and this run has neither: set data.test, "
                             "data.validation or data.val_fraction")
        if not ev.every_steps:
            raise EmberError("eval.early_stopping needs evaluations during the run: set "
                             "eval.every_steps (e.g. 50)")

    def _gen_split(self):
        ds, ev = self.datasets, self.cfg.eval
        want = ev.split
        if want == "auto" and ev.early_stopping in ev.metrics and ds.validation:
            want = "validation"  # the best weights are chosen on it: not on the test split
        if want in ("auto", "test") and ds.test:
            return "test", ds.test
        if want == "test":
            raise EmberError("eval.split = \"test\" but there is no test split (data.test)")
        return ("validation", ds.validation) if ds.validation else None

    def _gen_note(self) -> str:
        if self.last_gen is None:
            return ""
        split, n, sec, unclosed = self.last_gen
        # a reasoning model cut off while thinking scores 0 there: say why, and what to raise
        still = (f"; {unclosed} still in their think block at eval.max_new_tokens, scored as "
                 "no answer: raise it") if unclosed else ""
        return f" ({n} {split} examples, {sec:.0f} s{still})"

    # --- early stopping and the best weights (best/, engine/best.py) -------------------------
    def _keep_checkpointed_best(self, prog: Progress) -> None:
        """best/ keeps only the best step the newest checkpoint (``prog``) records: the weights
        a resume from it needs (each new best also keeps its own, ``save_best``)."""
        self.ckpt_best = prog.best_step
        prune_best(self.cfg.out_dir, {prog.best_step}, self.info)

    def _early_stop(self, scores: dict, prog: Progress, step: int | None = None) -> bool:
        """Whether to stop; an improving evaluation's weights are kept (``engine/best.py``) when
        ``step`` is given."""
        ev = self.cfg.eval
        name = ev.early_stopping
        if name is None:
            return False
        if name not in scores:  # it would never stop, nor keep the best weights
            raise EmberError(f"eval.early_stopping = {name!r}: this run's evaluation has no such "
                             f"score (it has {', '.join(sorted(scores)) or 'none'}); choose one "
                             "of those")
        mode = stop_mode(ev)
        value = scores[name]
        # The weights kept: any improvement of an evaluation during training (transformers'
        # best model; the base model before step 1 is not one to end with). Patience as
        # EarlyStoppingCallback: reset by an improvement of more than min_delta on the best so
        # far (from the baseline before training), which moves on any improvement (the
        # Trainer's best_metric), so slow steady gains below min_delta do stop the run.
        if step and improved(value, prog.best_scores.get(name), mode, 0.0):
            prog.best_step, prog.best_scores = step, dict(scores)
            save_best(self.cfg.out_dir, step, self.model, self.info, self.ckpt_best)
        # The first evaluation has no best to beat: it resets patience even if NaN, and a NaN
        # one leaves the best at the worst value (EarlyStoppingCallback, _determine_best_metric)
        first = prog.best is None
        enough = first or improved(value, prog.best, mode, ev.min_delta)
        if first and math.isnan(value):
            prog.best = math.inf if mode == "min" else -math.inf
        elif improved(value, prog.best, mode, 0.0):
            prog.best = value
        if enough:
            prog.bad_evals = 0
            return False
        prog.bad_evals += 1
        return prog.bad_evals >= ev.patience
