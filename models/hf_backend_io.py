"""What ``ember.models.hf_backend``'s forwards read and return as transformers does: the attention
plan decided from the mask / position_ids, which heads and losses the fused loss may replace,
which labels read padding, and the outputs."""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class AttentionPlan:
    """What one forward's attention layers run, decided once from the inputs HF's mask is built
    from (so the 4-D mask HF still builds can be ignored). ``cu_seqlens`` None: dense causal
    (with the layer's window). Otherwise varlen over the flattened (B*T) tokens, or over the
    gathered real tokens when ``indices`` (positions in B*T) is set (padding)."""

    cu_seqlens: torch.Tensor | None = None  # (n_seq + 1,) int32
    max_seqlen: int | None = None
    indices: torch.Tensor | None = None  # (n_real,) int64, padding only
    packed: bool = False  # from position_ids: HF drops packing when a KV cache exists
    # Padding inside a row (not only at its ends): HF's sliding window counts those positions,
    # so layers with a window run HF's attention with its mask.
    gaps: bool = False
    # Padding before a row's first real token (left padding): a fully masked query row, which
    # HF's eager attention fills with the mean of the values (varlen and SDPA: 0).
    leading: bool = False


def attention_plan(attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None,
                   batch: int, seqlen: int, past_key_values=None) -> AttentionPlan | None:
    """The plan for one forward; None when HF's attention must run with HF's mask (a KV cache
    holding earlier tokens, a custom 4-D mask, a row without any real token). Host syncs: one
    for a 2-D mask (two with padding), one for packed position_ids."""
    if past_key_values is not None and past_key_values.get_seq_length() > 0:
        return None
    if attention_mask is not None:
        if (not torch.is_tensor(attention_mask) or attention_mask.dim() != 2
                or tuple(attention_mask.shape) != (batch, seqlen)):
            return None  # per-layer-type dicts, custom 4-D masks, masks covering cached tokens
        keep = attention_mask.bool()
        lengths = keep.sum(1)
        t = torch.arange(seqlen, device=keep.device)
        span = torch.where(keep, t, -1).amax(1) - torch.where(keep, t, seqlen).amin(1) + 1
        full, any_empty, gaps, longest, leading = torch.stack([x.long() for x in (
            keep.all(), (lengths == 0).any(), (span != lengths).any(), lengths.max(),
            (~keep[:, 0]).any())]).tolist()
        if full:
            return AttentionPlan()  # HF ignores an all-ones mask, and so does packing detection
        if any_empty:
            return None
        cu = F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
        return AttentionPlan(cu, longest, keep.reshape(-1).nonzero().squeeze(1), gaps=bool(gaps),
                             leading=bool(leading))
    if position_ids is None or past_key_values is not None:
        return AttentionPlan()
    pos = position_ids.expand(batch, seqlen) if position_ids.shape[0] != batch else position_ids
    starts = torch.ones(batch, seqlen, dtype=torch.bool, device=pos.device)
    starts[:, 1:] = pos[:, 1:] != pos[:, :-1] + 1  # HF's rule: a jump other than +1 starts a doc
    first = starts.reshape(-1).nonzero().squeeze(1)
    if first.numel() == batch:
        return AttentionPlan()  # one document per row
    cu = torch.cat([first, first.new_tensor([batch * seqlen])]).to(torch.int32)
    return AttentionPlan(cu, int((cu[1:] - cu[:-1]).max()), None, packed=True)


def take_cache(kwargs: dict, given=None):
    """The KV cache a forward was handed, popped from ``kwargs`` under either name: transformers
    5.24 renamed ``past_key_values`` to ``cache`` (its layers pass ``cache=``; the old name is
    still accepted, renamed with a warning), older versions take ``past_key_values`` only."""
    new, old = kwargs.pop("cache", None), kwargs.pop("past_key_values", None)
    return given if given is not None else new if new is not None else old


_CACHE_NAMES: dict[type, str] = {}  # filled when accelerate() binds (not in a compile trace)


def cache_name(cls: type) -> str:
    """The name ``cls.forward`` takes the KV cache by."""
    name = _CACHE_NAMES.get(cls)
    if name is None:
        params = inspect.signature(cls.forward).parameters
        name = _CACHE_NAMES[cls] = "cache" if "cache" in params else "past_key_values"
    return name


def with_cache(module: nn.Module, kwargs: dict, cache) -> dict:
    """``kwargs`` with ``cache`` (if any) under the name ``module``'s class forward takes it by."""
    if cache is not None:
        kwargs[cache_name(type(module))] = cache
    return kwargs


# What Ember's kernels take; other dtypes (a model moved to float64 after the swap) run HF's code.
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def kernel_dtypes(*tensors: torch.Tensor) -> bool:
    return all(t.dtype in KERNEL_DTYPES for t in tensors)


def hooked(module: nn.Module) -> bool:
    """An ``accelerate`` dispatch hook (``device_map`` with offload or several devices): its
    ``forward`` moves inputs and loads offloaded weights around ``module._old_forward``."""
    return "_hf_hook" in module.__dict__ and "_old_forward" in module.__dict__


def plain_head(head: nn.Module) -> bool:
    """A bare ``nn.Linear`` head the fused loss can read the weight of directly."""
    w = getattr(head, "weight", None)
    return (isinstance(head, nn.Linear) and type(w) in (nn.Parameter, torch.Tensor)
            and w.dtype in KERNEL_DTYPES and w.device.type != "meta" and not hooked(head)
            and not (head._forward_hooks or head._forward_pre_hooks))


def default_loss(lm: nn.Module) -> bool:
    """No ``loss_function`` set on the instance (transformers' setter stores ``_loss_function``,
    which HF's forward then calls on the logits), or transformers' own causal LM loss."""
    fn = lm.__dict__.get("_loss_function")
    if fn is None:
        return True
    from transformers.loss.loss_utils import ForCausalLMLoss

    return fn is ForCausalLMLoss


def check_labels(labels: torch.Tensor, tokens: tuple[int, int], name: str) -> None:
    """One label per input token (B, T), as HF's loss needs: it flattens both and raises on a
    count mismatch, where selecting the labelled rows would silently pair the wrong positions."""
    if not torch.is_tensor(labels) or labels.numel() != tokens[0] * tokens[1]:
        shape = tuple(labels.shape) if torch.is_tensor(labels) else type(labels).__name__
        raise ValueError(f"{name} has shape {shape} but the input has {tuple(tokens)} tokens: "
                         f"give one label per input token (-100 where there is no loss)")


def keep_slice(logits_to_keep):
    """The positions HF keeps logits for (an int: the last n; 0: all; or an index tensor)."""
    return slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep


def kept_shift_labels(labels, shift_labels, logits_to_keep, tokens: tuple[int, int],
                      ignore_index: int, strict: bool = False) -> torch.Tensor | None:
    """``labels`` with ``logits_to_keep``: HF computes the logits of the kept positions only and
    its loss on them, the labels (or ``shift_labels``) one per kept position, shifted among them.
    Those as pre-shifted labels over all (B, T) positions, ``ignore_index`` elsewhere; None when
    every position is kept, no labels are given, or (``strict`` False) their count is not one per
    kept position (``strict``: a ``ValueError``, where HF's loss raises on the count)."""
    if labels is None or (isinstance(logits_to_keep, int) and logits_to_keep == 0):
        return None
    B, T = tokens
    if isinstance(logits_to_keep, int) and logits_to_keep >= T:
        return None
    dev = logits_to_keep.device if torch.is_tensor(logits_to_keep) else labels.device
    every = torch.arange(T, device=dev)
    pos = every[keep_slice(logits_to_keep)]
    if pos.numel() == T and torch.equal(pos, every):  # an index tensor keeping every position
        return None
    name = "labels" if shift_labels is None else "shift_labels"
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    if not torch.is_tensor(shift_labels) or shift_labels.numel() != B * pos.numel():
        if not strict:
            return None
        shape = (tuple(shift_labels.shape) if torch.is_tensor(shift_labels)
                 else type(shift_labels).__name__)
        raise ValueError(f"{name} has shape {shape} but logits_to_keep keeps {(B, pos.numel())} "
                         "positions, and transformers computes the loss on the kept logits only: "
                         "give one label per kept position, or logits_to_keep=0")
    full = shift_labels.new_full((B, T), ignore_index)
    full[:, pos.to(full.device)] = shift_labels.reshape(B, -1)
    return full


def labels_read_padding(attention_mask, labels, shift_labels, ignore_index: int,
                         sdpa: bool) -> bool:
    """A label predicted from a padding position: HF's loss includes HF's output there, which
    Ember's varlen leaves 0. Before a row's first real token (left padding, labels = ids with the
    padding masked: its first real token) that is a fully masked query row, which SDPA also
    gives as 0 (torch >= 2.5; eager averages every value); after one (right padding or a gap,
    labels not masked there) HF attends to the real tokens before it. One host sync."""
    if labels is None or not torch.is_tensor(attention_mask) or attention_mask.dim() != 2:
        return False
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    if tuple(shift_labels.shape) != tuple(attention_mask.shape):
        return False
    keep = attention_mask.to(shift_labels.device).bool()
    read = (shift_labels != ignore_index) & ~keep
    if sdpa:
        read &= keep.cumsum(1) > 0
    return bool(read.any())
