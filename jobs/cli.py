"""Command line: `main.py JOB [options]` dispatches to `jobs.<JOB>`; `JOB [options] --then JOB [options] ...` runs
several in order in one application (its executors start and unpack the environment once).

Exit codes: 0 ok, 2 usage or input error, 3 storage unreachable or failing after its retries (safe to
run again: committed work is kept), 1 a bug.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from jobs.errors import StorageError, UsageError, known_error_from_spark
from jobs.localstart import split_steps
from jobs.runlog import get_logger

JOBS = {
    "embed": "image files -> embeddings table",
    "index": "embeddings table -> IVF index (KMeans cells) with LSH keys",
    "search": "queries -> k nearest neighbours table (or near-duplicate pairs)",
    "evaluate": "recall@k of ivf or lsh against exact, precision@k and mAP by label",
    "report": "neighbours table -> contact sheets, HTML gallery, embedding map",
}

# pyarrow's allocator (mimalloc) backs its memory with transparent huge pages; on VMs whose host backs a huge page
# only when it is first touched, a search task's first 600 MB took 0.1-7 s to touch instead of a steady 0.4 s in
# 4 KiB pages (1M x 512-d, 1,000 queries: 1.3-1.7 s of reading instead of 5.9-7.8). It also hands freed memory back
# to the system 10 ms after it is freed, so a task's next 600 MB were faulted in again: kept, it is reused (reading
# 1.3-1.5 s instead of 1.5-2.3); a worker then holds its peak until it exits (clusters' confs use the system pool)
EXECUTOR_ENV = {"MIMALLOC_ALLOW_THP": "0", "MIMALLOC_PURGE_DELAY": "-1"}


def build_parser(job: str | None = None) -> argparse.ArgumentParser:
    """The command line; only the named job's module is imported (embed's imports torch, which costs seconds)."""
    parser = argparse.ArgumentParser(
        # `main.py` through spark-submit, `vehicle-search` from the console entry point
        prog="vehicle-search" if os.path.basename(sys.argv[0]) == "vehicle-search" else "main.py",
        description="Vehicle image similarity search on Spark.",
        epilog="several jobs in one application: JOB [options] --then JOB [options] ...; "
        "exit codes: 0 ok, 2 usage or input error, 3 storage failed after retries (safe to run again), 1 bug",
    )
    sub = parser.add_subparsers(dest="job", required=True, metavar="JOB")
    for name, help_text in JOBS.items():
        if name != job:
            sub.add_parser(name, help=help_text)
            continue
        module = importlib.import_module(f"jobs.{name}")
        job_parser = sub.add_parser(
            name, help=help_text, description=module.__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter
        )
        module.add_arguments(job_parser)
    return parser


def spark_session(  # type: ignore[no-untyped-def]
    job: str, settings: dict[str, str] | None = None, argv: Sequence[str] = ()
):
    """The session spark-submit configured (or a local one) for `job` run with `argv`, quiet and with Arrow on;
    `settings` on top (tests)."""
    from pyspark import SparkConf
    from pyspark.sql import SparkSession

    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    builder = (
        SparkSession.builder.appName(f"vehicle-search-{'+'.join(s[0] for s in split_steps(argv) if s) or job}")
        .config("spark.sql.execution.arrow.pyspark.enabled", "true")
        .config(
            "spark.ui.showConsoleProgress", "false"
        )  # the jobs log their own progress; bars would garble the summaries
    )
    given = SparkConf()  # spark-submit's settings: a user's own value of a default below stands
    for key, value in EXECUTOR_ENV.items():
        if not given.contains(f"spark.executorEnv.{key}"):
            builder = builder.config(f"spark.executorEnv.{key}", value)
    options = local_java_options(given, job, argv)
    if options:
        builder = builder.config("spark.driver.extraJavaOptions", options)
    for key, value in (settings or {}).items():
        builder = builder.config(key, value)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel(os.environ.get("SPARK_LOG_LEVEL", "WARN"))
    return spark


def local_java_options(given, job: str | None = None, argv: Sequence[str] = ()) -> str | None:  # type: ignore[no-untyped-def]
    """The driver JVM's options with jobs.localstart's for `job` (run with `argv`) added, where this process is about to
    start that JVM (vehicle-search, tests) and they change anything; None otherwise (spark-submit started it).
    """
    from pyspark import SparkContext

    from jobs import localstart

    if (
        SparkContext._gateway is not None
        or "PYSPARK_GATEWAY_PORT" in os.environ
        or "driver-java-options" in os.environ.get("PYSPARK_SUBMIT_ARGS", "")
    ):
        return None
    options = localstart.java_options(job, argv)
    return (
        " ".join(filter(None, [given.get("spark.driver.extraJavaOptions"), options]))
        if options != localstart.NO_ARCHIVE
        else None
    )


def stop(spark) -> None:  # type: ignore[no-untyped-def]
    """spark.stop(), without waiting for pyspark's accumulator server: its handler polls its connection once a
    second, so a job that used accumulators (a search) waited up to a second at its end for nothing. The JVM side
    stops first, as in stop(); the server is shut down in a thread of its own (a daemon: it ends with the process)."""
    context = spark.sparkContext
    server = getattr(context, "_accumulatorServer", None)
    context._accumulatorServer = None
    spark.stop()
    if server is not None:
        threading.Thread(target=server.shutdown, name="accumulator-server-shutdown", daemon=True).start()


def main(argv: Sequence[str] | None = None, spark=None) -> int:  # type: ignore[no-untyped-def]
    """Parse, run the job (or the jobs chained with --then, in order, in one session), map failures to exit codes.
    Every step's command line is checked before the first runs; the first failing step ends the chain. Pass `spark`
    to run inside an existing session."""
    argv = list(sys.argv[1:] if argv is None else argv)
    steps = split_steps(argv)
    parsed = []
    for number, step in enumerate(steps, 1):
        try:
            parsed.append(build_parser(next((a for a in step if a in JOBS), None)).parse_args(step))
        except SystemExit as e:  # argparse already printed usage and the error
            if len(steps) > 1 and e.code:
                print(
                    f"main.py: step {number} of {len(steps)} ({' '.join(step[:1])}) is wrong: nothing was run",
                    file=sys.stderr,
                    flush=True,
                )
            return int(e.code or 0)
    own_session = spark is None
    try:
        if own_session:
            spark = spark_session(parsed[0].job, argv=argv)
        return run_steps(spark, parsed)
    except KeyboardInterrupt:
        print(f"main.py {parsed[0].job}: interrupted", file=sys.stderr, flush=True)
        return 130
    except Exception as e:  # the session could not start
        return failed(e, parsed[0].job)
    finally:
        if own_session and spark is not None:
            stop(spark)


def run_steps(spark, steps: Sequence[argparse.Namespace]) -> int:  # type: ignore[no-untyped-def]
    """Run each parsed job in turn on `spark`; the exit code of the first that fails (the ones before it are
    committed), else 0. A chain ends with one line of each job's seconds."""
    log, times = get_logger("jobs.cli"), []
    for number, args in enumerate(steps, 1):
        started = time.monotonic()
        try:
            code = int(importlib.import_module(f"jobs.{args.job}").run(spark, args) or 0)
        except KeyboardInterrupt:
            raise
        except Exception as e:
            code = failed(e, args.job)
        times.append(f"{args.job} {time.monotonic() - started:.1f} s")
        if code:
            if len(steps) > 1:
                print(
                    f"main.py: step {number} of {len(steps)} ({args.job}) failed; the {number - 1} before it are done,"
                    f" the {len(steps) - number} after it were not run",
                    file=sys.stderr,
                    flush=True,
                )
            return code
    if len(steps) > 1:
        log.info("%d jobs in one application: %s", len(steps), ", ".join(times))
    return 0


def failed(error: Exception, job: str) -> int:
    """The exit code of a job's failure: a known one printed in one line, anything else logged with its trace."""
    known = error if isinstance(error, (UsageError, StorageError)) else known_error_from_spark(error)
    if known is None:
        get_logger(f"jobs.{job}").error("%s failed unexpectedly", job, exc_info=error)
        return 1
    print(f"main.py {job}: error: {known}", file=sys.stderr, flush=True)
    return known.exit_code


@contextmanager
def session_settings(spark, settings: dict[str, str]) -> Iterator[None]:  # type: ignore[no-untyped-def]
    """The session's SQL settings are these while the block runs, then as they were."""
    saved = {key: spark.conf.get(key, None) for key in settings}
    for key, value in settings.items():
        spark.conf.set(key, value)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                spark.conf.unset(key)
            else:
                spark.conf.set(key, value)
