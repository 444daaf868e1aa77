"""Training objectives: what one packed micro-batch's loss is (``objective`` in the config).

``"sft"``      cross-entropy on the answer tokens (``losses.sft_loss``).
``"distill"``  ``alpha * KD + (1 - alpha) * SFT`` on the answer tokens, KD being the student's
               ``T^2 * KL`` to a frozen teacher (``[distill]``); both terms are token-weighted
               over the whole accumulated step, like SFT.
``"dpo"``      the DPO loss of preference pairs (``[dpo]``, data lines {"prompt", "chosen",
               "rejected"}), averaged over the pairs of the whole step. The reference is the
               starting model: the same model with its LoRA adapters switched off; with full
               fine-tuning a frozen copy of the starting weights; after ``model.init`` the
               earlier stage's result (a continued adapter: its loaded weights swapped in;
               ``engine/stages.py``).

Under torchrun the teacher and a full fine-tuning's reference copy are sharded across the
processes like the model (``distributed.shard_frozen``); every rank calls them in the same order
(every rank runs every micro-batch) and frees their gathered root after each use (``release``).

An objective weighs each micro-batch (answer tokens, or pairs for DPO) so the trainer can divide
every micro-batch's loss by the weight of the step, keeps sums of its own train metrics (reduced
over the processes once per step) and computes its validation scores.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ember import EmberError
from ember.engine.data import DataConfig, Datasets, Example, load_datasets
from ember.engine.distributed import (
    DistInfo,
    all_reduce_sums,
    build_device,
    release,
    shard_frozen,
)
from ember.engine.evaluation import (
    GenerationResult,
    eval_batches,
    generation_eval,
    validation_loss,
)
from ember.engine.losses import (
    adapters_disabled,
    distill_sft_loss,
    dpo_loss,
    sequence_logprobs,
    sft_loss,
)
from ember.engine.metrics import perplexity
from ember.engine.stages import adapter_snapshot, adapters_swapped, continues_lora, frozen_start

if TYPE_CHECKING:
    from ember.engine.config import TrainConfig

OBJECTIVES = ("sft", "distill", "dpo")


@dataclass(frozen=True, kw_only=True)
class DistillConfig:
    teacher: str | None = None  # built-in name, HF folder or .gguf file (like model.name)
    temperature: float = 2.0
    alpha: float = 0.5  # weight of the KD term; the SFT term gets 1 - alpha

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise EmberError(f"distill.temperature must be > 0, got {self.temperature}")
        if not 0 <= self.alpha <= 1:
            raise EmberError(f"distill.alpha must be in [0, 1], got {self.alpha}")


@dataclass(frozen=True, kw_only=True)
class DPOConfig:
    beta: float = 0.1  # strength of the pull towards the reference (higher: stay closer)
    label_smoothing: float = 0.0  # > 0: conservative DPO, for noisy preference labels

    def __post_init__(self) -> None:
        if not self.beta > 0:
            raise EmberError(f"dpo.beta must be > 0, got {self.beta}")
        if not 0 <= self.label_smoothing < 0.5:
            raise EmberError(f"dpo.label_smoothing must be in [0, 0.5), got "
                             f"{self.label_smoothing}")


def _frozen_model(name: str, precision: str, info: DistInfo):
    """A model for forwards only: eval mode, no gradients, weights in the autocast dtype; under
    torchrun sharded across the processes (``distributed.shard_frozen``)."""
    from ember.models.loading import load_pretrained

    dtype = {"bf16": "bfloat16", "fp16": "float16"}.get(precision, "float32")
    model, tokenizer = load_pretrained(name, dtype, build_device(info))
    return shard_frozen(model, info), tokenizer


class SFT:
    """Plain supervised fine-tuning; the base of the other objectives."""

    name = "sft"
    pairs = False  # trains on preference pairs

    def __init__(self, info: DistInfo | None = None):
        self.sums: dict[str, float] = {}
        self.info = info or DistInfo()  # the processes evaluation is shared by

    def weight(self, batch) -> int:
        return batch.num_loss_tokens

    def loss(self, model, batch, denom: int) -> torch.Tensor:
        return sft_loss(model, batch, denom)

    def check_model(self, model, tokenizer) -> None:
        pass

    def frozen_models(self) -> dict[str, torch.nn.Module]:
        """The objective's own forward-only models by role (a teacher, a reference copy)."""
        return {}

    def load_datasets(self, cfg: DataConfig, tokenizer) -> Datasets:
        return load_datasets(cfg, tokenizer)

    def task_eval(self, model, tokenizer, examples: list[Example], ev, autocast
                  ) -> GenerationResult:
        """``eval.metrics`` on a split (``ev``: the EvalConfig): greedy generation here."""
        return generation_eval(model, tokenizer, examples, ev.metrics,
                               max_new_tokens=ev.max_new_tokens, batch_size=ev.batch_size,
                               autocast=autocast, max_examples=ev.max_examples, show=ev.show,
                               info=self.info)

    def check_data(self, ds: Datasets) -> None:
        for split, examples in (("train", ds.train), ("validation", ds.validation)):
            bad = next((e for e in examples if bool(e.parts) != self.pairs), None)
            if bad is None:
                continue
            if self.pairs:
                raise EmberError(f"{bad.source}: objective = \"dpo\" trains on preference lines "
                                 "{\"prompt\", \"chosen\", \"rejected\"}; this " + split
                                 + " line is not one")
            raise EmberError(f"{bad.source}: a preference line (chosen/rejected) in the {split} "
                             f"data; set objective = \"dpo\" to train on preference pairs")

    def _add(self, **values: float) -> None:
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v)

    def step_metrics(self, reduce) -> dict[str, float]:
        """This step's metrics, all processes together (``reduce``: sums a list of floats)."""
        keys = sorted(self.sums)
        sums = dict(zip(keys, reduce([self.sums[k] for k in keys]), strict=True)) if keys else {}
        self.sums = {}
        return self._finish(sums)

    def _finish(self, sums: dict[str, float]) -> dict[str, float]:
        return sums

    def val_scores(self, model, examples: list[Example], tokens_per_batch: int, device,
                   autocast, max_batches: int | None) -> dict[str, float]:
        loss, _ = validation_loss(model, examples, tokens_per_batch, device, autocast,
                                  max_batches, self.info)
        return {"val_loss": loss, "perplexity": perplexity(loss)}


class Distill(SFT):
    name = "distill"

    def __init__(self, cfg: TrainConfig, info: DistInfo):
        super().__init__(info)
        self.cfg = cfg.distill
        self.teacher, self.teacher_tok = _frozen_model(self.cfg.teacher, cfg.precision, info)

    def frozen_models(self) -> dict[str, torch.nn.Module]:
        return {"teacher": self.teacher}

    def check_model(self, model, tokenizer) -> None:
        v_s, v_t = model.cfg.vocab_size, self.teacher.cfg.vocab_size
        same = v_s == v_t
        if same and self.teacher_tok is not None:
            vocab = getattr(getattr(tokenizer, "backend", None), "get_vocab", None)
            t_vocab = getattr(getattr(self.teacher_tok, "backend", None), "get_vocab", None)
            same = vocab is None or t_vocab is None or vocab() == t_vocab()
        if not same:
            raise EmberError(f"distill.teacher {self.cfg.teacher!r} does not share the student's "
                             f"vocabulary (vocab sizes {v_t} and {v_s}, or different tokens); "
                             "distillation compares next-token distributions, so pick a teacher "
                             "from the same model family (same tokenizer)")

    def loss(self, model, batch, denom: int) -> torch.Tensor:
        c = self.cfg
        loss, kd, sft = distill_sft_loss(model, self.teacher, batch, denom, c.temperature,
                                         c.alpha)
        release(self.teacher)
        self._add(kd_loss=kd, sft_loss=sft)
        return loss


class DPO(SFT):
    name = "dpo"
    pairs = True

    def __init__(self, cfg: TrainConfig, info: DistInfo):
        super().__init__(info)
        self.cfg = cfg.dpo
        self.ref_model, self.ref_adapters = None, None
        # The reference is the starting model (after model.init: the earlier stage's result).
        self.snapshot = continues_lora(cfg)  # a continued adapter: a frozen copy of it
        if cfg.method == "full":  # no adapters to switch off: a frozen copy is the reference
            self.ref_model = shard_frozen(frozen_start(cfg, build_device(info)), info)

    def weight(self, batch) -> int:
        return batch.num_docs // 2

    def frozen_models(self) -> dict[str, torch.nn.Module]:
        return {} if self.ref_model is None else {"reference": self.ref_model}

    def check_model(self, model, tokenizer) -> None:
        if self.snapshot:  # the built model holds the adapter as loaded (before any resume)
            self.ref_adapters = adapter_snapshot(model)

    def reference(self, model):
        if self.ref_model is not None:
            return contextlib.nullcontext(self.ref_model)
        if self.ref_adapters is not None:
            return adapters_swapped(model, self.ref_adapters)
        return adapters_disabled(model)

    def _pair_loss(self, model, batch):
        with torch.no_grad(), self.reference(model) as ref:
            ref_lp = sequence_logprobs(ref, batch)
        if self.ref_model is not None:
            release(self.ref_model)
        lp = sequence_logprobs(model, batch)  # (2 * pairs,): chosen, rejected, chosen, ...
        return dpo_loss(lp[0::2], lp[1::2], ref_lp[0::2], ref_lp[1::2], self.cfg.beta,
                        self.cfg.label_smoothing)

    def loss(self, model, batch, denom: int) -> torch.Tensor:
        loss, chosen, rejected = self._pair_loss(model, batch)
        self._add(**_pair_sums(chosen, rejected))
        return loss * chosen.numel() / denom

    def _finish(self, sums: dict[str, float]) -> dict[str, float]:
        n = max(sums.pop("pairs", 0.0), 1.0)
        return {k: v / n for k, v in sums.items()}

    @torch.no_grad()
    def val_scores(self, model, examples: list[Example], tokens_per_batch: int, device,
                   autocast, max_batches: int | None) -> dict[str, float]:
        was_training = model.training
        model.eval()
        sums = dict.fromkeys(["loss", *_pair_sums(torch.zeros(0), torch.zeros(0))], 0.0)
        try:  # each process its share of the batches (engine/evaluation.eval_batches)
            for i, batch in eval_batches(examples, tokens_per_batch, max_batches, self.info):
                with autocast():
                    loss, chosen, rejected = self._pair_loss(model, batch.to(device))
                if i is not None:
                    for k, v in {"loss": float(loss) * chosen.numel(),
                                 **_pair_sums(chosen, rejected)}.items():
                        sums[k] += float(v)
        finally:
            model.train(was_training)
        sums = dict(zip(sums, all_reduce_sums(list(sums.values()), self.info), strict=True))
        return {f"val_{k}": v for k, v in self._finish(sums).items()}


def _pair_sums(chosen: torch.Tensor, rejected: torch.Tensor) -> dict[str, float]:
    return {"pairs": chosen.numel(), "reward_accuracy": float((chosen > rejected).sum()),
            "reward_margin": float((chosen - rejected).sum()),
            "chosen_reward": float(chosen.sum()), "rejected_reward": float(rejected.sum())}


def make_objective(cfg: TrainConfig, info: DistInfo) -> SFT:
    """The objective of a resolved config (loads the teacher / reference model when needed,
    sharded across the processes of ``info``)."""
    if cfg.head.type == "classification":
        from ember.engine.classification import Classification

        return Classification(cfg, info)
    if cfg.objective == "distill":
        return Distill(cfg, info)
    if cfg.objective == "dpo":
        return DPO(cfg, info)
    return SFT(info)
