"""embed, stage 1: list the input, pick what to (re)compute, and read the chosen files' bytes."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from jobs import storage
from jobs.cli import session_settings
from jobs.errors import UsageError
from jobs.filesystems import Location, location, opens
from jobs.imaging import extension_glob, preprocess
from jobs.labels import label_files, read_labels
from jobs.runlog import get_logger
from jobs.tables import read_parquet_or_explain

log = get_logger("jobs.embed")

EMBEDDINGS_SCHEMA = T.StructType(
    [
        T.StructField("image_id", T.StringType(), False),
        T.StructField("path", T.StringType(), False),
        T.StructField("label", T.StringType(), True),
        T.StructField("width", T.IntegerType(), True),
        T.StructField("height", T.IntegerType(), True),
        T.StructField("model", T.StringType(), False),
        T.StructField("embedding", T.ArrayType(T.FloatType()), True),
        T.StructField("error", T.StringType(), True),
        T.StructField("length", T.LongType(), False),
        T.StructField("modification_time", T.TimestampType(), False),
        # provenance: search checks that queries and catalog come from the same checkpoint
        T.StructField("weights_sha256", T.StringType(), True),
        # xxhash64 of the embedding (tables.fingerprint): an index update compares these, never reading a vector
        T.StructField("fingerprint", T.LongType(), True),
    ]
)
EMBEDDINGS_COLUMNS = EMBEDDINGS_SCHEMA.fieldNames()
# tables from before the digest and fingerprint columns stay readable
REQUIRED_COLUMNS = [c for c in EMBEDDINGS_COLUMNS if c not in ("weights_sha256", "fingerprint")]
PLAN_COLUMNS = ["path", "length", "modification_us", "label", "x1", "y1", "x2", "y2"]
PLAN_SCHEMA = "path string, length long, modification_us long, label string, x1 double, y1 double, x2 double, y2 double"
MAX_BINARY_FILE_BYTES = 2**31 - 1  # Spark's binaryFile cannot read a file larger than this


@dataclass
class Plan:
    """What this run reads and writes: the listing, the files to embed, and where they go."""

    listing: pd.DataFrame  # every image file under --input: path, length, modification_us
    todo: pd.DataFrame  # files to embed, PLAN_COLUMNS (label and box when known)
    done: pd.DataFrame | None  # what the existing table holds: path, length, modification_us
    changed: list[str]  # paths in `done` whose file has changed since
    target: str  # where chunks are appended: the output, or its staging sibling on a first run
    weights_done: list[str]  # the weights digests the existing rows were embedded with
    removed: list[str] = field(default_factory=list)  # paths in `done` under --input whose file is gone

    def check_weights(self, output: str, sha256: str) -> None:
        """An incremental run adds to a table only vectors from the same checkpoint."""
        others = [w for w in self.weights_done if w != sha256]
        if others:
            raise UsageError(
                f"output {output} holds vectors from other weights (sha256 {others[0][:12]}), not {sha256[:12]}; "
                "use --mode overwrite or another --output"
            )

    @property
    def skipped(self) -> int:
        return len(self.listing) - len(self.todo)

    def readable(self) -> pd.DataFrame:
        return self.todo[(self.todo["length"] > 0) & (self.todo["length"] <= MAX_BINARY_FILE_BYTES)]

    def rejected(self) -> pd.DataFrame:
        return self.todo[~self.todo.index.isin(self.readable().index)]

    def first_crops(self, spark: SparkSession, count: int = 8) -> list[np.ndarray]:
        """Crops of the first photos to embed that decode, read on the driver (for its bf16 check)."""
        crops: list[np.ndarray] = []
        for row in self.readable().head(4 * count).itertuples():
            box = None if pd.isna(row.x1) else (float(row.x1), float(row.y1), float(row.x2), float(row.y2))
            try:
                crops.append(preprocess(storage.read_bytes(spark, row.path), box)[0])
            except Exception:  # an unreadable photo becomes an error row later; the check uses the others
                continue
            if len(crops) == count:
                break
        return crops


def make_plan(
    spark: SparkSession,
    input_uri: str,
    output: str,
    model: str,
    mode: str,
    extensions: list[str],
    labels_uri: str | None,
    crop_to_box: bool,
) -> Plan:
    """List the input, find the table to add to (or a killed first run's chunks) and plan the work."""
    listing = list_images(spark, input_uri, extensions)
    labels = read_labels(spark, labels_uri) if labels_uri else None
    # a first run writes beside the output and swaps it in at the end; a killed first run left its
    # committed chunks there, and the next incremental run picks them up instead of starting over
    staging = storage.sibling(output, "staging", unique=False)
    target = output
    existing = read_existing(spark, output, model) if mode == "incremental" else None
    if existing is None:
        target = staging
        existing = resume_staging(spark, staging, model) if mode == "incremental" else None
        if existing is None:
            storage.delete(spark, staging)
    done = (
        existing.select("path", "length", F.unix_micros("modification_time").alias("modification_us")).toPandas()
        if existing is not None
        else None
    )
    weights_done = (
        [
            r[0]
            for r in existing.where(F.col("weights_sha256").isNotNull())
            .select("weights_sha256")
            .distinct()
            .limit(3)
            .collect()
        ]
        if existing is not None and "weights_sha256" in existing.columns
        else []
    )
    todo, changed = plan_files(listing, done)
    removed = removed_files(listing, done, None if storage.is_glob(input_uri) else storage.qualify(spark, input_uri))
    todo = todo.merge(label_files(todo["path"], labels), on="path", how="left")
    if not crop_to_box:
        todo[["x1", "y1", "x2", "y2"]] = None
    todo = todo[PLAN_COLUMNS].astype(object).where(todo[PLAN_COLUMNS].notna(), None)
    return Plan(listing, todo, done, changed, target, weights_done, removed)


def list_images(spark: SparkSession, input_uri: str, extensions: list[str]) -> pd.DataFrame:
    """path, length, modification_us of every image file under input_uri (file contents are not read)."""
    if not storage.matches(spark, input_uri):
        raise UsageError(
            f"input {input_uri} does not exist"
            + (" (the pattern matches nothing)" if storage.is_glob(input_uri) else "")
        )
    files = (
        spark.read.format("binaryFile")
        .option("recursiveFileLookup", "true")
        .option("pathGlobFilter", extension_glob(extensions))
        .load(input_uri)
    )
    listing = files.select("path", "length", F.unix_micros("modificationTime").alias("modification_us")).toPandas()
    # Spark's scan drops zero-byte files; its file index still knows them, and they deserve an error row
    indexed = files.inputFiles()
    if len(indexed) > len(listing):
        listing = pd.concat(
            [listing, storage.stat_files(spark, indexed, exclude=set(listing["path"]))], ignore_index=True
        )
    if listing.empty:
        raise UsageError(f"no image files ({', '.join(extensions)}) under {input_uri}")
    return listing


def read_existing(spark: SparkSession, output: str, model: str) -> DataFrame | None:
    """The embeddings table already at output, checked to be one this model can add to."""
    if not storage.exists(spark, output):
        return None
    table = read_parquet_or_explain(
        spark, output, f"output {output} exists and is not an embeddings table; use another --output"
    )
    missing = [c for c in REQUIRED_COLUMNS if c not in table.columns]
    if missing:
        raise UsageError(
            f"output {output} exists but is not an embeddings table (missing {', '.join(missing)}); use another "
            f"--output"
        )
    models = [r.model for r in table.select("model").distinct().limit(3).collect()]
    if models and models != [model]:
        raise UsageError(
            f"output {output} holds {', '.join(models)} embeddings, not {model}; use --mode overwrite or another "
            f"--output"
        )
    return table


def resume_staging(spark: SparkSession, staging: str, model: str) -> DataFrame | None:
    """The committed chunks of a killed first run, or None if it committed none."""
    try:
        table = read_existing(spark, staging, model)
    except UsageError:
        return None
    if table is None:
        return None
    log.info("resuming an interrupted first run from %s", staging)
    return table


def plan_files(listing: pd.DataFrame, done: pd.DataFrame | None) -> tuple[pd.DataFrame, list[str]]:
    """Files still to embed (new or changed since the output was written) and the changed paths."""
    if done is None or done.empty:
        return listing, []
    merged = listing.merge(done, on=["path", "length", "modification_us"], how="left", indicator=True)
    todo = merged[merged["_merge"] == "left_only"].drop(columns="_merge")
    changed = sorted(set(todo["path"]) & set(done["path"]))
    return todo.reset_index(drop=True), changed


def removed_files(listing: pd.DataFrame, done: pd.DataFrame | None, folder: str | None) -> list[str]:
    """Paths the table holds under the input folder whose file is no longer there (rows of other inputs, and of a
    glob's, stay: their files were never listed)."""
    if done is None or done.empty or folder is None:
        return []
    prefix = folder.rstrip("/") + "/"
    return sorted(p for p in set(done["path"]) - set(listing["path"]) if p.startswith(prefix) or p == folder)


def escape_glob(path: str) -> str:
    """Hadoop treats {}[]*?\\ in load() paths as a glob; a file name may hold them literally."""
    return "".join("\\" + c if c in "{}[]*?\\" else c for c in path)


def balanced_partitions(files: int, parallelism: int, per_task: int = 256) -> int:
    """A multiple of the parallelism giving tasks of about per_task images (fewer for small inputs).

    A task costs ~0.13 s beyond its images (launch, handing the batches to Python, committing its file):
    8% of a 53-image task on 2 cores, under 2% of a 256-image one (bench/README.md).
    """
    waves = max(1, -(-files // (parallelism * per_task)))
    return max(1, min(files, parallelism * waves))


def photo_location(spark: SparkSession, paths: pd.Series) -> Location | None:
    """Where the executors open the photos themselves with pyarrow (local, S3, GCS), checked on the first; None: Spark
    reads them."""
    if paths.empty:
        return None
    place = location(spark, paths.iloc[0])
    return place if place is not None and opens(place, place.root) else None


def read_files(spark: SparkSession, chunk: pd.DataFrame, place: Location | None) -> DataFrame:
    """The plan columns of these files in equal-count partitions, with each file's content where Spark reads it
    (place None); otherwise each task reads its files where place says. Vanished files are skipped either way."""
    plan_df = spark.createDataFrame(chunk, PLAN_SCHEMA)
    # CNN cost is per image, not per byte: equal image counts per task keep every core busy to the end
    partitions = balanced_partitions(len(chunk), spark.sparkContext.defaultParallelism)
    if place is not None:  # no scan, no shuffle of the bytes, no Arrow transfer of them: ~15 ms a photo on 2 cores
        return plan_df.repartition(partitions)
    # Spark looks up every listed path before reading, in one task per path past 32 paths: 20 ms a photo on a
    # 2-core machine, more than decoding it. A few tasks per core look them all up as well.
    lookups = str(2 * spark.sparkContext.defaultParallelism)
    with session_settings(spark, {"spark.sql.sources.parallelPartitionDiscovery.parallelism": lookups}):
        contents = (
            spark.read.format("binaryFile").load([escape_glob(p) for p in chunk["path"]]).select("path", "content")
        )
    return contents.join(F.broadcast(plan_df), "path").repartition(partitions)


def rejection(length: int) -> str:
    """Why a file of this size is not read at all: Spark's scan skips empty files and cannot read >2 GiB."""
    if length == 0:
        return "empty file"
    return f"file too large: {length} bytes (Spark's binaryFile reads at most {MAX_BINARY_FILE_BYTES})"


def error_rows(spark: SparkSession, rejected: pd.DataFrame, model: str) -> DataFrame:
    """Error rows for files rejected by size before reading."""
    rows = [
        (r.path, r.label, None, None, model, None, rejection(int(r.length)), int(r.length), int(r.modification_us))
        for r in rejected.itertuples(index=False)
    ]
    frame = spark.createDataFrame(
        rows,
        "path string, label string, width int, height int, model string, embedding array<float>, error string, "
        "length long, modification_us long",
    )
    return (
        frame.withColumn("image_id", F.sha1("path"))
        .withColumn("modification_time", F.timestamp_micros("modification_us"))
        .withColumn("weights_sha256", F.lit(None).cast("string"))
        .withColumn("fingerprint", F.lit(None).cast("bigint"))
        .select(EMBEDDINGS_COLUMNS)
    )
