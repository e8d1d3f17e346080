"""embed, stage 2 (executors): decode each Arrow batch, run it through the chosen backend, L2-normalise."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from pyspark.sql import DataFrame
from pyspark.sql import functions as F
from pyspark.sql import types as T

from jobs.embed.plan import EMBEDDINGS_COLUMNS, EMBEDDINGS_SCHEMA
from jobs.embed.runtimes import Backend, Runner, load_on_executor
from jobs.filesystems import Location, path_on_filesystem
from jobs.imaging import CROP, ImageError, preprocess
from jobs.runlog import get_logger
from jobs.tables import fingerprint

log = get_logger("jobs.embed")

# what the executors return; modification time travels as microseconds so no timezone can shift it
_EMBEDDED_SCHEMA = T.StructType(
    [f for f in EMBEDDINGS_SCHEMA.fields if f.name not in ("modification_time", "weights_sha256", "fingerprint")]
    + [T.StructField("modification_us", T.LongType(), False)]
)


@dataclass(frozen=True)
class EmbedConfig:
    """What every executor needs to embed: serialisable, small; weights and backend travel in broadcasts."""

    model: str
    batch_size: int
    max_pixels: int
    log_every: int
    photos: Location | None = None  # where the tasks read the photos themselves; None: the rows carry their bytes


class Embedder:
    """One runner per Python worker process, reused by every task and batch that process runs."""

    _cache: dict[tuple[str, str, str, int], tuple[Runner, str]] = {}

    @classmethod
    def get(cls, config: EmbedConfig, sha256: str, weights: Any, backend: Any, threads: int) -> tuple[Runner, str]:
        chosen: Backend = backend.value
        key = (config.model, sha256, chosen.name, threads)
        if key not in cls._cache:
            # broadcasts load on first .value: the weights only where eager runs
            cls._cache[key] = load_on_executor(chosen, threads, lambda: weights.value, config.model)
        return cls._cache[key]


def _task_threads() -> int:
    """The task's cores (spark.task.cpus): two tasks never fight over a core."""
    from pyspark import TaskContext

    context = TaskContext.get()
    threads = max(1, context.cpus() if context is not None else 1)
    torch = sys.modules.get("torch")  # eager runs here: torch's pool is per process, set it for this task
    if torch is not None and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return threads


def embed_partition(
    batches: Iterator[pd.DataFrame], config: EmbedConfig, sha256: str, weights: Any, backend: Any
) -> Iterator[pd.DataFrame]:
    """Executor side: decode, preprocess and embed each Arrow batch; a bad file becomes an error row."""
    embed, running = Embedder.get(config, sha256, weights, backend, _task_threads())
    task_log = get_logger("jobs.embed.task")
    started, images, n_batches = time.perf_counter(), 0, 0
    spent = {"arrow": 0.0, "read": 0.0, "decode": 0.0, "model": 0.0}  # where the task's time goes, in its last log line
    crops = np.empty((config.batch_size, CROP, CROP, 3), dtype=np.uint8)  # decoded straight into one buffer
    photos = config.photos.filesystem() if config.photos else None
    mark = time.perf_counter()
    for batch in batches:
        spent["arrow"] += time.perf_counter() - mark
        mark = time.perf_counter()
        batch, contents = read_photos(photos, batch) if photos else (batch, batch["content"])
        spent["read"] += time.perf_counter() - mark
        n = len(batch)
        if n > len(crops):
            crops = np.empty((n, CROP, CROP, 3), dtype=np.uint8)
        ok_rows: list[int] = []
        widths, heights, errors = [None] * n, [None] * n, [None] * n
        boxes = batch[["x1", "y1", "x2", "y2"]].to_numpy()
        mark = time.perf_counter()
        for i, content in enumerate(contents):
            box = None if pd.isna(boxes[i, 0]) else tuple(float(v) for v in boxes[i])
            try:
                crops[len(ok_rows)], widths[i], heights[i] = preprocess(content, box, config.max_pixels)
            except ImageError as e:
                errors[i] = str(e)
                continue
            except Exception as e:  # never let one odd file kill the task
                errors[i] = f"{type(e).__name__}: {e}"[:200]
                continue
            ok_rows.append(i)
        spent["decode"] += time.perf_counter() - mark
        mark = time.perf_counter()
        vectors: list[Any] = [None] * n
        if ok_rows:
            for i, vector in zip(ok_rows, embed(crops[: len(ok_rows)])):
                vectors[i] = vector
        spent["model"] += time.perf_counter() - mark
        images += n
        n_batches += 1
        if config.log_every and n_batches % config.log_every == 0:
            task_log.info(
                "task %s: %d images, %.1f images/s", _task_id(), images, images / (time.perf_counter() - started)
            )
        yield _rows(batch, widths, heights, vectors, errors, config.model)
        mark = time.perf_counter()
    if images:
        rate = images / (time.perf_counter() - started)
        task_log.info(
            "task %s done: %d images, %.1f images/s, backend %s, seconds: %s, peak RSS %.0f MB",
            _task_id(),
            images,
            rate,
            running,
            ", ".join(f"{k} {v:.2f}" for k, v in spent.items()),
            _peak_rss_mb(),
        )


def read_photos(filesystem: Any, batch: pd.DataFrame) -> tuple[pd.DataFrame, list[bytes]]:
    """The batch's photos read here; photos gone since the listing are left out, as Spark's own reader leaves them."""
    contents, present = [], []
    for path in batch["path"]:
        try:
            with filesystem.open_input_file(path_on_filesystem(path)) as handle:
                contents.append(handle.read())
            present.append(True)
        except FileNotFoundError:
            present.append(False)
    return (batch if all(present) else batch[present].reset_index(drop=True)), contents


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _rows(batch: pd.DataFrame, widths: list, heights: list, vectors: list, errors: list, model: str) -> pd.DataFrame:
    """One output frame in the executors' schema."""
    return pd.DataFrame(
        {
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
        }
    )


def _task_id() -> str:
    from pyspark import TaskContext

    context = TaskContext.get()
    return f"{context.stageId()}.{context.partitionId()}" if context else "-"


def embed_images(files: DataFrame, config: EmbedConfig, sha256: str, weights: Any, backend: Any) -> DataFrame:
    """Files (path, content, plan columns) to rows of the embeddings contract; weights and backend are broadcasts."""
    with_ids = files.withColumn("image_id", F.sha1(F.col("path")))
    embedded = with_ids.mapInPandas(lambda it: embed_partition(it, config, sha256, weights, backend), _EMBEDDED_SCHEMA)
    return (
        embedded.withColumn("modification_time", F.timestamp_micros("modification_us"))
        .withColumn("weights_sha256", F.lit(sha256))
        .withColumn("fingerprint", fingerprint())
        .select(EMBEDDINGS_COLUMNS)
    )
