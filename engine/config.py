"""Run configuration: frozen, keyword-only dataclasses loaded from TOML or a named recipe.

A run is ``TrainConfig``; each TOML table is one section (``[model]``, ``[lora]``,
``[prompt_tuning]``, ``[optim]``, ``[data]``, ``[task]``, ``[eval]``, ``[checkpoint]``,
``[activations]``, ``[dist]``, ``[guards]``, ``[distill]``, ``[dpo]``, ``[orpo]``, ``[simpo]``,
``[cpo]``, ``[kto]``, ``[head]``),
top-level keys are ``TrainConfig`` fields.
``--set a.b=value`` overrides parse ``value`` as a TOML value (a bare word is a string; a,b or
[a, b] of bare words for a key that takes a list, nothing an empty one), applied in order (a
later one of a key wins, an inline table merges: ``--set lora={rank=8}`` keeps the file's alpha).
Unknown keys and wrong types are ``EmberError``s that name the key and list the valid ones. Relative
paths (model.name, model.init, run_dir, data files, eval.choices, distill.teacher) are taken from
the current folder, as ``ember train`` says of a missing data file; the run directory records
those found there absolute (``runtime.absolute_paths``: a name stays a name), so a run is used from
any folder; a run directory given as the source is that run's run_dir.

``"auto"`` fields (device, precision, model.dtype, optim.lr) are decided by ``resolve()`` at the
start of a run; the resolved config is what the run directory and every checkpoint record.

The ``[model]``, ``[optim]``, ``[task]``, ``[eval]`` and ``[checkpoint]`` sections are in
``ember.engine.config_sections`` (re-exported here); this module holds ``TrainConfig``, the
dict <-> dataclass conversion (``from_dict``, ``to_toml``) and ``load_config``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from ember import EmberError
from ember.engine import config_hints as ch
from ember.engine import config_source as cs
from ember.engine.activation import ActivationConfig
from ember.engine.classification import HeadConfig, check_config
from ember.engine.config_sections import (  # noqa: F401  (re-exported: their old home)
    DEFAULT_EVAL_METRICS,
    HF_OPTIM_NAMES,
    CheckpointConfig,
    EvalConfig,
    ModelSpec,
    OptimConfig,
    TaskConfig,
    _as_tuple,
    _one_of,
)
from ember.engine.config_source import (  # noqa: F401  (re-exported: their old home)
    _toml_or_word,
    in_place,
    load_source,
    parse_override,
    parse_toml,
    recipe_names,
)
from ember.engine.data import DataConfig
from ember.engine.distributed import DistConfig
from ember.engine.guards import GuardConfig
from ember.engine.kto import KTOConfig
from ember.engine.objectives import OBJECTIVES, PREFERENCE_OBJECTIVES, DistillConfig
from ember.engine.preference_configs import check_sync
from ember.engine.preference_cpo import CPOConfig
from ember.engine.preference_objectives import DPOConfig, ORPOConfig, SimPOConfig
from ember.models.lora import LoRAConfig
from ember.models.prompt_tuning import PromptTuningConfig

# method names other tools use (Axolotl's adapter: qlora, ...) -> the Ember settings for them
_METHOD_HINTS = {
    "qlora": 'QLoRA is method = "lora" with model.quantize = "nf4"',
    "dora": 'DoRA is method = "lora" with lora.use_dora = true',
    "freeze": 'layer freezing is method = "full" with train_layers = [...] or freeze = [...]',
    "prompt_tuning": 'prompt tuning is method = "prompt" ([prompt_tuning] num_virtual_tokens)',
}

@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    name: str = "run"
    run_dir: str | None = None  # None: runs/<name>
    model: ModelSpec = field(default_factory=ModelSpec)
    method: str = "lora"  # "lora" (adapters only) | "full" | "prompt" (prompt tuning)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    prompt_tuning: PromptTuningConfig = field(default_factory=PromptTuningConfig)
    # "sft" | "distill" (from distill.teacher) | preference pairs: "dpo" (against a reference),
    # "orpo", "simpo", "cpo" (reference-free); "kto": unpaired labelled completions (engine/kto.py)
    objective: str = "sft"
    distill: DistillConfig = field(default_factory=DistillConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    orpo: ORPOConfig = field(default_factory=ORPOConfig)
    simpo: SimPOConfig = field(default_factory=SimPOConfig)
    cpo: CPOConfig = field(default_factory=CPOConfig)
    kto: KTOConfig = field(default_factory=KTOConfig)
    # A task head instead of the LM head: [head] type = "classification"
    # (engine/classification.py), "reward" or "regression" (engine/reward.py)
    head: HeadConfig = field(default_factory=HeadConfig)
    # full fine-tuning only: glob patterns of the parameter names kept frozen (e.g. "embed.*")
    freeze: tuple[str, ...] = ()
    train_layers: tuple[int, ...] | None = None
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    activations: ActivationConfig = field(default_factory=ActivationConfig)
    dist: DistConfig = field(default_factory=DistConfig)  # under torchrun only
    guards: GuardConfig = field(default_factory=GuardConfig)
    # Micro-batches (of data.tokens_per_batch tokens) per optimizer step and per process: under
    # torchrun with N processes a step takes grad_accum * N batches.
    grad_accum: int = 1
    neftune_noise_alpha: float = 0.0  # NEFTune embedding noise while training (engine/neftune.py)
    max_steps: int | None = None  # None: epochs decide
    epochs: float = 1.0
    seed: int = 0
    # "auto" | "bf16" | "fp16" | "fp32" (autocast dtype). "auto": bf16 on CUDA with bf16 and on a
    # CPU with native bf16 (AVX512-BF16 / AMX; EMBER_CPU_BF16=0/1 overrides), else fp32
    precision: str = "auto"
    device: str = "auto"  # "auto" (cuda if available) | "cpu" | "cuda" | "cuda:N"
    threads: int | None = None  # CPU threads for torch (None: torch's default)
    log_every: int = 1  # steps between metrics.jsonl rows (each: the mean loss of its steps)
    plot: bool = True  # loss/metric PNG at the end (needs matplotlib)
    tensorboard: bool = False  # also log to <run_dir>/tensorboard (needs the tensorboard package)

    def __post_init__(self) -> None:
        # (an empty name was the run directory runs/ itself, an empty run_dir the current
        # folder: the run's files written among the others)
        parts = self.name.replace("\\", "/").split("/")
        if self.name.strip() != self.name or not set(parts).isdisjoint(("", ".", "..")):
            raise EmberError(f"name must be a folder name for runs/<name>, got {self.name!r}; "
                             "give run_dir for a run directory elsewhere")
        if self.run_dir is not None and not self.run_dir.strip():
            raise EmberError("run_dir is empty: give the run's folder (e.g. runs/my-run), or "
                             "leave it out for runs/<name>")
        if self.method in _METHOD_HINTS or self.method in OBJECTIVES:
            raise EmberError(f"method must be one of 'lora', 'full', 'prompt', got "
                             f"{self.method!r}: " + _METHOD_HINTS.get(
                                 self.method, f'{self.method} is an objective: objective = '
                                 f'"{self.method}"'))
        _one_of("method", self.method, ("lora", "full", "prompt"))
        _one_of("precision", self.precision, ("auto", "bf16", "fp16", "fp32"))
        if not re.fullmatch(r"auto|cpu|cuda(:[0-9]+)?", self.device):
            raise EmberError(f"device must be \"auto\", \"cpu\", \"cuda\" or \"cuda:N\", got "
                             f"{self.device!r}")
        if self.objective in ("lora", "full", "prompt"):
            raise EmberError(f"objective must be one of {', '.join(map(repr, OBJECTIVES))}, got "
                             f"{self.objective!r}: {self.objective} is a method: method = "
                             f'"{self.objective}"')
        _one_of("objective", self.objective, OBJECTIVES)
        if self.objective in ("dpo", "kto") and self.method == "prompt":
            raise EmberError(f"objective = \"{self.objective}\" with method = \"prompt\" is "
                             "not supported (the reference would be the model with its initial "
                             "prompt): use method = \"lora\" or \"full\", or the reference-free "
                             "objective = \"orpo\", \"simpo\" or \"cpo\"")
        if self.objective in ("dpo", "kto") and getattr(self, self.objective).sync_ref_model:
            check_sync(self.objective, self.method)
        if self.objective == "distill" and not (self.distill.teacher or "").strip():
            raise EmberError("objective = \"distill\" needs distill.teacher: a model name, HF "
                             "folder or .gguf file sharing the student's tokenizer")
        if self.neftune_noise_alpha < 0:
            raise EmberError(f"neftune_noise_alpha must be >= 0, got {self.neftune_noise_alpha}")
        if self.neftune_noise_alpha and self.objective not in ("sft", "distill"):
            raise EmberError(f"neftune_noise_alpha applies to instruction tuning (objective "
                             f"\"sft\" or \"distill\"), not {self.objective!r}: the noise would "
                             "also perturb the preference log-probabilities; remove it")
        if self.objective in (*PREFERENCE_OBJECTIVES, "kto") and (
                self.eval.early_stopping == "perplexity"):
            raise EmberError(f"eval.early_stopping = \"perplexity\" does not apply to objective = "
                             f"\"{self.objective}\": its val_loss is the {self.objective} loss, "
                             "not a language-model loss, and has no perplexity; use \"val_loss\" "
                             "or a metric of eval.metrics")
        object.__setattr__(self, "freeze", _as_tuple(self.freeze))
        if self.train_layers is not None:
            object.__setattr__(self, "train_layers", _as_tuple(self.train_layers))
        if self.method == "lora" and (self.freeze or self.train_layers is not None):
            raise EmberError("freeze / train_layers apply to method = \"full\"; with LoRA choose "
                             "the adapted modules with lora.targets (e.g. \"layers.2[0-9].*\")")
        if self.method == "prompt" and (self.freeze or self.train_layers is not None):
            raise EmberError("freeze / train_layers apply to method = \"full\"; prompt tuning "
                             "freezes the whole model")
        if self.model.quantize and self.method != "lora":
            raise EmberError("model.quantize = \"nf4\" (QLoRA) trains LoRA adapters on a frozen "
                             "4-bit base: set method = \"lora\", or drop quantize for full "
                             "fine-tuning")
        check_config(self)
        self._check_early_stopping()
        if self.grad_accum < 1 or self.log_every < 1:
            raise EmberError("grad_accum and log_every must be >= 1")
        if self.threads is not None and self.threads < 1:
            raise EmberError(f"threads must be >= 1 (or left out: torch's default), got "
                             f"{self.threads}")
        if self.max_steps is not None and self.max_steps < 1:
            raise EmberError(f"max_steps must be >= 1, got {self.max_steps}")
        if not self.epochs > 0:
            raise EmberError(f"epochs must be > 0, got {self.epochs}")

    def _check_early_stopping(self) -> None:
        """``eval.early_stopping`` names a score of this run: with a task head and the default
        eval.metrics, the head's default metrics (``resolve_head``), which EvalConfig cannot
        know."""
        ev, kind = self.eval, self.head.type
        if ev.early_stopping is None or ev.metrics != DEFAULT_EVAL_METRICS:
            return  # EvalConfig checked it against the metrics the config lists
        if kind is None:
            metrics = ev.metrics
        elif kind == "classification":
            from ember.engine.classification import DEFAULT_METRICS as metrics
        else:
            from ember.engine.reward import METRICS

            metrics = METRICS[kind]
        choices = ("choice_accuracy", "choice_accuracy_norm") if ev.choices else ()
        valid = ("val_loss", *(() if kind else ("perplexity",)), *metrics, *choices)
        _one_of("eval.early_stopping", ev.early_stopping, valid)

    @property
    def out_dir(self) -> Path:
        return Path(self.run_dir if self.run_dir is not None else Path("runs") / self.name)

    def replace(self, **changes) -> TrainConfig:
        return dataclasses.replace(self, **changes)


# --- dict <-> dataclass --------------------------------------------------------------------------

def _is_dataclass_type(tp) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _type_name(tp) -> str:
    if tp is type(None):
        return "none"
    args = typing.get_args(tp)
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        return " or ".join(_type_name(a) for a in args if a is not type(None))
    if typing.get_origin(tp) is tuple:
        return "a list"
    return {str: "a string", int: "an integer", float: "a number", bool: "true/false"}.get(
        tp, getattr(tp, "__name__", str(tp)))


def _value_name(v) -> str:
    return "a table" if isinstance(v, dict) else f"{type(v).__name__} {v!r}"


def _coerce(value, tp, key: str):
    """``value`` (from TOML) as type ``tp``, or EmberError naming ``key``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if isinstance(tp, types.UnionType) or origin is typing.Union:
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except EmberError as e:
                errors.append(e)
        if len(errors) == 1:  # "X | None": the one type's own reason (a non-finite number)
            raise errors[0]
        raise EmberError(f"{key} must be {_type_name(tp)}, got {_value_name(value)}")
    if _is_dataclass_type(tp):
        if not isinstance(value, dict):
            names = {f.name for f in dataclasses.fields(tp)} & {"name", "type"}
            hint = f" (did you mean {key}.{names.pop()}?)" if names and isinstance(
                value, str) else ""  # model = "x": model.name; head = "...": head.type
            raise EmberError(f"{key} must be a table ([{key}]), got {_value_name(value)}{hint}")
        return from_dict(tp, value, key)
    if origin is tuple:
        items = value if isinstance(value, list) else [value]
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(items))
        if len(items) != len(args):
            raise EmberError(f"{key} must be a list of {len(args)} values, got {value!r}")
        pairs = enumerate(zip(items, args, strict=True))
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in pairs)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            if not -2**63 <= value < 2**63:  # TOML's integers are 64-bit (tomllib takes any):
                raise EmberError(f"{key} = {value} is out of range: TOML integers are 64-bit "
                                 "(-2**63 to 2**63 - 1)")  # (seed: torch's overflow traceback)
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):  # TOML's nan / inf: NaN weights or a run without end
                raise EmberError(f"{key} must be a finite number, got {value}")
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is typing.Any or tp is object:
        return value
    raise EmberError(f"{key} must be {_type_name(tp)}, got {_value_name(value)}"
                     f"{ch.fix_hint(value, tp, key)}")


def from_dict(cls, data: dict, prefix: str = ""):
    """Build dataclass ``cls`` from a TOML-like dict; unknown keys are an error naming them."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else key
        if key not in fields:
            where = f"[{prefix}]" if prefix else "the top level"
            valid = ", ".join(sorted(fields))
            top = {f.name for f in dataclasses.fields(TrainConfig)}
            guess, hint = "", ""
            if not (prefix and key in top):  # (a top-level key after a [table]: said below)
                # a key of another table: [lora] lr -> optim.lr (was no suggestion)
                sections = {name: keys for name, keys in _section_keys().items()
                            if name != prefix} if cls is TrainConfig or (
                    prefix and "." not in prefix) else {}
                guess = ch.did_you_mean(key, fields, sections)
            if prefix and key in top:
                hint = (f" ({key!r} is a top-level key: in TOML it must come before the first "
                        "[table], or a key after [" + prefix.split(".")[0] + "] belongs to it)")
            raise EmberError(f"unknown config key {full!r}{guess}; valid keys in {where}: "
                             f"{valid}{hint}")
        kwargs[key] = _coerce(value, hints[key], full)
    try:
        obj = cls(**kwargs)
    except EmberError:
        raise
    except (TypeError, ValueError) as e:
        raise EmberError(f"[{prefix or 'config'}]: {e}") from None
    object.__setattr__(obj, "_given", frozenset(kwargs))
    return obj


def _section_keys() -> dict[str, set[str]]:
    hints = typing.get_type_hints(TrainConfig)
    return {f.name: {g.name for g in dataclasses.fields(hints[f.name])}
            for f in dataclasses.fields(TrainConfig) if _is_dataclass_type(hints[f.name])}


def given_keys(cfg) -> frozenset[str] | None:
    """The keys the config file / ``--set`` items gave for this section (``from_dict`` records
    them), so that a value written out equal to its default still counts as chosen; None for a
    config built in code or copied with ``dataclasses.replace`` (unknown)."""
    return getattr(cfg, "_given", None)


def to_dict(cfg) -> dict:
    """Plain dict of a config; None fields are left out (TOML has no null, and omitted means
    default, which is None for every optional field)."""
    out = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if v is None:
            continue
        if dataclasses.is_dataclass(v):
            v = to_dict(v)
        elif isinstance(v, tuple):
            v = list(v)
        out[f.name] = v
    return out


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        # JSON string escapes are valid TOML; JSON leaves DEL raw, which TOML forbids
        return json.dumps(v, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def to_toml(cfg) -> str:
    """TOML text of a config; ``load_config`` reads it back to an equal config."""
    d = to_dict(cfg)
    lines = [f"{k} = {_toml_value(v)}" for k, v in d.items() if not isinstance(v, dict)]
    for k, v in d.items():
        if isinstance(v, dict):
            lines += ["", f"[{k}]"] + [f"{kk} = {_toml_value(vv)}" for kk, vv in v.items()]
    return "\n".join(lines) + "\n"


# --- loading (the dict from a file, run directory or recipe: config_source) ---------------------

def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """``data`` with the ``--set`` items applied (``config_source.apply_overrides``)."""
    return cs.apply_overrides(data, overrides, TrainConfig)


def load_config(source: str | Path | None = None, overrides: list[str] | tuple = ()
                ) -> TrainConfig:
    """TrainConfig from a TOML file, run directory or recipe name (None: all defaults) plus
    ``--set`` items. A run directory's run is that folder, wherever the command runs and wherever
    the folder moved (unless ``--set`` gives run_dir or name: a new run from its settings)."""
    data = load_source(source) if source is not None else {}
    if source is not None:
        in_place(data, run_folder(source), overrides)
    return from_dict(TrainConfig, apply_overrides(data, list(overrides)))


def run_folder(source: str | Path) -> Path | None:
    """``source`` as a run directory, else None (``config_source.run_folder``: a config.toml
    is a run's when it names every TrainConfig field and Ember's run output is beside it)."""
    return cs.run_folder(source, TrainConfig)
