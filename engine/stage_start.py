"""Where a stage starts (``model.init``; the stages themselves: ``engine/stages.py``, which
re-exports these): ``find_start`` reads a previous run directory or a PEFT adapter folder into a
``Start`` (its kind, its base, its adapter), checks that ``model.name`` is the base it was
trained on (``same_base``), and ``base_of`` / ``start_of`` give a config's base and start.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ember import EmberError
from ember.engine.dcp import MANIFEST
from ember.models.gguf_cache import file_digest, imported_digest
from ember.models.hub import (
    builtin_gguf_path,
    builtin_model,
    hf_cache_snapshot,
    is_gguf_file,
    split_paths,
)
from ember.models.peft_adapter import _read_adapter_config

if TYPE_CHECKING:
    from ember.engine.config import TrainConfig

_KINDS = {"LORA": "lora", "PROMPT_TUNING": "prompt"}


@dataclass(frozen=True)
class Start:
    """Where a stage's weights come from."""

    source: str  # model.init as given
    kind: str  # what it holds: "lora" | "prompt" (an adapter) | "full" (a model folder)
    base: str  # the weights to load: the adapter's base, or the previous full model's folder
    adapter: Path | None = None
    adapter_config: dict = field(default_factory=dict)
    # the earlier run's context extension (model.rope_scaling, rope_factor), which its adapter
    # was trained under and which no adapter file records
    context: tuple[str, float] | None = None


@functools.lru_cache(maxsize=16)
def _gguf_id(path: str, size: int, mtime_ns: int) -> str:
    return f"gguf:{file_digest(*(p for p in split_paths(path) if p.is_file()))}"


def _model_id(name: str) -> str | None:
    """A comparable identity for a model name: the weights it loads (``hub.resolve_model``), so
    that a built-in name or alias, its installed GGUF file and that file's import in Ember's cache
    are one model (a GGUF by its content digest, as the cache names its imports; a folder by its
    resolved path). None when it names nothing on this machine (e.g. a hub id in an adapter
    config)."""
    b = builtin_model(name)
    if b is not None:
        snapshot = hf_cache_snapshot(name)  # resolve_model loads a cached Hub snapshot first
        if snapshot is not None:
            return str(snapshot.resolve())
        try:
            name = str(builtin_gguf_path(b.name))
        except EmberError:  # its package is not installed: only its names are known
            return f"builtin:{b.name}"
    p = Path(name).expanduser()
    if p.is_file() and is_gguf_file(p):
        st = p.stat()
        return _gguf_id(str(p.resolve()), st.st_size, st.st_mtime_ns)
    digest = imported_digest(p)  # a GGUF's import in the cache (or its old name)
    if digest is not None:
        return f"gguf:{digest}"
    return str(p.resolve()) if p.exists() else None


def same_base(a: str, b: str) -> bool | None:
    """True / False when it can be told whether ``a`` and ``b`` are the same model, else None."""
    if a == b:
        return True
    ia, ib = _model_id(a), _model_id(b)
    if ia is None and ib is None:  # two Hub ids, say: the Hub's names ignore case
        return True if a.strip().lower() == b.strip().lower() else None
    return None if ia is None or ib is None else ia == ib


def _check_base(init: str, trained_on: str, model_name: str) -> None:
    if same_base(trained_on, model_name) is False:
        raise EmberError(
            f"model.init {init!r} was trained on the base model {trained_on!r}, but "
            f"model.name is {model_name!r}; set model.name = {trained_on!r} (the "
            "base of the earlier stage; model.init then supplies its trained "
            "weights)"
        )


def _run_config(run_dir: Path) -> TrainConfig:
    from ember.engine.config import TrainConfig, from_dict, parse_toml

    path = run_dir / "config.toml"
    return from_dict(TrainConfig, parse_toml(path.read_text(encoding="utf-8"), str(path)))


def find_start(init: str, model_name: str) -> Start:
    """What ``model.init`` holds; EmberError when it is unusable or for another base model."""
    p = Path(init)
    if not p.exists():
        raise EmberError(
            f"model.init {init!r} does not exist; give a previous run directory "
            "(runs/NAME) or a PEFT adapter folder (adapter_config.json)"
        )
    if p.is_dir() and any((p / f).is_file() for f in (MANIFEST, ".metadata", "extra.pt")):
        # (was: taken for a run directory without final/, whose advice, `ember train CKPT
        # --resume` or `ember export CKPT`, fails on a checkpoint folder)
        run = p.parent.parent
        raise EmberError(
            f"model.init {init!r} is a training checkpoint, not a run directory: give the "
            f"run directory {str(run)!r} to start from its final/ output (a run without one: "
            f"`ember export {run} --adapter DIR`, or --merged DIR for method = \"full\", "
            "writes the weights it ends with; give that folder to model.init, or a merged "
            "model to model.name)"
        )
    if p.is_dir() and (p / "config.toml").is_file():
        prev = _run_config(p)
        _check_base(init, prev.model.name, model_name)
        what = "model" if prev.method == "full" else "adapter"
        out = p / "final" / what
        if not out.is_dir():
            fix = (
                f"export its weights with `ember export {init} --adapter DIR` and give that "
                "folder to model.init" if prev.method != "full" else
                f"export its weights with `ember export {init} --merged DIR` and set "
                "model.name to that folder"
            )
            raise EmberError(
                f"model.init {init!r}: the run has no final/{what}: "
                + (f"it ran with checkpoint.save_final = false; {fix}"
                   if not prev.checkpoint.save_final else
                   f"it did not finish; finish it with `ember train {init} --resume`, or "
                   f"{fix}")
            )
        if prev.method == "full":
            return Start(init, "full", str(out))
        config = _read_adapter_config(out)
        context = None if prev.model.rope_scaling is None else (
            prev.model.rope_scaling, prev.model.rope_factor)
        return Start(init, prev.method, _moved_base(init, prev, model_name), out, config, context)
    if p.is_dir() and (p / "adapter_config.json").is_file():
        config = _read_adapter_config(p)
        kind = _KINDS.get(config.get("peft_type"))
        if kind is None:
            raise EmberError(
                f"model.init {init!r}: peft_type {config.get('peft_type')!r} is not "
                f"supported; ember continues {' or '.join(_KINDS)} adapters"
            )
        trained_on = config.get("base_model_name_or_path")
        if isinstance(trained_on, str) and trained_on:
            _check_base(init, trained_on, model_name)
        return Start(init, kind, model_name, p, config)
    if p.is_dir() and (p / "config.json").is_file():
        raise EmberError(
            f"model.init {init!r} is a model folder: set model.name = {init!r} to "
            "start from its weights (model.init takes a run directory or an "
            "adapter folder)"
        )
    if p.is_dir() and (p.parent / "config.toml").is_file():  # runs/NAME/final (or best/)
        raise EmberError(
            f"model.init {init!r} is a folder inside the run {str(p.parent)!r}, not a run "
            f"directory: give the run directory {str(p.parent)!r} (its final/ output is used)"
        )
    raise EmberError(
        f"model.init {init!r} is neither a run directory (config.toml) nor a PEFT "
        "adapter folder (adapter_config.json)"
    )


def _moved_base(init: str, prev: TrainConfig, model_name: str) -> str:
    """``base_of(prev)``; when the earlier run's base was its model.name, recorded absolute and
    gone since (the project folder moved, say), this stage's model.name of the same name: the
    base (``_check_base``), where it is now."""
    base = base_of(prev)
    if prev.model.init is None and Path(base).is_absolute() and not Path(base).exists():
        if Path(base).name != Path(model_name).expanduser().name:
            raise EmberError(
                f"model.init {init!r} was trained on the base model {base!r}, which is gone; "
                "set model.name to that model where it is now")
        return model_name
    return base


def base_of(cfg: TrainConfig) -> str:
    """The model a run's adapter applies to (its final/adapter's base): ``model.name``, or the
    earlier full model's folder when the run started from one."""
    if cfg.model.init is None or cfg.method == "full":
        return cfg.model.name
    return start_of(cfg).base


def start_of(cfg: TrainConfig) -> Start:
    """The start of a config with ``model.init``, checked against its ``method``."""
    start = find_start(cfg.model.init, cfg.model.name)
    if (start.kind == "prompt") != (cfg.method == "prompt") and start.kind != "full":
        held = "a prompt-tuning adapter" if start.kind == "prompt" else "a LoRA adapter"
        fix = (
            'use method = "prompt" to continue it'
            if start.kind == "prompt"
            else 'use method = "lora" to continue it, or method = "full" to train its merged '
            "weights"
        )
        raise EmberError(
            f"model.init {start.source!r} holds {held}, which a method = "
            f"{cfg.method!r} stage cannot start from: {fix}"
        )
    c = start.adapter_config
    if start.kind == "lora" and cfg.head.type is None and (
            c.get("task_type") == "SEQ_CLS" or {"score", "classifier"} & set(
                c.get("modules_to_save") or ())):
        raise EmberError(
            f"model.init {start.source!r} holds a sequence-classification adapter (its head "
            "among the modules it saves): set head.type = \"classification\" (\"reward\" or "
            "\"regression\" for a one-output head) to continue it; a language-model stage "
            "starts from a language-model adapter or model"
        )
    return start
