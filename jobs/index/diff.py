"""index --mode incremental, stage 1: which of the table's rows differ from the index's (added, dropped, changed),
read as the change allows: the appended files alone where the table only grew, every file otherwise.

The tasks read both sides with pyarrow: the table's ids and fingerprints (the embed job's column; a file without
one has its vectors fingerprinted as Spark does) and the index's ids, fingerprints and places. One shuffle by image_id
brings each id's rows together and a task joins them there; only the changed rows leave it.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pyspark import AccumulatorParam, StorageLevel
from pyspark.sql import DataFrame, Observation, Row, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.pandas.types import from_arrow_schema

from jobs.errors import UsageError
from jobs.filesystems import Location
from jobs.index import sources
from jobs.ivf import Index
from jobs.ivf.files import live_table
from jobs.tables import PLACE, VECTOR_COLUMNS, check_stats
from jobs.vectors import matrix_from_binary, packed_vectors, spark_fingerprints

CHANGES = ("added", "dropped", "changed", "same")
JOIN_ROWS = 1 << 20  # rows of both sides one join task holds: about 100 MB of ids and places in pyarrow
TABLE, HELD = 0, 1  # the sides
SIDES = pa.schema(
    [
        ("side", pa.int8()),
        ("image_id", pa.string()),
        ("fingerprint", pa.int64()),
        ("file", pa.int32()),  # the table file's number in the read, or the catalog file's in the manifest
        ("row", pa.int64()),
        ("cell", pa.int32()),
    ]
)
CHANGED = pa.schema(
    [
        ("image_id", pa.string()),
        ("change", pa.string()),
        (PLACE[0], pa.string()),  # added and changed: where the table holds the row (tables.rows_at)
        (PLACE[1], pa.int64()),
        ("file", pa.int32()),  # dropped and changed: where the index holds it
        ("row", pa.int64()),
        ("cell", pa.int32()),
    ]
)
ID_FILTER_BITS = 1 << 23  # a filter of the appended files' ids (1 MB): only the index's ids that pass it are joined
FILTER_TASKS = 32  # the most tasks that build it, each sending the driver its 1 MB
NO_STATS = {"rows": 0, "min_dim": None, "max_dim": None, "model": None, "other_model": None, "weights": None}


class StatsParam(AccumulatorParam):
    """The table's stats as tables.check_stats reads them, merged over tasks (rows: only whether any counts)."""

    def zero(self, value: dict) -> dict:
        return {**NO_STATS, "other_weights": None, "copies": 0}

    def addInPlace(self, a: dict, b: dict) -> dict:
        def pick(how, key):
            found = [v for v in (a[key], b[key]) if v is not None]
            return how(found) if found else None

        merged = {key: pick(min, key) for key in ("min_dim", "model", "weights")}
        merged.update({key: pick(max, key) for key in ("max_dim", "other_model", "other_weights", "copies")})
        return {**merged, "rows": a["rows"] + b["rows"]}


def table_columns(schema: pa.Schema) -> list[str]:
    """The columns of a table file the diff reads: its fingerprints, or its vectors where it has none."""
    wanted = ["image_id", "model", "fingerprint" if "fingerprint" in schema.names else "embedding"]
    return wanted + [c for c in ("weights_sha256", "error") if c in schema.names]


def table_side(parquet: pq.ParquetFile, number: int, stats: dict) -> Iterator[pa.RecordBatch]:
    """A table file's rows that have a vector, a row group at a time, as SIDES rows (fingerprinted here where the file
    has no fingerprint column), its stats added to `stats`."""
    columns, start = table_columns(parquet.schema_arrow), 0
    for group in range(parquet.num_row_groups):
        read = parquet.read_row_group(group, columns=columns)
        rows = np.arange(start, start + read.num_rows)
        start += read.num_rows
        kept = pc.is_valid(read.column("fingerprint" if "fingerprint" in columns else "embedding"))
        if "error" in columns:
            kept = pc.and_(kept, pc.is_null(read.column("error")))
        read, rows = read.filter(kept), rows[kept.to_numpy(zero_copy_only=False)]
        if "fingerprint" in columns:
            prints = read.column("fingerprint")
        else:
            packed, lengths = packed_vectors(read.column("embedding").combine_chunks())
            low, high = (int(lengths.min()), int(lengths.max())) if len(lengths) else (None, None)
            add_seen(stats, "min_dim", low, min), add_seen(stats, "max_dim", high, max)
            # mixed lengths fail the table's check (min_dim != max_dim) before anything is written
            one_length = low == high and low is not None
            prints = spark_fingerprints(matrix_from_binary(packed, low)) if one_length else np.zeros(len(lengths), int)
        for key, column in (("model", "model"), ("weights", "weights_sha256")):
            if column in columns and read.num_rows:
                low, high = pc.min_max(read.column(column)).values()
                add_seen(stats, key, low.as_py(), min), add_seen(stats, f"other_{key}", high.as_py(), max)
        stats["rows"] += read.num_rows
        yield pa.RecordBatch.from_arrays(
            [
                pa.array(np.full(read.num_rows, TABLE, np.int8)),
                read.column("image_id").combine_chunks().cast(pa.string()),
                pa.array(prints, pa.int64()),
                pa.array(np.full(read.num_rows, number, np.int32)),
                pa.array(rows),
                pa.nulls(read.num_rows, pa.int32()),
            ],
            schema=SIDES,
        )


def add_seen(stats: dict, key: str, value, how) -> None:
    stats[key] = value if stats[key] is None else stats[key] if value is None else how(stats[key], value)


def join_sides(both: pa.Table, paths: list[str], full: bool) -> tuple[pa.Table, int]:
    """One shuffle partition's rows of both sides (SIDES) joined by image_id: the rows that are not the same (CHANGED;
    the same too where not full: an appended file must not hold an id the index has), and the most rows of one id on
    the table's side. full: every file of the table was read, so an id it lacks was dropped."""
    side = both.column("side").to_numpy()
    incoming = both.filter(pa.array(side == TABLE)).select(["image_id", "fingerprint", "file", "row"])
    incoming = incoming.rename_columns(["image_id", "incoming", "source", PLACE[1]])
    held = both.filter(pa.array(side == HELD)).select(["image_id", "fingerprint", "file", "row", "cell"])
    copies = pc.max(pc.value_counts(incoming.column("image_id")).field("counts")).as_py() if incoming.num_rows else 0
    joined = incoming.join(held, "image_id", join_type="full outer" if full else "left outer")
    added, dropped = pc.is_null(joined.column("file")), pc.is_null(joined.column("incoming"))
    differs = pc.fill_null(pc.not_equal(joined.column("incoming"), joined.column("fingerprint")), False)
    change = pc.if_else(added, "added", pc.if_else(dropped, "dropped", pc.if_else(differs, "changed", "same")))
    joined = joined.append_column("change", change)
    if full:
        joined = joined.filter(pc.not_equal(change, "same"))
    files = pa.array(paths, pa.string()).take(joined.column("source"))  # a table row's file, as rows_at opens it
    changed = joined.append_column(PLACE[0], files).select(CHANGED.names).cast(CHANGED)
    return changed, int(copies or 0)


def id_positions(ids: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """Each id's two bits in a filter of ID_FILTER_BITS (crc32 of its bytes, two seeds)."""
    raw = ids.cast(pa.binary()).to_pylist()
    first = np.fromiter((zlib.crc32(v or b"") for v in raw), np.int64, len(raw))
    second = np.fromiter((zlib.crc32(v or b"", 0x9E3779B9) for v in raw), np.int64, len(raw))
    return first % ID_FILTER_BITS, second % ID_FILTER_BITS


def mark(bits: np.ndarray, ids: pa.Array | pa.ChunkedArray) -> None:
    """The ids added to a filter."""
    for position in id_positions(ids):
        np.bitwise_or.at(bits, position >> 3, np.left_shift(1, position & 7).astype(np.uint8))


def passes(bits: np.ndarray, ids: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """Which ids the filter may hold (all it holds, and about 1% of others where it holds a million)."""
    first, second = id_positions(ids)
    return ((bits[first >> 3] >> (first & 7)) & (bits[second >> 3] >> (second & 7)) & 1).astype(bool)


def id_filter(spark: SparkSession, table: Location, paths: list[str]) -> np.ndarray:
    """The filter (two bits an id, a Bloom filter) of the ids of these table files, built by the tasks: the index's
    rows whose ids miss it cannot meet them, and need not cross the shuffle."""

    def marked(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        fs, bits = table.filesystem(), np.zeros(ID_FILTER_BITS // 8, np.uint8)
        for number in (n for batch in batches for n in batch.column("id").to_pylist()):
            with fs.open_input_file(paths[number]) as handle:
                for ids in opened_parquet(handle, paths[number]).iter_batches(columns=["image_id"]):
                    mark(bits, ids.column(0))
        yield pa.RecordBatch.from_arrays([pa.array([bits.tobytes()], pa.binary())], names=["bits"])

    found = np.zeros(ID_FILTER_BITS // 8, np.uint8)
    tasks = max(1, min(len(paths), FILTER_TASKS))
    for row in spark.range(len(paths), numPartitions=tasks).mapInArrow(marked, "bits binary").collect():
        found |= np.frombuffer(row["bits"], np.uint8)
    return found


def compare(
    spark: SparkSession, index: Index, catalog: Location, table: Location, listed: dict[str, dict], full: bool
) -> tuple[DataFrame, Row]:
    """The table's `listed` files (sources.listing()) against the index's live rows: the rows that are not the same
    (CHANGED, kept on disk) and the diff's stats, counted in the same pass. Where not full (appended files alone), only
    the index's rows that pass a filter of the files' ids are joined: the shuffle follows the appended rows."""
    names = sorted(listed)
    entries, stats = index.manifest.files, spark.sparkContext.accumulator(StatsParam().zero({}), StatsParam())
    units = [(TABLE, n) for n in range(len(names))] + [(HELD, n) for n in range(len(entries))]
    units = [units[u] for u in np.random.default_rng(0).permutation(len(units))]  # both sides over every task
    paths = [f"{table.root}/{name}" for name in names]
    bits = None if full else spark.sparkContext.broadcast(id_filter(spark, table, paths))

    def read(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        table_fs, catalog_fs, root = table.filesystem(), catalog.filesystem(memory_map=True), catalog.opened_root()
        seen = StatsParam().zero({})
        for side, number in (units[u] for batch in batches for u in batch.column("id").to_pylist()):
            if side == HELD:
                held = live_table(catalog_fs, root, entries[number], ["image_id", "fingerprint", "cell"], number)
                if bits is not None:
                    held = held.filter(pa.array(passes(bits.value, held.column("image_id"))))
                kind = pa.array(np.full(held.num_rows, HELD, np.int8))
                yield from held.select(list(SIDES.names[1:])).add_column(0, "side", kind).cast(SIDES).to_batches()
                continue
            with table_fs.open_input_file(paths[number]) as handle:
                if handle.size() != listed[names[number]]["size"]:
                    raise UsageError(f"the embeddings table changed while it was read ({paths[number]}); run again")
                yield from table_side(opened_parquet(handle, paths[number]), number, seen)
        stats.add(seen)

    def join(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        changed, copies = join_sides(pa.Table.from_batches(list(batches), SIDES), paths, full)
        stats.add({**StatsParam().zero({}), "copies": copies})
        yield from changed.to_batches()

    # a vector takes 4 B a value; where filtered, the index's rows that cross are about the table's
    upper_rows = (index.count if full else 0) + sum(f["size"] for f in listed.values()) // (4 * index.dim)
    partitions = max(int(spark.conf.get("spark.sql.shuffle.partitions")), -(-upper_rows // JOIN_ROWS))
    tasks = max(1, min(len(units), 4 * spark.sparkContext.defaultParallelism))
    sides = spark.range(len(units), numPartitions=tasks).mapInArrow(read, from_arrow_schema(SIDES))
    observed = Observation("diff")
    counts = [F.count(F.when(F.col("change") == change, 1)).alias(change) for change in CHANGES]
    joined = sides.repartition(partitions, "image_id").mapInArrow(join, from_arrow_schema(CHANGED))
    changes = joined.observe(observed, *counts).persist(StorageLevel.DISK_ONLY)
    changes.count()
    if bits is not None:
        bits.destroy()
    return changes, Row(**observed.get, **stats.value)


def opened_parquet(handle, path: str) -> pq.ParquetFile:
    """A table file as Parquet with the columns of an embeddings table; UsageError where it is neither."""
    try:
        parquet = pq.ParquetFile(handle)
    except pa.ArrowInvalid as e:
        raise UsageError(f"embeddings table file {path} is not Parquet ({e})") from e
    missing = [c for c in VECTOR_COLUMNS if c not in parquet.schema_arrow.names]
    if missing:
        raise UsageError(f"{path} is not an embeddings table file: missing column(s) {', '.join(missing)}")
    return parquet


def find_changes(
    spark: SparkSession, index: Index, uri: str, files: Location, table: Location
) -> tuple[DataFrame | None, Row | None, dict, str]:
    """The table's rows that differ from the index's (kept on disk; None where nothing did), the diff's stats, the
    table's files as the new version records them, and which rows were compared. A table that only grew since the
    index read it (every file it read still there, unchanged: the embed job appends new photos in new files) is
    compared by its appended files alone, against the index's rows of the same ids; any other by every row."""
    now = sources.listing(table)
    if not now:
        raise UsageError(f"embeddings table {uri} does not exist or holds no Parquet files")
    with table.filesystem().open_input_file(f"{table.root}/{min(now)}") as handle:  # said here, not by a task
        opened_parquet(handle, f"{table.root}/{min(now)}")
    grown = sources.appended(index.manifest.table_files, table, now)
    unchanged = f"its {len(now) - len(grown or ())} other files unchanged since the index read them, not read"
    if grown == []:
        return None, None, index.manifest.table_files, f"no file appended; {unchanged}"
    read = now if grown is None else {name: now[name] for name in grown}
    changes, stats = compare(spark, index, files, table, read, full=grown is None)
    record = {"root": table.root, "files": [{"name": n, **now[n]} for n in sorted(now)]}
    if grown is None:
        return changes, stats, record, f"every row of the table's {len(now)} files"
    if stats["same"] or stats["changed"]:  # an appended row whose id an unchanged file holds too
        changes.unpersist()
        raise UsageError(f"embeddings table {uri} has repeated image_id values; re-embed with --mode overwrite")
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
