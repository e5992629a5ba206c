"""The teacher cache: region -> codec -> Zarr (dump, read, inspect)."""
from .store import CacheError, CacheReader

__all__ = ["CacheError", "CacheReader"]
