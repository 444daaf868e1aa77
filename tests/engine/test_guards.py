"""Loop guards: non-finite steps skipped and counted (and a diverging ``ember train`` run stopped,
its streak carried through a checkpoint), OOM explained, signals stop gracefully. (The full
SIGTERM -> checkpoint -> exit 0 -> resume path runs ``ember train`` in test_dcp.py.)"""

from __future__ import annotations

import math
import os
import signal

import pytest
import torch

from ember import EmberError
from ember.engine import dcp
from ember.engine.cli import main
from ember.engine.config import to_toml
from ember.engine.data import Example, collate
from ember.engine.guards import (
    GracefulStop,
    GuardConfig,
    NonFiniteGuard,
    oom_guard,
    oom_message,
    resume_command,
)
from ember.engine.losses import sft_loss
from tests.engine import _tiny as w
from tests.engine._tiny import checkpoint_weights, hf_lr_factors, rows_of, tiny_config


def test_guard_counts_and_stops_after_n_in_a_row():
    g = NonFiniteGuard(3)
    assert g.check(1, 2.0, 1.0)
    assert not g.check(2, float("nan"), 1.0)
    assert not g.check(3, 1.0, float("inf"))
    assert g.check(4, 1.5)  # a good step resets the streak, not the total
    assert (g.in_a_row, g.skipped, g.last_bad) == (0, 2, 3)
    assert not g.check(5, float("-inf"))
    assert not g.check(6, float("nan"))
    state = g.state_dict()
    again = NonFiniteGuard(3)
    again.load_state_dict(state)  # a resumed run continues the streak
    with pytest.raises(EmberError, match=r"step 7: loss nan, gradient norm 0.5\. 3 steps in a "
                                         r"row .* 5 skipped in total.*optim.lr"):
        again.check(7, float("nan"), 0.5)
    with pytest.raises(EmberError, match="max_nonfinite_in_a_row must be an integer >= 1"):
        GuardConfig(max_nonfinite_in_a_row=0)


def _fp16_steps(guard: NonFiniteGuard, grad_hook, steps: int) -> list[tuple[bool, bool]]:
    """The trainer's fp16 step (unscale_, norm, guard with the scale, scaler.step / update) on
    one weight; grad_hook stands in for fp16 backward. Per step: (guard applied, the scaler
    skipped by accelerate's rule (the scale dropped; HF Trainer's optimizer_step_was_skipped))."""
    w = torch.nn.Parameter(torch.ones(4))
    w.register_hook(grad_hook)
    opt = torch.optim.SGD([w], lr=0.1)
    scaler = torch.amp.GradScaler("cpu")
    out = []
    for n in range(1, steps + 1):
        before = w.detach().clone()
        scaler.scale((w * 10.0).sum()).backward()
        scaler.unscale_(opt)
        norm = torch.nn.utils.clip_grad_norm_([w], math.inf)
        applied = guard.check(n, 1.0, norm.item(), loss_scale=scaler.get_scale())
        scale = scaler.get_scale()
        if applied:
            scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        assert torch.equal(before, w.detach()) != applied
        out.append((applied, scaler.get_scale() < scale))
    return out


def test_fp16_scaler_skips_are_skipped_steps_and_calibration_does_not_stop():
    """With fp16 the guard saw only the loss, so a step the GradScaler skipped (inf/NaN
    gradients) was logged as applied and never counted. Now it is skipped exactly when the
    scaler skips; while the scaler calibrates (its scale drops from 2^16: here 4 halvings until
    the gradient fits fp16) the run goes on, but NaN gradients at any scale stop it once the
    scale is <= 1 and the limit is reached (the scaler alone would halve it forever)."""
    guard = NonFiniteGuard(2)
    steps = _fp16_steps(guard, lambda g: g.half().float(), 6)  # fp16 overflow above 65504
    assert steps == [(False, True)] * 4 + [(True, False)] * 2
    assert (guard.skipped, guard.in_a_row, guard.counted) == (4, 0, 0)
    guard = NonFiniteGuard(2)
    with pytest.raises(EmberError, match=r"step 18: loss 1.0, gradient norm nan at fp16 loss "
                                         r"scale 0.5\. 2 steps in a row .* 18 skipped in total"):
        _fp16_steps(guard, lambda g: g * float("nan"), 30)
    assert guard.in_a_row == 18
    again = NonFiniteGuard(3)
    again.load_state_dict({"in_a_row": 2, "skipped": 2, "last_bad": 2})  # an older checkpoint
    assert again.counted == 2


def test_fp16_run_logs_the_scaler_skips(tiny, tmp_path, monkeypatch):
    """An fp16 run (CUDA only: here CPU autocast with a CPU GradScaler; a hook makes the
    gradients of steps 1, 2, 4 and 6 inf, as a scaler calibrating down from 2^16 and a later
    overflow give them, without depending on how near 65504 this CPU's fp16 gradients come):
    the steps the scaler skips are logged as skipped (they were logged as applied, their loss
    in the means), and two in a row at a scale > 1 (calibrating) do not stop the run. The lr
    holds over a skipped step as transformers' Trainer's (no scheduler step when accelerate
    reports the optimizer step skipped; the step still counts toward max_steps): Ember's
    schedule followed the step counter, k skips put it k steps ahead (cosine after 2 warmup
    steps: step 3, the first update, ran at the peak 1e-3 instead of transformers' 0, step 8 at
    0.07e-3 instead of 0.93e-3). The skip count carries through a stop and --resume, and the
    log's skipped_steps says how far the schedule is behind."""
    from dataclasses import replace

    from ember.engine import trainer as tr

    resolve = tr.resolve
    monkeypatch.setattr(tr, "resolve", lambda raw: replace(resolve(raw), precision="fp16"))
    scalers, make = [], torch.amp.GradScaler

    def scaler(device):
        scalers.append(make("cpu", init_scale=2.0**12))
        return scalers[-1]

    monkeypatch.setattr(torch.amp, "GradScaler", scaler)
    real_step, now, inject = tr.Trainer._step, [0], {1, 2, 4, 6}

    def step(self, micro, n, *args, **kw):  # these steps' backward gives inf gradients
        # (marked on the trainer itself: the resumed one may reuse the first one's id())
        if not getattr(self, "_inf_hooked", False):
            self._inf_hooked = True
            p = next(p for p in self.model.parameters() if p.requires_grad)
            p.register_hook(lambda g: torch.full_like(g, math.inf) if now[0] in inject else g)
        now[0] = n
        return real_step(self, micro, n, *args, **kw)

    monkeypatch.setattr(tr.Trainer, "_step", step)
    run = tmp_path / "fp16"
    cfg = tiny_config(tiny, run, "max_steps=8", "guards.max_nonfinite_in_a_row=2",
                      "checkpoint.save_final=false", "eval.before=false", "eval.metrics=[]",
                      "log_every=1", "optim.warmup_steps=2")
    assert tr.Trainer(cfg, stop_after=4).run().steps == 4
    assert tr.Trainer(cfg, resume=True).run() is not None
    rows = [r for r in rows_of(run) if r["kind"] == "train"]
    skipped = [r["step"] for r in rows if r.get("skipped")]
    assert [r["step"] for r in rows] == list(range(1, 9)) and skipped == [1, 2, 4, 6], rows
    assert all(not math.isfinite(r["grad_norm"]) for r in rows if r.get("skipped"))
    assert all(math.isfinite(r["grad_norm"]) for r in rows if not r.get("skipped"))
    assert scalers[-1].get_scale() == 2.0**12 / 2**4
    hf = hf_lr_factors("cosine", 8, 2, skipped=set(skipped))
    assert [r["lr"] for r in rows] == pytest.approx([1e-3 * f for f in hf], rel=1e-12)
    assert [r.get("skipped_steps", 0) for r in rows] == [
        sum(s <= r["step"] for s in skipped) for r in rows]


def test_the_skip_rule_of_the_lr_oracle_is_transformers_trainers(tmp_path):
    """``hf_lr_factors(skipped=...)`` (the oracle of the fp16 run above) is what transformers'
    Trainer does: a tiny Llama trained by it at fp16 with a GradScaler (on CPU accelerate makes
    none: a CPU one is set on its accelerator), the gradients of steps 2, 3 and 6 made inf. With
    optim "adamw_torch" its scheduler holds over those steps. (Its default "adamw_torch_fused"
    advances it: accelerate detects a skip by optimizer.step not being called, and GradScaler
    calls a fused AdamW's step, which skips inside; accelerate issue #4242, its intent is to
    hold.)"""
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48,
                                         num_hidden_layers=1, num_attention_heads=4,
                                         num_key_value_heads=2))
    data = [{"input_ids": torch.randint(0, 64, (16,)), "labels": torch.randint(0, 64, (16,))}
            for _ in range(7)]
    now, inject = [0], {2, 3, 6}
    model.model.layers[0].mlp.down_proj.weight.register_hook(
        lambda g: torch.full_like(g, math.inf) if now[0] in inject else g)

    class Step(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            now[0] = state.global_step + 1

    args = TrainingArguments(output_dir=str(tmp_path), fp16=True, use_cpu=True, max_steps=7,
                             per_device_train_batch_size=1, learning_rate=1e-3, warmup_steps=2,
                             lr_scheduler_type="cosine", logging_steps=1, report_to=[],
                             save_strategy="no", optim="adamw_torch", disable_tqdm=True)
    hf = Trainer(model=model, args=args, train_dataset=data, callbacks=[Step()])
    hf.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    hf.train()
    logs = [h for h in hf.state.log_history if "learning_rate" in h]
    assert [h["step"] for h in logs if not math.isfinite(h["grad_norm"])] == sorted(inject)
    assert hf.accelerator.scaler.get_scale() == 2.0**10 / 2**3
    want = [1e-3 * f for f in hf_lr_factors("cosine", 7, 2, skipped=inject)]
    assert [h["learning_rate"] for h in logs] == pytest.approx(want, rel=1e-12)


def test_skipped_step_leaves_weights_and_optimizer_untouched():
    model = w.make_model("full")
    opt = w.make_optimizer(model)
    params = [p for p in model.parameters() if p.requires_grad]
    guard = NonFiniteGuard(2)
    ids = torch.randint(0, w.CFG.vocab_size, (17,)).tolist()
    batch = collate([Example(ids, ids[1:] + [-100], "x:1")])

    def step(n, poison):
        loss = sft_loss(model, batch, batch.num_loss_tokens) * (float("nan") if poison else 1.0)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        applied = guard.check(n, loss.item(), norm.item())
        if applied:
            opt.step()
        opt.zero_grad(set_to_none=True)
        return applied

    assert step(1, False)
    before = [p.detach().clone() for p in params]
    adam_steps = [float(opt.state[p]["step"]) for p in params]
    assert not step(2, True)
    assert all(torch.equal(a, p) for a, p in zip(before, params, strict=True))
    assert [float(opt.state[p]["step"]) for p in params] == adam_steps
    assert step(3, False) and guard.skipped == 1
    assert not all(torch.equal(a, p) for a, p in zip(before, params, strict=True))


def test_diverging_run_skips_nonfinite_steps_then_stops(tiny, tmp_path, capsys):
    """lr = 1e30: the first update blows the adapters up, every later step is NaN. Each is
    skipped (weights and optimizer untouched: the checkpoints of steps 1-3 hold the same
    weights), and the run stops at the 3rd in a row with the message, exit status 2."""
    run = tmp_path / "nan"
    config = tmp_path / "nan.toml"
    config.write_text(to_toml(tiny_config(
        tiny, run, "optim.lr=1e30", "optim.warmup_steps=0", "guards.max_nonfinite_in_a_row=3",
        "max_steps=20", "checkpoint.every_steps=1", "checkpoint.keep_last=5", "eval.before=false",
        "eval.metrics=[]")))
    assert main(["train", str(config)]) == 2
    err = capsys.readouterr().err
    assert "ember: error: step 4: loss nan" in err and "3 steps in a row" in err, err
    assert "guards.max_nonfinite_in_a_row" in err
    rows = [r for r in rows_of(run) if r["kind"] == "train"]
    assert [(r["step"], r.get("skipped", False)) for r in rows] == [(1, False), (2, True),
                                                                    (3, True)]
    assert not math.isfinite(rows[1]["loss"]) and math.isfinite(rows[0]["loss"])
    steps = [s for s, _ in dcp.list_checkpoints(run / "checkpoints")]
    assert steps == [1, 2, 3]
    first = checkpoint_weights(run, tmp_path, step=1)
    last = checkpoint_weights(run, tmp_path)
    assert first.keys() == last.keys()
    assert all(torch.equal(first[k], last[k]) for k in first)
    # The streak goes on in a resumed run (allowing 5 in a row): 2 so far, 3 more stop it.
    assert main(["train", str(run), "--resume", "--set", "guards.max_nonfinite_in_a_row=5"]) == 2
    err = capsys.readouterr().err
    assert "step 6: loss nan" in err and "5 steps in a row" in err and "5 skipped in total" in err


def test_oom_in_a_training_step_is_explained(tiny, tmp_path, monkeypatch, capsys):
    """The trainer's step runs under ``oom_guard``: a CUDA OOM there (raised by a stand-in loss
    here, as no GPU is needed) ends ``ember train`` with the message and exit status 2."""
    import ember.engine.objectives as objectives

    real, calls = objectives.sft_loss, []

    def loss_that_runs_out(model, batch, n):
        calls.append(batch.num_tokens)
        if len(calls) == 3:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB")
        return real(model, batch, n)

    monkeypatch.setattr(objectives, "sft_loss", loss_that_runs_out)
    config = tmp_path / "oom.toml"
    config.write_text(to_toml(tiny_config(tiny, tmp_path / "oom", "max_steps=5",
                                          "eval.before=false", "eval.metrics=[]")))
    assert main(["train", str(config)]) == 2
    err = capsys.readouterr().err
    assert f"CUDA out of memory at step 3: a micro-batch of {calls[2]} tokens" in err, err
    assert "activations.checkpointing" in err and "Traceback" not in err


def test_oom_becomes_a_clear_error():
    big = torch.ones(1000)

    def run():
        with oom_guard(batch_tokens=8192, seq_len=4096, device="cpu", step=12, method="full",
                       checkpointing="none", offload=False):
            _ = big * 2  # a frame holding tensors, as a real forward would
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    with pytest.raises(EmberError) as info:
        run()
    msg = str(info.value)
    assert "CUDA out of memory at step 12: a micro-batch of 8192 tokens (longest sequence 4096)" \
        in msg
    for fix in ("data.tokens_per_batch (e.g. to 4096)", "grad_accum",
                "activations.checkpointing = \"every_block\"", "activations.offload = true",
                "method = \"lora\"", "QLoRA", "data.max_seq_len below 4096", "torchrun"):
        assert fix in msg, fix
    assert "mlp_chunk_tokens" not in msg  # 4096-token sequences: MLP chunks would not help
    long = oom_message(batch_tokens=65536, seq_len=65536, device="cpu", mlp_chunk_tokens=0)
    assert "activations.mlp_chunk_tokens = 8192" in long
    assert "mlp_chunk_tokens" not in oom_message(batch_tokens=65536, seq_len=65536,
                                                 device="cpu", mlp_chunk_tokens=4096)
    # The OOM's frames (holding the step's tensors) are released; no CUDA trace is shown.
    assert info.value.__suppress_context__ and info.value.__context__.__traceback__ is None
    with pytest.raises(KeyError):  # anything else passes through untouched
        with oom_guard(batch_tokens=1, seq_len=1, device="cpu"):
            raise KeyError("x")
    with oom_guard(batch_tokens=1, seq_len=1, device="cpu", method="lora",
                   checkpointing="every_block", offload=True):
        pass


def test_graceful_stop_flags_signals_and_restores_handlers():
    messages = []
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with GracefulStop(echo=messages.append) as stop:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGTERM)  # handled between bytecodes, right here
        assert stop.requested and stop.signal_name == "SIGTERM"
        assert "finishing the current step" in messages[0]
        os.kill(os.getpid(), signal.SIGTERM)  # repeated SIGTERMs (torchrun, schedulers) wait
        assert stop.signal_name == "SIGTERM"
        with pytest.raises(KeyboardInterrupt):  # Ctrl-C after a request stops at once
            os.kill(os.getpid(), signal.SIGINT)
        assert "resume with: ember train runs/x --resume" in stop.message(
            3, "ck", "ember train runs/x --resume")
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before
    with GracefulStop(echo=messages.append) as stop:
        os.kill(os.getpid(), signal.SIGINT)  # the first Ctrl-C is a graceful request
        assert stop.signal_name == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)


def test_resume_command():
    assert resume_command("runs/my run") == "ember train 'runs/my run' --resume"
    assert resume_command("r", world_size=8) == \
        "torchrun --standalone --nproc_per_node 8 -m ember.engine.cli train r --resume"
    assert "--nnodes 2" in resume_command("r", world_size=16, nnodes=2)


def test_steps_before_a_skipped_one_keep_their_logged_mean(tiny, tmp_path):
    """log_every = 3 and lr = 1e30: step 1 is applied, steps 2-3 are NaN (skipped) and the run
    ends at 3. The mean of step 1's window was never logged (the skipped rows carry their own
    non-finite loss and the window was dropped at the end); now a row at step 1 logs it, the
    same loss that log_every = 1 logs there."""
    rows = {}
    for every in (1, 3):
        run = tmp_path / f"every{every}"
        config = tmp_path / f"every{every}.toml"
        config.write_text(to_toml(tiny_config(
            tiny, run, "optim.lr=1e30", "optim.warmup_steps=0", f"log_every={every}",
            "guards.max_nonfinite_in_a_row=3", "max_steps=3", "checkpoint.save_final=false",
            "eval.before=false", "eval.metrics=[]", "eval.val_loss=false")))
        assert main(["train", str(config)]) == 0
        rows[every] = [r for r in rows_of(run) if r["kind"] == "train"]
    assert [(r["step"], r.get("skipped", False)) for r in rows[3]] == [(1, False), (2, True),
                                                                       (3, True)]
    assert math.isfinite(rows[3][0]["loss"]) and not math.isfinite(rows[3][1]["loss"])
    assert rows[3][0]["loss"] == rows[1][0]["loss"]


def test_step_log_memory_is_the_training_devices(monkeypatch):
    """The step log's "mem" on a run with device = "cuda:1" (one process, cuda:0 current: only
    torchrun sets the device) read torch.cuda.max_memory_allocated() with no device, i.e. the
    current device's peak, not the run's (about 0 GiB). Oracle: torch.cuda's device=None means
    the current device, as oom_message already accounts for."""
    from ember.engine.runtime import memory_gib

    asked = []
    monkeypatch.setattr(torch.cuda, "max_memory_allocated",
                        lambda device=None: asked.append(device) or 3 * 2**30)
    assert memory_gib("cuda:1") == 3.0
    assert memory_gib("cuda") == 3.0
    assert [torch.device(d) if d is not None else None for d in asked] == [
        torch.device("cuda:1"), torch.device("cuda")]
