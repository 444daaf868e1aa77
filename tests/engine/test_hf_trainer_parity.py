"""Ember's training loop against transformers' Trainer (and peft for LoRA) as the oracle: the same
tiny Llama, the same micro-batches (Ember's packed batches, unpacked into padded batches of their
documents for transformers), fp32, no dropout. The per-step losses, learning rates and gradient
norms, and the final weights / adapter, are transformers'."""

from __future__ import annotations

import pytest
import torch

from ember.engine import trainer as trainer_mod
from ember.engine.schedules import warmup_steps
from tests.engine._tiny import quiet, rows_of, tiny_config

IGNORE = -100


def _padded(batch) -> dict[str, torch.Tensor]:
    """A packed micro-batch as transformers takes it: one padded row per document, with
    unshifted labels (the model shifts them; Ember's label at t is the token of t + 1)."""
    ids, labels = batch.input_ids.reshape(-1), batch.labels.reshape(-1)
    cu = batch.cu_seqlens.tolist()
    docs = list(zip(cu[:-1], cu[1:], strict=True))
    width = max(b - a for a, b in docs)
    x = torch.zeros(len(docs), width, dtype=torch.long)
    y = torch.full((len(docs), width), IGNORE, dtype=torch.long)
    mask = torch.zeros(len(docs), width, dtype=torch.long)
    for i, (a, b) in enumerate(docs):
        x[i, :b - a], mask[i, :b - a] = ids[a:b], 1
        y[i, 1:b - a] = labels[a:b - 1]
    return {"input_ids": x, "attention_mask": mask, "labels": y}


def _spied_run(tiny, run_dir, monkeypatch, *sets: str):
    """Ember's run on the tiny model, one data file in file order, 32-token micro-batches (one
    shared helper for the parity tests): (the trainer, its result, the micro-batches of each
    step as transformers takes them, {"initial": the parameters as built before step 1,
    "model": the model})."""
    steps, built = [], {}
    step, build = trainer_mod.Trainer._step, trainer_mod.Trainer._build

    def spy_step(self, micro, *a, **k):
        steps.append([_padded(b) for b in micro])
        return step(self, micro, *a, **k)

    def spy_build(self, cfg, info):
        model = build(self, cfg, info)
        built["initial"] = {n: p.detach().clone() for n, p in model.named_parameters()}
        built["model"] = model
        return model

    monkeypatch.setattr(trainer_mod.Trainer, "_step", spy_step)
    monkeypatch.setattr(trainer_mod.Trainer, "_build", spy_build)
    cfg = tiny_config(tiny, run_dir, f'data.train=["{tiny["small"]}"]', 'data.order="file"',
                      "data.max_seq_len=32", "data.tokens_per_batch=32", "eval.metrics=[]",
                      "eval.before=false", *sets)
    t = trainer_mod.Trainer(cfg, echo=quiet, progress=False)
    res = t.run()
    return t, res, steps, built


def _ember_run(tiny, run_dir, monkeypatch, *sets: str):
    """Ember's run: (its config, the micro-batches of each step, its train rows, the model as
    built before step 1)."""
    t, _, steps, built = _spied_run(tiny, run_dir, monkeypatch, "eval.val_loss=false", *sets)
    rows = [r for r in rows_of(run_dir) if r["kind"] == "train"]
    return t.cfg, steps, rows, built


def _hf_trainer(model, cfg, steps, out, **args):
    """transformers' Trainer over ``steps`` (one epoch of those micro-batches, in order) with
    ``cfg``'s optimizer and schedule; returns it trained."""
    from transformers import Trainer, TrainingArguments

    o = cfg.optim
    name = {"cosine": "cosine_with_min_lr" if o.min_lr_ratio else "cosine", "linear": "linear",
            "constant": "constant_with_warmup"}[o.schedule]
    items = [b for step in steps for b in step]
    targs = TrainingArguments(
        output_dir=str(out), report_to=[], use_cpu=True, per_device_train_batch_size=1,
        gradient_accumulation_steps=cfg.grad_accum, learning_rate=o.lr,
        weight_decay=o.weight_decay, adam_beta1=o.betas[0], adam_beta2=o.betas[1],
        adam_epsilon=o.eps, max_grad_norm=o.max_grad_norm, lr_scheduler_type=name,
        lr_scheduler_kwargs={"min_lr_rate": o.min_lr_ratio} if o.min_lr_ratio else {},
        warmup_steps=warmup_steps(o, len(steps)), num_train_epochs=1, save_strategy="no",
        train_sampling_strategy="sequential", disable_tqdm=True, **args)
    hf = Trainer(model, targs, train_dataset=items, data_collator=lambda xs: xs[0])
    hf.train()
    return hf


def _hf_model(tiny):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny["model"], dtype=torch.float32)


def test_full_finetuning_follows_transformers_trainer(tiny, tmp_path, monkeypatch):
    """AdamW with weight decay (not on norms), warmup + cosine to min_lr_rate, clipping, grad_accum
    3 over micro-batches of different answer-token counts (the loss divided by the step's
    tokens, transformers' num_items_in_batch) and an epoch ending in a step of 1 micro-batch:
    every step's loss, lr and gradient norm, and the final weights, are transformers'."""
    cfg, steps, rows, _ = _ember_run(
        tiny, tmp_path / "run", monkeypatch, 'method="full"', "grad_accum=3", "optim.lr=2e-3",
        "optim.weight_decay=0.1", "optim.warmup_steps=1", "optim.min_lr_ratio=0.1",
        "optim.max_grad_norm=1.0")
    sizes = [len(s) for s in steps]
    assert len(sizes) >= 2 and sizes[-1] < 3  # the epoch ends with a partial step
    tokens = [int((b["labels"] != IGNORE).sum()) for b in steps[0]]
    assert len(set(tokens)) > 1, tokens  # micro-batches of different answer-token counts
    hf = _hf_trainer(_hf_model(tiny), cfg, steps, tmp_path / "hf", logging_steps=1)
    theirs = [h for h in hf.state.log_history if "loss" in h]
    assert [r["loss"] for r in rows] == pytest.approx([h["loss"] for h in theirs], rel=1e-5)
    assert [r["lr"] for r in rows] == pytest.approx([h["learning_rate"] for h in theirs],
                                                    rel=1e-9)
    assert [r["grad_norm"] for r in rows] == pytest.approx([h["grad_norm"] for h in theirs],
                                                           rel=1e-4)
    from safetensors.torch import load_file

    ours = load_file(str(tmp_path / "run" / "final" / "model" / "model.safetensors"))
    # atol: far below a step's update (lr 2e-3; decay on a norm: 2e-4), above float noise
    for name, p in hf.model.state_dict().items():
        if name in ours:
            torch.testing.assert_close(ours[name], p, rtol=0, atol=1e-5, msg=name)


def test_logged_loss_is_the_mean_over_log_every_steps(tiny, tmp_path, monkeypatch):
    """log_every = 2 logs the mean loss of the 2 steps since the previous row, as the Trainer's
    logging_steps = 2 (Ember logged the 2nd step's loss alone)."""
    cfg, steps, rows, _ = _ember_run(
        tiny, tmp_path / "run", monkeypatch, 'method="full"', "max_steps=4", "log_every=2",
        "optim.lr=5e-3", "optim.warmup_steps=0", "checkpoint.save_final=false")
    hf = _hf_trainer(_hf_model(tiny), cfg, steps, tmp_path / "hf", logging_steps=2)
    theirs = [h for h in hf.state.log_history if "loss" in h]
    assert [r["step"] for r in rows] == [h["step"] for h in theirs] == [2, 4]
    assert [r["loss"] for r in rows] == pytest.approx([h["loss"] for h in theirs], rel=1e-5)


def test_lora_follows_transformers_trainer_with_peft(tiny, tmp_path, monkeypatch):
    """LoRA r=4 on q/v, weight decay: the same losses as the Trainer on peft's model from the
    same initial adapter, and the saved adapter is the one peft trains."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
    from safetensors.torch import load_file

    cfg, steps, rows, built = _ember_run(
        tiny, tmp_path / "run", monkeypatch, "max_steps=3", "grad_accum=2", "optim.lr=1e-2",
        "optim.weight_decay=0.1", 'lora.targets=["q","v"]')
    model = get_peft_model(_hf_model(tiny), LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]))
    ember_init = built["initial"]
    with torch.no_grad():  # Ember's initial A (B is 0 in both)
        for name, p in model.named_parameters():
            if "lora_" in name:
                layer, kind = name.split("layers.")[1].split(".")[0], name.split(".")[-3]
                proj, ab = name.split(".")[-4], kind.removeprefix("lora_")
                key = next(k for k in ember_init if k.startswith(f"layers.{layer}.")
                           and f".{proj}." in k and k.endswith(f"lora_{ab}"))
                p.copy_(ember_init[key])
    hf = _hf_trainer(model, cfg, steps, tmp_path / "hf", logging_steps=1)
    theirs = [h["loss"] for h in hf.state.log_history if "loss" in h]
    assert [r["loss"] for r in rows] == pytest.approx(theirs, rel=1e-5)
    ours = load_file(str(tmp_path / "run" / "final" / "adapter" / "adapter_model.safetensors"))
    want = get_peft_model_state_dict(model)
    assert sorted(ours) == sorted(want)
    for name, p in want.items():
        torch.testing.assert_close(ours[name], p, rtol=0, atol=1e-5, msg=name)
