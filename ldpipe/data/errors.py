"""The data layer's error type (its own module so that every data module can import it)."""
from __future__ import annotations


class DataError(ValueError):
    """Missing or invalid data; the message names the offending file."""


__all__ = ["DataError"]
