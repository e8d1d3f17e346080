"""The Python API for notebooks and pipelines: an index as one object, over the same code as the command line, in the
running SparkSession (pyspark shell, Jupyter, a job of your own); no spark-submit.

    from jobs.api import Index

    index = Index.build("out/embeddings", "out/index")          # or Index.open("out/index")
    neighbours = index.search(spark.read.parquet("out/query_embeddings"), k=5)
    neighbours.where("rank = 1").show()                         # nothing runs until you read or write it

Options are the command line's, as keywords (`target_recall=0.9` is `--target-recall 0.9`); bad ones raise
UsageError with the command line's message.
"""

from __future__ import annotations

import argparse
from typing import Any

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from jobs import ivf, storage
from jobs.cli import build_parser
from jobs.errors import UsageError


def arguments(job: str, *argv: Any) -> argparse.Namespace:
    """The job's options parsed as main.py parses them, with its defaults and checks."""
    try:
        return build_parser(job).parse_args([job, *(str(a) for a in argv)])
    except SystemExit:  # argparse printed what is wrong
        raise UsageError(f"{job}: invalid options {' '.join(str(a) for a in argv)}") from None


def flags(**options: Any) -> list[str]:
    """Keywords as command-line options: target_recall=0.9 -> --target-recall 0.9, all=True -> --all."""
    found: list[str] = []
    for name, value in options.items():
        if value is None or value is False:
            continue
        found.append("--" + name.replace("_", "-"))
        if value is not True:
            found.append(str(value))
    return found


def session(spark: SparkSession | None) -> SparkSession:
    active = spark or SparkSession.getActiveSession()
    if active is None:
        raise UsageError("no SparkSession: start one (SparkSession.builder.getOrCreate()) or pass spark=")
    return active


class Index:
    """An IVF index on disk (any Hadoop URI), opened: what it holds as plain attributes, and its operations: build,
    update, search. `last_search` tells how the latest search ran (nprobe, plan, the recall measured)."""

    def __init__(self, spark: SparkSession, uri: str) -> None:
        self.spark, self.uri = spark, uri
        self.last_search: dict[str, Any] | None = None
        self.reload()

    def reload(self) -> None:
        """What the index on disk holds now."""
        self.loaded = ivf.load(self.spark, self.uri)
        self.count, self.dim, self.model = self.loaded.count, self.loaded.dim, self.loaded.model
        self.cells, self.nprobe = self.loaded.cells, self.loaded.params.nprobe
        self.calibration: dict | None = self.loaded.manifest.calibration

    def __repr__(self) -> str:
        held = f"{self.count} {self.model} {self.dim}-d vectors"
        return f"Index({self.uri!r}: {held}, {self.cells} cells, nprobe {self.nprobe})"

    @classmethod
    def open(cls, uri: str, spark: SparkSession | None = None) -> Index:
        return cls(session(spark), uri)

    @classmethod
    def build(cls, embeddings: str | DataFrame, uri: str, spark: SparkSession | None = None, **options: Any) -> Index:
        """A new index of an embeddings table (a URI, or a DataFrame of the embed job's columns) at uri, replacing
        what is there; options as `index`'s (target_recall, cells, ...)."""
        spark = session(spark)
        run_index(spark, embeddings, uri, "overwrite", options)
        return cls(spark, uri)

    def update(self, embeddings: str | DataFrame, **options: Any) -> Index:
        """This index brought up to date with its table (rows added, dropped, changed): `index --mode incremental`."""
        run_index(self.spark, embeddings, self.uri, "incremental", options)
        self.reload()
        return self

    def search(self, queries: DataFrame | str | None = None, k: int = 10, **options: Any) -> DataFrame:
        """The k nearest catalog images of each query, as a DataFrame (query_id, query_path, rank, neighbor_id,
        neighbor_path, similarity, ...): queries a DataFrame of vectors (image_id and embedding; path and label if it
        has them), or photos (a file, folder or glob, embedded with the index's model); None with all=True (the kNN
        graph) or duplicates=True. Options as `search`'s (nprobe, target_recall, exclude_self, ...). Lazy where Spark
        is: the queries' recall sample and the plan are taken now, the answers when the DataFrame is read."""
        from jobs import search
        from jobs.search import catalog, results
        from jobs.search import queries as query_tables

        photos = queries if isinstance(queries, str) else None
        args = arguments("search", "--index", self.uri, "--output", "-", "-k", k, *flags(images=photos, **options))
        args.method = args.method or self.loaded.manifest.default_method
        if isinstance(queries, DataFrame):
            args.queries = "(DataFrame)"  # a source for check(); read below
        search.check(args, self.loaded)
        files = catalog.locate(self.spark, self.loaded, args.reader)
        if isinstance(queries, DataFrame):
            source = query_tables.Source(queries.count(), frame=query_tables.from_embeddings(vectors_of(queries)))
        else:
            source = search.query_source(self.spark, args, self.loaded, files)
        found, measured, nprobe = search.find(self.spark, args, self.loaded, source, files)
        self.last_search = {
            "method": args.method,
            "nprobe": nprobe or self.nprobe if args.method == "ivf" else None,
            "plan": found.plan.describe(),
            "recall_estimate": measured.report() if measured else None,
        }
        return results.duplicate_pairs(found.answers.table) if args.duplicates else found.answers.table


def vectors_of(queries: DataFrame) -> DataFrame:
    """A DataFrame of query vectors with the columns an embeddings table gives a search."""
    if not {"image_id", "embedding"} <= set(queries.columns):
        raise UsageError(f"queries need the columns image_id and embedding (they have {', '.join(queries.columns)})")
    missing = [F.lit(None).cast("string").alias(c) for c in ("path", "label") if c not in queries.columns]
    return queries.select("*", *missing).select(
        F.col("image_id").cast("string"), "path", "label", F.col("embedding").cast("array<float>")
    )


def run_index(spark: SparkSession, embeddings: str | DataFrame, uri: str, mode: str, options: dict) -> None:
    """The index job on embeddings (a DataFrame is staged beside the index as Parquet first, and removed after)."""
    from jobs import index

    staged = storage.sibling(uri, "embeddings") if isinstance(embeddings, DataFrame) else None
    try:
        if staged is not None:
            embeddings.write.parquet(staged)  # type: ignore[union-attr]
        args = arguments(
            "index", "--embeddings", staged or embeddings, "--output", uri, "--mode", mode, *flags(**options)
        )
        index.run(spark, args)
    finally:
        if staged is not None:
            storage.delete(spark, staged)
