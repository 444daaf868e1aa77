"""The public surface of ``ember.kernels``: every name in ``__all__`` is documented with its
tensor contract (shapes and dtypes), since users and other tools call these functions directly."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

import ember.kernels as K

SHAPE = re.compile(r"\((?:\.\.\.|[A-Za-z]\w*|ceil\(n/2\))(?:, ?[\w.+/ ]+)+\)|\(\w+,\)|\bshape\b")
DTYPE = re.compile(r"fp32|fp16|bf16|float32|uint8|int64|int32|dtype")


@pytest.mark.parametrize("name", K.__all__)
def test_every_public_name_states_shapes_and_dtypes(name):
    doc = getattr(K, name).__doc__ or ""
    assert SHAPE.search(doc), f"ember.kernels.{name}: the docstring states no tensor shape"
    assert DTYPE.search(doc), f"ember.kernels.{name}: the docstring states no dtype"


def _misuse():
    x, w = torch.randn(2, 8), torch.randn(4, 8)
    q, k = torch.randn(1, 2, 2, 8), torch.randn(1, 2, 1, 8)
    u8 = torch.zeros(4, dtype=torch.uint8)
    return [
        ("weight", lambda: K.rms_norm(x, None)),
        ("x", lambda: K.rms_norm(x.numpy(), torch.ones(8))),
        ("cos", lambda: K.apply_rope(q, k, None, None)),
        ("gate", lambda: K.swiglu(x.numpy(), x.numpy())),
        ("up", lambda: K.geglu(x, None)),
        ("k", lambda: K.flash_attention(q, None, None)),
        ("cu_seqlens", lambda: K.flash_attention(q[0], k[0], k[0], cu_seqlens=[0, 2])),
        ("labels", lambda: K.linear_cross_entropy(x, w, [1, 2])),
        ("labels", lambda: K.linear_cross_entropy(x, w, np.array([1, 2]))),
        ("A 0", lambda: K.lora_linear(x, w, None, None, 1.0)),
        ("weight 0", lambda: K.lora_linear(x, None, torch.randn(2, 8), torch.randn(4, 2), 1.0)),
        ("w", lambda: K.nf4_quantize(np.ones((4, 64), dtype=np.float32))),
        ("packed", lambda: K.nf4_dequantize(None, K.nf4_quantize(torch.randn(64))[1])),
        ("weight", lambda: K.nf4_linear(x, w)),
        ("grad", lambda: K.adamw8bit_step(torch.randn(4), None, u8, u8.clone(), torch.zeros(1),
                                          torch.zeros(1), step=1, lr=1e-3)),
    ]


@pytest.mark.parametrize("case", range(len(_misuse())))
def test_non_tensor_arguments_get_a_clear_error(case):
    """None, lists and NumPy arrays where a tensor is expected (a dense tensor where an NF4
    weight is): a ValueError naming the argument, not an AttributeError from deep inside."""
    name, call = _misuse()[case]
    with pytest.raises(ValueError, match=f"{name} must be"):
        call()
