"""ember.kernels: Triton kernels with pure-PyTorch references, as plain functions.

Every op takes ``impl=None | "triton" | "ref"`` (see ``ember.kernels._dispatch``): Triton on CUDA
tensors, the reference on CPU. Each op ``<op>`` has its reference ``<op>_ref`` beside it.
"""

from ember.kernels.attention import flash_attention, flash_attention_ref
from ember.kernels.cross_entropy import linear_cross_entropy, linear_cross_entropy_ref
from ember.kernels.lora import lora_linear, lora_linear_ref
from ember.kernels.rms_norm import rms_norm, rms_norm_ref
from ember.kernels.rope import apply_rope, apply_rope_ref
from ember.kernels.swiglu import geglu, geglu_ref, swiglu, swiglu_ref

__all__ = [
    "apply_rope",
    "apply_rope_ref",
    "flash_attention",
    "flash_attention_ref",
    "geglu",
    "linear_cross_entropy",
    "linear_cross_entropy_ref",
    "lora_linear",
    "lora_linear_ref",
    "geglu_ref",
    "rms_norm",
    "rms_norm_ref",
    "swiglu",
    "swiglu_ref",
]
