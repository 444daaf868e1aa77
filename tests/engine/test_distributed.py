"""FSDP2 on CPU with gloo: 2 processes reproduce one process (full FT and LoRA), checkpoints
move between world sizes (2 -> 1 and 1 -> 2), the gathered export equals the unsharded weights.

One ``torchrun`` launch runs every 2-process job (startup dominates on CPU); the one-process
references run in this process with the same loop (tests/engine/_dist_worker.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ember import EmberError
from ember.engine import dcp
from ember.engine.data import collate
from ember.engine.distributed import (
    DistInfo,
    all_reduce_sums,
    any_rank,
    data_state,
    init_distributed,
    rank0_echo,
    rank_batches,
    restore_data_state,
    shard_model,
)
from ember.models.nf4 import quantize_model_
from tests.engine import _dist_worker as w

WORKER = Path(w.__file__)
STEPS, PER_STEP, SAVE_AT = 5, 2, 3


def one_thread(fn):
    """Run ``fn`` with 1 intra-op thread, as the worker processes do (same float sums)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fn()
    finally:
        torch.set_num_threads(n)


def torchrun(jobs: dict, tmp: Path, nproc: int = 2) -> dict:
    jobs_file, out = tmp / "jobs.json", tmp / "results.json"
    jobs_file.write_text(json.dumps({"out": str(out), "jobs": jobs}))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(WORKER.parents[2])}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           f"--nproc_per_node={nproc}", str(WORKER), str(jobs_file)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    return {name: {int(k): v for k, v in r.items()} for name, r in
            json.loads(out.read_text()).items()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    common = {"steps": STEPS, "batches_per_step": PER_STEP}
    one = DistInfo()
    ref = {kind: one_thread(lambda kind=kind: w.train(
        kind, one, root=str(tmp / f"{kind}1"), save_at=(SAVE_AT,),
        export=str(tmp / f"{kind}1.safetensors"), **common)) for kind in ("full", "lora")}
    jobs = {kind: {"kind": kind, "root": str(tmp / f"{kind}2"), "save_at": [SAVE_AT],
                   "export": str(tmp / f"{kind}2.safetensors"), **common}
            for kind in ("full", "lora")}
    jobs["lora"]["checkpointing"] = "every_block"  # LoRA -> checkpointing -> fully_shard
    # The GPU policy (bf16 compute, fp32 reduction) on a bf16 base with fp32 adapters.
    jobs["lora_bf16"] = {**jobs["lora"], "root": None, "save_at": [], "export": None,
                         "mixed_precision": "bf16", "base_bf16": True}
    for kind in ("full", "lora"):  # 1 -> 2: continue the one-process checkpoints
        jobs[f"{kind}_from1"] = {"kind": kind, "root": str(tmp / f"{kind}1"), "resume": True,
                                 **common}
    return tmp, ref, torchrun(jobs, tmp)


def _close(got: dict, want: dict):
    assert got.keys() == want.keys()
    for s in want:
        assert abs(got[s] - want[s]) <= 1e-5, (s, got[s], want[s])


@pytest.mark.parametrize("kind", ["full", "lora"])
def test_two_processes_match_one(runs, kind):
    _, ref, dist = runs
    assert len(set(ref[kind].values())) == STEPS  # the loss moves: the comparison means something
    _close(dist[kind], ref[kind])


def test_bf16_mixed_precision_policy(runs):
    _, ref, dist = runs
    got = dist["lora_bf16"]
    assert got.keys() == ref["lora"].keys()
    first = ref["lora"][1]  # before any update only the forward's bf16 rounding differs
    assert abs(got[1] - first) < 1e-3 * first, (got[1], first)
    for s in got:  # then bf16 compute drifts slowly from the fp32 trajectory
        assert abs(got[s] - ref["lora"][s]) < 0.02 * ref["lora"][s], (s, got[s], ref["lora"][s])


@pytest.mark.parametrize("kind", ["full", "lora"])
def test_gathered_weights_match_one_process(runs, kind):
    tmp, _, _ = runs
    a = load_file(str(tmp / f"{kind}1.safetensors"))
    b = load_file(str(tmp / f"{kind}2.safetensors"))
    assert a.keys() == b.keys()
    if kind == "lora":  # only the adapters are trainable, and only they are exported
        assert a and all(k.endswith(("lora_A", "lora_B")) for k in a)
    else:
        assert "layers.0.attn.q_proj.weight" in a and "embed.weight" in a
    start = w.make_model(kind).state_dict()
    for k in a:
        assert not torch.equal(a[k], start[k]), k  # trained
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-5, msg=k)


@pytest.mark.parametrize("kind", ["full", "lora"])
def test_resume_two_to_one_and_one_to_two(runs, kind):
    tmp, ref, dist = runs
    want = {s: v for s, v in ref[kind].items() if s > SAVE_AT}
    _close(dist[f"{kind}_from1"], want)  # saved by 1 process, continued by 2
    got = one_thread(lambda: w.train(kind, DistInfo(), root=str(tmp / f"{kind}2"), resume=True,
                                     steps=STEPS, batches_per_step=PER_STEP))
    _close(got, want)  # saved by 2 processes, continued by 1
    manifest = json.loads((tmp / f"{kind}2" / f"step_{SAVE_AT:08d}" / "manifest.json").read_text())
    assert manifest["world_size"] == 2
    assert {"rng/rank_0.pt", "rng/rank_1.pt", "extra.pt", ".metadata"} <= set(manifest["files"])


def test_lora_checkpoint_holds_only_adapters(runs):
    tmp, _, _ = runs
    import torch.distributed.checkpoint as tdcp

    meta = tdcp.FileSystemReader(str(tmp / "lora2" / f"step_{SAVE_AT:08d}")).read_metadata()
    model_keys = [k for k in meta.state_dict_metadata if k.startswith("model.")]
    assert model_keys and all(k.endswith(("lora_A", "lora_B")) for k in model_keys)


def test_data_sharding_keeps_global_order():
    examples = w.make_examples()
    one = rank_batches(examples, w.DATA, DistInfo())
    ranks = [rank_batches(examples, w.DATA, DistInfo(rank=r, world_size=2)) for r in (0, 1)]
    plan = one.plan(0)
    assert len(plan) % 2 == 0
    assert ranks[0].plan(0) == plan[0::2] and ranks[1].plan(0) == plan[1::2]
    # Three steps of 2 global batches on 2 ranks, then continue on 1 process.
    for r in ranks:
        it = iter(r)
        for _ in range(3):
            next(it)
    state = data_state(ranks[0], 2)
    assert state["batches_done"] == 6
    restore_data_state(one, state, 2)
    assert (one.epoch, one.position) == (0, 6)
    assert torch.equal(next(iter(one)).input_ids, collate([examples[i] for i in plan[6]]).input_ids)
    with pytest.raises(EmberError, match="set grad_accum = 2 for 1 processes"):
        restore_data_state(one, state, 1)
    other = rank_batches(w.make_examples(seed=5), w.DATA, DistInfo())
    with pytest.raises(EmberError, match="dataset or batching settings differ"):
        restore_data_state(other, state, 2)


def test_single_process_helpers(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    info = init_distributed("cpu")
    assert (info.rank, info.world_size, info.backend, info.is_main) == (0, 1, None, True)
    assert all_reduce_sums([1, 2.5], info) == [1.0, 2.5] and any_rank(True, info)
    model = w.make_model("full")
    assert shard_model(model, info) is model  # one process: nothing to shard
    seen = []
    rank0_echo(seen.append, info)("a")
    rank0_echo(seen.append, DistInfo(rank=1, world_size=2))("b")
    assert seen == ["a"]
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(EmberError, match="WORLD_SIZE='two' is not an integer"):
        init_distributed("cpu")


def test_qlora_with_fsdp_is_refused():
    model = w.make_model("full")
    quantize_model_(model, blocksize=32)
    with pytest.raises(EmberError, match="QLoRA .* not supported"):
        shard_model(model, DistInfo(rank=0, world_size=2))
    with pytest.raises(EmberError, match="mixed_precision must be one of"):
        shard_model(model, DistInfo(), mixed_precision="fp8")


def test_checkpoint_is_reused_by_find_latest(runs):
    tmp, _, _ = runs
    latest = dcp.find_latest(tmp / "full2")
    assert latest.path is not None and latest.path.name == f"step_{SAVE_AT:08d}"
    assert latest.skipped == []
