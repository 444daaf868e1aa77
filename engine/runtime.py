"""Decisions and objects a run is built from: "auto" settings resolved for this machine, autocast,
the learning-rate schedule, the model (LoRA or full fine-tuning with frozen parts), its weight
count and MoE load-balancing coefficient, and AdamW."""

from __future__ import annotations

import contextlib
import fnmatch
import math
import os
import re
import resource
from dataclasses import replace
from pathlib import Path

import torch

from ember import EmberError
from ember.engine import hfdatasets
from ember.engine.classification import resolve_head, train_head
from ember.engine.config import TrainConfig, from_dict, to_dict
from ember.engine.stages import base_of, load_start, resolve_start
from ember.models.loading import iter_dense_weights
from ember.models.lora import apply_lora
from ember.models.nf4 import is_quantized
from ember.models.peft_adapter import check_peft_exportable
from ember.models.prompt_tuning import apply_prompt_tuning


def cpu_has_bf16() -> bool:
    """True when the CPU computes bf16 matmuls natively (AVX512-BF16 or AMX), where bf16
    autocast is faster than fp32; elsewhere bf16 is emulated and slower. ``EMBER_CPU_BF16=0`` /
    ``=1`` overrides the detection (the test suite sets 0 so that its tolerances, written for fp32
    runs, hold on any CPU; ``precision = "fp32"`` does the same for one run)."""
    forced = os.environ.get("EMBER_CPU_BF16")
    if forced is not None:
        if forced not in ("0", "1"):
            raise EmberError(f"EMBER_CPU_BF16 must be 0 or 1 (or unset), got {forced!r}")
        return forced == "1"
    try:
        caps = torch._C._cpu._get_cpu_capability()
        if isinstance(caps, dict):
            return bool(caps.get("avx512_bf16") or caps.get("amx_bf16"))
    except (AttributeError, RuntimeError):
        pass
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


# The path keys a run reads back later (ember generate / eval / export RUN, train RUN --resume)
PATH_KEYS = ("model.name", "model.init", "distill.teacher", "data.train", "data.validation",
             "data.test", "eval.choices")


def absolute_paths(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with each relative path of ``PATH_KEYS`` that exists in the current folder made
    absolute, as the run directory records it: a run's later commands read the same files from
    any folder (``model.name = "model"`` was "model 'model' not found" from another folder). A
    built-in or Hub name (no such file or folder here) stays a name, as ``resolve_model`` reads
    a folder of that name first."""
    def fix(v, data: bool):
        if isinstance(v, str) and v and not os.path.isabs(v) and Path(v).expanduser().exists():
            return os.path.abspath(Path(v).expanduser())
        if data and isinstance(v, str) and v and not os.path.isabs(v) and hfdatasets.exists(v):
            return hfdatasets.absolute(v)  # "folder:split" of a datasets folder (a model name
            # "name:tag" beside a folder "name" stays a name)
        return [fix(x, data) for x in v] if isinstance(v, (list, tuple)) else v

    d = to_dict(cfg)
    changes = {}
    for key in PATH_KEYS:
        section, name = key.split(".")
        old = d.get(section, {}).get(name)
        new = fix(old, key.startswith("data.") or key == "eval.choices")
        if new != (list(old) if isinstance(old, tuple) else old):
            changes.setdefault(section, {})[name] = new
    if not changes:
        return cfg
    return cfg.replace(**{s: replace(getattr(cfg, s), **{k: tuple(v) if isinstance(v, list)
                                                         else v for k, v in c.items()})
                          for s, c in changes.items()})


def moved_task_file(path: str, out_dir: Path) -> str:
    """A [task] run's generated data file ``path`` as recorded (``<run_dir>/data/NAME``,
    absolute), or, when it is gone and the run directory ``out_dir`` holds NAME in its data/
    folder (the run directory moved), that file."""
    p = Path(path)
    here = Path(os.path.abspath(out_dir)) / "data" / p.name
    if p.is_absolute() and p.parent.name == "data" and not p.exists() and here.is_file():
        return str(here)
    return path


@hfdatasets.one_walk()  # each datasets folder walked once for all its settings
def resolve(cfg: TrainConfig) -> TrainConfig:
    """Decide every "auto" field (device, precision, model dtype, lr, task data paths); local
    paths become absolute (``absolute_paths``), a datasets folder's the split named like its
    setting (``hfdatasets.named_splits``)."""
    cfg = absolute_paths(cfg)
    cfg = cfg.replace(data=hfdatasets.named_splits(cfg.data))
    device = cfg.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise EmberError(f"device = {device!r} but CUDA is not available; use device = \"cpu\"")
    precision = cfg.precision
    if precision == "auto":
        if device.startswith("cuda"):
            precision = "bf16" if torch.cuda.is_bf16_supported() else "fp32"
        else:
            precision = "bf16" if cpu_has_bf16() else "fp32"
    if precision == "fp16" and not device.startswith("cuda"):
        raise EmberError("precision = \"fp16\" needs CUDA; on CPU use \"bf16\" or \"fp32\"")
    model = cfg.model
    if model.dtype == "auto":
        # A frozen base can live in the autocast dtype; trained weights stay fp32 masters.
        low = cfg.method in ("lora", "prompt") and precision == "bf16"
        model = replace(model, dtype="bfloat16" if low else "float32")
    optim = cfg.optim
    if optim.lr is None:
        optim = from_dict(type(optim), {**to_dict(optim),
                                        "lr": DEFAULT_LR[cfg.method]})
    data = cfg.data
    if cfg.task.name is not None:
        folder = Path(os.path.abspath(cfg.out_dir / "data"))  # read from any folder later
        changes = {}
        if not data.train:
            changes["train"] = [str(folder / "train.jsonl")]
        if data.validation is None and data.val_fraction == 0 and cfg.task.validation > 0:
            changes["validation"] = str(folder / "validation.jsonl")
        if data.test is None and cfg.task.test > 0:
            changes["test"] = str(folder / "test.jsonl")
        for key in ("train", "validation", "test"):  # generated in a run directory moved since
            v = changes.get(key, getattr(data, key))
            many = isinstance(v, (list, tuple))
            moved = [moved_task_file(f, cfg.out_dir) for f in v] if many else (
                moved_task_file(v, cfg.out_dir) if v else v)
            if moved != (list(v) if many else v):
                changes[key] = moved
        data = from_dict(type(data), {**to_dict(data), **changes})
    cfg = cfg.replace(device=device, precision=precision, model=model, optim=optim, data=data)
    # A continued LoRA adapter's rank, alpha and targets; a classifier's labels and metrics.
    return resolve_head(resolve_start(cfg))


# Prompt tuning trains a few embeddings from scratch: PEFT's examples use 3e-2 .. 3e-1.
DEFAULT_LR = {"lora": 1e-3, "prompt": 3e-2, "full": 2e-5}


def autocast_for(device: str, precision: str):
    """A factory of autocast contexts for ``precision`` (fp32: no autocast)."""
    if precision == "fp32":
        return contextlib.nullcontext
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    kind = "cuda" if device.startswith("cuda") else "cpu"
    return lambda: torch.autocast(kind, dtype=dtype)


def _epoch_steps(batches, epoch: int, grad_accum: int) -> list[int]:
    """The micro-batches of each optimizer step of ``epoch``: whole steps, then one of the
    micro-batches left (transformers' Trainer's partial accumulation)."""
    k = len(batches.plan(epoch))
    return [grad_accum] * (k // grad_accum) + ([k % grad_accum] if k % grad_accum else [])


def epoch_step_sizes(batches, epochs: float, grad_accum: int) -> list[int]:
    """The micro-batches of each optimizer step of ``epochs`` epochs of ``batches`` (one
    process's; under torchrun all processes' together, ``grad_accum`` then grad_accum * N:
    ``distributed.step_share`` deals them out), as transformers' Trainer: a step never spans
    two epochs, each epoch ends with a step of the micro-batches left (its partial
    accumulation), and a fraction of an epoch is that fraction of its steps, rounded up as
    transformers rounds the run's steps, ``ceil(epochs * steps per epoch)`` in floats (1.1
    epochs of 100 steps: 110.00000000000001, 111 steps; 0.07 of 100: 8); at least 1."""
    sizes: list[int] = []
    whole = int(epochs)
    for e in range(whole + (epochs > whole)):
        steps = _epoch_steps(batches, e, grad_accum)
        if e == whole:  # not ceil((epochs - whole) * n): 1.1 - 1 is 0.10000000000000009
            steps = steps[:math.ceil(epochs * len(steps)) - whole * len(steps)]
        sizes += steps
    return sizes or [1]


class StepSizes:
    """``sizes[step]``: the micro-batches of optimizer step ``step`` (0-based); ``len``: the
    run's steps. ``max_steps`` unset: ``epoch_step_sizes``. With ``max_steps`` the steps are
    dealt out as transformers' Trainer does under ``max_steps`` too: epoch by epoch, each ending
    with its partial step (no step spans two epochs), cut at ``max_steps``; an epoch is planned
    when the run reaches it (a long run on a small file plans no epochs ahead)."""

    def __init__(self, batches, grad_accum: int, *, epochs: float = 1.0,
                 max_steps: int | None = None):
        self.batches, self.grad_accum, self._next_epoch = batches, grad_accum, 0
        if max_steps:
            self._sizes: list[int] = []
            self.total = max_steps
        else:
            self._sizes = epoch_step_sizes(batches, epochs, grad_accum)
            self.total = len(self._sizes)

    def __len__(self) -> int:
        return self.total

    def __getitem__(self, step: int) -> int:
        if not 0 <= step < self.total:
            raise IndexError(f"step {step} of a {self.total}-step run")
        while step >= len(self._sizes):
            self._sizes += _epoch_steps(self.batches, self._next_epoch, self.grad_accum)
            self._next_epoch += 1
        return self._sizes[step]


def length_note(step: int, old: int, new: int) -> str | None:
    """A resume at ``step`` whose run length (max_steps / epochs: ``new`` steps) differs from
    the checkpoint's (``old``): the note that says what happens (None: the same length). The
    lr schedule, a warmup_ratio's warmup and a decay_ratio's decay are of the new length from the
    resume on, as in transformers' Trainer resumed with another max_steps (its scheduler is
    rebuilt for it)."""
    if old == new:
        return None
    if step >= new:
        return (f"note: the checkpoint is at step {step}, at or past this run's {new} steps "
                f"(max_steps / epochs now, {old} steps in the checkpoint): nothing is left to "
                f"train, the run ends at step {step}")
    return (f"note: this run is {new} steps long (max_steps / epochs), the checkpoint's was "
            f"{old}: from step {step + 1} on the lr follows the {new}-step schedule (its warmup "
            "too with a warmup_ratio, and \"wsd\"'s decay with a decay_ratio), as transformers' "
            "Trainer resumed with another max_steps")


def freeze_parameters(model, freeze: tuple[str, ...], train_layers: tuple[int, ...] | None
                      ) -> None:
    """Full fine-tuning: everything trains except ``freeze`` globs and layers not listed."""
    n = len(model.layers)
    keep_layers = None
    if train_layers is not None:
        bad = [i for i in train_layers if not -n <= i < n]
        if bad:
            raise EmberError(f"train_layers {bad} out of range for a {n}-layer model")
        keep_layers = {i % n for i in train_layers}
    used = set()
    for name, p in model.named_parameters():
        trainable = True
        if keep_layers is not None:
            m = re.match(r"layers\.(\d+)\.", name)
            trainable = m is not None and int(m[1]) in keep_layers
        for pat in freeze:
            if fnmatch.fnmatchcase(name, pat):
                used.add(pat)
                trainable = False
        p.requires_grad_(trainable)
    unused = [pat for pat in freeze if pat not in used]
    if unused:
        raise EmberError(f"freeze pattern {unused[0]!r} matches no parameter (names look like "
                         f"{next(iter(dict(model.named_parameters())))!r})")


def build_model(cfg: TrainConfig, device: str):
    # model.init: an earlier stage's weights, its adapter already on when this method continues it
    model, tokenizer, started = load_start(cfg, cfg.model.dtype, device)
    if tokenizer is None:
        raise EmberError(f"model {cfg.model.name!r} has no tokenizer.json; training needs one")
    if cfg.method == "lora":
        if not started:
            # QPiSSA: PiSSA on an NF4 base decomposes the weights it was quantized from, read
            # again from the base's files one tensor at a time
            dense = None
            if cfg.lora.init.startswith("pissa") and is_quantized(model):
                dense = lambda keys: iter_dense_weights(base_of(cfg), keys)  # noqa: E731
            apply_lora(model, cfg.lora, dense_weights=dense)
        if cfg.checkpoint.save_final:  # a PEFT file the run could not write: say so now
            check_peft_exportable(model)
    elif cfg.method == "prompt":
        pt = cfg.prompt_tuning
        if not started:
            apply_prompt_tuning(model, pt.num_virtual_tokens, pt.init, pt.init_text,
                                tokenizer)
    else:
        if is_quantized(model):  # transformers' Trainer refuses it too
            raise EmberError(f"model {cfg.model.name!r} is a bitsandbytes 4-bit checkpoint: its "
                             "NF4 layers are frozen, so method = \"full\" would train only the "
                             "embeddings and norms; use method = \"lora\" (QLoRA), or the "
                             "unquantized model")
        freeze_parameters(model, cfg.freeze, cfg.train_layers)
    if cfg.head.type is not None:
        train_head(model, cfg)
    if not any(p.requires_grad for p in model.parameters()):
        raise EmberError("no parameter is trainable: check lora.targets / freeze / train_layers")
    return model, tokenizer


def make_optimizer(model, cfg, device: str, embedding_lr: float | None = None
                   ) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters (``optim.name``: torch's, or ``AdamW8bit`` with
    bitsandbytes' 8-bit states). ``embedding_lr`` (``lora.embedding_lr``): the peak lr
    of the adapters on the embedding and the head (LoRA, modules_to_save; not the rows of
    trainable_token_indices, which take ``lr``), kept in their groups as ``lr_ratio`` (the
    trainer multiplies the scheduled lr by it)."""
    parts: dict[tuple[bool, bool], list] = {k: [] for k in
                                            ((True, False), (False, False), (True, True),
                                             (False, True))}
    by_rows = False
    for name, p in model.named_parameters():
        if p.requires_grad:
            # Norm gains and biases (the 1-D parameters) are not shrunk towards 0; matrices,
            # embeddings included, and DoRA magnitudes are (transformers'
            # get_decay_parameter_names: all but biases and norms).
            # trainable_token_indices: only those rows train, so only they decay (rows_decay);
            # they train at the adapters' lr (PEFT's LoRA+ gives its embedding lr to LoRA
            # embeddings only, Unsloth its embedding_learning_rate to modules_to_save)
            rows = getattr(p, "ember_trained_rows", None) is not None
            emb = (embedding_lr is not None and not rows
                   and name.split(".")[0] in ("embed", "lm_head"))
            by_rows = by_rows or rows
            parts[((p.ndim >= 2 or name.endswith("lora_magnitude")) and not rows, emb)].append(p)
    if embedding_lr is not None and not (parts[(True, True)] or parts[(False, True)]):
        raise EmberError("lora.embedding_lr is set but no adapter is on the embedding or the head: "
                         "add embed_tokens / lm_head to lora.targets, or drop lora.embedding_lr")
    groups = [{"params": ps, "weight_decay": cfg.weight_decay if decay else 0.0}
              | ({"lr_ratio": embedding_lr / cfg.lr} if emb else {})
              for (decay, emb), ps in parts.items() if ps]
    kw = dict(lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)
    if cfg.name == "adamw_8bit":
        from ember.engine.optim8bit import AdamW8bit

        # embedding tables keep 32-bit states, as transformers' Trainer registers them with
        # bnb (8-bit embedding states are unstable)
        tables = {id(p) for p in _embedding_tables(model)}
        groups = [g | {"params": ps} | ({"optim_bits": 32} if fp32 else {})
                  for g in groups for fp32 in (False, True)
                  for ps in [[p for p in g["params"] if (id(p) in tables) == fp32]] if ps]
        opt = AdamW8bit(groups, **kw)
    else:
        try:
            opt = torch.optim.AdamW(groups, fused=True, **kw)
        except (RuntimeError, ValueError):  # fused kernel missing for this device/dtype
            opt = torch.optim.AdamW(groups, foreach=True, **kw)
    if cfg.weight_decay > 0 and by_rows:  # no per-step hook for runs without such a matrix
        opt.register_step_pre_hook(_rows_decay(cfg.weight_decay))
    return opt


def _embedding_tables(model) -> list[torch.nn.Parameter]:
    """The parameters transformers holds in an ``nn.Embedding``: the token embedding and a
    prompt-tuning prompt (PEFT's PromptEmbedding is one); not LoRA's A and B, nor a table
    trained by rows (trainable_token_indices: PEFT's trainable_tokens_delta is no nn.Embedding,
    so the Trainer gives it 8-bit states)."""
    from ember.models.prompt_tuning import PromptEmbedding

    return [p for m in model.modules() for p in (
        [m.weight] if isinstance(m, torch.nn.Embedding) else
        [m.prompt] if isinstance(m, PromptEmbedding) else [])
        if getattr(p, "ember_trained_rows", None) is None]


def _rows_decay(weight_decay: float):
    """AdamW's decoupled decay (``p *= 1 - lr * wd`` before the update) on the trained rows
    alone of a matrix trained by rows (PEFT's ``trainable_tokens_delta`` decays as a whole)."""

    def hook(opt, args, kwargs) -> None:
        with torch.no_grad():
            for g in opt.param_groups:
                for p in g["params"]:
                    rows = getattr(p, "ember_trained_rows", None)
                    if rows is not None and p.grad is not None:
                        p[rows] *= 1.0 - g["lr"] * weight_decay

    return hook


def memory_gib(device: str) -> float:
    if device.startswith("cuda"):
        # The run's device: without one torch reads the current device, cuda:0 for "cuda:1".
        return torch.cuda.max_memory_allocated(torch.device(device)) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def num_weights(model) -> int:
    """The model's parameter count, a 4-bit layer's weight counted as its (out, in) weights
    (not as the bytes that pack them, nor left out when it is not a Parameter)."""
    from ember.models.nf4 import Linear4bit

    n = sum(p.numel() for p in model.parameters())
    for m in model.modules():
        if isinstance(m, Linear4bit):
            packed = getattr(m, "nf4_storage", None)
            n += m.in_features * m.out_features - (
                packed.numel() if isinstance(packed, torch.nn.Parameter) else 0)
    return n


def router_aux_coef(cfg: TrainConfig, model) -> float:
    """The weight of the MoE load-balancing loss: ``model.router_aux_loss_coef`` if set, else the
    checkpoint's ``router_aux_loss_coef`` (transformers' 0.001 default) for a language model and 0
    for a classifier (``[head]``: transformers' MoE ``*ForSequenceClassification`` never adds
    it); 0 for a dense model."""
    if not model.cfg.num_experts:
        if cfg.model.router_aux_loss_coef:
            raise EmberError(f"model.router_aux_loss_coef is set but {cfg.model.name} is not a "
                             "mixture-of-experts model; drop it")
        return 0.0
    c = cfg.model.router_aux_loss_coef
    if c is None and cfg.head.type is not None:  # (was: the checkpoint's, unlike transformers)
        return 0.0
    return model.cfg.router_aux_loss_coef if c is None else c
