"""The trainer's setup (``Trainer`` in ``engine/trainer.py`` inherits ``SetupMixin``): the data
(a ``[task]``'s generated splits, the objective's datasets, ``eval.choices``' questions), the model
in STYLE.md's order (model -> LoRA / freezing -> activation checkpointing -> FSDP2) with the run's
summary line, and the warning for training documents longer than the model's context.

It sets ``choice_set``, ``tokenizer``, ``base_print``, ``frozen_prints``, ``base_files`` and uses
``objective``, ``echo``, ``device`` and ``datasets``, set by ``Trainer.run``.
"""

from __future__ import annotations

import math
import random
from typing import TYPE_CHECKING

import torch

from ember.engine.activation import apply_activation_checkpointing, set_mlp_chunks
from ember.engine.choices import load_choices
from ember.engine.distributed import (
    barrier,
    broadcast_object,
    build_device,
    local_numel,
    shard_model,
)
from ember.engine.neftune import add_model_neftune
from ember.engine.objectives import disable_run_dropout
from ember.engine.runtime import build_model, num_weights
from ember.engine.stages import describe as describe_start
from ember.engine.state import base_fingerprint, model_architecture
from ember.models.lora import lora_modules

if TYPE_CHECKING:
    from ember.engine.config import TrainConfig
    from ember.engine.data import Datasets
    from ember.engine.distributed import DistInfo


class SetupMixin:
    """Setup methods of ``Trainer``."""

    # --- setup ---------------------------------------------------------------------------------
    def _datasets(self, cfg: TrainConfig, info: DistInfo, tokenizer) -> Datasets:
        if cfg.task.name is not None:
            if info.is_main:
                from ember.engine.tasks import write_splits

                t = cfg.task
                write_splits(t.name, cfg.out_dir / "data",
                             {"train": t.train, "validation": t.validation, "test": t.test},
                             t.seed)
            barrier(info)
        ds = self.objective.load_datasets(cfg.data, tokenizer)
        self.echo(ds.summary())
        self.objective.check_data(ds)
        self.choice_set = None
        if cfg.eval.choices is not None:
            examples, questions, rep = load_choices(cfg.eval.choices, cfg.data, tokenizer)
            self.echo(rep.summary())
            self.choice_set = (examples, questions)
        return ds

    def _build(self, cfg: TrainConfig, info: DistInfo):
        """Model -> LoRA / freezing -> activation checkpointing -> FSDP2 (STYLE.md's order)."""
        torch.manual_seed(cfg.seed)  # the same initial weights (LoRA's A) on every rank
        random.seed(cfg.seed)
        model, self.tokenizer = build_model(cfg, build_device(info))
        dropout_note = disable_run_dropout(cfg, model)  # TRL's disable_dropout: after PEFT's wrap
        # what the checkpoints do not hold (resumed onto other base weights, another teacher or
        # reference: refused); one broadcast of rank 0's, the only rank holding the weights
        self.base_print, self.frozen_prints, self.base_files = broadcast_object(
            (base_fingerprint(model), self.objective.fingerprints(model),
             getattr(model, "ember_base_print", None)) if info.is_main
            else (None, None, None), info)
        self.model_config = model_architecture(model)  # the config: on every rank
        n_all = num_weights(model)
        n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
        act = cfg.activations
        blocks = apply_activation_checkpointing(model, act.checkpointing, k=act.every_k,
                                                offload=act.offload)
        set_mlp_chunks(model, act.mlp_chunk_tokens)
        if cfg.neftune_noise_alpha:
            add_model_neftune(model, cfg.neftune_noise_alpha)
        # Under torchrun only rank 0 read the weights: shard_model broadcasts them into the
        # shards.
        shard_model(model, info, mixed_precision=cfg.dist.mixed_precision,
                    reshard_after_forward=cfg.dist.reshard_after_forward)
        if info.rank:  # each rank its own dropout masks; rank 0 goes on as one process would
            torch.manual_seed(cfg.seed + info.rank)
            random.seed(cfg.seed + info.rank)
        kind = "DoRA" if cfg.lora.use_dora else "LoRA"
        what = {"lora": f"{kind} r={cfg.lora.rank} on {len(lora_modules(model))} modules",
                "prompt": f"prompt tuning ({cfg.prompt_tuning.num_virtual_tokens} virtual tokens)",
                }.get(cfg.method, "full fine-tuning")
        if cfg.objective != "sft":
            what += f", objective {cfg.objective}"
        if cfg.head.type is not None:
            what += f", {cfg.head.type} head ({len(model.cfg.labels)} outputs)"
        where = (f"{info.world_size} processes (FSDP2), {self.device} on rank 0"
                 if info.distributed else self.device)
        ckpt = (f"; activation checkpointing on {len(blocks)}/{len(model.layers)} blocks"
                + (" with CPU offload" if act.offload else "")) if blocks else ""
        self.echo(f"run {cfg.out_dir}: {cfg.model.name} ({n_all / 1e6:.1f}M params), {what}, "
                  f"{n_train / 1e6:.2f}M trainable; {where}, {cfg.precision}, "
                  f"{torch.get_num_threads()} threads{ckpt}")
        if dropout_note:
            self.echo(dropout_note)
        for role, frozen in self.objective.frozen_models().items():
            n = sum(p.numel() for p in frozen.parameters())
            self.echo(f"{cfg.objective} {role}: {n / 1e6:.1f}M params, frozen" + (
                f", sharded: {local_numel(frozen) / n:.0%} of it on rank 0"
                if info.distributed else ""))
        if cfg.model.init is not None:
            self.echo(describe_start(cfg))
        if cfg.model.quantize and not self.device.startswith("cuda"):
            self.echo("note: QLoRA on a CPU dequantizes every 4-bit weight in PyTorch at each use "
                      "(about 20x slower than LoRA on SmolLM2-135M, measured); on a CPU, LoRA on "
                      "the full-precision base is the faster choice")
        return model

    # --- the training data's lengths (evaluation: EvalMixin, engine/trainer_eval.py) ----------
    def _check_context(self, model) -> None:
        """Documents longer than the model's context train positions it has never seen: say so
        (model.rope_scaling extends the context)."""
        limit = model.cfg.max_position_embeddings
        longest = max(n for e in self.datasets.train for n in e.doc_lengths)
        if longest > limit:
            over = sum(any(n > limit for n in e.doc_lengths) for e in self.datasets.train)
            self.echo(f"warning: {over} training examples are longer than the model's context "
                      f"({limit} tokens; the longest has {longest}): set model.rope_scaling = "
                      f"\"yarn\" and model.rope_factor = {math.ceil(longest / limit)} to extend "
                      "it, or lower data.max_seq_len")
