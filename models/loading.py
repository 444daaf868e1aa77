"""Load and save models: Hugging Face folders (safetensors), ``.gguf`` files and built-in names.

Loading is lazy: the model is built on the meta device and each tensor is read from its safetensors
file (``safe_open``, memory-mapped), cast, moved and assigned one at a time, so peak host memory
stays about one copy of the model. ``iter_checkpoint`` exposes that stream of
``(ember_key, tensor)`` pairs (raw, as stored) for consumers that transform weights while loading
(NF4 quantization).

Pickle checkpoints (``pytorch_model.bin``, ``*.pt``) are refused, never unpickled.

QLoRA: ``load_pretrained(..., quantize="nf4")`` quantizes the linear layers while loading; a
bitsandbytes NF4 checkpoint (``quantization_config`` in config.json, as transformers saves with
``BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")``) loads as it is, streamed by
``iter_bnb_checkpoint`` into ``ember.models.nf4.load_bnb_quantized_``. ``save_pretrained`` writes
a model with NF4 layers back in that format, or dequantized (``dequantize=True``) as a plain model.

Multimodal Gemma 3 (``Gemma3ForConditionalGeneration``): its language model loads, the vision
tower and projector are left out (with a warning); ``save_pretrained(..., multimodal_base=folder)``
writes the whole multimodal folder back, the vision weights copied from ``folder`` unchanged.

generation_config.json: the source folder's (sampling defaults, stop ids) is kept by an export.

dtype policy: ``load_pretrained(dtype=None)`` keeps the dtype the weights are stored in (a bf16
checkpoint gives a bf16 model, on CPU too), ``dtype="auto"`` takes config.json's ``dtype`` as
transformers' ``from_pretrained(dtype="auto")`` (its default in 5.x) does;
``save_pretrained(dtype=None)`` writes the model's current dtype, like transformers; a loaded
model's ``cfg.torch_dtype`` is that "auto" dtype, in which a full fine-tune or a merged adapter is
exported (as transformers loads, trains and saves the model). RoPE
frequencies are always computed in fp32.

This module is the orchestration (dtype policy, building the model, atomic folders);
``ember.models.safetensors_io`` reads and writes the files (config.json, safetensors headers,
shards and index), ``ember.models.bnb_checkpoint`` the bitsandbytes 4-bit format and
``ember.models.gguf_cache`` the cache of ``.gguf`` imports (``gguf_folder``). Their public names
are importable from here too.

``save_pretrained`` / ``save_state_dict`` live in ``ember.models.saving`` and ``resolve_dtype`` in
``ember.models.dtype_names``; both are re-exported here, the place to import them from.
"""

from __future__ import annotations

import importlib
import os
import warnings
from collections.abc import Collection, Iterator
from pathlib import Path

import torch
import torch.nn as nn

from ember import EmberError
from ember.models.bnb_checkpoint import (
    _load_bnb_,
    iter_bnb_checkpoint,
)
from ember.models.bnb_int8 import int8_view, is_int8_config
from ember.models.config import ModelConfig
from ember.models.dtype_names import _dtype_name, resolve_dtype
from ember.models.gguf_cache import gguf_folder
from ember.models.hf import fused_groups
from ember.models.hf_config import (
    ARCHITECTURES,
    DTYPES,
    base_architecture,
    quantization_config_from_hf,
)
from ember.models.safetensors_io import (
    INDEX_FILE,
    SINGLE_FILE,
    CheckpointIndex,
    _parse_config,
    _read_config_json,
    iter_checkpoint,
    language_model_view,
    read_config,
    read_generation_config,
    scan_checkpoint,
    untie_if_head_differs,
)
from ember.models.safetensors_io import generation_config_to_write as generation_config_to_write
from ember.models.safetensors_io import open_weights as open_weights
from ember.models.saving import save_pretrained, save_state_dict
from ember.models.shard_writer import parse_size
from ember.models.transformer import Transformer

__all__ = [
    "INDEX_FILE",
    "SINGLE_FILE",
    "CheckpointIndex",
    "gguf_folder",
    "iter_bnb_checkpoint",
    "iter_checkpoint",
    "load_hf_folder",
    "load_pretrained",
    "parse_size",
    "read_config",
    "resolve_dtype",
    "save_pretrained",
    "save_state_dict",
    "scan_checkpoint",
]


def _assign_(model: nn.Module, tensors, device, dtype: torch.dtype) -> None:
    """Replace the meta parameters of model by the given tensors (cast and moved one at a time)."""
    for key, t in tensors:
        owner, _, name = key.rpartition(".")
        module = model.get_submodule(owner)
        new = t.to(device=device, dtype=dtype)
        setattr(
            module, name, nn.Parameter(new, requires_grad=module._parameters[name].requires_grad)
        )
    # The RoPE table is a non-persistent buffer: not in checkpoints, rebuilt in fp32 for the config.
    model.reset_rope_(device)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise EmberError(f"internal error: no weights were loaded for {left[:5]}")


def load_hf_folder(
    folder: str | os.PathLike,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device = "cpu",
    *,
    quantize: str | None = None,
    double_quant: bool = True,
) -> Transformer:
    """A ``Transformer`` with the weights of an HF model folder (config.json + safetensors);
    ``device="meta"``: the same model without reading any weight (a quantized one with its
    dense ``nn.Linear`` layers: where NF4 goes is known once the weights are read).
    ``quantize="nf4"`` quantizes the linear layers while loading, their block scales
    double-quantized unless ``double_quant=False`` (bitsandbytes' ``bnb_4bit_use_double_quant``).

    A bitsandbytes NF4 checkpoint (``quantization_config`` in config.json) loads with its 4-bit
    weights as they are (``Linear4bit``), whatever ``quantize`` / ``double_quant`` say; an
    8-bit (LLM.int8) one is dequantized to the dense model (``ember.models.bnb_int8``)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise EmberError(f"model folder {folder} does not exist")
    if quantize not in (None, "nf4"):
        raise EmberError(f"quantize must be None or 'nf4', got {quantize!r}")
    raw, cfg, qc, ckpt, dequant = _open_folder(folder)
    prequantized = qc is not None and not is_int8_config(qc)
    auto, target = _dtypes(raw, ckpt, dtype)
    # the dtype transformers 5 loads (its default dtype="auto"), trains and saves this model in,
    # which a full fine-tune's or merged export is written in: config.json's, else the stored one
    cfg = cfg.replace(torch_dtype=_dtype_name(auto))
    with torch.device("meta"):
        model = Transformer(cfg)
    # the source's generation_config.json (sampling defaults, stop ids), which an export keeps
    model.hf_generation_config = read_generation_config(folder)
    # named in the errors about its values (generation_config._file_knob)
    model.hf_generation_config_path = str(Path(folder) / "generation_config.json")
    device = torch.device(device)
    if device.type == "meta":  # the structure alone (FSDP: ranks > 0 get their shards later)
        # With quantize / a 4-bit checkpoint: the dense structure; under FSDP rank 0's NF4
        # layers replace their linears (engine.distributed.store_nf4_flat).
        return model.to(target)
    if prequantized:
        _load_bnb_(model, folder, ckpt, device, target)
        # Ember computes in the model's dtype; the checkpoint's own compute dtype is kept for
        # save_pretrained, so that transformers computes the saved model as it did the original.
        model.bnb_compute_dtype = DTYPES.get(qc.get("bnb_4bit_compute_dtype"))
    elif quantize == "nf4":
        _load_nf4_(model, iter_checkpoint(folder, cfg, ckpt, dequant), device, target,
                   double_quant)
    else:
        _assign_(model, iter_checkpoint(folder, cfg, ckpt, dequant), device, target)
    return model


def _open_folder(folder: Path, *, dense: bool = False):
    """``(config.json, ModelConfig, quantization config, CheckpointIndex, dequant)`` of an HF
    model folder, the checkpoint index as Ember reads it (an 8-bit one's dequantized by
    ``dequant``, a multimodal one's language model; the config untied when the stored head
    differs from the embedding). ``dense``: EmberError for a bitsandbytes 4-bit checkpoint."""
    path, raw = _read_config_json(folder)
    cfg = _parse_config(path, raw)
    qc = quantization_config_from_hf(raw)
    int8 = is_int8_config(qc)  # LLM.int8: read as the dense model (ember.models.bnb_int8)
    prequantized = qc is not None and not int8
    if dense and prequantized:
        raise EmberError(f"{folder} is a bitsandbytes 4-bit checkpoint: it holds no "
                         "full-precision weights to decompose; point model.name at the "
                         "unquantized model (with model.quantize = \"nf4\")")
    ckpt = scan_checkpoint(folder, quantized=prequantized, int8=int8)
    _check_base_model(path, raw, cfg, ckpt)
    dequant = None
    if int8:
        ckpt, dequant = int8_view(ckpt)
    if cfg.extra.get("multimodal"):
        ckpt = language_model_view(ckpt)
    return raw, untie_if_head_differs(ckpt, cfg), qc, ckpt, dequant


def iter_dense_weights(path: str | os.PathLike, keys: Collection[str] | None = None
                       ) -> Iterator[tuple[str, torch.Tensor]]:
    """``(ember_key, tensor)`` for every weight of the model at ``path`` (a folder, a ``.gguf``
    file or a built-in name), one at a time, as stored (an 8-bit checkpoint's dequantized):
    what a quantize-while-loading model was quantized from, for an init that must see the
    full-precision weights (QPiSSA: ``apply_lora(..., dense_weights=...)``). ``keys``: only
    those weights (the rest of the checkpoint is not read). EmberError, at the call, for a
    bitsandbytes 4-bit checkpoint, which has no full-precision weights."""
    folder = _resolve_path(path)
    _, cfg, _, ckpt, dequant = _open_folder(folder, dense=True)
    return iter_checkpoint(folder, cfg, ckpt, dequant, keys)


def load_dtype(path: str | os.PathLike, dtype: str | torch.dtype | None = None) -> torch.dtype:
    """The dtype ``load_pretrained(path, dtype)`` gives the weights of the model at ``path``
    (the dtype its NF4 layers are quantized from), without reading them."""
    raw, _, _, ckpt, _ = _open_folder(_resolve_path(path))
    return _dtypes(raw, ckpt, dtype)[1]


def _dtypes(raw: dict, ckpt, dtype) -> tuple[torch.dtype, torch.dtype]:
    """(transformers' ``dtype="auto"``, the dtype the weights are loaded in for ``dtype``)."""
    stored = ckpt.stored_dtype()
    auto = _config_dtype(raw, stored)
    return auto, auto if dtype == "auto" else resolve_dtype(dtype) or stored


def _config_dtype(raw: dict, stored: torch.dtype) -> torch.dtype:
    """transformers' ``dtype="auto"``: config.json's ``dtype`` (``torch_dtype``), else the
    dtype the weights are stored in."""
    text = raw.get("text_config") if isinstance(raw.get("text_config"), dict) else {}
    for section in (raw, text):
        name = section.get("dtype") or section.get("torch_dtype")
        if name in DTYPES:
            return DTYPES[name]
    return stored


def _check_base_model(path: Path, raw: dict, cfg: ModelConfig, ckpt: CheckpointIndex) -> None:
    """architectures naming the headless base class (``["LlamaModel"]``) is read for a bare base
    model's weights (``safetensors_io._base_model_view``) only: beside a causal LM's weights the
    config.json does not describe the folder."""
    archs = raw.get("architectures")
    if archs == [base_architecture(cfg.model_type)] and not ckpt.base_model and not cfg.extra.get(
            "multimodal"):
        raise EmberError(
            f"{path}: architectures {archs!r} is not supported with these weights: it names the "
            f"headless base model, but the checkpoint holds a causal LM's model.* keys; set "
            f"architectures to [{ARCHITECTURES[cfg.model_type]!r}]"
        )


def _load_nf4_(model: Transformer, tensors, device: torch.device, dtype: torch.dtype,
               double_quant: bool = True) -> None:
    """Quantize-while-loading: ember.models.nf4 owns which weights become NF4 and how (looked up
    in sys.modules at call time, so a test can stand in for it)."""
    nf4 = importlib.import_module("ember.models.nf4")
    nf4.load_quantized_(model, tensors, device=device, compute_dtype=dtype,
                        double_quant=double_quant, fused=fused_groups(model.cfg))
    model.reset_rope_(device)


def _resolve_path(path: str | os.PathLike) -> Path:
    p = Path(path)
    if p.is_dir():
        return p
    # .gguf files (imported once, under a lock, through gguf_folder) and built-in names.
    from ember.models.hub import resolve_model

    return resolve_model(path)


def load_pretrained(
    path: str | os.PathLike,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device = "cpu",
    *,
    quantize: str | None = None,
    double_quant: bool = True,
):
    """``(model, tokenizer)`` from an HF folder, a ``.gguf`` file or a built-in model name.

    ``dtype=None`` keeps the stored dtype, ``"auto"`` takes config.json's (as transformers).
    ``tokenizer`` is None (with a warning) when the folder
    has neither tokenizer.json nor a slow tokenizer's files (tokenizer.model, vocab.json +
    merges.txt: ``ember.models.slow_tokenizer``), or slow files Ember cannot read.
    ``quantize="nf4"`` stores the linear weights in NF4 while loading (``double_quant``: see
    ``load_hf_folder``). The model is in eval mode, as transformers' ``from_pretrained`` returns
    it (Phi-2's residual dropout acts only after ``.train()``).

    A folder with a PEFT adapter (adapter_config.json) loads as transformers' ``from_pretrained``
    loads it (with or without a config.json beside it): its base (``base_model_name_or_path``)
    with the adapter applied (``load_adapter`` / ``load_prompt_adapter``), the adapter folder's
    tokenizer if it has one."""
    folder = _resolve_path(path)
    if (folder / "adapter_config.json").is_file():
        return _load_adapter_folder(folder, dtype, device, quantize, double_quant)
    return _load_model_folder(folder, dtype, device, quantize, double_quant)


def _load_model_folder(folder: Path, dtype, device, quantize, double_quant):
    model = load_hf_folder(folder, dtype, device, quantize=quantize, double_quant=double_quant)
    model.eval()
    from ember.models.slow_tokenizer import has_slow_tokenizer
    from ember.models.tokenizer import load_tokenizer

    if (folder / "tokenizer.json").is_file():
        tokenizer = load_tokenizer(folder)
    elif has_slow_tokenizer(folder):
        try:
            tokenizer = load_tokenizer(folder)
        except EmberError as e:  # the weights stay usable with token ids, as without tokenizer
            warnings.warn(f"{e}: returning tokenizer=None (token ids in and out only)",
                          stacklevel=3)
            tokenizer = None
    else:
        warnings.warn(
            f"{folder} has no tokenizer.json (nor tokenizer.model or vocab.json + merges.txt): "
            "returning tokenizer=None (token ids in and out only)",
            stacklevel=3,
        )
        tokenizer = None
    return model, tokenizer


def _load_adapter_folder(folder: Path, dtype, device, quantize, double_quant):
    from ember.models.lora import load_adapter
    from ember.models.peft_files import _read_adapter_config
    from ember.models.prompt_tuning import is_prompt_adapter, load_prompt_adapter
    from ember.models.tokenizer import load_tokenizer

    base = _read_adapter_config(folder).get("base_model_name_or_path")
    if not isinstance(base, str) or not base:
        raise EmberError(f"{folder} is a PEFT adapter without base_model_name_or_path in its "
                         "adapter_config.json; load its base model, then apply the adapter "
                         "with ember.models.load_adapter")
    try:  # the base's own files only (transformers does not look for an adapter there again)
        model, tokenizer = _load_model_folder(_resolve_path(base), dtype, device, quantize,
                                              double_quant)
    except EmberError as e:
        raise EmberError(f"{folder} is a PEFT adapter for the base model {base!r}, which did not "
                         f"load ({e}); load the base yourself and apply the adapter with "
                         "ember.models.load_adapter") from None
    (load_prompt_adapter if is_prompt_adapter(folder) else load_adapter)(model, folder)
    if (folder / "tokenizer.json").is_file():
        tokenizer = load_tokenizer(folder)
    return model.eval(), tokenizer


