"""Feast feature access: offline sources from a RecData, the repo definitions, training sets
(point-in-time, duplicate-aware), online histories (cold start -> empty) and event pushes.

The names below load on first use (PEP 562): importing the package, as the ``redrec`` CLI does to
register ``redrec features``, must not import Feast and torch into every subcommand (the drift
CronJob's peak RSS carried ~250 MB of them)."""

from __future__ import annotations

import importlib

_EXPORTS = {
    "definitions": ("PROJECT", "SERVICE_SERVING", "SERVICE_TRAINING", "SERVICE_TRAINING_USER", "Definitions",
                    "build_definitions", "seq_push_name", "seq_view_name"),
    "sources": ("DEFAULT_SEQ_LEN", "SourcesReport", "build_sources", "read_manifest"),
    "store": ("DuplicateEntityRowsError", "DuplicateReport", "FeatureRepo", "HistoryEvent", "PushReport", "TrainingSet",
              "default_data_dir", "feature_store_yaml", "merge_histories", "write_feature_store_yaml"),
}
_WHERE = {name: mod for mod, names in _EXPORTS.items() for name in names}

__all__ = [name for names in _EXPORTS.values() for name in names]


def __getattr__(name: str):
    mod = _WHERE.get(name)
    if mod is None:
        try:  # a submodule (redrec.features.store) as an attribute, as the eager imports allowed
            return importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    value = getattr(importlib.import_module(f"{__name__}.{mod}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
