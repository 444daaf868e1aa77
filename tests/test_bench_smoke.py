"""Every bench/*.py runs with --smoke on CPU (tiny shapes, Triton under the interpreter), so none of
them rots between GPU runs. Each bench runs in its own process, two at a time."""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
SCRIPTS = sorted(p.name for p in BENCH.glob("*.py") if not p.name.startswith("_"))
TIMEOUT_S = 240
LONGEST = ("train.py", "lora.py")


def _run(name: str) -> subprocess.CompletedProcess:
    # Two benches run at once: one torch thread each on a 2-core machine (with a pool of 2
    # threads each, the spinning OpenMP threads of both processes fight for the cores).
    env = dict(os.environ, TRITON_INTERPRET="1", TRITON_DEFAULT_FP_FUSION="1", OMP_NUM_THREADS="1")
    env.pop("EMBER_BENCH_MD_DIR", None)
    try:
        return subprocess.run([sys.executable, str(BENCH / name), "--smoke"], cwd=BENCH.parent,
                              env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        return subprocess.CompletedProcess(e.cmd, -1, e.stdout or "",
                                           f"timed out after {TIMEOUT_S}s")


@pytest.fixture(scope="module")
def smoke_runs(request):
    selected = sorted({item.callspec.params["script"] for item in request.session.items
                       if getattr(item, "originalname", None) == "test_bench_smoke"})
    # The longest first: train.py (SmolLM2-135M, most of the fixture's time) then runs beside the
    # others instead of alone after them.
    selected.sort(key=lambda name: name not in LONGEST)
    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip(selected, pool.map(_run, selected), strict=True))


def test_benches_found():
    assert {"rms_norm.py", "rope.py", "swiglu.py"} <= set(SCRIPTS), SCRIPTS


@pytest.mark.parametrize("script", SCRIPTS)
def test_bench_smoke(script, smoke_runs):
    proc = smoke_runs[script]
    out = proc.stdout if isinstance(proc.stdout, str) else proc.stdout.decode(errors="replace")
    assert proc.returncode == 0, (f"{script} --smoke failed (rc {proc.returncode}):\n"
                                  f"{proc.stderr[-3000:]}")
    table = [ln for ln in out.splitlines() if ln.startswith("| ")]
    # header + separator + at least one measured row
    assert len(table) >= 3, f"{script} printed no markdown table rows:\n{out[-2000:]}"
    errors = [ln for ln in table if "| error:" in ln]
    assert not errors, f"{script}: providers failed:\n" + "\n".join(errors)


def test_profile_flag_prints_a_breakdown():
    env = dict(os.environ, TRITON_INTERPRET="1")
    env.pop("EMBER_BENCH_MD_DIR", None)
    proc = subprocess.run([sys.executable, str(BENCH / "rms_norm.py"), "--smoke", "--no-jsonl",
                           "--modes", "fwd+bwd", "--providers", "ref", "--profile", "ref"],
                          cwd=BENCH.parent, env=env, capture_output=True, text=True,
                          timeout=TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-2000:]
    head = [ln for ln in proc.stdout.splitlines() if ln.startswith("== profile:")]
    assert head and "ref (fwd+bwd" in head[0], proc.stdout[-2000:]
    assert "Self CPU" in proc.stdout  # the profiler's table
