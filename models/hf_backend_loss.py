"""The fused loss of ``ember.models.hf_backend``'s causal LM forward: HF's ``ForCausalLMLoss``
from the final hidden states through ``linear_cross_entropy`` (the logits never built), and the
logits themselves, built in training mode only when read (``LazyLogits``)."""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch
import torch.nn as nn
from torch.optim.optimizer import register_optimizer_step_pre_hook
from torch.utils.hooks import RemovableHandle

from ember import EmberError
from ember.kernels import linear_cross_entropy


def causal_lm_loss(hidden: torch.Tensor, head: nn.Linear, shift_labels: torch.Tensor,
                   num_items_in_batch=None, ignore_index: int = -100,
                   softcap: float | None = None) -> torch.Tensor:
    """HF's ``ForCausalLMLoss`` from hidden states (B, T, D) and pre-shifted labels (B, T),
    through the fused linear cross-entropy on the labelled rows only; ``softcap`` caps the
    logits first (Gemma 2/3's ``final_logit_softcapping``)."""
    y = shift_labels.to(hidden.device).reshape(-1)
    h = hidden.reshape(-1, hidden.shape[-1])  # (B*T, D)
    if not torch.compiler.is_compiling():  # a data-dependent shape breaks a fullgraph trace
        idx = (y != ignore_index).nonzero().squeeze(1)
        h, y = h.index_select(0, idx), y.index_select(0, idx)  # (N, D) labelled rows
    w, b = head.weight, head.bias
    dev = h.device.type
    if torch.is_autocast_enabled(dev):  # HF's lm_head would run in the autocast dtype
        dt = torch.get_autocast_dtype(dev)
    else:
        dt = w.dtype
    h, w = h.to(dt), w.to(dt)
    b = None if b is None else b.to(dt)
    reduction = "mean" if num_items_in_batch is None else "sum"
    loss = linear_cross_entropy(h, w, y, bias=b, ignore_index=ignore_index, reduction=reduction,
                                softcap=softcap)
    if num_items_in_batch is not None:
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        loss = loss / num_items_in_batch
    return loss


def head_logits(head: nn.Module, hidden: torch.Tensor, cap: float | None) -> torch.Tensor:
    logits = head(hidden)
    if cap is not None:  # as HF: logits / c, tanh, * c
        logits = torch.tanh(logits / cap) * cap
    return logits


def head_version(head: nn.Module) -> tuple:
    """What changes when an optimizer updates ``head`` in place (torch's fused optimizers and
    bitsandbytes' 8-bit ones do not bump the version counters themselves: ``watch_steps`` does)
    or its weight is replaced."""
    return tuple((p, p._version) for p in (head.weight, head.bias) if p is not None)


# The causal LMs swapped with the fused loss (id -> weak reference), and torch's global optimizer
# step pre-hook.
_WATCHED: dict[int, weakref.ref] = {}
_STEP_HOOK: list[RemovableHandle] = []


def watch_steps(lm: nn.Module) -> None:
    """Every optimizer step that updates ``lm.lm_head`` bumps its parameters' version counters
    first, as torch's non-fused optimizers' in-place ops do: torch's fused optimizers
    (``fused=True``) and bitsandbytes' 8-bit ones leave them as they were, so deferred logits read
    after such a step would silently come from the new head. Seen through torch's global step
    pre-hook (any ``torch.optim.Optimizer``), registered with the first watched model (weakly
    held; the hook does nothing once all are collected) and removed by ``unwatch_steps``
    (``restore``) of the last. Called by ``accelerate`` and by every eager deferring forward (a
    deep copy of a swapped model)."""
    key = id(lm)
    if key in _WATCHED and _WATCHED[key]() is lm:
        return
    # A model collected only leaves the table: the garbage collector may run inside an optimizer
    # step, while torch iterates its hook dict (removing the hook there would raise)
    _WATCHED[key] = weakref.ref(lm, lambda _, key=key: _WATCHED.pop(key, None))
    if not _STEP_HOOK:
        # run as is in a compiled optimizer step (torch's step wrapper breaks the graph there);
        # wrapped here, not at import: torch.compiler.disable imports dynamo (seconds)
        _STEP_HOOK.append(register_optimizer_step_pre_hook(torch.compiler.disable(_before_step)))


def unwatch_steps(lm: nn.Module) -> None:
    _WATCHED.pop(id(lm), None)
    if not _WATCHED and _STEP_HOOK:
        _STEP_HOOK.pop().remove()


def _before_step(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
    # torch's and bitsandbytes' optimizers skip parameters without a gradient (a frozen head)
    heads = [p for ref in list(_WATCHED.values()) if (lm := ref()) is not None
             and isinstance(head := getattr(lm, "lm_head", None), nn.Module)
             for p in (getattr(head, "weight", None), getattr(head, "bias", None))
             if isinstance(p, torch.Tensor) and p.grad is not None]
    if heads:
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        if stepped := [p for p in heads if id(p) in held]:
            torch.autograd.graph.increment_version(stepped)


def deferred_logits(head, hidden, cap, grad: bool, autocast: torch.dtype | None,
                    version: tuple):
    # lm_head(hidden) now would use the weight after the update, not the forward's (HF's)
    now = head_version(head)
    if len(now) != len(version) or any(a is not b or u != v for (a, u), (b, v) in
                                         zip(now, version, strict=True)):
        raise EmberError("these logits were deferred by Ember's fused loss (training mode, "
                         "labels given) and lm_head's weight changed since the forward (an "
                         "optimizer step): read out.logits before the optimizer step, or "
                         "accelerate(model, loss=False) to have them built in every forward")
    # as the forward would have built them: its grad mode and autocast dtype
    dev = hidden.device.type
    with (torch.set_grad_enabled(grad),
          torch.autocast(dev, dtype=autocast, enabled=autocast is not None)):
        return head_logits(head, hidden, cap)


class LazyLogits:
    """The logits of a fused-loss forward in training mode, computed when first read: held in
    the output's ``logits`` slot (a plain object, so wrappers that rebuild the output carry it
    over). ``dtype`` and ``float()`` are what accelerate's fp32 output conversion (mixed
    precision, ``Trainer`` with bf16/fp16) tests and calls on a half-precision tensor: the logits
    read after it are float32, as HF's are."""

    __slots__ = ("compute", "dtype")

    def __init__(self, compute: Callable[[], torch.Tensor], dtype: torch.dtype):
        self.compute, self.dtype = compute, dtype

    def float(self) -> LazyLogits:
        return LazyLogits(lambda: self.compute().float(), torch.float32)


_OUTPUT: list[type] = []  # built once, by accelerate() (not inside a torch.compile trace)


def lazy_logits_output() -> type:
    """``CausalLMOutputWithPast`` whose ``logits`` are computed on first read (as an attribute,
    ``out["logits"]``, ``out.get("logits")`` or ``to_tuple()``) when they hold a ``LazyLogits``;
    transformers is imported on first use, as everywhere in the HF backend."""
    if not _OUTPUT:
        _OUTPUT.append(_lazy_logits_output())
    return _OUTPUT[0]


def _lazy_logits_output() -> type:
    from transformers.modeling_outputs import CausalLMOutputWithPast

    # Not a dataclass of its own: ``logits`` stays the parent's field; the property (a data
    # descriptor, so it wins over the instance's __dict__ where the field's value is kept) is
    # what torch.compile(fullgraph=True) traces, where a custom __getattribute__ breaks the graph.
    class CausalLMOutputWithLazyLogits(CausalLMOutputWithPast):
        @property
        def logits(self):
            value = self.__dict__.get("logits")
            if isinstance(value, LazyLogits):
                value = value.compute()
                self["logits"] = value  # ModelOutput's __setitem__ sets the attribute too
            return value

        @logits.setter
        def logits(self, value) -> None:
            self.__dict__["logits"] = value

        def __getitem__(self, key):
            return self.logits if key == "logits" else super().__getitem__(key)

        def get(self, key, default=None):
            # values() and items() keep the lazy object: accelerate's fp32 conversion walks them
            return self.logits if key == "logits" and key in self else super().get(key, default)

    return CausalLMOutputWithLazyLogits
