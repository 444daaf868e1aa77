"""ember.kernels: Triton kernels with pure-PyTorch references, as plain functions.

Every op takes ``impl=None | "triton" | "ref"`` (see ``ember.kernels._dispatch``): Triton on CUDA
tensors, the reference on CPU. Each op ``<op>`` has its reference ``<op>_ref`` beside it.
The hand-written backwards are first-order: differentiating one of their gradients again
(``create_graph=True``) raises; the ``*_ref`` functions are plain autograd and support it.
Under ``torch.autocast`` the matmul ops (``lora_*``, ``nf4_linear``, ``flash_attention``,
``linear_cross_entropy``) take their floating inputs in autocast's dtype, as ``F.linear`` and SDPA
do, and return what those return; the elementwise ops and ``rms_norm`` keep their inputs' dtypes.
``torch.func`` transforms (grad, vmap) work on the ``*_ref`` functions only: the autograd.Functions
(the Triton paths and the chunked cross-entropy) refuse them.
"""

from ember.kernels.adamw8bit import adamw8bit_step, adamw8bit_step_ref
from ember.kernels.attention import flash_attention, flash_attention_ref
from ember.kernels.cross_entropy import linear_cross_entropy, linear_cross_entropy_ref
from ember.kernels.lora import (
    lora_linear,
    lora_linear_ref,
    lora_mlp,
    lora_mlp_ref,
    lora_qkv,
    lora_qkv_ref,
)
from ember.kernels.nf4 import (
    NF4State,
    NF4Weight,
    nf4_dequantize,
    nf4_dequantize_ref,
    nf4_linear,
    nf4_linear_ref,
    nf4_quantize,
    nf4_quantize_ref,
)
from ember.kernels.rms_norm import rms_norm, rms_norm_ref
from ember.kernels.rope import apply_rope, apply_rope_ref
from ember.kernels.swiglu import geglu, geglu_ref, swiglu, swiglu_ref

__all__ = [
    "adamw8bit_step",
    "adamw8bit_step_ref",
    "apply_rope",
    "apply_rope_ref",
    "flash_attention",
    "flash_attention_ref",
    "geglu",
    "geglu_ref",
    "linear_cross_entropy",
    "linear_cross_entropy_ref",
    "lora_linear",
    "lora_linear_ref",
    "lora_mlp",
    "lora_mlp_ref",
    "lora_qkv",
    "lora_qkv_ref",
    "nf4_dequantize",
    "nf4_dequantize_ref",
    "nf4_linear",
    "nf4_linear_ref",
    "nf4_quantize",
    "nf4_quantize_ref",
    "NF4State",
    "NF4Weight",
    "rms_norm",
    "rms_norm_ref",
    "swiglu",
    "swiglu_ref",
]
