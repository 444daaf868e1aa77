"""The precomputed reference log-probs of DPO / KTO (``precompute_ref_log_probs``) kept in
``<run_dir>/reference/logps.safetensors``, so that ``--resume`` loads them instead of scoring the
whole training and validation data again (minutes to hours on a real model).

The file holds each split's documents' values (float32, exactly the values training used) and,
as its metadata, the key they were computed under: the fingerprints of the reference's weights
(the base a LoRA reference is, a full fine-tune's frozen copy, a continued adapter: those a
checkpoint records), a digest of each split's tokenized examples (so a changed data line,
data.max_seq_len, truncation, template or tokenizer changes it), and the settings that change the
forward without changing those (objective, precision, model dtype / quantization / RoPE scaling,
DPO's ld_alpha). A key that differs in any part recomputes, saying which part. TRL 1.16 does the
same with a datasets cache file keyed by (the tokenized dataset's fingerprint, a hash of the
reference module), rank 0's key broadcast, the main process writing and every rank reading.

Under torchrun every rank holds all values after the precompute (``scored_batches`` gathers
them): rank 0 writes the file, and at a resume rank 0 reads it and broadcasts the values, so the
ranks cannot disagree on whether to recompute (a collective each rank must join).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ember.engine.distributed import DistInfo, barrier, broadcast_object
from ember.engine.packing import Example

FILE = "logps.safetensors"

# fmt: off
# The TrainConfig fields that change the reference's log-probs but neither its weights
# (fingerprinted) nor its tokenized examples (digested): the key holds their values.
FORWARD_SETTINGS = ("objective", "method", "precision", "model.dtype", "model.quantize",
                    "model.double_quant", "model.rope_scaling", "model.rope_factor",
                    "dist.mixed_precision", "dpo.ld_alpha")
# Every other field, by why it does not ("section.*": all of that section's, as the optimizer's and
# the schedule's act after the values; tests/engine/test_precompute_reference.py fails on a field
# in neither: a new one must be placed in one of the two)
NOT_FORWARD_SETTINGS: dict[str, tuple[str, ...]] = {
    "the reference's weights (fingerprinted)": ("model.name", "model.init"),
    "the adapters: scaled to 0 in the reference, or (continued, PiSSA / OLoRA) swapped in as "
    "loaded and fingerprinted": (
        "lora.rank", "lora.alpha", "lora.dropout", "lora.targets", "lora.use_rslora",
        "lora.init", "lora.use_dora", "lora.embedding_lr", "prompt_tuning.num_virtual_tokens",
        "prompt_tuning.init", "prompt_tuning.init_text"),
    "the tokenized examples (digested) or the order they are scored in": (
        "data.train", "data.mix", "data.validation", "data.val_fraction", "data.test",
        "data.format", "data.loss_on", "data.max_seq_len", "data.truncation", "data.bad_lines",
        "data.seed", "data.order", "data.system_prompt", "data.use_chat_template", "data.add_eos",
        "task.name", "task.train", "task.validation", "task.test", "task.seed"),
    "how documents are batched and run: the same values up to rounding": (
        "data.packing", "data.tokens_per_batch", "activations.checkpointing",
        "activations.every_k", "activations.offload", "activations.mlp_chunk_tokens",
        "dist.reshard_after_forward", "device", "threads"),
    "off in the reference's eval-mode forward": (
        "model.attention_dropout", "neftune_noise_alpha", "dpo.disable_dropout",
        "orpo.disable_dropout", "simpo.disable_dropout", "cpo.disable_dropout",
        "kto.disable_dropout"),
    "the losses and training on top of the values": (
        "model.router_aux_loss_coef", "distill.teacher", "distill.temperature", "distill.alpha",
        "dpo.beta", "dpo.loss_type", "dpo.loss_weights", "dpo.label_smoothing", "dpo.sft_weight",
        "dpo.f_divergence_type", "dpo.f_alpha_divergence_coef", "dpo.discopop_tau",
        "dpo.use_weighting", "dpo.precompute_ref_log_probs", "orpo.beta", "simpo.beta",
        "simpo.gamma", "simpo.label_smoothing", "simpo.sft_weight", "simpo.alpha", "cpo.beta",
        "cpo.loss_type", "cpo.label_smoothing", "cpo.cpo_alpha", "cpo.simpo_gamma", "cpo.alpha",
        "kto.beta",
        "kto.desirable_weight",
        "kto.undesirable_weight", "kto.loss_type", "kto.precompute_ref_log_probs", "head.type",
        "head.labels", "head.label_field", "head.center_rewards_coefficient", "freeze",
        "train_layers", "optim.*", "guards.max_nonfinite_in_a_row", "grad_accum", "max_steps",
        "epochs", "seed"),
    "TR-DPO's reference updates: refused with precompute_ref_log_probs (no values to key)": (
        "dpo.sync_ref_model", "dpo.ref_model_mixup_alpha", "dpo.ref_model_sync_steps",
        "kto.sync_ref_model", "kto.ref_model_mixup_alpha", "kto.ref_model_sync_steps"),
    "bookkeeping": (
        "name", "run_dir", "eval.*", "checkpoint.*", "dist.timeout_minutes", "log_every", "plot",
        "tensorboard"),
}
# fmt: on


def forward_settings(cfg) -> dict[str, object]:
    """The values of ``FORWARD_SETTINGS`` in the TrainConfig ``cfg``, by dotted name."""
    return {n: functools.reduce(getattr, n.split("."), cfg) for n in FORWARD_SETTINGS}


def cache_path(run_dir: Path) -> Path:
    return Path(run_dir) / "reference" / FILE


def examples_digest(examples: list[Example]) -> str:
    """A digest of what a reference forward reads of ``examples``: tokens, labels, documents."""
    h = hashlib.blake2b(digest_size=16)
    h.update(str(len(examples)).encode())
    for e in examples:
        h.update(np.asarray(e.input_ids, dtype=np.int64).tobytes())
        h.update(np.asarray(e.labels, dtype=np.int64).tobytes())
        h.update(f"|{e.doc_lengths}|{e.first_label}|".encode())
    return h.hexdigest()


def cache_key(
    splits: dict[str, list[Example]], prints: dict[str, str], settings: dict[str, object]
) -> dict[str, str]:
    """The key of a precompute (safetensors metadata: strings): ``prints`` the reference's
    weight fingerprints by role, ``splits`` the examples scored by name, ``settings`` by name."""
    key = {"reference": json.dumps(prints, sort_keys=True)}
    key.update({f"data {name}": examples_digest(ex) for name, ex in splits.items()})
    key.update({f"setting {name}": json.dumps(v) for name, v in settings.items()})
    return key


def _split_why(name: str, was: dict[str, str]) -> str:
    if f"data {name}" not in was:
        return f"the {name} split was not scored"
    return (
        f"the {name} examples differ (a data line, data.max_seq_len, truncation, the "
        "template or the tokenizer changed)"
    )


def _load(path: Path, key: dict[str, str]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """(the values of each split whose part of ``key`` the file at ``path`` holds, why each
    other split's do not apply); none when the reference or a setting differs."""
    if not path.exists():
        return {}, []
    try:
        with safe_open(str(path), framework="pt") as f:
            was = f.metadata() or {}
            for part, value in key.items():
                if part.startswith("data ") or was.get(part) == value:
                    continue
                if part == "reference":
                    return {}, ["the reference model's weights differ"]
                return {}, [f"{part[8:]} changed ({was.get(part, 'unset')} -> {value})"]
            names = [p[5:] for p in key if p.startswith("data ")]
            keep = [n for n in names if was.get(f"data {n}") == key[f"data {n}"]]
            return (
                {n: f.get_tensor(f"data {n}") for n in keep},
                [_split_why(n, was) for n in names if n not in keep],
            )
    except Exception as e:  # a torn or foreign file: recomputed, not fatal
        return {}, [f"{path} could not be read ({type(e).__name__}: {e})"]


def load_cached(
    run_dir: Path, splits: dict[str, list[Example]], key: dict[str, str], info: DistInfo
) -> tuple[int, str]:
    """Set the ``ref_logps`` of the examples of each split the run's saved file holds under
    ``key`` (rank 0 reads it and broadcasts, so all ranks agree); returns (documents set, why
    the other splits' values do not apply: "" when all do or there is no file)."""
    path = cache_path(run_dir)
    values, why = {}, []
    if info.is_main:
        values, why = _load(path, key)
        values = {name: t.tolist() for name, t in values.items()}  # (floats: exact, picklable)
    values, why = broadcast_object((values, why), info)
    n = 0
    for name, examples in splits.items():
        if name not in values:
            continue
        flat, at = values[name], 0  # (the digest covers the number of documents)
        for e in examples:
            k = len(e.doc_lengths)
            e.ref_logps, at = tuple(flat[at : at + k]), at + k
        n += at
    return n, "; ".join(why)


def save_cached(
    run_dir: Path, splits: dict[str, list[Example]], key: dict[str, str], info: DistInfo
) -> None:
    """Rank 0 writes every example's ``ref_logps`` under ``key`` (atomically: a resume never
    reads half a file); the other ranks wait for it."""
    if info.is_main:
        path = cache_path(run_dir)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {
            f"data {name}": torch.tensor(
                [x for e in ex for x in e.ref_logps], dtype=torch.float32
            ).reshape(-1)
            for name, ex in splits.items()
        }
        tmp = path.with_suffix(".tmp")
        save_file(tensors, str(tmp), metadata=key)
        os.replace(tmp, path)
    barrier(info)
