"""One ``torchrun --nproc_per_node 2`` launch for the two-process runs of every selected test
outside test_distributed (each launch costs ~5-10 s of process startup and gloo setup on an idle
2-core machine, ~30 s loaded). A test registers the runs it needs with ``@shares_launch(maker)``
and takes the ``launched`` fixture (tests/engine/conftest.py): the session fixture
``shared_launch`` calls the makers of the selected tests, runs all their plans in one launch
(tests/engine/_torchrun_many.py) and hands each test its own folder and its own runs' output.
``maker(tiny, folder) -> plan``: writes what the runs need under ``folder`` and returns their
``{"name", "args", "continue_from", "call"}`` entries (names unique within the test). Launches
that must fail stay separate (test_distributed.torchrun_train with status=1)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from tests.engine._torchrun_many import split_output

Maker = Callable[[dict, Path], list[dict]]
MAKERS: dict[str, Maker] = {}
ROOT = Path(__file__).resolve().parents[2]


def plan_key(module: str, name: str) -> str:
    return f"{module}::{name}"


def shares_launch(maker: Maker):
    """Registers ``maker`` as the plan of the decorated test (by module and name)."""

    def register(test):
        MAKERS[plan_key(test.__module__, test.__name__)] = maker
        return test

    return register


def run_shared(tiny: dict, tmp: Path, keys: list[str]) -> dict[str, tuple[Path, dict[str, str]]]:
    """The plans of the tests ``keys`` in one launch, which must end well: per test, its folder
    and its runs' output by the names its maker gave them."""
    plan, folders = [], {}
    for i, key in enumerate(keys):
        folders[key] = tmp / f"t{i}"
        folders[key].mkdir()
        for run in MAKERS[key](tiny, folders[key]):
            plan.append({**run, "name": f"t{i}.{run['name']}", "key": key, "short": run["name"]})
    if not plan:
        return {}
    (tmp / "plan.json").write_text(json.dumps(plan, default=str))
    # the rank processes import tests.engine.* (the makers' rank scripts): the root on their path
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p),
    }
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            "-m",
            "tests.engine._torchrun_many",
            str(tmp / "plan.json"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=1800,
        cwd=ROOT,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    names = [run["name"] for run in plan]
    outs, errs = split_output(proc.stdout, names), split_output(proc.stderr, names)
    got: dict[str, tuple[Path, dict[str, str]]] = {key: (folders[key], {}) for key in keys}
    for run in plan:
        got[run["key"]][1][run["short"]] = outs[run["name"]] + errs[run["name"]]
    return got
