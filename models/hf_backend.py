"""Ember's kernels inside a Hugging Face ``transformers`` model: ``accelerate(model)``.

``accelerate`` takes a ``LlamaForCausalLM`` / ``MistralForCausalLM`` / ``Qwen2ForCausalLM`` /
``Qwen3ForCausalLM`` / ``GemmaForCausalLM`` / ``Gemma2ForCausalLM`` / ``Gemma3ForCausalLM`` (text)
/ ``Phi3ForCausalLM`` / ``SmolLM3ForCausalLM`` / ``GraniteForCausalLM`` / ``Olmo2ForCausalLM`` /
``Olmo3ForCausalLM``
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
  (gelu_pytorch_tanh and the same formula written out: gelu_new, gelu_fast, gelu_accurate,
  gelu_python_tanh; ``ember.models.activations``), the activation read from the field the
  family's MLP reads (``hidden_act``; Gemma 2/3: ``hidden_activation``); other activations keep
  HF's MLP. Phi-3's fused ``gate_up_proj`` output is chunked in two, gate first, as HF does.
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

Code: the families and how their modules are found in ``ember.models.hf_backend_families``; the
swapped forwards in ``ember.models.hf_backend_forwards``; this module binds and restores them.
"""

from __future__ import annotations

import types
from collections.abc import Callable

import torch.nn as nn

from ember import EmberError
from ember.kernels import geglu, swiglu
from ember.models.activations import FUSED, from_hf_name, supported_hf_names
from ember.models.hf_backend_families import (  # noqa: F401  (re-exported: their old home)
    FAMILIES,
    SUPPORTED,
    Family,
    _family,
    _is,
    find_causal_lm,
)
from ember.models.hf_backend_forwards import (  # noqa: F401  (re-exported: their old home)
    LABELS_CHECKED_KW,
    PLAN_KW,
    _attention_forward_for,
    _bind,
    _causal_lm_forward_for,
    _gemma_rms_norm_forward,
    _mlp_forward_for,
    _model_forward,
    _rms_norm_forward,
    _swap_kind,
)
from ember.models.hf_backend_io import hooked
from ember.models.hf_backend_loss import lazy_logits_output, unwatch_steps, watch_steps
from ember.models.hf_wrappers import (
    _BOUND,
    _OFF,
    _check_wrapped,
    _ours,
    _wrapped_swap,
)

# every transformers name of an activation Ember runs fused (silu / swish; gelu_pytorch_tanh and
# the tanh GELU written out: gelu_new, gelu_fast... equal within rounding) -> its gated kernel
_KERNELS = {"silu": swiglu, "gelu_tanh": geglu}
_ACTIVATIONS = {
    name: _KERNELS[from_hf_name(name)]
    for name in supported_hf_names()
    if from_hf_name(name) in FUSED
}



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
