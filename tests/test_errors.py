"""Cluster setup mistakes whose real trigger needs another Python or another Spark than this machine has, mapped
from the messages Spark gives for them (quoted from real runs) to one line each."""

from __future__ import annotations

import pytest

from jobs.errors import UsageError, known_error_from_spark

SEEN = {
    "the executors run another Python": "pyspark.errors.exceptions.base.PySparkRuntimeError: [PYTHON_VERSION_MISMATCH] "
    "Python in worker has different version: 3.9 than that in driver: 3.11, PySpark cannot run with different minor "
    "versions.",
    "the cluster did not accept this driver": "java.lang.IllegalStateException: Cannot call methods on a stopped "
    "SparkContext.\nThis stopped SparkContext was created at: ...\nApplication has been killed. Reason: All masters "
    "are unresponsive! Giving up.",
    "crashed, most often for want of memory": "org.apache.spark.SparkException: Job aborted due to stage failure: "
    "Task 0 in stage 3.0 failed 4 times: ExecutorLostFailure (executor 2 exited caused by one of the running tasks) "
    "Reason: Container killed by YARN for exceeding memory limits. 12.1 GB of 11.9 GB physical memory used.",
}


@pytest.mark.parametrize("meaning", sorted(SEEN))
def test_a_cluster_mistake_is_one_line_that_says_which(meaning):
    error = RuntimeError(SEEN[meaning])
    known = known_error_from_spark(error)
    assert isinstance(known, UsageError) and meaning in str(known) and "\n" not in str(known)


def test_a_bug_stays_a_bug():
    assert known_error_from_spark(RuntimeError("ZeroDivisionError: division by zero")) is None
