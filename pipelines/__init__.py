"""KFP pipelines (wiring only): ``pipelines.training``, ``pipelines.monitoring`` and ``pipelines.onboarding``."""

from pipelines.monitoring import make_monitoring_pipeline, monitoring_pipeline
from pipelines.onboarding import make_onboarding_pipeline, onboarding_pipeline
from pipelines.training import make_training_pipeline, training_pipeline

__all__ = ["make_monitoring_pipeline", "make_onboarding_pipeline", "make_training_pipeline", "monitoring_pipeline",
           "onboarding_pipeline", "training_pipeline"]
