"""Faster local starts: the class-data sharing archive of the driver JVM's classes (scripts/local_start.py writes it),
and only the JVM's quick compiler for the jobs whose work runs in Python tasks, on small machines."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path

NO_ARCHIVE = "-Xshare:auto"  # the JVM's default: a command line that names this option stays valid without an archive
# The JIT's optimising compiler (C2) took about one of 2 cores for the first seconds of every job (a 1M-vector search
# of 1,000 queries: 3.5 -> 3.0 s, exact 16 -> 13 s; embed's steady rate +10%; bench/README.md). The jobs here do their
# work in Python tasks and the JVM only plans and moves batches, so its quick compiler alone (C1) serves them better.
# Not the index job where it trains (Spark ML's KMeans runs in the JVM: over 4x slower on C1 alone; an update,
# --mode incremental, trains nothing: its diff 13 -> 10 s on GloVe +50k -10k). More cores give C2 cores of its own.
QUICK_JOBS = frozenset({"search", "embed", "evaluate", "report"})
QUICK_COMPILER = "-XX:TieredStopAtLevel=1"
FEW_CORES = 4


def class_archive() -> Path:
    """Where this environment's archive lives: beside its pyspark, named for pyspark's version (its jars)."""
    import pyspark

    return Path(sys.prefix) / "share" / "vehicle-search" / f"spark-{pyspark.__version__}-classes.jsa"


THEN = "--then"  # `main.py embed ... --then index ...`: several jobs, one after another, in one application


def split_steps(words: Sequence[str]) -> list[list[str]]:
    """A command line's jobs, each as its own command line (`JOB ARGS`), split at THEN."""
    steps: list[list[str]] = [[]]
    for word in words:
        if word == THEN:
            steps.append([])
        else:
            steps[-1].append(word)
    return steps


def trains_nothing(job: str | None, args: Sequence[str]) -> bool:
    """Whether the job (or every job chained after it with THEN) runs no Spark ML in the JVM: QUICK_JOBS, and
    index --mode incremental."""
    first, *later = split_steps(list(args))
    if later:
        return trains_nothing(job, first) and all(step and trains_nothing(step[0], step[1:]) for step in later)
    words = [word for arg in args for word in arg.split("=", 1)]  # --mode=incremental as --mode incremental
    mode = words[words.index("--mode") + 1] if "--mode" in words[:-1] else None
    return job in QUICK_JOBS or job == "index" and mode == "incremental"


def java_options(job: str | None = None, args: Sequence[str] = ()) -> str:
    """The driver JVM's options for a local run of `job` with `args`: the option that maps the archive (NO_ARCHIVE
    where none was written; a JVM or class path other than the archive's prints one warning and loads each class out
    of the jars, as without it) and, where it trains nothing on at most FEW_CORES cores, QUICK_COMPILER. Without a
    job: the archive's, one word."""
    archive = class_archive()
    options = [f"-XX:SharedArchiveFile={archive}" if archive.is_file() else NO_ARCHIVE]
    if trains_nothing(job, args) and (os.cpu_count() or 1) <= FEW_CORES:
        options.append(QUICK_COMPILER)
    return " ".join(options)


if __name__ == "__main__":  # `python -m jobs.localstart [JOB [ARGS]]`: the options, for a spark-submit command line
    print(java_options(sys.argv[1] if len(sys.argv) > 1 else None, sys.argv[2:]))
