"""Fingerprints of the weights a run reads again instead of saving them (the base under LoRA /
prompt tuning, frozen layers, an objective's frozen models): the exact bytes of up to 4096 evenly
strided values of each tensor. About 0.06 s on SmolLM2-135M's 272 tensors on a CPU (its load from
the GGUF: 22 s); the cost grows with the number of tensors, not their size (an 8B Llama has 291).

``state.base_fingerprint`` is the one a checkpoint records for a resume (of the model as built);
``weights_fingerprint`` of the base as loaded from model.name (before a head, adapters, PiSSA's
residual): what ``final/base.json`` records, and a checkpoint beside it, for ``load_run_model``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import torch

BASE_FILE = "base.json"  # in <run_dir>/final: the base a final adapter was trained on


def weights_fingerprint(model, keep: Callable[[str], bool] | None = None) -> str:
    """The fingerprint of ``model``'s state dict (of the entries whose name ``keep`` accepts);
    meta tensors (a rank that holds no weights) are skipped."""
    h = hashlib.blake2b(digest_size=16)
    for name, t in model.state_dict().items():
        if (
            (keep is not None and not keep(name))
            or not isinstance(t, torch.Tensor)
            or (t.device.type == "meta")
        ):
            continue
        flat = t.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 4096)][:4096].contiguous().cpu()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(sample.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def write_base_file(final: Path, model_name: str, fingerprint: str) -> None:
    """``final/base.json``: beside (not in) the PEFT adapter, whose files stay PEFT's."""
    (final / BASE_FILE).write_text(
        json.dumps({"model": model_name, "fingerprint": fingerprint}) + "\n"
    )


def read_base_file(final: Path, field: str = "fingerprint") -> str | None:
    """What ``final/base.json`` records under ``field`` ("fingerprint", or "model": the base's
    name); None for a run written before it."""
    try:
        return json.loads((final / BASE_FILE).read_text()).get(field)
    except (OSError, ValueError, AttributeError):
        return None


RUN_END_FILE = "run_end.json"  # in <run_dir>/final: the step of the run's end it was exported at


def write_run_end(final: Path, step: int) -> None:
    """``final/run_end.json``: the step the run ended at when ``final/`` was written (with
    early stopping the weights are the best step's; this is the run's last step)."""
    (final / RUN_END_FILE).write_text(json.dumps({"step": int(step)}) + "\n")


def stale_final(run_dir: Path) -> str | None:
    """A note when ``final/`` predates the run's newest checkpoint: a ``--resume`` that trained
    further (a larger max_steps) stopped before its own export, so final/ holds the older end's
    weights. None otherwise, and for a run written before ``run_end.json``."""
    from ember.engine import dcp

    try:
        step = int(json.loads((run_dir / "final" / RUN_END_FILE).read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    # The newest step_<N> folder's step: a checkpoint is written under a temporary name and
    # renamed when complete (not verified here: hashing a checkpoint's files for a note cost
    # every eval / generate / export a read of its shards)
    newest = max((s for s, _ in dcp.list_checkpoints(dcp.checkpoint_root(run_dir))), default=None)
    if newest is None or newest <= step:
        return None
    return (f"note: {run_dir / 'final'} holds the weights of the run's end at step {step}, but "
            f"its checkpoint of step {newest} is newer (a --resume that stopped before its "
            "end?); "
            f"using final/. Finish the run (ember train {run_dir} --resume) to export step "
            f"{newest}'s and later weights, or delete final/ to use the checkpoint's")
