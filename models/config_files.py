"""An HF model folder's ``config.json`` and ``generation_config.json``: read and parsed into a
``ModelConfig`` (``read_config``; a classifier's architecture inferred from its ``score.weight``),
read as a dict (``read_generation_config``), and the generation config an export writes
(``generation_config_to_write``). Used by ``ember.models.safetensors_io`` and
``ember.models.loading``.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

from safetensors import SafetensorError, safe_open

from ember import EmberError
from ember.models.config import ModelConfig
from ember.models.hf_config import ARCHITECTURES, _classifier_architecture, config_from_hf
from ember.models.weights_files import INDEX_FILE, SINGLE_FILE


def _read_config_json(folder: str | os.PathLike) -> tuple[Path, dict]:
    path = Path(folder) / "config.json"
    if not path.is_file():
        ggufs = sorted(p.name for p in Path(folder).glob("*.gguf"))
        hint = f"; the folder holds {', '.join(ggufs)}: pass that .gguf file" if ggufs else ""
        raise EmberError(f"{path} not found: a model folder needs config.json next to the "
                         f"weights{hint}")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EmberError(f"{path} is not valid JSON ({e})") from None
    if isinstance(raw, dict) and raw.get("architectures") is None and isinstance(
            raw.get("model_type"), str) and raw["model_type"] in ARCHITECTURES and {
            "score.weight"} == _head_keys(Path(folder)):
        # transformers' Auto classes never need architectures; the weights say it is a classifier
        raw = {**raw, "architectures": [_classifier_architecture(raw["model_type"])]}
    return path, raw


def _head_keys(folder: Path) -> set[str]:
    """Which of ``lm_head.weight`` / ``score.weight`` the safetensors weights hold (the index's
    names, or the single file's header); nothing for a folder without them."""
    try:
        if (folder / SINGLE_FILE).is_file():
            with safe_open(folder / SINGLE_FILE, framework="pt") as f:
                names = set(f.keys())
        else:
            names = set(json.loads((folder / INDEX_FILE).read_text())["weight_map"])
    except (OSError, ValueError, TypeError, KeyError, SafetensorError):
        return set()  # loading the weights says what is wrong with them
    return names & {"lm_head.weight", "score.weight"}


def _parse_config(path: Path, raw) -> ModelConfig:
    try:
        return config_from_hf(raw)
    except EmberError as e:
        # A model that needs its repo's own code (transformers' trust_remote_code): say so.
        remote = (isinstance(raw, dict) and isinstance(raw.get("auto_map"), dict)
                  and "not supported" in str(e))
        hint = ("; its auto_map names custom modeling code (transformers' trust_remote_code), "
                "which Ember never runs: convert the model to a supported architecture"
                if remote else "")
        raise EmberError(f"{path}: {str(e).removeprefix('config.json: ')}{hint}") from None


def read_config(folder: str | os.PathLike) -> ModelConfig:
    """ModelConfig from ``folder/config.json``."""
    return _parse_config(*_read_config_json(folder))


def read_generation_config(folder: str | os.PathLike) -> dict | None:
    """``folder/generation_config.json`` as a dict (its sampling defaults, stop ids...), or None
    when there is none; an unreadable one is ignored with a warning, as transformers falls back
    to the model config's defaults."""
    path = Path(folder) / "generation_config.json"
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raw = e
    if not isinstance(raw, dict):
        warnings.warn(f"{path} is not a JSON object ({raw}); ignoring it: an export writes "
                      "config.json's bos / eos ids alone", stacklevel=3)
        return None
    return raw


def _stop_ids(cfg: ModelConfig, tokenizer) -> int | list[int] | None:
    """generation_config.json's eos_token_id: config.json's, then the other ids the tokenizer
    stops at (the source folder's generation_config.json, e.g. Gemma's ``<end_of_turn>`` or
    Llama 3's ``<|eot_id|>``), which transformers' generate and a reload here would lose."""
    eos = cfg.eos_token_id
    ids = [eos] if isinstance(eos, int) else list(eos or [])
    from ember.models.tokenizer import stop_token_ids

    ids += sorted(set(stop_token_ids(tokenizer)) - set(ids)) if tokenizer is not None else []
    return None if not ids else ids[0] if len(ids) == 1 else ids


def _id_list(ids) -> list:
    return [ids] if isinstance(ids, int) else list(ids) if isinstance(ids, list) else []


def generation_config_to_write(cfg: ModelConfig, tokenizer, source: dict | None) -> dict:
    """generation_config.json to write: the source folder's (its sampling defaults:
    ``do_sample``, ``temperature``, ``top_p``..., which transformers' generate uses and its
    save_pretrained keeps) with the model's bos / eos / pad ids; its stop ids are kept as they
    are when they include the model's (``_stop_ids``), joined to them otherwise."""
    gen = {k: v for k, v in (source or {}).items() if k != "transformers_version"}
    for key, ours in (("bos_token_id", cfg.bos_token_id), ("pad_token_id", cfg.pad_token_id)):
        if ours is not None:
            gen[key] = ours
    gen.setdefault("bos_token_id", None)
    ours, theirs = _id_list(_stop_ids(cfg, tokenizer)), _id_list(gen.get("eos_token_id"))
    if not set(ours) <= set(theirs) or "eos_token_id" not in gen:
        ids = ours + [i for i in theirs if i not in ours]
        gen["eos_token_id"] = None if not ids else ids[0] if len(ids) == 1 else ids
    return gen
