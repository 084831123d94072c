"""A/B experiments: deterministic arm assignment, the append-only serving log, and the report."""

from redrec.experiments.assignment import Arm, ExperimentSpec, HOLDOUT, assign
from redrec.experiments.log import AppendLog, read_feedback, read_serving_log

__all__ = ["Arm", "ExperimentSpec", "HOLDOUT", "assign", "AppendLog", "read_feedback", "read_serving_log"]
