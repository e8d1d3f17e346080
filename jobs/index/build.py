"""index --mode overwrite: a new index from scratch.

Train the cells on a sample (train.py), give every row its cell and LSH keys, plan the groups of cells, write the
catalog sorted by group and cell with row groups cut at cell boundaries (layout.py, write.py), measure the default
nprobe (calibrate.py), then the cells and the manifest beside it; all in a folder beside the output, swapped in.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from datetime import datetime, timezone

from pyspark import StorageLevel
from pyspark.sql import SparkSession

from jobs import ivf, storage
from jobs.filesystems import location
from jobs.index import calibrate, layout, lsh, sources, train
from jobs.index.summary import built_rows
from jobs.ivf import CellPlan, IvfParams, write
from jobs.ivf.manifest import Manifest
from jobs.knn import LshParams
from jobs.runlog import RunSummary, get_logger, print_summary
from jobs.tables import FINGERPRINT, Embeddings

log = get_logger("jobs.index")
CALIBRATION_K = 10  # the recall@k the default nprobe is calibrated for


def provenance(spark: SparkSession, embeddings: str, table_sha256: str | None) -> dict:
    """How the vectors were made: the weights' sha256 (the table's own digest) and where its embed run got them, and
    the precision and runtime that run used.

    The embed run's summary is trusted only when its digest is the table's (or the table predates the digest
    column); search --images loads the same weights from it and embeds the way it says.
    """
    found = {"weights_sha256": table_sha256, "weights_source": None, "embedded_with": None}
    summary = f"{embeddings}/_summary.json"
    if not storage.exists(spark, summary):  # a table written by other tools: provenance is the digest alone
        return found
    recorded = json.loads(storage.read_text(spark, summary))
    weights = recorded.get("weights") or {}
    if table_sha256 and weights.get("sha256") != table_sha256:
        return found
    made = {k: recorded[k] for k in ("precision", "backend") if recorded.get(k)}
    return {"weights_sha256": weights.get("sha256"), "weights_source": weights.get("source"), "embedded_with": made}


def manifest(
    spark: SparkSession,
    args: argparse.Namespace,
    table: Embeddings,
    params: IvfParams,
    plan: CellPlan,
    measured: calibrate.Calibration | None,
    lsh_params: LshParams | None,
    files: list[dict],
) -> dict:
    """A new index's manifest: what it holds, how it was built and calibrated, its files and the table's it read."""
    sizes = plan.sizes
    return {
        "model": table.model,
        "dim": table.dim,
        "count": table.count,
        "default_method": "ivf",
        "source": args.embeddings,
        **provenance(spark, args.embeddings, table.weights_sha256),
        "ivf": asdict(params),
        "calibration": measured.report() if measured else None,
        "groups": plan.groups,
        "largest_cell": int(sizes.max()),
        "empty_cells": int((sizes == 0).sum()),
        "lsh": asdict(lsh_params) if lsh_params else None,
        "fingerprint": FINGERPRINT,
        "trained_rows": table.count,
        "added_since_training": 0,
        "training_largest_over_mean": round(float(sizes.max() / max(sizes.mean(), 1e-9)), 2),
        "files": files,
        "table_files": sources.recorded(place, table.files) if (place := location(spark, args.embeddings)) else None,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def build(
    spark: SparkSession, args: argparse.Namespace, table: Embeddings, lsh_params: LshParams | None, summary: RunSummary
) -> int:
    """A new index from scratch: train, assign, write, calibrate, swap in."""
    vectors, dim, count = table.rows, table.dim, table.count
    cells = min(args.cells or train.default_cells(count), count)
    sample = min(count, args.train_sample or max(32 * cells, 10_000))
    staged = storage.sibling(args.output, "staging")
    with summary.stage("train"):
        log.info("KMeans: %d cells from %d of %d vectors, %d iterations", cells, sample, count, args.kmeans_iterations)
        centroids = train.train_centroids(vectors, count, dim, cells, sample, args.kmeans_iterations, args.seed)
        projections = lsh.random_projections(dim, lsh_params, args.seed) if lsh_params else None
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
    meta = manifest(spark, args, table, params, plan, measured, lsh_params, files)
    ivf.save(spark, staged, meta, centroids, plan, projections)
    with summary.stage("commit"):
        storage.swap_in(spark, staged, args.output)
    summary.count(indexed=count)
    summary.set(index={k: v for k, v in meta.items() if k not in ("files", "table_files")})
    summary.finish()
    storage.write_text(spark, f"{args.output}/_summary.json", summary.to_json())
    rows = built_rows(args, Manifest.of(meta), params, measured, plan, sizes, lsh_params, summary)
    print_summary("index summary", rows)
    return 0
