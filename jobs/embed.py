"""embed: image files (local dir or any Hadoop URI) -> L2-normalised CNN embeddings as Parquet.

Extract lists the images and plans what to compute (incremental re-runs skip unchanged files),
transform decodes and embeds them in batches on the executors, load appends each chunk to the table
so that an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from jobs import storage
from jobs.errors import UsageError
from jobs.imaging import DEFAULT_MAX_PIXELS, IMAGE_EXTENSIONS, ImageError, extension_glob, preprocess, to_batch
from jobs.labels import label_files, read_labels
from jobs.runlog import RunSummary, get_logger, print_summary
from jobs.tables import read_parquet_or_explain
from jobs.weights import Weights, build_model, load_weights

log = get_logger("jobs.embed")

EMBEDDINGS_SCHEMA = T.StructType([
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
])
EMBEDDINGS_COLUMNS = EMBEDDINGS_SCHEMA.fieldNames()
# what the executors return; modification time travels as microseconds so no timezone can shift it
_EMBEDDED_SCHEMA = T.StructType(
    [f for f in EMBEDDINGS_SCHEMA.fields if f.name != "modification_time"]
    + [T.StructField("modification_us", T.LongType(), False)]
)
PLAN_COLUMNS = ["path", "length", "modification_us", "label", "x1", "y1", "x2", "y2"]
MAX_BINARY_FILE_BYTES = 2**31 - 1  # Spark's binaryFile cannot read a file larger than this


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", required=True, help="folder or URI of images, read recursively (local, s3a://, s3://, gs://, hdfs://)")
    parser.add_argument("--output", required=True, help="embeddings table (Parquet folder or URI)")
    parser.add_argument("--labels", help="labels CSV (path,label[,x1,y1,x2,y2]) or Stanford Cars annos CSV/.mat; default: parent folder name")
    parser.add_argument("--crop-to-box", action="store_true", help="crop to the labels file's bounding box before resizing")
    parser.add_argument("--model", default="resnet18", choices=["resnet18", "mobilenet_v2"], help="backbone")
    parser.add_argument("--weights", help="checkpoint: local path, s3:// URI or https URL (default: torchvision's, cached in $TORCH_HOME/hub/checkpoints)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per forward pass (and per Arrow batch)")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"], help="auto = fp32; bf16 autocast is opt-in (see bench/README.md: it changes neighbours)")
    parser.add_argument("--mode", default="incremental", choices=["incremental", "overwrite"], help="incremental skips files whose path, length and modification time are in the output")
    parser.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, help="larger images become error rows (decompression-bomb guard)")
    parser.add_argument("--max-error-rate", type=float, default=1.0, help="fail (exit 2) when more than this fraction of new files cannot be embedded")
    parser.add_argument("--chunk-files", type=int, default=20000, help="files per committed chunk: an interrupted run loses at most one chunk")
    parser.add_argument("--log-every", type=int, default=10, help="log throughput every N batches per task")
    parser.add_argument("--extensions", default=",".join(IMAGE_EXTENSIONS), help="file extensions to read (case-insensitive)")


@dataclass(frozen=True)
class EmbedConfig:
    """What every executor needs to embed: serialisable, small, weights travel in a broadcast."""

    model: str
    precision: str
    batch_size: int
    max_pixels: int
    log_every: int


# ---------------------------------------------------------------- extract


def list_images(spark: SparkSession, input_uri: str, extensions: list[str]) -> pd.DataFrame:
    """path, length, modification_us of every image file under input_uri (file contents are not read)."""
    if not storage.exists(spark, input_uri):
        raise UsageError(f"input {input_uri} does not exist")
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
        listing = pd.concat([listing, storage.stat_files(spark, indexed, exclude=set(listing["path"]))], ignore_index=True)
    if listing.empty:
        raise UsageError(f"no image files ({', '.join(extensions)}) under {input_uri}")
    return listing


def read_existing(spark: SparkSession, output: str, model: str) -> DataFrame | None:
    """The embeddings table already at output, checked to be one this model can add to."""
    if not storage.exists(spark, output):
        return None
    table = read_parquet_or_explain(spark, output, f"output {output} exists and is not an embeddings table; use another --output")
    missing = [c for c in EMBEDDINGS_COLUMNS if c not in table.columns]
    if missing:
        raise UsageError(f"output {output} exists but is not an embeddings table (missing {', '.join(missing)}); use another --output")
    models = [r.model for r in table.select("model").distinct().limit(3).collect()]
    if models and models != [model]:
        raise UsageError(f"output {output} holds {', '.join(models)} embeddings, not {model}; use --mode overwrite or another --output")
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


def escape_glob(path: str) -> str:
    """Hadoop treats {}[]*?\\ in load() paths as a glob; a file name may hold them literally."""
    return "".join("\\" + c if c in "{}[]*?\\" else c for c in path)


def read_contents(spark: SparkSession, paths: list[str]) -> DataFrame:
    """path, content for exactly these files; files that vanished since listing are skipped."""
    return spark.read.format("binaryFile").load([escape_glob(p) for p in paths]).select("path", "content")


# ---------------------------------------------------------------- transform


def supports_bf16() -> bool:
    """True on CUDA GPUs with bf16 and CPUs with AVX512-BF16 or AMX (where autocast pays off)."""
    import torch

    if torch.cuda.is_available():
        return bool(torch.cuda.is_bf16_supported())
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def resolve_precision(precision: str) -> str:
    """auto is fp32: bf16 autocast failed the fidelity bar (cosine >= 0.999 to fp32) in bench/bf16_fidelity.py."""
    if precision == "bf16" and not supports_bf16():
        log.warning("bf16 requested on a device without native bf16: it is emulated and much slower than fp32")
    return "fp32" if precision == "auto" else precision


class Embedder:
    """One backbone per Python worker process, reused by every task and batch that process runs."""

    _cache: dict[tuple[str, str, str], Embedder] = {}

    def __init__(self, model: str, weights: bytes, precision: str) -> None:
        import torch

        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.precision = resolve_precision(precision)
        self.net = build_model(model, weights).to(self.device).to(memory_format=torch.channels_last)

    @classmethod
    def get(cls, model: str, sha256: str, precision: str, weights: Any) -> Embedder:
        key = (model, sha256, precision)
        if key not in cls._cache:
            cls._cache[key] = cls(model, weights.value, precision)
        return cls._cache[key]

    def __call__(self, crops: list[np.ndarray]) -> np.ndarray:
        import torch

        batch = to_batch(crops).to(self.device, non_blocking=True)
        with torch.inference_mode(), torch.autocast(self.device.type, torch.bfloat16, enabled=self.precision == "bf16"):
            features = self.net.embed(batch).float()
        return torch.nn.functional.normalize(features, dim=1).cpu().numpy()


def _set_torch_threads() -> None:
    import torch
    from pyspark import TaskContext

    context = TaskContext.get()
    threads = max(1, context.cpus() if context is not None else 1)
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)  # one thread per task core: two tasks never fight over a core


def embed_partition(batches: Iterator[pd.DataFrame], config: EmbedConfig, weights: Any, sha256: str) -> Iterator[pd.DataFrame]:
    """Executor side: decode, preprocess and embed each Arrow batch; a bad file becomes an error row."""
    _set_torch_threads()
    embedder = Embedder.get(config.model, sha256, config.precision, weights)
    task_log = get_logger("jobs.embed.task")
    started, images, n_batches = time.perf_counter(), 0, 0
    for batch in batches:
        crops, ok_rows = [], []
        widths, heights, errors = [None] * len(batch), [None] * len(batch), [None] * len(batch)
        for i, row in enumerate(batch.itertuples(index=False)):
            box = (row.x1, row.y1, row.x2, row.y2) if row.x1 is not None and not pd.isna(row.x1) else None
            try:
                crop, widths[i], heights[i] = preprocess(row.content, box, config.max_pixels)
            except ImageError as e:
                errors[i] = str(e)
                continue
            except Exception as e:  # never let one odd file kill the task
                errors[i] = f"{type(e).__name__}: {e}"[:200]
                continue
            crops.append(crop)
            ok_rows.append(i)
        vectors: list[Any] = [None] * len(batch)
        if crops:
            for i, vector in zip(ok_rows, embedder(crops)):
                vectors[i] = vector
        images += len(batch)
        n_batches += 1
        if config.log_every and n_batches % config.log_every == 0:
            rate = images / (time.perf_counter() - started)
            task_log.info("task %s: %d images, %.1f images/s", _task_id(), images, rate)
        yield _rows(batch, widths, heights, vectors, errors, config.model)
    if images:
        rate = images / (time.perf_counter() - started)
        task_log.info("task %s done: %d images, %.1f images/s, peak RSS %.0f MB", _task_id(), images, rate, _peak_rss_mb())


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _rows(batch: pd.DataFrame, widths: list, heights: list, vectors: list, errors: list, model: str) -> pd.DataFrame:
    """One output frame in the executors' schema."""
    return pd.DataFrame({
        "image_id": batch["image_id"],
        "path": batch["path"],
        "label": batch["label"],
        "width": pd.array(widths, dtype="Int32"),
        "height": pd.array(heights, dtype="Int32"),
        "model": model,
        "embedding": vectors,
        "error": errors,
        "length": batch["length"],
        "modification_us": batch["modification_us"],
    })


def _task_id() -> str:
    from pyspark import TaskContext

    context = TaskContext.get()
    return f"{context.stageId()}.{context.partitionId()}" if context else "-"


def embed_images(files: DataFrame, config: EmbedConfig, weights: Any, sha256: str) -> DataFrame:
    """Files (path, content, plan columns) to rows of the embeddings contract."""
    with_ids = files.withColumn("image_id", F.sha1(F.col("path")))
    embedded = with_ids.mapInPandas(lambda it: embed_partition(it, config, weights, sha256), _EMBEDDED_SCHEMA)
    return embedded.withColumn("modification_time", F.timestamp_micros("modification_us")).select(EMBEDDINGS_COLUMNS)


def balanced_partitions(files: int, parallelism: int, per_task: int = 64) -> int:
    """A multiple of the parallelism giving tasks of about per_task images (fewer for small inputs)."""
    waves = max(1, -(-files // (parallelism * per_task)))
    return max(1, min(files, parallelism * waves))


def rejection(length: int) -> str:
    """Why a file of this size is not read at all: Spark's scan skips empty files and cannot read >2 GiB."""
    if length == 0:
        return "empty file"
    return f"file too large: {length} bytes (Spark's binaryFile reads at most {MAX_BINARY_FILE_BYTES})"


def error_rows(spark: SparkSession, plan: pd.DataFrame, model: str) -> DataFrame:
    """Error rows for files rejected by size before reading."""
    rows = [
        (r.path, r.label, None, None, model, None, rejection(int(r.length)), int(r.length), int(r.modification_us))
        for r in plan.itertuples(index=False)
    ]
    frame = spark.createDataFrame(
        rows,
        "path string, label string, width int, height int, model string, embedding array<float>, error string, length long, modification_us long",
    )
    return (
        frame.withColumn("image_id", F.sha1("path"))
        .withColumn("modification_time", F.timestamp_micros("modification_us"))
        .select(EMBEDDINGS_COLUMNS)
    )


# ---------------------------------------------------------------- load


def drop_stale(table: DataFrame, stale: pd.DataFrame, spark: SparkSession) -> DataFrame:
    """The table without rows for files that have changed since they were embedded."""
    keys = spark.createDataFrame(stale[["path", "length", "modification_us"]])
    return table.withColumn("modification_us", F.unix_micros("modification_time")).join(
        F.broadcast(keys), ["path", "length", "modification_us"], "left_anti"
    ).select(EMBEDDINGS_COLUMNS)


def new_rows_stats(table: DataFrame, paths: list[str], spark: SparkSession) -> tuple[int, int, list[tuple[str, int]]]:
    """Embedded and failed counts among these paths, and the commonest error reasons."""
    if not paths:
        return 0, 0, []
    wanted = spark.createDataFrame([(p,) for p in paths], "path string")
    counts = table.join(F.broadcast(wanted), "path", "left_semi").groupBy("error").count().collect()
    embedded = sum(r["count"] for r in counts if r.error is None)
    reasons = sorted(((r.error, r["count"]) for r in counts if r.error is not None), key=lambda x: -x[1])
    return embedded, sum(n for _, n in reasons), reasons


def run(spark: SparkSession, args: argparse.Namespace) -> int:
    summary = RunSummary("embed", vars(args))
    extensions = [e.strip().lstrip(".").lower() for e in args.extensions.split(",") if e.strip()]
    if args.batch_size < 1 or args.chunk_files < 1:
        raise UsageError("--batch-size and --chunk-files must be at least 1")
    with summary.stage("list"):
        listing = list_images(spark, args.input, extensions)
        labels = read_labels(spark, args.labels) if args.labels else None
        # a first run writes beside the output and swaps it in at the end; a killed first run left its
        # committed chunks there, and the next incremental run picks them up instead of starting over
        staging = storage.sibling(args.output, "staging", unique=False)
        target = args.output
        existing = read_existing(spark, args.output, args.model) if args.mode == "incremental" else None
        if existing is None:
            target = staging
            existing = resume_staging(spark, staging, args.model) if args.mode == "incremental" else None
            if existing is None:
                storage.delete(spark, staging)
        done = (
            existing.select("path", "length", F.unix_micros("modification_time").alias("modification_us")).toPandas()
            if existing is not None else None
        )
        todo, changed = plan_files(listing, done)
        plan = todo.merge(label_files(todo["path"], labels), on="path", how="left")
        if not args.crop_to_box:
            plan[["x1", "y1", "x2", "y2"]] = None
        plan = plan[PLAN_COLUMNS].astype(object).where(plan[PLAN_COLUMNS].notna(), None)
    with summary.stage("weights"):
        weights: Weights = load_weights(args.model, args.weights)
    skipped = len(listing) - len(todo)
    log.info("%d images listed, %d to embed, %d unchanged and skipped", len(listing), len(todo), skipped)

    precision = resolve_precision(args.precision)
    config = EmbedConfig(args.model, precision, args.batch_size, args.max_pixels, args.log_every)
    spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", str(args.batch_size))
    spark.conf.set("spark.sql.files.ignoreMissingFiles", "true")
    broadcast = spark.sparkContext.broadcast(weights.data)
    readable = plan[(plan["length"] > 0) & (plan["length"] <= MAX_BINARY_FILE_BYTES)]
    rejected = plan[~plan.index.isin(readable.index)]
    parallelism = spark.sparkContext.defaultParallelism
    # a killed run can leave committed task files in _temporary that the next append would adopt
    storage.delete(spark, f"{target}/_temporary")
    with summary.stage("embed"):
        if not rejected.empty:
            error_rows(spark, rejected, args.model).write.mode("append").parquet(target)
        started = time.perf_counter()
        chunks = [readable.iloc[i : i + args.chunk_files] for i in range(0, len(readable), args.chunk_files)]
        done_files = 0
        for n, chunk in enumerate(chunks, 1):
            plan_df = spark.createDataFrame(chunk, "path string, length long, modification_us long, label string, x1 double, y1 double, x2 double, y2 double")
            # CNN cost is per image, not per byte: equal image counts per task keep every core busy to the end
            files = read_contents(spark, chunk["path"].tolist()).join(F.broadcast(plan_df), "path").repartition(balanced_partitions(len(chunk), parallelism))
            try:
                embed_images(files, config, broadcast, weights.sha256).write.mode("append").parquet(target)
            except Exception:
                log.warning("chunk %d/%d failed; %d/%d files of this run are committed in %s and the next run "
                            "with the same --output keeps them", n, len(chunks), done_files, len(readable), target)
                raise
            done_files += len(chunk)
            rate = done_files / (time.perf_counter() - started)
            log.info("chunk %d/%d committed: %d/%d files, %.1f images/s", n, len(chunks), done_files, len(readable), rate)
    with summary.stage("commit"):
        if changed:
            stale = done[done["path"].isin(changed)]
            rewritten = storage.sibling(args.output, "compact")
            drop_stale(spark.read.parquet(target), stale, spark).write.parquet(rewritten)
            storage.swap_in(spark, rewritten, target)
        if target != args.output:
            storage.swap_in(spark, target, args.output)
    table = spark.read.parquet(args.output)
    embedded, failed, reasons = new_rows_stats(table, todo["path"].tolist(), spark)
    vanished = len(todo) - embedded - failed
    seconds = summary.data["seconds"].get("embed", 0.0)
    summary.count(read=len(listing), embedded=embedded, failed=failed, skipped=skipped, vanished=vanished, table_rows=table.count())
    summary.set(
        input=args.input, output=args.output, model=args.model, precision=precision,
        weights={"source": weights.source, "sha256": weights.sha256},
        images_per_second=round((embedded + failed) / seconds, 2) if seconds else None,
        errors=[{"error": e, "count": n} for e, n in reasons[:20]],
    )
    summary.finish()
    storage.write_text(spark, f"{args.output}/_summary.json", summary.to_json())
    rows = [
        ("input", args.input), ("output", args.output),
        ("model", f"{args.model} ({precision}), weights sha256 {weights.sha256[:12]}"),
        ("images listed", len(listing)), ("embedded", embedded), ("failed", failed),
        ("skipped (unchanged)", skipped), ("vanished before read", vanished),
        ("table rows", summary.data["counts"]["table_rows"]),
        ("seconds", f"{summary.data['seconds']['total']:.1f} total, {seconds:.1f} embedding"),
        ("images/s", summary.data["images_per_second"]),
    ]
    print_summary("embed summary", rows, [f"failed x{n}: {e}" for e, n in reasons[:5]])
    attempted = embedded + failed
    if attempted and failed / attempted > args.max_error_rate:
        raise UsageError(
            f"{failed} of {attempted} files ({failed / attempted:.0%}) could not be embedded, more than "
            f"--max-error-rate {args.max_error_rate:g}; is --input the right folder? (first error: {reasons[0][0]})"
        )
    return 0

