"""Several ``ember train`` runs in one torchrun launch (run as ``python -m
tests.engine._torchrun_many PLAN.json`` under torchrun). On CPU a tiny run's launch is mostly
process startup (torchrun's agent and each rank import torch; ~30 s a launch on a loaded 2-core
machine), so test_distributed's two-process runs share one launch, and so do the other
tests' (tests/engine/_shared_launch.py).

PLAN.json: a list of ``{"name", "args", "continue_from", "call"}``. Each run goes through
``ember.engine.cli.main(["train", *args])`` as in its own launch (or, with ``call`` =
``"module:function"``, through ``function(*args)``: a test's own rank script that trains and
writes what it checks), except that the process group stays up between runs: a finished run's
``shutdown(together=True)`` only collects and waits for every rank (the last run leaves the
group and ends the process the CLI's own way).
``continue_from`` = ``[src, dst, step]``: before the run, rank 0 copies run ``src`` as if it had
stopped after ``step`` (a run of the same launch may be continued). Rank 0 prints ``MARK name``
on stdout and stderr before each run; a run that fails ends the launch with its exit code."""

from __future__ import annotations

import gc
import importlib
import json
import os
import shutil
import sys
from pathlib import Path

MARK = "@@ember-torchrun-run@@"


def continue_from(src: Path, dst: Path, step: int) -> None:
    """``dst``: a copy of run ``src`` as if it had stopped after ``step`` (a checkpoint there)."""
    from ember.engine import dcp

    shutil.copytree(src, dst)
    for s, folder in dcp.list_checkpoints(dst / "checkpoints"):
        if s > step:
            shutil.rmtree(folder)
    shutil.rmtree(dst / "final", ignore_errors=True)  # (none with checkpoint.save_final = false)


def split_output(text: str, names: list[str]) -> dict[str, str]:
    """A launch's stdout (or stderr) cut at the marks: each run's part (what came before the
    first mark, torchrun's own lines, goes to the first run)."""
    parts = text.split(f"\n{MARK} ")
    got = {name: "" for name in names}
    got[names[0]] += parts[0]
    for part in parts[1:]:
        name, _, rest = part.partition("\n")
        got[name] += rest
    return got


def _main(plan_path: str) -> int:
    import torch.distributed as dist

    from ember.engine import distributed
    from ember.engine.cli import main

    plan = json.loads(Path(plan_path).read_text())
    real_shutdown = distributed.shutdown

    def keep_group(*, together: bool = False) -> bool:
        if not together:  # a failed run: leave the group at once, as the CLI does
            return real_shutdown()
        gc.collect()  # the finished trainer's sharded model and device mesh
        dist.barrier()
        return False

    for i, run in enumerate(plan):
        last = i == len(plan) - 1
        distributed.shutdown = real_shutdown if last else keep_group
        rank0 = os.environ.get("RANK", "0") == "0"
        if run.get("continue_from"):
            # (the group is up from the first run on: the others wait for the copy)
            assert i > 0, "the first run of a launch continues no run"
            src, dst, step = run["continue_from"]
            if rank0:
                continue_from(Path(src), Path(dst), step)
            dist.barrier()
        if rank0:
            for stream in (sys.stdout, sys.stderr):
                stream.flush()
                print(f"\n{MARK} {run['name']}", file=stream, flush=True)
        if run.get("call"):
            module, _, name = run["call"].partition(":")
            try:
                getattr(importlib.import_module(module), name)(*run["args"])
            except BaseException:
                real_shutdown()  # leave the group at once, as the CLI does after a failed run
                raise
            if distributed.shutdown(together=True):  # the last run: end as the CLI does
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(0)
            continue
        status = main(["train", *run["args"]])
        if status != 0:
            return status
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1]))
