"""A run's checkpoints, resume and final export, the same for one process and under torchrun.

Checkpoints go through ``ember.engine.dcp`` (atomic, a manifest with sizes and sha256, loadable
by any number of processes) into ``<run_dir>/checkpoints/step_N/``: the trainable weights and
the optimizer state (sharded by rank), every rank's RNG states, the resolved config, and
``extra``:

    progress   step, tokens seen, seconds trained, early-stopping state, scores before training
               (the lr schedule is a function of the step less the guard's skipped steps:
               ``schedules.lr_factor``)
    data       the data position in terms that do not depend on the number of processes
    guard      the non-finite guard's streak and total
    scaler     the fp16 GradScaler (fp16 only)

``--resume`` takes the newest checkpoint that verifies, naming every newer one it skips (and
refusing when checkpoints exist but none is usable). The run's config must equal the
checkpoint's except for ``RESUMABLE_CHANGES``; ``grad_accum`` may change with the number of
processes as long as ``grad_accum * processes`` (packed batches per optimizer step) does not.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ember import EmberError
from ember.engine import dcp, hfdatasets
from ember.engine.config import TrainConfig, from_dict, parse_toml, to_dict, to_toml
from ember.engine.data import PackedBatches
from ember.engine.distributed import (
    DistInfo,
    barrier,
    broadcast_object,
    data_state,
    gather_full_state_dict,
    restore_data_state,
)
from ember.engine.fingerprint import (
    weights_fingerprint,
    write_base_file,
    write_run_end,
)
from ember.engine.guards import NonFiniteGuard
from ember.engine.objectives import DROPOUT_OFF_OBJECTIVES
from ember.engine.run_model import (  # noqa: F401 (re-exported: they were in this module)
    check_models,
    export_final_adapter,
    load_run_model,
    run_weights,
)
from ember.engine.runtime import PATH_KEYS, absolute_paths
from ember.engine.stages import base_of
from ember.models.loading import save_pretrained
from ember.models.lora import apply_lora, save_adapter
from ember.models.lora_init import changes_base
from ember.models.prompt_tuning import (
    PromptEmbedding,
    save_prompt_adapter,
)
from ember.models.transformer import Transformer

# Settings a resumed run may change: they do not alter the trajectory up to the checkpoint (a
# run directory may also move). grad_accum is checked by ``restore_data_state`` instead: the
# batches per optimizer step, all processes together, must stay the same.
RESUMABLE_CHANGES = {"eval", "checkpoint", "max_steps", "epochs", "log_every", "plot", "threads",
                     "activations", "guards", "grad_accum", "name", "run_dir"}


@dataclass
class Progress:
    step: int = 0
    tokens: int = 0
    seconds: float = 0.0
    best: float | None = None  # early stopping: the best score so far
    bad_evals: int = 0  # early stopping: evaluations since the best
    best_step: int | None = None  # early stopping: the step of the best (weights in best/)
    best_scores: dict = field(default_factory=dict)  # early stopping: the best's scores
    before: dict = field(default_factory=dict)  # scores before fine-tuning
    stopped: bool = False  # early stopping ended the run (a --resume of it has nothing to do)
    # The applied steps since the last train row of metrics.jsonl: {name: [sum, count]} of the
    # loss and the objective's metrics, whose means the next row logs (``Trainer._log_means``)
    log_window: dict = field(default_factory=dict)


def open_run(cfg: TrainConfig, info: DistInfo, *, resume: bool, echo) -> Path | None:
    """Check the run directory and write the resolved config; returns the checkpoint to resume
    from (None: start at step 0). Every rank must call it."""
    check_models(cfg)  # before the run directory is written
    root = dcp.checkpoint_root(cfg.out_dir)
    latest = None
    if not resume:
        taken = broadcast_object(bool(dcp.list_checkpoints(root)) if info.is_main else None, info)
        if taken:
            raise EmberError(f"{cfg.out_dir} already holds a run with checkpoints; continue it "
                             "with --resume, or start a new one with --set run_dir=<new folder>")
    else:
        found = dcp.find_latest(root, info, level=cfg.checkpoint.verify)
        for msg in found.skipped:
            echo(f"resume: {msg}")
        latest = found.path
        if latest is None and found.skipped:
            raise EmberError(f"cannot resume {cfg.out_dir}: none of its checkpoints is usable "
                             "(see above); move them away to start again from step 0")
        if latest is None:
            echo(f"resume: no checkpoint in {root}, starting from step 0")
        else:
            for note in _check_same_run(latest, cfg):
                echo(f"resume: {note}")
    if latest is None:
        # a distill.teacher without the distill objective (a checkpoint's run continues as it
        # ran: an older Ember allowed one)
        from ember.engine.objectives import check_teacher

        check_teacher(cfg)
        # starting at step 0 would write over a finished run's exported weights
        kept = broadcast_object(_has_final(cfg.out_dir) if info.is_main else None, info)
        if kept:
            raise EmberError(f"{cfg.out_dir} holds a finished run's final/ output (and no "
                             "checkpoint to continue from); a new run there would overwrite it "
                             "(or, with checkpoint.save_final = false, leave it beside its own "
                             "checkpoints as if it were its output): move final/ away, or start "
                             "the new run with --set run_dir=<new folder>")
    if info.is_main:
        cfg.out_dir.mkdir(parents=True, exist_ok=True)
        (cfg.out_dir / "config.toml").write_text(to_toml(cfg), encoding="utf-8")
    barrier(info)
    return latest


def _has_final(run_dir: Path) -> bool:
    final = run_dir / "final"
    return final.is_dir() and any(final.iterdir())


def checkpoint_config(path: Path) -> TrainConfig:
    """The config a checkpoint was written with."""
    where = path / "config.toml"
    try:
        text = where.read_text(encoding="utf-8")
    except OSError:
        raise EmberError(f"{path} has no config.toml: not a checkpoint of an ember run") from None
    raw = parse_toml(text, str(where))
    # A checkpoint written before <objective>.disable_dropout existed (its config names every
    # field of the section) trained with dropout on: say so, so a resume onto today's default
    # (off) is refused as a changed setting rather than training on differently
    name = raw.get("objective")
    if name in DROPOUT_OFF_OBJECTIVES and isinstance(raw.get(name), dict):
        raw[name].setdefault("disable_dropout", False)
    return from_dict(TrainConfig, raw)


def _relocated(old, new) -> bool:
    """``old`` (a checkpoint's local path, or a list of them) and ``new`` name the same files:
    the same file or folder (symlinks included), or ``old``, recorded absolute, is gone and
    ``new`` of the same name exists (the folder the run started in was moved or renamed, as
    a run recording relative paths resumed after)."""
    if isinstance(old, list) and isinstance(new, list):
        return len(old) == len(new) and all(map(_relocated, old, new))
    if not (isinstance(old, str) and isinstance(new, str) and os.path.isabs(old)):
        return False
    o, n = Path(old), Path(new).expanduser()
    src = hfdatasets.source(n)  # "folder:split" (a datasets folder): the same split of it
    if src is not None and src[1] is not None and old.endswith(f":{src[1]}"):
        o, n = Path(old[: -len(src[1]) - 1]), src[0]
    if o.exists() and n.exists():
        return os.path.samefile(o, n)
    return not o.exists() and n.exists() and o.name == n.name


def _check_same_run(path: Path, cfg: TrainConfig) -> list[str]:
    """EmberError unless ``cfg`` continues the run of checkpoint ``path``; returns notes on the
    local paths found elsewhere since (a moved project folder)."""
    # A checkpoint written before local paths were recorded absolute: its relative ones as seen
    # from here (the folder it started in, where they were found), like cfg's (``resolve``)
    a, b = to_dict(absolute_paths(checkpoint_config(path))), to_dict(cfg)
    notes = []
    for key in PATH_KEYS:
        section, name = key.split(".")
        old, new = a.get(section, {}).get(name), b.get(section, {}).get(name)
        if old != new and _relocated(old, new):
            a[section][name] = new
            notes.append(f"{key} was {old!r}, now {new!r} (the same name where the run is "
                         "resumed from)")
    for d in (a, b):  # how long collectives may wait, and FSDP's memory/communication trade
        for key in ("timeout_minutes", "reshard_after_forward"):  # alter no number: may change
            d.get("dist", {}).pop(key, None)
    diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k) and k not in RESUMABLE_CHANGES)
    if diff:  # each differing key with both values: lora.rank (4 in the checkpoint, now 8)
        keys = []
        for k in diff:
            old, new = a.get(k), b.get(k)
            if isinstance(old, dict) and isinstance(new, dict):
                keys += [(f"{k}.{kk}", old.get(kk), new.get(kk))
                         for kk in sorted(set(old) | set(new)) if old.get(kk) != new.get(kk)]
            else:
                keys.append((k, old, new))
        diff = [f"{k} ({o!r} in the checkpoint, now {n!r})" for k, o, n in keys]
        raise EmberError(f"cannot resume {cfg.out_dir}: the config differs from the checkpoint's "
                         f"in {', '.join(diff)}; resume with the same settings (only "
                         f"{', '.join(sorted(RESUMABLE_CHANGES))} may change)")
    return notes


def base_fingerprint(model, *, trained: bool = False) -> str:
    """A fingerprint of the weights a run does not train and so does not checkpoint (the base
    under LoRA / prompt tuning, frozen layers, a QLoRA base's packed 4-bit entries), rebuilt from
    the model folder at a resume: the exact bytes of up to 4096 evenly strided values of each.
    Call it on the built model before activation checkpointing and sharding (names as built).
    ``trained``: of the trained parameters instead (a continued adapter as loaded: DPO's
    reference). An objective's frozen models (a teacher, a reference copy) have no trained ones:
    the default covers them whole."""
    grads = {n for n, p in model.named_parameters() if p.requires_grad}
    return weights_fingerprint(model, lambda name: (name in grads) == trained)


# ModelConfig fields that do not change what the model computes (token ids, the stored dtype,
# multimodal bookkeeping): not compared at a resume
_NOT_ARCHITECTURE = ("bos_token_id", "eos_token_id", "pad_token_id", "torch_dtype", "extra")


def model_architecture(model) -> dict | None:
    """What a checkpoint records of the model a run trains, rebuilt from model.name's
    config.json at a resume: its ``ModelConfig`` (activation, RoPE and its scalings, windows,
    norms...) as plain values; None for a model without one."""
    cfg = getattr(model, "cfg", None)
    if not dataclasses.is_dataclass(cfg):
        return None

    def plain(v):
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v if v is None or isinstance(v, (bool, int, float, str)) else repr(v)

    return {k: plain(v) for k, v in dataclasses.asdict(cfg).items() if k not in _NOT_ARCHITECTURE}


def save(cfg: TrainConfig, info: DistInfo, model, optimizer, *, progress: Progress,
         batches: PackedBatches, guard: NonFiniteGuard, scaler=None,
         base: str | None = None, frozen: dict[str, str] | None = None,
         base_files: str | None = None, model_config: dict | None = None,
         write_more=None) -> Path:
    """Checkpoint the run after ``progress.step`` (every rank; gradients must be cleared);
    ``write_more``: ``dcp.save``'s (the objective's own training state, in the same save);
    ``base``: the model's ``base_fingerprint``; ``frozen``: the objective's (``fingerprints``:
    its teacher's, its reference's) by role; ``base_files``: the ``weights_fingerprint`` of the
    base as loaded (``load_run_model`` checks a PiSSA run's by it); ``model_config``: the
    model's ``model_architecture``."""
    extra = {"progress": dataclasses.asdict(progress),
             "data": data_state(batches, cfg.grad_accum * info.world_size),
             "guard": guard.state_dict()}
    if base is not None:
        extra["base"] = base
    if frozen:
        extra["frozen"] = dict(frozen)
    if base_files is not None:
        extra["base_files"] = base_files
    if model_config is not None:
        extra["model_config"] = model_config
    if scaler is not None:
        extra["scaler"] = scaler.state_dict()
    return dcp.save(dcp.checkpoint_root(cfg.out_dir), progress.step, model=model,
                    optimizer=optimizer, extra=extra, config_text=to_toml(cfg), info=info,
                    keep_last=cfg.checkpoint.keep_last, write_more=write_more)


def restore(path: Path, info: DistInfo, model, optimizer, *, extra: dict,
            guard: NonFiniteGuard, scaler=None, **_saved) -> Progress:
    """Load a checkpoint into the built (and sharded) model, the optimizer, this rank's RNG, the
    guard and the scaler; returns the run's progress. ``extra``: the checkpoint's extra state as
    ``read_extra`` gave it to the trainer's early refusals, ``check_fingerprints`` (the base and
    frozen models) and ``check_data`` (which restored the data position): neither is repeated
    here. ``_saved``: the rest of what ``save`` takes (the trainer passes one dict to both)."""
    # find_latest has just verified the files at cfg.checkpoint.verify: sizes suffice here.
    extra = dcp.load(path, model=model, optimizer=optimizer, info=info, level="size",
                     extra=extra).extra
    guard.load_state_dict(extra["guard"])
    if scaler is not None and extra.get("scaler"):
        scaler.load_state_dict(extra["scaler"])
    return Progress(**extra["progress"])


def read_extra(path: Path) -> dict:
    """Checkpoint ``path``'s extra state (``save``'s ``extra``), read once at a resume for
    ``check_fingerprints``, ``check_data`` and ``restore``."""
    return torch.load(Path(path) / "extra.pt", weights_only=True)


def check_data(path: Path, batches: PackedBatches, batches_per_step: int, processes: int,
               extra: dict | None = None) -> None:
    """EmberError when checkpoint ``path``'s run trained on other data or batching: the
    refusal ``restore`` would give, before DPO's / KTO's reference precompute rather than after
    it (minutes of forwards on a real model). Otherwise ``batches`` continues at its data
    position. ``extra``: its extra state (``read_extra``; read when None)."""
    extra = read_extra(path) if extra is None else extra
    restore_data_state(batches, extra["data"], batches_per_step, processes)


def check_fingerprints(path: Path, cfg: TrainConfig, extra: dict | None = None, *,
                       base: str | None = None, frozen: dict[str, str] | None = None,
                       model_config: dict | None = None) -> None:
    """EmberError unless the weights a resume rebuilds from files (``base``: the model's
    ``base_fingerprint``; ``frozen``: the objective's by role) are those checkpoint ``path``
    was trained on (``extra``: its extra state, read from it when None). The trainer calls it
    right after building the model, before the data and DPO's / KTO's reference precompute
    (minutes of forwards on a real model, then refused by ``restore``). ``model_config``: the
    rebuilt model's ``model_architecture``, compared field by field with the checkpoint's (a
    field only one of them has, an older or newer Ember's, is not compared)."""
    if extra is None:
        extra = read_extra(path)
    was = extra.get("model_config") or {}
    diff = {k: (was[k], v) for k, v in (model_config or {}).items() if k in was and was[k] != v}
    if diff:
        said = "; ".join(f"{k} {a!r}, now {b!r}" for k, (a, b) in sorted(diff.items()))
        raise EmberError(f"cannot resume {cfg.out_dir}: the model built from model.name "
                         f"{cfg.model.name!r} (its config.json) is not the one its checkpoint "
                         f"{path.name} was trained as: {said}. Restore the config.json the run "
                         "started with, or start a new run with --set run_dir=<new folder>")
    if base is not None and extra.get("base", base) != base:
        init = f", model.init {cfg.model.init!r}" if cfg.model.init else ""
        # PiSSA / OLoRA: the frozen base is a residual recomputed from the model at the resume
        svd = (f", or, with lora.init {cfg.lora.init!r}, the residual base recomputed from them "
               "came out otherwise (another machine, device or LAPACK / cuSOLVER build "
               "decomposes differently)") if cfg.method == "lora" and changes_base(
                   cfg.lora.init) else ""
        raise EmberError(f"cannot resume {cfg.out_dir}: the weights it does not train (the base "
                         f"model, model.name {cfg.model.name!r}{init}) differ from those its "
                         f"checkpoint {path.name} was trained on: the model's files were "
                         f"replaced or retrained since{svd}. Resume with the model the run "
                         "started from, or start a new run with --set run_dir=<new folder>")
    was = extra.get("frozen") or {}
    for role in sorted(frozen or {}):
        if was.get(role, frozen[role]) != frozen[role]:
            what = _frozen_setting(role, cfg)
            raise EmberError(f"cannot resume {cfg.out_dir}: {what} differs from the one its "
                             f"checkpoint {path.name} was trained with: its files were replaced "
                             f"or retrained since. Resume with the files the run started with, "
                             "or start a new run with --set run_dir=<new folder>")


def _frozen_setting(role: str, cfg: TrainConfig) -> str:
    """The frozen model of an objective's ``fingerprints`` role, named by its setting."""
    if role == "teacher":
        return f"the teacher (distill.teacher {cfg.distill.teacher!r})"
    if role == "reference adapter":
        return (f"the {cfg.objective} reference (the starting adapter, model.init "
                f"{cfg.model.init!r})")
    init = f", model.init {cfg.model.init!r}" if cfg.model.init else ""
    return (f"the {cfg.objective} reference (a frozen copy of the starting model, model.name "
            f"{cfg.model.name!r}{init})")


def export_final(model, cfg: TrainConfig, tokenizer, info: DistInfo,
                 step: int | None = None) -> Path | None:
    """The PEFT adapter (LoRA, prompt tuning) or HF model folder (full fine-tuning, in the
    dtype of the base checkpoint: a bf16 model trained in fp32 is written in bf16) in
    ``<run_dir>/final``, written by rank 0 (returned there; None elsewhere). Every rank must call
    it: a sharded model's weights are gathered to rank 0's CPU first. ``step``: the run's last
    step, recorded in ``final/run_end.json`` (``fingerprint.stale_final``)."""
    base_print = getattr(model, "ember_base_print", None)  # (stages.load_start; rank 0's)
    if info.distributed:
        state = gather_full_state_dict(model, trainable_only=cfg.method in ("lora", "prompt"))
        if not info.is_main:
            return None
        # What the export reads besides the weights: the base's generation config, and a
        # continued PEFT adapter's settings (its modules_to_save, bias mode, MiCA init; was:
        # only the last two kept, so a trained lm_head / embed_tokens left the adapter file).
        # (prompt tuning: its init's name, which the adapter config records)
        kept = {k: v for k, v in vars(model).items()
                if k.startswith(("peft_", "hf_", "prompt_tuning_"))}
        model = _unsharded(model.cfg, cfg, state)
        for k, v in kept.items():
            setattr(model, k, v)
    final, base = cfg.out_dir / "final", base_of(cfg)
    if cfg.method in ("prompt", "lora"):
        if cfg.method == "prompt":
            out = save_prompt_adapter(model, final / "adapter", base_model_name_or_path=base)
        else:
            out = save_adapter(model, final / "adapter", base_model_name_or_path=base)
        if base_print is not None:  # the base it applies to, checked by load_run_model
            write_base_file(final, base, base_print)
    else:
        # In the base checkpoint's dtype (cfg.torch_dtype: config.json's, else the stored one),
        # as transformers 5 loads, trains and saves it: fp32 master weights of a bf16 model
        # would double the folder; a bf16 file whose config.json says float32 is trained and
        # saved in fp32 there.
        out = save_pretrained(model, final / "model", tokenizer, dtype=model.cfg.torch_dtype,
                              multimodal_base=multimodal_base(model, cfg))
    if step is not None:
        write_run_end(final, step)
    return out


def multimodal_base(model, cfg: TrainConfig) -> Path | None:
    """The base folder of a run on a multimodal Gemma 3's language model (its vision tower goes
    into a merged / full model folder), or None for a text-only model."""
    model_cfg = getattr(model, "cfg", None)
    if model_cfg is None or not model_cfg.extra.get("multimodal"):
        return None
    from ember.models.hub import resolve_model

    return resolve_model(base_of(cfg))


def _unsharded(model_cfg, cfg: TrainConfig, state: dict) -> Transformer:
    """A plain model holding ``state`` (a gathered state dict), built on the meta device so that
    no weights are allocated twice; with LoRA or prompt tuning only the adapters / virtual tokens
    are real (all an export needs)."""
    with torch.device("meta"):
        model = Transformer(model_cfg)
        if cfg.method == "lora":
            apply_lora(model, cfg.lora)
        elif cfg.method == "prompt":
            model.embed = PromptEmbedding(model.embed, torch.empty(state["embed.prompt"].shape))
    model.load_state_dict(state, strict=cfg.method not in ("lora", "prompt"), assign=True)
    return model
