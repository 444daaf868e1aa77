"""The public surface of ``ember.kernels``: every name in ``__all__`` is documented with its
tensor contract (shapes and dtypes), since users and other tools call these functions directly."""

from __future__ import annotations

import re

import pytest

import ember.kernels as K

SHAPE = re.compile(r"\((?:\.\.\.|[A-Za-z]\w*|ceil\(n/2\))(?:, ?[\w.+/ ]+)+\)|\(\w+,\)|\bshape\b")
DTYPE = re.compile(r"fp32|fp16|bf16|float32|uint8|int64|int32|dtype")


@pytest.mark.parametrize("name", K.__all__)
def test_every_public_name_states_shapes_and_dtypes(name):
    doc = getattr(K, name).__doc__ or ""
    assert SHAPE.search(doc), f"ember.kernels.{name}: the docstring states no tensor shape"
    assert DTYPE.search(doc), f"ember.kernels.{name}: the docstring states no dtype"
