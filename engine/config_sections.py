"""The sections of a run's configuration that stand on their own: ``[model]`` (``ModelSpec``),
``[optim]``, ``[task]``, ``[eval]`` and ``[checkpoint]``; frozen, keyword-only dataclasses that
check their own fields. ``TrainConfig`` (``ember.engine.config``, which re-exports these) puts
them together with the sections defined beside their features (``[lora]``, ``[data]``, ...),
checks what spans sections, and loads a run from TOML."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ember import EmberError
from ember.engine import config_hints as ch
from ember.engine.schedules import check_schedule

# eval.metrics by default: generation metrics; a task head replaces them by its own (resolve_head)
DEFAULT_EVAL_METRICS = ("exact_match",)


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    name: str = "smollm2-135m-instruct"  # built-in name, HF folder or .gguf file
    # Weights dtype. "auto": float32 (full fine-tuning's masters, any run at fp32 precision);
    # bfloat16 for a frozen LoRA / prompt-tuning base at bf16 precision (CUDA or a bf16 CPU).
    dtype: str = "auto"
    # "nf4": QLoRA. The linear layers are quantized to NF4 (bitsandbytes-exact) while loading;
    # a checkpoint already in bitsandbytes 4-bit format loads as NF4 without this.
    quantize: str | None = None
    # With quantize: double-quantize the NF4 block scales (bitsandbytes'
    # bnb_4bit_use_double_quant; ~0.4 bit/param less). false: bnb's bytes for that setting.
    double_quant: bool = True
    # Start from an earlier stage's result: a run directory (its final adapter or model) or a
    # PEFT adapter folder; ``name`` stays the base model it was trained on (engine/stages.py).
    init: str | None = None
    # Context extension (models/context.py): RoPE scaling "linear" | "yarn" by rope_factor, to
    # train on sequences longer than the model's context; exported folders carry it.
    rope_scaling: str | None = None
    rope_factor: float | None = None
    # Mixture-of-experts models: the weight of the router load-balancing loss added to the
    # training loss (transformers' load_balancing_loss_func). None: the checkpoint's
    # router_aux_loss_coef for a language model (transformers adds it only with
    # output_router_logits: 0 trains as it does by default), 0 for a classifier ([head]); 0: off.
    router_aux_loss_coef: float | None = None
    # Dropout on the attention probabilities in training (transformers' attention_dropout;
    # Granite 3 ships 0.1). None: the checkpoint's; 0: off, and the flash kernels train (a
    # nonzero value trains through an explicit-mask attention: slower, O(T^2) memory).
    attention_dropout: float | None = None

    def __post_init__(self) -> None:
        d = self.attention_dropout
        if d is not None and (isinstance(d, bool) or not 0.0 <= d < 1.0):
            raise EmberError(f"model.attention_dropout must be in [0, 1) (or left out for the "
                             f"checkpoint's), got {d!r}")
        c = self.router_aux_loss_coef
        if c is not None and (isinstance(c, bool) or not c >= 0):
            raise EmberError(f"model.router_aux_loss_coef must be >= 0 (or left out), got {c!r}")
        if (self.rope_scaling is None) != (self.rope_factor is None):
            raise EmberError("model.rope_scaling and model.rope_factor go together, e.g. "
                             "rope_scaling = \"yarn\" and rope_factor = 4.0 for 4x the context")
        if self.rope_scaling is not None:
            _one_of("model.rope_scaling", self.rope_scaling, ("linear", "yarn"))
            if not self.rope_factor > 1:
                raise EmberError(f"model.rope_factor must be > 1, got {self.rope_factor}")
        ch.check_dtype("model.dtype", self.dtype)  # (was found as the model loaded)
        if not self.name.strip():  # (was the current folder, loaded as the model)
            raise EmberError("model.name is empty: give a built-in name, an HF model folder or "
                             "a .gguf file")
        if self.init is not None and not self.init.strip():
            raise EmberError("model.init is empty: give a previous run directory or a PEFT "
                             "adapter folder, or leave it out")
        if self.quantize is not None and self.quantize != "nf4":
            raise EmberError(f"model.quantize must be \"nf4\" (QLoRA) or left out, got "
                             f"{self.quantize!r}")
        if not self.double_quant and self.quantize is None:
            raise EmberError("model.double_quant = false applies to QLoRA's quantization: set "
                             "model.quantize = \"nf4\" too, or drop double_quant")


# transformers' optim names of the same AdamW update (bnb's paging only moves the states)
HF_OPTIM_NAMES = {"adamw_torch": "adamw", "adamw_torch_fused": "adamw",
                  "adamw_bnb_8bit": "adamw_8bit", "paged_adamw_8bit": "adamw_8bit"}


@dataclass(frozen=True, kw_only=True)
class OptimConfig:
    # "adamw" (torch, fp32 states) | "adamw_8bit" (bnb's 8-bit states; nn.Embedding tables keep
    # fp32 states, as transformers' Trainer registers them with bnb)
    name: str = "adamw"
    lr: float | None = None  # None: 1e-3 with LoRA, 3e-2 prompt tuning, 2e-5 full fine-tuning
    weight_decay: float = 0.0  # never applied to biases or norms (as transformers' Trainer)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    # Linear warmup as transformers' get_scheduler: step k (0-based) at k / warmup_steps of the
    # peak lr (the first step at lr 0), the peak at step warmup_steps.
    warmup_steps: int | None = None  # None: warmup_ratio of the run, rounded up
    warmup_ratio: float = 0.05
    # After the warmup ("wsd": warmup, stable, decay; engine/schedules.py):
    schedule: str = "cosine"  # "cosine" | "linear" | "constant" | "wsd" | "inverse_sqrt"
    min_lr_ratio: float = 0.0  # decay to lr * min_lr_ratio (and "wsd"'s warmup starts there)
    # "cosine": > 1 hard restarts, each down to lr * min_lr_ratio (transformers'
    # cosine_with_restarts num_cycles, without a floor; its "cosine" num_cycles counts waves)
    cycles: int = 1
    schedule_shift: int = 0  # "cosine": 1: every step at the next's lr (cosine_warmup_with_min_lr)
    warmup_start_ratio: float | None = None  # shift 1: the warmup from lr * it (warmup_lr_rate)
    cosine_waves: float = 0.5  # a cosine's waves (transformers' cosine num_cycles; 1: down and up)
    decay_power: float = 1.0  # "linear": (1 - progress) ** decay_power (transformers' polynomial)
    decay_steps: int | None = None  # "wsd": the decay, the run's last steps (None: decay_ratio)
    decay_ratio: float = 0.1  # "wsd": the decay's fraction of the run's steps, rounded up
    decay_type: str = "cosine"  # "wsd": the decay's shape, "linear" | "cosine" | "1-sqrt"
    warmup_type: str = "linear"  # "wsd": the warmup's shape, "linear" | "cosine" | "1-sqrt"
    stable_steps: int | None = None  # "wsd": the peak's steps after the warmup (None: to the decay)
    timescale: int | None = None  # "inverse_sqrt": its timescale (None: warmup steps, else 10000)
    max_grad_norm: float = 1.0  # 0: no clipping

    def __post_init__(self) -> None:
        if self.name in HF_OPTIM_NAMES:
            raise EmberError(f"optim.name = {self.name!r} is transformers' optim; in Ember: "
                             f"optim.name = {HF_OPTIM_NAMES[self.name]!r}")
        _one_of("optim.name", self.name, ("adamw", "adamw_8bit"))
        check_schedule(self)
        if self.lr is not None and not self.lr > 0:
            raise EmberError(f"optim.lr must be > 0, got {self.lr}")
        if not 0 <= self.warmup_ratio < 1:
            raise EmberError(f"optim.warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise EmberError(f"optim.warmup_steps must be >= 0 (or left out for warmup_ratio), "
                             f"got {self.warmup_steps}")
        for key, need in (("max_grad_norm", ">= 0 (0: no clipping)"), ("weight_decay", ">= 0"),
                          ("eps", "> 0")):
            v = getattr(self, key)  # NaN fails both comparisons
            bad = not (v > 0 if key == "eps" else v >= 0) or math.isinf(v)
            if bad and not (key == "max_grad_norm" and v == math.inf):  # inf: no clipping
                raise EmberError(f"optim.{key} must be a finite number {need}, got {v!r}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise EmberError(f"optim.betas must be two numbers in [0, 1), got {self.betas}")


@dataclass(frozen=True, kw_only=True)
class TaskConfig:
    """A built-in generated dataset (``ember.engine.tasks``). When ``name`` is set, its splits
    are written to ``<run_dir>/data/`` and used for any of data.train / data.validation /
    data.test that the config leaves empty."""

    name: str | None = None
    train: int = 2000
    validation: int = 100
    test: int = 200
    seed: int = 0

    def __post_init__(self) -> None:
        from ember.engine.tasks import task_names

        if self.name is not None and self.name not in task_names():
            # (was: found only after the model loaded, in an error without the key)
            raise EmberError(f"task.name = {self.name!r} is not a built-in task; use one of "
                             f"{', '.join(map(repr, task_names()))}, or leave task out and give "
                             "data.train")
        if self.train < 1 or self.validation < 0 or self.test < 0:
            raise EmberError(f"task.train must be >= 1 and task.validation, task.test >= 0, got "
                             f"{self.train}, {self.validation}, {self.test}")


@dataclass(frozen=True, kw_only=True)
class EvalConfig:
    every_steps: int = 0  # 0: evaluate at the end only
    val_loss: bool = True  # validation loss and perplexity
    max_val_batches: int | None = None
    # Task metrics by greedy generation on the test split (the validation split when there is
    # no test split, or when early_stopping is one of these metrics: the best weights are not
    # chosen on the test split): the model completes each prompt, compared with its reference.
    # exact_match, accuracy, macro_f1 (= f1: sklearn's, texts as labels), squad_exact_match,
    # squad_f1 (SQuAD v1.1's normalized EM and token F1), json_match, field_accuracy
    metrics: tuple[str, ...] = DEFAULT_EVAL_METRICS
    split: str = "auto"  # "auto" (see metrics) | "test" | "validation"
    max_examples: int | None = None
    max_new_tokens: int = 64
    batch_size: int = 64
    before: bool = True  # also measure the metrics before training (the baseline)
    show: int = 3  # print this many (prompt, prediction, reference) samples after the last eval
    # Reasoning models: score the answer after the think block, of generation and reference
    # (lm-eval's think_end_token; engine/reasoning.py). "auto": "</think>" when the chat
    # template or vocabulary has it or a reference holds it; "": score the whole text
    think_end: str = "auto"
    # A multiple-choice file ({"question", "choices", "answer"} lines, engine/choices.py) scored
    # at every evaluation by log-likelihood: choice_accuracy and choice_accuracy_norm.
    choices: str | None = None
    # A metric name ("val_loss", "exact_match", ...): stop after `patience` evaluations without
    # improvement; the run ends with (exports) the best evaluation's weights, kept in
    # <run_dir>/best/ (transformers' load_best_model_at_end; engine/best.py).
    early_stopping: str | None = None
    patience: int = 3  # evaluations without improvement before stopping
    mode: str = "auto"  # "min" | "max" | "auto" (min for losses/perplexity/mse/rmse, else max)
    min_delta: float = 0.0

    def __post_init__(self) -> None:
        from ember.engine.metrics import HEAD_SCORES, METRICS

        object.__setattr__(self, "metrics", _as_tuple(self.metrics))
        for m in self.metrics:
            _one_of("eval.metrics entry", m, (*METRICS, *HEAD_SCORES))
        _one_of("eval.split", self.split, ("auto", "test", "validation"))
        _one_of("eval.mode", self.mode, ("auto", "min", "max"))
        if self.every_steps < 0 or self.patience < 1 or self.batch_size < 1:
            raise EmberError("eval.every_steps must be >= 0, eval.patience and eval.batch_size "
                             ">= 1")
        for name, off in (("max_val_batches", "eval.val_loss = false"),
                          ("max_examples", "eval.metrics = []"),
                          ("max_new_tokens", "eval.metrics = []")):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise EmberError(f"eval.{name} must be >= 1, got {v}; to skip that evaluation "
                                 f"set {off}")
        if self.show < 0:
            raise EmberError(f"eval.show must be >= 0, got {self.show}")
        if not isinstance(self.think_end, str) or self.think_end and not self.think_end.strip():
            raise EmberError(f"eval.think_end must be \"auto\", \"\" (score whole generations) "
                             f"or the text that ends a think block (\"</think>\"), got "
                             f"{self.think_end!r}")
        if self.min_delta < 0:  # would count worse scores as improvements: never stopping
            raise EmberError(f"eval.min_delta must be >= 0 (the improvement that resets "
                             f"eval.patience), got {self.min_delta}")
        if self.choices is not None and not self.choices.strip():
            raise EmberError("eval.choices is empty: give a multiple-choice file, or leave it out")
        if self.early_stopping is not None:
            valid = ("val_loss", "perplexity", *self.metrics, *(
                ("choice_accuracy", "choice_accuracy_norm") if self.choices else ()))
            if self.metrics == DEFAULT_EVAL_METRICS:  # a task head's defaults replace them:
                valid += ("accuracy", "macro_f1", *HEAD_SCORES)  # TrainConfig checks which
            _one_of("eval.early_stopping", self.early_stopping, valid)


@dataclass(frozen=True, kw_only=True)
class CheckpointConfig:
    every_steps: int = 0  # 0: only the final checkpoint
    keep_last: int = 2
    save_final: bool = True  # checkpoint at the end, plus the adapter / model in <run_dir>/final
    # How --resume checks a checkpoint before using it: "hash" (sizes and sha256 of every file,
    # split between the processes) or "size" (faster for huge checkpoints, misses bit rot).
    verify: str = "hash"

    def __post_init__(self) -> None:
        _one_of("checkpoint.verify", self.verify, ("hash", "size"))
        if self.every_steps < 0 or self.keep_last < 1:
            raise EmberError("checkpoint.every_steps must be >= 0 and checkpoint.keep_last >= 1")


def _one_of(name: str, value, allowed) -> None:
    if value not in allowed:
        raise EmberError(f"{name} must be one of {', '.join(map(repr, allowed))}, got {value!r}")


def _as_tuple(v) -> tuple:
    return (v,) if isinstance(v, (str, int)) else tuple(v)
