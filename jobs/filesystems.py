"""Files the executors open themselves with pyarrow (local, S3 through the s3a settings, GCS): where a Spark URI
lives, and folders the tasks write a file each into."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
from pyspark import TaskContext
from pyspark.sql import SparkSession

from jobs import storage
from jobs.runlog import get_logger

log = get_logger("jobs.filesystems")
S3_SCHEMES = ("s3a", "s3", "s3n")
SHIPPED = "shipped"  # Location kind: a folder Spark copied to every executor (SparkContext.addFile), opened locally


@dataclass(frozen=True)
class Location:
    """A folder as pyarrow sees it: the filesystem's kind and options, and the folder's path on it."""

    kind: str  # local, s3, gcs or SHIPPED
    root: str
    options: dict[str, Any] = field(default_factory=dict)

    def opened_root(self) -> str:
        """The folder's path on filesystem(): for a SHIPPED folder, this executor's copy (only a task can ask)."""
        if self.kind != SHIPPED:
            return self.root
        from pyspark import SparkFiles

        return SparkFiles.get(self.root)

    def filesystem(self, memory_map: bool = False) -> pafs.FileSystem:
        """pyarrow's filesystem; memory_map: local files are mapped rather than read into buffers of their own
        (the catalog's row groups are decoded straight from the page cache: half the time of a 1M x 512-d search's
        reads)."""
        if self.kind == "s3":
            return pafs.S3FileSystem(**self.options)
        if self.kind == "gcs":
            return pafs.GcsFileSystem(**self.options)
        return pafs.LocalFileSystem(use_mmap=memory_map)


def s3_options(spark: SparkSession, bucket: str) -> dict[str, Any]:
    """pyarrow's S3 options from the s3a settings (per-bucket first); without keys pyarrow uses AWS's credential
    chain."""
    conf = spark._jsc.hadoopConfiguration()

    def setting(key: str) -> str | None:
        return conf.get(f"fs.s3a.bucket.{bucket}.{key}") or conf.get(f"fs.s3a.{key}")

    options: dict[str, Any] = {}
    endpoint = setting("endpoint")
    if endpoint and not endpoint.rstrip("/").endswith("amazonaws.com"):
        scheme, _, host = endpoint.rpartition("://")
        secure = (setting("connection.ssl.enabled") or "true").lower() != "false"
        options.update(endpoint_override=host, scheme=scheme or ("https" if secure else "http"))
    else:
        with contextlib.suppress(OSError):  # no network to ask the bucket's region: pyarrow's default applies
            options["region"] = setting("endpoint.region") or pafs.resolve_s3_region(bucket)
    if setting("access.key") and setting("secret.key"):
        options.update(
            access_key=setting("access.key"), secret_key=setting("secret.key"), session_token=setting("session.token")
        )
    return options


def path_on_filesystem(uri: str) -> str:
    """A qualified URI's path as pyarrow's filesystem takes it: /folder/file locally, bucket/key on S3 and GCS."""
    scheme, _, rest = uri.partition(":")
    return "/" + rest.lstrip("/") if scheme == "file" else rest.lstrip("/")


def location(spark: SparkSession, uri: str) -> Location | None:
    """Where pyarrow opens the folder at uri, or None for a filesystem it does not know (hdfs, abfs, ...)."""
    qualified = storage.qualify(spark, uri)
    scheme = qualified.partition(":")[0]
    root = path_on_filesystem(qualified).rstrip("/")
    if scheme == "file":
        return Location("local", root or "/")
    if scheme in S3_SCHEMES:
        return Location("s3", root, s3_options(spark, root.split("/", 1)[0]))
    if scheme == "gs":
        return Location("gcs", root)
    return None


def opens(place: Location, path: str) -> bool:
    """Whether pyarrow finds the file at path (on place's filesystem) from here, the driver."""
    try:
        return place.filesystem().get_file_info(path).type == pafs.FileType.File
    except (OSError, ValueError, pa.ArrowException) as error:
        log.info("pyarrow cannot open %s (%s): Spark reads it", path, error)
        return False


def writable(spark: SparkSession, uri: str) -> Location | None:
    """Where the tasks can write the folder at uri with pyarrow (the folder made here), or None: Spark writes it."""
    files = location(spark, uri)
    if files is None:
        return None
    try:
        files.filesystem().create_dir(files.root)
    except (OSError, ValueError, pa.ArrowException) as error:
        log.info("pyarrow cannot write %s (%s): Spark writes it", uri, error)
        return None
    return files


FileWrite = Callable[[pafs.FileSystem, str, Iterator[pa.RecordBatch]], "dict[str, Any] | None"]


def file_per_task(
    files: Location, write: FileWrite, entry: pa.Schema
) -> Callable[[Iterator[pa.RecordBatch]], Iterator[pa.RecordBatch]]:
    """A function for mapInArrow whose task writes one file into files: write(filesystem, path, the task's batches)
    writes it (deleting what it wrote if it fails) and returns its entry (None: no rows, no file); the task yields the
    file's name and that entry. The file is written under a hidden name, then moved to its own: a retried or
    speculative attempt never leaves half a file there."""
    token = uuid.uuid4().hex[:12]

    def task(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        context = TaskContext.get()
        name = f"part-{context.partitionId():05d}-{token}.parquet"
        hidden = f"{files.root}/.{name}.attempt-{context.attemptNumber()}"
        fs = files.filesystem()
        found = write(fs, hidden, batches)
        if found is not None:
            fs.move(hidden, f"{files.root}/{name}")
            yield pa.RecordBatch.from_pylist([{"name": name, **found}], entry)

    return task


def mark_written(files: Location) -> None:
    """_SUCCESS in the folder, as Spark's writer marks a finished one."""
    with files.filesystem().open_output_stream(f"{files.root}/_SUCCESS"):
        pass
