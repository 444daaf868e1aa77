"""Save models: ``save_pretrained`` / ``save_state_dict`` write a Hugging Face folder (config.json,
sharded safetensors, generation_config.json, the tokenizer) atomically, NF4 layers in
bitsandbytes' 4-bit format, a multimodal Gemma 3's language model into its whole base folder.
The policies (dtype, multimodal, bitsandbytes) are told in ``ember.models.loading``'s docstring;
that module re-exports both functions and is where to import them from.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from pathlib import Path

import torch

from ember import EmberError
from ember.models.bnb_checkpoint import _bnb_config, _with_nf4_weights
from ember.models.config import ModelConfig
from ember.models.dtype_names import resolve_dtype
from ember.models.hf import (
    expected_shapes,
    multimodal_key,
    split_multimodal_keys,
    to_hf_state_dict,
)
from ember.models.hf_config_export import config_to_hf
from ember.models.hf_moe import DENSE_UNDER_BNB
from ember.models.nf4 import is_quant_state_key, split_bnb_key
from ember.models.safetensors_io import (
    _parse_config,
    _read_config_json,
    _write_json,
    generation_config_to_write,
    open_weights,
    scan_checkpoint,
)
from ember.models.save_folder import write_folder_into
from ember.models.shard_writer import _write_shards, parse_size
from ember.models.transformer import Transformer

# --------------------------------------------------------------------------------------------------
# Saving


# Files of a multimodal base that a merged export copies as they are (the image processor's too,
# so that AutoProcessor loads the folder).
_MULTIMODAL_COPIED = ("generation_config.json", "preprocessor_config.json",
                      "processor_config.json", "chat_template.json")


def _with_multimodal_base(hf: dict, dtypes: dict, cfg: ModelConfig, base: Path,
                          saved_dtype: torch.dtype) -> tuple[dict, dict]:
    """hf (the language model's HF state dict) renamed into the multimodal base checkpoint's key
    layout, plus the base's vision tower and projector tensors as stored (dtypes updated in
    place); returns the config.json to write: the base's, untied if the model is, with its
    dtype fields set to the language model's ``saved_dtype`` when that differs (transformers
    loads every weight in the config's dtype: a bf16 base's config on fp32 weights would
    silently round them)."""
    path, raw = _read_config_json(base)
    base_cfg = _parse_config(path, raw)
    if not base_cfg.extra.get("multimodal"):
        raise EmberError(f"save_pretrained: multimodal_base {base} is not a multimodal checkpoint "
                         f"(model_type {raw.get('model_type')!r})")
    if raw.get("quantization_config") is not None:
        raise EmberError(f"save_pretrained: multimodal_base {base} is a bitsandbytes checkpoint, "
                         "whose quantized vision tower cannot be copied into an unquantized "
                         "folder; pass the unquantized Gemma 3 folder as the base, or save the "
                         "language model alone (multimodal_base=None)")
    tied = cfg.tie_word_embeddings
    if expected_shapes(base_cfg.replace(tie_word_embeddings=tied)) != expected_shapes(cfg):
        raise EmberError(f"save_pretrained: the model is not the language model of {base} "
                         "(its layers or sizes differ); pass the folder it was loaded from")
    ckpt = scan_checkpoint(base)
    text, vision = split_multimodal_keys(ckpt.key_file, str(base))
    out = {multimodal_key(k, text): v for k, v in hf.items()}
    dtypes.update({multimodal_key(k, text): dtypes.pop(k) for k in list(hf)})
    for f in ckpt.files:  # copied bit for bit: read as stored, written in the stored dtype
        keys = [k for k in vision if ckpt.key_file[k] == f]
        with open_weights(f) as st:
            out.update({k: st.get_tensor(k) for k in keys})
        dtypes.update({k: ckpt.dtypes[k] for k in keys})
    config = json.loads(json.dumps(raw))  # a deep copy: text_config is a nested dict
    if tied != raw.get("tie_word_embeddings", True):
        config["tie_word_embeddings"] = tied
    name = str(saved_dtype).removeprefix("torch.")
    for section in (config, config.get("text_config")):
        for key in ("dtype", "torch_dtype"):
            if isinstance(section, dict) and section.get(key) not in (None, name):
                section[key] = name
    return out, config


def _write_folder(
    sd: dict, cfg: ModelConfig, tmp: Path, tokenizer, dtype: torch.dtype | None, limit: int,
    multimodal_base: Path | None = None, compute_dtype: torch.dtype | None = None,
    generation_config: dict | None = None,
) -> None:
    if "embed.prompt" in sd:
        raise EmberError(
            "save_pretrained: the model has prompt tuning, whose virtual tokens are inputs, not "
            "weights to save in a model folder; save them with save_prompt_adapter (a PEFT "
            "adapter), or save the model before apply_prompt_tuning"
        )
    if any(".lora_" in k or ".base." in k for k in sd):
        raise EmberError(
            "save_pretrained: the model has LoRA adapters; merge them first "
            "(ember.models.lora.merge_lora) or save the adapter alone (save_adapter)"
        )
    hf = to_hf_state_dict(sd, cfg)
    quantized = {split_bnb_key(k)[0] for k in hf if is_quant_state_key(k)}
    # dtype casts the dense tensors; 4-bit data and its statistics are written bit for bit.
    dense = [k for k in hf if split_bnb_key(k)[0] not in quantized]
    dtypes = {k: v.dtype for k, v in hf.items()}
    dtypes.update({k: dtype or hf[k].dtype for k in dense})
    saved_dtype = Counter(dtypes[k] for k in dense).most_common(1)[0][0]
    if multimodal_base is not None:
        if quantized:
            raise EmberError("save_pretrained: a model with NF4 layers cannot be written into a "
                             "multimodal folder in bitsandbytes' format; save it with "
                             "dequantize=True")
        hf, config = _with_multimodal_base(hf, dtypes, cfg, Path(multimodal_base), saved_dtype)
    else:
        config = config_to_hf(cfg, saved_dtype)
    _write_shards(hf, dtypes, tmp, limit)
    if quantized:
        config["quantization_config"] = _bnb_config(hf, dense, cfg, compute_dtype or saved_dtype)
    _write_json(tmp / "config.json", config)
    if multimodal_base is not None and config == _read_config_json(multimodal_base)[1]:
        shutil.copyfile(Path(multimodal_base) / "config.json", tmp / "config.json")  # as it was
    _write_json(tmp / "generation_config.json",
                generation_config_to_write(cfg, tokenizer, generation_config))
    for name in _MULTIMODAL_COPIED if multimodal_base is not None else ():
        if (Path(multimodal_base) / name).is_file():
            shutil.copyfile(Path(multimodal_base) / name, tmp / name)
    if tokenizer is not None:
        if not hasattr(tokenizer, "save_pretrained"):
            raise EmberError(
                f"save_pretrained: tokenizer {type(tokenizer).__name__} has no "
                "save_pretrained(out_dir)"
            )
        tokenizer.save_pretrained(tmp)


def save_pretrained(
    model: Transformer,
    out_dir: str | os.PathLike,
    tokenizer=None,
    *,
    dtype: str | torch.dtype | None = None,
    max_shard_size: int | str = "5GB",
    dequantize: bool = False,
    multimodal_base: str | os.PathLike | None = None,
) -> Path:
    """Write an HF folder (config.json + safetensors, sharded above ``max_shard_size``) that
    ``transformers.AutoModelForCausalLM.from_pretrained(out_dir)`` loads unchanged.

    ``dtype`` (default: as they are) is the dtype of the written dense tensors. A model with NF4
    layers (``Linear4bit``: loaded with ``quantize="nf4"``, from a bitsandbytes checkpoint, or
    after ``quantize_model_``) is written in bitsandbytes' 4-bit format, which transformers loads
    with bitsandbytes installed (``quantization_config`` in config.json; the 4-bit data is never
    cast; MoE experts are written dequantized, as transformers 5 keeps them).
    ``dequantize=True`` writes a plain model instead: each NF4 weight dequantized, one at a
    time, to ``dtype`` (default: the dtype it was quantized from), e.g. the base for PEFT adapters
    trained with QLoRA. A model with LoRA adapters is refused: ``merge_lora`` it first, or save
    the adapter alone (``save_adapter``).

    A multimodal Gemma 3's language model (loaded from a ``Gemma3ForConditionalGeneration``
    folder: ``cfg.extra["multimodal"]``) is written with ``multimodal_base`` = that folder as a
    whole ``Gemma3ForConditionalGeneration`` folder: the language model's weights under the
    base's key layout, the vision tower and projector copied from the base bit for bit, the
    base's config.json (and generation / image processor configs). Without it, the language
    model alone is written as a text-only ``Gemma3ForCausalLM`` folder.

    Everything is written to a temporary sibling first, so a failed save changes nothing
    (``ember.models.save_folder``). An existing ``out_dir`` of model-folder files only (config,
    weights, tokenizer) is replaced as a whole by a rename; saved without a ``tokenizer``, its
    tokenizer files go too (with a warning naming them). One that also holds other files
    (README.md, ``.cache/``, a Trainer checkpoint's state) keeps them and has its model files
    replaced around them, as transformers writes into such a folder; one holding a PEFT adapter's
    files is refused."""
    model = getattr(model, "_orig_mod", model)  # torch.compile wrapper
    if not isinstance(model, Transformer):
        raise EmberError(
            f"save_pretrained expects an ember Transformer, got {type(model).__name__}"
        )
    sd = model.state_dict()
    if dequantize:
        sd = _with_nf4_weights(model, sd)
    elif model.cfg.num_experts:
        # transformers 5 holds MoE experts as 3-D parameters and routers as plain weights, which
        # bitsandbytes leaves dense: its 4-bit MoE checkpoints store them so (was: NF4 experts,
        # and a transformers 4 checkpoint's NF4 router, which it cannot load).
        sd = _with_nf4_weights(model, sd, only=DENSE_UNDER_BNB)
    return save_state_dict(
        sd,
        model.cfg,
        out_dir,
        tokenizer,
        dtype=dtype,
        max_shard_size=max_shard_size,
        multimodal_base=multimodal_base,
        compute_dtype=getattr(model, "bnb_compute_dtype", None),
        generation_config=getattr(model, "hf_generation_config", None),
    )


def save_state_dict(
    sd: dict[str, torch.Tensor],
    cfg: ModelConfig,
    out_dir: str | os.PathLike,
    tokenizer=None,
    *,
    dtype: str | torch.dtype | None = None,
    max_shard_size: int | str = "5GB",
    multimodal_base: str | os.PathLike | None = None,
    compute_dtype: torch.dtype | None = None,
    generation_config: dict | None = None,
) -> Path:
    """``save_pretrained`` for a full Ember state dict (e.g. gathered from a sharded model with
    ``torch.distributed.checkpoint.state_dict.get_model_state_dict(..., full_state_dict=True)``);
    bitsandbytes entries of NF4 layers are written in bnb's format, as by ``save_pretrained``
    (``bnb_4bit_compute_dtype``: ``compute_dtype``, default the saved dtype).
    ``generation_config``: the source folder's generation_config.json, whose sampling defaults
    the written one keeps (``save_pretrained`` passes the one the model was loaded with)."""
    target = resolve_dtype(dtype)
    limit = parse_size(max_shard_size)
    return write_folder_into(
        out_dir, lambda tmp: _write_folder(sd, cfg, tmp, tokenizer, target, limit,
                                           multimodal_base, compute_dtype, generation_config),
        tokenizer is not None)
