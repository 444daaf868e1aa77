"""KTO (``objective = "kto"``; Ethayarajh et al. 2024, TRL's ``KTOTrainer``): unpaired completions,
each labelled desirable or not, against a reference (the same as DPO's: adapters off, a frozen
copy with full fine-tuning, the earlier stage after ``model.init``).

Data lines (TRL's unpaired format), loss on the completion tokens only:

    {"prompt": "...", "completion": "...", "label": true}                       strings
    {"prompt": [messages], "completion": [assistant message(s)], "label": false}    chat
    {"prompt": ..., "chosen": ..., "rejected": ...}   a preference pair (any DPO shape), split
        into a desirable and an undesirable example as TRL's ``unpair_preference_dataset`` does

A missing label or one other than true / false (or 1 / 0, as TRL casts it), an empty prompt or
completion, mixed string / message fields are bad lines (``file:line: reason``). Each example is
one packed document carrying its label (``Example.desirable`` -> ``Batch.desirable``); generation
metrics use the desirable ones.

Loss (``preference_losses.kto_loss``): with summed completion log-probs ``r = pi - ref``,
desirable ``w_d (1 - s(beta (r - z)))``, undesirable ``w_u (1 - s(beta (z - r)))``, rewards
``beta r``. ``z`` is TRL's KL estimate: the mean of ``pi - ref`` over mismatched documents
(prompt i + completion of document i - 1, cyclic, as TRL rotates completions within a batch;
if those share their prompt, as a pair's two halves may, the nearest earlier document with
another prompt), clamped at 0 and detached. ``loss_type = "apo_zero_unpaired"`` has no KL term.

What "the batch" is. The mismatched documents are built per packed micro-batch (TRL: per device
batch), each cut at ``data.max_seq_len``, and scored in one forward of the policy and one of the
reference, both without gradients, before any loss of the step (``begin_step``; every process
makes as many). ``z`` is their mean over the whole optimizer step: all micro-batches of all
processes pooled, each mismatched document weighing 1 (TRL: per micro-batch, the mean of the
devices' means; the same with one micro-batch of equal-sized device batches). Each example
weighs 1: the losses are summed and divided by the examples of the step, all processes (TRL's
mean over its batch). So one process with ``grad_accum = 1`` is TRL's batch exactly, and a step
of the same packed batches gives the same loss on any number of processes and ``grad_accum``
(N x grad_accum constant), as SFT does; batches packed differently (``tokens_per_batch``) pair
other documents. A one-document micro-batch has no mismatched pair: it adds nothing to ``z``
(a step without any has ``z = 0``); ``tokens_per_batch`` must hold two ``max_seq_len`` examples.
Validation: each batch's own documents, one ``z`` for the whole validation set.

Metrics per step (TRL's ``rewards/chosen``, ``rewards/rejected``, ``rewards/margins``, ``kl``,
``logps/chosen``, ``logps/rejected``): ``chosen_reward``, ``rejected_reward``, ``reward_margin``,
``kl``, ``chosen_logps``, ``rejected_logps`` (means over the desirable / undesirable examples of
the step; a side with none is left out), ``val_*`` of each and ``val_loss`` at evaluations.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ember import EmberError
from ember.engine import hfdatasets
from ember.engine.data import (
    IGNORE,
    Batch,
    DataConfig,
    Datasets,
    Example,
    _Bad,
    _cut_prompt,
    _Reader,
    _type_name,
    collate,
    json_object,
    load_datasets,
    load_examples,
)
from ember.engine.distributed import DistInfo
from ember.engine.evaluation import scored_batches
from ember.engine.formats import (
    check_no_images,
    parse_messages,
    parse_template_kwargs,
    parse_tools,
)
from ember.engine.losses import doc_logprobs
from ember.engine.objectives import SFT
from ember.engine.preference import (
    answer_generation_prompt,
    answer_messages,
    encode_answer,
    parse_pair,
)
from ember.engine.preference_configs import check_sync_settings
from ember.engine.preference_losses import KTO_LOSS_TYPES, UnpairedLosses, kto_loss
from ember.engine.preference_reference import Referenced

if TYPE_CHECKING:
    from ember.engine.config import TrainConfig


@dataclass(frozen=True, kw_only=True)
class KTOConfig:
    beta: float = 0.1  # strength of the pull towards the reference (higher: stay closer)
    # Weight of each desirable example's loss; KTO paper eq. 8: keep desirable_weight *
    # n_desirable / (undesirable_weight * n_undesirable) in [1, 4/3]
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0  # weight of each undesirable example's loss
    # "kto" (KL term from mismatched pairs) | "apo_zero_unpaired" (APO-zero, no KL term)
    loss_type: str = "kto"
    # Score every completion with the reference once, before training (eval mode), as
    # dpo.precompute_ref_log_probs; the KL term's mismatched documents are still scored per step
    # (they change with each batch), so a full fine-tune keeps its frozen copy with loss "kto"
    precompute_ref_log_probs: bool = False
    # Turn off, for the run, the dropout its training forwards draw (lora.dropout, Phi's
    # residual/embedding dropout; model.attention_dropout stays, as TRL leaves it):
    # TRL's disable_dropout, default on
    disable_dropout: bool = True
    # TR-DPO's reference updates, as dpo.sync_ref_model (TRL's KTOConfig has them too)
    sync_ref_model: bool = False
    ref_model_mixup_alpha: float = 0.6  # TR-DPO's alpha: the policy's share of each update
    ref_model_sync_steps: int = 512  # TR-DPO's tau: optimizer steps between reference updates

    def __post_init__(self) -> None:
        check_sync_settings("kto", self)
        if self.loss_type not in KTO_LOSS_TYPES:
            raise EmberError(f"kto.loss_type must be one of "
                             f"{', '.join(map(repr, KTO_LOSS_TYPES))}, got {self.loss_type!r}")
        if not (self.beta > 0 and math.isfinite(self.beta)):
            raise EmberError(f"kto.beta must be > 0, got {self.beta}")
        for name in ("desirable_weight", "undesirable_weight"):
            w = getattr(self, name)
            if not (w >= 0 and math.isfinite(w)):
                raise EmberError(f"kto.{name} must be >= 0, got {w}")
        if not (self.desirable_weight or self.undesirable_weight):
            raise EmberError("kto.desirable_weight and kto.undesirable_weight are both 0: "
                             "nothing would be learned")


# --- data ----------------------------------------------------------------------------------------

def parse_unpaired(obj: dict) -> list[tuple]:
    """(prompt, completion, desirable) records of one line, validated; raises _Bad."""
    check_no_images(obj)
    tools = parse_tools(obj)  # (a table's null or empty column is none)
    if isinstance(obj.get("prompt"), str) and (tools or parse_template_kwargs(obj)):
        key = "tools" if tools else "chat_template_kwargs"
        raise _Bad("wrong type", f"field {key!r} needs chat lines (message lists): a chat "
                                 "template renders it; string lines have none")
    if "chosen" in obj or "rejected" in obj:
        if "label" in obj or "completion" in obj:
            raise _Bad("wrong shape", "a KTO line is either {prompt, completion, label} or a "
                                      "pair {prompt, chosen, rejected}, not both")
        pair = parse_pair(obj)
        return [(pair.prompt, pair.chosen, True), (pair.prompt, pair.rejected, False)]
    for key in ("prompt", "completion", "label"):
        if key not in obj:
            raise _Bad("missing field", f"missing field {key!r} (KTO lines are {{\"prompt\", "
                                        f"\"completion\", \"label\": true|false}} or preference "
                                        f"pairs; keys present: {sorted(obj)})")
    label = obj["label"]
    if isinstance(label, str) and label.strip().lower() in ("true", "false"):
        label = label.strip().lower() == "true"  # a CSV cell
    elif type(label) in (int, float) and label in (0, 1):
        label = bool(label)  # 0/1, as TRL's collator casts it (an int column of pandas/datasets)
    if not isinstance(label, bool):
        raise _Bad("wrong type", f"field 'label' must be true (desirable) or false, got "
                                 f"{_type_name(label)} {label!r} (1 / 0 read as true / false)")
    prompt, completion = obj["prompt"], obj["completion"]
    if isinstance(prompt, str) and isinstance(completion, str):
        if not prompt.strip():
            raise _Bad("empty prompt", "empty prompt")
        if not completion.strip():
            raise _Bad("empty completion", "empty completion")
        return [(prompt, completion, label)]
    if isinstance(prompt, list) and isinstance(completion, list):
        msgs = parse_messages(completion, "completion")
        try:  # one assistant message, or a tool call, its result, the answer (as TRL scores)
            answer = answer_messages(msgs, "completion")
        except _Bad:
            raise _Bad("wrong shape", f"completion must be exactly one assistant message (or "
                                      "assistant and tool messages ending with the answer), got "
                                      f"roles {[m['role'] for m in msgs]}") from None
        return [(parse_messages(prompt, "prompt"), answer, label)]
    raise _Bad("wrong type", f"prompt and completion must be both strings or both message "
                             f"arrays, got {_type_name(prompt)} and {_type_name(completion)}")


class _KTOReader(_Reader):
    def example(self, lineno: int, raw: bytes) -> list[Example] | None:
        line = self.text(lineno, raw)
        if line is None:
            return None
        try:
            obj = json_object(line)
            records = parse_unpaired(obj)
            self.fmt = self.fmt or ("kto pairs" if len(records) == 2 else "kto")
            extra = parse_tools(obj), parse_template_kwargs(obj)  # chat lines' (as TRL)
            docs = [encode_answer(self.enc, p, c, *extra) for p, c, _ in records]
        except _Bad as e:
            self.bad(lineno, e.kind, e.why)
            return None
        out = []
        for k, ((prompt, answer, desirable), doc) in enumerate(zip(records, docs, strict=True)):
            fitted = self._fit(lineno, *doc[:3])
            if fitted is None:
                continue
            ids, labels, prompt_len, _ = fitted  # KTO refuses prompt tuning
            key = hashlib.blake2b(f"{line.strip()}\0{k}".encode(), digest_size=16).hexdigest()
            # generation metrics' prompt (a desirable completion is a reference)
            gen = (answer_generation_prompt(self.enc, prompt, answer, *extra, doc)
                   if desirable else None)
            if gen is not None:
                gen = _cut_prompt(gen, doc[2] - prompt_len, self._bos(doc[0]))
            out.append(Example(ids, labels, self.where(lineno), prompt_len,
                               doc[3] if desirable else None, key, desirable=desirable,
                               generation_prompt=gen))
        return out or None


class _KTOTestReader(_KTOReader):
    """The test split of a KTO run only gives generation metrics their prompts and references:
    a file of KTO lines (its desirable completions are the references, as in training) or, like
    any other run's test split, plain SFT lines (prompt/completion, messages, ...). The first
    line decides which."""

    plain: bool | None = None

    def example(self, lineno: int, raw: bytes) -> list[Example] | Example | None:
        if self.plain is None:
            try:
                obj = json_object(raw.decode("utf-8-sig"))
            except (UnicodeDecodeError, _Bad):
                obj = None
            if isinstance(obj, dict):
                self.plain = not {"label", "chosen", "rejected"} & obj.keys()
        if self.plain:
            return _Reader.example(self, lineno, raw)
        return super().example(lineno, raw)


def load_kto_examples(path: str | Path, cfg: DataConfig, tokenizer):
    """(examples, DataReport) of one KTO file; bad lines as ``data.load_examples``."""
    examples, rep = load_examples(path, cfg, tokenizer, lambda p: _KTOReader(p, cfg, tokenizer))
    good = sum(bool(e.desirable) for e in examples)
    rep.format += f": {good} desirable, {len(examples) - good} undesirable"
    return examples, rep


# --- the mismatched (KL) documents ---------------------------------------------------------------

def _documents(batch: Batch) -> list[tuple[list[int], list[int], int]]:
    """(ids, labels, index of the first label) of every document of a packed batch."""
    ids, labels = batch.input_ids[0].tolist(), batch.labels[0].tolist()
    cu = batch.cu_seqlens.tolist()
    out = []
    for a, b in zip(cu[:-1], cu[1:], strict=True):
        first = next((t for t in range(a, b) if labels[t] != IGNORE), None)
        if first is None:
            raise EmberError("KTO: a document without completion tokens")
        out.append((ids[a:b], labels[a:b], first - a))
    return out


def _partner(docs: list, i: int) -> int:
    """The nearest document before ``i`` (cyclic) with another prompt: TRL's i - 1, unless
    neighbours share their prompt (a DPO pair's two halves); i - 1 when all prompts are one."""
    prompt = docs[i][0][:docs[i][2] + 1]
    return next((j % len(docs) for j in range(i - 1, i - len(docs), -1)
                 if docs[j][0][:docs[j][2] + 1] != prompt), i - 1)


def kl_documents(batch: Batch, max_len: int) -> Batch:
    """The mismatched documents of a packed batch: the prompt of document i (its tokens up to
    its first completion token) + the completion of document i - 1 (cyclic; the nearest earlier
    one with another prompt: ``_partner``), labels on that completion only, cut at ``max_len``.
    A batch of one document gives it back (its own pair: not mismatched)."""
    docs, group = _documents(batch), []
    for i, (ids, _, f) in enumerate(docs):
        ids_j, labels_j, f_j = docs[_partner(docs, i)]
        kl_ids, kl_labels = ids[:f + 1] + ids_j[f_j + 1:], [IGNORE] * f + labels_j[f_j:]
        if len(kl_ids) > max_len:  # TRL cuts its KL sequences at max_length, on the right
            kl_ids, kl_labels = kl_ids[:max_len], kl_labels[:max_len - 1] + [IGNORE]
        group.append(Example(kl_ids, kl_labels, "kl"))
    return collate(group)


# --- the objective -------------------------------------------------------------------------------

class KTO(Referenced, SFT):
    name = "kto"

    def __init__(self, cfg: TrainConfig, info: DistInfo):
        super().__init__(info)
        self.cfg, d = cfg.kto, cfg.data
        self.max_len = d.max_seq_len
        if d.loss_on != "completion":
            raise EmberError("objective = \"kto\" scores the completions only: set data.loss_on "
                             "= \"completion\"")
        if self.cfg.loss_type == "kto" and d.tokens_per_batch < 2 * d.max_seq_len:
            raise EmberError(f"objective = \"kto\" estimates its KL term from the other examples "
                             f"of a batch: data.tokens_per_batch ({d.tokens_per_batch}) must hold "
                             f"at least two examples of data.max_seq_len ({d.max_seq_len})")
        self._init_reference(cfg, info, self.cfg.precompute_ref_log_probs)
        self.kl = 0.0  # the step's raw KL estimate, all processes

    @property
    def uses_kl(self) -> bool:
        return self.cfg.loss_type == "kto"

    def needs_live_reference(self) -> bool:
        return self.uses_kl  # the KL documents: other prompts' completions, new each batch

    def weight(self, batch) -> int:
        return batch.num_docs

    @hfdatasets.one_walk()  # each datasets folder walked once for its splits and the test's
    def load_datasets(self, cfg: DataConfig, tokenizer) -> Datasets:
        cfg = hfdatasets.named_splits(cfg)  # data.test read here, not by load_datasets
        ds = load_datasets(replace(cfg, test=None), tokenizer, load_kto_examples)
        if cfg.test is not None:
            ds.test, rep = load_examples(cfg.test, cfg, tokenizer,
                                         lambda p: _KTOTestReader(p, cfg, tokenizer))
            if rep.format in ("kto", "kto pairs"):
                good = sum(bool(e.desirable) for e in ds.test)
                rep.format += f": {good} desirable, {len(ds.test) - good} undesirable"
            ds.reports.append(rep)
        return ds

    def _kl_sums(self, model, batches: list[Batch], device, autocast) -> tuple[float, int]:
        """(sum of policy - reference log-probs, documents) of the batches' mismatched documents.
        A one-document batch is scored (every process makes as many forwards) but not counted."""
        total, n, autocast = 0.0, 0, autocast or contextlib.nullcontext
        for b in batches:
            kl = kl_documents(b, self.max_len).to(device)
            with torch.no_grad(), autocast():
                diff = doc_logprobs(model, kl).sums - self.ref_logprobs(model, kl).sums
            if kl.num_docs > 1:
                total, n = total + float(diff.sum()), n + kl.num_docs
        return total, n

    def begin_step(self, micro: list, reduce, model=None, device=None, autocast=None,
                   pad: list = ()) -> None:
        self.kl = 0.0
        if self.uses_kl:
            total, n = self._kl_sums(model, micro, device, autocast)
            self._kl_sums(model, pad, device, autocast)  # as many forwards as the other ranks
            total, n = reduce([total, float(n)])
            self.kl = total / max(n, 1.0)

    def _losses(self, model, batch, kl: float) -> tuple[UnpairedLosses, torch.Tensor]:
        ref = self.ref_logprobs(model, batch).sums
        lp = doc_logprobs(model, batch).sums
        c = self.cfg
        out = kto_loss(lp, ref, batch.desirable, kl, c.beta, c.desirable_weight,
                       c.undesirable_weight, c.loss_type)
        return out, lp.detach()

    @staticmethod
    def _sums(out: UnpairedLosses, logps: torch.Tensor, good: torch.Tensor) -> dict[str, float]:
        bad = ~good
        return {"chosen_n": float(good.sum()), "rejected_n": float(bad.sum()),
                "chosen_reward": float(out.rewards[good].sum()),
                "rejected_reward": float(out.rewards[bad].sum()),
                "chosen_logps": float(logps[good].sum()),
                "rejected_logps": float(logps[bad].sum())}

    def loss(self, model, batch, denom: int) -> torch.Tensor:
        out, logps = self._losses(model, batch, self.kl)
        self._add(**self._sums(out, logps, batch.desirable))
        return out.losses.sum() / denom

    def _finish(self, sums: dict[str, float], kl: float | None = None) -> dict[str, float]:
        nc, nr = sums.pop("chosen_n", 0.0), sums.pop("rejected_n", 0.0)
        out = {}
        if "loss" in sums:
            out["loss"] = sums.pop("loss") / max(nc + nr, 1.0)
        for side, n in (("chosen", nc), ("rejected", nr)):
            if n:
                out[f"{side}_reward"] = sums[f"{side}_reward"] / n
                out[f"{side}_logps"] = sums[f"{side}_logps"] / n
        if nc and nr:
            out["reward_margin"] = out["chosen_reward"] - out["rejected_reward"]
        out["kl"] = max(self.kl if kl is None else kl, 0.0) if self.uses_kl else 0.0
        return out

    def val_scores(self, model, examples: list[Example], tokens_per_batch: int, device,
                   autocast, max_batches: int | None) -> dict[str, float]:
        def score(batch) -> tuple:
            kl_part = self._kl_sums(model, [batch], device, autocast) if self.uses_kl else (0, 0)
            ref = self.ref_logprobs(model, batch).sums.float().cpu()
            pol = doc_logprobs(model, batch).sums.float().cpu()
            return kl_part, pol, ref, batch.desirable.cpu()

        scored = scored_batches(model, examples, tokens_per_batch, device, score, autocast,
                                max_batches, self.info)  # every batch's, in file order
        kl_sum = sum(kl_part[0] for kl_part, *_ in scored)
        kl = kl_sum / max(sum(kl_part[1] for kl_part, *_ in scored), 1.0)
        c = self.cfg
        sums = dict.fromkeys(("loss", "chosen_n", "rejected_n", "chosen_reward",
                              "rejected_reward", "chosen_logps", "rejected_logps"), 0.0)
        for _, pol, ref, good in scored:
            out = kto_loss(pol, ref, good, kl, c.beta, c.desirable_weight, c.undesirable_weight,
                           c.loss_type)
            for k, v in {"loss": float(out.losses.sum()), **self._sums(out, pol, good)}.items():
                sums[k] += v
        return {f"val_{k}": v for k, v in self._finish(sums, kl).items()}
