"""The fused loss of ``ember.models.hf_backend``'s causal LM forward: HF's ``ForCausalLMLoss``
from the final hidden states through ``linear_cross_entropy`` (the logits never built), and the
logits themselves, built in training mode only when read (``LazyLogits``)."""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass

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
    idx = (y != ignore_index).nonzero().squeeze(1)
    h = hidden.reshape(-1, hidden.shape[-1]).index_select(0, idx)  # (N, D) labelled rows
    y = y.index_select(0, idx)
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


class HeadAtForward:
    """``lm_head``'s parameters as a deferred forward used them: changed since when an optimizer
    that holds one of them (with a gradient) has stepped, or an in-place update bumped a version
    counter, or the weight was replaced. torch's fused optimizers (``fused=True``) and
    bitsandbytes' 8-bit ones update in place without bumping the version: every optimizer step
    is seen through torch's global step pre-hook, registered only while some deferred logits are
    alive (weakly held) and removed with the last."""

    __slots__ = ("params", "versions", "stepped", "__weakref__")

    def __init__(self, head: nn.Module):
        self.params = tuple(p for p in (head.weight, head.bias) if p is not None)
        self.versions = tuple(p._version for p in self.params)
        self.stepped = False
        _track(self)

    def changed(self, head: nn.Module) -> bool:
        now = tuple(p for p in (head.weight, head.bias) if p is not None)
        return (self.stepped or len(now) != len(self.params)
                or any(a is not b or a._version != v
                       for a, b, v in zip(now, self.params, self.versions, strict=True)))


_ALIVE: dict[int, weakref.ref] = {}  # id -> HeadAtForward of the deferred logits still alive
_STEP_HOOK: list[RemovableHandle] = []  # torch's global optimizer step pre-hook, while any


def _track(state: HeadAtForward) -> None:
    key = id(state)
    _ALIVE[key] = weakref.ref(state, lambda _, key=key: _forget(key))
    if not _STEP_HOOK:
        _STEP_HOOK.append(register_optimizer_step_pre_hook(_before_step))


def _forget(key: int) -> None:
    _ALIVE.pop(key, None)
    if not _ALIVE and _STEP_HOOK:
        _STEP_HOOK.pop().remove()


def _before_step(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
    held = None
    for ref in list(_ALIVE.values()):
        state = ref()
        if state is None or state.stepped or all(p.grad is None for p in state.params):
            continue  # torch's and bitsandbytes' optimizers skip parameters without a gradient
        if held is None:
            held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        state.stepped = any(id(p) in held and p.grad is not None for p in state.params)


def deferred_logits(head, hidden, cap, grad: bool, autocast: torch.dtype | None,
                    at_forward: HeadAtForward):
    # lm_head(hidden) now would use the weight after the update, not the forward's (HF's)
    if at_forward.changed(head):
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
    ``out["logits"]`` or ``to_tuple()``) when they hold a ``LazyLogits``; transformers is imported
    on first use, as everywhere in the HF backend."""
    if not _OUTPUT:
        _OUTPUT.append(_lazy_logits_output())
    return _OUTPUT[0]


def _lazy_logits_output() -> type:
    from transformers.modeling_outputs import CausalLMOutputWithPast

    @dataclass
    class CausalLMOutputWithLazyLogits(CausalLMOutputWithPast):
        def __getattribute__(self, name: str):
            value = super().__getattribute__(name)
            if name == "logits" and isinstance(value, LazyLogits):
                value = value.compute()
                self["logits"] = value  # ModelOutput's __setitem__ sets the attribute too
            return value

        def __getitem__(self, key):
            return self.logits if key == "logits" else super().__getitem__(key)

    return CausalLMOutputWithLazyLogits
