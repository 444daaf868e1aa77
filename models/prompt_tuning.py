"""Prompt tuning (Lester et al. 2021; PEFT's ``PROMPT_TUNING``): the whole model is frozen and
``num_virtual_tokens`` trainable input embeddings are put in front of every sequence.

Design. ``apply_prompt_tuning`` wraps ``model.embed`` in a ``PromptEmbedding`` (as LoRA wraps
projections in place): token ids ``V .. V+P-1`` (V the vocabulary size) select the P trainable
rows, every other id the frozen vocabulary. The decoder is unchanged: virtual tokens are just
ids in the input, and the embedding scale of Gemma-style models applies to them as it does in
PEFT (which scales the concatenated ``inputs_embeds``).

Where sequences are built, the virtual ids are inserted in front of each one:
- packed batches (training, validation): ``prompt_packed`` puts P virtual ids before every
  document (their positions 0..P-1, the document's shifted by P, ``cu_seqlens`` widened) and
  returns the indices of the real tokens, so the losses keep reading the original labels;
- generation: ``generate_ids`` puts them in the first P columns of the left-padded batch.
PEFT does the same: ``cat(prompt, inputs_embeds)`` with positions counted from the first
virtual token.

Saved as PEFT does: ``adapter_config.json`` (peft_type ``PROMPT_TUNING``) and
``adapter_model.safetensors`` holding ``prompt_embeddings`` (P, D).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from ember import EmberError
from ember.models.lora import _read_adapter, _write_adapter

# Ember's init names and PEFT's ``prompt_tuning_init`` values.
_PEFT_INIT = {"vocab": "SAMPLE_VOCAB", "random": "RANDOM", "text": "TEXT"}


@dataclass(frozen=True, kw_only=True)
class PromptTuningConfig:
    num_virtual_tokens: int = 20
    # "vocab": embeddings of random vocabulary tokens (PEFT's SAMPLE_VOCAB); "text": the
    # embeddings of ``init_text``'s tokens, repeated to fill; "random": normal, the vocabulary's
    # std.
    init: str = "vocab"
    init_text: str | None = None

    def __post_init__(self) -> None:
        if self.init not in _PEFT_INIT:
            raise EmberError(f"prompt_tuning.init must be one of {', '.join(map(repr, _PEFT_INIT))}"
                             f", got {self.init!r}")
        n = self.num_virtual_tokens
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise EmberError("prompt_tuning.num_virtual_tokens must be a whole number >= 1 (the "
                             f"virtual tokens put in front of every sequence), got {n!r}")
        if (self.init == "text") != bool(self.init_text):
            raise EmberError("prompt_tuning.init_text is the text of init = \"text\": give both or "
                             "neither")


class PromptEmbedding(nn.Module):
    """The token embedding plus P trainable rows, selected by ids ``V .. V+P-1``."""

    def __init__(self, base: nn.Embedding, prompt: torch.Tensor):
        super().__init__()
        self.base = base
        self.prompt = nn.Parameter(prompt)  # (P, D)

    @property
    def weight(self) -> torch.Tensor:
        """The vocabulary's (V, D) embeddings (a tied output head reads them)."""
        return self.base.weight

    @property
    def num_virtual_tokens(self) -> int:
        return self.prompt.shape[0]

    @property
    def first_virtual_id(self) -> int:
        return self.base.num_embeddings

    def virtual_mask(self, ids: torch.Tensor) -> torch.Tensor:
        """True where ``ids`` select a virtual token. The model's embedding scale (Gemma's
        sqrt(hidden)) skips those rows: PEFT inserts the prompt after the (scaled) embedding
        module, so the stored prompt is what the first layer sees."""
        return ids >= self.base.num_embeddings

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        V, P = self.base.num_embeddings, self.prompt.shape[0]
        virtual = self.virtual_mask(ids)
        x = self.base(ids.masked_fill(virtual, 0))  # (B, T, D)
        p = self.prompt[(ids - V).clamp(0, P - 1)]  # (B, T, D)
        return torch.where(virtual[..., None], p.to(x.dtype), x)

    def extra_repr(self) -> str:
        return f"num_virtual_tokens={self.num_virtual_tokens}"


def prompt_embedding(model: nn.Module) -> PromptEmbedding | None:
    embed = getattr(model, "embed", None)
    return embed if isinstance(embed, PromptEmbedding) else None


def num_virtual_tokens(model: nn.Module) -> int:
    """P of a prompt-tuned model, 0 for any other."""
    pe = prompt_embedding(model)
    return 0 if pe is None else pe.num_virtual_tokens


def virtual_ids(model: nn.Module) -> list[int]:
    """The ids that select the virtual tokens, in order (empty without prompt tuning)."""
    pe = prompt_embedding(model)
    return [] if pe is None else list(range(pe.first_virtual_id,
                                            pe.first_virtual_id + pe.num_virtual_tokens))


def apply_prompt_tuning(model: nn.Module, num_virtual_tokens: int, init: str = "vocab",
                        init_text: str | None = None, tokenizer=None) -> nn.Module:
    """Freeze ``model`` and add P trainable virtual-token embeddings (fp32) in front of every
    sequence; returns the model. ``init="text"`` needs ``init_text`` and ``tokenizer``."""
    cfg = PromptTuningConfig(num_virtual_tokens=num_virtual_tokens, init=init,
                             init_text=init_text)
    if prompt_embedding(model) is not None:
        raise EmberError("the model already has prompt tuning")
    if getattr(model, "score", None) is not None:
        # PEFT's SEQ_CLS prompt tuning pools the last position of the prompted inputs_embeds
        # (pads included) and saves the head beside the prompt; Ember's classify does neither
        raise EmberError("prompt tuning on a classifier (a model with a classification head) is "
                         "not supported; use LoRA for classification")
    mcfg = getattr(model, "cfg", None)
    if getattr(mcfg, "model_type", None) == "granite" and mcfg.embedding_scale is not None:
        # transformers' Granite scales every inputs_embeds row (PEFT's prompt too), Gemma only
        # the embedding module's output, which is what Ember's virtual rows follow
        raise EmberError("prompt tuning on Granite with an embedding_multiplier is not "
                         "supported (transformers scales PEFT's virtual tokens too); use LoRA")
    for p in model.parameters():
        p.requires_grad_(False)
    base: nn.Embedding = model.embed
    P, (V, D) = cfg.num_virtual_tokens, base.weight.shape
    w = base.weight.detach()
    # Inits in the units the first layer sees (PEFT reads the embedding module's output, which
    # carries Gemma's sqrt(hidden) scale; the model does not scale the prompt rows again).
    scale = getattr(getattr(model, "cfg", None), "embedding_scale", None) or 1.0
    with torch.no_grad():
        if cfg.init == "random":
            std = w.float().std() if not w.is_meta else torch.tensor(1.0)
            prompt = torch.randn(P, D, device=w.device) * std.to(w.device)
        else:
            if cfg.init == "vocab":
                ids = torch.randint(0, V, (P,))
            else:
                if tokenizer is None:
                    raise EmberError("prompt_tuning.init = \"text\" needs the model's tokenizer")
                text_ids = list(tokenizer.encode(cfg.init_text, add_special_tokens=True))
                if not text_ids:
                    raise EmberError("prompt_tuning.init_text encodes to no tokens")
                ids = torch.tensor((text_ids * math.ceil(P / len(text_ids)))[:P])
            prompt = w[ids.to(w.device)].float().clone()
    model.embed = PromptEmbedding(base, prompt.float() * scale)
    model.prompt_tuning_init = cfg.init
    return model


def prompt_packed(model: nn.Module, input_ids: torch.Tensor, position_ids: torch.Tensor,
                  cu_seqlens: torch.Tensor, max_seqlen: int):
    """A packed (1, T) batch with the model's virtual tokens before every document:
    (ids, positions, cu_seqlens, max_seqlen, real), ``real`` (T,) the new index of each original
    token. Without prompt tuning the inputs come back unchanged and ``real`` is None."""
    pe = prompt_embedding(model)
    if pe is None:
        return input_ids, position_ids, cu_seqlens, max_seqlen, None
    P, dev = pe.num_virtual_tokens, input_ids.device
    T, n = input_ids.shape[1], cu_seqlens.numel() - 1
    cu = cu_seqlens.to(dev, torch.long)
    doc = torch.bucketize(torch.arange(T, device=dev), cu[1:], right=True)  # (T,)
    real = torch.arange(T, device=dev) + P * (doc + 1)
    starts = cu[:-1] + P * torch.arange(n, device=dev)  # where each document's prompt begins
    virt = (starts[:, None] + torch.arange(P, device=dev)[None]).reshape(-1)  # (n * P,)
    ids = input_ids.new_empty(1, T + n * P)
    pos = position_ids.new_empty(1, T + n * P)
    ids[0, real], pos[0, real] = input_ids[0], position_ids[0] + P
    ids[0, virt] = torch.arange(P, device=dev).repeat(n) + pe.first_virtual_id
    pos[0, virt] = torch.arange(P, device=dev, dtype=pos.dtype).repeat(n)
    new_cu = (cu + P * torch.arange(n + 1, device=dev)).to(cu_seqlens.dtype)
    return ids, pos, new_cu, max_seqlen + P, real


# --- PEFT format ---------------------------------------------------------------------------------

def is_prompt_adapter(adapter_dir: str | os.PathLike) -> bool:
    """True when ``adapter_dir`` holds a PEFT PROMPT_TUNING adapter."""
    path = Path(adapter_dir) / "adapter_config.json"
    try:
        return json.loads(path.read_text()).get("peft_type") == "PROMPT_TUNING"
    except (OSError, ValueError, AttributeError):
        return False


def save_prompt_adapter(model: nn.Module, out_dir: str | os.PathLike,
                        base_model_name_or_path: str | None = None) -> Path:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` as PEFT 0.21 does."""
    pe = prompt_embedding(model)
    if pe is None:
        raise EmberError("the model has no prompt tuning to save (apply_prompt_tuning first)")
    if getattr(model, "score", None) is not None:
        raise EmberError("save_prompt_adapter: the model is a classifier, whose head a causal-LM "
                         "prompt-tuning adapter cannot hold; use LoRA for classification")
    cfg = model.cfg
    # PEFT refuses a TEXT config without prompt_tuning_init_text and tokenizer_name_or_path, and
    # from_pretrained(is_trainable=True) re-runs that init with the tokenizer; the saved prompt
    # replaces whatever the init made, so a text-initialised prompt is saved as RANDOM.
    init = _PEFT_INIT[getattr(model, "prompt_tuning_init", "vocab")].replace("TEXT", "RANDOM")
    config = {
        "auto_mapping": None, "base_model_name_or_path": base_model_name_or_path,
        "inference_mode": True, "modules_to_save": None,
        "num_attention_heads": cfg.num_heads, "num_layers": cfg.num_layers,
        "num_transformer_submodules": 1, "num_virtual_tokens": pe.num_virtual_tokens,
        "peft_type": "PROMPT_TUNING", "prompt_tuning_init": init,
        "prompt_tuning_init_text": None, "revision": None, "task_type": "CAUSAL_LM",
        "token_dim": cfg.hidden_size, "tokenizer_kwargs": None, "tokenizer_name_or_path": None,
    }
    tensors = {"prompt_embeddings": pe.prompt.detach().float().to("cpu").contiguous()}
    return _write_adapter(out_dir, config, tensors)


def load_prompt_adapter(model: nn.Module, adapter_dir: str | os.PathLike) -> nn.Module:
    """Prompt-tune ``model`` with the virtual tokens of a PEFT PROMPT_TUNING adapter."""
    where = Path(adapter_dir)
    config, tensors = _read_adapter(where)
    if config.get("peft_type") != "PROMPT_TUNING":
        raise EmberError(f"{where}: peft_type is {config.get('peft_type')!r}, not PROMPT_TUNING")
    # PEFT fills a null num_transformer_submodules in: 2 for SEQ_2_SEQ_LM, else 1
    subs = config.get("num_transformer_submodules")
    if subs is None:
        subs = 2 if config.get("task_type") == "SEQ_2_SEQ_LM" else 1
    if subs != 1:
        raise EmberError(f"{where}: num_transformer_submodules is {subs} (task_type "
                         f"{config.get('task_type')!r}: an encoder-decoder prompt); Ember's "
                         "prompt tuning is for decoder-only models, with 1")
    other = sorted(k for k in tensors if k != "prompt_embeddings")
    if other:  # PEFT's modules_to_save (a SEQ_CLS head, a trained lm_head...): whole modules
        raise EmberError(f"{where}: the adapter also replaces whole modules ({other[:3]}, "
                         f"modules_to_save={config.get('modules_to_save')}, task_type="
                         f"{config.get('task_type')!r}); Ember's prompt tuning holds the virtual "
                         "tokens only (no classifier head or trained modules)")
    prompt = tensors.get("prompt_embeddings")
    n = config.get("num_virtual_tokens")
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise EmberError(f"{where}: num_virtual_tokens in adapter_config.json must be a whole "
                         f"number >= 1, got {n!r}")
    if prompt is not None and n is not None and prompt.shape[0] != n:
        raise EmberError(f"{where}: prompt_embeddings has {prompt.shape[0]} rows but "
                         f"num_virtual_tokens is {n}")
    D, dim = model.embed.weight.shape[1], config.get("token_dim")
    if prompt is not None and prompt.ndim == 2 and dim is not None and dim != prompt.shape[1]:
        raise EmberError(f"{where}: prompt_embeddings has {prompt.shape[1]} columns but token_dim "
                         f"in adapter_config.json is {dim!r} (PEFT cannot load it either); fix "
                         "the config or use the adapter's own files together")
    if prompt is None or prompt.ndim != 2 or prompt.shape[1] != D:
        got = None if prompt is None else tuple(prompt.shape)
        raise EmberError(f"{where}: prompt_embeddings must be (num_virtual_tokens, {D}) for this "
                         f"model, got {got}")
    init = {v: k for k, v in _PEFT_INIT.items()}.get(config.get("prompt_tuning_init"), "random")
    apply_prompt_tuning(model, prompt.shape[0], "random")
    model.prompt_tuning_init = init
    pe = prompt_embedding(model)
    with torch.no_grad():
        pe.prompt.copy_(prompt.to(pe.prompt.device, torch.float32))
    return model
