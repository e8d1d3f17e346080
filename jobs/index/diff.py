"""index --mode incremental, stage 1: which of the table's rows differ from the index's (added, dropped, changed),
read as the change allows: the appended files alone where the table only grew, ids and fingerprints otherwise."""

from __future__ import annotations

from pyspark import StorageLevel
from pyspark.sql import Column, DataFrame, Observation, Row, SparkSession, Window
from pyspark.sql import functions as F

from jobs.errors import UsageError
from jobs.filesystems import Location
from jobs.index import sources
from jobs.ivf import Index
from jobs.ivf.files import live_rows
from jobs.tables import PLACE, check_stats, open_fingerprints, table_stats

CHANGES = ("added", "dropped", "changed", "same")


def diff(table: DataFrame, held: DataFrame) -> DataFrame:
    """The embeddings table's rows (open_fingerprints) joined with the index's live rows (held: image_id, cell,
    fingerprint, file, row) by image_id, each with its change: added, dropped, changed (another fingerprint) or same.
    Only ids, fingerprints and places cross this shuffle: the rows to add are read again at their places."""
    incoming = table.select(
        "image_id",
        "model",
        "weights_sha256",
        "dim",
        F.col("fingerprint").alias("incoming"),
        # the join reuses this window's shuffle and sort by image_id: repeated ids are found without another
        F.count(F.lit(1)).over(Window.partitionBy("image_id")).alias("copies"),
        *PLACE,
    )
    change = (
        F.when(F.col("file").isNull(), "added")
        .when(F.col("incoming").isNull(), "dropped")
        .when(F.col("incoming") != F.col("fingerprint"), "changed")
        .otherwise("same")
    )
    return incoming.join(held, "image_id", "full_outer").withColumn("change", change)


def diff_stats() -> list[Column]:
    """Rows per change, the table's own stats (tables.table_stats: its rows are those with a fingerprint), and its
    rows without one (from files written before the embed job wrote fingerprints)."""
    return [
        *[F.count(F.when(F.col("change") == change, 1)).alias(change) for change in CHANGES],
        *table_stats(F.col("incoming"), F.col("dim")),
        F.max("copies").alias("copies"),
        F.count(F.when(F.col(PLACE[0]).isNotNull() & F.col("incoming").isNull(), 1)).alias("unfingerprinted"),
    ]


def compare(
    spark: SparkSession, uri: str, held: DataFrame, stored: bool, names: list[str] | None
) -> tuple[DataFrame, Row]:
    """The rows of the diff of the table at uri (of these files of it, where named) against the held rows that are not
    the same, kept on disk, and the whole diff's stats with the files read, gathered in the same pass; stored: by the
    table's own fingerprint column where it has one (open_fingerprints)."""
    table = open_fingerprints(spark, uri, "embeddings table", stored, names)
    if names is not None:  # appended files: only the index's rows of their ids can meet them
        held = held.join(table.select("image_id"), "image_id", "left_semi")
    observed, read = Observation("diff"), Observation("files")
    table = table.observe(read, F.collect_set("source").alias("files"))
    joined = diff(table, held).observe(observed, *diff_stats())
    changes = joined.where(F.col("change") != "same").persist(StorageLevel.DISK_ONLY)
    changes.count()
    return changes, Row(**observed.get, **read.get)


def find_changes(
    spark: SparkSession, index: Index, uri: str, files: Location, table: Location
) -> tuple[DataFrame | None, Row | None, dict, str]:
    """The table's rows that differ from the index's (kept on disk; None where nothing did), the diff's stats, the
    table's files as the new version records them, and which rows were compared. A table that only grew since the
    index read it (every file it read still there, unchanged: the embed job appends new photos in new files) is
    compared by its appended files alone, against the index's rows of the same ids; any other by every row."""
    now = sources.listing(table)
    grown = sources.appended(index.manifest.table_files, table, now)
    unchanged = f"its {len(now) - len(grown or ())} other files unchanged since the index read them, not read"
    if grown == []:
        return None, None, index.manifest.table_files, f"no file appended; {unchanged}"
    held = live_rows(spark, index, files, ["image_id", "cell", "fingerprint"], positions=True)
    changes, stats = compare(spark, uri, held, True, grown)
    if stats["unfingerprinted"]:  # some files are from before the fingerprint column: read every vector
        changes.unpersist()
        changes, stats = compare(spark, uri, held, False, grown)
    if grown is None:
        return changes, stats, sources.recorded(table, stats["files"]), f"every row of the table's {len(now)} files"
    if stats["same"] or stats["changed"]:  # an appended row whose id an unchanged file holds too
        changes.unpersist()
        raise UsageError(f"embeddings table {uri} has repeated image_id values; re-embed with --mode overwrite")
    seen = index.manifest.table_files
    record = {**seen, "files": seen["files"] + [{"name": n, **now[n]} for n in grown]}
    return changes, stats, record, f"{len(grown)} appended file(s) alone; {unchanged}"


def check_table(index: Index, uri: str, stats: Row) -> None:
    """UsageError unless the table holds vectors of one model, dimension and weights, the index's, each id once."""
    check_stats("embeddings table", uri, stats)
    model, dim, digest = stats["model"], stats["min_dim"], stats["weights"]
    weights = index.manifest.weights_sha256  # dim is None where only fingerprints were read: rows_at checks it
    if model != index.model or dim not in (None, index.dim) or weights and digest not in (None, weights):
        raise UsageError(
            f"index {index.uri} holds {index.model} {index.dim}-d vectors of weights {str(weights)[:12]}, but {uri} "
            f"has {model} {dim}-d vectors of weights {str(digest)[:12]}; rebuild with --mode overwrite"
        )
