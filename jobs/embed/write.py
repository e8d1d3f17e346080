"""embed, stage 3: append each chunk to the table, swap it in, count what happened and say why files failed."""

from __future__ import annotations

import time
from collections.abc import Callable

import pandas as pd
from pyspark.sql import DataFrame, Observation, SparkSession
from pyspark.sql import functions as F

from jobs import storage
from jobs.embed.plan import EMBEDDINGS_COLUMNS, Plan, error_rows
from jobs.errors import UsageError
from jobs.runlog import get_logger
from jobs.tables import fingerprint

log = get_logger("jobs.embed")
REASONS_KEPT = 20  # failure reasons in the summary, commonest first
FAILED_FILES_SHOWN = 10  # failed paths named in the summary: enough to see the pattern, bounded for a big input


def write_chunks(
    spark: SparkSession, plan: Plan, model: str, chunk_files: int, embed: Callable[[pd.DataFrame], DataFrame]
) -> tuple[int, int]:
    """Embed the plan's files chunk by chunk, each chunk committed to plan.target before the next starts; the rows
    written with a vector and with an error, counted as they are written (the table is not read again)."""
    readable, rejected = plan.readable(), plan.rejected()
    # a killed run can leave committed task files in _temporary that the next append would adopt
    storage.delete(spark, f"{plan.target}/_temporary")
    if not rejected.empty:
        error_rows(spark, rejected, model).write.mode("append").parquet(plan.target)
    started = time.perf_counter()
    chunks = [readable.iloc[i : i + chunk_files] for i in range(0, len(readable), chunk_files)]
    done_files, embedded, failed = 0, 0, len(rejected)
    for n, chunk in enumerate(chunks, 1):
        counted = Observation(f"chunk {n}")
        rows = F.count(F.when(F.col("error").isNull(), 1)).alias("embedded"), F.count("error").alias("failed")
        try:
            embed(chunk).observe(counted, *rows).write.mode("append").parquet(plan.target)
        except Exception:
            log.warning(
                "chunk %d/%d failed; %d/%d files of this run are committed in %s and the next run "
                "with the same --output keeps them",
                n,
                len(chunks),
                done_files,
                len(readable),
                plan.target,
            )
            raise
        done_files += len(chunk)
        embedded, failed = embedded + counted.get["embedded"], failed + counted.get["failed"]
        rate = done_files / (time.perf_counter() - started)
        log.info("chunk %d/%d committed: %d/%d files, %.1f images/s", n, len(chunks), done_files, len(readable), rate)
    return embedded, failed


def commit(spark: SparkSession, plan: Plan, output: str) -> None:
    """Drop rows of changed and removed files, then swap a first run's staging table in under the output's name."""
    if (plan.changed or plan.removed) and plan.done is not None:
        stale = plan.done[plan.done["path"].isin(plan.changed + plan.removed)]
        rewritten = storage.sibling(output, "compact")
        drop_stale(spark.read.parquet(plan.target), stale, spark).write.parquet(rewritten)
        storage.swap_in(spark, rewritten, plan.target)
    if plan.target != output:
        storage.swap_in(spark, plan.target, output)


def drop_stale(table: DataFrame, stale: pd.DataFrame, spark: SparkSession) -> DataFrame:
    """The table without rows for files that have changed since they were embedded, or are gone."""
    keys = spark.createDataFrame(stale[["path", "length", "modification_us"]])
    if "weights_sha256" not in table.columns:  # a table from before the digest column
        table = table.withColumn("weights_sha256", F.lit(None).cast("string"))
    # every row rewritten gets its fingerprint (files from before the column have none)
    prints = F.coalesce(F.col("fingerprint"), fingerprint()) if "fingerprint" in table.columns else fingerprint()
    table = table.withColumn("fingerprint", prints)
    return (
        table.withColumn("modification_us", F.unix_micros("modification_time"))
        .join(F.broadcast(keys), ["path", "length", "modification_us"], "left_anti")
        .select(EMBEDDINGS_COLUMNS)
    )


class Outcome:
    """Embedded and failed counts among this run's files, the commonest reasons, and the first failed files."""

    def __init__(self, table: DataFrame, paths: list[str], spark: SparkSession, written: tuple[int, int]) -> None:
        self.embedded, self.failed = written  # as write_chunks counted them
        self.reasons: list[tuple[str, int]] = []
        self.failed_files: list[tuple[str, str]] = []
        if self.failed:  # only then is the table read again, for this run's failed rows
            wanted = spark.createDataFrame([(p,) for p in paths], "path string")
            mine = table.join(F.broadcast(wanted), "path", "left_semi").where(F.col("error").isNotNull())
            # the commonest reasons only: an error message may name its file, so there may be one a failed row
            counts = mine.groupBy("error").count().orderBy(F.desc("count"), "error").limit(REASONS_KEPT).collect()
            self.reasons = [(r.error, r["count"]) for r in counts]
            first = mine.select("path", "error").orderBy("path").limit(FAILED_FILES_SHOWN)
            self.failed_files = [(r.path, r.error) for r in first.collect()]

    def summary(self) -> dict:
        return {
            "errors": [{"error": e, "count": n} for e, n in self.reasons],
            "failed_files": [{"path": p, "error": e} for p, e in self.failed_files],
        }

    def lines(self) -> list[str]:
        """What the console summary says about failures: reasons by count, then the first failed files."""
        lines = [f"failed x{n}: {e}" for e, n in self.reasons[:5]]
        if self.failed_files:
            more = (
                f" (first {len(self.failed_files)} of {self.failed}, by path)"
                if self.failed > len(self.failed_files)
                else ""
            )
            lines.append(f"failed files{more}:")
            lines += [f"  {p}: {e}" for p, e in self.failed_files]
        return lines

    def check(self, max_error_rate: float) -> None:
        """Exit 2 when more than max_error_rate of the files this run tried could not be embedded."""
        attempted = self.embedded + self.failed
        if attempted and self.failed / attempted > max_error_rate:
            path, error = self.failed_files[0]
            raise UsageError(
                f"{self.failed} of {attempted} files ({self.failed / attempted:.0%}) could not be embedded, more than "
                f"--max-error-rate {max_error_rate:g}; is --input the right folder? (e.g. {path}: {error})"
            )
