"""The reference of DPO and KTO (``Referenced``, mixed into ``DPO`` in
``engine/preference_objectives.py`` and ``KTO`` in ``engine/kto.py``): the starting model with its
LoRA adapters switched off, a frozen copy of the starting weights (full fine-tuning) or the earlier
stage's adapter swapped in; and ``precompute_ref_log_probs``'s one pass before training
(``attach_ref_logps``)."""

from __future__ import annotations

import contextlib
import gc
import time
from typing import TYPE_CHECKING

import torch

from ember import EmberError
from ember.engine.distributed import DistInfo, build_device, release, shard_frozen
from ember.engine.evaluation import eval_plan, scored_batches
from ember.engine.losses import DocLogprobs, adapters_disabled, answer_counts, doc_logprobs
from ember.engine.objectives import record_fingerprint
from ember.engine.reference_cache import (
    cache_key,
    cache_path,
    forward_settings,
    load_cached,
    save_cached,
)
from ember.engine.reference_sync import (
    check_sync,
    load_reference,
    save_reference,
    sync_reference,
)
from ember.engine.stage_reference import adapter_snapshot, adapters_swapped
from ember.engine.stages import continues_lora, frozen_start
from ember.models.lora_init import changes_base

if TYPE_CHECKING:
    from ember.engine.config import TrainConfig
    from ember.engine.data import Datasets, Example


def _weights_dtype(cfg: TrainConfig) -> str:
    """The trained model's weights dtype of a full fine-tune (``model.dtype``; "auto": fp32
    masters, ``runtime``'s rule)."""
    return "float32" if cfg.model.dtype == "auto" else cfg.model.dtype


class Referenced:
    """The reference of DPO and KTO: the starting model, i.e. the same model with its LoRA
    adapters switched off; with full fine-tuning a frozen copy of the starting weights; after
    ``model.init`` the earlier stage's result (a continued adapter: its weights swapped in)."""

    def _init_reference(self, cfg: TrainConfig, info: DistInfo, precompute: bool) -> None:
        self.ref_model, self.ref_adapters = None, None
        self.precompute, self.released = precompute, False
        sec = getattr(cfg, self.name)  # [dpo] / [kto]
        # TR-DPO (engine/reference_sync.py): (alpha, every that many steps), or None
        self.sync = None
        if sec.sync_ref_model:
            check_sync(self.name, cfg.method)
            self.sync = (sec.ref_model_mixup_alpha, sec.ref_model_sync_steps)
        # where and under which settings a precompute is kept for a resume (reference_cache)
        self.cache_dir = cfg.out_dir
        self.cache_settings = forward_settings(cfg)
        # a continued adapter: a frozen copy of it; so for PiSSA / OLoRA's starting adapters
        # (with them off the model is the residual base, not the starting model)
        self.snapshot = continues_lora(cfg) or (cfg.method == "lora"
                                                and changes_base(cfg.lora.init))
        if cfg.method == "full":  # no adapters to switch off: a frozen copy is the reference
            if self.sync is None:  # forwards only: in the autocast dtype
                ref = frozen_start(cfg, build_device(info))
                record_fingerprint(self.prints, "reference", ref, info)
                self.ref_model = shard_frozen(ref, info)
            else:  # TR-DPO mixes the policy in: in its dtype (fp32 masters), as TRL builds it
                ref = frozen_start(cfg, build_device(info), _weights_dtype(cfg))
                record_fingerprint(self.prints, "reference", ref, info)
                self.ref_model = shard_frozen(ref, info, cfg.dist.mixed_precision)

    def frozen_models(self) -> dict[str, torch.nn.Module]:
        return {} if self.ref_model is None else {"reference": self.ref_model}

    def end_step(self, model, step: int) -> None:
        """TR-DPO: after optimizer step ``step``, a multiple of ``ref_model_sync_steps``, the
        reference becomes ``alpha * model + (1 - alpha) * reference`` (TRL's
        ``SyncRefModelCallback.on_step_end``)."""
        if self.sync is not None and step % self.sync[1] == 0:
            sync_reference(self.ref_model, model, self.sync[0])

    def save_state(self, step_dir, info: DistInfo) -> None:
        """TR-DPO's reference is training state: into checkpoint ``step_dir`` with the model."""
        if self.sync is not None:
            save_reference(step_dir, self.ref_model, info)

    def load_state(self, step_dir, info: DistInfo) -> None:
        """TR-DPO: the mixed reference of checkpoint ``step_dir`` (refused when it has none)."""
        if self.sync is not None:
            load_reference(step_dir, self.ref_model, info, self.name)

    def fingerprints(self, model) -> dict[str, str]:
        prints = super().fingerprints(model)
        if self.snapshot:  # the adapter as loaded from model.init (trained: not in the base's)
            from ember.engine.state import base_fingerprint  # (state imports objectives)

            prints["reference adapter"] = base_fingerprint(model, trained=True)
        return prints

    def check_model(self, model, tokenizer) -> None:
        if self.snapshot:  # the built model holds the adapter as loaded (before any resume)
            self.ref_adapters = adapter_snapshot(model)

    def reference(self, model):
        if self.ref_model is not None:
            return contextlib.nullcontext(self.ref_model)
        if self.ref_adapters is not None:
            return adapters_swapped(model, self.ref_adapters)
        return adapters_disabled(model)

    def _scored(self, model, batch) -> DocLogprobs:
        """The log-probs a reference forward gives (DPO's LD-DPO weighs them)."""
        return doc_logprobs(model, batch)

    def needs_live_reference(self) -> bool:
        """Whether batches that carry no precomputed log-probs are scored during training."""
        return False

    def prepare(self, model, ds: Datasets, tokens_per_batch: int, device, autocast, echo, *,
                prints: dict[str, str] | None = None) -> None:
        """``precompute_ref_log_probs``: one pass of the reference (eval mode, no gradients) over
        the training and validation examples before the first step, each document's summed answer
        log-prob (``_scored``'s: LD-DPO's weighted sum) kept on its example (``Example.ref_logps``,
        carried into ``Batch.ref_sums``), so the steps and evaluations run no reference forward;
        a full fine-tune's frozen copy is then released unless live scoring still needs it (KTO's
        mismatched KL documents). With ``prints`` (the reference's weight fingerprints by role)
        the values are saved in the run directory and a resume under the same key loads them
        (``engine/reference_cache.py``)."""
        if not self.precompute:
            return
        t0 = time.perf_counter()
        splits = {"train": ds.train, "validation": ds.validation,
                  **{f"validation/{k}": v for k, v in ds.val_sources.items()}}
        key = None if prints is None else cache_key(splits, prints, self.cache_settings)
        loaded = 0
        if key is not None:
            loaded, why = load_cached(self.cache_dir, splits, key, self.info)
            if why:
                echo(f"{self.name}: saved reference log-probs do not apply ({why}): computing "
                     "them again")
        n = 0
        for examples in splits.values():
            todo = [e for e in examples if e.ref_logps is None]
            if todo:
                n += attach_ref_logps(todo, lambda b: self.ref_logprobs(model, b), model,
                                      tokens_per_batch, device, autocast, self.info)
        if n and key is not None:
            save_cached(self.cache_dir, splits, key, self.info)
        done = [f"{n} documents precomputed"] if n or not loaded else []
        if loaded:
            done.append(f"{loaded} {'' if done else 'documents '}loaded from "
                        f"{cache_path(self.cache_dir)}")
        note = ""
        if self.ref_model is not None and not self.needs_live_reference():
            self.ref_model, self.released = None, True
            gc.collect()
            note = "; the frozen reference copy is released"
        echo(f"{self.name}: reference log-probs of {' and '.join(done)} in "
             f"{time.perf_counter() - t0:.1f} s{note}")

    def ref_logprobs(self, model, batch) -> DocLogprobs:
        """The reference's ``doc_logprobs`` of a batch (no gradients): the precomputed values when
        the batch carries them (``prepare``), else one forward of the reference."""
        if batch.ref_sums is not None:
            return DocLogprobs(batch.ref_sums, answer_counts(batch).float())
        if self.released:
            raise EmberError(f"internal: a {self.name} batch has no precomputed reference "
                             "log-probs and the reference model was released")
        with torch.no_grad(), self.reference(model) as ref:
            lp = self._scored(ref, batch)
        if self.ref_model is not None:
            release(self.ref_model)
        return lp


def attach_ref_logps(examples: list[Example], score, model, tokens_per_batch: int, device,
                     autocast, info: DistInfo) -> int:
    """Set ``Example.ref_logps`` of every example from ``score(batch)`` (a ``DocLogprobs``) over
    the evaluation batches (under torchrun each process its share, all results gathered);
    returns the number of documents scored."""
    sums = scored_batches(model, examples, tokens_per_batch, device,
                          lambda b: score(b).sums.float().cpu().tolist(), autocast, info=info)
    n = 0
    for idx, row in zip(eval_plan(examples, tokens_per_batch), sums, strict=True):
        for i in idx:
            k = len(examples[i].doc_lengths)
            examples[i].ref_logps, row, n = tuple(row[:k]), row[k:], n + k
        assert not row, "documents left over: the evaluation plan changed"
    return n
