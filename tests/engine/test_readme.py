"""The README tells the truth about the CLI and the config: every ``ember ...`` command line in
its shell blocks parses with ``ember``'s own argument parser, every ``--set`` item and every TOML
block is made of keys and values the config accepts (``load_config``, which names an unknown key),
and every file the README points to under bench/results/ exists."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from ember.engine.cli import build_parser
from ember.engine.config import TrainConfig, from_dict, load_config, parse_toml

README = Path(__file__).resolve().parents[2] / "README.md"


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README.read_text(encoding="utf-8"), re.S)


def _ember_lines() -> list[list[str]]:
    out = []
    for block in _blocks("bash"):
        for line in block.splitlines():
            words = shlex.split(line, comments=True)
            if words[:1] == ["ember"]:
                out.append(words[1:])
            elif "ember.engine.cli" in words:  # torchrun ... -m ember.engine.cli train ...
                out.append(words[words.index("ember.engine.cli") + 1:])
    return out


def test_readme_has_commands_and_toml():
    assert len(_ember_lines()) >= 20 and len(_blocks("toml")) >= 8


@pytest.mark.parametrize("argv", _ember_lines(), ids=lambda a: " ".join(a)[:60])
def test_readme_command_parses(argv):
    build_parser().parse_args(argv)  # an unknown flag or subcommand exits (SystemExit 2)
    sets = [argv[i + 1] for i, w in enumerate(argv) if w == "--set"]
    if argv[0] == "train" and sets:
        load_config("quickstart", sets)  # keys and values the config accepts


@pytest.mark.parametrize("i", range(len(_blocks("toml"))))
def test_readme_toml_block_is_a_valid_config(i):
    from_dict(TrainConfig, parse_toml(_blocks("toml")[i], f"README toml block {i}"))


def test_readme_result_files_exist():
    root = README.parent
    named = set(re.findall(r"bench/results/[\w.-]+\.(?:md|jsonl)", README.read_text()))
    assert named and [p for p in sorted(named) if not (root / p).is_file()] == []


def test_readme_python_imports_and_named_apis_exist():
    """The Python snippet's imports resolve (running it loads a real model: too slow here), and
    the kernels the README lists are in ``ember.kernels`` with a ``*_ref`` and ``impl``."""
    import inspect

    import ember.kernels as kernels

    for block in _blocks("python"):
        for line in block.splitlines():
            if line.startswith(("from ember", "import ember")):
                exec(line, {})
    text = README.read_text()
    listed = re.search(r"\(`ember\.kernels`: (.*?);", text, re.S).group(1)
    names = re.findall(r"`(\w+)`", listed)
    assert len(names) >= 10
    for name in names:
        assert "impl" in inspect.signature(getattr(kernels, name)).parameters, name
        assert hasattr(kernels, f"{name}_ref"), name
    from ember.models.hf_backend import restore  # README: ember.models.hf_backend.restore

    assert callable(restore)


def test_readme_chat_commands_target_a_chat_model():
    """``ember chat X`` and ``ember generate X --system ...`` need a chat template: shown on
    runs/quickstart, which trains plain-text prompts (``data.use_chat_template = false``), both
    failed with "needs a chat template"."""
    quickstart = load_config("quickstart")
    for argv in _ember_lines():
        if argv[0] == "chat" or (argv[0] == "generate" and "--system" in argv):
            if argv[1].startswith("runs/quickstart"):
                assert quickstart.data.use_chat_template is not False, argv
