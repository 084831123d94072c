"""Feast feature access: offline sources from a RecData, the repo definitions, training sets
(point-in-time, duplicate-aware), online histories (cold start -> empty) and event pushes."""

from redrec.features.definitions import (
    PROJECT,
    SERVICE_SERVING,
    SERVICE_TRAINING,
    SERVICE_TRAINING_USER,
    Definitions,
    build_definitions,
    seq_push_name,
    seq_view_name,
)
from redrec.features.sources import DEFAULT_SEQ_LEN, SourcesReport, build_sources, read_manifest
from redrec.features.store import (
    DuplicateEntityRowsError,
    DuplicateReport,
    FeatureRepo,
    HistoryEvent,
    PushReport,
    TrainingSet,
    default_data_dir,
    feature_store_yaml,
    merge_histories,
    write_feature_store_yaml,
)

__all__ = [
    "PROJECT", "SERVICE_SERVING", "SERVICE_TRAINING", "SERVICE_TRAINING_USER", "Definitions", "build_definitions",
    "seq_push_name", "seq_view_name", "DEFAULT_SEQ_LEN", "SourcesReport", "build_sources", "read_manifest",
    "DuplicateEntityRowsError", "DuplicateReport", "FeatureRepo", "HistoryEvent", "PushReport", "TrainingSet",
    "default_data_dir", "feature_store_yaml", "merge_histories", "write_feature_store_yaml",
]
