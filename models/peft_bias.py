"""Biases and full weights saved with a PEFT adapter: what ``save_adapter`` writes for
``bias="all"`` / ``"lora_only"`` (Phi's LayerNorm and lm_head biases too), which saved biases
``load_adapter`` applies, and which saved full embedding / head weights equal the model's own
(``save_embedding_layers``) and change nothing.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import torch
import torch.nn as nn

from ember import EmberError
from ember.models.hf import ember_key_to_hf
from ember.models.lora import LoRALinear, lora_modules
from ember.models.peft_files import _MERGE_HINT, _saved_modules
from ember.models.peft_keys import _EMBER_NAME, ember_module_name, hf_module_name


def _bias_params(model: nn.Module) -> dict[str, tuple[str, bool, nn.Parameter]]:
    """Every bias of the model (projections, Phi's LayerNorms and lm_head): transformers' module
    name -> (whether PEFT wraps that module in a LoRA layer, so its key has ``base_layer``, the
    parameter)."""
    cfg, wrapped, out = getattr(model, "cfg", None), lora_modules(model), {}
    for n, p in model.named_parameters():
        if not n.endswith("bias"):
            continue
        key = n.replace(".base.", ".")
        module = "lm_head" if n == "head_bias" else key.rpartition(".")[0]
        hf = (hf_module_name(module, cfg) if _EMBER_NAME.fullmatch(module)
              else (ember_key_to_hf(key, cfg) or "").removesuffix(".bias"))
        if hf:
            out[hf] = (module in wrapped, p)
    return out


def _bias_tensors(model: nn.Module, mode: str) -> dict[str, torch.Tensor]:
    """The biases as PEFT saves them for bias="all" (every one, norms' too) or "lora_only" (those
    of adapted modules; ``base_layer.bias`` inside PEFT's wrapper)."""
    if mode == "none":
        return {}
    return {f"base_model.model.{hf}{'.base_layer' if wrapped else ''}.bias":
            p.detach().to("cpu").contiguous()
            for hf, (wrapped, p) in _bias_params(model).items()
            if wrapped or mode == "all"}

def _same_as_loaded(p: torch.Tensor, t: torch.Tensor) -> bool:
    """Whether loading saved tensor t into parameter p (PEFT's load_state_dict: cast to p's
    dtype) leaves p as it is: an fp32 copy of the base saved by PEFT onto a base loaded in bf16
    changes nothing (was: compared in fp32, so such adapters were refused). A torchrun rank
    above 0 builds on "meta" (no values): rank 0 compares, and broadcasts the weights."""
    if p.is_meta:
        return p.shape == t.shape
    return p.shape == t.shape and torch.equal(p.detach().cpu(), t.to(p.dtype))


# save_embedding_layers beside PEFT's wrappers of the embedding / head saves their insides too:
# the base inside a LoRA, trainable-tokens or modules_to_save wrapper (which PEFT loads back
# into the base module), and the trained modules_to_save copy under the name it has in memory
# (".modules_to_save.weight", which names no parameter on loading: PEFT ignores it; the copy it
# loads is the one saved as "<module>.weight")
_SAVED_BASE = re.compile(r"base_model\.model\.(.+?)"
                         r"(?:\.base_layer|\.token_adapter\.base_layer|\.original_module)?\.weight")
_IGNORED_COPY = re.compile(r"base_model\.model\.(.+?)\.modules_to_save\.weight")


def _saved_unchanged_embedding(model: nn.Module, key: str, t: torch.Tensor) -> bool:
    """A full embedding / head weight PEFT saved (``save_embedding_layers``) equal to the model's:
    loading it (as PEFT does) changes nothing, so it can be skipped; or a copy PEFT ignores on
    loading. Named as in any layout PEFT saw (a multimodal Gemma 3's
    ``model.language_model.embed_tokens`` too)."""
    ignored = _IGNORED_COPY.fullmatch(key)
    if ignored and ember_module_name(ignored[1]) in ("embed", "lm_head"):
        return True
    m = _SAVED_BASE.fullmatch(key)
    attr = ember_module_name(m[1]) if m else None
    if attr not in ("embed", "lm_head"):
        return False
    mod = getattr(model, attr, None)
    if mod is None and attr == "lm_head":
        mod = getattr(model, "embed", None)  # tied: the head is the embedding
    w = getattr(mod.base if isinstance(mod, LoRALinear) else mod, "weight", None)
    return isinstance(w, torch.Tensor) and _same_as_loaded(w, t)


_BIAS_KEY = re.compile(r"base_model\.model\.(.+?)(?:\.base_layer)?\.bias")


_LORA_A_KEY = re.compile(r"base_model\.model\.(.+)\.lora_A(?:\.default)?\.weight")


def _warn_unsaved_biases(params: dict, tensors: dict, wfile: Path) -> None:
    """bias="lora_only" trains the adapted modules' biases; PEFT 0.10-0.17 never saved them (its
    get_peft_model_state_dict looked for ``q_proj.bias``, the key is ``q_proj.base_layer.bias``),
    so such a file holds none: the biases it trained are lost. Said, not refused (peft 0.21
    loads the file silently with the base's biases, as Ember does)."""
    adapted = {m[1] for k in tensors if (m := _LORA_A_KEY.fullmatch(k))}
    missing = sorted(hf for hf in params if hf in adapted)
    saved = {m[1] for k in tensors if (m := _BIAS_KEY.fullmatch(k))}
    if missing and not saved & set(missing):
        warnings.warn(f"{wfile}: bias='lora_only' but the adapter holds no bias of the "
                      f"{len(missing)} adapted modules that have one ({missing[0]}, ...): the "
                      "PEFT that wrote it (0.10-0.17 did not save them) lost the biases it "
                      "trained; the base model's biases are used", stacklevel=3)


def _adapter_biases(model: nn.Module, config: dict, tensors: dict, wfile: Path) -> dict:
    """The biases saved with the adapter (popped from tensors) that differ from the model's:
    ``{parameter: bias}``. PEFT trains them with bias="all" / "lora_only" and with a
    modules_to_save lm_head (Phi's lm_head.bias), and they replace the base's own; copies equal
    to the base's (save_embedding_layers) change nothing. A model without biases (Llama) saves
    none: a plain LoRA."""
    mode, params, out = config.get("bias", "none"), _bias_params(model), {}
    head_saved = "lm_head" in _saved_modules(config.get("modules_to_save") or [])[0]
    if mode == "lora_only":
        _warn_unsaved_biases(params, tensors, wfile)
    for key in [k for k in tensors if k.endswith(".bias")]:
        m = _BIAS_KEY.fullmatch(key)
        wrapped, p = params.get(m[1] if m else "", (None, None))
        if p is None or p.shape != tensors[key].shape:
            raise EmberError(f"{wfile}: bias={mode!r}: the adapter's bias {key} "
                             f"{tuple(tensors[key].shape)} fits no bias of this model; "
                             f"{_MERGE_HINT}")
        t = tensors.pop(key)
        if _same_as_loaded(p, t):
            continue
        if mode == "none" and not (head_saved and m[1] == "lm_head"):
            raise EmberError(f"{wfile}: the adapter replaces the bias {key} with bias='none' "
                             f"(new full weights saved with save_embedding_layers?); {_MERGE_HINT}")
        out[p] = t
    return out
