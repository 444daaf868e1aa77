"""Task heads on ``Transformer``: sequence classification, as HF's ``*ForSequenceClassification``.

A classifier is a ``Transformer`` whose config has ``labels`` (class names in index order): it
has ``score = Linear(D, num_labels, bias=False)`` and no LM head, and a document's class logits
are ``score`` of the final hidden state of its last non-pad token. That is transformers' pooling
rule (``GenericForSequenceClassification``): the rightmost position whose id is not
``pad_token_id`` (the last position when there is no pad id; position 0 when every token is pad).
Padded rows (B, T) pool per row; packed batches (B == 1, ``cu_seqlens``) pool per document, so
they need no padding at all.

HF interop: ``config.json`` gets ``architectures = [<Family>ForSequenceClassification]``,
``num_labels``, ``id2label``, ``label2id``, ``problem_type = "single_label_classification"``
(``labels_to_hf`` / ``labels_from_hf``); the weight is ``score.weight`` under the same name.
A one-output head (one label, ``num_labels = 1``) is a reward model (``problem_type`` unset, as
TRL's RewardTrainer saves it) or a regression head (``problem_type = "regression"``: transformers
then computes MSE); ``ModelConfig.problem_type`` carries which. A tokenizer without a pad token
gets the token of ``pad_token_id`` (``name_pad_token``), so the folder's tokenizer pads batches for
transformers' classifier.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence

import torch
import torch.nn as nn

from ember import EmberError

PROBLEM_TYPE = "single_label_classification"


def labels_from_hf(raw: Mapping, architecture: str) -> tuple[str, ...] | None:
    """The class names of a config.json whose architectures is ``[architecture]`` (a
    ``*ForSequenceClassification``), else None. Refuses multi-label heads."""
    if raw.get("architectures") != [architecture]:
        return None
    problem = raw.get("problem_type")
    id2label = raw.get("id2label")
    # transformers 5 writes id2label only (2 labels when neither is there)
    n = raw.get("num_labels", len(id2label) if isinstance(id2label, Mapping) else 2)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise EmberError(
            f"config.json: num_labels must be an integer >= 1 for a {architecture} (1: a reward "
            f"or regression head), got {n!r}"
        )
    if isinstance(id2label, Mapping) and len(id2label) != n:
        # transformers: num_labels wins and names the classes LABEL_i (with a warning)
        warnings.warn(
            f"config.json: num_labels {n} disagrees with id2label's {len(id2label)} names; "
            "the class names are LABEL_0 .. (as transformers reads it)",
            stacklevel=2,
        )
        id2label = None
    if problem not in ((None, "regression") if n == 1 else (None, PROBLEM_TYPE)):
        raise EmberError(
            f"config.json: problem_type {problem!r} with num_labels {n} is not supported; "
            f"Ember's heads are {PROBLEM_TYPE!r} (softmax over two or more classes) and "
            "one-output reward / 'regression' heads"
        )
    if id2label is None:
        return tuple(f"LABEL_{i}" for i in range(n))
    if not isinstance(id2label, Mapping) or sorted(map(str, id2label)) != sorted(
        map(str, range(n))
    ):
        raise EmberError(f"config.json: id2label must map 0..{n - 1} to names, got {id2label!r}")
    names = {int(k): v for k, v in id2label.items()}
    labels = tuple(names[i] for i in range(n))
    if len(set(labels)) != n or not all(isinstance(x, str) and x for x in labels):
        raise EmberError(f"config.json: id2label names must be distinct strings, got {labels}")
    return labels


def problem_type_from_hf(raw: Mapping, labels: tuple[str, ...] | None) -> str | None:
    """``ModelConfig.problem_type`` of a classifier's config.json: "regression" or None."""
    return "regression" if labels and raw.get("problem_type") == "regression" else None


def labels_to_hf(labels: Sequence[str], problem_type: str | None = None) -> dict:
    """The config.json fields of a classifier with these class names (one name: a one-output
    head, ``problem_type`` None for a reward model, as TRL writes it, or "regression")."""
    single = len(labels) == 1
    return {
        "num_labels": len(labels),
        "id2label": {str(i): x for i, x in enumerate(labels)},
        "label2id": {x: i for i, x in enumerate(labels)},
        "problem_type": problem_type if single else PROBLEM_TYPE,
    }


def add_classification_head(
    model,
    labels: Sequence[str],
    *,
    pad_token_id: int | None = None,
    std: float | None = None,
    seed: int | None = None,
    dtype: torch.dtype | None = None,
):
    """Make ``model`` a classifier in place: a fresh ``score`` head (normal init with ``std``,
    default the config's initializer_range, as transformers initializes it), the LM head dropped,
    ``model.cfg`` with ``labels`` and ``pad_token_id`` (default: the config's). ``dtype``: the
    head's (default the embedding's; a head trained on a frozen bf16 base wants float32). A model
    that already has these labels (an HF classifier) is kept as it is."""
    labels = tuple(labels)
    cfg = model.cfg
    if cfg.labels is not None:
        if cfg.labels != labels:
            raise EmberError(
                f"the model is already a classifier with labels {list(cfg.labels)}, "
                f"not {list(labels)}; use the same labels, or start from its base "
                "language model"
            )
        return model
    pad = cfg.pad_token_id if pad_token_id is None else pad_token_id
    try:
        model.cfg = cfg.replace(labels=labels, pad_token_id=pad)
    except ValueError as e:
        raise EmberError(f"classification head: {e}") from None
    w = model.embed.weight
    std = cfg.extra.get("initializer_range", 0.02) if std is None else std
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    weight = torch.randn(len(labels), cfg.hidden_size, generator=gen) * std
    model.score = nn.Linear(
        cfg.hidden_size, len(labels), bias=False, device=w.device, dtype=dtype or w.dtype
    )
    with torch.no_grad():
        model.score.weight.copy_(weight)
    model.lm_head = None  # not used by the classifier (HF's classifier has none either)
    embed = getattr(model.embed, "base", model.embed)  # under a LoRA / prompt-tuning wrapper
    if isinstance(embed, nn.Embedding):  # the pad row's lookups add no gradient (transformers)
        embed.padding_idx = model.cfg.padding_idx
    if getattr(model, "head_bias", None) is not None:
        model.head_bias = None  # the LM head's bias (Phi) goes with it
    return model


def name_pad_token(tokenizer, pad: int | None) -> None:
    """Give a tokenizer without a pad token the token of the classifier's ``pad_token_id`` (its
    EOS, usually), as ``tokenizer.pad_token = tokenizer.eos_token`` does in a transformers script:
    the folder the run saves and exports then pads a batch for transformers' classifier, which
    pools around that id (a tokenizer written without one cannot pad: batches fail there)."""
    backend = getattr(tokenizer, "backend", None)
    if pad is None or backend is None or getattr(tokenizer, "pad_token", None) is not None:
        return
    token = backend.id_to_token(pad)
    if token is not None:
        tokenizer.pad_token = token


def is_classifier(model) -> bool:
    return getattr(model, "score", None) is not None


def last_token_positions(
    input_ids: torch.Tensor, pad_token_id: int | None, cu_seqlens: torch.Tensor | None = None
) -> torch.Tensor:
    """Flat indices into (B * T) of each row's (or packed document's) last non-pad token."""
    B, T = input_ids.shape
    ids = input_ids.reshape(-1)
    idx = torch.arange(ids.numel(), device=ids.device)
    if cu_seqlens is None:
        starts = torch.arange(B, device=ids.device) * T
        doc = idx // T
    else:
        if B != 1:
            raise EmberError(f"packed batches (cu_seqlens) must have batch size 1, got {B}")
        bounds = cu_seqlens.to(ids.device, torch.long)
        starts = bounds[:-1]
        doc = torch.bucketize(idx, bounds[1:], right=True)
    keep = torch.ones_like(ids, dtype=torch.bool) if pad_token_id is None else ids != pad_token_id
    cand = torch.where(keep, idx, torch.full_like(idx, -1))
    last = torch.full_like(starts, -1).scatter_reduce(0, doc, cand, "amax")
    return torch.where(last < 0, starts, last)  # an all-pad row: its first token (as HF)


def classify(
    model,
    input_ids: torch.Tensor,
    position_ids: torch.Tensor | None = None,
    *,
    cu_seqlens: torch.Tensor | None = None,
    max_seqlen: int | None = None,
) -> torch.Tensor:
    """Class logits (N, num_labels): one row per row of ``input_ids`` (B, T), or per document of
    a packed batch (``cu_seqlens``). Rows run without an attention mask, which is exact for right
    padding (causal attention: the pooled token never sees the pads after it); left-padded rows
    are refused."""
    if not is_classifier(model):
        raise EmberError(
            "the model has no classification head (add_classification_head, or "
            "load an HF *ForSequenceClassification folder)"
        )
    pad = model.cfg.pad_token_id
    if cu_seqlens is None and pad is not None and input_ids.dim() == 2 and input_ids.shape[1] > 1:
        # Leading pads before a real token: left padding, except one pad id that is the BOS
        # (a model padding with its BOS: a right-padded row starts with it, as in transformers).
        is_pad = input_ids == pad
        leading = is_pad.long().cumprod(1).sum(1)
        bos_ok = int(model.cfg.bos_token_id == pad)
        if bool(((leading > bos_ok) & (~is_pad).any(1)).any()):
            raise EmberError(
                "classify: a row starts with pad tokens (left padding); the pooled last token "
                "would attend to them. Pad on the right, or pack the rows (cu_seqlens)"
            )
    hidden = model.hidden_states(
        input_ids, position_ids, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen
    )  # (B, T, D)
    pos = last_token_positions(input_ids, model.cfg.pad_token_id, cu_seqlens)
    h = hidden.reshape(-1, hidden.shape[-1]).index_select(0, pos)  # (N, D): the head sees N rows
    nf4 = getattr(model.score, "quant_weight", None)  # a 4-bit head (quantize_model_(skip=()))
    w = model.score.weight if nf4 is None else nf4.dequantize(hidden.dtype)
    if h.dtype != w.dtype and not torch.is_autocast_enabled(h.device.type):
        h = h.to(w.dtype)  # an fp32 head on a bf16 base (LoRA), outside autocast
    return nn.functional.linear(h, w)
