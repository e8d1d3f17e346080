"""index --mode incremental: an index brought up to date with its embeddings table, without retraining.

The diff (diff.py) finds what changed. Rows new to the table go to their nearest cells, in new files laid out as a
build lays them out. Rows gone from the table, or whose vector changed (its fingerprint), are marked deleted: beside
each file that holds some, a list of their row numbers, so nothing is rewritten. A new manifest version then makes
the whole change visible at once, and the files that neither it nor the version before refer to are removed. When
the files added by more than COMPACT_UPDATES updates pile up, or a file has lost most of its rows, those files are
rewritten as one set.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from jobs import ivf
from jobs.errors import UsageError
from jobs.filesystems import Location, location
from jobs.index import layout
from jobs.index.diff import check_table, find_changes
from jobs.ivf import CellPlan, Index, write
from jobs.ivf.files import deletions, live_rows
from jobs.ivf.manifest import Manifest
from jobs.partitions import partition_key
from jobs.runlog import RunSummary, get_logger
from jobs.tables import FINGERPRINT, rows_at

log = get_logger("jobs.index")
# updates whose added files lie side by side over the cells (each update's span them all), past which those files are
# rewritten as one set: a probed cell is then read from at most this many files more than after a build
COMPACT_UPDATES = 8
DELETED_SHARE = 0.5  # a file that has lost more than this share of its rows is rewritten at the next compaction
DRIFT_ADDED = 0.5  # rows added since training, as a share of the rows trained on, past which a rebuild is advised
DRIFT_LARGEST = 2.0  # the largest cell against the mean, as a multiple of that at training, past which too
DROPPED = pa.schema([("file", pa.int32()), ("row", pa.int64()), ("cell", pa.int32())])
LISTED = pa.schema(
    [("file", pa.int32()), ("name", pa.string()), ("rows", pa.int64()), ("cell_rows", pa.list_(pa.int64()))]
)


@dataclass
class Update:
    """What an update found and did."""

    added: int = 0
    dropped: int = 0
    changed: int = 0
    files_written: int = 0
    files_compacted: int = 0
    drift: dict = field(default_factory=dict)
    compared: str = ""  # which of the table's rows the diff read

    @property
    def nothing(self) -> bool:
        return not (self.added or self.dropped or self.changed)


def drift(manifest: Manifest, sizes: np.ndarray, added: int) -> dict:
    """How far the catalog has moved from the cells it was trained on, and whether a rebuild is advised."""
    trained = manifest.trained_rows or manifest.count
    since = manifest.added_since_training + added
    ratio = float(sizes.max() / max(sizes.mean(), 1e-9)) if len(sizes) else 1.0
    at_training = manifest.training_largest_over_mean or ratio
    reasons = (
        [f"{since} rows added since training, over {DRIFT_ADDED:.0%} of the {trained} trained on"]
        if since > DRIFT_ADDED * trained
        else []
    )
    if ratio > DRIFT_LARGEST * at_training:
        reasons.append(f"the largest cell is {ratio:.1f}x the mean, against {at_training:.1f}x at training")
    return {
        "added_since_training": since,
        "trained_rows": trained,
        "largest_over_mean": round(ratio, 2),
        "training_largest_over_mean": round(at_training, 2),
        "rebuild_advised": "; ".join(reasons) or None,
    }


def write_deletions(
    dropped: DataFrame, index: Index, files: Location, version: int
) -> tuple[dict[int, tuple[str, int]], np.ndarray]:
    """Each touched file's new list of deleted rows (its old list and the new ones), written by the executors:
    {file: (the list's name under catalog/, how many rows it lists)}, and the rows dropped from each cell (one small
    row per file reaches the driver)."""
    entries, count = index.manifest.files, len(index.manifest.files)

    def write_lists(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        fs = files.filesystem()
        fs.create_dir(f"{files.root}/_deleted", recursive=True)
        table = pa.Table.from_batches(list(batches), DROPPED)
        for number in np.unique(table.column("file").to_numpy()).tolist():
            rows = table.filter(pc.equal(table.column("file"), number))
            merged = np.union1d(deletions(fs, files.root, entries[number]), rows.column("row")).astype(np.int64)
            name = f"_deleted/{entries[number].name}.v{version}.npy"
            buffer = io.BytesIO()
            np.save(buffer, merged, allow_pickle=False)
            with fs.open_output_stream(f"{files.root}/{name}") as stream:
                stream.write(buffer.getvalue())
            first, last = entries[number].first_cell, entries[number].last_cell
            cell_rows = np.bincount(rows.column("cell").to_numpy() - first, minlength=last - first + 1)
            listed = {"file": number, "name": name, "rows": len(merged), "cell_rows": cell_rows.tolist()}
            yield pa.RecordBatch.from_pylist([listed], schema=LISTED)

    spread = dropped.select(*DROPPED.names).repartition(count, partition_key(F.col("file"), count))
    lists, sizes = {}, np.zeros(index.cells, np.int64)
    for row in spread.mapInArrow(write_lists, "file int, name string, rows bigint, cell_rows array<bigint>").collect():
        lists[row["file"]] = (row["name"], row["rows"])
        first = entries[row["file"]].first_cell
        sizes[first : first + len(row["cell_rows"])] += row["cell_rows"]
    return lists, sizes


def add_rows(
    spark: SparkSession,
    places: DataFrame,
    count: int,
    table: Location,
    index: Index,
    files: Location,
    lsh: tuple | None,
    version: int,
) -> tuple[list[dict], np.ndarray]:
    """The `count` table rows at these places, read again there and laid out as a build lays them out (on the
    index's plan), in new files: their manifest entries and rows per cell (counted by the tasks that write them)."""
    # a task reads about a catalog file's worth of rows, and every core reads
    tasks = max(spark.sparkContext.defaultParallelism, -(-count * write.row_bytes(index.dim) // layout.FILE_BYTES))
    assigned = layout.assign_cells(rows_at(places, count, table, tasks, index.dim), index.centroids, lsh)
    frame = layout.clustered(spark, assigned, index.plan, index.dim, spark.sparkContext.defaultParallelism)
    entries, sizes = [], np.zeros(index.cells, np.int64)
    for row in write.write_files(frame, files, index.dim, cell_rows=True).collect():
        entry = row.asDict()
        counts = entry.pop("cell_rows")
        sizes[entry["first_cell"] : entry["first_cell"] + len(counts)] += counts
        entries.append({**entry, "added_in": version})
    return entries, sizes


def compact(spark: SparkSession, index: Index, files: Location, which: list[int], version: int) -> list[dict]:
    """The live rows of these files rewritten as one set of files laid out by cell: their manifest entries."""
    columns = [c for c in layout.CATALOG_COLUMNS if c != "group"] + (["buckets"] if index.lsh else [])
    rows = live_rows(spark, index, files, columns, which)  # clustered() gives each row its group again
    frame = layout.clustered(spark, rows, index.plan, index.dim, spark.sparkContext.defaultParallelism)
    return [{**r.asDict(), "added_in": version} for r in write.write_files(frame, files, index.dim).collect()]


def compacted(spark: SparkSession, staged: Index, files: Location, done: Update, summary: RunSummary) -> list[dict]:
    """The staged version's file entries, sorted by cell, with its files rewritten whole where too many of their rows
    are deleted, or where more than COMPACT_UPDATES updates have each added files of their own."""
    entries = staged.meta["files"]
    compactable = [n for n, e in enumerate(entries) if e.get("deleted_rows", 0) > DELETED_SHARE * e["rows"]]
    grown = [n for n, e in enumerate(entries) if e.get("added_in")]
    piled = len({entries[n]["added_in"] for n in grown}) > COMPACT_UPDATES
    if piled or compactable:
        with summary.stage("compact"):
            which = sorted(set(compactable) | (set(grown) if piled else set()))
            rewritten = compact(spark, staged, files, which, staged.meta["version"])
            entries = [e for n, e in enumerate(entries) if n not in which] + rewritten
            done.files_compacted = len(which)
    return sorted(entries, key=lambda e: (e["first_cell"], e["name"]))


def updatable(spark: SparkSession, index: Index, uri: str) -> tuple[Location, Location]:
    """Where the index's catalog and the table at uri open with pyarrow; UsageError where either does not, or the
    index has no fingerprints to compare."""
    files, table_files = location(spark, index.catalog_uri), location(spark, uri)
    if files is None or table_files is None:
        raise UsageError(
            f"an update writes {index.catalog_uri} and reads {uri} with pyarrow (local, s3a://, gs://); rebuild with "
            "--mode overwrite"
        )
    if index.manifest.fingerprint != FINGERPRINT:
        raise UsageError(
            f"index {index.uri} was built by an older version, without the fingerprints an update compares; rebuild "
            "with --mode overwrite"
        )
    return files, table_files


def update(spark: SparkSession, index: Index, uri: str, summary: RunSummary, auto: bool) -> Update | None:
    """Bring the index up to date with the table at uri; None where --mode auto finds a rebuild advised instead.

    The diff (diff.py) reads the table's ids and fingerprints with pyarrow in the tasks (its fingerprint column, which
    the embed job writes; the vectors fingerprinted as Spark does where a file has none), and only ids, fingerprints
    and places cross its one shuffle by id; the same pass counts the changes, checks the table and keeps only the rows
    that changed. The vectors of the rows to add are then read at their places, and nothing else."""
    files, table_files = updatable(spark, index, uri)
    version = index.manifest.version + 1
    with summary.stage("diff"):
        changes, stats, table_record, compared = find_changes(spark, index, uri, files, table_files)
        if changes is None:  # not a file changed since the index read them
            return Update(drift=drift(index.manifest, index.plan.sizes, 0), compared=compared)
        check_table(index, uri, stats)
    done = Update(stats["added"], stats["dropped"], stats["changed"], compared=compared)
    done.drift = drift(index.manifest, index.plan.sizes, done.added + done.changed)
    if done.nothing or auto and done.drift["rebuild_advised"]:
        changes.unpersist()
        return done if done.nothing else None
    lsh = (index.lsh_vectors, index.lsh) if index.lsh else None
    with summary.stage("add"):
        places, count = changes.where(F.col("change").isin("added", "changed")), done.added + done.changed
        added, added_sizes = (
            add_rows(spark, places, count, table_files, index, files, lsh, version) if count else ([], 0)
        )
    with summary.stage("delete"):
        dropped = changes.where(F.col("change").isin("dropped", "changed"))
        lists, dropped_sizes = (
            write_deletions(dropped, index, files, version) if done.dropped + done.changed else ({}, 0)
        )
    changes.unpersist()
    entries = [
        {**e, **({"deleted": lists[n][0], "deleted_rows": int(lists[n][1])} if n in lists else {})}
        for n, e in enumerate(index.meta["files"])
    ] + added
    sizes = index.plan.sizes + added_sizes - dropped_sizes
    meta = {**index.meta, "files": entries, "count": int(sizes.sum()), "version": version, "table_files": table_record}
    meta["files"] = compacted(spark, replace(index, count=int(sizes.sum()), meta=meta), files, done, summary)
    done.files_written = len(added)
    meta.update(
        done.drift,
        largest_cell=int(sizes.max()),
        empty_cells=int((sizes == 0).sum()),
        updated_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
    plan = CellPlan(sizes, index.plan.first_group, index.plan.parts)
    ivf.save(spark, index.uri, meta, index.centroids, plan, lsh[0] if lsh else None)
    ivf.remove_unused(spark, index.uri, version)
    return done
