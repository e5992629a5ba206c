"""The teacher cache format: region -> codec -> Zarr store, read back and inspected.

A pure format library (it imports only ``config`` and ``models``): which anchors are
stored (:mod:`.region`), how values are encoded (:mod:`.codec`), the typed manifest
(:mod:`.manifest`), writing units (:mod:`.store`), reading samples (:mod:`.reader`),
whether a cache can serve a student (:mod:`.compat`) and ``ldpipe cache
info|verify|diff`` (:mod:`.info`, :mod:`.verify`, :mod:`.diff`).  The runner that
fills a cache is ``ldpipe.engine.dump``.
"""
from .manifest import CacheError, Manifest
from .reader import CacheReader
from .store import open_cache

__all__ = ["CacheError", "CacheReader", "Manifest", "open_cache"]
