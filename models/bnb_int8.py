"""bitsandbytes LLM.int8 checkpoints (``BitsAndBytesConfig(load_in_8bit=True)``, as transformers
saves them), read as the dense model they stand for.

Each quantized linear stores ``<module>.weight`` (int8, the weight's shape), ``<module>.SCB``
(fp32, one absmax per output row) and ``<module>.weight_format`` (a uint8 scalar); modules in
``llm_int8_skip_modules`` (the head, by default) and every non-linear weight stay in the
checkpoint's float dtype. Loading dequantizes with bitsandbytes' own formula,

    W = int8 * SCB[:, None] * 7.874015718698502e-3      (fp32; the constant is fp32(1/127))

so the weights equal ``bitsandbytes.functional.int8_vectorwise_dequant`` bit for bit, then cast
to the requested dtype (or quantized to NF4 with ``quantize="nf4"``: QLoRA from an 8-bit
checkpoint). Ember trains and saves the dense model; LLM.int8 matmuls are not used (its
outlier decomposition is an inference-time trick that costs speed in training).
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable, Mapping

import torch

from ember import EmberError
from ember.models.safetensors_io import CheckpointIndex, open_weights

INV_127 = 7.874015718698502e-3  # bitsandbytes' int8_vectorwise_dequant multiplier


def is_int8_config(qc: Mapping | None) -> bool:
    """True for a bitsandbytes 8-bit ``quantization_config``."""
    return bool(qc) and bool(qc.get("load_in_8bit") or qc.get("_load_in_8bit"))


def dequantize_int8(weight: torch.Tensor, scb: torch.Tensor) -> torch.Tensor:
    """bitsandbytes' row-wise int8 dequantization (fp32)."""
    return weight * scb.view(-1, 1) * INV_127


def int8_view(ckpt: CheckpointIndex) -> tuple[CheckpointIndex, Callable]:
    """(the checkpoint as the dense one it stands for, ``dequant(stored_key, tensor)`` for
    ``iter_checkpoint``). The view drops the ``SCB`` / ``weight_format`` entries and lists each
    int8 weight with the dtype most other weights have (so ``stored_dtype`` is the model's)."""
    four_bit = [k for k in ckpt.key_file if ".quant_state." in k or k.endswith(".absmax")]
    if four_bit:
        raise EmberError(f"{ckpt.folder}: config.json's quantization_config says 8-bit "
                         f"(load_in_8bit) but the checkpoint holds 4-bit entries ({four_bit[0]}"
                         "); fix quantization_config to the one the model was saved with")
    scales: dict[str, str] = {}
    for key, dtype in ckpt.dtypes.items():
        if dtype != torch.int8:
            continue
        scb = key.removesuffix("weight") + "SCB"
        if not key.endswith(".weight") or scb not in ckpt.key_file:
            raise EmberError(f"{ckpt.key_file[key]}: tensor {key} is int8 without its "
                             f"bitsandbytes row scales ({scb}); the 8-bit checkpoint is "
                             "incomplete: save it again")
        rows = ckpt.shapes[key][0] if ckpt.shapes[key] else 0
        if len(ckpt.shapes[key]) != 2 or ckpt.shapes[scb] != (rows,):
            raise EmberError(f"{ckpt.key_file[key]}: {key} {ckpt.shapes[key]} and {scb} "
                             f"{ckpt.shapes[scb]} do not fit: expected a matrix and one scale "
                             "per row")
        scales[key] = scb
    formats = [k for k in ckpt.key_file if k.endswith(".weight_format")
               and k.removesuffix("weight_format") + "weight" in scales]
    extra = set(scales.values()) | set(formats)
    count = Counter(d for k, d in ckpt.dtypes.items() if k not in extra and k not in scales)
    float_dtype = count.most_common(1)[0][0] if count else torch.float32
    view = dataclasses.replace(
        ckpt,
        key_file={k: p for k, p in ckpt.key_file.items() if k not in extra},
        shapes={k: s for k, s in ckpt.shapes.items() if k not in extra},
        dtypes={k: (float_dtype if k in scales else d) for k, d in ckpt.dtypes.items()
                if k not in extra},
    )

    loaded: dict[str, torch.Tensor] = {}  # every row scale, read at the first int8 weight

    def dequant(key: str, t: torch.Tensor) -> torch.Tensor:
        scb = scales.get(key)
        if scb is None:
            return t
        if not loaded:  # each file holding scales opened once (a .bin shard is unpickled once)
            small = [*scales.values(), *formats]
            for path in {ckpt.key_file[s] for s in small}:
                with open_weights(path) as f:
                    loaded.update({s: f.get_tensor(s) for s in small if ckpt.key_file[s] == path})
            _check_row_format(ckpt, {k: loaded[k] for k in formats})
        return dequantize_int8(t, loaded[scb].float())

    return view, dequant


# bitsandbytes' LINEAR_8BIT_WEIGHTS_FORMAT_MAPPING: only "row" holds the weight's rows in order.
_FORMATS = {0: "row", 1: "col32", 2: "col_turing", 3: "col_ampere"}


def _check_row_format(ckpt: CheckpointIndex, formats: Mapping[str, torch.Tensor]) -> None:
    """Refuse int8 weights stored in a GPU tile layout (old bitsandbytes' col_turing /
    col_ampere): read as rows they would be scrambled. bitsandbytes refuses them too."""
    for key, t in formats.items():
        code = int(t.reshape(-1)[0]) if t.numel() == 1 else None
        if code != 0:
            raise EmberError(f"{ckpt.key_file[key]}: {key} is {_FORMATS.get(code, t.tolist())!r}; "
                             "only int8 weights in bitsandbytes' 'row' format load (a GPU tile "
                             "layout of an old bitsandbytes): save the checkpoint again with a "
                             "current transformers + bitsandbytes, or load the unquantized "
                             "model")
