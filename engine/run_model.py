"""A run's trained model loaded outside training (``load_run_model``: the final export, else the
weights the run ends with, ``run_weights``), with the checks that its base is the one it was
trained on; ``export_final_adapter`` (a finished run's adapter files, without its base) and
``check_models`` (the models a config names are found). Checkpoints, resume and the final export
are in ``engine/state.py``, which re-exports these.
"""

from __future__ import annotations

import dataclasses
import shutil
import warnings
from pathlib import Path

import torch

from ember import EmberError
from ember.engine import dcp
from ember.engine.best import best_root
from ember.engine.classification import attach_head
from ember.engine.config import TrainConfig, from_dict, parse_toml
from ember.engine.fingerprint import read_base_file, stale_final, weights_fingerprint
from ember.engine.runtime import build_model
from ember.engine.stages import base_of, load_base
from ember.models.lora import load_adapter
from ember.models.lora_init import changes_base
from ember.models.prompt_tuning import load_prompt_adapter


def check_models(cfg: TrainConfig, run_dir: str | Path | None = None, *,
                 teacher: bool = True) -> None:
    """The models a config names (model.name, model.init, distill.teacher) are found from the
    current folder, else an error naming the key, before a run directory is written (a missing
    distill.teacher was "model 'nope' not found" after it). ``run_dir``: the config is that run
    directory's; one started before local paths were recorded absolute
    (``runtime.absolute_paths``) holds them relative to its first folder. ``teacher=False``:
    the run's model is loaded, not trained (no teacher needed)."""
    from ember.models.hub import builtin_model, hf_cache_snapshot, list_models

    for key, v in (("model.name", cfg.model.name), ("model.init", cfg.model.init),
                   ("distill.teacher", cfg.distill.teacher if teacher else None)):
        if v is None or Path(v).expanduser().exists():
            continue
        if key != "model.init" and (builtin_model(v) or hf_cache_snapshot(v)):
            continue
        if run_dir is None:
            what = "a folder" if key == "model.init" else (
                f"a folder, a .gguf file, a built-in model ({', '.join(list_models())}) or a "
                "Hugging Face Hub id in the local Hugging Face cache (Ember downloads nothing)")
            raise EmberError(f"{key} {v!r} not found: give {what}; a relative path is taken "
                             f"from the current folder, {Path.cwd()}")
        where = (f"a relative path is taken from the current folder, {Path.cwd()}; run the "
                 "command from the folder the run started in, or " if not Path(v).is_absolute()
                 else "it was moved or deleted; ")
        raise EmberError(f"the run's {key} {v!r} ({Path(run_dir) / 'config.toml'}) not found: "
                         f"{where}set {key} there to the model's absolute path")


def load_run_model(run_dir: str | Path, device: str | None = None, echo=None):
    """(model with the run's trained weights, tokenizer, resolved config) from a run directory:
    the final adapter / model if saved, else the weights the run ends with (``run_weights``).
    ``echo`` is told which checkpoint that is when there is no final export."""
    run_dir = Path(run_dir)
    cfg_path = run_dir / "config.toml"
    if not cfg_path.is_file():
        raise EmberError(f"{run_dir} is not a run directory (no config.toml)")
    cfg = from_dict(TrainConfig, parse_toml(cfg_path.read_text(encoding="utf-8"), str(cfg_path)))
    device = device or cfg.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        device = "cpu"
    final_adapter, final_model = run_dir / "final" / "adapter", run_dir / "final" / "model"
    if (final_adapter.is_dir() or final_model.is_dir()) and (note := stale_final(run_dir)):
        _tell(echo, note, 2)
    if cfg.method in ("lora", "prompt") and final_adapter.is_dir():
        cfg = _without_gone_init(cfg, run_dir)
    if not (cfg.method == "full" and final_model.is_dir()):  # (which needs no base)
        check_models(cfg, run_dir, teacher=False)
    if cfg.method == "full" and final_model.is_dir():
        model, tok = load_base(cfg, final_model, cfg.model.dtype, device)
        attach_head(model, cfg, tok)  # saved as an HF classifier: check it is this run's
        return model, tok, cfg
    if cfg.method == "lora" and final_adapter.is_dir():
        model, tok = load_base(cfg, base_of(cfg), cfg.model.dtype, device,
                               quantize=cfg.model.quantize, double_quant=cfg.model.double_quant)
        _check_base(cfg, device, final_adapter, read_base_file(run_dir / "final"),
                    weights_fingerprint(model), echo, _rounds(cfg, residual=False))
        attach_head(model, cfg, tok)  # the adapter brings the trained head (modules_to_save)
        load_adapter(model, final_adapter)
        return model, tok, cfg
    if cfg.method == "prompt" and final_adapter.is_dir():
        model, tok = load_base(cfg, base_of(cfg), cfg.model.dtype, device)
        _check_base(cfg, device, final_adapter, read_base_file(run_dir / "final"),
                    weights_fingerprint(model), echo, None)
        load_prompt_adapter(model, final_adapter)
        return model, tok, cfg
    path, why = run_weights(run_dir, cfg)
    with torch.random.fork_rng(devices=[]):
        # seeded as the trainer builds: lora.init = "pissa_niter_K"'s residual base is a random
        # draw the checkpoint does not hold (was: another draw, under the trained adapters)
        torch.manual_seed(cfg.seed)
        model, tok = build_model(cfg, device)  # LoRA / frozen parts as trained: the same keys
    from ember.engine.state import base_fingerprint  # (state imports this module)

    recorded = _recorded_prints(path, run_dir)
    if cfg.method == "lora" and changes_base(cfg.lora.init) and "base_files" in recorded:
        # PiSSA / OLoRA: the base is a residual whose decomposition may differ in its last bits
        # on another device: the files it is computed from are what must be the same
        _check_base(cfg, device, path, recorded["base_files"],
                    getattr(model, "ember_base_print", None), echo, _rounds(cfg, residual=False))
    else:
        _check_base(cfg, device, path, recorded.get("base"), base_fingerprint(model), echo,
                    _rounds(cfg, residual=True))
    dcp.load_model_weights(path, model)
    if echo is not None:
        echo(f"{run_dir} has no final export: using {why}")
    return model, tok, cfg


def _without_gone_init(cfg: TrainConfig, run_dir: Path) -> TrainConfig:
    """A finished adapter stage whose earlier adapter (model.init) is gone since: ``cfg``
    without it when final/base.json records model.name as the base, since final/adapter then
    holds the whole adapter on it (was: "the run's model.init ... not found", though nothing of
    it is needed). An earlier full model, the base of the adapter, is still needed."""
    init = cfg.model.init
    if init is None or Path(init).expanduser().exists():
        return cfg
    if read_base_file(run_dir / "final", "model") != cfg.model.name:
        return cfg
    return cfg.replace(model=dataclasses.replace(cfg.model, init=None))


def export_final_adapter(run_dir: str | Path, cfg: TrainConfig, out: str | Path) -> Path | None:
    """Copy a finished LoRA / prompt-tuning run's ``final/adapter`` (PEFT's files, as
    ``save_adapter`` wrote them; PiSSA / OLoRA's already converted to a plain LoRA) to ``out``,
    without its base (was: loaded onto it, so a run moved without its base could not be
    exported; the files written were these, byte for byte). The files are checked first: a
    readable adapter of the run's kind. None when the run has no such final adapter (its weights
    are in a checkpoint, which needs the base to load)."""
    from ember.models.peft_files import _read_adapter, check_field_types, write_adapter_files

    folder = Path(run_dir) / "final" / "adapter"
    names = ("adapter_config.json", "adapter_model.safetensors")
    if cfg.method not in ("lora", "prompt") or not all((folder / n).is_file() for n in names):
        return None
    config, _ = _read_adapter(folder)
    kind = {"lora": "LORA", "prompt": "PROMPT_TUNING"}[cfg.method]
    if config.get("peft_type") != kind:
        raise EmberError(f"{folder}: peft_type is {config.get('peft_type')!r}, but the run "
                         f"trained method = {cfg.method!r} ({kind}): final/adapter is not "
                         "this run's")
    if kind == "LORA":
        check_field_types(config, folder / names[0])
    if Path(out).resolve() == folder.resolve():
        return Path(out)  # the files are there already
    return write_adapter_files(out, {n: lambda p, n=n: shutil.copyfile(folder / n, p)
                                     for n in names})


def _tell(echo, note: str, stacklevel: int) -> None:
    """A note for ``load_run_model``'s caller: to ``echo``, else a warning (a Python caller;
    ``stacklevel``: the frames up to it, counted from the function calling this)."""
    if echo is None:
        warnings.warn(note, stacklevel=stacklevel + 1)
    else:
        echo(note)


def _recorded_prints(path: Path, run_dir: Path) -> dict:
    """The base fingerprints checkpoint ``path`` records; for best/ weights (which record none),
    those of the run's newest checkpoint (a run resumes only onto the same base)."""
    keys = ("base", "base_files")
    for where in (path, dcp.find_latest(dcp.checkpoint_root(run_dir), level="size").path):
        extra = {} if where is None else torch.load(where / "extra.pt", weights_only=True)
        if any(k in extra for k in keys):
            return {k: extra[k] for k in keys if k in extra}
    return {}


def _rounds(cfg: TrainConfig, *, residual: bool) -> str | None:
    """What of the fingerprinted base is computed on the device (its last bits may differ on
    another): a 4-bit base's quantization, with ``residual`` PiSSA / OLoRA's residual; None."""
    if cfg.model.quantize:
        return "4-bit"
    if residual and cfg.method == "lora" and changes_base(cfg.lora.init):
        return "residual"
    return None


def _check_base(cfg: TrainConfig, device: str, source: Path, recorded: str | None,
                now: str | None, echo, rounds: str | None) -> None:
    """EmberError unless the base just loaded (fingerprint ``now``) is the one the trained
    weights in ``source`` were trained on (``recorded``; None: a run written before it was
    recorded, loaded as before). ``rounds`` (``_rounds``): computed on another device type than
    the run's, it may differ in its last bits: only a warning then."""
    if recorded is None or now is None or recorded == now:
        return
    name = base_of(cfg)
    what = (f"the base model {name} (model.name{', via model.init' if cfg.model.init else ''} "
            f"in the run's config.toml) differs from the one {source} was trained on")
    trained_on = cfg.device.split(":")[0]
    if rounds is not None and device.split(":")[0] != trained_on:
        note = (f"warning: {what}, or only seems to: the run computed its {rounds} base on "
                f"{trained_on}, this on {device}, whose rounding may differ; load on "
                f"{trained_on} to check")
        _tell(echo, note, 3)
        return
    raise EmberError(f"{what}: its files were replaced, edited or re-quantized since the run "
                     "(the trained weights over another base make another model). Point "
                     "model.name there at the model the run was trained on, or train again on "
                     "this one")


def run_weights(run_dir: Path, cfg: TrainConfig) -> tuple[Path, str]:
    """(checkpoint folder, what it is) of the weights a run without a final export ends with:
    with ``eval.early_stopping`` the best evaluation's (``<run_dir>/best/``, as the trainer loads
    them back before exporting ``final/``, also for a run stopped before its end: the best so
    far), else the newest checkpoint that verifies."""
    note = ""
    if cfg.eval.early_stopping is not None:
        best = dcp.find_latest(best_root(run_dir))
        if best.path is not None:
            step = int(best.path.name.removeprefix("step_"))
            return best.path, (f"the weights of step {step}, the best "
                               f"{cfg.eval.early_stopping} (eval.early_stopping), in {best.path}")
        note = f" (no best weights for eval.early_stopping in {best_root(run_dir)})"
    latest = dcp.find_latest(dcp.checkpoint_root(run_dir))
    if latest.path is None:
        skipped = "".join(f"\n  {m}" for m in latest.skipped)
        raise EmberError(f"{run_dir} has no final weights and no usable checkpoint{skipped}")
    return latest.path, f"the newest checkpoint {latest.path}{note}"
