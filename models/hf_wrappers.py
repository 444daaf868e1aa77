"""``ember.models.hf_backend``'s view of wrappers set on a causal LM instance's ``forward`` by
others: accelerate's mixed precision (``accelerator.prepare``, ``Trainer`` with bf16/fp16, which
keeps the wrapped forward in ``_original_forward``) and TRL's ``add_fused_lm_head`` (DPOTrainer,
SFTTrainer: the wrapped forward held in a closure). A wrapper set after the swap keeps calling
it (found through ``_BOUND``; ``restore`` switches it to HF's forward with ``_OFF``); one set
before the swap is refused, since rebinding ``forward`` would drop it."""

from __future__ import annotations

import inspect
import types
from collections.abc import Callable

import torch.nn as nn

from ember import EmberError
from ember.models.hf_backend_io import hooked

_OFF = "_ember_off"  # restored while a wrapper (accelerate's mixed precision, TRL's) calls the swap
# The causal LM's swapped forward as bound, found under a wrapper set on the instance after the swap
# that keeps calling it (TRL's add_fused_lm_head holds it in a closure)
_BOUND = "_ember_bound"


def _ours(fn) -> bool:
    # a method bound by _bind (a hook's wrapper copies the attribute: not ours)
    return isinstance(fn, types.MethodType) and bool(getattr(fn.__func__, "_ember_swap", None))


def _foreign_forward(module: nn.Module) -> bool:
    """A forward set on the instance by someone else: not a swap, not a dispatch hook, not the
    class's own forward bound there (what accelerate's unwrap_model leaves)."""
    fn = module.__dict__.get("forward")
    cls = type(module).forward  # unwrap_model binds the innermost function of its decorators
    return (
        fn is not None
        and not _ours(fn)
        and not hooked(module)
        and getattr(fn, "__func__", None) not in (cls, inspect.unwrap(cls))
    )


def _under_wrapper(module: nn.Module) -> Callable | None:
    """The swap bound on ``module`` that a forward set on the instance after it calls."""
    bound = module.__dict__.get(_BOUND)
    return bound if _ours(bound) and _foreign_forward(module) else None


def _wrapped_swap(lm: nn.Module) -> Callable | None:
    """The swapped forward that a wrapper set on the instance after the swap calls, if any:
    accelerate's mixed precision (accelerator.prepare, Trainer with bf16/fp16), TRL's
    ``add_fused_lm_head`` (DPOTrainer, SFTTrainer). Rebinding would drop the wrapper."""
    wrapped = lm.__dict__.get("_original_forward")
    if _ours(wrapped) and not _ours(lm.__dict__.get("forward")):
        return wrapped
    return _under_wrapper(lm)


def _check_wrapped(lm: nn.Module, fn: Callable | None) -> None:
    wrapped = _wrapped_swap(lm)
    if wrapped is None and fn is not None and _foreign_forward(lm):
        raise EmberError(
            f"accelerate(): this {type(lm).__name__}'s forward was replaced on the "
            "instance by another wrapper (e.g. TRL's add_fused_lm_head, which its "
            "trainers add, or accelerate's mixed-precision prepare); swapping would "
            "drop that wrapper. Call accelerate() on the model before handing it to "
            "the trainer or to accelerator.prepare"
        )
    if wrapped is not None and fn is not None and wrapped._ember_swap != fn._ember_swap:
        raise EmberError(
            f"accelerate(): this model's forward was wrapped by accelerate's mixed "
            f"precision (or TRL's add_fused_lm_head) around an earlier swap "
            f"({wrapped._ember_swap}); call accelerate() with the same loss= "
            "setting, or unwrap it first (accelerator.unwrap_model(model, "
            "keep_fp32_wrapper=False))"
        )
