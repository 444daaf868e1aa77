"""Robustness in the training loop: non-finite steps, out-of-memory, graceful stop on signals.

- ``NonFiniteGuard``: a step whose loss or gradient norm is NaN/inf is skipped (no optimizer
  update; the data still advances, so a bad batch is not retried forever) and counted; after
  ``max_in_a_row`` consecutive bad steps the run stops with a message naming the likely causes.
  With fp16's ``GradScaler`` pass ``loss_scale`` (the scale the step ran at): a non-finite
  gradient norm is then the step the scaler skips (it halves the scale); it is skipped and
  logged as any other, but while the scale is above 1 it is the scaler calibrating (from 2^16 at
  the start of training) and does not count toward the limit; at a scale <= 1 the gradients
  overflow (or are NaN) unscaled, and it counts. A skipped step does not advance the lr
  schedule (the trainer's ``lr_factor(step - guard.skipped)``), as transformers' Trainer steps
  its scheduler only when accelerate reports the optimizer step not skipped.
- ``oom_guard``: turns ``torch.cuda.OutOfMemoryError`` into an ``EmberError`` with the numbers
  (tokens in the micro-batch, longest sequence, peak and total GPU memory) and what to change.
- ``GracefulStop``: SIGTERM (schedulers' preemption notice, ``kill``) and SIGINT (Ctrl-C) set a
  flag; the loop finishes the current step, writes a checkpoint and exits 0 printing the command
  that resumes. Ctrl-C after a stop request stops at once (no checkpoint).
"""

from __future__ import annotations

import math
import shlex
import signal
import sys
import threading
from dataclasses import dataclass

import torch

from ember import EmberError


@dataclass(frozen=True, kw_only=True)
class GuardConfig:
    """``[guards]`` in a run config."""

    # consecutive NaN/inf steps (each skipped) before stopping; fp16: a step the GradScaler
    # skips counts only at a loss scale <= 1 (above, the scaler is calibrating)
    max_nonfinite_in_a_row: int = 5

    def __post_init__(self) -> None:
        n = self.max_nonfinite_in_a_row
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise EmberError(f"guards.max_nonfinite_in_a_row must be an integer >= 1, got {n!r}")


class NonFiniteGuard:
    """``ok = guard.check(step, loss, grad_norm)``: apply the optimizer update only when ok
    (otherwise zero the gradients and go on). Raises EmberError after ``max_in_a_row`` bad steps
    in a row. Under FSDP pass the all-reduced loss and the global norm, so every rank agrees."""

    def __init__(self, max_in_a_row: int = 5):
        if max_in_a_row < 1:
            raise EmberError(f"max_in_a_row must be >= 1, got {max_in_a_row}")
        self.max_in_a_row = max_in_a_row
        self.in_a_row = 0  # skipped steps in a row, calibrating ones included
        self.counted = 0  # of them, since the last step that was applied, those that count
        self.skipped = 0
        self.last_bad: int | None = None

    def check(self, step: int, loss: float, grad_norm: float | None = None, *,
              loss_scale: float | None = None) -> bool:
        loss, norm = float(loss), None if grad_norm is None else float(grad_norm)
        if math.isfinite(loss) and (norm is None or math.isfinite(norm)):
            self.in_a_row = self.counted = 0
            return True
        self.in_a_row += 1
        self.skipped += 1
        self.last_bad = step
        if math.isfinite(loss) and loss_scale is not None and loss_scale > 1.0:
            return False  # fp16: the scaler lowers its scale and skips (calibrating)
        self.counted += 1
        if self.counted >= self.max_in_a_row:
            what = f"loss {loss}" + ("" if norm is None else f", gradient norm {norm}")
            if loss_scale is not None:
                what += f" at fp16 loss scale {loss_scale:g}"
            raise EmberError(
                f"step {step}: {what}. {self.counted} steps in a row had a NaN/inf loss or "
                f"gradients (each was skipped; {self.skipped} skipped in total), so the run "
                "stops. Usual causes: a learning rate too high (lower optim.lr, or add warmup "
                "with optim.warmup_steps), fp16 overflow (use precision = \"bf16\"), or broken "
                "data: fix it in a new run (a resumed run keeps its optim and data settings), or "
                "allow more with guards.max_nonfinite_in_a_row and --resume.")
        return False

    def state_dict(self) -> dict:
        return {"in_a_row": self.in_a_row, "counted": self.counted, "skipped": self.skipped,
                "last_bad": self.last_bad}

    def load_state_dict(self, state: dict) -> None:
        self.in_a_row, self.skipped = int(state["in_a_row"]), int(state["skipped"])
        self.counted = int(state.get("counted", self.in_a_row))  # older checkpoints: all counted
        self.last_bad = state.get("last_bad")


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def oom_message(*, batch_tokens: int, seq_len: int, device, step: int | None = None,
                method: str | None = None, checkpointing: str | None = None,
                offload: bool | None = None, mlp_chunk_tokens: int | None = None) -> str:
    """The explanation of a CUDA out-of-memory error, with numbers and remedies."""
    where = f" at step {step}" if step is not None else ""
    lines = [f"CUDA out of memory{where}: a micro-batch of {batch_tokens} tokens (longest "
             f"sequence {seq_len})."]
    if torch.cuda.is_available():
        dev = torch.device(device)
        idx = dev.index if dev.index is not None else torch.cuda.current_device()
        total = torch.cuda.get_device_properties(idx).total_memory
        lines.append(f"Peak allocated {_gib(torch.cuda.max_memory_allocated(idx))}, reserved "
                     f"{_gib(torch.cuda.max_memory_reserved(idx))} of {_gib(total)} on "
                     f"cuda:{idx}.")
    fixes = [f"lower data.tokens_per_batch (e.g. to {max(1, batch_tokens // 2)}) and raise "
             "grad_accum to keep the same batch per optimizer step"]
    if checkpointing in (None, "none", "every_k"):
        fixes.append("activation checkpointing: activations.checkpointing = \"every_block\"")
    if not offload:
        fixes.append("offload checkpointed activations to CPU: activations.offload = true")
    if not mlp_chunk_tokens and seq_len > 8192:
        fixes.append("long sequences: run the MLP in token chunks, activations.mlp_chunk_tokens = "
                     "8192 (a block's MLP activations then stop growing with the sequence)")
    if method != "lora":
        fixes.append("LoRA instead of full fine-tuning (method = \"lora\")")
    fixes += ["QLoRA: a 4-bit (NF4) base model",
              f"shorter examples: data.max_seq_len below {seq_len}",
              "more GPUs: torchrun --nproc_per_node N shards weights, gradients and optimizer "
              "state (FSDP)"]
    lines.append("To fit, try (cheapest first):\n" + "\n".join(f"  - {f}" for f in fixes))
    return "\n".join(lines)


class oom_guard:  # noqa: N801 (used like a function: ``with oom_guard(...):``)
    """Wrap one micro-batch's forward + backward (and the optimizer step): a CUDA OOM becomes an
    EmberError from ``oom_message`` (``context``: step, method, checkpointing, offload)."""

    def __init__(self, *, batch_tokens: int, seq_len: int, device, **context):
        self.kw = dict(batch_tokens=batch_tokens, seq_len=seq_len, device=device, **context)

    def __enter__(self) -> oom_guard:
        return self

    def __exit__(self, typ, exc, tb) -> bool:
        if typ is None or not issubclass(typ, torch.cuda.OutOfMemoryError):
            return False
        # Drop the traceback: its frames hold the step's activations, which the caller (who may
        # save a checkpoint or retry smaller) needs freed.
        exc.__traceback__ = None
        del tb
        message = oom_message(**self.kw)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        raise EmberError(message) from None


def resume_command(run_dir, world_size: int = 1, nnodes: int = 1) -> str:
    """The shell command that continues the run in ``run_dir``."""
    run = shlex.quote(str(run_dir))
    if world_size > 1 or nnodes > 1:
        nodes = (f" --nnodes {nnodes} (plus your rendezvous flags)" if nnodes > 1
                 else " --standalone")
        per_node = max(1, world_size // max(1, nnodes))
        return (f"torchrun{nodes} --nproc_per_node {per_node} -m ember.engine.cli train {run} "
                "--resume")
    return f"ember train {run} --resume"


class GracefulStop:
    """Context manager that installs SIGTERM/SIGINT handlers recording a stop request.

    In the loop: ``if stop.requested: save a checkpoint, print stop.message(cmd), return``
    (under torchrun combine the ranks' flags with ``distributed.any_rank`` so all ranks stop at
    the same step). SIGINT after a request raises KeyboardInterrupt at once. Outside the main thread
    (where Python cannot install handlers) it does nothing."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, echo=None):
        self.signal_name: str | None = None
        self._previous: dict = {}
        self._echo = echo or (lambda msg: print(msg, file=sys.stderr, flush=True))

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.signal_name is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal_name = name
        self._echo(f"{name} received: finishing the current step, then saving a checkpoint "
                   "(Ctrl-C again to stop now, without a checkpoint)")

    def __enter__(self) -> GracefulStop:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def message(self, step: int, checkpoint, resume: str) -> str:
        return (f"stopped by {self.signal_name} after step {step}; checkpoint {checkpoint}\n"
                f"resume with: {resume}")
