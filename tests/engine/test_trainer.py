"""The training loop on a tiny random model: it learns, LoRA trains only adapters, accumulation is
token-weighted, resume is exact, losses (SFT / distillation / DPO) match their definitions."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch

from ember import EmberError
from ember.engine import checkpoint as ckpt
from ember.engine.config import load_config, to_toml
from ember.engine.data import DataConfig, PackedBatches, collate, load_examples
from ember.engine.losses import (
    adapters_disabled,
    dpo_loss,
    kl_div_from_logits,
    sequence_logprobs,
    sft_loss,
)
from ember.engine.trainer import Trainer, lr_factor, resolve, train
from ember.models.lora import LoRAConfig, apply_lora

WORDS = ["red", "green", "blue", "cat", "dog", "fish", "one", "two", "three", "sun", "moon"]


def tiny_rows(n: int, seed: int = 0) -> list[dict]:
    """Prompt/completion pairs of varied lengths: the answer is the prompt's first 1-3 words."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(2, 9))]
        answer = " ".join(words[:1 + len(words) % 3])
        rows.append({"prompt": "say " + " ".join(words) + " ->", "completion": " " + answer})
    return rows


def make_tiny_model(folder: Path, seed: int = 0) -> Path:
    """An HF folder with a random 2-layer Llama and a small byte-level BPE tokenizer."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers, trainers

    from ember.models.config import ModelConfig
    from ember.models.loading import save_pretrained
    from ember.models.tokenizer import Tokenizer
    from ember.models.transformer import Transformer

    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    texts = [r["prompt"] + r["completion"] for r in tiny_rows(200)]
    backend.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<pad>", "<eos>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = Tokenizer(backend, eos_token="<eos>", pad_token="<pad>")
    cfg = ModelConfig(vocab_size=backend.get_vocab_size(), hidden_size=64, intermediate_size=96,
                      num_layers=2, num_heads=4, num_kv_heads=2, tie_word_embeddings=True,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      max_position_embeddings=256)
    torch.manual_seed(seed)
    model = Transformer(cfg).init_weights(std=0.05, seed=seed)
    save_pretrained(model, folder, tok)
    return folder


def write_jsonl(path: Path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    model = make_tiny_model(root / "model")
    return {"model": str(model),
            "train": write_jsonl(root / "train.jsonl", tiny_rows(48, seed=1)),
            "small": write_jsonl(root / "small.jsonl", tiny_rows(8, seed=1)),
            "val": write_jsonl(root / "val.jsonl", tiny_rows(8, seed=2)),
            "test": write_jsonl(root / "test.jsonl", tiny_rows(8, seed=3))}


def tiny_config(tiny, run_dir, *extra: str):
    sets = [f'model.name="{tiny["model"]}"', f'run_dir="{run_dir}"', 'device="cpu"',
            'precision="fp32"', f'data.train=["{tiny["train"]}"]',
            f'data.validation="{tiny["val"]}"', f'data.test="{tiny["test"]}"',
            "data.max_seq_len=64", "data.tokens_per_batch=128",
            "eval.max_new_tokens=4", "eval.show=0", "plot=false", "lora.rank=4", "lora.alpha=8",
            *extra]
    return load_config(None, sets)


def rows_of(run_dir) -> list[dict]:
    return [json.loads(r) for r in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def quiet(*_a, **_k):
    pass


def test_tiny_model_overfits(tiny, tmp_path):
    # 8 examples seen ~20 times: memorized. Validation = the training file (overfitting is the
    # point); exact match counts on the same 8 prompts.
    small = tiny["small"]
    cfg = tiny_config(tiny, tmp_path / "run", 'method="full"', "max_steps=30", "optim.lr=3e-3",
                      "optim.warmup_steps=2", "eval.metrics=['exact_match']",
                      f'data.train=["{small}"]', f'data.validation="{small}"',
                      f'data.test="{small}"')
    res = train(cfg, echo=quiet, progress=False)
    losses = [r["loss"] for r in rows_of(tmp_path / "run") if r["kind"] == "train"]
    assert len(losses) == 30
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < first / 5, (first, last)
    assert res.after["val_loss"] < res.before["val_loss"] / 5
    assert res.before["exact_match"] == 0 and res.after["exact_match"] >= 0.75
    assert (tmp_path / "run" / "final" / "model" / "config.json").is_file()


def test_lora_trains_only_adapters(tiny, tmp_path):
    from ember.models.loading import load_pretrained

    cfg = resolve(tiny_config(tiny, tmp_path / "run", "max_steps=4", "optim.lr=1e-2",
                              "eval.metrics=[]"))
    t = Trainer(cfg, echo=quiet, progress=False)
    t.run()
    base, _ = load_pretrained(tiny["model"], "float32")
    trained = dict(t.model.named_parameters())
    for name, p in base.named_parameters():
        key = name.replace(".weight", ".base.weight") if name.endswith("proj.weight") else name
        assert torch.equal(trained[key], p), name  # bit-identical base
        assert not trained[key].requires_grad
    adapters = {n: p for n, p in trained.items() if "lora_" in n}
    assert len(adapters) == 2 * 7 * 2 and all(p.requires_grad for p in adapters.values())
    assert all(p.abs().sum() > 0 for n, p in adapters.items() if n.endswith("lora_B"))
    assert (tmp_path / "run" / "final" / "adapter" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "run" / "config.toml").read_text() == to_toml(cfg)
    saved = ckpt.load_latest(tmp_path / "run")[0]
    assert set(saved["model"]) == set(adapters)  # checkpoints hold the adapters only


def _micro_grads(model, batches, n_loss):
    model.zero_grad(set_to_none=True)
    total = 0.0
    for b in batches:
        loss = sft_loss(model, b, n_loss)
        loss.backward()
        total += float(loss.detach())
    return total, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_grad_accumulation_is_token_weighted(tiny):
    from ember.models.loading import load_pretrained

    model, tok = load_pretrained(tiny["model"], "float32")
    apply_lora(model, LoRAConfig(rank=4, alpha=8))
    with torch.no_grad():  # nonzero B so every adapter gets a gradient
        for n, p in model.named_parameters():
            if n.endswith("lora_B"):
                p.normal_(0, 0.02)
    examples, _ = load_examples(tiny["train"], DataConfig(), tok)
    four = examples[:4]
    assert len({e.num_loss_tokens for e in four}) > 1 and len({len(e) for e in four}) > 1
    n_loss = sum(e.num_loss_tokens for e in four)
    one_loss, one = _micro_grads(model, [collate(four)], n_loss)
    acc_loss, acc = _micro_grads(model, [collate([e]) for e in four], n_loss)
    assert abs(one_loss - acc_loss) < 1e-5 * abs(one_loss)
    assert one.keys() == acc.keys() and len(one) == 2 * 7 * 2
    for k in one:
        torch.testing.assert_close(acc[k], one[k], rtol=1e-4, atol=1e-6)
    # The per-micro-batch mean (the peers' bug) would weight short examples more: not equal.
    with torch.no_grad():
        wrong = sum(float(sft_loss(model, collate([e]), e.num_loss_tokens)) for e in four) / 4
    assert abs(wrong - one_loss) > 1e-3


def test_stop_resume_equals_uninterrupted_run(tiny, tmp_path):
    extra = ("max_steps=6", "checkpoint.every_steps=2", "eval.every_steps=3", "lora.dropout=0.1",
             "data.tokens_per_batch=96", "grad_accum=2", "eval.metrics=[]")
    train(tiny_config(tiny, tmp_path / "a", *extra), echo=quiet, progress=False)
    cfg_b = tiny_config(tiny, tmp_path / "b", *extra)
    stopped = train(cfg_b, echo=quiet, progress=False, stop_after=4)
    assert stopped.steps == 4 and ckpt.list_checkpoints(tmp_path / "b")
    with pytest.raises(EmberError, match="--resume"):
        train(cfg_b, echo=quiet, progress=False)
    with (tmp_path / "b" / "metrics.jsonl").open("a") as f:  # rows a crash left past the ckpt
        f.write(json.dumps({"kind": "train", "step": 5, "loss": 123.0}) + "\n")
    train(cfg_b, resume=True, echo=quiet, progress=False)
    a, b = rows_of(tmp_path / "a"), rows_of(tmp_path / "b")
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("seconds", "tokens_per_s")}
                          for r in rows]
    assert strip(a) == strip(b)
    assert [r["step"] for r in a if r["kind"] == "eval"] == [0, 3, 6]
    wa = ckpt.load_latest(tmp_path / "a")[0]["model"]
    wb = ckpt.load_latest(tmp_path / "b")[0]["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    # A changed training setting cannot be resumed silently.
    with pytest.raises(EmberError, match="optim"):
        train(tiny_config(tiny, tmp_path / "b", *extra, "optim.lr=0.5"), resume=True,
              echo=quiet, progress=False)


def test_full_finetuning_with_frozen_parts(tiny, tmp_path):
    cfg = tiny_config(tiny, tmp_path / "full", 'method="full"', "max_steps=1",
                      'freeze=["embed.*"]', "train_layers=[-1]", "eval.metrics=[]",
                      "eval.val_loss=false", "checkpoint.save_final=false")
    t = Trainer(cfg, echo=quiet, progress=False)
    t.run()
    trainable = sorted(n for n, p in t.model.named_parameters() if p.requires_grad)
    assert trainable and all(n.startswith("layers.1.") for n in trainable)
    with pytest.raises(EmberError, match="matches no parameter"):
        Trainer(tiny_config(tiny, tmp_path / "f2", 'method="full"', 'freeze=["nope.*"]'),
                echo=quiet, progress=False).run()


def test_early_stopping(tiny, tmp_path):
    # lr so small that the validation loss cannot improve on the base model's by min_delta:
    # stops after `patience` evaluations without improvement.
    cfg = tiny_config(tiny, tmp_path / "es", "max_steps=20", "optim.lr=1e-9",
                      "eval.every_steps=2", 'eval.early_stopping="val_loss"', "eval.patience=2",
                      "eval.min_delta=0.1", "eval.metrics=[]")
    res = train(cfg, echo=quiet, progress=False)
    assert res.stopped_early and res.steps == 4


def test_lr_schedule():
    f = [lr_factor(s, 10, 2, "cosine", 0.1) for s in range(10)]
    assert f[0] == 0.5 and f[1] == 1.0 and f[2] == 1.0
    assert all(a >= b for a, b in zip(f[1:], f[2:], strict=False))
    assert math.isclose(lr_factor(10, 10, 2, "cosine", 0.1), 0.1)
    assert math.isclose(lr_factor(6, 10, 2, "linear", 0.0), 0.5)
    assert lr_factor(9, 10, 2, "constant", 0.0) == 1.0


def test_checkpoint_atomic_and_pruned(tmp_path):
    state = {"model": {"w": torch.randn(3, 4)}, "trainer": {"step": 1}, "config": "x = 1\n",
             "optimizer": {"state": {0: {"exp_avg": torch.ones(2)}}, "param_groups": []}}
    for step in (1, 2, 3):
        ckpt.save({**state, "trainer": {"step": step}}, tmp_path, step, keep_last=2)
    names = [p.name for p in ckpt.list_checkpoints(tmp_path)]
    assert names == ["step_00000002", "step_00000003"]
    # A half-written checkpoint (no manifest / truncated file) is never picked up.
    (tmp_path / "checkpoints" / "step_00000009").mkdir()
    bad = tmp_path / "checkpoints" / "step_00000003" / "model.safetensors"
    bad.write_bytes(bad.read_bytes()[:-1])
    loaded, where = ckpt.load_latest(tmp_path)
    assert where.name == "step_00000002" and loaded["trainer"]["step"] == 2
    assert torch.equal(loaded["model"]["w"], state["model"]["w"])
    assert torch.equal(loaded["optimizer"]["state"][0]["exp_avg"], torch.ones(2))


# --- losses ---------------------------------------------------------------------------------------

def test_sft_loss_equals_full_logits_cross_entropy(tiny):
    from ember.models.loading import load_pretrained

    model, tok = load_pretrained(tiny["model"], "float32")
    examples, _ = load_examples(tiny["train"], DataConfig(), tok)
    batch = next(iter(PackedBatches(examples[:5], 128)))
    logits = model(batch.input_ids, batch.position_ids, cu_seqlens=batch.cu_seqlens,
                   max_seqlen=batch.max_seqlen)[0]
    ref = torch.nn.functional.cross_entropy(logits, batch.labels[0], ignore_index=-100)
    got = sft_loss(model, batch, batch.num_loss_tokens)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


def test_distillation_kl_matches_definition():
    torch.manual_seed(0)
    s = torch.randn(7, 11, requires_grad=True)
    t = torch.randn(7, 11)
    T = 2.0
    got = kl_div_from_logits(s, t, T, chunk=3)
    p = torch.softmax(t / T, -1)
    ref = (p * (p.log() - torch.log_softmax(s / T, -1))).sum() * T * T
    torch.testing.assert_close(got, ref)
    got.backward()
    g = s.grad.clone()
    s.grad = None
    ref.backward()
    torch.testing.assert_close(g, s.grad)
    assert float(kl_div_from_logits(t, t, T)) == pytest.approx(0.0, abs=1e-6)


def test_dpo_loss_and_reference_without_adapters(tiny):
    from ember.models.loading import load_pretrained

    pc, pr = torch.tensor([-3.0, -5.0]), torch.tensor([-4.0, -4.0])
    rc, rr = torch.tensor([-3.5, -5.0]), torch.tensor([-3.5, -4.5])
    loss, chosen, rejected = dpo_loss(pc, pr, rc, rr, beta=0.5)
    margin = 0.5 * ((pc - rc) - (pr - rr))
    torch.testing.assert_close(loss, torch.nn.functional.softplus(-margin).mean())
    torch.testing.assert_close(chosen - rejected, margin)

    model, tok = load_pretrained(tiny["model"], "float32")
    examples, _ = load_examples(tiny["train"], DataConfig(), tok)
    batch = collate(examples[:3])
    base_lp = sequence_logprobs(model, batch)
    # Per-document sums equal scoring each document alone.
    alone = torch.cat([sequence_logprobs(model, collate([e])) for e in examples[:3]])
    torch.testing.assert_close(base_lp, alone, rtol=1e-5, atol=1e-5)
    apply_lora(model, LoRAConfig(rank=4, alpha=8))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("lora_B"):
                p.normal_(0, 0.1)
    assert not torch.allclose(sequence_logprobs(model, batch), base_lp)
    with torch.no_grad(), adapters_disabled(model):
        assert torch.equal(sequence_logprobs(model, batch), base_lp)
    assert not torch.allclose(sequence_logprobs(model, batch), base_lp)  # scales restored


# --- metrics --------------------------------------------------------------------------------------

def test_metrics():
    from ember.engine.metrics import compute

    refs = [' {"a": 1, "b": "x"}', ' {"a": 2, "b": "y"}', "cat", "dog"]
    preds = ['{"a": 1, "b": "x"}\n', '{"b": "y", "a": 2}', "Cat", "cat"]
    s = compute(["exact_match", "accuracy"], preds, refs)
    assert s == {"exact_match": 0.25, "accuracy": 0.5}
    assert compute(["json_match"], preds[:2], refs[:2])["json_match"] == 1.0
    assert compute(["field_accuracy"], ['{"a": 1, "b": "z"}', "oops"], refs[:2]) == {
        "field_accuracy": 0.25}
    # macro F1 over labels {cat, dog}: cat P=1/2 R=1 -> 2/3; dog P=0 -> 0
    assert compute(["f1"], ["cat", "cat"], ["cat", "dog"])["f1"] == pytest.approx(1 / 3)
    with pytest.raises(EmberError, match="unknown metric"):
        compute(["bleu"], preds, refs)


def test_generation_stops_rows_that_left_the_reference():
    from ember.engine.evaluation import _diverged
    from ember.engine.metrics import normalize

    ref = normalize(' {"category": "bug"}')
    assert not _diverged("", ref) and not _diverged(" ", ref)
    assert not _diverged(' {"cat', ref) and not _diverged(' {"category": ', ref)
    assert _diverged(' {"categ0', ref) and _diverged("Sure", ref)
    assert _diverged(' {"cate gory', ref)  # inner space the reference does not have
    assert _diverged(' {"cate ', ref)  # a trailing space followed by anything cannot match
    assert not _diverged(' {"category": "bug"}', ref)
    assert not _diverged(' {"category": "bu\ufffd', ref)  # half a character: undecided
