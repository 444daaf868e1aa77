"""Early stopping and the best weights against transformers' Trainer as the oracle: the same
tiny Llama and micro-batches as ``test_hf_trainer_parity``, evaluated every few steps on the
validation split (one padded batch of its documents for transformers, so its eval_loss is the
mean per answer token, Ember's val_loss), with EarlyStoppingCallback and
load_best_model_at_end. The step the run stops at, the best step and the final weights are
transformers'."""

from __future__ import annotations

import torch

from ember.engine.data import collate
from ember.engine.evaluation import eval_plan
from tests.engine._tiny import rows_of
from tests.engine.test_hf_trainer_parity import IGNORE, _hf_model, _padded, _spied_run


def _merged(parts: list[dict]) -> dict[str, torch.Tensor]:
    """Padded batches as one padded batch."""
    width = max(p["input_ids"].shape[1] for p in parts)

    def pad(t, value):
        return torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value)

    return {"input_ids": torch.cat([pad(p["input_ids"], 0) for p in parts]),
            "attention_mask": torch.cat([pad(p["attention_mask"], 0) for p in parts]),
            "labels": torch.cat([pad(p["labels"], IGNORE) for p in parts])}


def _ember(tiny, run_dir, monkeypatch, *sets):
    t, res, steps, built = _spied_run(
        tiny, run_dir, monkeypatch, 'method="full"', 'optim.schedule="constant"',
        "optim.warmup_steps=0", "optim.weight_decay=0.0", *sets)
    val = t.datasets.validation
    parts = [_padded(collate([val[i] for i in idx]))
             for idx in eval_plan(val, t.cfg.data.tokens_per_batch)]
    return t.cfg, res, steps, _merged(parts), built["initial"]


def _peft_model(tiny, initial):
    """peft's LoRA r=4 on q/v with Ember's initial A (B is 0 in both)."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(_hf_model(tiny), LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                layer, proj = name.split("layers.")[1].split(".")[0], name.split(".")[-4]
                ab = name.split(".")[-3].removeprefix("lora_")
                p.copy_(next(v for k, v in initial.items() if k.startswith(f"layers.{layer}.")
                             and f".{proj}." in k and k.endswith(f"lora_{ab}")))
    return model


def _hf(tiny, cfg, steps, val, out, patience, threshold, model=None):
    from transformers import EarlyStoppingCallback, Trainer, TrainingArguments

    ev = cfg.eval
    items = [b for s in steps for b in s]
    args = TrainingArguments(
        output_dir=str(out), report_to=[], use_cpu=True, per_device_train_batch_size=1,
        per_device_eval_batch_size=1, gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.optim.lr, weight_decay=0.0, adam_beta1=cfg.optim.betas[0],
        adam_beta2=cfg.optim.betas[1], adam_epsilon=cfg.optim.eps,
        max_grad_norm=cfg.optim.max_grad_norm, lr_scheduler_type="constant",
        num_train_epochs=1, train_sampling_strategy="sequential", disable_tqdm=True,
        eval_strategy="steps", eval_steps=ev.every_steps, save_strategy="steps",
        save_steps=ev.every_steps, save_total_limit=1, load_best_model_at_end=True,
        metric_for_best_model="loss", greater_is_better=False)
    hf = Trainer(model if model is not None else _hf_model(tiny), args, train_dataset=items,
                 eval_dataset=[val], data_collator=lambda xs: xs[0],
                 callbacks=[EarlyStoppingCallback(patience, threshold)])
    hf.train()
    return hf


def _check(tiny, tmp_path, monkeypatch, patience, threshold, *sets):
    es = ('eval.early_stopping="val_loss"', f"eval.patience={patience}",
          f"eval.min_delta={threshold}")
    # The whole run's micro-batches (transformers must be able to go on where Ember stops)
    cfg, _, steps, val, built = _ember(tiny, tmp_path / "all", monkeypatch, *sets)
    monkeypatch.undo()
    _, res, _, _, _ = _ember(tiny, tmp_path / "run", monkeypatch, *sets, *es)
    lora = cfg.method == "lora"
    hf = _hf(tiny, cfg, steps, val, tmp_path / "hf", patience, threshold,
             _peft_model(tiny, built) if lora else None)
    ours = [(r["step"], r["val_loss"]) for r in rows_of(tmp_path / "run") if r["kind"] == "eval"]
    theirs = [(h["step"], h["eval_loss"]) for h in hf.state.log_history if "eval_loss" in h]
    assert [s for s, _ in ours] == [s for s, _ in theirs], (ours, theirs)
    for (_, a), (_, b) in zip(ours, theirs, strict=True):
        assert abs(a - b) < 1e-4 * abs(b), (ours, theirs)
    assert res.steps == hf.state.global_step
    best = min(ours, key=lambda r: r[1])[0]
    assert best == hf.state.best_global_step
    from safetensors.torch import load_file

    final_dir = tmp_path / "run" / "final"
    if lora:
        from peft import get_peft_model_state_dict

        final = load_file(str(final_dir / "adapter" / "adapter_model.safetensors"))
        want = get_peft_model_state_dict(hf.model)
        assert sorted(final) == sorted(want)
    else:
        final = load_file(str(final_dir / "model" / "model.safetensors"))
        want = hf.model.state_dict()
    # atol: 1% of one step's update (lr), above the float noise of a few steps
    atol = 0.01 * cfg.optim.lr
    for name, p in want.items():
        if name in final:
            torch.testing.assert_close(final[name], p, rtol=0, atol=atol, msg=name)
    return ours, res


def test_early_stop_step_and_best_weights_are_transformers(tiny, tmp_path, monkeypatch):
    """The validation loss falls, then rises: both stop at step 6 and end with step 4's
    weights."""
    ours, res = _check(tiny, tmp_path, monkeypatch, 1, 0.0, "max_steps=8", "optim.lr=2e-2",
                       "eval.every_steps=2")
    assert res.stopped_early and res.steps == 6 and [s for s, _ in ours] == [2, 4, 6]


def test_the_last_step_is_evaluated_and_may_be_best_as_transformers(tiny, tmp_path,
                                                                     monkeypatch):
    """max_steps = 7, not a multiple of eval.every_steps = 3: transformers evaluates the last
    step too (DefaultFlowCallback), and it may be the best."""
    ours, res = _check(tiny, tmp_path, monkeypatch, 2, 0.01, "max_steps=7", "optim.lr=5e-3",
                       "eval.every_steps=3")
    assert not res.stopped_early and [s for s, _ in ours] == [3, 6, 7]


def test_lora_early_stop_ends_with_the_best_adapter_as_transformers_with_peft(tiny, tmp_path,
                                                                             monkeypatch):
    """LoRA: the adapter in final/ is the best evaluation's (step 8 of 10), as peft's model that
    the Trainer loads back at the end."""
    ours, res = _check(tiny, tmp_path, monkeypatch, 1, 0.0, "max_steps=10", "optim.lr=2e-1",
                       "eval.every_steps=2", 'method="lora"', 'lora.targets=["q","v"]')
    assert res.steps == 10 and min(ours, key=lambda r: r[1])[0] == 8  # restored at the end
