"""Developer tools run end to end (they import nothing the tests could patch, so: subprocesses)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_kernel_resources_reports_every_spec_of_a_module():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "tools/kernel_resources.py", "--module",
                          "ember.kernels.rms_norm"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=600, check=True).stdout
    import importlib

    rms_norm = importlib.import_module("ember.kernels.rms_norm")

    rows = [r for r in out.splitlines() if r.startswith("| rms_norm.")]
    assert len(rows) == len(rms_norm.COMPILE_SPECS), out
    for r in rows:  # registers, spilled bytes, shared memory: numbers from ptxas / the compiler
        regs, spill, smem = (int(x) for x in re.findall(r"\| (\d+) ", r)[:3])
        assert 0 < regs <= 255 and spill >= 0 and smem >= 0, r
