"""index: embeddings table -> IVF index (Spark ML KMeans cells, catalog stored clustered by cell) + LSH hash keys.

Stages: read the embeddings, train the cells on a sample (train.py), assign every row its cell and
LSH keys, plan the groups of cells that search tasks score, write the catalog sorted by group and
cell, row groups cut at cell boundaries (layout.py, write.py), then index.json + cells.npz beside it.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from datetime import datetime, timezone

from pyspark import StorageLevel
from pyspark.sql import SparkSession

from jobs import ivf, storage
from jobs.errors import UsageError
from jobs.index import calibrate, layout, lsh, train, write
from jobs.ivf import CellPlan, IvfParams
from jobs.knn import LshParams
from jobs.runlog import RunSummary, get_logger, print_summary
from jobs.tables import read_embeddings

log = get_logger("jobs.index")
MAX_GROUP_ROWS = 50_000
CALIBRATION_K = 10  # the recall@k the default nprobe is calibrated for


def add_arguments(parser: argparse.ArgumentParser) -> None:
    lsh_defaults = LshParams()
    parser.add_argument("--embeddings", required=True, help="embeddings table written by embed")
    parser.add_argument("--output", required=True, help="index folder (replaced atomically on re-runs)")
    parser.add_argument("--cells", type=int, help="IVF cells (KMeans k); default about 4 x sqrt(vectors)")
    parser.add_argument(
        "--nprobe",
        type=int,
        help="cells a query probes by default at search time; default: the smallest that reaches --target-recall",
    )
    parser.add_argument(
        "--target-recall",
        type=float,
        default=0.95,
        help="recall@10 the default nprobe must reach on a sample of the catalog's own rows (self excluded), "
        "measured here",
    )
    parser.add_argument(
        "--calibration-sample",
        type=int,
        default=1000,
        help="catalog rows the default nprobe is measured on (0: about 2.25 x sqrt(cells), unmeasured)",
    )
    parser.add_argument(
        "--train-sample", type=int, help="vectors KMeans trains on; default 32 per cell, at least 10,000"
    )
    parser.add_argument("--kmeans-iterations", type=int, default=10, help="KMeans maxIter")
    parser.add_argument(
        "--max-group-rows",
        type=int,
        default=MAX_GROUP_ROWS,
        help="most catalog rows one search task holds (bigger cells are split)",
    )
    parser.add_argument(
        "--bucket-length",
        type=float,
        default=lsh_defaults.bucket_length,
        help="LSH: BRP bucketLength; with unit vectors 1.0 gives two buckets per hash (a sign bit)",
    )
    parser.add_argument(
        "--num-hash-tables",
        type=int,
        default=lsh_defaults.tables,
        help="LSH tables a query probes (OR); 0 builds no LSH keys",
    )
    parser.add_argument(
        "--hashes-per-table",
        type=int,
        default=lsh_defaults.hashes_per_table,
        help="LSH: Spark hash functions ANDed into one table's bucket key",
    )
    parser.add_argument(
        "--probes",
        type=int,
        default=lsh_defaults.probes,
        help="LSH: neighbouring buckets probed per table at search time",
    )
    parser.add_argument("--seed", type=int, default=42, help="random seed of the KMeans sample and the hash functions")


def check(args: argparse.Namespace) -> LshParams | None:
    if args.cells is not None and args.cells < 1 or args.nprobe is not None and args.nprobe < 1:
        raise UsageError("--cells and --nprobe must be at least 1")
    if not 0 < args.target_recall <= 1 or args.calibration_sample < 0:
        raise UsageError("--target-recall is a recall in (0, 1] and --calibration-sample at least 0")
    if args.train_sample is not None and args.train_sample < 1 or args.kmeans_iterations < 1 or args.max_group_rows < 1:
        raise UsageError("--train-sample, --kmeans-iterations and --max-group-rows must be at least 1")
    if args.num_hash_tables == 0:
        return None
    params = LshParams(args.bucket_length, args.num_hash_tables, args.hashes_per_table, args.probes)
    if min(params.tables, params.hashes_per_table) < 1 or params.probes < 0 or params.bucket_length <= 0:
        raise UsageError(
            "--num-hash-tables and --hashes-per-table must be >= 1 (or tables 0: no LSH), --probes >= 0, "
            "--bucket-length > 0"
        )
    if params.hashes_per_table > 64:
        raise UsageError("--hashes-per-table is at most 64")
    return params


def weights_provenance(spark: SparkSession, embeddings: str, table_sha256: str | None) -> tuple[str | None, str | None]:
    """(sha256, source) of the weights the vectors came from: the table's own digest, and where its embed run got them.

    The source comes from the embed run's summary, trusted only when its digest is the table's (or the
    table predates the digest column); search --images loads the same weights from it.
    """
    summary = f"{embeddings}/_summary.json"
    if not storage.exists(spark, summary):  # a table written by other tools: provenance is the digest alone
        return table_sha256, None
    recorded = json.loads(storage.read_text(spark, summary)).get("weights") or {}
    if table_sha256 and recorded.get("sha256") != table_sha256:
        return table_sha256, None
    return recorded.get("sha256"), recorded.get("source")


def calibration_line(measured: calibrate.Calibration | None, nprobe: int, given: bool) -> str:
    if measured is None:
        return "no (about 2.25 x sqrt(cells))" if not given else "no (--nprobe given)"
    at = measured.recall[min(nprobe, len(measured.recall)) - 1]
    chosen = "given" if given else f"the smallest reaching {measured.target:g}"
    return (
        f"recall@{measured.k} {at:.3f} at nprobe {nprobe} ({chosen}) on {measured.sample} catalog rows, self excluded"
    )


def run(spark: SparkSession, args: argparse.Namespace) -> int:
    lsh_params = check(args)
    summary = RunSummary("index", vars(args))
    with summary.stage("read"):
        table = read_embeddings(spark, args.embeddings, "embeddings table", distinct_ids=True)
        vectors, model_name, dim, count = table.rows, table.model, table.dim, table.count
        if table.distinct_ids != count:
            raise UsageError(
                f"embeddings table {args.embeddings} has repeated image_id values; re-embed with --mode overwrite"
            )
    cells = min(args.cells or train.default_cells(count), count)
    sample = min(count, args.train_sample or max(32 * cells, 10_000))
    staged = storage.sibling(args.output, "staging")
    with summary.stage("train"):
        log.info("KMeans: %d cells from %d of %d vectors, %d iterations", cells, sample, count, args.kmeans_iterations)
        centroids = train.train_centroids(vectors, count, cells, sample, args.kmeans_iterations, args.seed)
        projections = lsh.fit_and_save(vectors, lsh_params, args.seed, f"{staged}/model") if lsh_params else None
    with summary.stage("assign"):
        # read twice (cell sizes, then the write); on disk, because heap-cached columnar batches of
        # float32 vectors ran a 4g driver out of memory at 1M x 512
        assigned = layout.assign_cells(vectors, centroids, (projections, lsh_params) if lsh_params else None).persist(
            StorageLevel.DISK_ONLY
        )
        sizes = layout.cell_sizes(assigned, len(centroids))
        parallelism = spark.sparkContext.defaultParallelism
        plan = CellPlan.build(
            sizes, max(1, min(args.max_group_rows, -(-count // (2 * parallelism))))
        )  # about two groups per core
    with summary.stage("write"):
        files = write.write_catalog(
            spark, layout.clustered(spark, assigned, plan, dim, parallelism), f"{staged}/catalog", dim
        )
    measured = None
    if args.calibration_sample and count > CALIBRATION_K:
        with summary.stage("calibrate"):
            measured = calibrate.calibrate(
                assigned, centroids, count, args.target_recall, args.calibration_sample, CALIBRATION_K, args.seed
            )
    assigned.unpersist()
    nprobe = args.nprobe or (measured.nprobe if measured else train.default_nprobe(len(centroids)))
    params = IvfParams(len(centroids), nprobe, sample, args.kmeans_iterations, args.max_group_rows, args.seed)
    sha256, weights_source = weights_provenance(spark, args.embeddings, table.weights_sha256)
    meta = {
        "model": model_name,
        "dim": dim,
        "count": count,
        "default_method": "ivf",
        "source": args.embeddings,
        "weights_sha256": sha256,
        "weights_source": weights_source,
        "ivf": asdict(params),
        "calibration": measured.report() if measured else None,
        "groups": plan.groups,
        "largest_cell": int(sizes.max()),
        "empty_cells": int((sizes == 0).sum()),
        "lsh": asdict(lsh_params) if lsh_params else None,
        "files": files,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    ivf.save(spark, staged, meta, centroids, plan)
    with summary.stage("commit"):
        storage.swap_in(spark, staged, args.output)
    summary.count(indexed=count)
    summary.set(index={k: v for k, v in meta.items() if k != "files"})
    summary.finish()
    storage.write_text(spark, f"{args.output}/_summary.json", summary.to_json())
    print_summary(
        "index summary",
        [
            ("embeddings", args.embeddings),
            ("index", args.output),
            ("model", f"{model_name}, {dim}-d"),
            ("vectors indexed", count),
            (
                "IVF",
                f"{params.cells} cells (KMeans on {sample} vectors, {params.iterations} iterations), default nprobe "
                f"{params.nprobe}",
            ),
            ("calibrated", calibration_line(measured, params.nprobe, args.nprobe is not None)),
            (
                "layout",
                f"{plan.groups} groups in {len(files)} files; largest cell {int(sizes.max())} rows, "
                f"{int((sizes == 0).sum())} cells empty",
            ),
            (
                "LSH",
                f"{lsh_params.tables} tables x {lsh_params.hashes_per_table} hashes, bucketLength "
                f"{lsh_params.bucket_length:g}, {lsh_params.probes} probes"
                if lsh_params
                else "none",
            ),
            ("seconds", " ".join(f"{k} {v:.1f}" for k, v in summary.data["seconds"].items())),
        ],
    )
    return 0
