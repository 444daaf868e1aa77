"""Where ``save_pretrained`` puts a finished model folder: written to a temporary sibling, then
put in place of ``out``.

A folder of Ember's own kinds of files (a model folder exported before) is replaced as a whole,
stale shards and all. Files that are not a model's (``README.md``, ``.gitattributes``,
``.cache/`` from ``hf download --local-dir``, a Trainer checkpoint's ``training_args.bin``,
``trainer_state.json``, ``optimizer.pt`` ...) are kept untouched and the model's files replaced
around them, as transformers' ``save_pretrained`` writes into such a folder. Refused: a PEFT
adapter's files (the folder would then load as the adapter, not as the saved model) and a kept
name the model would overwrite.
"""

from __future__ import annotations

import os
import re
import shutil
import uuid
import warnings
from collections.abc import Callable
from pathlib import Path

from ember import EmberError

MODEL_FOLDER_FILES = re.compile(
    r"(config\.json|generation_config\.json|model(-\d+-of-\d+)?\.safetensors|"
    r"model\.safetensors\.index\.json|tokenizer.*|special_tokens_map\.json|added_tokens\.json|"
    r"chat_template\.jinja|additional_chat_templates|vocab\.json|merges\.txt|"
    r"preprocessor_config\.json|processor_config\.json|chat_template\.json)"
)
_WEIGHT_FILES = re.compile(r"model(-\d+-of-\d+)?\.safetensors|model\.safetensors\.index\.json")
_ADAPTER_FILES = re.compile(r"adapter_config\.json|adapter_model\..*")


def write_folder_into(out_dir: str | os.PathLike, write: Callable[[Path], None],
                      with_tokenizer: bool) -> Path:
    """Call ``write(tmp)`` for a new empty folder, then put its files at ``out_dir``."""
    # absolute and normalized: "." or "run/.." have no name to put the temporary sibling beside
    out = Path(os.path.abspath(out_dir))
    if out.is_symlink() and out.is_dir():  # written where the link points, as transformers does
        out = out.resolve()
    if out.exists() and not out.is_dir():
        raise EmberError(f"save_pretrained: {out} exists and is not a folder")
    existing = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    model_files = [n for n in existing if MODEL_FOLDER_FILES.fullmatch(n)]
    kept = [n for n in existing if not MODEL_FOLDER_FILES.fullmatch(n)]
    adapter = [n for n in kept if _ADAPTER_FILES.fullmatch(n)]
    if adapter:
        raise EmberError(
            f"save_pretrained: {out} holds a PEFT adapter ({', '.join(adapter)}), with which "
            "the folder would load as that adapter, not as this model; choose another folder "
            "(or remove the adapter's files)"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:8]
    tmp = out.parent / f".{out.name}.tmp-{tag}"
    tmp.mkdir()
    try:
        write(tmp)
        clash = sorted(set(kept) & {p.name for p in tmp.iterdir()})
        if clash:
            raise EmberError(f"save_pretrained: {out} already holds {', '.join(clash)}, which "
                             "saving would overwrite; choose a new folder (or remove them)")
        if not with_tokenizer:
            _warn_dropped_files(out, model_files, tmp)
        if out.is_dir() and (kept or out.samefile(Path.cwd())):
            _replace_contents(out, tmp, model_files, tag)
        elif existing:
            old = out.parent / f".{out.name}.old-{tag}"
            os.rename(out, old)
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)  # out is absent or an empty folder
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _warn_dropped_files(out: Path, existing: list[str], tmp: Path) -> None:
    """Saving without a tokenizer over a model folder replaces the folder as a whole: say which
    of its tokenizer (or processor) files go, which transformers' ``model.save_pretrained``
    would have left there."""
    dropped = [n for n in existing if not _WEIGHT_FILES.fullmatch(n) and not (tmp / n).exists()]
    if dropped:
        warnings.warn(
            f"save_pretrained: {out} is replaced as a whole and its {', '.join(dropped[:5])} "
            "are not in the new folder (no tokenizer was given); pass the tokenizer to write "
            "it there", stacklevel=4)


def _replace_contents(out: Path, tmp: Path, existing: list[str], tag: str) -> None:
    """Replace the files ``existing`` of ``out`` by those of tmp, in place: the folder itself
    stays, with the files that are not the model's (renaming the process's working folder away,
    or replacing it, would leave the process in a deleted folder, or fail: EBUSY on ".")."""
    old = out.parent / f".{out.name}.old-{tag}"
    old.mkdir()
    for name in existing:
        os.rename(out / name, old / name)
    for p in tmp.iterdir():
        os.rename(p, out / p.name)
    shutil.rmtree(old, ignore_errors=True)
