"""The forwards ``ember.models.hf_backend.accelerate`` binds on a transformers model's modules
(the module docstring there says what each does and when it falls back to HF's): the RMSNorms'
and MLPs', the attention layers' (Ember's RoPE and flash attention, dense or varlen per the
``AttentionPlan``), the inner model's (which makes that plan) and the causal LM's (the fused
loss, deferred logits); and the helpers that bind them and recognize them (``_mark``, ``_bind``,
``_swap_kind``, ``_replaced``).
"""

from __future__ import annotations

import functools
import sys
import types
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ember.kernels import apply_rope, flash_attention, rms_norm
from ember.models.hf_backend_families import FAMILIES, _family
from ember.models.hf_backend_io import (
    AttentionPlan,
    attention_plan,
    cache_name,
    check_labels,
    default_loss,
    hooked,
    keep_slice,
    kept_shift_labels,
    kernel_dtypes,
    labels_read_padding,
    plain_head,
    take_cache,
    with_cache,
)
from ember.models.hf_backend_loss import (
    LazyLogits,
    causal_lm_loss,
    deferred_logits,
    head_logits,
    head_version,
    lazy_logits_output,
    watch_steps,
)
from ember.models.hf_wrappers import _OFF, _ours, _under_wrapper

PLAN_KW = "ember_attention_plan"
# Set by the causal LM's swapped forward, which checks the labels against the padding: the inner
# model called without it (TRL's fused head, any head of the user's) cannot know which padding
# outputs are read.
LABELS_CHECKED_KW = "ember_labels_checked"


# ------------------------------------------------------------------------------- new forwards
def _mark(kind: str) -> Callable[[Callable], Callable]:
    def deco(fn: Callable) -> Callable:
        fn._ember_swap = kind  # how swapped() and restore() recognize our forwards
        return fn

    return deco


def _bind(module: nn.Module, fn: Callable) -> None:
    cache_name(type(module))  # looked up now, not inside a torch.compile trace of the forward
    method = types.MethodType(fn, module)
    if hooked(module):  # swap inside the hook, keeping what it called to restore it
        module._ember_hooked_forward = module._old_forward
        module._old_forward = method
    else:
        module.forward = method


def _swap_kind(module: nn.Module) -> str | None:
    if module.__dict__.get(_OFF):
        return None
    # _original_forward: accelerate's mixed-precision wrapper (Trainer with bf16/fp16) calls it
    for key in ("forward", "_old_forward", "_original_forward"):
        fn = module.__dict__.get(key)
        if _ours(fn):
            return fn._ember_swap
    under = _under_wrapper(module)
    return None if under is None else under._ember_swap


def _replaced(module: nn.Module) -> Callable:
    """The forward the swap replaced: under a dispatch hook the one it called, else the class's."""
    saved = module.__dict__.get("_ember_hooked_forward")
    return saved if saved is not None else types.MethodType(type(module).forward, module)


@_mark("rms_norm")
def _rms_norm_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    if not kernel_dtypes(hidden_states, self.weight):
        return _replaced(self)(hidden_states)
    return rms_norm(hidden_states, self.weight, self.variance_epsilon)


@_mark("rms_norm")
def _gemma_rms_norm_forward(self, x: torch.Tensor) -> torch.Tensor:
    # HF: (x.float() * rsqrt(mean(x^2) + eps) * (1 + w.float())).type_as(x), rounded once.
    if not kernel_dtypes(x, self.weight):
        return _replaced(self)(x)
    return rms_norm(x, self.weight, self.eps, offset=1.0)


def _mlp_forward_for(act: Callable) -> Callable:
    @_mark(f"mlp:{act.__name__}")
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not kernel_dtypes(x):
            return _replaced(self)(x)
        if hasattr(self, "gate_up_proj"):  # Phi-3: one projection, gate first (HF's chunk(2))
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(act(gate, up))

    return forward


def _window(attn: nn.Module, config_window: bool) -> int | None:
    # Qwen2/3, Gemma 2/3, SmolLM3 store the per-layer window on the module (None on full-attention
    # layers); Mistral and Phi-3 read it from the config; Llama, Gemma, Granite, OLMo2 have none
    # (a "sliding_window" left in their config.json is ignored by transformers, and so here).
    if hasattr(attn, "sliding_window"):
        return attn.sliding_window
    return getattr(attn.config, "sliding_window", None) if config_window else None


def _hf_attention(self, q, k, v, attention_mask, dropout, softcap, window, **kwargs):
    """HF's attention function for this config, in HF's (B, H, T, hd) layout -> (B, T, H, hd),
    and its attention weights (None where the function gives none)."""
    impl = self.config._attn_implementation
    default = getattr(sys.modules[type(self).__module__], "eager_attention_forward", None)
    if impl == "eager" or impl is None:
        fn = default
    else:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        fn = ALL_ATTENTION_FUNCTIONS.get_interface(impl, default)
    if softcap is not None:  # only Gemma 2's attention functions are handed one
        kwargs["softcap"] = softcap
    return fn(self, q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attention_mask,
              dropout=dropout, scaling=self.scaling, sliding_window=window, **kwargs)


def _varlen_attention(q, k, v, plan: AttentionPlan, **opts):
    B, T, H, hd = q.shape
    qf, kf, vf = (t.reshape(B * T, t.shape[2], hd) for t in (q, k, v))  # (B*T, heads, hd)
    if plan.indices is not None:
        qf, kf, vf = (t.index_select(0, plan.indices) for t in (qf, kf, vf))
    out = flash_attention(qf, kf, vf, causal=True, cu_seqlens=plan.cu_seqlens,
                          max_seqlen=plan.max_seqlen, **opts)
    if plan.indices is not None:
        out = out.new_zeros(B * T, H, hd).index_copy(0, plan.indices, out)
    return out.view(B, T, H, hd)


def _project_qkv(self, x: torch.Tensor, hd: int):
    """q (B, T, H, hd), k and v (B, T, K, hd), each projection called as a module (PEFT)."""
    B, T, _ = x.shape
    if hasattr(self, "qkv_proj"):  # Phi-3: fused [q | k | v], split by head counts as HF does
        qkv = self.qkv_proj(x)
        nq, nk = self.config.num_attention_heads * hd, self.config.num_key_value_heads * hd
        q, k, v = qkv[..., :nq], qkv[..., nq:nq + nk], qkv[..., nq + nk:]
    else:
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
    return (t.view(B, T, -1, hd) for t in (q, k, v))


def _attention_forward_for(rope: bool, flash: bool, softcap: bool, config_window: bool
                           ) -> Callable:
    @_mark("attention" if flash else "rope")
    def forward(self, hidden_states: torch.Tensor,
                position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
                attention_mask: torch.Tensor | None = None, past_key_values=None, **kwargs):
        plan = kwargs.pop(PLAN_KW, None)
        cache = take_cache(kwargs, past_key_values)
        B, T, _ = hidden_states.shape
        q, k, v = _project_qkv(self, hidden_states, self.head_dim)
        if hasattr(self, "q_norm") and self.q_norm.weight.numel() != self.head_dim:
            # OLMo2: RMSNorm over the whole q / k projection, before the head split
            q = self.q_norm(q.reshape(B, T, -1)).view(B, T, -1, self.head_dim)
            k = self.k_norm(k.reshape(B, T, -1)).view(B, T, -1, self.head_dim)
        elif hasattr(self, "q_norm"):  # Qwen3, Gemma 3: per-head RMSNorm before RoPE
            q, k = self.q_norm(q), self.k_norm(k)
        # (B or 1, T, R): cat(freqs, freqs) over the rotary dims R (R < hd: partial rotary),
        # whatever RoPE type (and, for Gemma 3, which of its two tables) HF computed.
        cos, sin = position_embeddings
        if not getattr(self, "use_rope", True):  # SmolLM3's NoPE layers
            pass
        elif rope and kernel_dtypes(q, k, cos):
            r = cos.shape[-1] // 2
            q, k = apply_rope(q, k, cos[..., :r], sin[..., :r])
        else:
            hf_rope = sys.modules[type(self).__module__].apply_rotary_pos_emb
            qt, kt = hf_rope(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
            q, k = qt.transpose(1, 2), kt.transpose(1, 2)
        if cache is not None:
            kc, vc = cache.update(k.transpose(1, 2), v.transpose(1, 2), self.layer_idx)
            k, v = kc.transpose(1, 2), vc.transpose(1, 2)  # (B, S, K, hd)
        dropout = self.attention_dropout if self.training else 0.0
        cap = self.attn_logit_softcapping if softcap else None
        opts = dict(softmax_scale=self.scaling, window=_window(self, config_window), softcap=cap)
        # output_attentions (read as transformers' capture_outputs reads it) needs the weights
        # only HF's attention functions give (eager; SDPA gives none, as unswapped).
        weights = kwargs.get("output_attentions", getattr(self.config, "output_attentions", False))
        out = None
        if (flash and kernel_dtypes(q) and not weights and dropout == 0.0 and k.shape[1] == T
                and getattr(self, "is_causal", True)):
            if (plan is not None and plan.cu_seqlens is not None
                    and not (plan.packed and cache is not None)):
                if not (plan.gaps and opts["window"] is not None):
                    out = _varlen_attention(q, k, v, plan, **opts)
            elif plan is not None or attention_mask is None:
                out = flash_attention(q, k, v, causal=True, **opts)
        attn_weights = None
        if out is None:
            out, attn_weights = _hf_attention(self, q, k, v, attention_mask, dropout, cap,
                                              opts["window"], **kwargs)
        out = self.o_proj(out.reshape(B, T, -1))
        return out, attn_weights

    return forward


@_mark("attention_plan")
def _model_forward(self, input_ids=None, attention_mask=None, position_ids=None,
                   past_key_values=None, inputs_embeds=None, use_cache=None, **kwargs):
    ref = input_ids if input_ids is not None else inputs_embeds
    checked = kwargs.pop(LABELS_CHECKED_KW, False)
    cache = take_cache(kwargs, past_key_values)
    # Under torch.compile no plan (its host syncs are data-dependent: a fullgraph trace fails):
    # each layer uses Ember's attention where HF's mask is None, else HF's with HF's mask
    if ref is not None and PLAN_KW not in kwargs and not torch.compiler.is_compiling():
        plan = attention_plan(attention_mask, position_ids, ref.shape[0], ref.shape[1], cache)
        # Called directly (no labels seen) with eager attention and left padding: the outputs at
        # the fully masked rows are HF's only from HF's attention, and a head may read them (a
        # row's first real token labelled)
        if plan is not None and not (plan.leading and not checked
                                     and self.config._attn_implementation == "eager"):
            kwargs[PLAN_KW] = plan
    return type(self).forward(self, input_ids=input_ids, attention_mask=attention_mask,
                              position_ids=position_ids, inputs_embeds=inputs_embeds,
                              use_cache=use_cache, **with_cache(self, kwargs, cache))


def _final_softcap(lm: nn.Module) -> float | None:
    if not FAMILIES[_family(lm)].final_softcap:
        return None
    return getattr(lm.config, "final_logit_softcapping", None)


def _causal_lm_forward_for(fused_loss: bool) -> Callable:
    @_mark("loss" if fused_loss else "attention_plan")
    def forward(self, input_ids=None, attention_mask=None, position_ids=None,
                past_key_values=None, inputs_embeds=None, labels=None, use_cache=None,
                logits_to_keep=0, **kwargs):
        # the cache under the name this transformers' forwards take it by
        with_cache(self, kwargs, take_cache(kwargs, past_key_values))
        if self.__dict__.get(_OFF):  # restore()d under a wrapper: HF's forward
            return type(self).forward(self, input_ids=input_ids, attention_mask=attention_mask,
                                      position_ids=position_ids, inputs_embeds=inputs_embeds,
                                      labels=labels,
                                      use_cache=use_cache, logits_to_keep=logits_to_keep,
                                      **kwargs)
        planned = _swap_kind(self.model)
        ref = input_ids if input_ids is not None else inputs_embeds
        ignore_index = kwargs.get("ignore_index", -100)
        shift_labels = kwargs.get("shift_labels")
        fused = (fused_loss and labels is not None and plain_head(self.lm_head)
                 and default_loss(self) and not torch.is_tensor(logits_to_keep))
        # logits_to_keep: the kept positions' labels (the fused loss: one per kept position or
        # a ValueError, as HF's loss raises on the count)
        kept = None if ref is None else kept_shift_labels(
            labels, shift_labels, logits_to_keep, tuple(ref.shape[:2]), ignore_index,
            strict=fused)
        if kept is not None:
            shift_labels = kept
        if (PLAN_KW not in kwargs and planned == "attention_plan"
                and not torch.compiler.is_compiling()  # no plan there: see _model_forward
                and labels_read_padding(attention_mask, labels, shift_labels, ignore_index,
                                         self.config._attn_implementation == "sdpa")):
            kwargs[PLAN_KW] = None  # every layer runs HF's attention with HF's mask
        elif planned == "attention_plan":
            kwargs[LABELS_CHECKED_KW] = True
        return _causal_lm(self, fused, kept, input_ids, attention_mask, position_ids,
                          inputs_embeds, labels, use_cache, logits_to_keep, **kwargs)

    return forward


def _causal_lm(self, fused, kept, input_ids, attention_mask, position_ids, inputs_embeds, labels,
               use_cache, logits_to_keep, **kwargs):
    shift_labels = kwargs.get("shift_labels") if kept is None else kept
    if not fused:
        return type(self).forward(self, input_ids=input_ids, attention_mask=attention_mask,
                                  position_ids=position_ids, inputs_embeds=inputs_embeds,
                                  labels=labels,
                                  use_cache=use_cache, logits_to_keep=logits_to_keep, **kwargs)
    from transformers.modeling_outputs import CausalLMOutputWithPast

    kwargs.pop("shift_labels", None)
    return_dict = kwargs.pop("return_dict", None)
    num_items = kwargs.pop("num_items_in_batch", None)
    ignore_index = kwargs.pop("ignore_index", -100)
    outputs = self.model(input_ids=input_ids, attention_mask=attention_mask,
                         position_ids=position_ids, inputs_embeds=inputs_embeds,
                         use_cache=use_cache, **kwargs)
    hidden = outputs.last_hidden_state  # (B, T, D)
    if FAMILIES[_family(self)].logits_scaling:  # Granite: logits / s, as (hidden / s) W^T
        hidden = hidden / self.config.logits_scaling
    check_labels(labels if shift_labels is None else shift_labels, hidden.shape[:2],
                 "labels" if shift_labels is None else "shift_labels")
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    cap = _final_softcap(self)
    loss = causal_lm_loss(hidden, self.lm_head, shift_labels, num_items, ignore_index, cap)
    kept_hidden = hidden[:, keep_slice(logits_to_keep)]
    output = CausalLMOutputWithPast
    if not self.training or return_dict is False:  # a tuple cannot defer them: HF's tensor
        logits = head_logits(self.lm_head, kept_hidden, cap)
    else:  # training: built only if read (a distillation loop reads them, with the loss)
        dev = kept_hidden.device.type
        autocast = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None
        if not torch.compiler.is_compiling():  # a deep copy of a swapped model: not watched yet
            watch_steps(self)
        logits = LazyLogits(functools.partial(deferred_logits, self.lm_head, kept_hidden, cap,
                                              torch.is_grad_enabled(), autocast,
                                              head_version(self.lm_head)),
                            autocast or self.lm_head.weight.dtype)
        output = lazy_logits_output()
    # transformers 5.24 names the output's cache field ``cache`` (past_key_values before)
    name = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
    out = output(loss=loss, logits=logits, **{name: getattr(outputs, name)},
                 hidden_states=outputs.hidden_states, attentions=outputs.attentions)
    return out.to_tuple() if return_dict is False else out  # loss and logits both tensors
