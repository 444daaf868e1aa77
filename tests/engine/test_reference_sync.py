"""TR-DPO (``dpo.sync_ref_model``, ``engine/reference_sync.py``) against TRL 1.16's rule:
``SyncRefModelCallback._sync_target_model`` (trl/trainer/callbacks.py) runs, at ``on_step_end``
when ``global_step % ref_model_sync_steps == 0``,
``target_param.data.mul_(1.0 - alpha).add_(copy_param.data, alpha=alpha)`` over every parameter.
A tiny full fine-tune's reference after its steps must equal that recurrence applied by hand to
the policy's checkpointed weights at the sync steps, bit for bit; the DPO loss then scores with
the mixed reference; a resume continues it exactly, and a checkpoint without it is refused."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from ember import EmberError
from ember.engine import dcp
from ember.engine.config import load_config
from ember.engine.data import DataConfig, collate, load_examples
from ember.engine.kto import kl_documents
from ember.engine.losses import doc_logprobs
from ember.engine.trainer import Trainer
from ember.models.loading import load_pretrained
from tests.engine._tiny import checkpoint_weights, quiet, rows_of, tiny_config

ALPHA, EVERY = 0.6, 2
SYNC = (
    'method="full"',
    'objective="dpo"',
    "dpo.beta=0.5",
    "dpo.sync_ref_model=true",
    f"dpo.ref_model_mixup_alpha={ALPHA}",
    f"dpo.ref_model_sync_steps={EVERY}",
    "max_steps=4",
    "grad_accum=2",  # one step is one optimizer step, whatever the accumulation
    "optim.lr=1e-2",
    "optim.warmup_steps=0",
    "eval.metrics=[]",
    "eval.val_loss=false",
    "checkpoint.every_steps=1",
    "checkpoint.save_final=false",
    "data.max_seq_len=32",
    "data.tokens_per_batch=64",
)


def _cfg(tiny, prefs, run_dir, *extra):
    return tiny_config(dict(tiny, train=prefs, val=prefs, test=prefs), run_dir, *SYNC, *extra)


def _run(cfg, **kw) -> Trainer:
    t = Trainer(cfg, echo=quiet, progress=False, **kw)
    t.run()
    return t


def test_tr_dpo_reference_follows_trl_recurrence_and_resumes(tiny, prefs, tmp_path):
    run = tmp_path / "run"
    t = _run(_cfg(tiny, prefs, run))
    ref = dict(t.objective.ref_model.named_parameters())
    start, tok = load_pretrained(tiny["model"], "float32")
    want = {n: p.detach().clone() for n, p in start.named_parameters()}
    final = {n: p.detach() for n, p in t.model.named_parameters()}  # step 4: the last
    for step in range(EVERY, 5, EVERY):  # TRL's on_step_end at global_step % sync_steps == 0
        policy = checkpoint_weights(run, tmp_path, step) if step < 4 else final
        for n, q in want.items():
            q.mul_(1.0 - ALPHA).add_(policy[n], alpha=ALPHA)
    assert set(ref) == set(want)
    for n, q in want.items():
        assert torch.equal(ref[n].detach(), q), n
    moved = [n for n in want if not torch.equal(want[n], dict(start.named_parameters())[n])]
    assert moved  # the policy trained: the reference is no longer the start
    # The DPO objective scores with the mixed reference: its log-probs are those of a model
    # holding the recurrence's weights
    with torch.no_grad():
        for n, p in start.named_parameters():
            p.copy_(want[n])
    batch = collate(load_examples(prefs, DataConfig(max_seq_len=32), tok)[0][:3])
    got = t.objective.ref_logprobs(t.model, batch).sums
    torch.testing.assert_close(got, doc_logprobs(start.eval(), batch).sums, rtol=0, atol=0)

    # stopped after step 3 (its checkpoint holds step 2's mix), then resumed: the same run
    part = tmp_path / "part"
    _run(_cfg(tiny, prefs, part), stop_after=3)
    broken = tmp_path / "broken"
    shutil.copytree(part, broken)
    resumed = _run(_cfg(tiny, prefs, part), resume=True)
    for n, p in resumed.objective.ref_model.named_parameters():
        assert torch.equal(p, ref[n]), n
    assert rows_of(part, timing=False) == rows_of(run, timing=False)

    # the reference is part of the checkpoint's one atomic save: its manifest lists the files
    step3 = dcp.step_dir(dcp.checkpoint_root(broken), 3)
    manifest = json.loads((step3 / dcp.MANIFEST).read_text())
    assert "reference/.metadata" in manifest["files"]
    assert not (step3 / "reference" / dcp.MANIFEST).exists()  # the outer one covers it
    # a damaged reference (its .metadata gone) is skipped like any damaged file: the resume
    # falls back to step 2 and ends with the same reference
    damaged = tmp_path / "damaged"
    shutil.copytree(broken, damaged)
    (dcp.step_dir(dcp.checkpoint_root(damaged), 3) / "reference" / ".metadata").unlink()
    again = _run(_cfg(tiny, prefs, damaged), resume=True)
    for n, p in again.objective.ref_model.named_parameters():
        assert torch.equal(p, ref[n]), n
    # a checkpoint holding no reference (written without sync_ref_model): refused, not restarted
    shutil.rmtree(step3 / "reference")
    manifest["files"] = {
        k: v for k, v in manifest["files"].items() if not k.startswith("reference/")
    }
    (step3 / dcp.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(
        EmberError,
        match=r"step_0+3: dpo\.sync_ref_model makes the reference "
        r"training state .* reference/ is missing",
    ):
        _run(_cfg(tiny, prefs, broken), resume=True)


def test_tr_dpo_settings_are_checked():
    with pytest.raises(
        EmberError,
        match=r"dpo\.sync_ref_model with "
        r"dpo\.precompute_ref_log_probs: .*stale",
    ):
        load_config(
            None,
            ['objective="dpo"', "dpo.sync_ref_model=true", "dpo.precompute_ref_log_probs=true"],
        )
    with pytest.raises(EmberError, match=r"kto\.sync_ref_model with kto\.precompute"):
        load_config(
            None,
            ['objective="kto"', "kto.sync_ref_model=true", "kto.precompute_ref_log_probs=true"],
        )
    with pytest.raises(EmberError, match=r"dpo\.ref_model_mixup_alpha must be in \[0, 1\]"):
        load_config(None, ['objective="dpo"', "dpo.ref_model_mixup_alpha=1.5"])
    with pytest.raises(EmberError, match=r"dpo\.ref_model_sync_steps must be an integer >= 1"):
        load_config(None, ['objective="dpo"', "dpo.ref_model_sync_steps=0"])
    for objective in ("dpo", "kto"):  # at load time, before open_run makes a run folder
        with pytest.raises(
            EmberError,
            match=rf"{objective}\.sync_ref_model needs method = "
            r'"full" .*not mixing their product B @ A',
        ):
            load_config(None, [f'objective="{objective}"', f"{objective}.sync_ref_model=true"])


def test_kto_hard_sync_copies_the_policy(tiny, prefs, tmp_path):
    """KTO shares the reference: ``kto.ref_model_mixup_alpha = 1`` is a hard copy, so after a
    sync at the last step the reference is the trained policy, bit for bit."""
    cfg = tiny_config(
        dict(tiny, train=prefs, val=prefs, test=prefs),
        tmp_path / "kto",
        'method="full"',
        'objective="kto"',
        "kto.sync_ref_model=true",
        "kto.ref_model_mixup_alpha=1.0",
        "kto.ref_model_sync_steps=1",
        *SYNC[6:],  # the steps, data and checkpoint settings above
    )
    t = _run(cfg)
    policy = dict(t.model.named_parameters())
    start, _ = load_pretrained(tiny["model"], "float32")
    for n, q in t.objective.ref_model.named_parameters():
        assert torch.equal(q, policy[n].detach()), n
    assert not all(torch.equal(p, policy[n]) for n, p in start.named_parameters())


def test_tr_dpo_mixes_in_the_policys_dtype_under_bf16(tiny, prefs, tmp_path):
    """Under precision bf16 a full fine-tune's policy keeps fp32 masters, and TRL builds the
    reference in the policy's dtype: the mix must be the fp32 recurrence, not a bf16 one that
    drops every update below half a bf16 step (at a small alpha and lr: most of them)."""
    alpha = 0.05
    run = tmp_path / "bf16"
    cfg = _cfg(
        tiny,
        prefs,
        run,
        'precision="bf16"',
        f"dpo.ref_model_mixup_alpha={alpha}",
        "dpo.ref_model_sync_steps=1",
        "max_steps=2",
        "optim.lr=1e-4",
    )
    t = _run(cfg)
    ref = dict(t.objective.ref_model.named_parameters())
    start, _ = load_pretrained(tiny["model"], "float32")
    want = {n: p.detach().clone() for n, p in start.named_parameters()}
    final = {n: p.detach() for n, p in t.model.named_parameters()}
    for step in (1, 2):
        policy = checkpoint_weights(run, tmp_path, step) if step < 2 else final
        assert all(p.dtype == torch.float32 for p in policy.values())
        for n, q in want.items():
            q.mul_(1.0 - alpha).add_(policy[n], alpha=alpha)
    for n, q in want.items():
        assert ref[n].dtype == torch.float32, n
        assert torch.equal(ref[n].detach(), q), n


def test_sync_counts_a_skipped_step(tiny, prefs, tmp_path, monkeypatch):
    """TRL syncs at ``on_step_end`` when ``global_step % ref_model_sync_steps == 0``, and
    ``global_step`` counts a skipped optimizer step too: step 1 skipped (an inf gradient), the
    sync of step 2 still happens, mixing in the policy of its one applied update."""
    import math

    from ember.engine import trainer as tr

    real_step = tr.Trainer._step

    def step(self, micro, n, *args, **kw):  # step 1's backward gives inf gradients
        if not getattr(self, "_inf_hooked", False):
            self._inf_hooked = True
            p = next(p for p in self.model.parameters() if p.requires_grad)
            p.register_hook(lambda g: torch.full_like(g, math.inf) if self._now == 1 else g)
        self._now = n
        return real_step(self, micro, n, *args, **kw)

    monkeypatch.setattr(tr.Trainer, "_step", step)
    cfg = _cfg(tiny, prefs, tmp_path / "skip", "max_steps=2", "checkpoint.every_steps=0")
    t = _run(cfg)
    rows = [r for r in rows_of(tmp_path / "skip") if r["kind"] == "train"]
    assert [r.get("skipped", False) for r in rows] == [True, False]
    start, _ = load_pretrained(tiny["model"], "float32")
    policy = dict(t.model.named_parameters())
    ref = dict(t.objective.ref_model.named_parameters())
    for n, p in start.named_parameters():
        want = p.detach().clone().mul_(1.0 - ALPHA).add_(policy[n].detach(), alpha=ALPHA)
        assert torch.equal(ref[n], want), n
    assert not all(torch.equal(p, policy[n]) for n, p in start.named_parameters())


def test_kto_kl_term_reads_the_mixed_reference(tiny, prefs, tmp_path):
    """KTO's KL estimate (the mismatched documents' policy - reference log-probs) is scored
    with the mixed reference, at an alpha other than 1: a model holding the recurrence's
    weights gives the same estimate."""
    alpha = 0.5
    run = tmp_path / "kto"
    cfg = tiny_config(
        dict(tiny, train=prefs, val=prefs, test=prefs),
        run,
        'method="full"',
        'objective="kto"',
        "kto.sync_ref_model=true",
        f"kto.ref_model_mixup_alpha={alpha}",
        "kto.ref_model_sync_steps=1",
        *SYNC[6:],
        "max_steps=2",
    )
    t = _run(cfg)
    start, tok = load_pretrained(tiny["model"], "float32")
    want = {n: p.detach().clone() for n, p in start.named_parameters()}
    final = {n: p.detach() for n, p in t.model.named_parameters()}
    for step in (1, 2):
        policy = checkpoint_weights(run, tmp_path, step) if step < 2 else final
        for n, q in want.items():
            q.mul_(1.0 - alpha).add_(policy[n], alpha=alpha)
    with torch.no_grad():
        for n, p in start.named_parameters():
            p.copy_(want[n])
    obj = t.objective
    batch = collate(obj.load_datasets(cfg.data, tok).train[:4])
    total, n = obj._kl_sums(t.model, [batch], "cpu", None)
    kl = kl_documents(batch, obj.max_len)
    with torch.no_grad():
        diff = doc_logprobs(t.model, kl).sums - doc_logprobs(start.eval(), kl).sums
    assert n == kl.num_docs > 1
    assert total == pytest.approx(float(diff.sum()), rel=1e-6, abs=1e-6)
    unmixed, _ = load_pretrained(tiny["model"], "float32")
    for other in (unmixed.eval(), t.model):  # the starting reference, a hard copy: not these
        with torch.no_grad():
            far = doc_logprobs(t.model, kl).sums - doc_logprobs(other, kl).sums
        assert abs(total - float(far.sum())) > 1e-3
