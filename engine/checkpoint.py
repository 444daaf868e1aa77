"""Atomic training checkpoints in ``<run_dir>/checkpoints/step_<N>/``.

A checkpoint is a dict of parts, each stored by kind:

- ``model``: ``{name: tensor}`` -> ``model.safetensors`` (the trainable weights: LoRA adapters,
  or the full model's parameters);
- ``trainer``: JSON-able dict -> ``trainer_state.json`` (step, data position, early stopping...);
- ``config``: str -> ``config.toml`` (the resolved run config);
- anything else (optimizer, RNG states) -> ``<part>.pt`` with ``torch.save``, read back with
  ``torch.load(weights_only=True)``: tensors and plain containers only, never arbitrary pickles.

Atomicity: the parts go to a hidden temporary folder, ``manifest.json`` (file names and sizes) is
written last, then the folder is renamed into place. ``load_latest`` takes the newest folder whose
manifest matches its files, so a crash mid-save never leaves a checkpoint that looks valid.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ember import EmberError

MANIFEST = "manifest.json"
_STEP_DIR = re.compile(r"step_(\d+)")
_FORMAT = 1


def checkpoint_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "checkpoints"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_part(folder: Path, key: str, value) -> str:
    if key == "model":
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in value.items()}
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
        return "model.safetensors"
    if key == "trainer":
        (folder / "trainer_state.json").write_text(json.dumps(value, indent=2) + "\n")
        return "trainer_state.json"
    if key == "config":
        (folder / "config.toml").write_text(value, encoding="utf-8")
        return "config.toml"
    if not re.fullmatch(r"[A-Za-z0-9_]+", key):
        raise EmberError(f"checkpoint part name {key!r} must be letters, digits and _")
    torch.save(value, folder / f"{key}.pt")
    return f"{key}.pt"


def save(state: dict, run_dir: str | os.PathLike, step: int, *, keep_last: int | None = None
         ) -> Path:
    """Write ``state`` as the checkpoint of ``step`` (replacing one of the same step) and keep
    only the newest ``keep_last`` checkpoints. Returns the checkpoint folder."""
    root = checkpoint_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp-{final.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        files = {}
        for key, value in state.items():
            name = _write_part(tmp, key, value)
            files[name] = key
        manifest = {"format": _FORMAT, "step": step,
                    "files": {n: {"part": k, "bytes": (tmp / n).stat().st_size}
                              for n, k in files.items()}}
        for n in files:
            with open(tmp / n, "rb+") as f:
                os.fsync(f.fileno())
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        _fsync_dir(tmp)
        if final.exists():
            old = root / f".old-{final.name}-{uuid.uuid4().hex[:8]}"
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
        _fsync_dir(root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if keep_last is not None:
        for old in list_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def _valid(folder: Path) -> dict | None:
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        files = manifest["files"]
        if manifest.get("format") != _FORMAT:
            return None
        for name, info in files.items():
            if (folder / name).stat().st_size != info["bytes"]:
                return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return manifest


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoint folders, oldest first."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_DIR.fullmatch(p.name)
        if m and p.is_dir() and _valid(p) is not None:
            found.append((int(m[1]), p))
    return [p for _, p in sorted(found)]


def load(folder: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """The parts of one checkpoint folder, as given to ``save``."""
    folder = Path(folder)
    manifest = _valid(folder)
    if manifest is None:
        raise EmberError(f"{folder}: not a complete checkpoint (manifest missing or files "
                         "truncated)")
    state = {}
    for name, info in manifest["files"].items():
        path, key = folder / name, info["part"]
        try:
            if name == "model.safetensors":
                state[key] = load_file(str(path), device=str(map_location))
            elif name == "trainer_state.json":
                state[key] = json.loads(path.read_text())
            elif name == "config.toml":
                state[key] = path.read_text(encoding="utf-8")
            else:
                state[key] = torch.load(path, map_location=map_location, weights_only=True)
        except (OSError, ValueError, RuntimeError, SafetensorError) as e:
            raise EmberError(f"{path}: cannot read checkpoint part ({type(e).__name__}: {e})"
                             ) from None
    return state


def load_latest(run_dir: str | os.PathLike, map_location: str | torch.device = "cpu"
                ) -> tuple[dict, Path] | None:
    """(state, folder) of the newest complete checkpoint, or None when there is none."""
    ckpts = list_checkpoints(run_dir)
    if not ckpts:
        return None
    return load(ckpts[-1], map_location), ckpts[-1]
