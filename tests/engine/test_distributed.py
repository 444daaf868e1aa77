"""FSDP2 under torchrun on CPU (gloo, 2 processes) through ``ember train``: the same per-step
losses as one process on the same global batch (full fine-tuning and LoRA, within 1e-5), the
same evaluation (shared out across the ranks: validation batches, generated completions) and
exported weights, checkpoints continued by another number of processes (2 -> 1 and 1 -> 2);
short distillation, DPO (full: a frozen reference copy) and classifier runs, the teacher and the
reference sharded too; prompt tuning on mixed data with multiple-choice scores and early
stopping; then the pieces below the trainer (data and evaluation sharding, helpers, refusals).

One process with grad_accum = 2 and two with grad_accum = 1 take the same 2 packed batches per
optimizer step (6 batches per epoch: no epoch is cut for 2 ranks). One-process runs go through
``ember.engine.cli.main`` in this process, two-process runs through ``torchrun -m
ember.engine.cli train``; process startup dominates on CPU, so there are few launches.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ember import EmberError
from ember.engine.cli import main
from ember.engine.config import to_toml
from ember.engine.data import PackedBatches, collate
from ember.engine.distributed import (
    DistConfig,
    DistInfo,
    all_reduce_sums,
    any_rank,
    data_state,
    eval_share,
    init_distributed,
    rank0_echo,
    restore_data_state,
    shard_model,
    step_share,
)
from ember.engine.evaluation import eval_batches
from ember.models.nf4 import Linear4bit, quantize_model_
from tests.engine import _tiny as w
from tests.engine._tiny import make_tiny_model, rows_of, tiny_config, write_jsonl
from tests.engine._torchrun_many import continue_from, split_output
from tests.engine.test_classification import animal_rows

STEPS = 6
COMMON = ("max_steps=6", "data.tokens_per_batch=96", "checkpoint.every_steps=2",
          "checkpoint.keep_last=5", "eval.every_steps=3", "eval.max_new_tokens=3")
KINDS = {"full": ('method="full"', "optim.lr=3e-3", "eval.metrics=[]"),
         # 7 test examples in batches of 3: rank 0 generates 2 batches, rank 1 one and then
         # lock-step passes; every completion is printed (eval.show) to compare them.
         "lora": ("optim.lr=1e-2", "eval.metrics=['exact_match']", "eval.max_examples=7",
                  "eval.batch_size=3", "eval.show=7")}


def write_config(tiny, run_dir: Path, *extra: str) -> Path:
    path = run_dir.parent / f"{run_dir.name}.toml"
    path.write_text(to_toml(tiny_config(tiny, run_dir, *COMMON, *extra)))
    return path


def sets(*items: str) -> list[str]:
    return [a for item in items for a in ("--set", item)]


def torchrun_train(*args: str, status: int = 0) -> str:
    """``torchrun --standalone --nproc_per_node 2 -m ember.engine.cli train ARGS``: its output
    (the launch must end with exit ``status``)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node=2", "-m", "ember.engine.cli", "train", *args],
                          capture_output=True, text=True, env=env, timeout=600)
    out = proc.stdout + proc.stderr
    assert (proc.returncode == 0) == (status == 0), out[-6000:]
    return out


def torchrun_many(tmp: Path, plan: list[dict]) -> dict[str, str]:
    """The runs of ``plan`` (``{"name", "args", "continue_from"}``, see _torchrun_many) in one
    ``torchrun --nproc_per_node 2`` launch, which must end well: each run's output by name."""
    (tmp / "plan.json").write_text(json.dumps(plan, default=str))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node=2", "-m", "tests.engine._torchrun_many",
                           str(tmp / "plan.json")],
                          capture_output=True, text=True, env=env, timeout=1800)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    names = [run["name"] for run in plan]
    outs, errs = split_output(proc.stdout, names), split_output(proc.stderr, names)
    return {name: outs[name] + errs[name] for name in names}


def short_runs(tiny, tmp: Path) -> dict[str, tuple[str, ...]]:
    """Distillation (DoRA student) and DPO (full fine-tuning: a frozen reference copy): both
    keep a second model that FSDP shards too; and a classifier, whose evaluation is shared out
    by batches like the validation loss. Shorter runs on smaller batches: the validation sets
    then make an odd number of batches (ranks with one batch fewer make a dummy call), and the
    distillation run validates per source (val_loss/val, val_loss/test)."""
    teacher = make_tiny_model(tmp / "teacher", seed=1)
    rng = random.Random(5)
    prefs = w.word_prefs(rng, 16)
    prefs = write_jsonl(tmp / "prefs.jsonl", prefs)
    kto = []  # KTO lines, a third of the wrong completions labelled desirable
    for _ in range(48):
        words = [rng.choice(w.WORDS) for _ in range(rng.randint(2, 6))]
        wrong = rng.choice([x for x in w.WORDS if x != words[0]])
        p = "say " + " ".join(words) + " ->"
        kto += [{"prompt": p, "completion": " " + words[0], "label": True},
                {"prompt": p, "completion": " " + wrong, "label": rng.random() < 0.3}]
    kto = write_jsonl(tmp / "kto.jsonl", kto)
    # multiple-choice questions "say w1 w2 ... ->", the first word among 3 choices
    choices = []
    for q in w.word_prefs(rng, 7):
        options = [q["chosen"], q["rejected"], *(" " + x for x in rng.sample(w.WORDS, 1))]
        choices.append({"question": q["prompt"], "choices": options, "answer": 0})
    choices = write_jsonl(tmp / "choices.jsonl", choices)
    extra_train = write_jsonl(tmp / "extra.jsonl", w.tiny_rows(13, seed=7))
    labelled = {s: write_jsonl(tmp / f"{s}.jsonl", animal_rows(n, seed))
                for s, n, seed in (("train", 64, 1), ("val", 21, 2), ("test", 21, 3))}
    # no warmup: a warmup's first lr is 0, and KTO's loss at the reference is a constant
    short = ("max_steps=3", "eval.every_steps=0", "eval.metrics=[]", "checkpoint.every_steps=0",
             "checkpoint.save_final=false", "optim.warmup_steps=0")
    return {"distill": (*short, 'objective="distill"', f'distill.teacher="{teacher}"',
                        "lora.use_dora=true",
                        "data.max_seq_len=32", "data.tokens_per_batch=48", "optim.lr=1e-2",
                        f'data.validation=["{tiny["val"]}", "{tiny["test"]}"]'),
            # sft_weight: RPO's NLL term, a token mean over the step's chosen answers on all
            # processes (Objective.begin_step); the reference's log-probs precomputed, each
            # process scoring a share (KTO below scores its reference live)
            "dpo": (*short, 'method="full"', 'objective="dpo"', "dpo.beta=0.5", "optim.lr=1e-3",
                    "dpo.sft_weight=0.5", "dpo.precompute_ref_log_probs=true",
                    f'data.train=["{prefs}"]', f'data.validation="{prefs}"',
                    "data.tokens_per_batch=80"),
            # the KL term pooled over the step's micro-batches of both processes; TR-DPO's
            # reference mixed after every step, each rank its own shards
            "kto": (*short, 'method="full"', 'objective="kto"', "kto.beta=1.0", "optim.lr=1e-2",
                    "kto.sync_ref_model=true", "kto.ref_model_mixup_alpha=0.5",
                    "kto.ref_model_sync_steps=1",
                    f'data.train=["{kto}"]', f'data.validation="{kto}"', f'data.test="{kto}"',
                    "data.max_seq_len=32",
                    "data.tokens_per_batch=80"),
            # prompt tuning (the frozen base sharded, the virtual tokens on the root) on two
            # files mixed 0.7 / 0.3, shortest first; multiple-choice scores; early stopping (all
            # ranks stop together at step 4) ending with step 2's weights: "max" makes the
            # falling val_loss of step 4 the worse one
            "mix": ('method="prompt"', "optim.lr=3e-2", "data.mix=[0.7, 0.3]",
                    f'data.train=["{tiny["train"]}", "{extra_train}"]', 'data.order="length"',
                    f'eval.choices="{choices}"', "eval.metrics=[]", "eval.every_steps=2",
                    "eval.before=false", 'eval.early_stopping="val_loss"', 'eval.mode="max"',
                    "eval.patience=1"),
            "classify": (*short, 'head.type="classification"', "eval.metrics=['accuracy']",
                         f'data.train=["{labelled["train"]}"]',
                         f'data.validation="{labelled["val"]}"',
                         f'data.test="{labelled["test"]}"', "data.tokens_per_batch=64")}


@pytest.fixture(scope="module")
def runs(tiny, tmp_path_factory, request):
    tmp = tmp_path_factory.mktemp("dist")
    out = {}
    kinds = {**KINDS, **short_runs(tiny, tmp)}
    for kind, extra in kinds.items():
        with contextlib.redirect_stdout(io.StringIO()) as printed:
            assert main(["train", str(write_config(tiny, tmp / f"{kind}1", *extra)),
                         *sets("grad_accum=2")]) == 0
        out[f"{kind}1"] = printed.getvalue()
    # The two-process runs share one torchrun launch (process startup dominates on CPU).
    plan = [{"name": f"{kind}2", "args": [str(write_config(tiny, tmp / f"{kind}2",
                                                            *kinds[kind]))]}
            for kind in ("distill", "dpo", "kto", "classify", "mix")]
    # LoRA -> activation checkpointing -> fully_shard, as STYLE.md orders them; the MLP in
    # token chunks nested in the blocks' recompute (FSDP unshards once per block, not per chunk).
    # Blocks kept gathered after forward (dist.reshard_after_forward = false): an evaluation
    # then leaves every parameter gathered, and the checkpoint after it (step 6, final) must
    # still save the shards the optimizer holds (it crashed with a KeyError in DCP).
    plan.append({"name": "full2", "args": [str(write_config(tiny, tmp / "full2",
                                                             *KINDS["full"]))]})
    plan.append({"name": "lora2", "args": [str(write_config(
        tiny, tmp / "lora2", *KINDS["lora"], 'activations.checkpointing="every_block"',
        "activations.mlp_chunk_tokens=24", "dist.reshard_after_forward=false"))]})
    # DPO's run again in a copy of its directory (no checkpoint: from step 0): the reference
    # log-probs the two processes saved are read by rank 0 and broadcast, not scored again
    plan.append({"name": "dpo22", "continue_from": [tmp / "dpo2", tmp / "dpo22", 0],
                 "args": [str(tmp / "dpo22"), "--resume", *sets(f'run_dir="{tmp / "dpo22"}"')]})
    # 1 -> 2: the one-process run's checkpoint of step 2, continued by two processes.
    continue_from(tmp / "full1", tmp / "full12", 2)
    plan.append({"name": "full12", "args": [str(tmp / "full12"), "--resume",
                                            *sets(f'run_dir="{tmp / "full12"}"', "grad_accum=1")]})
    # the slow tests' runs, when they are selected: 2 -> 2 (lora2 continued in this launch)
    # and the bf16 policy
    chosen = {getattr(item, "originalname", None) for item in request.session.items}
    if "test_two_processes_resume_exactly" in chosen:
        plan.append({"name": "lora22", "continue_from": [tmp / "lora2", tmp / "lora22", 2],
                     "args": [str(tmp / "lora22"), "--resume",
                              *sets(f'run_dir="{tmp / "lora22"}"')]})
    if "test_bf16_mixed_precision_policy" in chosen:
        plan.append({"name": "bf16", "args": [str(write_config(
            tiny, tmp / "bf16", *KINDS["lora"], "eval.metrics=[]",
            'dist.mixed_precision="bf16"', 'model.dtype="bfloat16"'))]})
    out.update(torchrun_many(tmp, plan))
    return tmp, out


def _same_rows(got: list[dict], want: list[dict]) -> None:
    assert [(r["kind"], r["step"]) for r in got] == [(r["kind"], r["step"]) for r in want]
    for g, r in zip(got, want, strict=True):
        assert g.keys() == r.keys()
        for k in r.keys() - {"kind", "step", "seconds", "tokens_per_s", "grad_norm"}:
            # losses, scores, the objectives' metrics (DPO's rewards); token counts exactly
            assert abs(g[k] - r[k]) <= 1e-5 * max(1.0, abs(r[k])), (r["step"], k, g[k], r[k])
        for k in ("tokens", "loss_tokens"):
            assert g.get(k) == r.get(k), (r["step"], k)
        if "grad_norm" in r:
            assert abs(g["grad_norm"] - r["grad_norm"]) <= 1e-5 * r["grad_norm"]


@pytest.mark.parametrize("kind", ["full", "lora"])
def test_two_processes_match_one(runs, kind):
    tmp, out = runs
    one, two = rows_of(tmp / f"{kind}1"), rows_of(tmp / f"{kind}2")
    losses = [r["loss"] for r in one if r["kind"] == "train"]
    assert len(set(losses)) == STEPS and losses[-1] < losses[0]  # the comparison means something
    assert [r["step"] for r in one if r["kind"] == "eval"] == [0, 3, 6]
    _same_rows(two, one)
    assert "2 processes (FSDP2)" in out[f"{kind}2"]
    if kind == "lora":
        assert "activation checkpointing on 2/2 blocks" in out["lora2"]
        # each rank generated for its share of the test examples: the same completions
        outputs = [re.findall(r"\n  output: (.*)", out[f"lora{n}"]) for n in (1, 2)]
        assert len(outputs[0]) == 7 and outputs[1] == outputs[0], outputs


@pytest.mark.parametrize("kind", ["distill", "dpo", "kto"])
def test_teacher_and_reference_are_sharded(runs, kind):
    """The frozen teacher / reference copy is sharded like the trained model (rank 0 holds about
    half of it) and the runs log what one process logs: losses, the objective's train metrics
    and the validation scores (per source for distillation)."""
    tmp, out = runs
    one, two = rows_of(tmp / f"{kind}1"), rows_of(tmp / f"{kind}2")
    losses = [r["loss"] for r in one if r["kind"] == "train"]
    assert len(set(losses)) == 3 and [r["step"] for r in one if r["kind"] == "eval"] == [0, 3]
    _same_rows(two, one)
    if kind == "distill":
        assert {"kd_loss", "val_loss/val", "val_loss/test"} <= {k for r in one for k in r}
    elif kind == "kto":
        assert any(r.get("kl", 0) > 0 for r in one)  # the KL term in play
        assert {"reward_margin", "val_reward_margin", "val_kl"} <= {k for r in one for k in r}
    else:
        assert {"reward_margin", "val_reward_margin", "nll_loss", "val_nll_loss"} <= {
            k for r in one for k in r}
    if kind == "dpo":
        assert re.search(r"dpo: reference log-probs of 64 documents precomputed .* the frozen "
                         r"reference copy is released", out["dpo2"]), out["dpo2"][-3000:]
        assert re.search(r"dpo: reference log-probs of 64 documents loaded from .*/dpo22/"
                         r"reference/logps.safetensors", out["dpo22"]), out["dpo22"][-3000:]
        _same_rows(rows_of(tmp / "dpo22"), one)
    role = "teacher" if kind == "distill" else "reference"
    m = re.search(rf"{kind} {role}: [\d.]+M params, frozen, sharded: (\d+)% of it on rank 0",
                  out[f"{kind}2"])
    assert m is not None and 45 <= int(m[1]) <= 55, out[f"{kind}2"][-3000:]


def test_classifier_evaluation_is_shared_out(runs):
    tmp, _ = runs
    one = rows_of(tmp / "classify1")
    assert [r["step"] for r in one if "accuracy" in r and "val_loss" in r] == [0, 3]
    _same_rows(rows_of(tmp / "classify2"), one)


def test_prompt_tuning_mixing_choices_and_early_stopping(runs):
    """Prompt tuning under torchrun (refused before; its export then failed on the gathered
    state dict's keys, embed.prompt vs embed.weight): two processes on mixed, length-ordered data
    log what one process logs (choice scores included), stop early at the same step and export
    the same PEFT adapter, the best step's virtual tokens."""
    tmp, out = runs
    one = rows_of(tmp / "mix1")
    assert [(r["kind"], r["step"]) for r in one] == [
        ("train", 1), ("train", 2), ("eval", 2), ("train", 3), ("train", 4), ("eval", 4)]
    assert "choice_accuracy" in one[2]
    _same_rows(rows_of(tmp / "mix2"), one)
    for n in (1, 2):
        assert "early stopping at step 4" in out[f"mix{n}"]
        assert "restored the weights of step 2" in out[f"mix{n}"]
    adapter = [tmp / f"mix{n}" / "final" / "adapter" for n in (1, 2)]
    a, b = (load_file(str(d / "adapter_model.safetensors")) for d in adapter)
    assert a.keys() == b.keys() == {"prompt_embeddings"}
    torch.testing.assert_close(b["prompt_embeddings"], a["prompt_embeddings"], rtol=0, atol=1e-5)
    configs = [json.loads((d / "adapter_config.json").read_text()) for d in adapter]
    assert configs[1] == configs[0] and configs[0]["peft_type"] == "PROMPT_TUNING"


def test_evaluation_batches_are_shared_out():
    """Each rank scores a disjoint share of the validation batches, together all of them, and
    every rank makes as many forward calls (the last ones repeats that count for nothing)."""
    for n in range(7):
        for world in (1, 2, 3):
            shares = [eval_share(n, DistInfo(rank=r, world_size=world)) for r in range(world)]
            assert {len(s) for s in shares} == {-(-n // world)}
            real = sorted(i for s in shares for i in s if i is not None)
            assert real == list(range(n))
    examples = w.make_examples()
    one = [(i, b.input_ids) for i, b in eval_batches(examples, 40, max_batches=7)]
    assert [i for i, _ in one] == list(range(7))
    got = []
    for r in (0, 1):
        mine = list(eval_batches(examples, 40, max_batches=7,
                                 info=DistInfo(rank=r, world_size=2)))
        assert [i for i, _ in mine] == [r, r + 2, r + 4, 6 if r == 0 else None]
        got += [(i, b.input_ids) for i, b in mine if i is not None]
    assert sorted(i for i, _ in got) == list(range(7))
    assert all(torch.equal(one[i][1], ids) for i, ids in got)


@pytest.mark.parametrize("kind", ["full", "lora"])
def test_exported_weights_match_one_process(runs, kind, tiny):
    tmp, _ = runs
    name = "model/model.safetensors" if kind == "full" else "adapter/adapter_model.safetensors"
    a = load_file(str(tmp / f"{kind}1" / "final" / name))
    b = load_file(str(tmp / f"{kind}2" / "final" / name))
    assert a.keys() == b.keys() and len(a) > 5
    if kind == "full":  # trained: every exported tensor differs from the base model's
        base = load_file(str(Path(tiny["model"]) / "model.safetensors"))
        assert a.keys() == base.keys() and not any(torch.equal(a[k], base[k]) for k in a)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-5, msg=k)


def test_resume_one_to_two_and_two_to_one(runs, capsys):
    tmp, out = runs
    assert f"resumed from {tmp / 'full12' / 'checkpoints' / 'step_00000002'}" in out["full12"]
    _same_rows(rows_of(tmp / "full12"), rows_of(tmp / "full1"))
    manifest = json.loads((tmp / "full2" / "checkpoints" / "step_00000004" / "manifest.json")
                          .read_text())
    assert manifest["world_size"] == 2
    assert {"rng/rank_0.pt", "rng/rank_1.pt", "extra.pt", ".metadata"} <= set(manifest["files"])
    # 2 -> 1, full fine-tuning and LoRA (which may drop activation checkpointing on the way).
    for kind, step, extra in (("full", 4, ()), ("lora", 2, ('activations.checkpointing="none"',))):
        run = tmp / f"{kind}21"
        continue_from(tmp / f"{kind}2", run, step)
        assert main(["train", str(run), "--resume",
                     *sets(f'run_dir="{run}"', "grad_accum=2", *extra)]) == 0
        _same_rows(rows_of(run), rows_of(tmp / f"{kind}1"))
    # Another global batch cannot continue the same run: the error says what to set.
    run = tmp / "full_bad"
    continue_from(tmp / "full2", run, 4)
    capsys.readouterr()
    assert main(["train", str(run), "--resume", *sets(f'run_dir="{run}"')]) == 2
    assert "set grad_accum = 2 for 1 process to continue" in capsys.readouterr().err


def test_resume_may_change_the_collective_timeout(runs, capsys):
    """A run that failed on a collective timeout resumes with a longer dist.timeout_minutes (and
    may trade memory for communication, dist.reshard_after_forward): neither changes a number,
    so the run goes on as before (both were refused as "the config differs ... in dist");
    dist.mixed_precision changes the numbers and is still refused."""
    tmp, _ = runs
    run = tmp / "full_timeout"
    continue_from(tmp / "full1", run, 4)
    capsys.readouterr()
    assert main(["train", str(run), "--resume", *sets(
        f'run_dir="{run}"', 'dist.mixed_precision="bf16"')]) == 2
    assert "differs from the checkpoint's in dist" in capsys.readouterr().err
    assert main(["train", str(run), "--resume", *sets(
        f'run_dir="{run}"', "dist.timeout_minutes=120", "dist.reshard_after_forward=false")]) == 0
    _same_rows(rows_of(run), rows_of(tmp / "full1"))


def kto_rows(n: int) -> list[dict]:
    rng, rows = random.Random(5), []
    for _ in range(n):
        words = [rng.choice(w.WORDS) for _ in range(rng.randint(2, 6))]
        wrong = rng.choice([x for x in w.WORDS if x != words[0]])
        p = "say " + " ".join(words) + " ->"
        rows += [{"prompt": p, "completion": " " + words[0], "label": True},
                 {"prompt": p, "completion": " " + wrong, "label": rng.random() < 0.3}]
    return rows


@pytest.fixture(scope="module")
def fractional(tiny, tmp_path_factory, request):
    """test_fractional_epochs_on_batches_that_do_not_divide's runs of each selected kind: one
    process (its output), then the two-process runs, all in one launch."""
    tmp = tmp_path_factory.mktemp("fractional")
    chosen = [item.callspec.params["kind"] for item in request.session.items
              if getattr(item, "originalname", None) == FRACTIONAL_TEST]
    printed, plan = {}, []
    for kind in dict.fromkeys(chosen):
        folder = tmp / kind
        folder.mkdir()
        cfg = ('method="full"', "optim.lr=3e-3", "eval.metrics=[]", "eval.every_steps=0",
               "checkpoint.every_steps=2", "checkpoint.keep_last=5", "epochs=1.5",
               "data.tokens_per_batch=128")
        if kind == "kto":
            kto = write_jsonl(folder / "kto.jsonl", kto_rows(21))
            cfg = (*cfg, 'objective="kto"', f'data.train=["{kto}"]', f'data.validation="{kto}"',
                   "data.max_seq_len=32", "data.tokens_per_batch=72", "checkpoint.every_steps=0")
        for name in ("one", "two"):
            (folder / f"{name}.toml").write_text(to_toml(tiny_config(tiny, folder / name, *cfg)))
        with contextlib.redirect_stdout(io.StringIO()) as one:
            assert main(["train", str(folder / "one.toml"), *sets("grad_accum=2")]) == 0
        printed[kind] = one.getvalue()
        plan.append({"name": kind, "args": [str(folder / "two.toml")]})
    return tmp, printed, torchrun_many(tmp, plan) if plan else {}


FRACTIONAL_TEST = "test_fractional_epochs_on_batches_that_do_not_divide"


@pytest.mark.parametrize("kind", ["sft", "kto"])
def test_fractional_epochs_on_batches_that_do_not_divide(fractional, kind):
    """epochs = 1.5 on 5 packed batches an epoch: two processes take every batch (the epoch's
    last, odd one too: rank 1 makes a pass that adds nothing) and run the steps of one process
    with twice their grad_accum: 3 + 2 steps of 2, 2, 1, 2, 2 batches, the same losses, token
    counts and lr schedule (they cut the epoch to 4 batches and ran 2 + 1 steps). KTO also makes
    forwards for its KL term and reduces metric sums: rank 1's pass adds none (it hung gloo on
    a collective of another size). The two-process checkpoint of step 2 then continues in one
    process as that run."""
    tmp, printed, out = fractional
    tmp_path = tmp / kind
    assert "5 steps (5 batches of <=" in printed[kind]
    out = out[kind]
    assert "5 steps (5 batches" in out and "left out" not in out
    one = rows_of(tmp_path / "one")
    assert [r["step"] for r in one if r["kind"] == "train"] == [1, 2, 3, 4, 5]
    _same_rows(rows_of(tmp_path / "two"), one)
    if kind == "sft":
        # another global batch is refused, with the grad_accum for this run's 2 processes
        continue_from(tmp_path / "one", tmp_path / "one2", 2)
        out = torchrun_train(str(tmp_path / "one2"), "--resume",
                             *sets(f'run_dir="{tmp_path / "one2"}"', "grad_accum=2"), status=1)
        assert "set grad_accum = 1 for 2 processes to continue" in out, out[-3000:]
        continue_from(tmp_path / "two", tmp_path / "two1", 2)
        with contextlib.redirect_stdout(io.StringIO()):
            assert main(["train", str(tmp_path / "two1"), "--resume",
                         *sets(f'run_dir="{tmp_path / "two1"}"', "grad_accum=2")]) == 0
        _same_rows(rows_of(tmp_path / "two1"), one)


@pytest.mark.slow
def test_two_processes_resume_exactly(runs):
    """The usual case, a torchrun job continued by as many processes: the same log, bit for bit
    (each rank gets its own RNG states back)."""
    tmp, out = runs  # continued in the fixture's launch
    assert f"resumed from {tmp / 'lora22' / 'checkpoints' / 'step_00000002'}" in out["lora22"]
    assert rows_of(tmp / "lora22", timing=False) == rows_of(tmp / "lora2", timing=False)


@pytest.mark.slow
def test_bf16_mixed_precision_policy(runs):
    """The GPU policy (bf16 compute, fp32 reduction and master shards) on a bf16 base with fp32
    adapters: close to the fp32 run, not equal."""
    tmp, _ = runs  # trained in the fixture's launch
    got = [r["loss"] for r in rows_of(tmp / "bf16") if r["kind"] == "train"]
    want = [r["loss"] for r in rows_of(tmp / "lora1") if r["kind"] == "train"]
    assert abs(got[0] - want[0]) < 1e-2 * want[0], (got, want)  # only bf16 rounding so far
    for g, r in zip(got, want, strict=True):  # then bf16 compute drifts slowly
        assert abs(g - r) < 0.03 * r, (got, want)
    assert got != want


def test_step_share_deals_the_one_process_stream_out_and_resumes_anywhere():
    """Every rank follows the one-process stream and of each step's batches takes every N-th
    (step_share); a checkpoint after 3 steps of 2 global batches on 2 processes continues on 1
    process (or any count with the same global batches per step) at batch 6."""
    examples = w.make_examples()
    stream = PackedBatches.from_config(examples, w.DATA)
    plan = stream.plan(0)
    it = stream.indices()
    for _ in range(3):
        window = [next(it), next(it)]
        shares = [step_share(window, DistInfo(rank=r, world_size=2)) for r in (0, 1)]
        assert shares == [([window[0]], 1), ([window[1]], 1)]
    assert step_share(plan[:3], DistInfo(rank=1, world_size=2)) == ([plan[1]], 2)
    state = data_state(stream, 2)
    assert (state["epoch"], state["batches_done"]) == (0, 6)
    one = PackedBatches.from_config(examples, w.DATA)
    restore_data_state(one, state, 2)
    assert (one.epoch, one.position) == (0, 6)
    assert torch.equal(next(iter(one)).input_ids, collate([examples[i] for i in plan[6]]).input_ids)
    with pytest.raises(EmberError, match="set grad_accum = 2 for 1 process to continue"):
        restore_data_state(one, state, 1)
    other = PackedBatches.from_config(w.make_examples(seed=5), w.DATA)
    with pytest.raises(EmberError, match="dataset or batching settings differ"):
        restore_data_state(other, state, 2)


def test_resume_at_an_epoch_end_continues_with_the_next_epoch():
    """A run with 2 batches per step over 7-batch epochs ends step 7 exactly at the end of
    epoch 1 (14 batches): resumed (on any process count), the stream continues with epoch 2's
    batches, those the uninterrupted run takes next."""
    examples = w.make_examples(21)
    one = PackedBatches.from_config(examples, w.DATA)
    assert len(one.plan(0)) == len(one.plan(1)) == 7
    stream = (b for _ in range(3) for b in one)  # what the trainer's stream does
    for _ in range(14):
        next(stream)
    state = data_state(one, 2)
    assert (state["epoch"], state["batches_done"]) == (1, 7)
    want = [next(stream).input_ids for _ in range(6)]  # epoch 2's first 6 batches
    again = PackedBatches.from_config(examples, w.DATA)
    restore_data_state(again, state, 2, processes=2)
    got = [b.input_ids for _ in range(2) for b in again][:6]
    assert len(got) == 6 and all(torch.equal(g, x) for g, x in zip(got, want, strict=True))


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
    # a timeout the process group cannot hold: refused by name, not an OverflowError under
    # torchrun (timeout_minutes = 1e300 passed, then crashed in init_process_group)
    assert DistConfig(timeout_minutes=1e7).timeout_minutes == 1e7
    for bad in (0.0, -1.0, 1e300):
        with pytest.raises(EmberError, match="dist.timeout_minutes must be > 0 and at most"):
            DistConfig(timeout_minutes=bad)


def test_flat_nf4_base_in_dcp_state_dicts():
    """A QLoRA base as FSDP sees it (``Linear4bit.store_flat_``, which ``shard_model`` applies):
    DCP's state-dict API walks it (bitsandbytes' keys are no attributes, one flat Parameter per
    layer is), and a checkpoint's state dict leaves the frozen NF4 bytes out (the two-process
    QLoRA run in test_qlora_train checks the rest end to end)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    model = w.make_model("lora")
    quantize_model_(model, blocksize=32)
    with pytest.raises(AttributeError):
        get_model_state_dict(model)
    flat = [m for m in model.modules() if isinstance(m, Linear4bit)]
    for m in flat:
        m.store_flat_()
    storage = {k for k in model.state_dict() if k.endswith(".base.nf4_storage")}
    assert len(storage) == len(flat) > 0
    assert get_model_state_dict(model).keys() == model.state_dict().keys()
    ckpt = get_model_state_dict(model, options=StateDictOptions(ignore_frozen_params=True))
    assert ckpt and all("lora_" in k for k in ckpt)
    assert model.load_state_dict(ckpt, strict=False).missing_keys
    with pytest.raises(EmberError, match="mixed_precision must be one of"):
        shard_model(model, DistInfo(), mixed_precision="fp8")


def test_ranks_above_zero_build_the_structure_only(tiny, monkeypatch):
    """Under torchrun only rank 0 reads the weights (the others get their shards by broadcast,
    checked end to end by the two-process tests above): a "meta" build reads no tensor."""
    from ember.engine.distributed import build_device
    from ember.models import loading

    assert build_device(DistInfo(device="cpu")) == "cpu"
    assert build_device(DistInfo(rank=0, world_size=2, device="cpu")) == "cpu"
    assert build_device(DistInfo(rank=1, world_size=2, device="cpu")) == "meta"
    full, _ = loading.load_pretrained(tiny["model"], "float32")

    def no_reading(*a, **k):
        raise AssertionError("a meta build read the checkpoint")

    monkeypatch.setattr(loading, "iter_checkpoint", no_reading)
    skeleton, tok = loading.load_pretrained(tiny["model"], "float32", "meta")
    assert tok is not None and all(p.is_meta for p in skeleton.parameters())
    assert {k: (v.shape, v.dtype) for k, v in skeleton.state_dict().items()} == {
        k: (v.shape, v.dtype) for k, v in full.state_dict().items()}
    # QLoRA: the dense structure; rank 0's NF4 layers replace its linears in shard_model
    shell, _ = loading.load_pretrained(tiny["model"], "float32", "meta", quantize="nf4")
    assert shell.state_dict().keys() == skeleton.state_dict().keys()
