"""Sharded, atomic training checkpoints on ``torch.distributed.checkpoint`` (DCP).

Layout of ``<run_dir>/checkpoints/step_00000120/``::

    .metadata, __<rank>_<i>.distcp   DCP: trainable weights + optimizer state, sharded by rank
    rng/rank_<r>.pt                   RNG states of every rank (torch, CUDA, Python, NumPy)
    extra.pt                          anything else the trainer passes (step, data position,
                                      scheduler, early-stopping state...), tensors allowed
    config.toml                       the resolved run config (when given)
    manifest.json                     written last: step, world size, every file's size + sha256

Only trainable parameters are stored (LoRA: the adapters; full fine-tuning: everything not
frozen): frozen weights come from the base model, rebuilt at resume. One process uses the same
code path (DCP without a process group). DCP stores global tensors, so a checkpoint written by N
processes loads into M processes (or into an unsharded model) with resharding.

Atomicity: every rank writes into a hidden ``.tmp-step_...`` folder; after a barrier the ranks
hash the files (split between them), rank 0 writes ``manifest.json`` and renames the folder into
place. A crash at any moment leaves either the previous checkpoints untouched plus a ``.tmp-``
folder (removed by the next save) or a complete new one. On resume ``find_latest`` takes the
newest checkpoint whose manifest matches its files, and names every newer one it skips and why
(incomplete, missing file, size or hash mismatch); ``load`` of a bad checkpoint is refused.

Multi-node runs need the run directory on a filesystem every node sees (as DCP itself does).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import sys
import time
import uuid
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

from ember import EmberError
from ember.engine.dcp_safe import safe_unpickling
from ember.engine.distributed import (
    DistInfo,
    all_gather_objects,
    barrier,
    broadcast_object,
    reshard_all,
)

MANIFEST = "manifest.json"
FORMAT = "ember-dcp/1"
_STEP_DIR = re.compile(r"step_(\d+)")
_CHUNK = 1 << 23


def checkpoint_root(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "checkpoints"


def step_dir(root: str | os.PathLike, step: int) -> Path:
    return Path(root) / f"step_{step:08d}"


# --- RNG -----------------------------------------------------------------------------------------

def rng_state() -> dict:
    """This process's RNG states (torch CPU, every CUDA device, Python, NumPy if imported)."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    np = sys.modules.get("numpy")
    if np is not None:
        name, keys, pos, has_gauss, gauss = np.random.get_state()
        # As a tensor, so the file loads with torch.load(weights_only=True).
        state["numpy"] = (name, torch.from_numpy(keys.astype("int64")), pos, has_gauss, gauss)
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_as_python_state(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        else:  # another GPU count: the current device continues from the saved device 0
            torch.cuda.set_rng_state(cuda[0])
    np = sys.modules.get("numpy")
    if np is not None and "numpy" in state:
        name, keys, pos, has_gauss, gauss = state["numpy"]
        np.random.set_state((name, keys.numpy().astype("uint32"), pos, has_gauss, gauss))


def _as_python_state(s):
    # torch.save/load round-trips random.getstate()'s tuples as lists in places.
    version, internal, gauss = s
    return (version, tuple(internal), gauss)


# --- manifest ------------------------------------------------------------------------------------

def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
        os.fsync(f.fileno())  # the data must be durable before the manifest vouches for it
    return h.hexdigest()


def _files(folder: Path) -> list[str]:
    """Every file under ``folder`` but its own manifest (the one at its top)."""
    top = folder / MANIFEST
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                  if p.is_file() and p != top)


def _check_files(folder: Path, names: list[str], manifest: dict, verify: str) -> list[str]:
    problems = []
    for name in names:
        info, path = manifest["files"][name], folder / name
        try:
            size = path.stat().st_size
        except OSError:
            problems.append(f"file {name} is missing")
            continue
        if size != info["bytes"]:
            problems.append(f"file {name} has {size} bytes, the manifest says {info['bytes']}")
        elif verify == "hash" and _sha256(path) != info["sha256"]:
            problems.append(f"file {name} does not match its sha256 in the manifest")
    return problems


def _read_manifest(folder: Path) -> tuple[dict | None, str | None]:
    path = folder / MANIFEST
    if not path.exists():
        return None, "incomplete: no manifest.json (the save was interrupted)"
    try:
        manifest = json.loads(path.read_text())
        if manifest.get("format") != FORMAT:
            return None, f"not an {FORMAT} checkpoint (format {manifest.get('format')!r})"
        if not isinstance(manifest["files"], dict) or not isinstance(manifest["step"], int):
            raise TypeError
    except (OSError, ValueError, KeyError, TypeError):
        return None, "corrupted: manifest.json is unreadable"
    return manifest, None


def verify(folder: str | os.PathLike, info: DistInfo | None = None, *, level: str = "hash"
           ) -> str | None:
    """None when ``folder`` is a complete checkpoint, else why not. ``level``: "hash" (sizes and
    sha256, the files split between ranks) or "size". Every rank must call it."""
    if level not in ("hash", "size"):
        raise EmberError(f"verify level must be 'hash' or 'size', got {level!r}")
    info = info or DistInfo()
    folder = Path(folder)
    manifest, why = _read_manifest(folder) if info.is_main else (None, None)
    manifest, why = broadcast_object((manifest, why), info)
    if manifest is None:
        return why
    names = sorted(manifest["files"])
    mine = _check_files(folder, names[info.rank:: info.world_size], manifest, level)
    problems = [p for ps in all_gather_objects(mine, info) for p in ps]
    if problems:
        more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
        return f"corrupted: {problems[0]}{more}"
    return None


def list_checkpoints(root: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, folder) of every ``step_N`` folder, complete or not, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_DIR.fullmatch(p.name)
        if m and p.is_dir():
            found.append((int(m[1]), p))
    return sorted(found)


@dataclass
class Latest:
    path: Path | None  # the newest complete checkpoint, or None
    skipped: list[str] = field(default_factory=list)  # "folder: why" for each newer bad one


def find_latest(root: str | os.PathLike, info: DistInfo | None = None, *,
                level: str = "hash") -> Latest:
    """The newest complete checkpoint under ``root``; newer incomplete or corrupted ones are
    named in ``skipped`` (log them). Every rank must call it and gets the same answer."""
    info = info or DistInfo()
    candidates = broadcast_object(list_checkpoints(root) if info.is_main else None, info)
    skipped = []
    for _, folder in reversed(candidates):
        why = verify(folder, info, level=level)
        if why is None:
            return Latest(folder, skipped)
        skipped.append(f"{folder}: {why}; skipped")
    return Latest(None, skipped)


# --- save / load ---------------------------------------------------------------------------------

def _dcp_call(fn, state: dict, folder: Path):
    with warnings.catch_warnings():
        # One process: DCP works without a process group, but warns that it assumes so.
        warnings.filterwarnings("ignore", message=".*assuming the intent is to.*single process")
        no_dist = not (dist.is_available() and dist.is_initialized())
        with safe_unpickling():  # a crafted folder runs no code (engine/dcp_safe.py)
            return fn(state, checkpoint_id=str(folder), no_dist=no_dist)


def _sharded(model: nn.Module) -> bool:
    """True for an FSDP model, its parameters back in their DTensor shards (``reshard_all``:
    after an evaluation some or all of them are gathered plain tensors, which neither the
    optimizer's state nor a checkpoint's names match)."""
    from torch.distributed.fsdp import FSDPModule

    if not any(isinstance(m, FSDPModule) for m in model.modules()):
        return False
    reshard_all(model)
    return True


def _state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer | None):
    """{"model": trainable weights by name[, "optim": optimizer state]}. A sharded model goes
    through DCP's state-dict API (DTensors, FSDP names); a plain one hands DCP its trainable
    parameters directly (the same names; loads land in them in place), which also works where
    DCP cannot walk the model: the packed NF4 entries of a QLoRA base are state-dict keys but
    not attributes (sharded, they are one frozen Parameter per layer: ``store_nf4_flat``)."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
        get_state_dict,
    )

    opts = StateDictOptions(ignore_frozen_params=True)
    if not _sharded(model):
        msd = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
        if optimizer is None:
            return {"model": msd}
        return {"model": msd, "optim": get_optimizer_state_dict(model, optimizer, options=opts)}
    if optimizer is None:
        return {"model": get_model_state_dict(model, options=opts)}
    msd, osd = get_state_dict(model, optimizer, options=opts)
    return {"model": msd, "optim": osd}


def _check_plain(value, where: str = "extra") -> None:
    """``extra`` is read back with ``torch.load(weights_only=True)``: refuse at save time what
    could not be loaded at resume."""
    if value is None or isinstance(value, (bool, int, float, str, torch.Tensor)):
        return
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, (str, int)):
                raise EmberError(f"checkpoint {where}: key {k!r} must be a string or integer")
            _check_plain(v, f"{where}[{k!r}]")
        return
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_plain(v, f"{where}[{i}]")
        return
    raise EmberError(f"checkpoint {where} has type {type(value).__name__}; extra state must be "
                     "tensors, numbers, strings, None and dicts/lists of them (use its "
                     "state_dict())")


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save(root: str | os.PathLike, step: int, *, model: nn.Module,
         optimizer: torch.optim.Optimizer | None = None, extra: dict | None = None,
         config_text: str | None = None, info: DistInfo | None = None,
         keep_last: int | None = None, write_more: Callable[[Path], None] | None = None) -> Path:
    """Write the checkpoint of ``step`` (replacing one of the same step) and keep the newest
    ``keep_last`` complete ones. Every rank must call it, between steps, with gradients cleared
    (``zero_grad(set_to_none=True)``). ``write_more(folder)`` (every rank) adds files to the
    checkpoint before its manifest (TR-DPO's reference): they are published with the rest in
    the one rename, or not at all. Returns the checkpoint folder."""
    import torch.distributed.checkpoint as dcp

    if keep_last is not None and keep_last < 1:
        raise EmberError(f"keep_last must be >= 1, got {keep_last}")
    info = info or DistInfo()
    _check_plain(extra or {})
    root = Path(root)
    final = step_dir(root, step)
    tmp_name = f".tmp-{final.name}-{uuid.uuid4().hex[:8]}" if info.is_main else None
    tmp = root / broadcast_object(tmp_name, info)
    if info.is_main:
        root.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
    barrier(info)
    try:
        t0 = time.perf_counter()
        _dcp_call(dcp.save, _state_dicts(model, optimizer), tmp)
        (tmp / "rng").mkdir(exist_ok=True)
        torch.save(rng_state(), tmp / "rng" / f"rank_{info.rank}.pt")
        if write_more is not None:
            write_more(tmp)
        if info.is_main:
            torch.save(extra or {}, tmp / "extra.pt")
            if config_text is not None:
                (tmp / "config.toml").write_text(config_text, encoding="utf-8")
        barrier(info)
        names = broadcast_object(_files(tmp) if info.is_main else None, info)
        mine = {n: {"bytes": (tmp / n).stat().st_size, "sha256": _sha256(tmp / n)}
                for n in names[info.rank:: info.world_size]}
        files = {k: v for part in all_gather_objects(mine, info) for k, v in part.items()}
        if info.is_main:
            manifest = {"format": FORMAT, "step": step, "world_size": info.world_size,
                        "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
                        "seconds": round(time.perf_counter() - t0, 3),
                        "files": dict(sorted(files.items()))}
            with open(tmp / MANIFEST, "w") as f:
                f.write(json.dumps(manifest, indent=2) + "\n")
                f.flush()
                os.fsync(f.fileno())
            _fsync_dir(tmp)
            if final.exists():
                old = root / f".tmp-old-{final.name}-{uuid.uuid4().hex[:8]}"
                os.rename(final, old)
                os.rename(tmp, final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.rename(tmp, final)
            _fsync_dir(root)
            _cleanup(root, keep_last, keep=final)
    finally:
        if info.is_main and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    barrier(info)
    return final


def _cleanup(root: Path, keep_last: int | None, keep: Path) -> None:
    """Drop leftovers of interrupted saves and all but the newest ``keep_last`` complete
    checkpoints (incomplete ``step_`` folders are left for a person to look at)."""
    for p in root.iterdir():
        if p.name.startswith(".tmp-") and p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
    if keep_last is None:
        return
    complete = [p for _, p in list_checkpoints(root) if (p / MANIFEST).exists()]
    for p in complete[:-keep_last]:
        if p != keep:
            shutil.rmtree(p, ignore_errors=True)


@dataclass
class Loaded:
    path: Path
    step: int
    world_size: int  # of the run that saved it
    extra: dict
    config_text: str | None


def load(folder: str | os.PathLike, *, model: nn.Module,
         optimizer: torch.optim.Optimizer | None = None, info: DistInfo | None = None,
         restore_rng: bool = True, level: str = "hash", extra: dict | None = None) -> Loaded:
    """Restore ``model``'s trainable weights, ``optimizer`` and this rank's RNG from a checkpoint
    (in place; any world size) and return its step, extra state and config. Build the model
    (LoRA, checkpointing, sharding) and the optimizer exactly as for the run that saved it.
    A checkpoint that fails verification is refused. Every rank must call it. ``extra``: its
    ``extra.pt`` as the caller has already read it (not read again)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_optimizer_state_dict,
        set_state_dict,
    )

    info = info or DistInfo()
    folder = Path(folder)
    why = verify(folder, info, level=level)
    if why is not None:
        raise EmberError(f"cannot resume from {folder}: {why}")
    manifest = json.loads((folder / MANIFEST).read_text())
    saved_world = manifest.get("world_size", 1)
    if optimizer is not None and saved_world != info.world_size and _shard_bound(folder):
        how = ("one process (without torchrun)" if saved_world == 1 else
               f"{saved_world} processes (torchrun --nproc_per_node {saved_world})")
        raise EmberError(
            f"{folder} holds adamw_8bit optimizer states written by {saved_world} "
            f"process{'es' if saved_world > 1 else ''}, whose 8-bit blocks follow that split of "
            f"the parameters, and this run has {info.world_size}: resume with {how}, or start "
            "a new run")
    state = _state_dicts(model, optimizer)
    _check_keys(folder, state["model"])
    try:
        _dcp_call(dcp.load, state, folder)
    except (RuntimeError, ValueError, dcp.CheckpointException) as e:
        for failure in getattr(e, "failures", {}).values():  # a refusal of engine/dcp_safe.py
            failure = failure[0] if isinstance(failure, tuple) else failure  # (exc, trace)
            if isinstance(failure, EmberError):
                raise EmberError(f"cannot resume from {folder}: {failure}") from None
        raise EmberError(f"cannot load {folder} into this model/optimizer ({type(e).__name__}: "
                         f"{str(e)[:500]}); resume with the same model, method and LoRA "
                         "settings") from None
    # Not strict: frozen weights are not in the checkpoint (_check_keys matched the rest).
    opts = StateDictOptions(ignore_frozen_params=True, strict=False)
    if not _sharded(model):  # the weights were loaded in place
        if optimizer is not None:
            set_optimizer_state_dict(model, optimizer, state["optim"], options=opts)
    elif optimizer is None:
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        set_model_state_dict(model, state["model"], options=opts)
    else:
        set_state_dict(model, optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optim"], options=opts)
    if restore_rng:
        saved = manifest.get("world_size", 1)
        # Same world size: each rank continues its own streams. Another world size cannot
        # replay the same per-rank randomness anyway; ranks reuse the saved ones cyclically.
        rng = torch.load(folder / "rng" / f"rank_{info.rank % saved}.pt", weights_only=True)
        set_rng_state(rng)
    if extra is None:
        extra = torch.load(folder / "extra.pt", weights_only=True)
    cfg = folder / "config.toml"
    return Loaded(folder, manifest["step"], manifest.get("world_size", 1), extra,
                  cfg.read_text(encoding="utf-8") if cfg.exists() else None)


def _shard_bound(folder: Path) -> bool:
    """True when the checkpoint's optimizer state has blocks laid out per shard (AdamW8bit's
    8-bit states record their ``shards``): it loads only at the world size that wrote it."""
    import torch.distributed.checkpoint as dcp

    with safe_unpickling():
        keys = dcp.FileSystemReader(str(folder)).read_metadata().state_dict_metadata
    return any(k.startswith("optim.state.") and k.endswith(".shards") for k in keys)


def _check_keys(folder: Path, model_sd: dict) -> None:
    import torch.distributed.checkpoint as dcp

    with safe_unpickling():
        metadata = dcp.FileSystemReader(str(folder)).read_metadata()
    saved = {k[len("model."):] for k in metadata.state_dict_metadata if k.startswith("model.")}
    want = set(model_sd)
    if saved != want:
        extra, missing = sorted(saved - want), sorted(want - saved)
        raise EmberError(
            f"{folder} does not match this model's trainable parameters"
            + (f"; only in the checkpoint: {extra[:3]}" if extra else "")
            + (f"; missing from the checkpoint: {missing[:3]}" if missing else "")
            + " (resume with the same method, LoRA targets and freeze settings)")


def load_model_weights(folder: str | os.PathLike, model: nn.Module,
                       info: DistInfo | None = None) -> int:
    """Only the weights (evaluation / export of a checkpoint): returns its step."""
    return load(folder, model=model, info=info, restore_rng=False).step
