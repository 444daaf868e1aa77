"""Sharded checkpoints (one process here; 2 <-> 1 processes in test_distributed.py): exact
round trip, manifest, bad checkpoints named and skipped or refused, retention; and ``ember train``
stopped with SIGTERM, killed with SIGKILL at random steps, resumed past a corrupted checkpoint,
with the same per-step losses as an uninterrupted run."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from ember import EmberError
from ember.engine import dcp
from ember.engine.cli import main
from ember.engine.config import to_toml
from tests.engine import _tiny as w
from tests.engine._tiny import rows_of, tiny_config


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


def test_8bit_states_resume_only_at_their_world_size(tmp_path):
    """AdamW8bit's 8-bit blocks follow the shards, so its states load only at the world size that
    wrote them: a checkpoint of another one is refused up front, saying what to do (a 2-process
    one resumed by 1 process failed deep inside DCP with a CheckpointException and a hint about
    LoRA settings). The weights alone still load (ember eval / export)."""
    from ember.engine.optim8bit import AdamW8bit

    def opt8(model):
        return AdamW8bit([p for p in model.parameters() if p.requires_grad], lr=1e-2,
                         min_8bit_size=256)

    model = w.make_model("full")
    opt = opt8(model)
    model(torch.randint(0, w.CFG.vocab_size, (1, 12))).float().logsumexp(-1).mean().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    path = dcp.save(tmp_path, 1, model=model, optimizer=opt)
    fresh = w.make_model("full")
    dcp.load(path, model=fresh, optimizer=opt8(fresh))  # the same world size: fine
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["world_size"] = 2  # as written by torchrun --nproc_per_node 2
    (path / "manifest.json").write_text(json.dumps(manifest))
    fresh = w.make_model("full")
    with pytest.raises(EmberError, match=r"adamw_8bit optimizer states written by 2 processes.*"
                                         r"resume with 2 processes \(torchrun --nproc_per_node"):
        dcp.load(path, model=fresh, optimizer=opt8(fresh))
    assert dcp.load_model_weights(path, fresh) == 1
    torch.testing.assert_close(_trainable(fresh), _trainable(model), rtol=0, atol=0)


# --- through ember train: SIGTERM, SIGKILL, a corrupted checkpoint, exact resume ----------------

KILL_STEPS = 30


def _launch(*args: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "ember.engine.cli", "train", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _logged_step(run: Path) -> int:
    """The last step in the run's metrics.jsonl (0 before the first)."""
    try:
        lines = (run / "metrics.jsonl").read_text().split("\n")[:-1]  # complete lines only
    except FileNotFoundError:
        return 0
    return max((json.loads(ln)["step"] for ln in lines), default=0)


def _signal_at(proc: subprocess.Popen, run: Path, step: int, sig) -> str:
    """Send ``sig`` once the run has logged ``step``; the process's output once it ended."""
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:
        if _logged_step(run) >= step:
            proc.send_signal(sig)
            break
        time.sleep(0.005)
    out, _ = proc.communicate(timeout=300)
    return out


def test_sigterm_sigkill_and_a_corrupted_checkpoint_resume_to_the_same_losses(tiny, tmp_path):
    """``ember train`` stopped by SIGTERM (checkpoint, exit 0, the resume command), resumed and
    killed with SIGKILL at a random step, its newest checkpoint corrupted, resumed again: the
    per-step log equals an uninterrupted run's exactly (LoRA with dropout: RNG states matter)."""
    extra = (f"max_steps={KILL_STEPS}", "data.tokens_per_batch=64", "lora.dropout=0.1",
             "optim.lr=1e-2", "threads=1", "checkpoint.every_steps=1", "checkpoint.keep_last=3",
             "eval.before=false", "eval.metrics=[]")
    ref = tmp_path / "ref"
    threads = torch.get_num_threads()
    try:
        assert main(["train", str(_config(tiny, ref, extra))]) == 0
    finally:
        torch.set_num_threads(threads)
    run = tmp_path / "run"
    rng = random.Random()
    k1 = rng.randint(2, 5)
    out = _signal_at(_launch(str(_config(tiny, run, extra))), run, k1, signal.SIGTERM)
    stopped = _logged_step(run)  # the step in flight when the signal came is finished
    assert stopped >= k1 and f"stopped by SIGTERM after step {stopped}" in out, out
    assert f"resume with: ember train {run} --resume" in out, out
    assert dcp.find_latest(run / "checkpoints").path.name == f"step_{stopped:08d}"

    b = _launch(str(run), "--resume")  # the printed command
    out_b = _signal_at(b, run, stopped + rng.randint(3, 8), signal.SIGKILL)
    assert b.returncode == -signal.SIGKILL, out_b
    assert f"resumed from {run / 'checkpoints' / f'step_{stopped:08d}'}" in out_b, out_b
    newest = dcp.find_latest(run / "checkpoints").path
    _corrupt_byte(newest / "__0_0.distcp")

    out_c = _launch(str(run), "--resume").communicate(timeout=300)[0]
    assert f"resume: {newest}: corrupted: file __0_0.distcp does not match its sha256" in out_c
    resumed = int(re.search(r"resumed from .*step_(\d{8}) \(step", out_c)[1])
    assert stopped <= resumed < int(newest.name[5:]), out_c
    assert (run / "final" / "adapter").is_dir(), out_c
    got, want = rows_of(run, timing=False), rows_of(ref, timing=False)
    assert [r["step"] for r in got if r["kind"] == "train"] == list(range(1, KILL_STEPS + 1))
    assert got == want, (k1, stopped, resumed)


def _config(tiny, run: Path, extra) -> Path:
    path = run.parent / f"{run.name}.toml"
    path.write_text(to_toml(tiny_config(tiny, run, *extra)))
    return path


def test_a_resume_onto_other_base_weights_is_refused(tiny, tmp_path):
    """A LoRA checkpoint holds the adapters only: a resume reads the base again from model.name.
    Base weights changed since (one tensor of the folder rewritten by safetensors) resumed
    silently onto them, another run than the one checkpointed; refused, naming model.name. The
    same weights written again (other file bytes: safetensors' own metadata) resume."""
    import shutil

    from safetensors.torch import load_file, save_file

    from ember.engine.trainer import train

    model = shutil.copytree(tiny["model"], tmp_path / "model")
    cfg = tiny_config(dict(tiny, model=str(model)), tmp_path / "r", "max_steps=3",
                      "eval.metrics=[]", "eval.val_loss=false")
    assert train(cfg, echo=w.quiet, progress=False, stop_after=1).steps == 1
    file = model / "model.safetensors"
    weights = load_file(file)
    key = next(k for k in weights if "layers.1." in k and "q_proj" in k)
    save_file({**weights, key: weights[key] * 1.01}, file, metadata={"format": "pt"})
    with pytest.raises(EmberError, match="differ from those its checkpoint.*model.name|model.name"
                       ".*differ from those its checkpoint"):
        train(cfg, resume=True, echo=w.quiet, progress=False)
    save_file(weights, file, metadata={"format": "pt", "note": "rewritten"})
    assert train(cfg, resume=True, echo=w.quiet, progress=False).steps == 3
