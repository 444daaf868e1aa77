"""PEFT's ``trainable_token_indices`` (LoraConfig, PEFT 0.21): besides the LoRA pairs, chosen rows
of the embedding (and / or the output head) are trained whole. PEFT saves each module's new rows
as ``base_model.model.<module>.token_adapter.trainable_tokens_delta`` (rows x D, in the order of
the indices) and its forward is the base matrix with those rows replaced, so Ember writes them
into the matrix itself (``load_trainable_tokens``) and ``save_adapter`` writes them back from it
(``trainable_tokens_tensors``). A list of indices names the input embedding; a model with tied
embeddings then sees the new rows in its head too, as PEFT ties the head's rows to them. New rows
for the head alone of a tied model change the head but not the embedding in PEFT: the model's
head is untied first (``untie_head``).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
import torch.nn as nn

from ember import EmberError
from ember.models.lora import LoRAEmbedding, LoRALinear, tied_lm
from ember.models.peft_keys import ember_module_name, hf_module_name

_DELTA = re.compile(r"base_model\.model\.(.+)\.token_adapter\.trainable_tokens_delta")
_HINT = ("merge it into the base with PEFT (PeftModel.merge_and_unload(), then save_pretrained) "
         "and load the merged model")


def _delta_key(model: nn.Module, attr: str) -> str:
    """The key PEFT saves the rows under (a multimodal Gemma 3's names inside its class)."""
    name = hf_module_name(attr, getattr(model, "cfg", None))
    return f"base_model.model.{name}.token_adapter.trainable_tokens_delta"


def _pop_delta(tensors: dict, attr: str) -> torch.Tensor | None:
    """The rows saved for Ember module attr, under whichever layout's name PEFT saw."""
    keys = [k for k in tensors if (m := _DELTA.fullmatch(k)) and ember_module_name(m[1]) == attr]
    return tensors.pop(keys[0]) if keys else None


def _attr(name: str) -> str | None:
    if re.fullmatch(r"(?:.*\.)?embed_tokens", name):
        return "embed"
    return "lm_head" if re.fullmatch(r"(?:.*\.)?lm_head", name) else None


def _matrix(model: nn.Module, attr: str) -> torch.Tensor | None:
    mod = getattr(model, attr, None)
    mod = mod.base if isinstance(mod, LoRAEmbedding | LoRALinear) else mod
    w = getattr(mod, "weight", None)
    return w if isinstance(w, torch.Tensor) and w.ndim == 2 else None


def load_trainable_tokens(model: nn.Module, config: dict, tensors: dict,
                          wfile: Path) -> dict[str, tuple[list[int], torch.Tensor]]:
    """``{attr: (indices, rows)}`` of the adapter's trainable tokens (their tensors popped from
    tensors), checked against the model; apply them with ``apply_trainable_tokens``."""
    spec = config.get("trainable_token_indices")
    if not spec:
        return {}
    spec = {"embed_tokens": spec} if isinstance(spec, list) else spec
    index_lists = isinstance(spec, dict) and all(
        isinstance(v, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in v)
        for v in spec.values())
    if not index_lists:
        raise EmberError(f"{wfile}: trainable_token_indices={config['trainable_token_indices']!r}"
                         " must be a list of token ids or an object of module name -> token ids")
    tied = tied_lm(model)
    out = {}
    for name, idx in spec.items():
        attr = _attr(str(name))
        if attr is None:
            raise EmberError(f"{wfile}: trainable_token_indices on {name!r}: Ember holds them on "
                             f"embed_tokens and lm_head only; {_HINT}")
        if attr == "lm_head" and tied:
            if any(_attr(str(n)) == "embed" for n in spec):
                raise EmberError(f"{wfile}: trainable_token_indices on both embed_tokens and "
                                 f"lm_head of a model with tied embeddings; {_HINT}")
            # PEFT changes the head's rows but not the embedding's: two matrices from now on
            from ember.models.peft_files import untie_head

            untie_head(model)
            tied = False
        delta = _pop_delta(tensors, attr)
        w = _matrix(model, attr)
        if delta is None:
            raise EmberError(f"{wfile}: trainable_token_indices lists {name!r} but "
                             f"{_delta_key(model, attr)} is missing")
        if w is None:
            raise EmberError(f"{wfile}: trainable_token_indices on {name!r} needs a dense {attr} "
                             "(this one is quantized or absent); load the base without "
                             "quantizing it")
        if tuple(delta.shape) != (len(idx), w.shape[1]) or not all(
                0 <= i < w.shape[0] for i in idx):
            raise EmberError(f"{wfile}: the trainable tokens' rows {tuple(delta.shape)} for "
                             f"token ids {idx[:5]}... do not fit the model's {attr} "
                             f"{tuple(w.shape)}; is it an adapter for a different model?")
        out[attr] = (list(idx), delta)
    if tied and "embed" in out:  # PEFT's tied head shares the embedding's rows
        head = _pop_delta(tensors, "lm_head")
        if head is not None and not torch.equal(head, out["embed"][1]):
            raise EmberError(f"{wfile}: the tied head's trainable tokens differ from the "
                             f"embedding's; {_HINT}")
    return out


def apply_trainable_tokens(model: nn.Module, tokens: dict) -> None:
    """Write the rows into the matrices; ``save_adapter`` writes them back as PEFT's."""
    if not tokens:
        return
    with torch.no_grad():
        for attr, (idx, delta) in tokens.items():
            w = _matrix(model, attr)
            w[torch.tensor(idx, device=w.device)] = delta.to(w.device, w.dtype)
    model.peft_trainable_tokens = {attr: idx for attr, (idx, _) in tokens.items()}


def train_trainable_tokens(model: nn.Module) -> None:
    """Train the loaded rows as PEFT's ``is_trainable`` does (its ``trainable_tokens_delta``):
    the matrix takes gradients on those rows only, and ``make_optimizer`` decays those rows only
    (``ember_trained_rows``); the other rows stay the base's."""
    for attr, idx in (getattr(model, "peft_trainable_tokens", None) or {}).items():
        w = _matrix(model, attr)
        if getattr(w, "ember_trained_rows", None) is not None:
            continue  # a tied head: the embedding's matrix, already set
        # In the adapter's order: PEFT's delta rows, as adamw_8bit steps them (its blocks)
        rows = torch.tensor(list(dict.fromkeys(idx)), device=w.device)
        keep = torch.zeros(w.shape[0], 1, dtype=torch.bool, device=w.device)
        keep[rows] = True
        w.requires_grad_(True)
        w.ember_trained_rows = rows
        w.register_hook(lambda g, keep=keep: g * keep.to(g.device))


def trainable_tokens_tensors(model: nn.Module) -> tuple[object, dict[str, torch.Tensor]]:
    """(``trainable_token_indices`` for adapter_config.json, the delta tensors) of a model that
    loaded them (None, {} otherwise)."""
    tokens = getattr(model, "peft_trainable_tokens", None)
    if not tokens:
        return None, {}
    tensors = {_delta_key(model, a): _matrix(model, a).detach()[torch.tensor(idx)].cpu()
               .contiguous() for a, idx in tokens.items()}
    indices = (tokens["embed"] if list(tokens) == ["embed"]
               else {"embed_tokens" if a == "embed" else a: idx for a, idx in tokens.items()})
    return indices, tensors
