"""embed: image files (local dir or any Hadoop URI) -> L2-normalised CNN embeddings as Parquet.

plan.py lists the images and plans what to compute (incremental re-runs skip unchanged files),
backends.py (driver, torch) exports the model and times the runtimes on the first photos: the fastest faithful one runs,
model.py decodes and embeds the photos in batches on the executors, with runtimes.py's runners (no torch needed there),
write.py appends each chunk to the table, so that an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

import numpy as np
from pyspark.sql import SparkSession

from jobs import storage
from jobs.embed.model import EmbedConfig, embed_images
from jobs.embed.plan import (
    EMBEDDINGS_COLUMNS,
    EMBEDDINGS_SCHEMA,
    Plan,
    make_plan,
    photo_location,
    plan_files,
    read_files,
)
from jobs.embed.runtimes import RUNTIMES
from jobs.embed.write import Outcome, commit, write_chunks
from jobs.errors import UsageError
from jobs.imaging import DEFAULT_MAX_PIXELS, IMAGE_EXTENSIONS
from jobs.runlog import RunSummary, get_logger, print_summary

if TYPE_CHECKING:  # torch: the driver's, imported where it is used
    from jobs.embed.backends import Choice
    from jobs.weights import Weights

__all__ = [
    "EMBEDDINGS_COLUMNS",
    "EMBEDDINGS_SCHEMA",
    "EmbedConfig",
    "add_arguments",
    "embed_images",
    "plan_files",
    "run",
]
log = get_logger("jobs.embed")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--input",
        required=True,
        help="folder or URI of images, read recursively (local, s3a://, s3://, gs://, hdfs://)",
    )
    parser.add_argument("--output", required=True, help="embeddings table (Parquet folder or URI)")
    parser.add_argument(
        "--labels",
        help="labels CSV (path,label[,x1,y1,x2,y2]) or Stanford Cars annos CSV/.mat; default: parent folder name",
    )
    parser.add_argument(
        "--crop-to-box", action="store_true", help="crop to the labels file's bounding box before resizing"
    )
    add_model_arguments(parser)
    add_run_arguments(parser)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The model, its weights, and the runtime and precision it runs on."""
    parser.add_argument("--model", default="resnet18", choices=["resnet18", "mobilenet_v2"], help="backbone")
    parser.add_argument(
        "--weights",
        help="checkpoint: local path, s3:// URI or https URL (default: torchvision's, cached in "
        "$TORCH_HOME/hub/checkpoints)",
    )
    parser.add_argument("--batch-size", type=int, default=32, help="images per forward pass (and per Arrow batch)")
    parser.add_argument(
        "--precision",
        default="auto",
        choices=["auto", "fp32", "bf16"],
        help="auto: the faster of fp32 and bf16 (bf16 only where the CPU computes it natively: AVX512-BF16, AMX), "
        "timed on the first photos; bf16 must give fp32's vectors there (cosine >= 0.99)",
    )
    parser.add_argument(
        "--backend",
        default="auto",
        choices=["auto", *RUNTIMES],
        help="the runtime on the executors; auto: the fastest of OpenVINO, ONNX Runtime (both run the driver's ONNX "
        "export, no torch needed on executors) and eager PyTorch, timed on the first photos (jobs of 500+ photos; "
        "remembered per machine) among those that give fp32's vectors (cosine >= 0.9999)",
    )


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """Which files are embedded again, how many may fail, and how the tasks read and report."""
    parser.add_argument(
        "--mode",
        default="incremental",
        choices=["incremental", "overwrite"],
        help="incremental skips files whose path, length and modification time are in the output",
    )
    parser.add_argument(
        "--max-pixels",
        type=int,
        default=DEFAULT_MAX_PIXELS,
        help="larger images become error rows (decompression-bomb guard)",
    )
    parser.add_argument(
        "--max-error-rate",
        type=float,
        default=0.5,
        help="fail (exit 2) when more than this fraction of new files cannot be embedded (1 never fails)",
    )
    parser.add_argument(
        "--chunk-files",
        type=int,
        default=20000,
        help="files per committed chunk: an interrupted run loses at most one chunk",
    )
    parser.add_argument("--log-every", type=int, default=10, help="log throughput every N batches per task")
    parser.add_argument(
        "--reader",
        choices=["auto", "direct", "spark"],
        default="auto",
        help="direct: each task reads its photos with pyarrow (local, s3a/s3, gs); spark: Spark's binaryFile reader "
        "(any Hadoop filesystem); auto: direct where pyarrow opens the input",
    )
    parser.add_argument(
        "--extensions", default=",".join(IMAGE_EXTENSIONS), help="file extensions to read (case-insensitive)"
    )


def prepare(spark: SparkSession, args: argparse.Namespace, summary: RunSummary) -> tuple[Plan, Weights, Choice]:
    """What is to be embedded, the checked weights, and the backend the executors run."""
    extensions = [e.strip().lstrip(".").lower() for e in args.extensions.split(",") if e.strip()]
    if args.batch_size < 1 or args.chunk_files < 1:
        raise UsageError("--batch-size and --chunk-files must be at least 1")
    with summary.stage("list"):
        plan = make_plan(
            spark, args.input, args.output, args.model, args.mode, extensions, args.labels, args.crop_to_box
        )
    log.info(
        "%d images listed, %d to embed, %d unchanged and skipped, %d removed from the input (their rows are dropped)",
        len(plan.listing),
        len(plan.todo),
        plan.skipped,
        len(plan.removed),
    )
    with summary.stage("weights"):  # after the listing: a wrong input or labels file is said before any download
        from jobs.embed.backends import choose_backend  # torch: the driver's, never the executors'
        from jobs.embed.network import probe_crops
        from jobs.weights import load_weights

        weights = load_weights(args.model, args.weights, spark)
        plan.check_weights(args.output, weights.sha256)
        threads = int(spark.conf.get("spark.task.cpus", "1") or 1)
        choice = choose_backend(
            args.backend,
            args.precision,
            args.model,
            weights,
            lambda: np.stack([*plan.first_crops(spark), *probe_crops()]),
            len(plan.todo),
            threads,
        )
    log.info("model %s on backend %s", args.model, choice.line())
    return plan, weights, choice


def embed_and_commit(
    spark: SparkSession, args: argparse.Namespace, summary: RunSummary, plan: Plan, weights: Weights, choice: Choice
) -> tuple[int, int]:
    """Embed the plan's photos on the executors, chunk by chunk, and commit the table; the rows written with a vector
    and with an error."""
    photos = None if args.reader == "spark" else photo_location(spark, plan.readable()["path"])
    if args.reader == "direct" and photos is None and not plan.readable().empty:
        raise UsageError(f"--reader direct: pyarrow cannot open the photos under {args.input} here; use --reader spark")
    log.info("photos read by %s", "the tasks (pyarrow)" if photos else "Spark")
    summary.set(photos_read_by="tasks" if photos else "spark")
    config = EmbedConfig(args.model, args.batch_size, args.max_pixels, args.log_every, photos)
    spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", str(args.batch_size))
    spark.conf.set("spark.sql.files.ignoreMissingFiles", "true")
    # executors read a broadcast's value only when they use it: the weights only on a fallback to eager
    weights_bc = spark.sparkContext.broadcast(weights.data)
    backend_bc = spark.sparkContext.broadcast(choice.backend)
    with summary.stage("embed"):
        written = write_chunks(
            spark,
            plan,
            args.model,
            args.chunk_files,
            lambda chunk: embed_images(
                read_files(spark, chunk, photos), config, weights.sha256, weights_bc, backend_bc
            ),
        )
    with summary.stage("commit"):
        commit(spark, plan, args.output)
    return written


def summarised(
    spark: SparkSession,
    args: argparse.Namespace,
    summary: RunSummary,
    prepared: tuple[Plan, Weights, Choice],
    written: tuple[int, int],
) -> Outcome:
    """The run's summary, written beside the table and printed; its outcome."""
    plan, weights, choice = prepared
    table = spark.read.parquet(args.output)
    outcome = Outcome(table, plan.todo["path"].tolist(), spark, written)
    vanished = len(plan.todo) - outcome.embedded - outcome.failed
    seconds = summary.data["seconds"].get("embed", 0.0)
    summary.count(
        read=len(plan.listing),
        embedded=outcome.embedded,
        failed=outcome.failed,
        skipped=plan.skipped,
        removed=len(plan.removed),
        vanished=vanished,
        table_rows=table.count(),
    )
    summary.set(
        input=args.input,
        output=args.output,
        model=args.model,
        precision=choice.backend.precision,
        backend=choice.backend.runtime,
        backend_choice={"how": choice.how, "seen": choice.seen},
        weights={"source": weights.source, "sha256": weights.sha256},
        images_per_second=round((outcome.embedded + outcome.failed) / seconds, 2) if seconds else None,
        **outcome.summary(),
    )
    summary.finish()
    storage.write_text(spark, f"{args.output}/_summary.json", summary.to_json())
    rows = [
        ("input", args.input),
        ("output", args.output),
        ("model", f"{args.model}, weights sha256 {weights.sha256[:12]}"),
        ("backend", choice.line()),
        ("images listed", len(plan.listing)),
        ("embedded", outcome.embedded),
        ("failed", outcome.failed),
        ("skipped (unchanged)", plan.skipped),
        ("removed from the input", len(plan.removed)),
        ("vanished before read", vanished),
        ("table rows", summary.data["counts"]["table_rows"]),
        ("seconds", f"{summary.data['seconds']['total']:.1f} total, {seconds:.1f} embedding"),
        ("images/s", summary.data["images_per_second"]),
    ]
    print_summary("embed summary", rows, outcome.lines())
    return outcome


def run(spark: SparkSession, args: argparse.Namespace) -> int:
    summary = RunSummary("embed", vars(args))
    prepared = prepare(spark, args, summary)
    written = embed_and_commit(spark, args, summary, *prepared)
    summarised(spark, args, summary, prepared, written).check(args.max_error_rate)
    return 0
