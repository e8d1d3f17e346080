"""search --images: query photos embedded inside the search job with the index's own model and weights."""

from __future__ import annotations

from dataclasses import dataclass

from pyspark import StorageLevel
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from jobs.embed.model import EmbedConfig, embed_images
from jobs.embed.plan import PLAN_COLUMNS, list_images, photo_location, read_files
from jobs.embed.runtimes import RUNTIMES, native_bf16
from jobs.errors import UsageError
from jobs.imaging import DEFAULT_MAX_PIXELS, IMAGE_EXTENSIONS
from jobs.ivf import Index
from jobs.labels import label_files
from jobs.runlog import get_logger
from jobs.search.queries import from_embeddings
from jobs.weights import Weights, load_weights

log = get_logger("jobs.search")
FAILURES_SHOWN = 5


@dataclass
class Photos:
    """The query photos of one search: their embedding rows (cached) and what became of them."""

    embedded: DataFrame  # rows of the embeddings contract, failures included
    listed: int
    weights: Weights

    def queries(self) -> DataFrame:
        return from_embeddings(self.embedded.where(F.col("embedding").isNotNull()))

    def failures(self) -> list[tuple[str, str]]:
        """(path, error) of the first photos that could not be embedded; bounded, whatever the input."""
        failed = (
            self.embedded.where(F.col("embedding").isNull())
            .select("path", "error")
            .orderBy("path")
            .limit(FAILURES_SHOWN)
        )
        return [(r["path"], r["error"]) for r in failed.collect()]

    def count_failed(self) -> int:
        return self.embedded.where(F.col("embedding").isNull()).count()


def index_weights(spark: SparkSession, index: Index, override: str | None) -> Weights:
    """The weights the index's vectors came from (index.json's source, or --weights), checked against its sha256."""
    source = override or index.manifest.weights_source
    expected = index.manifest.weights_sha256
    if not source and expected:
        raise UsageError(
            f"index {index.uri} does not say where its weights came from (sha256 {expected[:12]}); give --weights"
        )
    weights = load_weights(index.model, source, spark)
    if expected and weights.sha256 != expected:
        raise UsageError(
            f"weights {weights.source} have sha256 {weights.sha256[:12]} but index {index.uri} was built from "
            f"{expected[:12]}; "
            "give --weights with the file the catalog was embedded with"
        )
    return weights


def catalog_precision(index: Index) -> str:
    """The precision the catalog was embedded at, where this CPU runs it natively; else fp32, saying so."""
    precision = index.manifest.made_with("precision") or "fp32"
    if precision == "bf16" and not native_bf16():
        log.warning("the catalog was embedded in bf16; this CPU has no native bf16: query photos embedded in fp32")
        return "fp32"
    return precision


def embed_photos(
    spark: SparkSession, index: Index, uri: str, weights_override: str | None, batch_size: int = 32
) -> Photos:
    """Embed the photos at uri (a file, a folder or a glob; any Hadoop URI) on the executors, as the embed job would."""
    weights = index_weights(spark, index, weights_override)
    listing = list_images(spark, uri, list(IMAGE_EXTENSIONS))
    todo = listing.merge(label_files(listing["path"], None), on="path")[PLAN_COLUMNS]
    todo = todo.astype(object).where(todo.notna(), None)
    from jobs.embed.backends import choose_backend  # torch: the driver's only
    from jobs.embed.network import probe_crops

    threads = int(spark.conf.get("spark.task.cpus", "1") or 1)
    # the catalog's own runtime where it can run here: a photo in the catalog and among the queries gets one vector
    runtime = index.manifest.made_with("backend")
    runtime = runtime if runtime in RUNTIMES else "auto"
    choice = choose_backend(runtime, catalog_precision(index), index.model, weights, probe_crops, len(todo), threads)
    log.info(
        "embedding %d query photo(s) with %s on %s, weights sha256 %s",
        len(todo),
        index.model,
        choice.line(),
        weights.sha256[:12],
    )
    photos = photo_location(spark, todo["path"])
    config = EmbedConfig(index.model, batch_size, DEFAULT_MAX_PIXELS, 10, photos)
    spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", str(batch_size))
    context = spark.sparkContext
    embedded = embed_images(
        read_files(spark, todo, photos),
        config,
        weights.sha256,
        context.broadcast(weights.data),
        context.broadcast(choice.backend),
    )
    # the search reads the queries more than once: embed each photo once
    return Photos(embedded.persist(StorageLevel.MEMORY_AND_DISK), len(todo), weights)
