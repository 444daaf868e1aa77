"""Where a run's config dict comes from: a TOML file, a run directory's ``config.toml``, a packaged
recipe given by name, and ``--set key=value`` items parsed as TOML values.

Knows nothing of ``TrainConfig`` (``apply_overrides`` is given the class): ``ember.engine.config``
turns the dict into one (``from_dict``) and re-exports these names.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.resources
import json
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser as the tomli package
    import tomli as tomllib

from ember import EmberError
from ember.engine import config_hints as ch


def recipe_names() -> list[str]:
    root = importlib.resources.files("ember.engine") / "recipes"
    return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".toml"))


def parse_toml(text: str, where: str) -> dict:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        start = text.lstrip()[:3]
        hint = (" (this looks like YAML: ember configs are TOML, key = value lines under "
                "[section] headers; ember config prints one)" if where.endswith((".yaml", ".yml"))
                or start == "---" else " (this looks like JSON: ember configs are TOML, key = "
                "value lines under [section] headers; ember config prints one)"
                if start[:1] == "{" else "")
        raise EmberError(f"{where}: invalid TOML: {e}{hint}") from None


def _config_text(p: Path) -> str:
    """A config file's text: UTF-8 as TOML requires, a byte order mark (Windows editors write
    one) skipped; other encodings are a named error (was a UnicodeDecodeError traceback)."""
    raw = p.read_bytes()
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise EmberError(f"{p} is UTF-16 text; TOML files are UTF-8: save it as UTF-8")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise EmberError(f"{p} is not UTF-8 text (byte {e.start}: {raw[e.start:e.start + 1]!r}); "
                         "TOML files are UTF-8: save it as UTF-8") from None


def run_folder(source: str | Path, cls) -> Path | None:
    """``source`` as a run directory, else None: a folder with a config.toml, or a config.toml
    Ember wrote (``_written``) with its run's output beside it (``_ember_output``).
    ``RUN/config.toml`` from another folder was a new run from step 0: its run_dir is recorded
    relative to the folder the run started in. ``cls``: the config dataclass.

    Was: any config.toml beside a checkpoints/, final/ or metrics.jsonl, so a project's own
    config.toml beside another tool's checkpoints/ trained into the project folder, wrote its
    step folders into that checkpoints/ and overwrote the config.toml with the resolved one."""
    p = Path(source)
    if p.name == "config.toml" and p.is_file():
        return p.parent if _written(p, cls) and _ember_output(p.parent) else None
    return p if p.is_dir() and (p / "config.toml").is_file() else None


def _written(p: Path, cls) -> bool:
    """``p`` is a config.toml as Ember writes one into a run directory: it names every field of
    ``cls`` that is never None (``to_toml`` writes them all; a project's own config names the
    few it sets)."""
    try:
        data = tomllib.loads(_config_text(p))
    except (tomllib.TOMLDecodeError, EmberError, OSError):
        return False  # (load_source names what is wrong with it)
    written = {f.name for f in dataclasses.fields(cls) if f.default is not None and (
        f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING)}
    return written <= data.keys()


def _ember_output(folder: Path) -> bool:
    """``folder`` holds what an Ember run writes: a checkpoint (``checkpoints/step_N`` with
    Ember's manifest) or a ``final/`` export (its run_end.json or base.json, or the
    ``adapter/`` / ``model/`` folder ``export_final`` writes). A folder named checkpoints/ or
    final/ alone, or a metrics.jsonl, is not: another tool, or the user, may have made it."""
    from ember.engine import dcp

    for _, step in dcp.list_checkpoints(folder / "checkpoints"):
        try:
            manifest = json.loads((step / dcp.MANIFEST).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(manifest, dict) and str(manifest.get("format", "")).startswith(
                dcp.FORMAT.split("/")[0] + "/"):
            return True
    final = folder / "final"
    return any((final / n).is_file() for n in ("run_end.json", "base.json")) or any(
        (final / n).is_dir() and any((final / n).iterdir()) for n in ("adapter", "model"))


def in_place(data: dict, folder: Path | None, overrides) -> None:
    """A run directory's config (``data``, from ``folder``) continues in that folder: its
    run_dir is set to it unless runs/<name> or its run_dir already is it, or ``--set`` items
    give name or run_dir (a new run from its settings). Was runs/<name> of the current folder:
    ``ember train RUN --resume`` from elsewhere started a new run there from step 0."""
    if folder is None or {parse_override(o)[0][0] for o in overrides} & {"name", "run_dir"}:
        return
    name, run_dir = data.get("name", "run"), data.get("run_dir")
    if isinstance(name, str) and isinstance(run_dir, (str, type(None))):
        where = Path(run_dir if run_dir is not None else Path("runs") / name)
        if not (where.is_dir() and where.resolve() == folder.resolve()):
            data["run_dir"] = str(folder)


def load_source(source: str | Path) -> dict:
    """The dict of a TOML file, a run directory's config, or a packaged recipe given by name."""
    p = Path(source)
    if p.is_dir() and (p / "config.toml").is_file():  # a run directory: its resolved config
        p = p / "config.toml"
    if p.exists() and not p.is_dir():  # a file, or a pipe: ember train <(...), /dev/stdin
        kind = ch.not_a_config(p)
        if kind:  # ember train data.jsonl / model.gguf: what the file is, and where it goes
            raise EmberError(f"{p} is {kind}, not a run config (TOML); name it in a config "
                             f"file or a recipe: {ch.WHERE[kind].format(p=p)}")
        return parse_toml(_config_text(p), str(p))
    name = str(source)
    if name in recipe_names():
        res = importlib.resources.files("ember.engine") / "recipes" / f"{name}.toml"
        return parse_toml(res.read_text(encoding="utf-8"), f"recipe {name!r}")
    if p.is_dir() and (p / "config.json").is_file():
        where = ch.WHERE["a model"].format(p=p)
        raise EmberError(f"{name} is a model folder, not a run directory or config: train it "
                         f"from a config file or a recipe with {where}")
    if p.is_dir():  # e.g. ember train RUN --resume on a folder that is not a run
        raise EmberError(f"{name} is a folder without config.toml: not a run directory; give "
                         "a run directory (runs/<name>), a config file or a recipe name")
    if p.suffix == ".toml":
        recipe = (f" (the recipe is named without .toml: {p.stem})" if p.parent == Path(".")
                  and p.stem in recipe_names() else "")
        raise EmberError(f"config file {name} not found{recipe}")
    if "/" in name:
        raise EmberError(f"config file {name} not found (nor a run directory of that name)")
    raise EmberError(f"{name!r} is neither a config file nor a recipe; recipes: "
                     f"{', '.join(recipe_names())}")


def parse_override(item: str) -> tuple[list[str], object]:
    """``"a.b=value"`` -> (["a", "b"], value parsed as TOML; a bare word stays a string)."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise EmberError(f"--set expects key=value (e.g. lora.rank=8), got {item!r}")
    return key.split("."), _toml_or_word(raw.strip())


def _toml_or_word(raw: str):
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def toml_error(raw: str) -> str:
    """tomllib's reason why ``raw`` is not a TOML value ("" if it is one)."""
    try:
        tomllib.loads(f"v = {raw}")
    except tomllib.TOMLDecodeError as e:
        return str(e).split(" (at line")[0]
    return ""


def apply_overrides(data: dict, overrides: list[str], cls) -> dict:
    """``data`` (a config dict) with the ``--set`` items applied in order, each value typed by
    the key's field in config dataclass ``cls``."""
    data = copy.deepcopy(data)  # (TOML dates and times included: from_dict names such a value)
    for item in overrides:
        path, value = parse_override(item)
        raw = item.partition("=")[2].strip()
        if isinstance(value, str) and raw.startswith(("[", "{")):  # not TOML (else no str)
            tp = ch.key_type(cls, path)
            if isinstance(tp, type) and dataclasses.is_dataclass(tp):  # a broken inline table
                raise EmberError(f"--set {item}: not a TOML value ({toml_error(raw)}); quote "
                                 "the strings in it, e.g. --set 'lora={rank=8, init=\"gaussian\"}'")
            if raw.startswith("[") and raw.endswith("]") and ch.takes_a_list(cls, path):
                value = raw[1:-1].strip()  # [q, v]: bare words, as q,v (was "[q", "v]")
        if not raw and ch.takes_a_list(cls, path):  # eval.metrics= : none, as [] (was
            value = []  # the one name "", refused as an unknown metric)
        if isinstance(value, str) and "," in value and ch.takes_a_list(cls, path) and (
                raw[:1] not in ('"', "'")):
            # a bare a,b for a list key, as ember eval --metrics takes one: the list [a, b]
            value = [_toml_or_word(v.strip()) for v in value.split(",") if v.strip()]
        node = data
        for part in path[:-1]:
            nxt = node.setdefault(part, {})
            if not isinstance(nxt, dict):
                raise EmberError(f"--set {item}: {part!r} is a value, not a table")
            node = nxt
        old = node.get(path[-1])
        if isinstance(value, dict) and isinstance(old, dict):
            value = ch.merged_tables(old, value)  # lora={rank=8}: the file's others stay
        node[path[-1]] = value
    return data
