"""Sharded checkpoints (one process here; 2 <-> 1 processes in test_distributed.py): exact
round trip, manifest, bad checkpoints named and skipped or refused, retention, and a run killed
with SIGTERM and then SIGKILL at random steps that resumes to the same per-step losses."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ember import EmberError
from ember.engine import dcp
from ember.engine.distributed import DistInfo
from tests.engine import _dist_worker as w


def _trained(kind: str, steps: int = 2):
    model = w.make_model(kind)
    opt = w.make_optimizer(model)
    g = torch.Generator().manual_seed(random.randrange(2**31))
    for _ in range(steps):
        ids = torch.randint(0, w.CFG.vocab_size, (1, 12), generator=g)
        model(ids).float().logsumexp(-1).mean().backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def _trainable(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("kind", ["full", "lora"])
def test_round_trip_is_exact(tmp_path, kind):
    model, opt = _trained(kind)
    extra = {"step": 7, "data": {"epoch": 1, "position": 3}, "sched": torch.tensor([0.5]),
             "best": None}
    path = dcp.save(tmp_path, 7, model=model, optimizer=opt, extra=extra,
                    config_text="name = \"x\"\n")
    assert path == tmp_path / "step_00000007"
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["step"] == 7 and manifest["world_size"] == 1
    for name, info in manifest["files"].items():  # sizes and hashes of what is on disk
        data = (path / name).read_bytes()
        assert info["bytes"] == len(data)
        import hashlib

        assert info["sha256"] == hashlib.sha256(data).hexdigest()
    expected_rng = (torch.rand(3), random.random(), np.random.rand())

    fresh = w.make_model(kind)
    with torch.no_grad():  # make sure every loaded value really comes from the checkpoint
        for p in fresh.parameters():
            p.add_(1.0)
    fresh_opt = w.make_optimizer(fresh)
    loaded = dcp.load(path, model=fresh, optimizer=fresh_opt)
    assert (torch.rand(3), random.random(), np.random.rand())[1:] == expected_rng[1:]
    assert loaded.step == 7 and loaded.config_text == "name = \"x\"\n"
    assert loaded.extra["data"] == extra["data"] and torch.equal(loaded.extra["sched"],
                                                                 extra["sched"])
    want, got = _trainable(model), _trainable(fresh)
    assert want.keys() == got.keys()
    for n in want:
        assert torch.equal(got[n], want[n]), n
    if kind == "lora":  # frozen weights are not in the checkpoint: they stay as built
        frozen = dict(fresh.named_parameters())["layers.0.attn.q_proj.base.weight"]
        assert torch.equal(frozen, dict(w.make_model(kind).named_parameters())[
            "layers.0.attn.q_proj.base.weight"] + 1.0)
    a, b = opt.state_dict(), fresh_opt.state_dict()
    for i, st in a["state"].items():
        for k, v in st.items():
            assert torch.equal(b["state"][i][k], v), (i, k)


def _corrupt_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_bad_checkpoints_are_named_and_skipped(tmp_path):
    model, opt = _trained("lora", 1)
    for step in (1, 2, 3, 4, 5):
        dcp.save(tmp_path, step, model=model, optimizer=opt, extra={"step": step})
    step = lambda n: tmp_path / f"step_{n:08d}"  # noqa: E731
    (step(5) / "manifest.json").unlink()  # interrupted before the manifest
    _corrupt_byte(step(4) / "__0_0.distcp")  # bit rot: same size, other bytes
    with open(step(3) / "extra.pt", "ab") as f:  # size differs
        f.write(b"x")
    (step(2) / "rng" / "rank_0.pt").unlink()
    latest = dcp.find_latest(tmp_path)
    assert latest.path == step(1)
    assert [m.split(":")[0] for m in latest.skipped] == [str(step(n)) for n in (5, 4, 3, 2)]
    assert "incomplete: no manifest.json" in latest.skipped[0]
    assert "__0_0.distcp does not match its sha256" in latest.skipped[1]
    assert "extra.pt has" in latest.skipped[2] and "bytes, the manifest says" in latest.skipped[2]
    assert "rng/rank_0.pt is missing" in latest.skipped[3]
    # Size-only verification is fast and misses only the same-size corruption.
    assert dcp.find_latest(tmp_path, level="size").path == step(4)
    fresh = w.make_model("lora")
    with pytest.raises(EmberError, match="cannot resume from .*step_00000004: corrupted"):
        dcp.load(step(4), model=fresh, optimizer=w.make_optimizer(fresh))
    (step(1) / "manifest.json").write_text("{not json")
    none = dcp.find_latest(tmp_path)
    assert none.path is None and len(none.skipped) == 5 and "unreadable" in none.skipped[-1]
    assert dcp.find_latest(tmp_path / "missing").path is None


def test_retention_overwrite_and_leftovers(tmp_path):
    model, opt = _trained("lora", 1)
    leftover = tmp_path / ".tmp-step_00000009-deadbeef"
    leftover.mkdir(parents=True)
    (leftover / "__0_0.distcp").write_bytes(b"partial")
    for s in (1, 2, 3, 4):
        dcp.save(tmp_path, s, model=model, optimizer=opt, extra={"s": s}, keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000003", "step_00000004"]
    dcp.save(tmp_path, 4, model=model, optimizer=opt, extra={"s": "again"}, keep_last=2)
    fresh = w.make_model("lora")
    assert dcp.load(tmp_path / "step_00000004", model=fresh).extra == {"s": "again"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000003", "step_00000004"]


def test_wrong_model_is_refused(tmp_path):
    model, opt = _trained("lora", 1)
    path = dcp.save(tmp_path, 1, model=model, optimizer=opt)
    full = w.make_model("full")
    with pytest.raises(EmberError, match="does not match this model's trainable parameters"):
        dcp.load(path, model=full, optimizer=w.make_optimizer(full))
    assert dcp.load_model_weights(path, w.make_model("lora")) == 1
    with pytest.raises(EmberError, match=r"extra\['sched'\] has type AdamW; .* state_dict"):
        dcp.save(tmp_path, 2, model=model, extra={"sched": opt})
    assert not (tmp_path / "step_00000002").exists()


# --- exact resume after SIGTERM and SIGKILL ------------------------------------------------------

def _launch(job: dict, tmp: Path, name: str) -> subprocess.Popen:
    spec = tmp / f"{name}.json"
    spec.write_text(json.dumps(job))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(w.__file__).parents[2])}
    return subprocess.Popen([sys.executable, w.__file__, "--run", str(spec)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _run_until(proc: subprocess.Popen, step: int | None, sig) -> list[str]:
    """Read the run's lines; send ``sig`` once it reports ``step`` (None: let it finish)."""
    lines = []
    for line in proc.stdout:
        lines.append(line.rstrip("\n"))
        if step is not None and line.startswith(f"STEP {step} "):
            proc.send_signal(sig)
            step = None
    proc.wait(timeout=120)
    return lines


def _losses(lines) -> dict[int, float]:
    return {int(p[1]): float(p[2]) for p in (ln.split() for ln in lines) if p[0] == "STEP"}


def test_sigterm_then_sigkill_then_resume_gives_the_same_losses(tmp_path):
    steps = 9
    job = {"kind": "full", "steps": steps, "batches_per_step": 2, "save_every": 1,
           "root": str(tmp_path / "run" / "checkpoints"), "step_delay": 0.15}
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ref = w.train("full", DistInfo(), steps=steps, batches_per_step=2)
    finally:
        torch.set_num_threads(n)
    rng = random.Random()
    k1 = rng.randint(1, 3)
    a = _launch(job, tmp_path, "a")
    out_a = _run_until(a, k1, signal.SIGTERM)
    text = "\n".join(out_a)
    assert a.returncode == 0, text
    stopped = max(_losses(out_a))  # the step in flight when the signal came is finished
    assert stopped >= k1 and f"stopped by SIGTERM after step {stopped}" in text, text
    assert f"resume with: ember train {tmp_path / 'run'} --resume" in text
    assert dcp.find_latest(job["root"]).path.name == f"step_{stopped:08d}"

    k2 = stopped + rng.randint(1, 3)
    b = _launch({**job, "resume": True}, tmp_path, "b")
    out_b = _run_until(b, k2, signal.SIGKILL)  # maybe in the middle of writing a checkpoint
    assert b.returncode == -signal.SIGKILL, "\n".join(out_b)
    assert f"RESUMED {stopped} step_{stopped:08d}" in out_b

    c = _launch({**job, "resume": True, "step_delay": 0.0}, tmp_path, "c")
    out_c = _run_until(c, None, None)
    assert c.returncode == 0 and out_c[-1] == "DONE", "\n".join(out_c)
    resumed_at = int(next(ln for ln in out_c if ln.startswith("RESUMED")).split()[1])
    assert stopped <= resumed_at <= max(_losses(out_b))  # killed mid-save: an older one
    seen = {}
    for lines in (out_a, out_b, out_c):  # a step run twice (after the kill) must repeat exactly
        for s, loss in _losses(lines).items():
            assert ref[s] == loss, (s, loss, ref[s], k1, k2)
            seen[s] = loss
    assert sorted(seen) == list(range(1, steps + 1))
    shutil.rmtree(tmp_path / "run")
