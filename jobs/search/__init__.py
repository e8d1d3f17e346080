"""search: the k nearest catalog images of many queries in one Spark job, a kNN graph, or near-duplicate pairs.

Where the queries come from (queries.py, photos.py) -> how they are answered (plan.py cuts the work into tiles,
tiles.py runs them, every task the same kernel: stream.py) -> where the table goes (results.py). Queries and results
stay distributed tables from read to write.
"""

from __future__ import annotations

import argparse
import time

from pyspark.sql import SparkSession

from jobs import ivf, storage
from jobs.cli import session_settings
from jobs.errors import UsageError
from jobs.filesystems import SHIPPED, Location, location
from jobs.runlog import RunSummary, get_logger, print_summary
from jobs.search import catalog, groups, plan, queries, recall, results, tiles
from jobs.search import summary as summarised
from jobs.search.queries import Source
from jobs.search.scoring import Wanted

log = get_logger("jobs.search")
# a job whose work is all in Python: compiling its JVM operators and row projections (Janino, ~0.3 s of a task's start
# on 2 cores, before its Python worker is sent anything) costs more than interpreting the rows they pass on
DEFAULT_TARGET = 0.95  # for indexes built without calibration
PYTHON_JOB = {"spark.sql.codegen.wholeStage": "false", "spark.sql.codegen.factoryMode": "NO_CODEGEN"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--index", required=True, help="index folder written by the index job")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--queries", help="embeddings table of query images (embed run on a folder of queries)")
    source.add_argument(
        "--query-ids",
        help="comma-separated catalog images: image_id, path, or a unique end of a path (e.g. train/00001.jpg)",
    )
    source.add_argument(
        "--images",
        help="query photos: a file, a folder or a glob (local, s3a://, gs://); embedded here with the index's model "
        "and weights",
    )
    source.add_argument(
        "--all",
        action="store_true",
        help="every catalog image is a query: the kNN graph of the catalog (self excluded)",
    )
    source.add_argument(
        "--duplicates", action="store_true", help="every catalog pair with similarity >= --min-similarity, each once"
    )
    parser.add_argument("--output", required=True, help="neighbours table (or duplicate pairs) to write")
    parser.add_argument("-k", type=int, default=10, help="neighbours per query")
    add_method_arguments(parser)
    add_output_arguments(parser)


def add_method_arguments(parser: argparse.ArgumentParser) -> None:
    """How the queries are answered: the method, its cells and the recall it must reach."""
    parser.add_argument(
        "--method",
        choices=["ivf", "lsh", "exact"],
        help="ivf: probe the nearest cells (default); lsh: LSH buckets; exact: every row",
    )
    parser.add_argument(
        "--nprobe",
        type=int,
        help="ivf: cells each query probes (default: the fewest reaching --target-recall on a sample of the queries, "
        "where there are 100+; else the index's, calibrated when it was built)",
    )
    parser.add_argument(
        "--target-recall",
        type=float,
        help="ivf: the recall@k the default nprobe must reach on these queries, measured on a sample of them "
        "(default: the index's target, 0.95)",
    )
    parser.add_argument(
        "--recall-sample",
        type=int,
        help=f"ivf: queries whose exact answers measure this search's recall (default {recall.SAMPLE_QUERIES}, "
        f"down to {recall.FEWEST_SAMPLED} for the largest catalogs, "
        f"where there are at least {recall.MIN_QUERIES}: one extra pass over the catalog; 0: no estimate, and the "
        "index's nprobe unless --nprobe)",
    )


def add_output_arguments(parser: argparse.ArgumentParser) -> None:
    """Which neighbours count (self, pairs) and what the search writes beside its answers."""
    parser.add_argument(
        "--exclude-self", action="store_true", help="never return a query as its own neighbour (same image_id)"
    )
    parser.add_argument(
        "--min-similarity", type=float, help="with --duplicates: the cosine similarity a pair needs (e.g. 0.95)"
    )
    parser.add_argument(
        "--threshold", type=float, help="with --duplicates: a Euclidean distance instead (0.3 ~ cosine 0.955)"
    )
    parser.add_argument(
        "--groups",
        help="with --duplicates: also write the duplicate groups (connected components of the pairs) to this table",
    )
    parser.add_argument(
        "--weights",
        help="with --images: the checkpoint the catalog was embedded with (default: the one index.json names)",
    )
    parser.add_argument(
        "--report",
        help="also write the contact sheets and HTML gallery of the neighbours to this folder or URI, in the same job",
    )
    parser.add_argument(
        "--show",
        type=int,
        help="queries whose neighbours are printed on the console (default: 5 with --images or --query-ids, else 0)",
    )
    parser.add_argument(
        "--reader",
        choices=["auto", "direct", "spark"],
        default="auto",
        help="how the tasks reach the catalog: direct: they open its files with pyarrow (local, s3a/s3, gs); spark: "
        "Spark copies "
        "the catalog to every executor first (any Hadoop filesystem); auto: direct where pyarrow opens it",
    )


def check(args: argparse.Namespace, index: ivf.Index) -> None:
    if args.k < 1 or args.nprobe is not None and args.nprobe < 1:
        raise UsageError("-k and --nprobe must be at least 1")
    if args.target_recall is not None and not 0 < args.target_recall <= 1:
        raise UsageError("--target-recall is a recall in (0, 1], e.g. 0.95")
    if args.recall_sample is not None and args.recall_sample < 0:
        raise UsageError("--recall-sample is a number of queries, at least 0")
    if args.target_recall is not None and args.nprobe is not None:
        raise UsageError("give --target-recall or --nprobe, not both (--nprobe fixes the cells each query probes)")
    if not (args.queries or args.query_ids or args.images or args.all or args.duplicates):
        raise UsageError("give --images, --queries, --query-ids, --all or --duplicates")
    if args.report and args.duplicates:
        raise UsageError("--report draws neighbours; duplicate pairs have none (leave out --report)")
    if args.weights and not args.images:
        raise UsageError("--weights goes with --images (the other query sources are vectors already)")
    if args.duplicates and args.min_similarity is None and args.threshold is None:
        raise UsageError("--duplicates needs --min-similarity (a cosine, e.g. 0.95)")
    if args.duplicates and args.method == "lsh":
        raise UsageError("--duplicates searches with --method ivf or exact")
    if args.groups and not args.duplicates:
        raise UsageError("--groups needs --duplicates (groups are the connected components of the duplicate pairs)")
    if args.method == "lsh" and index.lsh is None:
        raise UsageError(
            f"index {index.uri} has no LSH keys (built with --num-hash-tables 0); use --method ivf or exact"
        )


def wanted(args: argparse.Namespace) -> Wanted:
    """What each query wants: k nearest, or (--duplicates) every row at least --min-similarity (--threshold is a
    Euclidean distance between unit vectors)."""
    similarity = None
    if args.duplicates:
        similarity = args.min_similarity if args.min_similarity is not None else 1 - args.threshold**2 / 2
    return Wanted(args.k, args.exclude_self or args.all or args.duplicates, similarity)


def query_source(spark: SparkSession, args: argparse.Namespace, index: ivf.Index, files: Location) -> Source:
    """Where this search's queries come from."""
    if args.images:
        from jobs.search import photos  # imports torch: only a photo search pays for it

        found = photos.embed_photos(spark, index, args.images, args.weights)
        failed = found.failures()
        for path, error in failed:
            log.warning("query photo %s could not be embedded: %s", path, error)
        if failed and found.count_failed() == found.listed:
            raise UsageError(
                f"none of the {found.listed} photo(s) at {args.images} could be embedded (first: {failed[0][0]}: "
                f"{failed[0][1]})"
            )
        return Source(found.listed, frame=found.queries())
    if args.all or args.duplicates:
        return queries.catalog_source(spark, index, files)
    if args.queries:
        return queries.table_source(spark, args.queries, index.dim)
    return queries.ids_source(spark, index, files, [i.strip() for i in args.query_ids.split(",") if i.strip()])


def measure(
    spark: SparkSession, args: argparse.Namespace, index: ivf.Index, source: Source, files: Location, asked: Wanted
) -> recall.Estimate | None:
    """This search's recall on a sample of its queries, and (unless --nprobe) the nprobe that meets the target; None
    where every cell is probed anyway, for the exact and LSH methods, and for fewer than MIN_QUERIES queries unless
    --recall-sample asks (the sample's pass reads the whole catalog: a few queries read a few cells)."""
    if args.method != "ivf" or (args.nprobe or 0) >= index.cells or args.recall_sample == 0:
        return None
    target = args.target_recall or index.manifest.target_recall or DEFAULT_TARGET
    with session_settings(spark, PYTHON_JOB):
        measured = recall.estimate(
            spark,
            index,
            source,
            files,
            asked,
            args.nprobe,
            target,
            args.recall_sample,
            least=0 if args.recall_sample else recall.MIN_QUERIES,
        )
    if measured:
        log.info("recall@%d %s", args.k, measured.line())
        if measured.warning():
            log.warning(measured.warning())
    return measured


def find(
    spark: SparkSession,
    args: argparse.Namespace,
    index: ivf.Index,
    source: Source,
    files: Location,
    output: Location | None | str = "",
) -> tuple[tiles.Found, recall.Estimate | None, int | None]:
    """Every query of source answered as args ask (nothing runs until its answers are written or read), the recall
    measured on a sample of them, and the nprobe chosen (None: args' or the index's); output as plan.make takes it."""
    asked = wanted(args)
    measured = measure(spark, args, index, source, files, asked)
    nprobe = measured.nprobe if measured else args.nprobe
    return answer(spark, index, source, args.method, asked, nprobe, files, output), measured, nprobe


def answer(
    spark: SparkSession,
    index: ivf.Index,
    source: Source,
    method: str,
    wanted: Wanted,
    nprobe: int | None,
    files: Location,
    output: Location | None | str = "",
) -> tiles.Found:
    """Every query of source answered by `method` (nprobe: ivf's cells a query probes; None: the index's), as
    planned for its size; output: where they are to be written (plan.make)."""
    k = wanted.k if wanted.min_similarity is None else None
    cores = spark.sparkContext.defaultParallelism
    planned = plan.make(
        index, method, nprobe, source.count, k, cores, files, source.files is not None, source.from_catalog, output
    )
    log.info("about %d queries: %s", source.count, planned.describe())
    return tiles.search(spark, index, source, planned, files, wanted)


def search_and_write(
    spark: SparkSession, args: argparse.Namespace, index: ivf.Index
) -> tuple[tiles.Found, recall.Estimate | None, int | None, int, dict, float]:
    """Answer the queries args name and write the answers: what was found, the recall estimate, the nprobe chosen,
    the rows written, what the tasks touched and the seconds it took."""
    started = time.perf_counter()
    files = catalog.locate(spark, index, args.reader)
    source = query_source(spark, args, index, files)
    found, measured, nprobe = find(spark, args, index, source, files, location(spark, args.output))
    answers = results.Answers(results.duplicate_pairs(found.answers.table)) if args.duplicates else found.answers

    def checked() -> None:
        seen = found.seen.value
        if source.checked:
            queries.check_seen(source.checked, index, seen.queries, seen.dims, seen.models, seen.digests)

    with session_settings(spark, PYTHON_JOB):
        written = results.write(spark, answers, args.output, found.plan.answers_by_tasks, checked)
    touched = {**found.touched(index), "reader": "copies shipped by Spark" if files.kind == SHIPPED else "executors"}
    seconds = time.perf_counter() - started
    if args.duplicates:
        touched.update(groups.duplicate_stats(spark, args.output, args.groups))
    return found, measured, nprobe, written, touched, seconds


def run(spark: SparkSession, args: argparse.Namespace) -> int:
    summary = RunSummary("search", vars(args))
    index = ivf.load(spark, args.index)
    args.method = args.method or index.manifest.default_method
    check(args, index)
    asked = wanted(args)
    if args.k > index.count - (1 if asked.exclude_self else 0):
        log.warning(
            "-k %d is more than the catalog of %d images holds: every query gets all of them", args.k, index.count
        )
    with summary.stage("search"):
        found, measured, nprobe, written, touched, seconds = search_and_write(spark, args, index)
    count = found.seen.value.queries
    summary.count(
        queries=count,
        rows=written,
        catalog=index.count,
        **{
            k: v
            for k, v in touched.items()
            if k in ("lsh_fallback_queries", "images_with_pairs", "groups", "largest_group")
        },
    )
    nprobe = nprobe or index.params.nprobe
    summary.set(
        index=args.index,
        method=args.method,
        k=args.k,
        nprobe=nprobe if args.method == "ivf" else None,
        touched=touched,
        recall_estimate=measured.report() if measured else None,
        queries_per_second=round(count / seconds, 2) if seconds else None,
    )
    summary.finish()
    storage.write_text(spark, f"{args.output}/_summary.json", summary.to_json())
    rows = summarised.rows(args, index, nprobe, measured, count, written, touched, summary, seconds)
    print_summary("search summary", rows, [measured.warning()] if measured and measured.warning() else None)
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
