"""search: the k nearest catalog images of many queries in one Spark job, a kNN graph, or near-duplicate pairs.

Queries and results stay distributed tables. ivf (the default) sends each query to the cells it probes
and scores only their rows (cells.py); exact and lsh scan the whole catalog once per block of queries
(scan.py); both merge per-query top-k in Spark and write from the executors (results.py).
"""

from __future__ import annotations

import argparse
import time

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from jobs import ivf, storage
from jobs.cli import session_setting
from jobs.errors import UsageError
from jobs.filesystems import Location
from jobs.runlog import RunSummary, get_logger, print_summary
from jobs.search import cells, direct, groups, itself, local, queries, results, scan

log = get_logger("jobs.search")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--index", required=True, help="index folder written by the index job")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--queries", help="embeddings table of query images (embed run on a folder of queries)")
    source.add_argument("--query-ids", help="comma-separated catalog images: image_id, path, or a unique end of a path (e.g. train/00001.jpg)")
    source.add_argument("--images", help="query photos: a file, a folder or a glob (local, s3a://, gs://); embedded here with the index's model and weights")
    source.add_argument("--all", action="store_true", help="every catalog image is a query: the kNN graph of the catalog (self excluded)")
    source.add_argument("--duplicates", action="store_true", help="every catalog pair with similarity >= --min-similarity, each once (ivf: in the cells each image probes; exact: all)")
    parser.add_argument("--output", required=True, help="neighbours table (or duplicate pairs) to write")
    parser.add_argument("-k", type=int, default=10, help="neighbours per query")
    parser.add_argument("--method", choices=["ivf", "lsh", "exact"], help="ivf: probe the nearest cells (default); lsh: LSH buckets; exact: brute force")
    parser.add_argument("--nprobe", type=int, help="ivf: cells each query probes (default: the index's)")
    parser.add_argument("--exclude-self", action="store_true", help="never return a query as its own neighbour (same image_id)")
    parser.add_argument("--min-similarity", type=float, help="with --duplicates: the cosine similarity a pair needs (e.g. 0.95)")
    parser.add_argument("--threshold", type=float, help="with --duplicates: a Euclidean distance instead (0.3 ~ cosine 0.955)")
    parser.add_argument("--groups", help="with --duplicates: also write the duplicate groups (connected components of the pairs) to this table")
    parser.add_argument("--weights", help="with --images: the checkpoint the catalog was embedded with (default: the one index.json names)")
    parser.add_argument("--report", help="also write the contact sheets and HTML gallery of the neighbours to this folder or URI, in the same job")
    parser.add_argument("--show", type=int, help="queries whose neighbours are printed on the console (default: 5 with --images or --query-ids, else 0)")
    parser.add_argument("--reader", choices=["auto", "direct", "spark"], default="auto",
                        help="ivf: direct: the executors read the probed row groups with pyarrow (local, s3a/s3, gs) and only queries are "
                             "shuffled; spark: Spark reads the probed cells and shuffles them (any Hadoop filesystem); auto: direct where pyarrow opens the catalog")
    parser.add_argument("--query-block", type=int, default=4096, help="exact and lsh: queries broadcast per scan of the catalog")


def check(args: argparse.Namespace, index: ivf.Index) -> None:
    if args.k < 1:
        raise UsageError("-k must be at least 1")
    if args.query_block < 1 or args.nprobe is not None and args.nprobe < 1:
        raise UsageError("--query-block and --nprobe must be at least 1")
    if not (args.queries or args.query_ids or args.images or args.all or args.duplicates):
        raise UsageError("give --images, --queries, --query-ids, --all or --duplicates")
    if args.report and args.duplicates:
        raise UsageError("--report draws neighbours; duplicate pairs have none (leave out --report)")
    if args.weights and not args.images:
        raise UsageError("--weights goes with --images (the other query sources are vectors already)")
    if args.duplicates and args.min_similarity is None and args.threshold is None:
        raise UsageError("--duplicates needs --min-similarity (a cosine, e.g. 0.95)")
    if args.groups and not args.duplicates:
        raise UsageError("--groups needs --duplicates (groups are the connected components of the duplicate pairs)")
    if args.method == "lsh" and index.lsh is None:
        raise UsageError(f"index {index.uri} has no LSH keys (built with --num-hash-tables 0); use --method ivf or exact")


def query_table(spark: SparkSession, args: argparse.Namespace, index: ivf.Index) -> tuple[DataFrame | queries.QueryFiles | None, int]:
    """The queries, and about how many there are (at most: a queries table's bytes over a vector's), without counting them;
    an IVF search's queries table as the files its tasks can read themselves, where they can."""
    if args.images:
        from jobs.search import photos  # imports torch: only a photo search pays for it

        found = photos.embed_photos(spark, index, args.images, args.weights)
        failed = found.failures()
        for path, error in failed:
            log.warning("query photo %s could not be embedded: %s", path, error)
        if failed and found.count_failed() == found.listed:
            raise UsageError(f"none of the {found.listed} photo(s) at {args.images} could be embedded (first: {failed[0][0]}: {failed[0][1]})")
        return found.queries(), found.listed
    if args.all or args.duplicates:
        return (None if uses_cells(args) else queries.from_catalog(spark, index)), index.count  # run_ivf reads the catalog itself
    if args.queries:  # IVF's probe pass checks the queries as it assigns them; a scan checks them first
        if not uses_cells(args):
            return queries.from_table(spark, args.queries, index), 0
        listed = queries.QueryFiles.listed(spark, args.queries)
        if listed is not None:
            return listed, listed.rows
        return queries.unchecked_from_table(spark, args.queries), queries.estimated_count(spark, args.queries, index.dim)
    names = [i.strip() for i in args.query_ids.split(",") if i.strip()]
    return queries.from_ids(spark, index, names), len(names)


def min_similarity(args: argparse.Namespace) -> float | None:
    """The cosine a duplicate pair needs (--threshold is a Euclidean distance between unit vectors)."""
    if not args.duplicates:
        return None
    return args.min_similarity if args.min_similarity is not None else 1 - args.threshold**2 / 2


def uses_cells(args: argparse.Namespace) -> bool:
    return args.method == "ivf" or args.duplicates


def run_ivf(spark: SparkSession, index: ivf.Index, table: DataFrame | queries.QueryFiles | None, estimate: int, args: argparse.Namespace, exclude_self: bool) -> tuple[int, int, dict]:
    """(queries, rows written, what was touched) of an IVF search."""
    nprobe = index.cells if args.method == "exact" else args.nprobe or index.params.nprobe
    wanted = cells.Wanted(args.k, exclude_self, min_similarity(args))
    files = direct.chosen(spark, index, args.reader) if table is None and nprobe < index.cells else None
    if files:  # the catalog against itself, file by file: nothing shuffled
        catalog = itself.search(spark, index, files, nprobe, wanted)
        log.info("the catalog against itself: %d rows in %d files, one task per file streaming the catalog's probed cells; each row probes %d of %d cells",
                 index.count, len(index.meta["files"]), nprobe, index.cells)
        written = results.write(spark, results.duplicate_pairs(catalog.found) if args.duplicates else catalog.found, args.output)
        touched, count = catalog.touched(), catalog.seen.value.queries
    else:
        count, written, touched = run_probed(spark, index, table if table is not None else queries.from_catalog(spark, index), estimate, args, nprobe, wanted)
    if args.duplicates:
        touched.update(duplicate_stats(spark, args))
    return count, written, touched


def run_probed(spark: SparkSession, index: ivf.Index, table: DataFrame | queries.QueryFiles, estimate: int, args: argparse.Namespace, nprobe: int,
               wanted: cells.Wanted) -> tuple[int, int, dict]:
    """An IVF search of a queries table: answered in the queries' own tasks where that reads little (local.py),
    otherwise a probe pass, then the probed shards' tasks, then the top-k merge (cells.py)."""
    files = direct.chosen(spark, index, args.reader)
    if files and not (args.all or args.duplicates) and local.fits(spark, index, estimate, nprobe):
        return run_local(spark, index, files, table, estimate, args, nprobe, wanted)
    if isinstance(table, queries.QueryFiles):  # the probe pass reads them with Spark
        table = queries.unchecked_from_table(spark, args.queries)
    # the whole catalog as queries: written beside the output rather than cached in memory
    spill = storage.sibling(args.output, "probes") if args.all or args.duplicates else None
    searched = cells.search(spark, index, queries.spread(spark, table, estimate, index.dim), nprobe, wanted, args.reader, spill)
    seen = searched.seen
    if args.queries:
        queries.check_seen(args.queries, index, seen.queries, seen.dims, seen.models, seen.digests)
    log.info("probing %d of %d cells in %d of %d catalog files (read by %s)", searched.planned["cells_probed"], index.cells,
             searched.planned["catalog_files_read"], searched.planned["catalog_files"], searched.planned["reader"])
    found = results.duplicate_pairs(searched.partials) if args.duplicates else searched.top_k(args.k).select(*results.NEIGHBOUR_COLUMNS)
    try:
        written = results.write(spark, found, args.output)
    finally:
        searched.release()
    return seen.queries, written, searched.touched()


def run_local(spark: SparkSession, index: ivf.Index, files: Location, table: DataFrame | queries.QueryFiles, estimate: int, args: argparse.Namespace, nprobe: int,
              wanted: cells.Wanted) -> tuple[int, int, dict]:
    """local.py's search, its queries checked (as the probe pass would) before its output is swapped in."""
    searched = local.search(spark, index, files, table, estimate, nprobe, wanted)

    def check() -> None:
        seen = searched.seen.value
        if args.queries:
            queries.check_seen(args.queries, index, seen.queries, seen.dims, seen.models, seen.digests)

    # one short job whose work is all in Python: compiling its few JVM operators costs more than it saves (1M x 512-d,
    # 1,000 queries on 2 cores: 3.9 -> 3.7 s of search)
    with session_setting(spark, "spark.sql.codegen.wholeStage", "false"):
        written = results.write(spark, searched.found.select(*results.NEIGHBOUR_COLUMNS), args.output, check)
    touched = searched.touched()
    log.info("probed %d of %d cells in %d of %d catalog files, in the queries' own tasks", touched["cells_probed"], index.cells,
             touched["catalog_files_read"], touched["catalog_files"])
    return searched.seen.value.queries, written, touched


def duplicate_stats(spark: SparkSession, args: argparse.Namespace) -> dict:
    """Images with at least one pair and, with --groups, the groups table written and its shape."""
    pairs = spark.read.parquet(args.output)
    if not args.groups:
        return {"images_with_pairs": groups.edges(pairs).select("node").distinct().count()}
    results.write(spark, groups.group_table(pairs), args.groups)
    shape = spark.read.parquet(args.groups).agg(F.count("*").alias("images"), F.countDistinct("group_id").alias("groups"),
                                                 F.max("group_size").alias("largest")).first()
    return {"images_with_pairs": shape["images"], "groups": shape["groups"], "largest_group": shape["largest"] or 0}


def run_scan(spark: SparkSession, index: ivf.Index, table: DataFrame, args: argparse.Namespace, exclude_self: bool) -> tuple[int, int, dict]:
    """(queries, rows written, fallbacks) of an exact or LSH search, one catalog scan per query block."""
    staged = storage.sibling(args.output, "staging")
    answered, fallback = 0, 0
    for block in scan.blocks(table, args.query_block):
        ranked, shipped, short = scan.answer_block(spark, index, block, args.method, args.k, exclude_self, args.reader)
        ranked.select(*results.NEIGHBOUR_COLUMNS).write.mode("append").parquet(staged)
        for broadcast in shipped:
            broadcast.destroy()
        answered, fallback = answered + len(block), fallback + short
        log.info("%d queries answered", answered)
    if not answered:
        spark.createDataFrame([], results.NEIGHBOURS_SCHEMA).write.parquet(staged)
    storage.swap_in(spark, staged, args.output)
    return answered, spark.read.parquet(args.output).count(), {"lsh_fallback_queries": fallback} if args.method == "lsh" else {}


def run(spark: SparkSession, args: argparse.Namespace) -> int:
    summary = RunSummary("search", vars(args))
    index = ivf.load(spark, args.index)
    args.method = args.method or index.meta.get("default_method", "ivf")
    check(args, index)
    exclude_self = args.exclude_self or args.all or args.duplicates
    if args.k > index.count - (1 if exclude_self else 0):
        log.warning("-k %d is more than the catalog of %d images holds: every query gets all of them", args.k, index.count)
    with summary.stage("search"):
        started = time.perf_counter()
        table, estimate = query_table(spark, args, index)
        if uses_cells(args):
            count, written, touched = run_ivf(spark, index, table, estimate, args, exclude_self)
        else:
            count, written, touched = run_scan(spark, index, table, args, exclude_self)
        seconds = time.perf_counter() - started
    summary.count(queries=count, rows=written, catalog=index.count,
                  **{k: v for k, v in touched.items() if k in ("lsh_fallback_queries", "images_with_pairs", "groups", "largest_group")})
    summary.set(index=args.index, method=args.method, k=args.k, nprobe=args.nprobe or index.params.nprobe if args.method == "ivf" else None,
                touched=touched, queries_per_second=round(count / seconds, 2) if seconds else None)
    summary.finish()
    storage.write_text(spark, f"{args.output}/_summary.json", summary.to_json())
    method = args.method + (f", nprobe {args.nprobe or index.params.nprobe} of {index.cells} cells" if args.method == "ivf" else "")
    rows = [
        ("index", f"{args.index} ({index.count} images, {index.model})"),
        ("queries", count), ("method", f"{method}, k={args.k}" + (", excluding self" if exclude_self else "")),
        ("duplicate pairs" if args.duplicates else "neighbour rows", written), ("output", args.output),
        ("seconds", f"{summary.data['seconds']['total']:.1f} total, {seconds:.1f} searching ({summary.data['queries_per_second']} queries/s)"),
    ]
    if args.method == "ivf":
        rows.append(("read", f"{touched['catalog_bytes_read'] / 2**20:.1f} of {touched['catalog_bytes'] / 2**20:.1f} MiB in {touched['catalog_files_read']} of "
                             f"{touched['catalog_files']} catalog files (by {touched['reader']}{', ' + touched['plan'] if 'plan' in touched else ''}), {touched['cells_probed']} of {touched['cells']} cells "
                             f"({touched['catalog_rows_scanned']} of {touched['catalog_rows']} rows)"))
    if args.duplicates:
        rows.append(("images with a pair", touched["images_with_pairs"]))
    if args.groups:
        rows.append(("duplicate groups", f"{touched['groups']} groups, largest {touched['largest_group']} images -> {args.groups}"))
    if args.method == "lsh":
        rows.append(("lsh fallbacks", f"{touched['lsh_fallback_queries']} queries had < k candidates and were answered exactly"))
    print_summary("search summary", rows)
    show = args.show if args.show is not None else 5 if args.images or args.query_ids else 0
    if show and not (args.all or args.duplicates):
        print(results.console_table(spark.read.parquet(args.output), show), flush=True)
    if args.report:
        write_report(spark, args.output, args.report)
    return 0


def write_report(spark: SparkSession, neighbours: str, output: str) -> None:
    """The report job on the table just written, in this session (no second JVM); its defaults otherwise."""
    from jobs import report

    parser = argparse.ArgumentParser(prog="search --report")
    report.add_arguments(parser)
    report.run(spark, parser.parse_args(["--neighbours", neighbours, "--output", output]))
