"""The Spark session the offline side's distributed path runs on (``offline.engine: spark``).

``local[2]`` in tests and ``make run``-sized work; on Kubernetes the same code runs in the driver
of a SparkApplication (the Kubeflow Spark operator) whose master and executors the operator sets,
so nothing here names a cluster. Java comes from Debian (``openjdk-17-jre-headless``), Spark from
the ``pyspark`` wheel.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

# a session's settings, with the ones our jobs depend on: UTC (the sources are stamped in UTC and
# Spark would otherwise render timestamps in the JVM's zone), and Arrow for toPandas/createDataFrame
BASE_CONF = {
    "spark.sql.session.timeZone": "UTC",
    "spark.sql.execution.arrow.pyspark.enabled": "true",
    "spark.sql.parquet.outputTimestampType": "TIMESTAMP_MICROS",
    "spark.ui.enabled": "false",
    "spark.ui.showConsoleProgress": "false",
    "spark.sql.shuffle.partitions": "8",
    "spark.driver.bindAddress": "127.0.0.1",
    "spark.driver.host": "127.0.0.1",
}


@dataclass(frozen=True)
class SparkSettings:
    master: str = "local[2]"
    app_name: str = "redrec-features"
    conf: dict[str, str] = field(default_factory=dict)

    def merged_conf(self) -> dict[str, str]:
        return {**BASE_CONF, "spark.master": self.master, "spark.app.name": self.app_name,
                **{k: str(v) for k, v in self.conf.items()}}


def java_missing() -> str | None:
    """Why Spark cannot start here (no Java), or None."""
    if os.environ.get("JAVA_HOME") and Path(os.environ["JAVA_HOME"], "bin", "java").exists():
        return None
    if shutil.which("java"):
        return None
    return ("Spark needs a Java runtime: install Debian's openjdk-17-jre-headless (`make services` does) "
            "or set JAVA_HOME")


def spark_session(settings: SparkSettings | None = None):
    """``SparkSession.builder.getOrCreate()`` with :data:`BASE_CONF` and ``settings``."""
    why = java_missing()
    if why:
        raise RuntimeError(why)
    from pyspark.sql import SparkSession

    settings = settings or SparkSettings()
    # the driver's Python and the workers' must match (one venv on a laptop and in a pod)
    os.environ.setdefault("PYSPARK_PYTHON", os.environ.get("PYSPARK_DRIVER_PYTHON", "") or _python())
    builder = SparkSession.builder
    for k, v in settings.merged_conf().items():
        builder = builder.config(k, v)
    return builder.getOrCreate()


def _python() -> str:
    import sys

    return sys.executable
