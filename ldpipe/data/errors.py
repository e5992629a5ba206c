"""The data layer's error type (its own module so that every data module can import it)."""
from __future__ import annotations

from ..errors import LdpipeError


class DataError(LdpipeError):
    """Missing or invalid data; the message names the offending file."""


__all__ = ["DataError"]
