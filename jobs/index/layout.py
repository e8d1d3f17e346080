"""Lay the catalog out by cell: each row gets its cell (and LSH bucket keys), each group of cells its file, and
the rows are sorted by group and cell (write.py writes them, so a search reads only the cells it probes)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from jobs.ivf import CellPlan, cell_scores, unit_length
from jobs.ivf.write import row_bytes
from jobs.knn import LshParams, bucket_keys
from jobs.partitions import partition_key
from jobs.tables import fingerprint
from jobs.vectors import binary_from_matrix, matrix_from_list

FILE_BYTES = 64 << 20
CATALOG_COLUMNS = ["group", "cell", "image_id", "path", "label", "vector", "fingerprint"]
ASSIGN_ROWS = 4096  # rows scored against all centroids at once (bounds the distance matrix)


def assign_cells(vectors: DataFrame, centroids: np.ndarray, lsh: tuple[np.ndarray, LshParams] | None) -> DataFrame:
    """image_id, path, label, cell (nearest centroid), vector (float32 bytes), its fingerprint, with lsh buckets, of
    rows whose vector is `embedding`, a list of numbers."""
    schema = "image_id string, path string, label string, cell int, vector binary, fingerprint bigint" + (
        ", buckets array<bigint>" if lsh else ""
    )

    unit = unit_length(centroids)

    def assign(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for batch in batches:
            matrix = matrix_from_list(batch.column("embedding"))
            cells = np.concatenate(
                [
                    np.argmin(cell_scores(matrix[s : s + ASSIGN_ROWS], centroids, unit), axis=1)
                    for s in range(0, len(matrix), ASSIGN_ROWS)
                ]
                or [np.empty(0, np.int64)]
            )
            columns = [
                batch.column("image_id"),
                batch.column("path"),
                batch.column("label"),
                pa.array(cells.astype(np.int32)),
                binary_from_matrix(matrix),
                batch.column("fingerprint"),
            ]
            if lsh:
                keys = bucket_keys(matrix, *lsh)
                columns.append(
                    pa.ListArray.from_arrays(
                        pa.array(np.arange(0, keys.size + 1, keys.shape[1], dtype=np.int32)), pa.array(keys.ravel())
                    )
                )
            yield pa.RecordBatch.from_arrays(columns, names=[f.split()[0] for f in schema.split(", ")])

    return vectors.select("image_id", "path", "label", "embedding", fingerprint().alias("fingerprint")).mapInArrow(
        assign, schema
    )


def cell_sizes(assigned: DataFrame, cells: int) -> np.ndarray:
    """Rows per cell (one small row per cell reaches the driver)."""
    sizes = np.zeros(cells, np.int64)
    for row in assigned.groupBy("cell").count().collect():
        sizes[row["cell"]] = row["count"]
    return sizes


def file_of_groups(plan: CellPlan, rows_per_file: int, min_files: int) -> np.ndarray:
    """Each group's file: consecutive groups fill a file up to rows_per_file rows (a group is never split)."""
    group_rows = np.zeros(plan.groups, np.int64)
    for cell in np.flatnonzero(plan.sizes):
        share = -(-plan.sizes[cell] // plan.parts[cell])
        group_rows[plan.first_group[cell] : plan.first_group[cell] + plan.parts[cell]] += share
    rows_per_file = max(1, min(rows_per_file, -(-int(group_rows.sum()) // max(min_files, 1))))
    files, rows, current = np.zeros(plan.groups, np.int32), 0, 0
    for group, n in enumerate(group_rows):
        if rows and rows + n > rows_per_file:
            current, rows = current + 1, 0
        files[group], rows = current, rows + n
    return files


def clustered(spark: SparkSession, assigned: DataFrame, plan: CellPlan, dim: int, min_files: int) -> DataFrame:
    """The catalog with its group, one Spark partition per output file, sorted by group, cell and id. A row's group
    is one of its cell's, by its fingerprint (any of them serves: a search reads a cell's groups together)."""
    files = file_of_groups(plan, FILE_BYTES // row_bytes(dim), min_files)
    first_group, parts = plan.first_group.astype(np.int64), np.maximum(plan.parts, 1).astype(np.int64)

    def place(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for batch in batches:
            cells = batch.column("cell").to_numpy(zero_copy_only=False).astype(np.int64)
            prints = pc.fill_null(batch.column("fingerprint"), 0).to_numpy(zero_copy_only=False)
            groups = first_group[cells] + np.mod(prints, parts[cells])
            yield pa.RecordBatch.from_arrays(
                [*batch.columns, pa.array(groups.astype(np.int32)), pa.array(files[groups].astype(np.int32))],
                names=[*batch.schema.names, "group", "file"],
            )

    fields = [f for f in assigned.schema.fields if f.name != "group"]
    schema = T.StructType([*fields, T.StructField("group", T.IntegerType()), T.StructField("file", T.IntegerType())])
    n_files = int(files.max()) + 1 if len(files) else 1
    return (
        assigned.select(*[f.name for f in fields])
        .mapInArrow(place, schema)
        .repartition(n_files, partition_key(F.col("file"), n_files))
        .sortWithinPartitions("group", "cell", "image_id")
        .select(*CATALOG_COLUMNS, *(["buckets"] if "buckets" in assigned.columns else []))
    )
