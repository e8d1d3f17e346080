"""index: embeddings table -> IVF index (Spark ML KMeans cells, catalog stored clustered by cell) + LSH hash keys.

From scratch (build.py), or an existing index brought up to date with its table (update.py).
"""

from __future__ import annotations

import argparse

from pyspark.sql import SparkSession

from jobs import ivf, storage
from jobs.errors import UsageError
from jobs.index import update
from jobs.index.build import build
from jobs.index.summary import updated_rows
from jobs.knn import LshParams
from jobs.runlog import RunSummary, get_logger, print_summary
from jobs.tables import read_embeddings

log = get_logger("jobs.index")
MAX_GROUP_ROWS = 50_000


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--embeddings", required=True, help="embeddings table written by embed")
    parser.add_argument("--output", required=True, help="index folder (replaced atomically on re-runs)")
    parser.add_argument(
        "--mode",
        choices=["overwrite", "incremental", "auto"],
        default="overwrite",
        help="overwrite: build from scratch; incremental: bring an existing index up to date with the table (new rows "
        "to their cells, gone or changed rows deleted) without retraining; auto: incremental unless the catalog has "
        "drifted from its cells, then a rebuild",
    )
    add_ivf_arguments(parser)
    add_lsh_arguments(parser)


def add_ivf_arguments(parser: argparse.ArgumentParser) -> None:
    """The cells: how many, how they are trained, and the nprobe a search uses by default."""
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


def add_lsh_arguments(parser: argparse.ArgumentParser) -> None:
    """The LSH keys kept beside the cells, and the seed of the sample and the hashes."""
    lsh_defaults = LshParams()
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


def run(spark: SparkSession, args: argparse.Namespace) -> int:
    lsh_params = check(args)
    summary = RunSummary("index", vars(args))
    if args.mode != "overwrite" and (
        ivf.versions(spark, args.output) or storage.exists(spark, f"{args.output}/index.json")
    ):
        index = ivf.load(spark, args.output)
        done = update.update(spark, index, args.embeddings, summary, auto=args.mode == "auto")
        if done is not None:
            after = ivf.load(spark, args.output) if not done.nothing else index
            summary.count(added=done.added, dropped=done.dropped, changed=done.changed, indexed=after.count)
            summary.set(
                version=after.manifest.version,
                drift=done.drift,
                files_compacted=done.files_compacted,
                compared=done.compared,
            )
            summary.finish()
            if not done.nothing:
                storage.write_text(spark, f"{args.output}/_summary.json", summary.to_json())
            print_summary("index summary", updated_rows(args, after, done, summary))
            return 0
        log.info("the catalog has drifted from its cells: rebuilding (--mode auto)")
    with summary.stage("read"):
        table = read_embeddings(spark, args.embeddings, "embeddings table", distinct_ids=True, files=True)
    return build(spark, args, table, lsh_params, summary)
