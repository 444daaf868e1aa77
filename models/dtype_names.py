"""dtype names: ``resolve_dtype`` (None, a torch floating dtype, or a name such as "bf16") and the
name config.json writes for a dtype. Shared by loading (``ember.models.loading``, which
re-exports ``resolve_dtype``) and saving (``ember.models.saving``).
"""

from __future__ import annotations

import torch

from ember import EmberError
from ember.models.hf_config import DTYPES

_DTYPE_ALIASES = {
    "fp32": "float32",
    "fp16": "float16",
    "half": "float16",
    "bf16": "bfloat16",
    "float": "float32",
}


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """None, a torch floating dtype, or a name ("bfloat16", "bf16", "float32", "fp16", ...)."""
    if dtype is None or dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str):
        name = dtype.removeprefix("torch.")
        name = _DTYPE_ALIASES.get(name, name)
        if name in DTYPES:
            return DTYPES[name]
    raise EmberError(
        f"dtype must be one of {', '.join(DTYPES)} (or None to keep the checkpoint's), "
        f"got {dtype!r}"
    )


def _dtype_name(dtype: torch.dtype) -> str:
    return next(k for k, v in DTYPES.items() if v == dtype)
