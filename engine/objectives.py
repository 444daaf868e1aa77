"""Training objectives: what one packed micro-batch's loss is (``objective`` in the config).

``"sft"``      cross-entropy on the answer tokens (``losses.sft_loss``).
``"distill"``  ``alpha * KD + (1 - alpha) * SFT`` on the answer tokens, KD being the student's
               ``T^2 * KL`` to a frozen teacher (``[distill]``); both terms are token-weighted
               over the whole accumulated step, like SFT.
``"kto"``      unpaired completions labelled desirable or not: ``engine/kto.py``.
``"dpo"``, ``"orpo"``, ``"simpo"``, ``"cpo"``  preference pairs (data lines {"prompt",
               "chosen", "rejected"}; ``[dpo]``, ``[orpo]``, ``[simpo]``, ``[cpo]``):
               ``engine/preference_objectives.py``, imported here only by ``make_objective``
               (it builds on ``SFT``).

Under torchrun the teacher and a full fine-tuning's reference copy are sharded across the
processes like the model (``distributed.shard_frozen``); every rank calls them in the same order
(every rank runs every micro-batch) and frees their gathered root after each use (``release``).

An objective weighs each micro-batch (answer tokens, pairs, KTO's examples) so the
trainer can divide every micro-batch's loss by the weight of the step, keeps sums of its own
train metrics (reduced over the processes once per step) and computes its validation scores.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ember import EmberError
from ember.engine.data import DataConfig, Datasets, Example, load_datasets
from ember.engine.distributed import DistInfo, build_device, release, shard_frozen
from ember.engine.evaluation import (
    GenerationResult,
    generation_eval,
    generation_examples,
    validation_loss,
)
from ember.engine.losses import distill_sft_loss, sft_loss, sft_loss_tokens
from ember.engine.metrics import perplexity
from ember.models.dropout import disable_dropout_
from ember.models.prompt_tuning import num_virtual_tokens

if TYPE_CHECKING:
    from ember.engine.config import TrainConfig

PREFERENCE_OBJECTIVES = ("dpo", "orpo", "simpo", "cpo")  # engine/preference_objectives.py
OBJECTIVES = ("sft", "distill", *PREFERENCE_OBJECTIVES, "kto")  # kto: engine/kto.py
# the objectives whose section has disable_dropout (TRL's preference trainers')
DROPOUT_OFF_OBJECTIVES = (*PREFERENCE_OBJECTIVES, "kto")


def disable_run_dropout(cfg: TrainConfig, model) -> str | None:
    """``<objective>.disable_dropout`` (the preference objectives'; TRL's default, on): turn the
    dropout of ``model``'s training forwards off for the run (``ember.models.dropout``); returns
    the start-up note saying what was turned off, None when nothing was."""
    if cfg.objective not in DROPOUT_OFF_OBJECTIVES:
        return None
    key = f"{cfg.objective}.disable_dropout"
    if not getattr(cfg, cfg.objective).disable_dropout:
        return None
    off = disable_dropout_(model)
    attn = getattr(getattr(model, "cfg", None), "attention_dropout", 0.0)
    kept = (f"; attention dropout {attn:g} stays on, as TRL leaves transformers' "
            "attention_dropout on (model.attention_dropout = 0 turns it off)") if attn else ""
    if not off:
        return f"{key}: the model draws no other dropout{kept}" if kept else None
    return (f"{key} (TRL's default): off for this run: {', '.join(off)} (set {key} = false "
            f"to keep it){kept}")


@dataclass(frozen=True, kw_only=True)
class DistillConfig:
    teacher: str | None = None  # built-in name, HF folder or .gguf file (like model.name)
    # Divides both logits; the KL is scaled by T^2 (Hinton et al.). TRL's DistillationTrainer:
    # the same division without T^2; its GKDTrainer's loss: T = 1 whatever its (sampling)
    # temperature
    temperature: float = 2.0
    alpha: float = 0.5  # weight of the KD term; the SFT term gets 1 - alpha

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise EmberError(f"distill.temperature must be > 0, got {self.temperature}")
        if not 0 <= self.alpha <= 1:
            raise EmberError(f"distill.alpha must be in [0, 1], got {self.alpha}")


def _frozen_model(name: str, precision: str, info: DistInfo, prints: dict[str, str],
                  role: str):
    """A model for forwards only: eval mode, no gradients, weights in the autocast dtype; under
    torchrun sharded across the processes (``distributed.shard_frozen``); its fingerprint in
    ``prints[role]`` (``record_fingerprint``)."""
    from ember.models.loading import load_pretrained

    dtype = {"bf16": "bfloat16", "fp16": "float16"}.get(precision, "float32")
    model, tokenizer = load_pretrained(name, dtype, build_device(info))
    record_fingerprint(prints, role, model.requires_grad_(False), info)
    return shard_frozen(model, info), tokenizer


def record_fingerprint(prints: dict[str, str], role: str, model, info: DistInfo) -> None:
    """``prints[role]``: ``state.base_fingerprint`` of a frozen model an objective reads from
    its files at every start (a checkpoint does not hold it: a resume onto other files is
    refused, ``state.restore``). Rank 0 only, on the weights as read, before ``shard_frozen``
    (the other ranks hold none; the trainer broadcasts rank 0's)."""
    if info.is_main:
        from ember.engine.state import base_fingerprint  # (state imports this module)

        prints[role] = base_fingerprint(model)


class SFT:
    """Plain supervised fine-tuning; the base of the other objectives."""

    name = "sft"
    pairs = False  # trains on preference pairs

    def __init__(self, info: DistInfo | None = None):
        self.sums: dict[str, float] = {}
        self.info = info or DistInfo()  # the processes evaluation is shared by
        self.prompt_tuned = False  # set by check_model: token 0 of text lines is a loss term
        self.prints: dict[str, str] = {}  # record_fingerprint's, by role (rank 0)

    def weight(self, batch) -> int:
        return sft_loss_tokens(batch, self.prompt_tuned)

    def loss(self, model, batch, denom: int) -> torch.Tensor:
        return sft_loss(model, batch, denom)

    def check_model(self, model, tokenizer) -> None:
        self.prompt_tuned = num_virtual_tokens(model) > 0

    def frozen_models(self) -> dict[str, torch.nn.Module]:
        """The objective's own forward-only models by role (a teacher, a reference copy)."""
        return {}

    def end_step(self, model, step: int) -> None:
        """After optimizer step ``step`` (1-based, applied or skipped), before its evaluation
        and checkpoint (TR-DPO mixes the policy into DPO's / KTO's reference here)."""

    def save_state(self, step_dir, info: DistInfo) -> None:
        """Write what the objective trains besides the model into checkpoint ``step_dir``."""

    def load_state(self, step_dir, info: DistInfo) -> None:
        """Load ``save_state``'s from checkpoint ``step_dir`` at a resume."""

    def fingerprints(self, model) -> dict[str, str]:
        """Rank 0, on the built ``model`` before sharding: fingerprints by role of what the
        objective reads from files at every start and the checkpoints do not hold (its frozen
        models; a continued adapter as loaded, DPO's / KTO's reference), for ``state.save`` /
        ``state.restore``."""
        return dict(self.prints)

    def load_datasets(self, cfg: DataConfig, tokenizer) -> Datasets:
        return load_datasets(cfg, tokenizer)

    def task_eval(self, model, tokenizer, examples: list[Example], ev, autocast
                  ) -> GenerationResult:
        """``eval.metrics`` on a split (``ev``: the EvalConfig): greedy generation here."""
        return generation_eval(model, tokenizer, examples, ev.metrics,
                               max_new_tokens=ev.max_new_tokens, batch_size=ev.batch_size,
                               autocast=autocast, max_examples=ev.max_examples, show=ev.show,
                               info=self.info, think_end=ev.think_end)

    def check_task_split(self, model, examples: list[Example], ev) -> None:
        """EmberError now, before training, when ``task_eval`` could not score ``examples``."""
        generation_examples(model, examples, ev.max_new_tokens, ev.max_examples, ev.metrics,
                            ev.think_end)

    def prepare(self, model, ds: Datasets, tokens_per_batch: int, device, autocast, echo, *,
                prints: dict[str, str] | None = None) -> None:
        """Before the first step, with the model built and the data loaded (DPO / KTO precompute
        their reference log-probs here; ``prints``: the weight fingerprints a checkpoint records,
        keying the values they keep for a resume)."""

    def check_data(self, ds: Datasets) -> None:
        for split, examples in (("train", ds.train), ("validation", ds.validation)):
            bad = next((e for e in examples if bool(e.parts) != self.pairs), None)
            if bad is None:
                continue
            if self.pairs:
                raise EmberError(f"{bad.source}: objective = \"{self.name}\" trains on preference "
                                 "lines {\"prompt\", \"chosen\", \"rejected\"}; this " + split
                                 + " line is not one")
            raise EmberError(f"{bad.source}: a preference line (chosen/rejected) in the {split} "
                             "data; set objective = \"dpo\", \"orpo\", \"simpo\" or \"cpo\" to "
                             "train on preference pairs (or, for a file that also has the chosen "
                             "conversation as \"messages\", data.format = \"messages\")")

    def begin_step(self, micro: list, reduce: Callable[[list[float]], list[float]], model=None,
                   device=None, autocast=None, pad: list = ()) -> None:
        """Called with all of a step's micro-batches before their losses (``reduce``: sums a list
        of floats over the processes), for a loss normalized by a step-wide count (KTO: its KL
        term, scored with ``model`` on ``device`` under ``autocast``). ``pad``: batches this rank
        makes passes on that count for nothing (``Trainer._step``); an objective that makes
        forwards here makes them on those too."""

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
        self.teacher, self.teacher_tok = _frozen_model(self.cfg.teacher, cfg.precision, info,
                                                         self.prints, "teacher")
        if self.teacher.cfg.labels is not None:
            # a tied classifier would otherwise "distill" through its input embeddings
            raise EmberError(f"distill.teacher {self.cfg.teacher!r} is a sequence classifier "
                             f"({len(self.teacher.cfg.labels)} label(s): a reward or "
                             "classification model, transformers' *ForSequenceClassification) "
                             "with no next-token distribution to distill from; pick a causal "
                             "language model (*ForCausalLM) as the teacher")

    def frozen_models(self) -> dict[str, torch.nn.Module]:
        return {"teacher": self.teacher}

    def check_model(self, model, tokenizer) -> None:
        super().check_model(model, tokenizer)  # a prompt-tuned student's token 0 terms (weight)
        v_s, v_t = model.cfg.vocab_size, self.teacher.cfg.vocab_size
        vocab = getattr(getattr(tokenizer, "backend", None), "get_vocab", None)
        t_vocab = getattr(getattr(self.teacher_tok, "backend", None), "get_vocab", None)
        if vocab is not None and t_vocab is not None and vocab() != t_vocab():
            raise EmberError(f"distill.teacher {self.cfg.teacher!r} does not share the student's "
                             "vocabulary (its tokenizer has other tokens or ids); distillation "
                             "compares next-token distributions token by token, so pick a "
                             "teacher with the student's tokenizer")
        if v_s != v_t:
            tokens = len(vocab()) if vocab is not None else None
            fits = (f"; all {tokens} of the tokenizer's tokens fit, so nothing is lost"
                    if tokens is not None and tokens <= min(v_s, v_t) else "")
            raise EmberError(
                f"distill.teacher {self.cfg.teacher!r} does not share the student's "
                f"vocabulary size: the teacher's embeddings have {v_t} rows, the student's "
                f"{v_s} (a family pads them to different sizes, e.g. Qwen2.5-7B 152064 and "
                "0.5B 151936); distillation compares the two next-token distributions row by "
                f"row, so resize the larger model's embeddings to {min(v_s, v_t)} (transformers: "
                f"model.resize_token_embeddings({min(v_s, v_t)}), then save_pretrained){fits}")

    def loss(self, model, batch, denom: int) -> torch.Tensor:
        c = self.cfg
        loss, kd, sft = distill_sft_loss(model, self.teacher, batch, denom, c.temperature,
                                         c.alpha)
        release(self.teacher)
        self._add(kd_loss=kd, sft_loss=sft)
        return loss


def check_teacher(cfg: TrainConfig) -> None:
    """A [distill] table without the objective would train without its teacher, silently: an
    error (``state.open_run`` checks it before the run directory is written)."""
    if cfg.distill.teacher is not None and cfg.objective != "distill":
        raise EmberError(f"distill.teacher is set ({cfg.distill.teacher!r}) but objective = "
                         f"{cfg.objective!r}, which has no teacher: set objective = \"distill\" "
                         "to distill from it, or drop distill.teacher")


def make_objective(cfg: TrainConfig, info: DistInfo, *, trained: bool = False) -> SFT:
    """The objective of a resolved config (loads the teacher / reference model when needed,
    sharded across the processes of ``info``). ``trained``: the config of a run that trained
    already (resumed from a checkpoint, evaluated), which an older Ember ran with a stray
    distill.teacher (``check_teacher``): it continues as it ran."""
    if not trained:
        check_teacher(cfg)
    if cfg.head.type == "classification":
        from ember.engine.classification import Classification

        return Classification(cfg, info)
    if cfg.head.type is not None:  # one output: "reward" or "regression"
        from ember.engine.reward import HEAD_OBJECTIVES

        return HEAD_OBJECTIVES[cfg.head.type](cfg, info)
    if cfg.objective == "distill":
        return Distill(cfg, info)
    if cfg.objective == "kto":
        from ember.engine.kto import KTO

        return KTO(cfg, info)
    if cfg.objective in PREFERENCE_OBJECTIVES:
        from ember.engine.preference_objectives import PREFERENCE  # it imports this module

        return PREFERENCE[cfg.objective](cfg, info)
    return SFT(info)
