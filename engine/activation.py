"""Activation checkpointing of decoder blocks, with optional offload of block inputs to CPU.

Applied from outside to a built ``Transformer`` (STYLE.md order: LoRA/NF4 wrapping -> activation
checkpointing -> compile -> ``fully_shard``). A checkpointed block keeps only its inputs for
backward; everything inside it is recomputed when backward reaches it
(``torch.utils.checkpoint``, non-reentrant, RNG state preserved so dropout masks repeat).

Policies: ``"none"``; ``"every_block"``; ``"every_k"``: blocks ``0, k, 2k, ...`` (a memory/compute
dial between the two: a non-checkpointed block keeps all its activations, no recompute).

Module names and state-dict keys do not change: instead of wrapping each block in another module
(``checkpoint_wrapper`` adds ``_checkpoint_wrapped_module.`` to every parameter name, which would
break LoRA/PEFT key mapping, HF export and trainer checkpoints), the block gets an instance-level
``forward`` that runs the class's forward under ``checkpoint``. FSDP2's hooks live in
``__call__``, so ``fully_shard`` on a checkpointed block works as on a plain one.

Offload (``offload=True``, Unsloth's "smart offloading"): the one tensor a checkpointed block
keeps per token, its input hidden state (T x D), is copied to pinned CPU memory on a side CUDA
stream as soon as the forward saves it, so GPU memory for saved activations no longer grows with
the number of layers. When backward reaches block ``i`` it copies block ``i``'s input back and
starts the copy of block ``i - 1``'s input on the side stream, overlapping it with block ``i``'s
recompute and backward. The hidden state is the only tensor moved: RoPE tables and
``cu_seqlens`` are shared by all blocks and stay where they are. On CPU the hooks run but keep
the tensor as it is (nothing to offload to), so the CPU path is the same code without copies.

MLP in token chunks (``mlp_chunk_tokens = C``, any policy; the "tiled MLP" of long-sequence
training): each block's MLP branch (norm, gate/up, activation, down; ``Block.mlp_branch``) runs
over the flattened tokens ``C`` at a time, each chunk under its own ``checkpoint``, so backward
holds one chunk's MLP activations instead of the whole sequence's. The MLP is token-wise, so the
result is the same computation (only the matmul blocking differs). At Llama-3-8B widths the MLP
keeps ~90 of a block's ~136 KB per token, which dominates what a checkpointed block re-creates
in backward at long context; the price is one more MLP forward per chunk in backward. With
``checkpointing`` as well, the chunks nest inside the block's recompute. Sequences of at most
``C`` tokens run as before. Dropout inside the branch (LoRA dropout on the MLP projections) is
drawn chunk by chunk, gate/up/down per chunk instead of each over all tokens: the same
distribution, but other masks than an unchunked run from the same seed (each chunk's recompute
replays its own masks exactly).
"""

from __future__ import annotations

import contextlib
import functools
import types
import weakref
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from ember import EmberError

POLICIES = ("none", "every_block", "every_k")


@dataclass(frozen=True, kw_only=True)
class ActivationConfig:
    """``[activations]`` in a run config."""

    checkpointing: str = "none"  # "none" | "every_block" | "every_k"
    every_k: int = 2  # with "every_k": checkpoint blocks 0, k, 2k, ...
    offload: bool = False  # move checkpointed blocks' inputs to pinned CPU memory (CUDA only)
    mlp_chunk_tokens: int = 0  # > 0: every block's MLP runs in chunks of this many tokens

    def __post_init__(self) -> None:
        _validate(self.checkpointing, self.every_k, self.offload, "activations.")
        _validate_chunk(self.mlp_chunk_tokens, "activations.")


def _validate_chunk(chunk, prefix: str = "") -> None:
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 0:
        raise EmberError(f"{prefix}mlp_chunk_tokens must be an integer >= 0 (0: off), got "
                         f"{chunk!r}")


def _validate(policy: str, k: int, offload: bool, prefix: str = "") -> None:
    if policy not in POLICIES:
        raise EmberError(f"{prefix}checkpointing must be one of {', '.join(map(repr, POLICIES))}, "
                         f"got {policy!r}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise EmberError(f"{prefix}every_k must be an integer >= 1, got {k!r}")
    if offload and policy == "none":
        raise EmberError(f"{prefix}offload needs activation checkpointing (only checkpointed "
                         f"blocks' inputs are offloaded); set {prefix}checkpointing = "
                         "\"every_block\" or \"every_k\"")


def checkpointed_layers(num_layers: int, policy: str, k: int = 2) -> list[int]:
    """Indices of the blocks a policy checkpoints."""
    _validate(policy, k, False)
    if policy == "none":
        return []
    step = 1 if policy == "every_block" else k
    return list(range(0, num_layers, step))


def _same(t: torch.Tensor, target: torch.Tensor) -> bool:
    return t is target or (t.device == target.device and t.dtype == target.dtype
                           and t.shape == target.shape and t.stride() == target.stride()
                           and t.data_ptr() == target.data_ptr())


class _Saved:
    """One offloaded block input: the pinned host copy and, around backward, a device copy.
    ``prev`` is a weak reference to the previous block's handle (the next one backward needs)."""

    __slots__ = ("host", "device", "d2h", "h2d", "gpu", "prev", "__weakref__")

    def __init__(self, host: torch.Tensor, device: torch.device, d2h, prev):
        self.host, self.device, self.d2h, self.prev = host, device, d2h, prev
        self.h2d = None
        self.gpu = None


class Offloader:
    """Saved-tensor hooks that move each checkpointed block's input to pinned CPU memory.

    ``stats``: tensors seen and their bytes (``offloaded_*``: really copied to the host, i.e. on
    CUDA; on CPU tensors are kept in place and only counted)."""

    def __init__(self):
        self._stream: torch.cuda.Stream | None = None
        self._last: weakref.ref | None = None  # the previous block's handle, for prefetch
        self.stats = {"tensors": 0, "bytes": 0, "offloaded_tensors": 0, "offloaded_bytes": 0}

    def hooks(self, target: torch.Tensor):
        """The context that wraps one block's ``checkpoint`` call: offloads ``target`` only."""
        return torch.autograd.graph.saved_tensors_hooks(
            functools.partial(self._pack, target), self._unpack)

    def _side_stream(self, device: torch.device) -> torch.cuda.Stream:
        if self._stream is None or self._stream.device != device:
            self._stream = torch.cuda.Stream(device)
        return self._stream

    def _pack(self, target: torch.Tensor, t: torch.Tensor):
        if not _same(t, target):
            return t
        nbytes = t.numel() * t.element_size()
        self.stats["tensors"] += 1
        self.stats["bytes"] += nbytes
        prev = self._last
        if t.device.type != "cuda":
            handle = _Saved(t, t.device, None, prev)
        else:
            stream = self._side_stream(t.device)
            host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            # The copy must start after the forward wrote t; the allocator must not hand t's
            # memory to someone else before the copy has read it.
            stream.wait_stream(torch.cuda.current_stream(t.device))
            with torch.cuda.stream(stream):
                host.copy_(t, non_blocking=True)
                d2h = torch.cuda.Event()
                d2h.record(stream)
            t.record_stream(stream)
            handle = _Saved(host, t.device, d2h, prev)
            self.stats["offloaded_tensors"] += 1
            self.stats["offloaded_bytes"] += nbytes
        self._last = weakref.ref(handle)
        return handle

    def _fetch(self, h: _Saved, stream) -> None:
        """Start the host -> device copy of ``h`` on ``stream``."""
        with torch.cuda.stream(stream):
            stream.wait_event(h.d2h)
            h.gpu = h.host.to(h.device, non_blocking=True)
            h.h2d = torch.cuda.Event()
            h.h2d.record(stream)

    def _unpack(self, h):
        if not isinstance(h, _Saved):
            return h
        if h.d2h is None:  # CPU: kept in place
            return h.host
        current = torch.cuda.current_stream(h.device)
        if h.gpu is None:  # not prefetched (the last block, or a second backward)
            self._fetch(h, current)
        current.wait_event(h.h2d)
        out, h.gpu = h.gpu, None
        out.record_stream(current)  # allocated on the side stream, used on this one
        prev = h.prev() if h.prev is not None else None
        if prev is not None and prev.gpu is None and prev.d2h is not None:
            # Backward goes block by block from the last: the previous block's input is next.
            self._fetch(prev, self._side_stream(h.device))
        return out


def _checkpointed_forward(self: nn.Module, *args, **kwargs):
    inner = functools.partial(type(self).forward, self)
    if not torch.is_grad_enabled():  # evaluation / generation: nothing is saved anyway
        return inner(*args, **kwargs)
    offloader = self._ember_offloader
    ctx = offloader.hooks(args[0]) if offloader is not None else contextlib.nullcontext()
    with ctx:
        return checkpoint(inner, *args, use_reentrant=False, **kwargs)


def _chunked_mlp_branch(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    inner = functools.partial(type(self).mlp_branch, self)
    chunk = self._ember_mlp_chunk
    flat = x.reshape(-1, x.shape[-1])
    if not torch.is_grad_enabled() or flat.shape[0] <= chunk:
        return inner(x)
    # (1, C, D) chunks: the modules see the (batch, tokens, hidden) layout they always get.
    outs = [checkpoint(inner, flat[i:i + chunk].unsqueeze(0), use_reentrant=False)
            for i in range(0, flat.shape[0], chunk)]
    return torch.cat(outs, dim=1).view(x.shape)


def set_mlp_chunks(model: nn.Module, chunk_tokens: int) -> None:
    """Run every block's MLP branch in chunks of ``chunk_tokens`` tokens (0: whole, as built);
    see the module docstring. In place; parameter names do not change."""
    _validate_chunk(chunk_tokens)
    for block in _blocks(model):
        if not hasattr(type(block), "mlp_branch"):
            raise EmberError(f"MLP chunking needs blocks with an `mlp_branch` (ember's Block), "
                             f"got {type(block).__name__}")
        if chunk_tokens:
            block._ember_mlp_chunk = chunk_tokens
            block.mlp_branch = types.MethodType(_chunked_mlp_branch, block)
        else:
            block.__dict__.pop("mlp_branch", None)
            block.__dict__.pop("_ember_mlp_chunk", None)


def _blocks(model: nn.Module) -> nn.ModuleList:
    layers = getattr(model, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise EmberError(f"activation checkpointing needs a model with a `layers` ModuleList of "
                         f"blocks (an ember Transformer), got {type(model).__name__}")
    return layers


def remove_activation_checkpointing(model: nn.Module) -> None:
    """Undo ``apply_activation_checkpointing``."""
    for block in _blocks(model):
        if "forward" in vars(block):
            del block.forward
        block.__dict__.pop("_ember_offloader", None)


def apply_activation_checkpointing(model: nn.Module, policy: str = "none", *, k: int = 2,
                                   offload: bool = False) -> list[int]:
    """Checkpoint ``model.layers`` per ``policy`` (in place; replaces an earlier application).
    Returns the indices of the checkpointed blocks. Parameter names do not change."""
    _validate(policy, k, offload)
    blocks = _blocks(model)
    from torch.distributed.fsdp import FSDPModule

    for block in blocks:
        if isinstance(block, FSDPModule):
            raise EmberError("apply activation checkpointing before fully_shard (order: LoRA -> "
                             "activation checkpointing -> compile -> fully_shard)")
        if getattr(block, "_compiled_call_impl", None) is not None:
            raise EmberError("apply activation checkpointing before torch.compile (order: LoRA "
                             "-> activation checkpointing -> compile -> fully_shard)")
    remove_activation_checkpointing(model)
    chosen = checkpointed_layers(len(blocks), policy, k)
    offloader = Offloader() if offload else None
    for i in chosen:
        block = blocks[i]
        block._ember_offloader = offloader
        # A bound method (not a closure) so copy.deepcopy rebinds it to the copied block.
        block.forward = types.MethodType(_checkpointed_forward, block)
    return chosen


def offloader_of(model: nn.Module) -> Offloader | None:
    """The model's ``Offloader`` (for its statistics), or None without offload."""
    for block in _blocks(model):
        off = getattr(block, "_ember_offloader", None)
        if off is not None:
            return off
    return None
