"""A minimal training loop on ember's building blocks (FSDP2 sharding, DCP checkpoints, guards),
run in-process by the tests and as a subprocess (``torchrun`` or plain ``python``).

    torchrun --standalone --nproc_per_node 2 tests/engine/_dist_worker.py JOBS.json
    python tests/engine/_dist_worker.py --run RUN.json      # one killable/stoppable run

It mirrors the trainer's step: per-rank micro-batches, the global answer-token count all-reduced
before the forward, ``sft_loss``, backward, global-norm clipping, the non-finite guard, AdamW.
"""

from __future__ import annotations

import json
import random
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from ember.engine import dcp
from ember.engine.activation import apply_activation_checkpointing
from ember.engine.data import IGNORE, DataConfig, Example
from ember.engine.distributed import (
    DistInfo,
    all_reduce_sums,
    clip_grad_norm,
    data_state,
    gather_full_state_dict,
    init_distributed,
    rank_batches,
    restore_data_state,
    shard_model,
    shutdown,
)
from ember.engine.guards import GracefulStop, NonFiniteGuard, resume_command
from ember.engine.losses import sft_loss
from ember.models import LoRAConfig, ModelConfig, Transformer, apply_lora

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


def make_model(kind: str, checkpointing: str = "none", base_bf16: bool = False
               ) -> torch.nn.Module:
    torch.manual_seed(0)
    model = Transformer(CFG).init_weights(seed=0)
    if base_bf16:  # LoRA's usual GPU setup: a bf16 base under fp32 adapters
        model.to(torch.bfloat16)
    if kind == "lora":
        apply_lora(model, LoRAConfig(rank=4, alpha=8, init="gaussian"))
    apply_activation_checkpointing(model, checkpointing)
    return model.train()


def make_optimizer(model) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    try:
        return torch.optim.AdamW(params, lr=2e-2, weight_decay=0.01, fused=True)
    except (RuntimeError, ValueError):
        return torch.optim.AdamW(params, lr=2e-2, weight_decay=0.01, foreach=True)


def train(kind: str, info: DistInfo, *, steps: int, batches_per_step: int,
          root: str | None = None, save_at: tuple[int, ...] = (), save_every: int = 0,
          resume: bool = False, checkpointing: str = "none", step_delay: float = 0.0,
          mixed_precision: str = "auto", base_bf16: bool = False,
          export: str | None = None, echo=None, stop: GracefulStop | None = None) -> dict:
    """Losses of the steps this call runs ({step: loss}), optionally resuming / checkpointing /
    exporting the final weights (``export``: a safetensors path written by rank 0)."""
    torch.manual_seed(1234 + info.rank)
    random.seed(99)
    model = shard_model(make_model(kind, checkpointing, base_bf16), info,
                        mixed_precision=mixed_precision)
    opt = make_optimizer(model)
    params = [p for p in model.parameters() if p.requires_grad]
    batches = rank_batches(make_examples(), DATA, info)
    if batches_per_step % info.world_size:
        raise ValueError("batches_per_step must be a multiple of the world size")
    accum = batches_per_step // info.world_size
    guard = NonFiniteGuard(3)
    step = 0
    if resume:
        latest = dcp.find_latest(root, info)
        for msg in latest.skipped:
            echo and echo(f"SKIPPED {msg}")
        if latest.path is not None:
            loaded = dcp.load(latest.path, model=model, optimizer=opt, info=info)
            step = loaded.extra["step"]
            restore_data_state(batches, loaded.extra["data"], batches_per_step)
            guard.load_state_dict(loaded.extra["guard"])
            echo and echo(f"RESUMED {step} {latest.path.name}")

    def stream():
        while True:
            yield from batches

    it = stream()
    losses = {}
    while step < steps:
        micro = [next(it) for _ in range(accum)]
        n_loss = int(all_reduce_sums([sum(b.num_loss_tokens for b in micro)], info)[0])
        local = 0.0
        for b in micro:
            loss = sft_loss(model, b, n_loss)
            loss.backward()
            local += loss.item()
        norm = clip_grad_norm(params, 1.0)
        total = all_reduce_sums([local], info)[0]
        if guard.check(step + 1, total, norm):
            opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        losses[step] = total
        echo and echo(f"STEP {step} {total!r}")
        stopping = stop is not None and stop.requested
        if root is not None and (step in save_at or stopping
                                 or (save_every and step % save_every == 0)):
            extra = {"step": step, "data": data_state(batches, batches_per_step),
                     "guard": guard.state_dict()}
            path = dcp.save(root, step, model=model, optimizer=opt, extra=extra, info=info,
                            config_text=f"kind = \"{kind}\"\n", keep_last=2)
            if stopping:
                echo and echo(stop.message(step, path, resume_command(Path(root).parent)))
                break
        if step_delay:
            time.sleep(step_delay)
    if export is not None:  # the trained weights, gathered on rank 0 as for an export
        sd = gather_full_state_dict(model, trainable_only=kind == "lora")
        if info.is_main:
            save_file({k: v.contiguous() for k, v in sd.items()}, export)
    return losses


def _jobs(path: str) -> None:
    torch.set_num_threads(1)
    info = init_distributed("cpu")
    jobs = json.loads(Path(path).read_text())
    results = {}
    for name, job in jobs["jobs"].items():
        out = train(info=info, **job)
        results[name] = {str(k): v for k, v in out.items()}
    if info.is_main:
        Path(jobs["out"]).write_text(json.dumps(results))
    shutdown()


def _run(path: str) -> None:
    torch.set_num_threads(1)
    job = json.loads(Path(path).read_text())

    def echo(msg):
        print(msg, flush=True)

    with GracefulStop(echo=lambda m: print(f"SIGNAL {m}", flush=True)) as stop:
        train(info=DistInfo(), echo=echo, stop=stop, **job)
    print("DONE", flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "--run":
        _run(sys.argv[2])
    else:
        _jobs(sys.argv[1])
