"""KFP pipelines (wiring only): ``pipelines.training`` and ``pipelines.monitoring``."""

from pipelines.monitoring import make_monitoring_pipeline, monitoring_pipeline
from pipelines.training import make_training_pipeline, training_pipeline

__all__ = ["make_monitoring_pipeline", "make_training_pipeline", "monitoring_pipeline", "training_pipeline"]
