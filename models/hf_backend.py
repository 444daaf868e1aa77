"""Ember's kernels inside a Hugging Face ``transformers`` model: ``accelerate(model)``.

``accelerate`` takes a ``LlamaForCausalLM`` / ``MistralForCausalLM`` / ``Qwen2ForCausalLM`` /
``Qwen3ForCausalLM`` / ``GemmaForCausalLM`` / ``Gemma2ForCausalLM`` / ``Gemma3ForCausalLM`` (text)
/ ``Phi3ForCausalLM`` / ``SmolLM3ForCausalLM`` / ``GraniteForCausalLM`` / ``Olmo2ForCausalLM``
instance (bare, or inside a PEFT ``PeftModel``: the causal LM is found
inside) and rebinds ``forward`` on *that instance's* modules only (``types.MethodType``); no
transformers class, function or registry is touched, parameters stay where they are (state dicts,
``save_pretrained`` and PEFT adapters are unaffected), and ``restore(model)`` puts the original
methods back. A module under an ``accelerate`` dispatch hook (``device_map`` with offload or
several devices) keeps its hook: the swap replaces the ``_old_forward`` the hook calls. A wrapper
set on the causal LM instance after the swap (accelerate's mixed precision, TRL's
``add_fused_lm_head``, which DPOTrainer and SFTTrainer add) keeps calling it: ``swapped`` reports
it, ``restore`` switches it to HF's forward; a causal LM already wrapped so before the swap is
refused (the swap would drop the wrapper): swap first, then hand the model to the trainer.
Multimodal classes (``Gemma3ForConditionalGeneration``) are refused: load the text model. What
sets a family apart is read as its modeling file reads it (``FAMILIES``).

What is swapped (each a keyword, all on by default):

- ``rms_norm``: every ``*RMSNorm`` (layer norms, final norm, Gemma 2/3's sandwich norms, Qwen3's
  and Gemma 3's per-head q/k norms) -> ``ember.kernels.rms_norm``. HF rounds the normalized input
  to the input dtype before multiplying by the weight; Ember rounds once at the end (equal in fp32,
  closer to fp32 in bf16). Gemma's norms are ``x * (1 + w)`` in fp32, cast at the end, exactly
  HF's: ``rms_norm(..., offset=1.0)``.
- ``mlp``: ``down(act(gate(x)) * up(x))`` with the fused ``swiglu`` (silu/swish) or ``geglu``
  (gelu_pytorch_tanh), the activation read from the field the family's MLP reads (``hidden_act``;
  Gemma 2/3: ``hidden_activation``); other activations keep HF's MLP. Phi-3's fused
  ``gate_up_proj`` output is chunked in two, gate first, as HF does.
- ``rope`` and ``attention``: the attention module's forward is replaced. Projections are called
  as modules (PEFT's LoRA layers apply; Phi-3's fused ``qkv_proj`` output is split into q, k, v by
  head counts). RoPE: HF passes the layer's cos/sin (Gemma 3: the local or global table for that
  layer; LongRoPE and other types as HF computed them) over the rotary dims R, ``cat(freqs,
  freqs)``; the first half is Ember's half layout, so ``apply_rope(q, k, cos[..., :R/2],
  sin[..., :R/2])`` in the (B, T, H, hd) layout, which rotates the first R dims of each head and
  passes the rest through (R < hd: Phi-3's ``partial_rotary_factor``). Attention ->
  ``ember.kernels.flash_attention`` (causal, GQA, the module's ``scaling`` - Gemma 2/3:
  ``query_pre_attn_scalar ** -0.5`` -, the layer's sliding window as HF reads it - the module's
  ``sliding_window`` (None on full layers) or Mistral/Phi-3's config -, and Gemma 2's
  ``attn_logit_softcapping``; Gemma 3 keeps that field but HF does not apply it, nor does Ember) in
  these cases:

  * no padding and no packing -> dense causal (whatever causal or sliding-window mask HF built
    for its own attention is not read);
  * a 2-D ``attention_mask`` with padding -> varlen: the real tokens of each row are gathered
    into one packed sequence (``cu_seqlens``), attended, and scattered back. Real tokens get
    exactly HF's causal-with-padding result; outputs at padding positions are 0 (HF's are
    meaningless values that a -100 label ignores). When a label is predicted from a padding
    position (a left-padded row's first real token, with labels = ids, padding -100), HF's loss
    includes HF's output there, so that forward runs HF's attention in every layer (the causal
    LM's forward checks the labels, also with ``loss=False``); except with SDPA for padding
    before a row's first real token: a fully masked query row, 0 in SDPA as in varlen. Padding
    inside a row (not only at its ends) in a layer with a sliding window goes to HF: HF's window
    counts the padding positions;
  * packed rows (no mask, ``position_ids`` restarting per document, no KV cache: the same rule HF
    uses to detect packing) -> varlen with one document per restart.

  Everything else goes to HF's own attention function for the configured ``attn_implementation``,
  with HF's mask, window and softcap: decoding with a KV cache (queries != keys), custom 4-D or
  per-layer-type mask dicts, attention dropout in training, ``output_attentions`` (HF's weights
  are returned; SDPA gives none, as unswapped), and non-causal use (Gemma 3's
  ``use_bidirectional_attention``). ``rope`` alone (``attention=False``) rotates with Ember and
  always calls HF's attention.
- ``loss``: when ``labels`` are given (as in HF, ``shift_labels`` alone gives no loss) and
  ``lm_head`` is a plain ``nn.Linear``, the loss comes from ``ember.kernels.linear_cross_entropy``
  on the final hidden states of the labelled positions only: the (B, T, V) logits are never built.
  Semantics are HF's ``ForCausalLMLoss``: labels shifted left by one (or ``shift_labels``),
  ``ignore_index`` (-100) skipped, mean over labelled tokens, or sum / ``num_items_in_batch`` when
  that is passed (gradient accumulation); with ``logits_to_keep`` over the kept positions only,
  one label per kept position, as HF (an index tensor with labels: HF's loss path); Gemma 2/3's
  ``final_logit_softcapping`` c caps the logits first (``softcap=c``), and eval logits are
  ``c * tanh(logits / c)`` as HF's. Under autocast the head runs in the autocast dtype, as HF's
  ``lm_head`` would. In eval mode the logits are computed too; in training mode only when read
  (``out.logits``, ``out["logits"]``, ``out.get("logits")``, ``to_tuple()``: a distillation loop
  adds a loss on them to ``out.loss``; ``values()`` and ``items()`` hold the lazy object), from
  the saved final hidden states under the forward's grad mode and autocast; after accelerate's
  fp32 output conversion (mixed precision) they are read as float32, as HF's. Read after an
  optimizer step changed ``lm_head`` they would not be the forward's: an ``EmberError`` (a step
  of any ``torch.optim.Optimizer`` holding the head with a gradient, fused and 8-bit ones too,
  bumps its version counter: torch's step pre-hook). Under ``torch.compile`` (``fullgraph=True``
  too, as transformers' own model) every row goes to the fused loss, the unlabelled ones ignored
  by the kernel (selecting them is a data-dependent shape), the logits stay deferred, and no
  attention plan is made (host syncs): each layer runs Ember's attention where HF's mask is
  None, else HF's attention with HF's mask (padding, packed rows: HF's compiled result).
  Differences: a batch whose labels are all -100 gives loss 0 (HF: NaN). A LoRA/quantized
  ``lm_head``, one with hooks (also ``accelerate``'s dispatch hook: offloaded or on another
  device), or a custom ``model.loss_function``, keeps HF's loss path. Gemma's ``sqrt(hidden)``
  embedding scale stays in HF's model forward, as do Granite's embedding and residual multipliers;
  Granite's ``logits_scaling`` divides the hidden states before the fused loss (and the eval
  logits). With ``return_dict=False`` the tuple keeps HF's layout, ``(loss, logits, ...)``; a
  tuple cannot defer the logits, so in training mode they are built in the forward (the loss
  stays fused; the (B, T, V) logits cost what HF's do).

A module whose inputs or weights are in a dtype Ember's kernels do not take (a model moved to
float64 after the swap) runs the forward the swap replaced.

The decision is made once per forward by the wrapper of the inner ``*Model`` from the 2-D
``attention_mask``, ``position_ids`` and cache (host syncs: one or two for a mask, one for
position_ids), and handed to every attention layer as a keyword argument
(``ember_attention_plan``), so gradient checkpointing replays it. An attention layer called
without a plan (the inner model's forward bypassed) uses Ember only when HF's mask is None. The
inner model called directly (TRL's fused LM head, a head of the user's: no labels seen) with
eager attention and left padding runs HF's attention: its output at a fully masked row (the
position predicting a row's first real token) is the mean of the values, which varlen leaves 0.
"""

from __future__ import annotations

import functools
import sys
import types
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ember import EmberError
from ember.kernels import apply_rope, flash_attention, geglu, rms_norm, swiglu
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
    unwatch_steps,
    watch_steps,
)
from ember.models.hf_wrappers import (
    _BOUND,
    _OFF,
    _check_wrapped,
    _ours,
    _under_wrapper,
    _wrapped_swap,
)

PLAN_KW = "ember_attention_plan"
# Set by the causal LM's swapped forward, which checks the labels against the padding: the inner
# model called without it (TRL's fused head, any head of the user's) cannot know which padding
# outputs are read.
LABELS_CHECKED_KW = "ember_labels_checked"
_ACTIVATIONS = {"silu": swiglu, "swish": swiglu, "gelu_pytorch_tanh": geglu}


@dataclass(frozen=True)
class Family:
    """What sets a family's modules apart, as its transformers modeling file reads it."""

    act_key: str = "hidden_act"  # config field the MLP's activation is read from
    gemma_norm: bool = False  # RMSNorm scales by (1 + w), rounds once; eps in .eps
    attn_softcap: bool = False  # Gemma 2 passes its attention's attn_logit_softcapping (3 does not)
    final_softcap: bool = False  # logits = c * tanh(logits / c), c = final_logit_softcapping
    logits_scaling: bool = False  # Granite: logits / config.logits_scaling
    # Mistral, Phi-3: the attention reads config.sliding_window (no module attribute). Other
    # families without the attribute have no window, whatever stray field their config carries.
    config_window: bool = False


_GEMMA2 = Family("hidden_activation", True, attn_softcap=True, final_softcap=True)
FAMILIES = {
    "LlamaForCausalLM": Family(),
    "MistralForCausalLM": Family(config_window=True),
    "Qwen2ForCausalLM": Family(),
    "Qwen3ForCausalLM": Family(),
    "GemmaForCausalLM": Family(gemma_norm=True),
    "Gemma2ForCausalLM": _GEMMA2,
    "Gemma3ForCausalLM": Family("hidden_activation", True, final_softcap=True),
    "Phi3ForCausalLM": Family(config_window=True),
    # SmolLM3: NoPE layers (the module's use_rope); Granite: the multipliers stay in HF's layer
    # and model code, the softmax scale is the module's scaling; OLMo2: full-width q/k norms
    "SmolLM3ForCausalLM": Family(),
    "GraniteForCausalLM": Family(logits_scaling=True),
    "Olmo2ForCausalLM": Family(),
}
SUPPORTED = tuple(FAMILIES)


# ------------------------------------------------------------------------------ finding modules
def _family(m: nn.Module) -> str | None:
    for cls in type(m).__mro__:
        if cls.__name__ in SUPPORTED and cls.__module__.startswith("transformers."):
            return cls.__name__
    return None


def find_causal_lm(model: nn.Module) -> nn.Module:
    """The supported transformers causal LM in ``model`` (itself, or inside PEFT wrappers)."""
    if not isinstance(model, nn.Module):
        raise EmberError(f"accelerate() takes a transformers model instance, got "
                         f"{type(model).__name__}")
    # modules() is self first, then depth-first: PeftModel -> LoraModel -> *ForCausalLM.
    for m in model.modules():
        if _family(m) is not None:
            return m
    multimodal = ("; multimodal models (ForConditionalGeneration) are not swapped: load the text "
                  "model alone (e.g. Gemma3ForCausalLM)" if any(
                      type(m).__name__.endswith("ForConditionalGeneration")
                      for m in model.modules()) else "")
    if any(type(m).__name__.endswith("SparseMoeBlock") for m in model.modules()):
        multimodal += ("; mixture-of-experts models (Mixtral, Qwen2/3-MoE) are not swapped, "
                       "their experts are not plain MLPs")
    raise EmberError(f"accelerate(): {type(model).__name__} is not a supported model; Ember swaps "
                     f"kernels into {', '.join(SUPPORTED)} instances (or a PEFT model wrapping "
                     f"one){multimodal}. Load the model with one of those classes, or train it "
                     "with Ember natively (ember.models.load_pretrained)")


def _is(m: nn.Module, suffix: str, *attrs: str, one_of: tuple[tuple[str, ...], ...] = ((),)
        ) -> bool:
    """``m``'s class name ends with ``suffix``, it has every attr and all attrs of one ``one_of``
    alternative (separate projections, or Phi-3's fused ones)."""
    return (type(m).__name__.endswith(suffix) and all(hasattr(m, a) for a in attrs)
            and any(all(hasattr(m, a) for a in alt) for alt in one_of))


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


# ------------------------------------------------------------------------------------- public
def accelerate(model: nn.Module, *, rms_norm: bool = True, rope: bool = True, mlp: bool = True,
               attention: bool = True, loss: bool = True) -> nn.Module:
    """Swap Ember's kernels into this transformers model instance (see the module docstring);
    returns the same ``model``. Calling it again re-applies the chosen swaps."""
    lm = find_causal_lm(model)
    lm_forward = _causal_lm_forward_for(loss) if (loss or attention) else None
    _check_wrapped(lm, lm_forward)  # before anything changes
    restore(lm)
    base = getattr(lm, "model", None)
    if base is None or not hasattr(base, "layers"):
        raise EmberError(f"accelerate(): {type(lm).__name__} has no .model.layers; this "
                         "transformers version lays the model out differently than Ember expects")
    fam = FAMILIES[_family(lm)]
    c = lm.config
    if (getattr(c, "model_type", None) == "smollm3" and not c.use_sliding_window
            and "sliding_attention" in (c.layer_types or ())):
        raise EmberError("accelerate(): this SmolLM3 config marks sliding_attention layers with "
                         "use_sliding_window=false, where transformers' eager/SDPA attention "
                         "applies the window and its flash attention does not; set "
                         "use_sliding_window=true or mark those layers full_attention")
    act = _ACTIVATIONS.get(getattr(lm.config, fam.act_key, None))
    attn_forward = _attention_forward_for(rope, attention, fam.attn_softcap, fam.config_window)
    norm, norm_eps = ((_gemma_rms_norm_forward, "eps") if fam.gemma_norm
                      else (_rms_norm_forward, "variance_epsilon"))
    for m in lm.modules():
        if rms_norm and _is(m, "RMSNorm", "weight", norm_eps):
            _bind(m, norm)
        elif mlp and act is not None and _is(m, "MLP", "down_proj", one_of=(
                ("gate_proj", "up_proj"), ("gate_up_proj",))):
            _bind(m, _mlp_forward_for(act))
        elif (rope or attention) and _is(m, "Attention", "o_proj", "head_dim", "scaling",
                                         "layer_idx", one_of=(("q_proj", "k_proj", "v_proj"),
                                                              ("qkv_proj",))):
            _bind(m, attn_forward)
    if attention:
        _bind(base, _model_forward)
    if loss:
        lazy_logits_output()  # the output class, built now rather than in a compile trace
        watch_steps(lm)
    if lm_forward is not None:  # attention alone: the causal LM only checks the labels
        _bind_causal_lm(lm, lm_forward)
    return model


def _bind_causal_lm(lm: nn.Module, fn: Callable) -> None:
    if _wrapped_swap(lm) is None:
        _bind(lm, fn)
        if not hooked(lm):
            lm.__dict__[_BOUND] = lm.__dict__["forward"]
    else:  # the wrapper calls the same swap: switch it back on
        lm.__dict__.pop(_OFF, None)


def swapped(model: nn.Module) -> dict[str, str]:
    """Module name (relative to ``model``) -> what its forward was swapped for ("rms_norm",
    "mlp:swiglu", "attention", "rope", "attention_plan", "loss"; the causal LM's is
    "attention_plan" with ``loss=False``: it only checks the labels against the padding)."""
    return {name: kind for name, m in model.named_modules() if (kind := _swap_kind(m))}


def restore(model: nn.Module) -> nn.Module:
    """Undo ``accelerate``: every swapped module gets its class's forward back (inside an
    ``accelerate`` dispatch hook: the forward the hook called before; under a wrapper set on the
    instance after the swap that calls the swapped forward - accelerate's mixed precision, TRL's
    ``add_fused_lm_head`` -, that forward is switched to HF's)."""
    for m in model.modules():
        unwatch_steps(m)
        m.__dict__.pop(_OFF, None)
        if _ours(m.__dict__.get("forward")):
            del m.forward
        if _wrapped_swap(m) is not None:  # a wrapper set after the swap calls it
            m.__dict__[_OFF] = True
        else:
            m.__dict__.pop(_BOUND, None)
        if _ours(m.__dict__.get("_old_forward")):  # a hook around the swap, added before or after
            saved = m.__dict__.get("_ember_hooked_forward")
            m._old_forward = saved if saved is not None else types.MethodType(type(m).forward, m)
        m.__dict__.pop("_ember_hooked_forward", None)
    return model
