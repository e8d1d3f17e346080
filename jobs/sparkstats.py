"""Spark's own measurements of a piece of work (bytes read from storage), taken from its status store."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager

from pyspark.sql import SparkSession


@contextmanager
def measured(spark: SparkSession, name: str) -> Iterator[dict[str, int]]:
    """Run the block's Spark jobs in a job group of their own; on exit the dict holds bytes_read (input metrics)."""
    sc = spark.sparkContext
    group = f"{name}-{uuid.uuid4().hex[:8]}"
    sc.setJobGroup(group, name)
    stats: dict[str, int] = {}
    try:
        yield stats
    finally:
        sc.setLocalProperty("spark.jobGroup.id", None)  # type: ignore[arg-type]
        sc.setLocalProperty("spark.job.description", None)  # type: ignore[arg-type]
        stats["bytes_read"] = bytes_read(spark, group)


def bytes_read(spark: SparkSession, group: str) -> int:
    tracker = spark.sparkContext.statusTracker()
    store = spark.sparkContext._jsc.sc().statusStore()
    total = 0
    for job in tracker.getJobIdsForGroup(group):
        info = tracker.getJobInfo(job)
        for stage in info.stageIds if info else []:
            try:
                total += int(store.lastStageAttempt(stage).inputBytes())
            except Exception:  # a skipped stage has no attempt
                continue
    return total
