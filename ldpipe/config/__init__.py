"""Pipeline files: declarative TOML parsed into typed dataclasses.

A pipeline file describes a whole experiment: the data set, the named models
(``teacher``, ``ta``, ``student``, ...), the training schedule, and the cache and
chain settings.  It is parsed with :mod:`tomllib` and never executed.  Unknown
keys are errors that name the key and the file.

``schema`` holds the vocabularies (``Literal`` types) and the frozen dataclasses; ``load`` reads
files and overrides and resolves each model's backbone and schedule, once.
"""
from .load import apply_override, enabled_terms, load_pipeline, parse_value, to_dict, validate
from .augment import *  # noqa: F401,F403  (the [[data.augment]] steps)
from .augment import __all__ as _augment_all
from .load import data_entry, is_resolved, legacy_dict, resolve_backbone, resolve_model, schedule_of
from .schema import *  # noqa: F401,F403  (the vocabularies and dataclasses)
from .schema import __all__ as _schema_all

__all__ = list(_schema_all) + ["apply_override", "enabled_terms", "load_pipeline", "parse_value",
                               "to_dict", "validate"]
__all__ += list(_augment_all) + ["data_entry"]
__all__ += ["is_resolved", "legacy_dict", "resolve_backbone", "resolve_model", "schedule_of"]
