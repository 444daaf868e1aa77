"""Developer tools run end to end (they import nothing the tests could patch, so: subprocesses)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

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


@pytest.mark.slow  # a subprocess importing torch and transformers: ~10 s on a 2-core box
def test_config_fuzz_runs_a_case_against_transformers():
    """tools/config_fuzz.py end to end on one seeded case (Gemma 3: per-layer windows and RoPE,
    softcaps, qk-norms): transformers' logits, decode, gradients, padding, export."""
    out = subprocess.run([sys.executable, "tools/config_fuzz.py", "--families", "gemma3_text",
                          "--seeds", "0:1"], cwd=ROOT, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0 and out.stdout.startswith("gemma3_text 0 OK "), out.stdout
