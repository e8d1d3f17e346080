"""The index's catalog files as readers see them: a file's live rows (its deletion list applied), the rows of a
set of cells (a file is sorted by cell and its row groups end at cell boundaries: only the row groups holding one are
read), and the live rows of many files as a Spark table."""

from __future__ import annotations

import io
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from pyspark.sql import DataFrame, SparkSession

from jobs.filesystems import Location
from jobs.ivf.manifest import CatalogFile

if TYPE_CHECKING:
    from jobs.ivf import Index

BATCH_ROWS = 1 << 15


@dataclass(frozen=True)
class Footer:
    """A catalog file's Parquet footer, its columns' positions and each row group's range of cells."""

    metadata: pq.FileMetaData
    columns: dict[str, int]
    lowest: np.ndarray
    highest: np.ndarray

    @classmethod
    def read(cls, parquet: pq.ParquetFile, cells: int) -> Footer:
        meta = parquet.metadata
        columns = (
            {meta.row_group(0).column(c).path_in_schema: c for c in range(meta.num_columns)}
            if meta.num_row_groups
            else {}
        )
        stats = (meta.row_group(g).column(columns["cell"]).statistics for g in range(meta.num_row_groups))
        ranges = np.array(
            [(0, cells - 1) if s is None or not s.has_min_max else (s.min, s.max) for s in stats], np.int64
        )
        return cls(meta, columns, *ranges.reshape(-1, 2).T)

    def row_numbers(self, row_groups: np.ndarray) -> np.ndarray:
        """The file's row numbers of these row groups' rows, in order."""
        sizes = np.array([self.metadata.row_group(g).num_rows for g in range(self.metadata.num_row_groups)], np.int64)
        starts = np.concatenate([[0], np.cumsum(sizes)])
        return np.concatenate([np.arange(starts[g], starts[g + 1]) for g in row_groups])

    def bytes_of(self, row_groups: np.ndarray, columns: list[str]) -> int:
        """Footer and column chunk bytes of these row groups."""
        chunks = (
            self.metadata.row_group(int(g)).column(self.columns[c])
            for g in row_groups
            for c in columns
            if c in self.columns
        )
        return self.metadata.serialized_size + sum(chunk.total_compressed_size for chunk in chunks)


def read_probed(
    fs: pafs.FileSystem, path: str, probed: np.ndarray, columns: list[str], footer: Footer | None, deleted: np.ndarray
) -> tuple[pa.Table, np.ndarray, int, int, Footer]:
    """A file's row groups whose cell range holds a probed cell, which of their rows are in probed cells and not
    deleted (`deleted`: sorted row numbers in the file), the bytes (footer + column chunks) and row groups read, and
    the file's footer (given, or read here)."""
    probed_before = np.concatenate([[0], np.cumsum(probed)])  # probed cells below each cell number
    with fs.open_input_file(path) as handle:
        parquet = pq.ParquetFile(handle, pre_buffer=True, metadata=footer.metadata if footer else None)
        footer = footer or Footer.read(parquet, len(probed))
        chosen = np.flatnonzero(probed_before[footer.highest + 1] > probed_before[footer.lowest])
        empty = parquet.schema_arrow.empty_table().select(columns)
        if not len(chosen):
            return empty, np.zeros(0, bool), footer.metadata.serialized_size, 0, footer
        # one batch across the row groups: its vector column is one buffer, which the scoring views without a copy
        rows = sum(footer.metadata.row_group(int(g)).num_rows for g in chosen)
        batches = list(parquet.iter_batches(batch_size=max(rows, 1), row_groups=chosen.tolist(), columns=columns))
        table = pa.Table.from_batches(batches, empty.schema)
    keep = probed[table.column("cell").to_numpy()]
    if len(deleted):
        keep &= ~np.isin(footer.row_numbers(chosen), deleted, assume_unique=True)
    return table, keep, footer.bytes_of(chosen, columns), len(chosen), footer


def deletions(fs: pafs.FileSystem, root: str, entry: CatalogFile) -> np.ndarray:
    """The sorted row numbers deleted from a catalog file (its manifest entry names the file that lists them)."""
    if not entry.deleted:
        return np.empty(0, np.int64)
    with fs.open_input_file(f"{root}/{entry.deleted}") as handle:
        return np.load(io.BytesIO(handle.read()), allow_pickle=False)


def live_table(
    fs: pafs.FileSystem, root: str, entry: CatalogFile, columns: list[str], positions: int | None = None
) -> pa.Table:
    """A catalog file's rows less those deleted, these columns; with positions (the file's manifest position), each
    row's file and row number in it."""
    with fs.open_input_file(f"{root}/{entry.name}") as handle:
        table = pq.read_table(handle, columns=columns)
    if positions is not None:
        table = table.append_column("file", pa.array(np.full(table.num_rows, positions, np.int32)))
        table = table.append_column("row", pa.array(np.arange(table.num_rows, dtype=np.int64)))
    deleted = deletions(fs, root, entry)
    return table.filter(pa.array(~np.isin(np.arange(table.num_rows), deleted))) if len(deleted) else table


def live_batches(files: Location, entries: Sequence[CatalogFile], columns: list[str]) -> Iterator[pa.RecordBatch]:
    """The live rows of these catalog files, a file at a time."""
    fs, root = files.filesystem(memory_map=True), files.opened_root()
    for entry in entries:
        yield from live_table(fs, root, entry, columns).to_batches(max_chunksize=BATCH_ROWS)


SPARK_TYPES = {
    "group": "int",
    "cell": "int",
    "image_id": "string",
    "path": "string",
    "label": "string",
    "vector": "binary",
    "fingerprint": "bigint",
    "buckets": "array<bigint>",
}


def live_rows(
    spark: SparkSession,
    index: Index,
    files: Location,
    columns: list[str],
    which: list[int] | None = None,
    positions: bool = False,
) -> DataFrame:
    """The rows of the catalog files the manifest holds (`which` of them), less those it deleted, these columns, one
    task a file; with positions, each row's file (its manifest position) and row number in it."""
    entries = index.manifest.files
    which = list(range(len(entries))) if which is None else which

    def read(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        fs, root = files.filesystem(memory_map=True), files.opened_root()
        for number in (which[n] for batch in batches for n in batch.column("id").to_pylist()):
            table = live_table(fs, root, entries[number], columns, number if positions else None)
            yield from table.to_batches(max_chunksize=BATCH_ROWS)

    schema = ", ".join(
        [f"{column} {SPARK_TYPES[column]}" for column in columns] + (["file int", "row bigint"] if positions else [])
    )
    return spark.range(len(which), numPartitions=max(1, len(which))).mapInArrow(read, schema)
