"""``ember eval``: loss and perplexity, generation metrics, multiple-choice accuracy, a
classifier's or reward head's scores, and a preference run's validation scores, on one file
(split out of ``ember.engine.cli``)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ember import EmberError
from ember.engine import hfdatasets


def cmd_eval(a) -> None:
    """``ember eval`` (arguments ``a`` from ``ember.engine.cli.build_parser``)."""
    import torch

    from ember.engine.choices import choice_metrics, is_choice_file, load_choices, score_choices
    from ember.engine.cli import _is_run_dir, _load
    from ember.engine.data import load_examples
    from ember.engine.evaluation import generation_eval, generation_examples, validation_loss
    from ember.engine.metrics import perplexity
    from ember.engine.runtime import autocast_for

    for name in ("max_examples", "batch_size", "max_new_tokens"):
        v = getattr(a, name)
        if v is not None and v < 1:  # a negative --max-examples silently dropped examples
            raise EmberError(f"--{name.replace('_', '-')} must be >= 1, got {v}")
    asked = [m.strip() for m in (a.metrics or "").split(",") if m.strip()]
    a.metrics = ",".join(asked) or None  # "accuracy, macro_f1" for every kind of model
    model, tok, data_cfg = _load(a.model, a.adapter, a.device, a.raw)
    _generation_defaults(a)
    data = a.data or data_cfg.test or data_cfg.validation
    if isinstance(data, tuple):
        raise EmberError(f"the run has {len(data)} validation files and no test file; choose "
                         "one with --data FILE.jsonl")
    if data is None:
        raise EmberError("give the examples to score with --data FILE.jsonl")
    if not a.data and not hfdatasets.exists(data):  # the run's own split, recorded as given
        key = "data.test" if data_cfg.test else "data.validation"
        raise EmberError(f"the run's {key} {data!r} not found (a relative path is taken from the "
                         f"current folder, {Path.cwd()}: run ember eval from the folder the run "
                         "started in, or give the file with --data FILE.jsonl)")
    if a.data:  # a datasets folder: its test split, as data.test would take it
        data = hfdatasets.with_split(a.data, "test", "--data")
    from ember.models.heads import is_classifier

    if is_classifier(model):
        from ember.engine.classification import eval_classifier
        from ember.engine.reward import eval_one_output

        field, kind = "label", "regression" if model.cfg.problem_type else "reward"
        center = 0.0
        if _is_run_dir(a.model):
            from ember.engine.config import load_config

            head = load_config(a.model).head
            field, center = head.label_field, head.center_rewards_coefficient
        if len(model.cfg.labels) == 1:  # a reward or regression head
            scores, report = eval_one_output(model, tok, data, data_cfg, kind, a.metrics, field,
                                             a.max_examples, center)
        else:
            scores, report = eval_classifier(model, tok, data, data_cfg, a.metrics, field,
                                             a.max_examples)
        print(report.summary(), file=sys.stderr)
        print(json.dumps(scores))
        return
    device = str(next(model.parameters()).device)
    precision = "bf16" if device.startswith("cuda") and torch.cuda.is_bf16_supported() else "fp32"
    autocast = autocast_for(device, precision)
    if _is_run_dir(a.model) and not is_choice_file(data):
        scores = eval_preference_run(a.model, model, tok, data, device, autocast, a)
        if scores is not None:
            print(json.dumps(scores))
            return
    if is_choice_file(data):
        if set(asked) - {"choice_accuracy", "choice_accuracy_norm",
                         "choice_accuracy_mutual_info"}:
            raise EmberError(f"{data} is a multiple-choice file: its metrics are choice_accuracy "
                             f"and choice_accuracy_norm (both reported) and "
                             f"choice_accuracy_mutual_info (asked for), not {sorted(asked)}")
        examples, questions, report = load_choices(
            data, data_cfg, tok, mutual_info="choice_accuracy_mutual_info" in asked)
        print(report.summary(), file=sys.stderr)
        examples, questions = examples[:a.max_examples], questions[:a.max_examples]
        scores = score_choices(model, examples, data_cfg.tokens_per_batch, device, autocast)
        print(json.dumps({"data": str(data), "examples": len(examples),
                          **choice_metrics(scores, questions)}))
        return
    from ember.engine.metrics import check_names

    # before the loss: it was found after it, or never on a file without answers
    check_names(asked, "--metrics")
    examples, report = load_examples(data, data_cfg, tok)
    print(report.summary(), file=sys.stderr)
    examples = examples[:a.max_examples]  # loss and generation metrics on the same examples
    if asked and not any(e.reference is not None for e in examples):
        raise EmberError(f"--metrics {','.join(asked)}: {data} has no prompt/completion or "
                         "messages examples (a prompt and a reference answer) to generate for; "
                         "leave --metrics out for loss and perplexity only")
    metrics, think_end = asked or ["exact_match"], "auto"
    if _is_run_dir(a.model):
        from ember.engine.config import load_config

        run_eval = load_config(a.model).eval
        think_end = run_eval.think_end  # its answers are scored as its evaluations scored them
        if not asked:  # the metrics the run was evaluated with (eval.metrics = []: none)
            metrics = list(run_eval.metrics)
    generate = bool(metrics) and any(e.reference is not None for e in examples)
    if generate:  # a prompt too long for --max-new-tokens: said before the loss pass, not after
        generation_examples(model, examples, a.max_new_tokens, metric_names=metrics,
                            think_end=think_end)
    loss, _ = validation_loss(model, examples, max(data_cfg.tokens_per_batch,
                                                   max(len(e) for e in examples)), device,
                              autocast)
    scores = {"loss": loss, "perplexity": perplexity(loss)}
    if report.format == "text":  # (load_examples: the file's format, "auto" decided)
        from ember.engine.rolling import rolling_eval

        # lm-eval's wikitext metrics: each document whole, in rolling windows (the loss above
        # is per training example: a document past data.max_seq_len is cut)
        scores.update(rolling_eval(model, tok, data, data_cfg, device, autocast,
                                   a.max_examples))
    if generate:
        res = generation_eval(model, tok, examples, metrics, max_new_tokens=a.max_new_tokens,
                              batch_size=a.batch_size, autocast=autocast, think_end=think_end)
        scores.update(res.scores)
        if res.unclosed:  # scored as no answer: a reasoning model cut off while thinking
            print(f"{res.unclosed} of {res.examples} generations were still in their think block "
                  f"at --max-new-tokens {a.max_new_tokens} (scored as no answer): raise it",
                  file=sys.stderr)
    print(json.dumps({"data": str(data), "examples": len(examples), **scores}))


def _generation_defaults(a) -> None:
    """--max-new-tokens / --batch-size not given: a run's own eval.max_new_tokens /
    eval.batch_size (``ember eval RUN`` generates as the run's evaluations did), else the
    command's defaults."""
    from ember.engine.cli import DEFAULT_EVAL_BATCH_SIZE, DEFAULT_MAX_NEW_TOKENS, _is_run_dir

    run_eval = None
    if _is_run_dir(a.model) and (a.max_new_tokens is None or a.batch_size is None):
        from ember.engine.config import load_config

        run_eval = load_config(a.model).eval
    if a.max_new_tokens is None:
        a.max_new_tokens = run_eval.max_new_tokens if run_eval else DEFAULT_MAX_NEW_TOKENS
    if a.batch_size is None:
        a.batch_size = run_eval.batch_size if run_eval else DEFAULT_EVAL_BATCH_SIZE


def eval_preference_run(run_dir: str, model, tok, data: str, device: str, autocast, a
                         ) -> dict | None:
    """A DPO / ORPO / SimPO / CPO / KTO run's validation scores on ``data`` (its own line format and
    metrics, against its reference, as its evaluations during training); None for other runs
    and for a file of plain SFT lines (scored as any run's test split, as ``data.test`` takes)."""
    from dataclasses import replace

    from ember.engine.choices import first_record
    from ember.engine.config import load_config
    from ember.engine.distributed import DistInfo
    from ember.engine.objectives import make_objective
    from ember.engine.runtime import build_model, resolve

    cfg = load_config(run_dir)
    if cfg.objective not in ("dpo", "orpo", "simpo", "cpo", "kto"):
        return None
    if not {"label", "chosen", "rejected"} & (first_record(data) or {}).keys():
        return None  # plain SFT lines, as the run's data.test takes them: loss and metrics
    cfg = resolve(cfg.replace(device=device))
    if a.metrics:
        raise EmberError(f"{run_dir} is an objective = \"{cfg.objective}\" run: ember eval "
                         "reports its validation scores (reward accuracy, margins, ...); drop "
                         "--metrics")
    obj = make_objective(cfg, DistInfo(), trained=True)
    if getattr(obj, "snapshot", False):  # a continued adapter: the reference is it as loaded
        start, _ = build_model(cfg, device)
        obj.check_model(start, tok)
        del start
    data_cfg = replace(cfg.data, train=(str(data),), mix=(), validation=None, val_fraction=0.0,
                       test=None)
    ds = obj.load_datasets(data_cfg, tok)
    obj.check_data(ds)
    print(ds.summary(), file=sys.stderr)
    examples = ds.train[:a.max_examples]
    scores = obj.val_scores(model, examples, max(data_cfg.tokens_per_batch,
                                                 max(len(e) for e in examples)),
                            device, autocast, None)
    return {"data": str(data), "examples": len(examples), **scores}
