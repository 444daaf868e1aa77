"""The training loop on a tiny random model: it learns, LoRA trains only adapters, accumulation is
token-weighted, resume is exact, losses (SFT / distillation / DPO) match their definitions.
Through ``ember train`` elsewhere: two processes in test_distributed.py, kill / SIGTERM and
resume in test_dcp.py, NaN steps in test_guards.py."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

from ember import EmberError
from ember.engine import dcp
from ember.engine.config import to_toml
from ember.engine.data import DataConfig, PackedBatches, collate, load_examples
from ember.engine.losses import (
    adapters_disabled,
    kl_div_from_logits,
    sequence_logprobs,
    sft_loss,
)
from ember.engine.preference_losses import dpo_loss
from ember.engine.runtime import make_optimizer
from ember.engine.state import load_run_model
from ember.engine.trainer import Trainer, lr_factor, resolve, train
from ember.models.lora import LoRAConfig, apply_lora
from tests.engine._tiny import (
    checkpoint_weights,
    hf_lr_factors,
    quiet,
    rows_of,
    tiny_config,
    tiny_rows,
    write_jsonl,
)


def test_tiny_model_overfits(tiny, tmp_path):
    # 8 examples seen ~20 times: memorized. Validation = the training file (overfitting is the
    # point); exact match counts on the same 8 prompts.
    small = tiny["small"]
    cfg = tiny_config(tiny, tmp_path / "run", 'method="full"', "max_steps=30", "optim.lr=3e-3",
                      "optim.warmup_steps=2", "eval.metrics=['exact_match']",
                      f'data.train=["{small}"]', f'data.validation="{small}"',
                      f'data.test="{small}"')
    res = train(cfg, echo=quiet, progress=False)
    losses = [r["loss"] for r in rows_of(tmp_path / "run") if r["kind"] == "train"]
    assert len(losses) == 30
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < first / 5, (first, last)
    assert res.after["val_loss"] < res.before["val_loss"] / 5
    assert res.before["exact_match"] == 0 and res.after["exact_match"] >= 0.75
    assert (tmp_path / "run" / "final" / "model" / "config.json").is_file()


def test_lora_trains_only_adapters(tiny, tmp_path):
    from ember.models.loading import load_pretrained

    cfg = resolve(tiny_config(tiny, tmp_path / "run", "max_steps=4", "optim.lr=1e-2",
                              "eval.metrics=[]"))
    t = Trainer(cfg, echo=quiet, progress=False)
    t.run()
    base, _ = load_pretrained(tiny["model"], "float32")
    trained = dict(t.model.named_parameters())
    for name, p in base.named_parameters():
        key = name.replace(".weight", ".base.weight") if name.endswith("proj.weight") else name
        assert torch.equal(trained[key], p), name  # bit-identical base
        assert not trained[key].requires_grad
    adapters = {n: p for n, p in trained.items() if "lora_" in n}
    assert len(adapters) == 2 * 7 * 2 and all(p.requires_grad for p in adapters.values())
    assert all(p.abs().sum() > 0 for n, p in adapters.items() if n.endswith("lora_B"))
    assert (tmp_path / "run" / "final" / "adapter" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "run" / "config.toml").read_text() == to_toml(cfg)
    saved = checkpoint_weights(tmp_path / "run", tmp_path)
    assert set(saved) == set(adapters)  # checkpoints hold the adapters only
    assert all(torch.equal(saved[n], p) for n, p in adapters.items())


def _micro_grads(model, batches, n_loss):
    model.zero_grad(set_to_none=True)
    total = 0.0
    for b in batches:
        loss = sft_loss(model, b, n_loss)
        loss.backward()
        total += float(loss.detach())
    return total, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_grad_accumulation_is_token_weighted(tiny):
    from ember.models.loading import load_pretrained

    model, tok = load_pretrained(tiny["model"], "float32")
    apply_lora(model, LoRAConfig(rank=4, alpha=8))
    with torch.no_grad():  # nonzero B so every adapter gets a gradient
        for n, p in model.named_parameters():
            if n.endswith("lora_B"):
                p.normal_(0, 0.02)
    examples, _ = load_examples(tiny["train"], DataConfig(), tok)
    four = examples[:4]
    assert len({e.num_loss_tokens for e in four}) > 1 and len({len(e) for e in four}) > 1
    n_loss = sum(e.num_loss_tokens for e in four)
    one_loss, one = _micro_grads(model, [collate(four)], n_loss)
    acc_loss, acc = _micro_grads(model, [collate([e]) for e in four], n_loss)
    assert abs(one_loss - acc_loss) < 1e-5 * abs(one_loss)
    assert one.keys() == acc.keys() and len(one) == 2 * 7 * 2
    for k in one:
        torch.testing.assert_close(acc[k], one[k], rtol=1e-4, atol=1e-6)
    # The per-micro-batch mean (the peers' bug) would weight short examples more: not equal.
    with torch.no_grad():
        wrong = sum(float(sft_loss(model, collate([e]), e.num_loss_tokens)) for e in four) / 4
    assert abs(wrong - one_loss) > 1e-3


def _tensorboard(run_dir) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    return {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}


def test_stop_resume_equals_uninterrupted_run(tiny, tmp_path, monkeypatch):
    extra = ("max_steps=6", "checkpoint.every_steps=2", "eval.every_steps=3", "lora.dropout=0.1",
             "data.tokens_per_batch=96", "grad_accum=2", "eval.metrics=[]", "tensorboard=true")
    train(tiny_config(tiny, tmp_path / "a", *extra), echo=quiet, progress=False)
    cfg_b = tiny_config(tiny, tmp_path / "b", *extra)
    stopped = train(cfg_b, echo=quiet, progress=False, stop_after=4)
    assert stopped.steps == 4 and dcp.list_checkpoints(tmp_path / "b" / "checkpoints")
    model, _, _ = load_run_model(tmp_path / "b", "cpu")  # no final weights: the checkpoint's
    stored = checkpoint_weights(tmp_path / "b", tmp_path)
    params = dict(model.named_parameters())
    assert stored and all(torch.equal(params[k], v) for k, v in stored.items())
    with pytest.raises(EmberError, match="--resume"):
        train(cfg_b, echo=quiet, progress=False)
    with (tmp_path / "b" / "metrics.jsonl").open("a") as f:  # rows a crash left past the ckpt
        f.write(json.dumps({"kind": "train", "step": 5, "loss": 123.0}) + "\n")
        f.write('{"kind": "train", "step": 6, "lo')  # torn by a kill in the middle of a write
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(tmp_path / "b" / "tensorboard")) as tb:  # and its TensorBoard events
        tb.add_scalar("train/loss", 123.0, 5)
    reads, load = [], torch.load

    def counted(f, *args, **kwargs):
        reads.append(str(f))
        return load(f, *args, **kwargs)

    monkeypatch.setattr(torch, "load", counted)
    train(cfg_b, resume=True, echo=quiet, progress=False)
    monkeypatch.undo()
    # the checks before the data and the restore share one read (it was 3)
    assert sum(r.endswith("extra.pt") for r in reads) == 1
    a, b = rows_of(tmp_path / "a", timing=False), rows_of(tmp_path / "b", timing=False)
    assert a == b
    # TensorBoard holds the same numbers, and the resumed run's events past the checkpoint were
    # purged (steps 5 and 6 once each)
    tb_a, tb_b = _tensorboard(tmp_path / "a"), _tensorboard(tmp_path / "b")
    assert tb_a["train/loss"] == [(r["step"], pytest.approx(r["loss"]))
                                  for r in a if r["kind"] == "train"]
    assert tb_a["eval/val_loss"] == [(r["step"], pytest.approx(r["val_loss"]))
                                     for r in a if r["kind"] == "eval"]
    untimed = {f"{r['kind']}/{k}" for r in a for k in r if k not in ("kind", "step")}
    assert {t: tb_b[t] for t in untimed} == {t: tb_a[t] for t in untimed}
    assert tb_b.keys() == tb_a.keys()
    assert [s for s, _ in tb_b["train/seconds"]] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in a if r["kind"] == "eval"] == [0, 3, 6]
    wa = checkpoint_weights(tmp_path / "a", tmp_path)
    wb = checkpoint_weights(tmp_path / "b", tmp_path)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    # A changed training setting cannot be resumed silently.
    with pytest.raises(EmberError, match="optim"):
        train(tiny_config(tiny, tmp_path / "b", *extra, "optim.lr=0.5"), resume=True,
              echo=quiet, progress=False)


def test_one_epoch_sees_each_example_once_with_grad_accum(tiny, tmp_path):
    """epochs = 1 with grad_accum 4: the last step takes the micro-batches left (HF Trainer's
    partial accumulation), so the run trains on exactly the epoch's tokens (it took whole steps
    of 4 from the next epoch: more than 1 epoch)."""
    cfg = tiny_config(tiny, tmp_path / "r", f'data.train=["{tiny["small"]}"]', "grad_accum=4",
                      "data.max_seq_len=16", "data.tokens_per_batch=16", "eval.metrics=[]",
                      "eval.val_loss=false", "checkpoint.save_final=false")
    t = Trainer(cfg, echo=quiet, progress=False)
    res = t.run()
    per_epoch = len(PackedBatches.from_config(t.datasets.train, t.cfg.data).plan(0))
    assert per_epoch % 4 and res.steps == math.ceil(per_epoch / 4)
    rows = [r for r in rows_of(tmp_path / "r") if r["kind"] == "train"]
    assert rows[-1]["tokens"] == sum(len(e) for e in t.datasets.train)


def test_epochs_see_each_example_once_per_epoch_when_epochs_differ_in_batches(tiny, tmp_path):
    """Greedy packing of a shuffled order makes a different number of batches each epoch (here
    3 then 2): epochs = 2 trains on exactly each epoch's batches (it took 2x the first epoch's
    count: a batch of the third epoch too)."""
    cfg = tiny_config(tiny, tmp_path / "r", f'data.train=["{tiny["small"]}"]', "epochs=2",
                      'data.packing="greedy"', "data.seed=3", "data.max_seq_len=32",
                      "data.tokens_per_batch=48", "eval.metrics=[]",
                      "eval.val_loss=false", "checkpoint.save_final=false")
    t = Trainer(cfg, echo=quiet, progress=False)
    res = t.run()
    pb = PackedBatches.from_config(t.datasets.train, t.cfg.data)
    counts = [len(pb.plan(e)) for e in range(2)]
    assert counts[0] != counts[1] and res.steps == sum(counts)  # the case, and grad_accum = 1
    rows = [r for r in rows_of(tmp_path / "r") if r["kind"] == "train"]
    assert rows[-1]["tokens"] == 2 * sum(len(e) for e in t.datasets.train)


def test_resuming_a_finished_run_does_not_evaluate_again(tiny, tmp_path):
    """--resume on a run that completed: its final evaluation is logged already (was a second
    eval row for the last step in metrics.jsonl, a new evaluation's time)."""
    cfg = tiny_config(tiny, tmp_path / "r", "max_steps=2", "eval.metrics=[]")
    first = train(cfg, echo=quiet, progress=False)
    rows = rows_of(tmp_path / "r", timing=False)
    again = train(cfg, resume=True, echo=quiet, progress=False)
    assert rows_of(tmp_path / "r", timing=False) == rows
    assert again.after == first.after and again.steps == 2


def test_full_finetuning_with_frozen_parts(tiny, tmp_path):
    from ember.models.loading import load_pretrained

    cfg = tiny_config(tiny, tmp_path / "full", 'method="full"', "max_steps=2",
                      'freeze=["embed.*"]', "train_layers=[-1]", "eval.metrics=[]",
                      "optim.weight_decay=0.5", "optim.lr=1e-2", "eval.val_loss=false",
                      "checkpoint.save_final=false")
    t = Trainer(cfg, echo=quiet, progress=False)
    t.run()
    trainable = sorted(n for n, p in t.model.named_parameters() if p.requires_grad)
    assert trainable and all(n.startswith("layers.1.") for n in trainable)
    base = dict(load_pretrained(tiny["model"], "float32")[0].named_parameters())
    for n, p in t.model.named_parameters():  # frozen: bitwise the base; trained: moved
        assert torch.equal(p, base[n]) != (n in trainable), n
    # The optimizer holds the trainable parameters only; no decay on norms (OptimConfig's rule)
    decay = {id(p): g["weight_decay"] for g in make_optimizer(t.model, t.cfg.optim, "cpu")
             .param_groups for p in g["params"]}
    named = dict(t.model.named_parameters())
    assert sorted(n for n, p in named.items() if id(p) in decay) == trainable
    assert {n: decay[id(named[n])] for n in trainable} == {
        n: 0.0 if "norm" in n or n.endswith(".bias") else 0.5 for n in trainable}
    with pytest.raises(EmberError, match="matches no parameter"):
        Trainer(tiny_config(tiny, tmp_path / "f2", 'method="full"', 'freeze=["nope.*"]'),
                echo=quiet, progress=False).run()


def test_early_stopping(tiny, tmp_path):
    # lr so small that the validation loss cannot improve on the base model's by min_delta:
    # stops after `patience` evaluations without improvement.
    cfg = tiny_config(tiny, tmp_path / "es", "max_steps=20", "optim.lr=1e-9",
                      "eval.every_steps=2", 'eval.early_stopping="val_loss"', "eval.patience=2",
                      "eval.min_delta=0.1", "eval.metrics=[]")
    res = train(cfg, echo=quiet, progress=False)
    assert res.stopped_early and res.steps == 4


def test_early_stopping_comparisons_with_nan():
    """A NaN score (pearson of constant predictions) is no improvement and no lasting best: it
    used to become the best, which no later score could beat (stopping after `patience`)."""
    from ember.engine.best import improved

    nan = float("nan")
    assert improved(0.1, None, "max", 0.0) and not improved(0.1, 0.1, "max", 0.0)
    assert improved(0.05, 0.1, "min", 0.0) and not improved(0.05, 0.1, "min", 0.1)
    assert not improved(nan, None, "max", 0.0) and not improved(nan, 0.3, "max", 0.0)
    assert improved(-0.5, nan, "max", 0.0) and improved(3.0, nan, "min", 0.0)


def test_best_weights_follow_any_improvement_patience_min_delta(tiny, tmp_path, monkeypatch):
    """As transformers: the kept best moves on any improvement, while patience counts only
    improvements by more than min_delta (EarlyStoppingCallback's threshold)."""
    import ember.engine.trainer_eval as trainer_eval  # _early_stop looks save_best up there
    from ember.engine.state import Progress

    kept = []
    monkeypatch.setattr(trainer_eval, "save_best", lambda run_dir, step, *a: kept.append(step))
    cfg = tiny_config(tiny, tmp_path / "r", 'eval.early_stopping="val_loss"', "eval.patience=2",
                      "eval.min_delta=0.5", "eval.every_steps=1", "eval.metrics=[]")
    t = Trainer(cfg, echo=quiet, progress=False)
    t.cfg, t.info, t.model, prog = cfg, None, None, Progress()
    losses = [3.0, 2.8, 2.7, 2.9]
    stops = [t._early_stop({"val_loss": v}, prog, i) for i, v in enumerate(losses)]
    # step 0 (before training) is patience's baseline only; 1 and 2 improve (< min_delta)
    assert stops == [False, False, True, True] and kept == [1, 2] and prog.best_step == 2


def test_early_stopping_ends_with_the_best_weights(tiny, tmp_path):
    """As transformers' load_best_model_at_end: the exported weights are the best evaluation's,
    also across a stop and --resume. Here the best is step 2's (mode "max" on a falling
    val_loss; the base model before training is patience's baseline, not a candidate), so
    final/ holds step 2's weights, not those of step 4 where the run stopped."""
    cfg = tiny_config(tiny, tmp_path / "es", "max_steps=20", "optim.lr=1e-2",
                      "eval.every_steps=2", 'eval.early_stopping="val_loss"', "eval.patience=2",
                      'eval.mode="max"', "eval.metrics=[]", "checkpoint.every_steps=2")
    assert train(cfg, echo=quiet, progress=False, stop_after=2).steps == 2
    res = train(cfg, resume=True, echo=quiet, progress=False)
    evals = {r["step"]: r["val_loss"] for r in rows_of(tmp_path / "es") if r["kind"] == "eval"}
    assert evals[0] > evals[2] > evals[4]  # the scenario: each evaluation "worse" than the last
    assert res.stopped_early and res.steps == 4 and res.after["val_loss"] == evals[2]
    model, _, _ = load_run_model(tmp_path / "es", "cpu")  # final/adapter
    params = dict(model.named_parameters())
    best = checkpoint_weights(tmp_path / "es", tmp_path, step=2)
    last = checkpoint_weights(tmp_path / "es", tmp_path, step=4)
    assert best and all(torch.equal(params[k], v) for k, v in best.items())
    assert not all(torch.equal(params[k], v) for k, v in last.items())


def test_early_stopping_on_a_task_metric_chooses_on_validation_not_test(tiny, tmp_path):
    """eval.split = "auto" measures the task metrics on the test split, except when early
    stopping picks the best weights by one of them: then on the validation split (they were
    chosen by their test score, which the run then reported as its result)."""
    test = write_jsonl(tmp_path / "test3.jsonl", tiny_rows(3, seed=9))
    said = []
    for es in ((), ('eval.early_stopping="exact_match"',)):
        said.clear()
        cfg = tiny_config(tiny, tmp_path / f"r{len(es)}", "max_steps=2", "eval.every_steps=1",
                          "eval.metrics=['exact_match']", "eval.max_new_tokens=2",
                          f'data.test="{test}"', *es)
        train(cfg, echo=said.append, progress=False)
        after = next(m for m in said if m.startswith("after fine-tuning"))
        want = "8 validation" if es else "3 test"
        assert re.search(rf"\({want} examples, \d+ s\)$", after), after


@pytest.mark.parametrize("text,sets,match", [
    (True, (), "generation metrics need prompt/completion"),
    (False, ("eval.max_new_tokens=250",), r"prompt of \d+ tokens \+ eval.max_new_tokens \(250\) "
                                          "exceeds the model's context of 256")])
def test_task_metrics_on_a_split_they_cannot_score_fail_before_training(tiny, tmp_path, text,
                                                                        sets, match):
    """Generation metrics on plain-text lines (no prompt, no reference), or prompts that leave
    no room for eval.max_new_tokens, with eval.before = false: refused before the first step
    (was: after the whole run, before its checkpoint and export, so the training was lost)."""
    test = write_jsonl(tmp_path / "text.jsonl", [{"text": "say red blue -> red"}] * 4)
    cfg = tiny_config(tiny, tmp_path / "r", "max_steps=2", "eval.before=false", *sets,
                      *([f'data.test="{test}"'] if text else []))
    with pytest.raises(EmberError, match=match):
        train(cfg, echo=quiet, progress=False)
    assert not (tmp_path / "r" / "metrics.jsonl").exists()  # no step was trained


def test_resuming_an_early_stopped_run_does_not_train_on(tiny, tmp_path):
    """--resume of a run early stopping ended (a job relaunched after it finished) leaves it as
    it is (was: trained on past the stop, logged more steps and evaluations); raising
    eval.patience lets it go on."""
    cfg = tiny_config(tiny, tmp_path / "es", "max_steps=20", "optim.lr=1e-2",
                      "eval.every_steps=2", 'eval.early_stopping="val_loss"', "eval.patience=2",
                      'eval.mode="max"', "eval.metrics=[]")
    first = train(cfg, echo=quiet, progress=False)
    rows = rows_of(tmp_path / "es", timing=False)
    assert first.stopped_early and first.steps == 4
    again = train(cfg, resume=True, echo=quiet, progress=False)
    assert rows_of(tmp_path / "es", timing=False) == rows
    assert again.stopped_early and again.steps == 4 and again.after == first.after
    more = train(tiny_config(tiny, tmp_path / "es", "max_steps=20", "optim.lr=1e-2",
                             "eval.every_steps=2", 'eval.early_stopping="val_loss"',
                             "eval.patience=3", 'eval.mode="max"', "eval.metrics=[]"),
                 resume=True, echo=quiet, progress=False)
    assert more.stopped_early and more.steps == 6


def test_eval_and_export_of_an_early_stopped_run_without_final_use_the_best(tiny, tmp_path,
                                                                            capsys):
    """checkpoint.save_final = false: no final/, and the newest checkpoint (step 3) is past the
    best evaluation (step 2). ``ember export`` / ``ember eval`` take the weights the run ends
    with, the best's in best/ (they took the newest checkpoint's)."""
    from ember.engine.cli import main
    from ember.engine.runtime import build_model
    from ember.models.lora import load_adapter

    run = tmp_path / "es"
    cfg = tiny_config(tiny, run, "max_steps=20", "optim.lr=1e-2", "eval.every_steps=2",
                      'eval.early_stopping="val_loss"', "eval.patience=2", 'eval.mode="max"',
                      "eval.metrics=[]", "checkpoint.every_steps=1", "checkpoint.save_final=false")
    res = train(cfg, echo=quiet, progress=False)
    assert res.stopped_early and res.steps == 4 and not (run / "final").exists()
    assert dcp.find_latest(run / "checkpoints").path.name == "step_00000003"
    best, newest = (checkpoint_weights(run, tmp_path, step=s) for s in (2, 3))
    assert not all(torch.equal(best[k], newest[k]) for k in best)
    assert main(["export", str(run), "--adapter", str(tmp_path / "adapter")]) == 0
    loaded, _, _ = load_run_model(run, "cpu")
    exported, _ = build_model(resolve(cfg), "cpu")  # the base with fresh adapters
    load_adapter(exported, tmp_path / "adapter")
    for model in (loaded, exported):
        params = dict(model.named_parameters())
        assert best and all(torch.equal(params[k], v) for k, v in best.items())
    capsys.readouterr()
    assert main(["eval", str(run), "--data", tiny["val"], "--metrics", "exact_match",
                 "--max-new-tokens", "1"]) == 0
    out = capsys.readouterr()
    assert "step 2, the best val_loss" in out.err
    val2 = next(r["val_loss"] for r in rows_of(run) if r["kind"] == "eval" and r["step"] == 2)
    assert json.loads(out.out.strip().splitlines()[-1])["loss"] == pytest.approx(val2, rel=1e-5)


def test_early_stopping_on_a_score_the_evaluation_lacks_is_an_error(tiny, tmp_path, monkeypatch):
    """An objective whose evaluation lacks the early-stopping score (here: no perplexity) stops
    the run at its first evaluation with the scores it has (was: never stopped, no best kept)."""
    from ember.engine.objectives import SFT

    monkeypatch.setattr(SFT, "val_scores", lambda self, *a: {"val_loss": 1.0})
    cfg = tiny_config(tiny, tmp_path / "es", "max_steps=2", "eval.every_steps=1",
                      'eval.early_stopping="perplexity"', "eval.metrics=[]")
    with pytest.raises(EmberError, match=r"'perplexity': this run's evaluation has no such score "
                                         r"\(it has val_loss\)"):
        train(cfg, echo=quiet, progress=False)


@pytest.mark.parametrize("metric,no_val,no_test,every,match", [
    ("val_loss", True, False, 2, "needs validation data"),
    ("exact_match", True, True, 2, "has neither"),
    ("val_loss", False, False, 0, "set eval.every_steps"),
])
def test_early_stopping_without_its_data_is_refused(tiny, tmp_path, metric, no_val, no_test,
                                                    every, match):
    import dataclasses

    cfg = tiny_config(tiny, tmp_path / "es", "max_steps=2", f"eval.every_steps={every}",
                      f'eval.early_stopping="{metric}"', "eval.metrics=['exact_match']")
    data = dataclasses.replace(cfg.data, validation=None if no_val else cfg.data.validation,
                               test=None if no_test else cfg.data.test)
    with pytest.raises(EmberError, match=match):
        train(cfg.replace(data=data), echo=quiet, progress=False)


def test_lr_schedule():
    f = [lr_factor(s, 10, 2, "cosine", 0.1) for s in range(10)]
    assert f[0] == 0.0 and f[1] == 0.5 and f[2] == 1.0
    assert all(a >= b for a, b in zip(f[2:], f[3:], strict=False))
    assert math.isclose(lr_factor(10, 10, 2, "cosine", 0.1), 0.1)
    assert math.isclose(lr_factor(6, 10, 2, "linear", 0.0), 0.5)
    assert lr_factor(9, 10, 2, "constant", 0.0) == 1.0


HF_SCHEDULES = {"cosine": ("cosine_with_min_lr", 0.1), "cosine0": ("cosine", 0.0),
                "linear": ("linear", 0.0), "constant": ("constant_with_warmup", 0.0)}


def _hf_factors(schedule: str, total: int, warmup: int) -> list[float]:
    """transformers' lr multiplier of each optimizer step (0-based) of ``total``."""
    name, min_ratio = HF_SCHEDULES[schedule]
    return hf_lr_factors(name, total, warmup, **({"min_lr_rate": min_ratio} if min_ratio else {}))


@pytest.mark.parametrize("schedule", list(HF_SCHEDULES))
def test_lr_schedule_matches_transformers(schedule):
    """Every step's lr, warmup included, is transformers' get_scheduler's (cosine with
    min_lr_rate, cosine, linear, constant_with_warmup): its warmup step k is k / warmup of the
    peak, the first step at lr 0 (was (k + 1) / warmup, a step ahead of transformers all through
    the warmup); optim.warmup_ratio gives transformers' warmup steps, ceil(ratio * total) (was
    Python's round: 0.05 of 10 steps no warmup, 0.25 of 10 steps 2)."""
    from transformers import TrainingArguments

    from ember.engine.config import OptimConfig
    from ember.engine.schedules import warmup_steps

    ours_name = schedule.removesuffix("0")
    _, min_ratio = HF_SCHEDULES[schedule]
    for total, ratio in [(10, 0.05), (10, 0.25), (50, 0.05), (37, 0.1), (7, 0.0), (100, 0.07),
                         (3, 0.9)]:
        warmup = warmup_steps(OptimConfig(warmup_ratio=ratio), total)
        # transformers 5 takes a ratio as warmup_steps < 1; 0.07 * 100 is 7.000000000000001
        # there, 8 warmup steps (Ember rounded the product in decimal first: 7)
        hf_args = TrainingArguments(output_dir="unused", warmup_steps=ratio, report_to=[])
        assert warmup == hf_args.get_warmup_steps(total), (total, ratio)
        hf = _hf_factors(schedule, total, warmup)
        ours = [lr_factor(k, total, warmup, ours_name, min_ratio) for k in range(total)]
        assert ours == pytest.approx(hf, rel=1e-12, abs=1e-12), (total, warmup)
    for total, warmup in [(5, 1), (6, 6), (4, 9), (12, 5)]:  # warmup steps: the whole run too
        hf = _hf_factors(schedule, total, warmup)
        ours = [lr_factor(k, total, warmup, ours_name, min_ratio) for k in range(total)]
        assert ours == pytest.approx(hf, rel=1e-12, abs=1e-12), (total, warmup)
    assert warmup_steps(OptimConfig(warmup_steps=4, warmup_ratio=0.5), 10) == 4


def test_run_logs_the_scheduled_lr_of_every_step(tiny, tmp_path):
    """The lr the trainer logs (and sets) at each step, warmup_ratio 0.25 of 10 steps: 3 warmup
    steps from lr 0, then cosine to 0.1 of the peak, every step transformers'."""
    cfg = tiny_config(tiny, tmp_path / "r", f'data.train=["{tiny["small"]}"]', "max_steps=10",
                      "data.max_seq_len=32", "data.tokens_per_batch=32", "optim.lr=1e-3",
                      "optim.warmup_ratio=0.25", "optim.min_lr_ratio=0.1", "eval.metrics=[]",
                      "eval.val_loss=false", "checkpoint.save_final=false")
    train(cfg, echo=quiet, progress=False)
    lrs = [r["lr"] for r in rows_of(tmp_path / "r") if r["kind"] == "train"]
    want = [1e-3 * f for f in _hf_factors("cosine", 10, 3)]
    assert lrs == pytest.approx(want, rel=1e-12, abs=1e-15)
    assert lrs[:4] == pytest.approx([0.0, 1e-3 / 3, 2e-3 / 3, 1e-3])


# --- losses ---------------------------------------------------------------------------------------

def test_sft_loss_equals_full_logits_cross_entropy(tiny):
    from ember.models.loading import load_pretrained

    model, tok = load_pretrained(tiny["model"], "float32")
    examples, _ = load_examples(tiny["train"], DataConfig(), tok)
    batch = next(iter(PackedBatches(examples[:5], 128)))
    logits = model(batch.input_ids, batch.position_ids, cu_seqlens=batch.cu_seqlens,
                   max_seqlen=batch.max_seqlen)[0]
    ref = torch.nn.functional.cross_entropy(logits, batch.labels[0], ignore_index=-100)
    got = sft_loss(model, batch, batch.num_loss_tokens)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


def test_distillation_kl_matches_definition():
    torch.manual_seed(0)
    s = torch.randn(7, 11, requires_grad=True)
    t = torch.randn(7, 11)
    T = 2.0
    got = kl_div_from_logits(s, t, T, chunk=3)
    p = torch.softmax(t / T, -1)
    ref = (p * (p.log() - torch.log_softmax(s / T, -1))).sum() * T * T
    torch.testing.assert_close(got, ref)
    got.backward()
    g = s.grad.clone()
    s.grad = None
    ref.backward()
    torch.testing.assert_close(g, s.grad)
    assert float(kl_div_from_logits(t, t, T)) == pytest.approx(0.0, abs=1e-6)


def test_dpo_loss_and_reference_without_adapters(tiny):
    from ember.models.loading import load_pretrained

    pc, pr = torch.tensor([-3.0, -5.0]), torch.tensor([-4.0, -4.0])
    rc, rr = torch.tensor([-3.5, -5.0]), torch.tensor([-3.5, -4.5])
    losses, chosen, rejected = dpo_loss(pc, pr, rc, rr, beta=0.5)
    margin = 0.5 * ((pc - rc) - (pr - rr))
    torch.testing.assert_close(losses, torch.nn.functional.softplus(-margin))
    torch.testing.assert_close(chosen - rejected, margin)

    model, tok = load_pretrained(tiny["model"], "float32")
    examples, _ = load_examples(tiny["train"], DataConfig(), tok)
    batch = collate(examples[:3])
    base_lp = sequence_logprobs(model, batch)
    # Per-document sums equal scoring each document alone.
    alone = torch.cat([sequence_logprobs(model, collate([e])) for e in examples[:3]])
    torch.testing.assert_close(base_lp, alone, rtol=1e-5, atol=1e-5)
    apply_lora(model, LoRAConfig(rank=4, alpha=8))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("lora_B"):
                p.normal_(0, 0.1)
    assert not torch.allclose(sequence_logprobs(model, batch), base_lp)
    with torch.no_grad(), adapters_disabled(model):
        assert torch.equal(sequence_logprobs(model, batch), base_lp)
    assert not torch.allclose(sequence_logprobs(model, batch), base_lp)  # scales restored


# --- metrics --------------------------------------------------------------------------------------

def test_metrics():
    from ember.engine.metrics import compute

    refs = [' {"a": 1, "b": "x"}', ' {"a": 2, "b": "y"}', "cat", "dog"]
    preds = ['{"a": 1, "b": "x"}\n', '{"b": "y", "a": 2}', "Cat", "cat"]
    s = compute(["exact_match", "accuracy"], preds, refs)
    assert s == {"exact_match": 0.25, "accuracy": 0.5}
    assert compute(["json_match"], preds[:2], refs[:2])["json_match"] == 1.0
    assert compute(["field_accuracy"], ['{"a": 1, "b": "z"}', "oops"], refs[:2]) == {
        "field_accuracy": 0.25}
    # macro F1 over labels {cat, dog}: cat P=1/2 R=1 -> 2/3; dog P=0 -> 0
    assert compute(["f1"], ["cat", "cat"], ["cat", "dog"])["f1"] == pytest.approx(1 / 3)
    with pytest.raises(EmberError, match="unknown metric"):
        compute(["bleu"], preds, refs)


def test_generation_stops_rows_that_left_the_reference():
    from ember.engine.evaluation import _diverged
    from ember.engine.metrics import normalize

    ref = normalize(' {"category": "bug"}')
    assert not _diverged("", ref) and not _diverged(" ", ref)
    assert not _diverged(' {"cat', ref) and not _diverged(' {"category": ', ref)
    assert _diverged(' {"categ0', ref) and _diverged("Sure", ref)
    assert _diverged(' {"cate gory', ref)  # inner space the reference does not have
    assert _diverged(' {"cate ', ref)  # a trailing space followed by anything cannot match
    assert not _diverged(' {"category": "bug"}', ref)
    assert not _diverged(' {"category": "bu\ufffd', ref)  # half a character: undecided


def test_format_scores_units():
    from ember.engine.runlog import format_scores

    line = format_scores({"val_loss": 1.25, "perplexity": 3.49, "exact_match": 0.5,
                          "val_reward_margin": 0.118, "val_reward_accuracy": 0.7,
                          "val_loss/math": 0.4, "macro_f1": 0.9})
    assert line == ("val_loss 1.2500, perplexity 3.490, exact_match 50.0%, val_reward_margin "
                    "0.1180, val_reward_accuracy 70.0%, val_loss/math 0.4000, macro_f1 90.0%")
    assert format_scores({"choice_accuracy": 0.5, "choice_accuracy_norm": 0.25}) == (
        "choice_accuracy 50.0%, choice_accuracy_norm 25.0%")
    assert format_scores({}).startswith("nothing evaluated")
