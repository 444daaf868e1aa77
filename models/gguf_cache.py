"""The cache of ``.gguf`` imports (``$EMBER_CACHE/gguf``, see ``ember.models.hub``): a file is
imported once into an HF folder named by its content hash and the importer's version
(``importer_digest``), then served from there. Every use marks the folder used (its mtime); an
import of the same file by another Ember version (two venvs sharing the cache) is removed only
once no Ember has used it for ``GGUF_STALE_AFTER_S``, renamed away before it is deleted."""

from __future__ import annotations

import contextlib
import functools
import glob
import hashlib
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable
from contextlib import AbstractContextManager as ContextManager
from pathlib import Path

from ember import EmberError
from ember.models.hub import cache_root, split_paths

__all__ = ["GGUF_STALE_AFTER_S", "file_digest", "gguf_folder", "importer_digest",
           "imported_digest"]


def file_digest(*paths: Path) -> str:
    """The first 16 hex digits of the sha256 of the files' bytes, in order: names an import in
    the cache, and tells whether two names are one model (``engine.stages.same_base``)."""
    h = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 22):
                h.update(chunk)
    return h.hexdigest()[:16]


@functools.cache
def importer_digest() -> str:
    """A hash of the source of ``ember.models`` (the GGUF readers and the HF writer an import
    goes through): an Ember whose importer changed imports a file afresh instead of serving an
    import an earlier version cached."""
    h = hashlib.sha256()
    for path in sorted(Path(__file__).parent.glob("*.py")):
        h.update(path.name.encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:8]


# An import of a .gguf file made by another Ember version (another importer_digest) is removed
# only once no Ember has used it for this long: two versions (two venvs) may share the cache, and
# a folder another process resolved a moment ago may still be loading there.
GGUF_STALE_AFTER_S = 7 * 24 * 3600


def gguf_folder(gguf_path: str | os.PathLike, *,
                lock: Callable[[], ContextManager] = contextlib.nullcontext) -> Path:
    """The HF folder imported from a .gguf file (a split model's first file), cached by content
    hash and importer version (imported once). Every use marks the folder used (its mtime);
    imports of the same file by another Ember version unused for ``GGUF_STALE_AFTER_S`` are
    removed, never one another version may be reading now. ``lock()`` is held only to import:
    a finished import is served without it (a read-only shared cache serves its imports)."""
    src = Path(gguf_path)
    if not src.is_file():
        raise EmberError(f"GGUF file {src} does not exist")
    files = [p for p in split_paths(src) if p.is_file()]  # the reader names a missing one
    stem = f"{src.stem}-{file_digest(*files)}"
    out = cache_root() / "gguf" / f"{stem}-{importer_digest()}"
    if not (out / "config.json").is_file():
        with lock():
            if not (out / "config.json").is_file():  # not imported while we waited
                _import(src, out)
    _mark_used(out)
    # The same file imported by another Ember version (or before versions were in the name).
    for stale in out.parent.glob(f"{glob.escape(stem)}*"):
        if stale != out and stale.is_dir() and (stale.name == stem
                                                or stale.name.startswith(f"{stem}-")):
            _remove_if_unused(stale)
    return out


# gguf_folder's names: "{stem}-{file_digest}-{importer_digest}" (before versions were in the
# name: "{stem}-{file_digest}")
_IMPORT_NAME = re.compile(r".+-([0-9a-f]{16})(?:-[0-9a-f]{8})?")


def imported_digest(folder: str | os.PathLike) -> str | None:
    """The ``file_digest`` of the .gguf file a folder of the cache was imported from (named in
    it by ``gguf_folder``, so it is known after the file is gone); None for any other folder."""
    p = Path(folder).expanduser()
    m = _IMPORT_NAME.fullmatch(p.name)
    if m is None or p.resolve().parent != (cache_root() / "gguf").resolve():
        return None
    return m[1]


def _import(src: Path, out: Path) -> None:
    from ember.models.gguf import import_gguf

    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        import_gguf(src, tmp)
        try:
            os.rename(tmp, out)
        except OSError:
            if not (out / "config.json").is_file():  # not a concurrent import that won
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _mark_used(folder: Path) -> None:
    with contextlib.suppress(OSError):  # a read-only cache still serves its imports
        os.utime(folder)


def _remove_if_unused(folder: Path) -> None:
    """Remove a cached import no Ember has used for ``GGUF_STALE_AFTER_S``: renamed first (one
    atomic step, so nobody sees it half removed), then deleted."""
    try:
        if time.time() - folder.stat().st_mtime < GGUF_STALE_AFTER_S:
            return
        trash = folder.parent / f".{folder.name}.old-{uuid.uuid4().hex[:8]}"
        os.rename(folder, trash)
    except OSError:  # gone already, or another process removes it
        return
    shutil.rmtree(trash, ignore_errors=True)
