"""Fixtures shared by the kernel tests."""

import pytest

from tests.numerics import poisoned_allocations


@pytest.fixture
def poisoned():
    """Buffers the launchers allocate with torch.empty / empty_like start as NaN."""
    with poisoned_allocations():
        yield
