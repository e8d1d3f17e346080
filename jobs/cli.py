"""Command line: `main.py JOB [options]` dispatches to `jobs.<JOB>`.

Exit codes: 0 ok, 2 usage or input error, 3 storage unreachable or failing after its retries (safe to
run again: committed work is kept), 1 a bug.
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import sys
from collections.abc import Sequence

from jobs.errors import UsageError
from jobs.runlog import get_logger

JOBS = {
    "embed": "image files -> embeddings table",
    "index": "embeddings table -> LSH index",
    "search": "queries -> k nearest neighbours table (or near-duplicate pairs)",
    "evaluate": "recall@k of lsh against exact, precision@k and mAP by label",
    "report": "neighbours table -> contact sheets, HTML gallery, embedding map",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="main.py", description="Vehicle image similarity search on Spark.")
    sub = parser.add_subparsers(dest="job", required=True, metavar="JOB")
    for name, help_text in JOBS.items():
        module = importlib.import_module(f"jobs.{name}")
        job_parser = sub.add_parser(
            name, help=help_text, description=module.__doc__,
            formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        )
        module.add_arguments(job_parser)
    return parser


def spark_session(job: str):  # type: ignore[no-untyped-def]
    """The session spark-submit configured (or a local one), quiet and with Arrow on."""
    from pyspark.sql import SparkSession

    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    spark = (
        SparkSession.builder.appName(f"vehicle-search-{job}")
        .config("spark.sql.execution.arrow.pyspark.enabled", "true")
        .getOrCreate()
    )
    spark.sparkContext.setLogLevel(os.environ.get("SPARK_LOG_LEVEL", "WARN"))
    return spark


# Java exceptions that mean storage could not be reached or kept failing after the client's own retries
STORAGE_FAILURE = re.compile(
    r"(?:org\.apache\.hadoop\.fs\.s3a\.AWS\w*Exception|com\.amazonaws\.SdkClientException"
    r"|java\.net\.(?:Connect|NoRouteToHost|SocketTimeout)Exception): (?P<message>[^\n]+)"
)
STORAGE_DENIED = re.compile(r"(?:java\.nio\.file\.AccessDeniedException|java\.io\.FileNotFoundException): (?P<message>(?:Bucket |s3a://)[^\n]+)")
JAVA_CLASS_PREFIX = re.compile(r"\b(?:[a-z]\w*\.)+[A-Z]\w*(?:Exception|Error): ")
SDK_DETAILS = re.compile(r" \(Service: [^)]*\)|, S3 Extended Request ID: [^:]*")


def one_line(message: str, limit: int = 400) -> str:
    """A Java exception message without class names or the repeated cause S3A appends to it."""
    message = SDK_DETAILS.sub("", JAVA_CLASS_PREFIX.sub("", message.strip()))
    message = re.sub(r": (?P<cause>.+): (?P=cause)$", r": \g<cause>", message)
    return message[:limit]


def classify_spark_error(error: Exception) -> tuple[int, str] | None:
    """Spark's errors that are not bugs, as (exit code, one line): bad input paths, storage failures."""
    name = type(error).__name__
    text = str(error)
    if name in ("AnalysisException", "IllegalArgumentException") and (
        "PATH_NOT_FOUND" in text or "Path does not exist" in text or "UNABLE_TO_INFER_SCHEMA" in text
    ):
        return 2, text.strip().splitlines()[0][:400]
    if denied := STORAGE_DENIED.search(text):
        return 2, f"storage refused access: {one_line(denied['message'])}"
    if failure := STORAGE_FAILURE.search(text):
        return 3, (f"storage failed after retries: {one_line(failure['message'])}; "
                   "committed work is kept, run the same command again when storage is back")
    return None


def main(argv: Sequence[str] | None = None, spark=None) -> int:  # type: ignore[no-untyped-def]
    """Parse, run one job, map failures to exit codes. Pass `spark` to run inside an existing session."""
    parser = build_parser()
    try:
        args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    except SystemExit as e:  # argparse already printed usage and the error
        return int(e.code or 0)
    log = get_logger(f"jobs.{args.job}")
    own_session = spark is None
    try:
        if own_session:
            spark = spark_session(args.job)
        module = importlib.import_module(f"jobs.{args.job}")
        return int(module.run(spark, args) or 0)
    except UsageError as e:
        print(f"main.py {args.job}: error: {e}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print(f"main.py {args.job}: interrupted", file=sys.stderr, flush=True)
        return 130
    except Exception as e:
        known = classify_spark_error(e)
        if known:
            code, message = known
            print(f"main.py {args.job}: error: {message}", file=sys.stderr, flush=True)
            return code
        log.exception("%s failed unexpectedly", args.job)
        return 1
    finally:
        if own_session and spark is not None:
            spark.stop()
