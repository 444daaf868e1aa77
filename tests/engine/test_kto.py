"""KTO (``objective = "kto"``) against a float64 transcription of TRL's ``KTOTrainer`` (loss
types "kto" and "apo_zero_unpaired", the KL clamp, the weights, its metrics): the pure loss on
random log-probabilities, and the objective's step on a real batch against TRL's computation
from each document's full logits, with TRL's mismatched (KL) sequences built independently here,
as one micro-batch or two. Also: the data lines (unpaired strings and chat, pairs unpaired, bad
lines), the KL documents (mismatched, no loss, scored without gradients), training runs (LoRA,
full fine-tuning) and an exact resume of a stage started from an SFT adapter."""

from __future__ import annotations

import dataclasses
import json
import random
import shutil
from pathlib import Path

import pytest
import torch

from ember import EmberError
from ember.engine.config import load_config
from ember.engine.config_doc import annotated_toml
from ember.engine.data import IGNORE, DataConfig, collate, load_examples
from ember.engine.distributed import DistInfo
from ember.engine.kto import kl_documents, load_kto_examples
from ember.engine.objectives import make_objective
from ember.engine.preference_losses import kto_loss
from ember.engine.trainer import Trainer, train
from ember.models import Transformer
from ember.models.loading import load_pretrained
from ember.models.lora import LoRAConfig, apply_lora
from tests.engine._tiny import WORDS, away_from_reference, quiet, rows_of, tiny_config, write_jsonl

# --- TRL's KTOTrainer._compute_loss, written out plainly (float64) -------------------------------


def trl_kto(policy, ref, labels, kl_policy, kl_ref, beta, dw, uw, loss_type):
    """(loss, metrics) of one batch: summed completion log-probs of the policy and reference,
    bool labels, and the log-probs of the KL (mismatched) sequences."""
    if loss_type == "kto":
        kl = (kl_policy - kl_ref).mean().clamp(min=0)
    else:
        kl = torch.zeros((), dtype=torch.float64)
    pc, pr = policy[labels], policy[~labels]
    cl, rl = pc - ref[labels], pr - ref[~labels]
    if loss_type == "kto":
        chosen_losses = 1 - torch.sigmoid(beta * (cl - kl))
        rejected_losses = 1 - torch.sigmoid(beta * (kl - rl))
    else:
        chosen_losses = 1 - torch.sigmoid(beta * cl)
        rejected_losses = torch.sigmoid(beta * rl)
    losses = torch.cat((dw * chosen_losses, uw * rejected_losses), 0)
    nc, nr = len(pc), len(pr)
    m = {"kl": float(kl)}
    if nc:
        m |= {"chosen_reward": float((beta * cl).sum() / nc), "chosen_logps": float(pc.sum() / nc)}
    if nr:
        m |= {"rejected_reward": float((beta * rl).sum() / nr),
              "rejected_logps": float(pr.sum() / nr)}
    if nc and nr:
        m["reward_margin"] = m["chosen_reward"] - m["rejected_reward"]
    return losses.nanmean(), m


@pytest.mark.parametrize("loss_type,raw_kl", [("kto", 0.8), ("kto", -0.8),
                                              ("apo_zero_unpaired", 0.8)])
def test_kto_loss_matches_trl(loss_type, raw_kl):
    g = torch.Generator().manual_seed(0)
    n = 11
    policy = -torch.rand(n, generator=g, dtype=torch.float64) * 20
    ref = policy + torch.randn(n, generator=g, dtype=torch.float64)
    labels = torch.rand(n, generator=g) < 0.6
    kl_ref = -torch.rand(n, generator=g, dtype=torch.float64) * 20
    kl_policy = kl_ref + raw_kl + 0.1 * torch.randn(n, generator=g, dtype=torch.float64)
    trl_pol = policy.clone().requires_grad_()
    want, metrics = trl_kto(trl_pol, ref, labels, kl_policy, kl_ref, 0.7, 1.3, 0.6, loss_type)
    want.backward()
    want = want.detach()
    pol = policy.float().requires_grad_()
    out = kto_loss(pol, ref.float(), labels, float((kl_policy - kl_ref).mean()), 0.7, 1.3, 0.6,
                   loss_type)
    torch.testing.assert_close(out.losses.mean().double(), want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.rewards.double(), 0.7 * (policy - ref), rtol=1e-5, atol=1e-5)
    out.losses.mean().backward()  # TRL's gradient (its KL estimate detached)
    torch.testing.assert_close(pol.grad.double(), trl_pol.grad, rtol=1e-5, atol=1e-7)
    assert (pol.grad != 0).all() and not out.rewards.requires_grad


# --- a real batch ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def kto_file(prefs):
    """The ``prefs`` pairs as TRL's unpaired lines, a long completion and a long prompt, and a
    few more desirable lines."""
    rows = _unpair(prefs) + [
        {"prompt": "say red ->", "completion": " red green blue cat dog fish", "label": False},
        {"prompt": "say " + " ".join(WORDS) + " ->", "completion": " red", "label": True}]
    rng = random.Random(1)
    for _ in range(4):
        words = [rng.choice(WORDS) for _ in range(rng.randint(2, 6))]
        rows.append({"prompt": "say " + " ".join(words) + " ->", "completion": " " + words[0],
                     "label": True})
    return write_jsonl(Path(prefs).parent / "kto.jsonl", rows)


def _unpair(path):
    out = []
    for line in Path(path).read_text().splitlines():
        r = json.loads(line)
        out += [{"prompt": r["prompt"], "completion": r["chosen"], "label": True},
                {"prompt": r["prompt"], "completion": r["rejected"], "label": False}]
    return out


def _score(model, seqs):
    """Summed log p of each (prompt ids, completion ids) sequence's completion, full logits."""
    out = []
    for p, c in seqs:
        ids = torch.tensor([p + c])
        logp = torch.log_softmax(model(ids)[0].double(), -1)  # (n, V)
        out.append(sum(logp[t - 1, ids[0, t]] for t in range(len(p), len(p) + len(c))))
    return torch.stack(out)


def _trl_batch(cfg, policy, reference, examples, sizes):
    """TRL's loss and metrics of one batch of these examples: completion_ids after each prompt,
    KL_completion_ids the completions rotated by one within each micro-batch (``sizes``: how
    many examples each has), cut at max_length; the KL estimate their mean."""
    k = cfg.kto
    prompts = [e.input_ids[:e.prompt_len] for e in examples]
    comps = [e.input_ids[e.prompt_len:] for e in examples]
    kl_seqs, a = [], 0
    for n in sizes:
        p, c = prompts[a:a + n], comps[a:a + n]
        for pi, ci in zip(p, [c[-1]] + c[:-1], strict=True):
            kl_seqs.append((pi, ci[:cfg.data.max_seq_len - len(pi)]))
        a += n
    labels = torch.tensor([e.desirable for e in examples])
    seqs = list(zip(prompts, comps, strict=True))
    pol, ref = _score(policy, seqs), _score(reference, seqs)
    kl_pol, kl_ref = _score(policy, kl_seqs), _score(reference, kl_seqs)
    loss, m = trl_kto(pol, ref, labels, kl_pol, kl_ref, k.beta, k.desirable_weight,
                      k.undesirable_weight, k.loss_type)
    return loss, m, float((kl_pol - kl_ref).mean())


KTO_SETS = ('objective="kto"', "kto.beta=0.5", "kto.desirable_weight=1.5",
            "kto.undesirable_weight=0.6")
CASES = {  # (settings, seed of the policy's LoRA B: the sign of the raw KL estimate)
    "kto": (KTO_SETS, 5),
    "kto_kl_clamped": (KTO_SETS, 3),
    "apo_zero_unpaired": (('objective="kto"', 'kto.loss_type="apo_zero_unpaired"',
                           "kto.beta=2.0"), 5),
}


@pytest.mark.parametrize("case", CASES)
def test_objective_matches_trl_on_a_batch(tiny, kto_file, tmp_path, case):
    base, tok = load_pretrained(tiny["model"], "float32")
    examples, _ = load_kto_examples(kto_file, DataConfig(), tok)
    # undesirable (long completion), desirable (long prompt), then 3 lines of the pairs: no two
    # neighbours share a prompt, so the mismatched pairs are TRL's rotation by one (also as two
    # micro-batches of 3 + 2)
    examples = examples[-6:-4] + [examples[0], examples[3], examples[4]]
    prompts = [tuple(e.input_ids[:e.prompt_len]) for e in examples]
    assert all(prompts[i] != prompts[i - 1] for i in range(5))
    n = max(len(e) for e in examples)
    sets, seed = CASES[case]
    cfg = tiny_config(tiny, tmp_path, *sets, f"data.max_seq_len={n}")
    e, f = examples[1], examples[0]
    assert e.prompt_len + len(f) - f.prompt_len > n  # a mismatched document cut at max_seq_len
    obj = make_objective(cfg, DistInfo())
    model, _ = load_pretrained(tiny["model"], "float32")
    torch.manual_seed(seed)
    apply_lora(model, LoRAConfig(rank=4, alpha=8))
    away_from_reference(model)
    obj.check_model(model, None)
    # One micro-batch of the 5 examples, then the same step as two micro-batches (3 + 2): each
    # rotates its own completions, one KL estimate for the step.
    for sizes in ([5], [3, 2]):
        with torch.no_grad():
            want, metrics, raw_kl = _trl_batch(cfg, model, base, examples, sizes)
        # The KL term in play (in "kto"; "apo_zero_unpaired" ignores it), or clamped at 0.
        assert raw_kl < -0.2 and metrics["kl"] == 0 if case == "kto_kl_clamped" else raw_kl > 0.2
        assert metrics["kl"] == (raw_kl if case == "kto" else 0)
        micro = [collate(examples)] if sizes == [5] else [collate(examples[:3]),
                                                         collate(examples[3:])]
        obj.begin_step(micro, lambda xs: xs, model=model, device="cpu")
        if cfg.kto.loss_type == "kto":
            assert obj.kl == pytest.approx(raw_kl, rel=1e-4, abs=1e-5)
        total = sum(obj.loss(model, b, 5) for b in micro)
        torch.testing.assert_close(total.double(), want, rtol=1e-5, atol=1e-5)
        got = obj.step_metrics(lambda xs: xs)
        assert got.keys() == metrics.keys()
        for k, v in metrics.items():
            assert got[k] == pytest.approx(v, rel=1e-4, abs=1e-5), (k, got[k], v)
    total.backward()
    grads = [p.grad for n, p in model.named_parameters() if n.endswith("lora_B")]
    assert all(torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)


def test_kl_documents_are_mismatched_and_carry_no_loss(tiny, kto_file, tmp_path):
    model, tok = load_pretrained(tiny["model"], "float32")
    examples, _ = load_kto_examples(kto_file, DataConfig(), tok)
    ex = examples[:7]  # the halves of pairs 0-2 (neighbours sharing a prompt), then pair 3's

    def prompt(e):
        return e.input_ids[:e.prompt_len]

    # Per micro-batch: TRL's previous example (cyclic), or the nearest earlier one with another
    # prompt: micro-batch 1 holds pairs 0, 1 (c0 r0 c1 r1), micro-batch 2 c2 r2 c3.
    partner = [3, 3, 1, 1, 6, 6, 5]
    micro = [collate(ex[:4]), collate(ex[4:])]
    kl = [kl_documents(b, 64) for b in micro]
    assert [b.num_docs for b in kl] == [4, 3] and all(b.desirable is None for b in kl)
    for k, b in enumerate(kl):
        cu = b.cu_seqlens.tolist()
        for d in range(b.num_docs):
            i = 4 * k + d
            e, f = ex[i], ex[partner[i]]  # prompt i, another example's completion
            assert prompt(e) != prompt(f)  # mismatched
            ids = b.input_ids[0, cu[d]:cu[d + 1]].tolist()
            labels = b.labels[0, cu[d]:cu[d + 1]].tolist()
            assert ids == prompt(e) + f.input_ids[f.prompt_len:]
            assert labels == [IGNORE] * (e.prompt_len - 1) + f.labels[f.prompt_len - 1:]
    # Cut at max_len, the last position predicting nothing.
    short = kl_documents(collate(ex), 9)
    lens = (short.cu_seqlens[1:] - short.cu_seqlens[:-1]).tolist()
    assert max(lens) == 9 and (short.labels[0, short.cu_seqlens[1:].long() - 1] == IGNORE).all()
    # The loss batch is the examples alone: the KL documents add no loss tokens.
    assert sum(b.num_loss_tokens for b in micro) == sum(e.num_loss_tokens for e in ex)
    # A one-document micro-batch has no mismatched pair: scored, not counted.
    obj = make_objective(tiny_config(tiny, tmp_path, 'objective="kto"'), DistInfo())
    apply_lora(model, LoRAConfig(rank=4, alpha=8))
    away_from_reference(model)  # B != 0: the policy is not the reference
    total, n = obj._kl_sums(model, [collate(ex[:1]), collate(ex[1:3])], "cpu", None)
    assert n == 2 and total != 0


def _cfg(tiny, kto_file, run, *extra):
    cfg = tiny_config({**tiny, "train": kto_file, "val": kto_file, "test": kto_file}, run,
                      'objective="kto"', "kto.beta=1.0", "eval.metrics=[]", "optim.lr=1e-2",
                      "optim.warmup_steps=1", "data.max_seq_len=32", "data.tokens_per_batch=96",
                      "eval.max_val_batches=2", *extra)
    return cfg.replace(data=dataclasses.replace(cfg.data, test=None))


def test_kto_trains_desirable_up_with_gradient_only_on_the_examples(
        tiny, kto_file, tmp_path, monkeypatch):
    forwards = []
    hidden = Transformer.hidden_states

    def record(self, ids, *a, **k):
        if self.training:  # evaluations run in eval mode
            forwards.append(torch.is_grad_enabled())
        return hidden(self, ids, *a, **k)

    monkeypatch.setattr(Transformer, "hidden_states", record)
    run = tmp_path / "run"
    t = Trainer(_cfg(tiny, kto_file, run, "max_steps=8", "eval.early_stopping=\"val_loss\"",
                     "eval.every_steps=4", "checkpoint.save_final=false"),
                echo=quiet, progress=False)
    res = t.run()
    # policy = reference at the start: rewards 0, each loss 1 - s(0) = 0.5
    assert res.before["val_loss"] == pytest.approx(0.5, abs=1e-6)
    assert res.before["val_reward_margin"] == pytest.approx(0, abs=1e-6)
    assert res.after["val_reward_margin"] > 0.5 and res.after["val_loss"] < 0.45
    assert res.after["val_chosen_reward"] > res.after["val_rejected_reward"]
    rows = [r for r in rows_of(run) if r["kind"] == "train"]
    assert {"chosen_reward", "rejected_reward", "reward_margin", "kl", "chosen_logps",
            "rejected_logps"} <= set(rows[0])
    assert rows[0]["loss"] == pytest.approx(0.5, abs=1e-6)
    # A training step: policy and reference on the KL documents, then the reference and the
    # policy on the examples; only that last forward keeps gradients.
    assert forwards == [False, False, False, True] * 8
    assert t.objective.frozen_models() == {}


def test_kto_full_finetuning_uses_a_frozen_copy(tiny, kto_file, tmp_path):
    t = Trainer(_cfg(tiny, kto_file, tmp_path / "run", 'method="full"', "optim.lr=1e-3",
                     "max_steps=2", "checkpoint.save_final=false"), echo=quiet, progress=False)
    res = t.run()
    assert set(t.objective.frozen_models()) == {"reference"}
    assert res.before["val_reward_margin"] == pytest.approx(0, abs=1e-6)
    assert res.after["val_reward_margin"] > 0


def test_kto_stage_after_sft_resumes_exactly(tiny, kto_file, tmp_path):
    """After ``model.init`` the reference is the SFT adapter (rewards 0 at the start), and a run
    stopped and resumed logs what an uninterrupted one does."""
    sft = tmp_path / "sft"
    train(tiny_config(tiny, sft, "max_steps=2", "optim.lr=1e-2", "eval.metrics=[]",
                      "eval.val_loss=false", f'data.train=["{tiny["small"]}"]'),
          echo=quiet, progress=False)
    extra = ("max_steps=2", "checkpoint.every_steps=1", "eval.every_steps=1",
             "eval.max_val_batches=1", f'model.init="{sft}"', "checkpoint.save_final=false")
    res = train(_cfg(tiny, kto_file, tmp_path / "a", *extra), echo=quiet, progress=False)
    assert res.before["val_chosen_reward"] == pytest.approx(0, abs=1e-6)
    cfg_b = _cfg(tiny, kto_file, tmp_path / "b", *extra)
    train(cfg_b, echo=quiet, progress=False, stop_after=1)
    train(cfg_b, resume=True, echo=quiet, progress=False)
    assert rows_of(tmp_path / "a", timing=False) == rows_of(tmp_path / "b", timing=False)


# --- data -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chat_tok(tiny, tmp_path_factory):
    model = tmp_path_factory.mktemp("chat") / "model"
    shutil.copytree(tiny["model"], model)
    (model / "chat_template.jinja").write_text(
        "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}<eos>{% endfor %}"
        "{% if add_generation_prompt %}[assistant]{% endif %}")
    return load_pretrained(str(model), "float32")[1]


def test_val_fraction_keeps_both_halves_of_a_pair_on_one_side(prefs, chat_tok):
    """A preference pair unpaired for KTO is two examples of one line: data.val_fraction puts
    both in training or both in validation (each half went its own way: the same prompt and
    answers trained on and validated on)."""
    from ember.engine.data import load_datasets

    cfg = DataConfig(train=(prefs,), val_fraction=0.5, seed=0)
    ds = load_datasets(cfg, chat_tok, load_kto_examples)
    lines = lambda split: {e.source for e in split}  # noqa: E731
    n = sum(1 for line in open(prefs) if line.strip())
    assert len(ds.train) + len(ds.validation) == 2 * n and ds.validation
    assert lines(ds.train).isdisjoint(lines(ds.validation))
    assert len(lines(ds.validation)) == round(n / 2)
    for split in (ds.train, ds.validation):  # every line's chosen and rejected halves
        assert sum(e.desirable for e in split) * 2 == len(split)


def _msg(role, content):
    return {"role": role, "content": content}


def test_kto_lines_strings_chat_and_pairs(tmp_path, chat_tok):
    q = "say red blue ->"
    rows = [{"prompt": q, "completion": " red", "label": True},
            {"prompt": [_msg("user", q)], "completion": [_msg("assistant", " blue")],
             "label": False},
            {"prompt": [_msg("user", q)], "chosen": [_msg("assistant", " red")],
             "rejected": [_msg("assistant", " blue")]},
            {"chosen": [_msg("user", q), _msg("assistant", " red")],
             "rejected": [_msg("user", q), _msg("assistant", " blue")]}]
    path = write_jsonl(tmp_path / "k.jsonl", rows)
    examples, rep = load_kto_examples(path, DataConfig(), chat_tok)
    assert [e.desirable for e in examples] == [True, False, True, False, True, False]
    assert [e.source.rsplit(":", 1)[1] for e in examples] == ["1", "2", "3", "3", "4", "4"]
    assert rep.format == "kto: 3 desirable, 3 undesirable"
    # The string line is rendered like a prompt/completion line, loss on the completion only.
    sft, _ = load_examples(write_jsonl(tmp_path / "s.jsonl", [{"prompt": q, "completion": " red"}]),
                           DataConfig(), chat_tok)
    assert examples[0].input_ids == sft[0].input_ids and examples[0].labels == sft[0].labels
    # Chat unpaired == chat pair halves (explicit and implicit prompt): the same documents.
    assert examples[1].input_ids == examples[3].input_ids == examples[5].input_ids
    assert examples[2].input_ids == examples[4].input_ids
    assert examples[0].input_ids == examples[2].input_ids  # a string pair renders as chat too
    e = examples[1]
    target = [t for t in e.labels if t != IGNORE]
    assert chat_tok.decode(target, skip_special_tokens=False).endswith(" blue<eos>")
    assert e.reference is None and examples[0].reference == " red"  # generation: desirable only
    assert len({x.key for x in examples}) == 6


def test_kto_labels_1_and_0_are_read_as_trl_casts_them(tmp_path, chat_tok):
    """An int label column (pandas / ``datasets`` write 1 / 0) was refused ("must be true or
    false"); TRL's KTO trainer casts the labels with ``torch.as_tensor(..., dtype=torch.bool)``."""
    labels = [1, 0, 0, 1]
    rows = [{"prompt": f"say {w} ->", "completion": f" {w}", "label": v}
            for w, v in zip(WORDS, labels, strict=False)]
    want = torch.as_tensor(labels, dtype=torch.bool).tolist()  # TRL's KTOTrainer cast
    csv_path = tmp_path / "k.csv"
    csv_path.write_text("prompt,completion,label\n"
                        + "".join(f"{r['prompt']},{r['completion']},{r['label']}\n" for r in rows))
    for path in (write_jsonl(tmp_path / "k.jsonl", rows), csv_path):
        examples, rep = load_kto_examples(path, DataConfig(bad_lines="error"), chat_tok)
        assert [e.desirable for e in examples] == want and rep.bad_lines == 0
    bools = write_jsonl(tmp_path / "b.jsonl", [dict(r, label=bool(r["label"])) for r in rows])
    assert [e.input_ids for e in load_kto_examples(bools, DataConfig(), chat_tok)[0]] == \
        [e.input_ids for e in examples]


BAD = [
    ({"prompt": "a", "completion": "b"}, "missing field 'label'"),
    ({"prompt": "a", "completion": "b", "label": "yes"},
     "field 'label' must be true \\(desirable\\) or false, got string 'yes'"),
    ({"prompt": "a", "completion": "b", "label": 2},
     r"field 'label' must be true \(desirable\) or false, got number 2 \(1 / 0 read as"),
    ({"prompt": "a", "completion": "b", "label": 0.5}, "field 'label' must be true"),
    ({"prompt": "a", "completion": " ", "label": True}, "empty completion"),
    ({"prompt": "", "completion": "b", "label": True}, "empty prompt"),
    ({"completion": "b", "label": True}, "missing field 'prompt'"),
    ({"prompt": "a", "completion": [_msg("assistant", "b")], "label": True},
     "prompt and completion must be both strings or both message arrays"),
    ({"prompt": [_msg("user", "a")], "completion": [_msg("user", "b")], "label": True},
     "completion must be exactly one assistant message"),
    ({"prompt": [_msg("user", "a")], "completion": [], "label": False},
     "field 'completion' must be a non-empty array"),
    ({"prompt": "a", "chosen": "b", "rejected": "c", "label": True},
     r"a KTO line is either \{prompt, completion, label\} or a pair"),
    ({"prompt": "a", "chosen": "b", "rejected": "b"}, "chosen and rejected are identical"),
    ([1, 2], "expected a JSON object, got array"),
]


@pytest.mark.parametrize("row,why", BAD)
def test_bad_kto_lines_name_file_line_and_reason(tmp_path, chat_tok, row, why):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "q", "completion": "y", "label": True},
                                                row])
    with pytest.raises(EmberError, match=rf"bad.jsonl:2: {why}"):
        load_kto_examples(path, DataConfig(bad_lines="error"), chat_tok)
    examples, rep = load_kto_examples(path, DataConfig(), chat_tok)  # "skip": counted, quoted
    assert len(examples) == 1 and rep.bad_lines == 1 and "bad.jsonl:2: " in rep.problems[0]


def test_kto_lines_elsewhere_and_bad_configs(tiny, kto_file, tmp_path):
    _, tok = load_pretrained(tiny["model"], "float32")
    with pytest.raises(EmberError, match=r"kto\.jsonl:1: a KTO line .*objective = \"kto\""):
        load_examples(kto_file, DataConfig(bad_lines="error"), tok)
    with pytest.raises(EmberError, match=r"val\.jsonl:1: missing field 'label' \(KTO lines"):
        train(_cfg(tiny, kto_file, tmp_path / "x", f'data.validation="{tiny["val"]}"'),
              echo=quiet, progress=False)
    for sets, match in [(["kto.beta=0"], r"kto\.beta must be > 0"),
                        (["kto.desirable_weight=-1"], r"kto\.desirable_weight must be >= 0"),
                        (["kto.desirable_weight=0", "kto.undesirable_weight=0"], "both 0"),
                        (['kto.loss_type="bco_pair"'], r"kto\.loss_type must be one of"),
                        (['objective="kto"', 'method="prompt"'], "is not supported"),
                        (["kto.label_smoothing=0.1"], "unknown config key 'kto.label_smoothing'")]:
        with pytest.raises(EmberError, match=match):
            load_config(None, sets)
    with pytest.raises(EmberError, match=r"data\.tokens_per_batch \(96\) must hold at least two"):
        make_objective(_cfg(tiny, kto_file, tmp_path / "y", "data.max_seq_len=64"), DistInfo())
    with pytest.raises(EmberError, match=r"data\.loss_on = \"completion\""):
        make_objective(_cfg(tiny, kto_file, tmp_path / "z", 'data.loss_on="all"'), DistInfo())
    cfg = load_config(None, ['objective="kto"', 'kto.loss_type="apo_zero_unpaired"'])
    assert cfg.kto.beta == 0.1 and cfg.kto.desirable_weight == cfg.kto.undesirable_weight == 1.0
    doc = annotated_toml(cfg)  # ember config: every key with its comment
    for key in ("beta = 0.1  # ", "desirable_weight = 1.0  # ", "undesirable_weight = 1.0  # ",
                'loss_type = "apo_zero_unpaired"  # '):
        assert f"\n{key}" in doc.split("\n[kto]")[1].split("\n\n")[0], key


@pytest.mark.parametrize("kind", ["plain", "kto"])
def test_kto_test_split_takes_sft_lines_or_kto_lines(tiny, kto_file, tmp_path, kind):
    """The test split only feeds generation metrics: an SFT test file (prompt/completion) is read
    as any run reads it (it was refused: "missing field 'label'"), a KTO file gives its
    desirable completions as the references."""
    test = tiny["test"] if kind == "plain" else kto_file
    cfg = _cfg(tiny, kto_file, tmp_path / "run", "max_steps=1", 'eval.metrics=["exact_match"]',
               "eval.before=false", "checkpoint.save_final=false")
    cfg = cfg.replace(data=dataclasses.replace(cfg.data, test=test))
    t = Trainer(cfg, echo=quiet, progress=False)
    res = t.run()
    assert "exact_match" in res.after
    rows = [json.loads(line) for line in Path(test).read_text().splitlines()]
    want = [r["completion"] for r in rows if r.get("label", True)]
    got = [e.reference for e in t.datasets.test if e.reference is not None]
    assert got == want


def test_ember_eval_on_a_kto_run_takes_sft_lines_as_the_test_split_does(
        tiny, kto_file, tmp_path, capsys):
    """``ember eval RUN --data`` reads a plain prompt/completion file as the run's ``data.test``
    does (it was refused: "missing field 'label'"): loss and perplexity, and with --metrics
    generation metrics, the references its completions; a KTO file still gives the run's
    validation scores."""
    from ember.engine.cli import main

    run = tmp_path / "run"
    train(_cfg(tiny, kto_file, run, "max_steps=1", "eval.before=false"), echo=quiet,
          progress=False)
    capsys.readouterr()
    assert main(["eval", str(run), "--data", tiny["test"], "--max-new-tokens", "2"]) == 0
    out = json.loads(capsys.readouterr().out)
    # the run has eval.metrics = []: loss and perplexity, no generation (test_cli has the rule)
    assert out["examples"] == 8 and set(out) == {"data", "examples", "loss", "perplexity"}
    assert main(["eval", str(run), "--data", tiny["test"], "--metrics", "f1",
                 "--max-new-tokens", "2"]) == 0
    assert "f1" in json.loads(capsys.readouterr().out)
    assert main(["eval", str(run), "--data", kto_file, "--max-examples", "3"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert "val_reward_margin" in out and out["examples"] == 3
