"""Ember: a performance-focused engine for fine-tuning large language models.

The package is split in three layers that import one way only::

    ember.engine  ->  ember.models  ->  ember.kernels
"""

__version__ = "0.1.0"


class EmberError(ValueError):
    """An error the user can fix: the message says what is wrong and what to do."""


__all__ = ["EmberError", "__version__"]
