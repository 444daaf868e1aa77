"""``ember config``: a run's resolved settings as TOML, every key with the comment written beside
its field in the source (the config dataclasses are the documentation). Keys left unset (None)
are shown commented out, so the output is itself a valid config file that loads back to the same
settings."""

from __future__ import annotations

import dataclasses
import inspect
import re

from ember.engine.config import _toml_value, to_dict

_FIELD = re.compile(r"^\s+(\w+)\s*:[^#]*?(?:#\s*(.*))?$")


def field_comments(cls) -> dict[str, str]:
    """``{field: comment}`` from a dataclass's source: the comment lines right above a field and
    the one at its end, joined."""
    try:
        lines = inspect.getsource(cls).splitlines()
    except (OSError, TypeError):
        return {}
    out, above = {}, []
    for line in lines:
        s = line.strip()
        if s.startswith("#"):
            above.append(s.lstrip("# ").strip())
            continue
        m = _FIELD.match(line)
        if m and not s.startswith(("def ", "@", "class ")):
            out[m.group(1)] = " ".join([*above, m.group(2) or ""]).strip()
        elif s.startswith("def "):
            break  # the methods: no fields below
        above = []
    return out


def _lines(obj, values: dict) -> list[str]:
    notes = field_comments(type(obj))
    out = []
    for f in dataclasses.fields(obj):
        k, v = f.name, values.get(f.name)
        if isinstance(v, dict) or dataclasses.is_dataclass(getattr(obj, k)):
            continue
        text = f"{k} = {_toml_value(v)}" if v is not None else f"# {k} = (unset)"
        note = notes.get(k)
        out.append(f"{text}  # {note}" if note else text)
    return out


def annotated_toml(cfg) -> str:
    """TOML text of ``cfg`` (a ``TrainConfig``) with each key's source comment."""
    d = to_dict(cfg)
    lines = _lines(cfg, d)
    for f in dataclasses.fields(cfg):
        sub = getattr(cfg, f.name)
        if dataclasses.is_dataclass(sub):
            lines += ["", f"[{f.name}]", *_lines(sub, d.get(f.name, {}))]
    return "\n".join(lines) + "\n"
