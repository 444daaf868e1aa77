"""Tiny random models and data for the engine tests (built at test time, nothing downloaded).

- ``make_tiny_model``: an HF folder (a 2-layer Llama and a byte-level BPE tokenizer) that
  ``ember train`` loads like any model; ``tiny_rows`` / ``tiny_config``: its data and a run config.
- ``make_model`` / ``make_examples``: an in-memory 3-layer model (full or LoRA) and synthetic
  examples, for tests below the trainer (checkpoints, sharding, guards).
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import torch

from ember.engine import dcp
from ember.engine.config import load_config
from ember.engine.data import IGNORE, DataConfig, Example
from ember.models import LoRAConfig, ModelConfig, Transformer, apply_lora

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


def word_prefs(rng, n: int) -> list[dict]:
    """n DPO lines "say w1 w2 ... ->": chosen the first word, rejected another (from rng)."""
    prefs = []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(2, 6))]
        wrong = rng.choice([x for x in WORDS if x != words[0]])
        prefs.append({"prompt": "say " + " ".join(words) + " ->", "chosen": " " + words[0],
                      "rejected": " " + wrong})
    return prefs


def make_tiny_model(folder: Path, seed: int = 0) -> Path:
    """An HF folder with a random 2-layer Llama and a small byte-level BPE tokenizer."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers, trainers

    from ember.models.loading import save_pretrained
    from ember.models.tokenizer import Tokenizer

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


def away_from_reference(model) -> None:
    """Every LoRA B of ``model`` drawn N(0, 0.2) from the global RNG: a policy away from its
    reference (the base model, its adapters off)."""
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("lora_B"):
                p.normal_(0, 0.2)


def write_jsonl(path: Path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def tiny_config(tiny, run_dir, *extra: str):
    """A run config on the ``tiny`` fixture's model and files; ``extra``: ``--set`` items."""
    sets = [f'model.name="{tiny["model"]}"', f'run_dir="{run_dir}"', 'device="cpu"',
            'precision="fp32"', f'data.train=["{tiny["train"]}"]',
            f'data.validation="{tiny["val"]}"', f'data.test="{tiny["test"]}"',
            "data.max_seq_len=64", "data.tokens_per_batch=128",
            "eval.max_new_tokens=4", "eval.show=0", "plot=false", "lora.rank=4", "lora.alpha=8",
            *extra]
    return load_config(None, sets)


def checkpoint_weights(run_dir, tmp: Path, step: int | None = None) -> dict[str, torch.Tensor]:
    """The weights stored in a run's checkpoint of ``step`` (None: the newest), through one
    torch file."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    root = dcp.checkpoint_root(run_dir)
    if step is None:
        latest = dcp.find_latest(root)
        assert latest.path is not None and not latest.skipped
        path = latest.path
    else:
        path = dcp.step_dir(root, step)
    out = tmp / f"{Path(run_dir).name}-{path.name}.pt"
    dcp_to_torch_save(path, out)
    return torch.load(out, weights_only=True)["model"]


def rows_of(run_dir, *, timing: bool = True) -> list[dict]:
    """The rows of a run's metrics.jsonl; ``timing=False`` drops the wall-clock fields (what
    two runs of the same trajectory may differ in)."""
    rows = [json.loads(r) for r in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    if timing:
        return rows
    return [{k: v for k, v in r.items() if k not in ("seconds", "tokens_per_s")} for r in rows]


def quiet(*_a, **_k):
    pass


CFG = ModelConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_layers=3,
                  num_heads=4, num_kv_heads=2)
DATA = DataConfig(max_seq_len=24, tokens_per_batch=40, seed=3)


def make_examples(n: int = 24, seed: int = 0) -> list[Example]:
    g = random.Random(seed)
    out = []
    for i in range(n):
        ids = [g.randrange(CFG.vocab_size) for _ in range(g.randint(5, 20))]
        prompt = g.randint(1, len(ids) // 2)
        labels = [IGNORE if t < prompt - 1 else ids[t + 1] for t in range(len(ids) - 1)]
        out.append(Example(ids, labels + [IGNORE], f"synthetic:{i}", key=f"k{seed}-{i}"))
    return out


def make_model(kind: str) -> torch.nn.Module:
    """The same 3-layer model every call: full fine-tuning ("full") or LoRA adapters ("lora")."""
    torch.manual_seed(0)
    model = Transformer(CFG).init_weights(seed=0)
    if kind == "lora":
        apply_lora(model, LoRAConfig(rank=4, alpha=8, init="gaussian"))
    return model.train()


def make_optimizer(model) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    try:
        return torch.optim.AdamW(params, lr=2e-2, weight_decay=0.01, fused=True)
    except (RuntimeError, ValueError):
        return torch.optim.AdamW(params, lr=2e-2, weight_decay=0.01, foreach=True)


def cli_train_tiny(tmp_path: Path, base, method: str = "lora", steps: int = 3) -> Path:
    """``ember train`` through the CLI on ``base`` (an HF folder with a tokenizer) with a written
    TOML config: LoRA r=4 (``method`` "lora", "qlora" = LoRA on an NF4 base, or "full"), a few
    steps on tiny_rows; checks the losses are finite and returns the run directory."""
    from ember.engine.cli import main

    train = write_jsonl(tmp_path / "train.jsonl", tiny_rows(24, seed=1))
    run = tmp_path / "run"
    config = tmp_path / "tiny.toml"
    config.write_text(f"""
run_dir = "{run}"
max_steps = {steps}
device = "cpu"
plot = false
method = "{'full' if method == 'full' else 'lora'}"
[model]
name = "{base}"
{'quantize = "nf4"' if method == 'qlora' else ''}
[lora]
rank = 4
alpha = 8
[data]
train = ["{train}"]
max_seq_len = 64
tokens_per_batch = 128
""")
    assert main(["train", str(config), "--set", "optim.lr=5e-3"]) == 0
    rows = [json.loads(r) for r in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if r["kind"] == "train"]
    assert len(losses) == steps and all(0 < loss < 20 for loss in losses)
    return run


def hf_lr_factors(name: str, total: int, warmup: int, *, skipped=(), **kw) -> list[float]:
    """transformers' ``get_scheduler(name, ...)`` lr multiplier of each optimizer step (0-based)
    of ``total``; ``kw``: its ``scheduler_specific_kwargs``. ``skipped``: the steps (1-based)
    whose update the fp16 GradScaler skipped: transformers' Trainer does not step the scheduler
    after them (``if not self.accelerator.optimizer_step_was_skipped: lr_scheduler.step()``)
    but counts them in ``global_step``, so the run still ends after ``total`` steps."""
    from transformers import get_scheduler

    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = get_scheduler(name, opt, num_warmup_steps=warmup, num_training_steps=total,
                          scheduler_specific_kwargs=kw)
    out = []
    for step in range(1, total + 1):
        out.append(opt.param_groups[0]["lr"])
        if step not in skipped:
            opt.step()
            sched.step()
    return out


def moved_without_base(run: Path, base: Path, to: Path) -> Path:
    """A copy of ``run`` whose base model is not on this machine (config.toml's model.name gone),
    as after moving the run directory to another machine."""
    shutil.copytree(run, to)
    config = to / "config.toml"
    config.write_text(config.read_text().replace(str(base), str(to.parent / "no-base")))
    return to
