"""The training loop: SFT with LoRA or full fine-tuning, evaluation, checkpoints, resume.

One optimizer step = ``grad_accum`` packed micro-batches of ``data.tokens_per_batch`` tokens. The
loss of every micro-batch is divided by the answer tokens of the whole step (``losses.sft_loss``),
so accumulation is token-weighted: 4 micro-batches of 1 example give the gradients of 1 batch of 4.

Run directory (``cfg.out_dir``)::

    config.toml          the resolved config
    metrics.jsonl        one JSON row per logged step ("kind": "train") and per evaluation ("eval")
    data/                the generated task splits (``[task]``)
    checkpoints/step_N/  adapters or trainable weights, optimizer, RNG, data position, step
    final/adapter/       PEFT adapter (LoRA), or final/model/ (full fine-tuning, an HF folder)
    metrics.png          loss and metric curves (when matplotlib is installed)

Resume (``resume=True``) restores the newest complete checkpoint; on CPU the continued run logs the
same losses as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import math
import random
import re
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ember import EmberError
from ember.engine import checkpoint as ckpt
from ember.engine.config import TrainConfig, from_dict, parse_toml, to_dict, to_toml
from ember.engine.data import Datasets, PackedBatches, load_datasets
from ember.engine.evaluation import generation_eval, validation_loss
from ember.engine.losses import sft_loss
from ember.engine.metrics import perplexity
from ember.models.loading import load_pretrained, save_pretrained
from ember.models.lora import apply_lora, load_adapter, lora_modules, save_adapter

# Sections a resumed run may change (they do not alter the trajectory up to the checkpoint).
RESUMABLE_CHANGES = {"eval", "checkpoint", "max_steps", "epochs", "log_every", "plot", "threads"}


# --- runtime decisions ---------------------------------------------------------------------------

def cpu_has_bf16() -> bool:
    """True when the CPU computes bf16 matmuls natively (AVX512-BF16 or AMX), where bf16
    autocast is faster than fp32; elsewhere bf16 is emulated and slower."""
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


def resolve(cfg: TrainConfig) -> TrainConfig:
    """Decide every "auto" field (device, precision, model dtype, lr, task data paths)."""
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
        low = cfg.method == "lora" and precision == "bf16"
        model = model.__class__(name=model.name, dtype="bfloat16" if low else "float32")
    optim = cfg.optim
    if optim.lr is None:
        optim = from_dict(type(optim), {**to_dict(optim),
                                        "lr": 1e-3 if cfg.method == "lora" else 2e-5})
    data = cfg.data
    if cfg.task.name is not None:
        folder = cfg.out_dir / "data"
        changes = {}
        if not data.train:
            changes["train"] = [str(folder / "train.jsonl")]
        if data.validation is None and data.val_fraction == 0 and cfg.task.validation > 0:
            changes["validation"] = str(folder / "validation.jsonl")
        if data.test is None and cfg.task.test > 0:
            changes["test"] = str(folder / "test.jsonl")
        data = from_dict(type(data), {**to_dict(data), **changes})
    return cfg.replace(device=device, precision=precision, model=model, optim=optim, data=data)


def autocast_for(device: str, precision: str):
    """A factory of autocast contexts for ``precision`` (fp32: no autocast)."""
    if precision == "fp32":
        return contextlib.nullcontext
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    kind = "cuda" if device.startswith("cuda") else "cpu"
    return lambda: torch.autocast(kind, dtype=dtype)


def lr_factor(step: int, total: int, warmup: int, schedule: str, min_ratio: float) -> float:
    """Multiplier of the peak lr for optimizer step ``step`` (0-based) of ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    decay = 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1 - progress
    return min_ratio + (1 - min_ratio) * decay


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
    model, tokenizer = load_pretrained(cfg.model.name, cfg.model.dtype, device)
    if tokenizer is None:
        raise EmberError(f"model {cfg.model.name!r} has no tokenizer.json; training needs one")
    if cfg.method == "lora":
        apply_lora(model, cfg.lora)
    else:
        freeze_parameters(model, cfg.freeze, cfg.train_layers)
    if not any(p.requires_grad for p in model.parameters()):
        raise EmberError("no parameter is trainable: check lora.targets / freeze / train_layers")
    return model, tokenizer


def make_optimizer(model, cfg, device: str) -> torch.optim.AdamW:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            # Norm gains, biases and embeddings are not shrunk towards 0.
            (decay if p.ndim >= 2 and "embed" not in name else no_decay).append(p)
    groups = [g for g in ({"params": decay, "weight_decay": cfg.weight_decay},
                          {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    kw = dict(lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)
    try:
        return torch.optim.AdamW(groups, fused=True, **kw)
    except (RuntimeError, ValueError):  # fused kernel missing for this device/dtype
        return torch.optim.AdamW(groups, foreach=True, **kw)


def memory_gib(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _fmt(scores: dict) -> str:
    out = []
    for k, v in scores.items():
        if k in ("val_loss", "train_loss"):
            out.append(f"{k} {v:.4f}")
        elif k == "perplexity":
            out.append(f"perplexity {v:.3f}")
        else:
            out.append(f"{k} {100 * v:.1f}%")
    return ", ".join(out)


@dataclass
class RunResult:
    run_dir: Path
    steps: int
    before: dict
    after: dict
    stopped_early: bool
    seconds: float


class Trainer:
    """``Trainer(cfg).run()`` trains, evaluates and saves; see the module docstring."""

    def __init__(self, cfg: TrainConfig, *, resume: bool = False, echo=print,
                 progress: bool | None = None, stop_after: int | None = None):
        self.raw_cfg, self.resume, self.echo = cfg, resume, echo
        self.progress = sys.stderr.isatty() if progress is None else progress
        # Leave after this step with a checkpoint, as a preempted job would (resume continues).
        self.stop_after = stop_after

    # --- setup ---------------------------------------------------------------------------------
    def _prepare_run_dir(self, cfg: TrainConfig):
        run_dir = cfg.out_dir
        latest = ckpt.load_latest(run_dir) if self.resume else None
        if not self.resume and ckpt.list_checkpoints(run_dir):
            raise EmberError(f"{run_dir} already holds a run with checkpoints; continue it with "
                             "--resume, or start a new one with --set run_dir=<new folder>")
        if self.resume and latest is None:
            self.echo(f"resume: no checkpoint in {run_dir}, starting from step 0")
        if latest is not None:
            saved = from_dict(TrainConfig, parse_toml(latest[0]["config"], str(latest[1])))
            a, b = to_dict(saved), to_dict(cfg)
            diff = sorted(k for k in set(a) | set(b)
                          if a.get(k) != b.get(k) and k not in RESUMABLE_CHANGES)
            if diff:
                raise EmberError(f"cannot resume {run_dir}: the config differs from the "
                                 f"checkpoint's in {', '.join(diff)}; resume with the same "
                                 "settings (only " + ", ".join(sorted(RESUMABLE_CHANGES))
                                 + " may change)")
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.toml").write_text(to_toml(cfg), encoding="utf-8")
        return latest

    def _datasets(self, cfg: TrainConfig, tokenizer) -> Datasets:
        if cfg.task.name is not None:
            from ember.engine.tasks import write_splits

            t = cfg.task
            write_splits(t.name, cfg.out_dir / "data",
                         {"train": t.train, "validation": t.validation, "test": t.test}, t.seed)
        ds = load_datasets(cfg.data, tokenizer)
        self.echo(ds.summary())
        return ds

    # --- state ---------------------------------------------------------------------------------
    def _state(self, cfg, model, opt, batches, step, extra) -> dict:
        rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
        return {"model": trainable, "optimizer": opt.state_dict(), "rng": rng,
                "trainer": {"step": step, "data": batches.state_dict(), **extra},
                "config": to_toml(cfg)}

    def _restore(self, state: dict, model, opt, batches) -> dict:
        params = dict(model.named_parameters())
        missing = [k for k in state["model"] if k not in params]
        if missing:
            raise EmberError(f"checkpoint has weights this model lacks: {missing[:3]}")
        with torch.no_grad():
            for k, v in state["model"].items():
                params[k].copy_(v)
        opt.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(state["rng"]["python"])
        if "cuda" in state["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        batches.load_state_dict(state["trainer"]["data"])
        return state["trainer"]

    def _log(self, row: dict) -> None:
        with open(self.cfg.out_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")

    # --- evaluation ----------------------------------------------------------------------------
    def evaluate(self, step: int) -> dict:
        cfg, ds = self.cfg, self.datasets
        scores: dict[str, float] = {}
        if cfg.eval.val_loss and ds.validation:
            loss, _ = validation_loss(self.model, ds.validation, cfg.data.tokens_per_batch,
                                      self.device, self.autocast, cfg.eval.max_val_batches)
            scores.update(val_loss=loss, perplexity=perplexity(loss))
        split = self._gen_split()
        if cfg.eval.metrics and split is not None:
            res = generation_eval(self.model, self.tokenizer, split[1], cfg.eval.metrics,
                                  max_new_tokens=cfg.eval.max_new_tokens,
                                  batch_size=cfg.eval.batch_size, autocast=self.autocast,
                                  max_examples=cfg.eval.max_examples, show=cfg.eval.show)
            scores.update(res.scores)
            self.last_samples, self.last_gen = res.samples, (split[0], res.examples, res.seconds)
        if scores:
            self._log({"kind": "eval", "step": step, **scores})
        return scores

    def _gen_split(self):
        ds, want = self.datasets, self.cfg.eval.split
        if want in ("auto", "test") and ds.test:
            return "test", ds.test
        if want == "test":
            raise EmberError("eval.split = \"test\" but there is no test split (data.test)")
        return ("validation", ds.validation) if ds.validation else None

    def _gen_note(self) -> str:
        if self.last_gen is None:
            return ""
        split, n, sec = self.last_gen
        return f" ({n} {split} examples, {sec:.0f} s)"

    # --- the loop ------------------------------------------------------------------------------
    def run(self) -> RunResult:
        t_start = time.perf_counter()
        cfg = self.cfg = resolve(self.raw_cfg)
        if cfg.threads is not None:
            torch.set_num_threads(cfg.threads)
        latest = self._prepare_run_dir(cfg)
        self.device, self.autocast = cfg.device, autocast_for(cfg.device, cfg.precision)
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        self.model, self.tokenizer = build_model(cfg, self.device)
        model = self.model
        n_all = sum(p.numel() for p in model.parameters())
        n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
        what = (f"LoRA r={cfg.lora.rank} on {len(lora_modules(model))} modules"
                if cfg.method == "lora" else "full fine-tuning")
        self.echo(f"run {cfg.out_dir}: {cfg.model.name} ({n_all / 1e6:.1f}M params), {what}, "
                  f"{n_train / 1e6:.2f}M trainable; {cfg.device}, {cfg.precision}, "
                  f"{torch.get_num_threads()} threads")
        self.datasets = self._datasets(cfg, self.tokenizer)
        batches = PackedBatches.from_config(self.datasets.train, cfg.data)
        per_epoch = len(batches.plan(0))
        total = cfg.max_steps or max(1, math.ceil(cfg.epochs * per_epoch / cfg.grad_accum))
        o = cfg.optim
        warmup = o.warmup_steps if o.warmup_steps is not None else round(o.warmup_ratio * total)
        opt = make_optimizer(model, o, self.device)
        params = [p for g in opt.param_groups for p in g["params"]]
        scaler = torch.amp.GradScaler("cuda") if cfg.precision == "fp16" else None
        self.last_samples, self.last_gen = [], None

        step, extra = 0, {"tokens": 0, "best": None, "bad_evals": 0, "before": {}, "seconds": 0.0}
        if latest is not None:
            extra = self._restore(latest[0], model, opt, batches)
            step = extra.pop("step")
            extra.pop("data")
            self._truncate_metrics(step)
            self.echo(f"resumed from {latest[1]} (step {step} of {total})")
        elif (cfg.out_dir / "metrics.jsonl").exists():
            (cfg.out_dir / "metrics.jsonl").unlink()
        self.echo(f"{total} steps ({per_epoch} batches of <= {cfg.data.tokens_per_batch} tokens "
                  f"per epoch, grad_accum {cfg.grad_accum}), lr {o.lr:g} {o.schedule}, "
                  f"warmup {warmup}")

        if step == 0 and cfg.eval.before:
            before = self.evaluate(0)
            extra["before"] = before
            self._early_stop(before, extra)  # the base model is the baseline to improve on
            if before:
                self.echo(f"before fine-tuning: {_fmt(before)}{self._gen_note()}")

        model.train()
        stream = self._stream(batches)
        bar = None
        if self.progress:
            from tqdm import tqdm

            bar = tqdm(total=total, initial=step, unit="step", dynamic_ncols=True, leave=True)
        stopped, last_eval, scores = False, None, {}
        t_train = time.perf_counter()
        seconds0, step0 = extra["seconds"], step
        while step < total and not stopped:
            t0 = time.perf_counter()
            micro = [next(stream) for _ in range(cfg.grad_accum)]
            n_loss = sum(b.num_loss_tokens for b in micro)
            n_tok = sum(b.num_tokens for b in micro)
            lr = o.lr * lr_factor(step, total, warmup, o.schedule, o.min_lr_ratio)
            for g in opt.param_groups:
                g["lr"] = lr
            loss_sum = 0.0
            for b in micro:
                if b.num_loss_tokens == 0:
                    continue
                with self.autocast():
                    loss = sft_loss(model, b.to(self.device), n_loss)
                (scaler.scale(loss) if scaler else loss).backward()
                loss_sum += float(loss.detach())
            if scaler:
                scaler.unscale_(opt)
            norm = torch.nn.utils.clip_grad_norm_(params, o.max_grad_norm or math.inf)
            if scaler:
                scaler.step(opt)
                scaler.update()
            else:
                opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            extra["tokens"] += n_tok
            dt = time.perf_counter() - t0
            if step % cfg.log_every == 0 or step == total:
                self._log({"kind": "train", "step": step, "loss": loss_sum, "lr": lr,
                           "grad_norm": float(norm), "tokens": extra["tokens"],
                           "loss_tokens": n_loss, "tokens_per_s": n_tok / dt,
                           "seconds": seconds0 + time.perf_counter() - t_train})
            status = (f"loss {loss_sum:.4f} | {n_tok / dt:,.0f} tok/s | "
                      f"mem {memory_gib(self.device):.1f} GiB")
            if bar is not None:
                bar.update(1)
                bar.set_postfix_str(status)
            elif step % max(1, total // 10) == 0 or step == total:
                # No terminal (logs, CI): a line every tenth of the run instead of a bar.
                spent = time.perf_counter() - t_train
                eta = spent / (step - step0) * (total - step)
                self.echo(f"step {step}/{total}: {status} | ETA {eta:.0f} s")
            if cfg.eval.every_steps and step % cfg.eval.every_steps == 0 and step < total:
                scores, last_eval = self.evaluate(step), step
                msg = f"step {step}: {_fmt(scores)}"
                (bar.write if bar is not None else self.echo)(msg)
                stopped = self._early_stop(scores, extra)
            if cfg.checkpoint.every_steps and step % cfg.checkpoint.every_steps == 0 and (
                    step < total and not stopped):
                extra["seconds"] = seconds0 + time.perf_counter() - t_train
                ckpt.save(self._state(cfg, model, opt, batches, step, extra), cfg.out_dir, step,
                          keep_last=cfg.checkpoint.keep_last)
            if self.stop_after is not None and step >= self.stop_after and step < total:
                extra["seconds"] = seconds0 + time.perf_counter() - t_train
                ckpt.save(self._state(cfg, model, opt, batches, step, extra), cfg.out_dir, step,
                          keep_last=cfg.checkpoint.keep_last)
                if bar is not None:
                    bar.close()
                self.echo(f"stopped after step {step}; continue with --resume")
                return RunResult(cfg.out_dir, step, extra["before"], {}, False,
                                 time.perf_counter() - t_start)
        if bar is not None:
            bar.close()
        extra["seconds"] = seconds0 + time.perf_counter() - t_train
        if last_eval != step:
            scores = self.evaluate(step)
        if stopped:
            self.echo(f"early stopping at step {step}: no {cfg.eval.early_stopping} improvement "
                      f"in {cfg.eval.patience} evaluations")
        self.echo(f"after fine-tuning ({step} steps, {extra['seconds']:.0f} s): {_fmt(scores)}"
                  f"{self._gen_note()}")
        for prompt, pred, ref in self.last_samples:
            self.echo(f"  prompt: {prompt!r}\n  output: {pred!r}\n  answer: {ref!r}")
        if cfg.checkpoint.save_final:
            ckpt.save(self._state(cfg, model, opt, batches, step, extra), cfg.out_dir, step,
                      keep_last=cfg.checkpoint.keep_last)
            self._save_final(cfg)
        if cfg.plot:
            self._plot()
        self.echo(f"done in {time.perf_counter() - t_start:.0f} s")
        return RunResult(cfg.out_dir, step, extra["before"], scores, stopped,
                         time.perf_counter() - t_start)

    def _stream(self, batches: PackedBatches):
        while True:
            yield from batches

    def _early_stop(self, scores: dict, extra: dict) -> bool:
        ev = self.cfg.eval
        name = ev.early_stopping
        if name is None or name not in scores:
            return False
        mode = ev.mode if ev.mode != "auto" else (
            "min" if name in ("val_loss", "perplexity") else "max")
        value, best = scores[name], extra["best"]
        better = best is None or (value < best - ev.min_delta if mode == "min"
                                  else value > best + ev.min_delta)
        if better:
            extra["best"], extra["bad_evals"] = value, 0
            return False
        extra["bad_evals"] += 1
        return extra["bad_evals"] >= ev.patience

    def _truncate_metrics(self, step: int) -> None:
        """Drop rows logged after the checkpoint, so the log reads like one uninterrupted run."""
        path = self.cfg.out_dir / "metrics.jsonl"
        if not path.exists():
            return
        rows = [r for r in path.read_text().splitlines() if r.strip()]
        keep = [r for r in rows if json.loads(r)["step"] <= step]
        path.write_text("".join(r + "\n" for r in keep))

    def _save_final(self, cfg: TrainConfig) -> None:
        final = cfg.out_dir / "final"
        if cfg.method == "lora":
            out = save_adapter(self.model, final / "adapter",
                               base_model_name_or_path=cfg.model.name)
        else:
            out = save_pretrained(self.model, final / "model", self.tokenizer)
        self.echo(f"saved {out}")

    def _plot(self) -> None:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            self.echo("note: matplotlib is not installed, skipped metrics.png "
                      "(pip install matplotlib)")
            return
        rows = [json.loads(r) for r in (self.cfg.out_dir / "metrics.jsonl").read_text().split("\n")
                if r.strip()]
        train = [r for r in rows if r["kind"] == "train"]
        evals = [r for r in rows if r["kind"] == "eval"]
        names = [k for k in (evals[-1] if evals else {}) if k not in ("kind", "step")]
        fig, axes = plt.subplots(1, 1 + bool(names), figsize=(6 + 5 * bool(names), 4))
        axes = axes if names else [axes]
        axes[0].plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss")
        val = [r for r in evals if "val_loss" in r]
        if val:
            axes[0].plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-",
                         label="validation loss")
        axes[0].set_xlabel("step")
        axes[0].set_yscale("log")
        axes[0].legend()
        for name in names:
            if name in ("val_loss", "perplexity"):
                continue
            pts = [r for r in evals if name in r]
            axes[1].plot([r["step"] for r in pts], [r[name] for r in pts], "o-", label=name)
        if names:
            axes[1].set_xlabel("step")
            axes[1].legend()
        fig.tight_layout()
        fig.savefig(self.cfg.out_dir / "metrics.png", dpi=100)
        plt.close(fig)


def train(cfg: TrainConfig, *, resume: bool = False, echo=print, progress: bool | None = None,
          stop_after: int | None = None) -> RunResult:
    return Trainer(cfg, resume=resume, echo=echo, progress=progress, stop_after=stop_after).run()


def load_run_model(run_dir: str | Path, device: str | None = None):
    """(model with the run's trained weights, tokenizer, resolved config) from a run directory:
    the final adapter / model if saved, else the newest checkpoint."""
    run_dir = Path(run_dir)
    cfg_path = run_dir / "config.toml"
    if not cfg_path.is_file():
        raise EmberError(f"{run_dir} is not a run directory (no config.toml)")
    cfg = from_dict(TrainConfig, parse_toml(cfg_path.read_text(encoding="utf-8"), str(cfg_path)))
    device = device or cfg.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        device = "cpu"
    final_adapter, final_model = run_dir / "final" / "adapter", run_dir / "final" / "model"
    if cfg.method == "full" and final_model.is_dir():
        model, tok = load_pretrained(final_model, cfg.model.dtype, device)
        return model, tok, cfg
    model, tok = load_pretrained(cfg.model.name, cfg.model.dtype, device)
    if cfg.method == "lora" and final_adapter.is_dir():
        load_adapter(model, final_adapter)
        return model, tok, cfg
    latest = ckpt.load_latest(run_dir)
    if latest is None:
        raise EmberError(f"{run_dir} has no final weights and no checkpoint to load")
    if cfg.method == "lora":
        apply_lora(model, cfg.lora)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for k, v in latest[0]["model"].items():
            params[k].copy_(v)
    return model, tok, cfg
