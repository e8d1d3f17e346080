"""Files on any Hadoop filesystem (local, s3a, s3, gs, hdfs) through the driver's JVM, and atomic swaps."""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING, Any

from pyspark.sql import SparkSession

if TYPE_CHECKING:
    import pandas as pd


def _fs_and_path(spark: SparkSession, uri: str) -> tuple[Any, Any]:
    jvm = spark._jvm
    path = jvm.org.apache.hadoop.fs.Path(uri)
    return path.getFileSystem(spark._jsc.hadoopConfiguration()), path


def qualify(spark: SparkSession, uri: str) -> str:
    """The fully qualified URI, e.g. `out` -> `file:/home/me/out`."""
    fs, path = _fs_and_path(spark, uri)
    return str(fs.makeQualified(path).toString())


def exists(spark: SparkSession, uri: str) -> bool:
    fs, path = _fs_and_path(spark, uri)
    return bool(fs.exists(path))


def is_glob(uri: str) -> bool:
    """Whether Hadoop reads uri as a pattern (photos/*.jpg, s3a://b/{a,b}/*)."""
    return any(c in uri for c in "*?[{")


def matches(spark: SparkSession, uri: str) -> bool:
    """True if uri exists, or is a Hadoop glob (photos/*.jpg, s3a://b/{a,b}/*) that matches something."""
    fs, path = _fs_and_path(spark, uri)
    if not is_glob(uri):
        return bool(fs.exists(path))
    found = fs.globStatus(path)
    return found is not None and len(found) > 0


def size(spark: SparkSession, uri: str) -> int:
    fs, path = _fs_and_path(spark, uri)
    return int(fs.getFileStatus(path).getLen())


def total_size(spark: SparkSession, uri: str) -> int:
    """Bytes of a file, or of every file under a folder."""
    fs, path = _fs_and_path(spark, uri)
    return int(fs.getContentSummary(path).getLength())


def delete(spark: SparkSession, uri: str) -> None:
    fs, path = _fs_and_path(spark, uri)
    if fs.exists(path):
        fs.delete(path, True)


def read_bytes(spark: SparkSession, uri: str) -> bytes:
    fs, path = _fs_and_path(spark, uri)
    if str(fs.getScheme()) == "file":  # local files skip the JVM: py4j took 1.7 s to pass an index's 8 MB of centroids
        with open(str(fs.makeQualified(path).toUri().getPath()), "rb") as f:
            return f.read()
    stream = fs.open(path)
    try:
        return bytes(spark._jvm.org.apache.commons.io.IOUtils.toByteArray(stream))
    finally:
        stream.close()


def read_text(spark: SparkSession, uri: str) -> str:
    return read_bytes(spark, uri).decode("utf-8")


def write_bytes(spark: SparkSession, uri: str, data: bytes) -> None:
    """Write a small file, replacing any file there."""
    fs, path = _fs_and_path(spark, uri)
    stream = fs.create(path, True)
    try:
        stream.write(bytearray(data))
    finally:
        stream.close()


def create_new(spark: SparkSession, uri: str, data: bytes) -> bool:
    """Write a small file that must not exist yet, whole or not at all (written aside, then renamed); False if it
    exists."""
    fs, path = _fs_and_path(spark, uri)
    aside = sibling(uri, "new")
    write_bytes(spark, aside, data)
    if fs.exists(path) or not fs.rename(spark._jvm.org.apache.hadoop.fs.Path(aside), path):
        delete(spark, aside)
        return False
    return True


def names(spark: SparkSession, uri: str) -> list[str]:
    """The names in a folder (none if it does not exist)."""
    fs, path = _fs_and_path(spark, uri)
    return [str(status.getPath().getName()) for status in fs.listStatus(path)] if fs.exists(path) else []


def write_text(spark: SparkSession, uri: str, text: str) -> None:
    """Write a small UTF-8 file, replacing any file there."""
    write_bytes(spark, uri, text.encode("utf-8"))


def sibling(uri: str, tag: str, unique: bool = True) -> str:
    """A path beside uri whose leading dot hides it from Spark's readers; unique unless asked otherwise."""
    parent, _, name = uri.rstrip("/").rpartition("/")
    hidden = f".{name}.{tag}" + (f"-{uuid.uuid4().hex[:8]}" if unique else "")
    return f"{parent}/{hidden}" if parent else hidden


def swap_in(spark: SparkSession, staged: str, target: str) -> None:
    """Replace target by staged: rename the old aside, rename the new in, then delete the old.

    Readers see either the old or the new directory, never a half-written one (on object stores the
    rename is a copy, so there the window is short rather than zero).
    """
    fs, target_path = _fs_and_path(spark, target)
    staged_path = spark._jvm.org.apache.hadoop.fs.Path(staged)
    old = None
    if fs.exists(target_path):
        old = spark._jvm.org.apache.hadoop.fs.Path(sibling(target, "old"))
        if not fs.rename(target_path, old):
            raise OSError(f"could not move {target} aside")
    if not fs.rename(staged_path, target_path):
        if old is not None:
            fs.rename(old, target_path)
        raise OSError(f"could not move {staged} to {target}")
    if old is not None:
        fs.delete(old, True)


def stat_files(spark: SparkSession, uris: list[str], exclude: set[str]) -> pd.DataFrame:
    """path, length, modification_us of the URI-encoded uris whose decoded path is not in exclude."""
    import pandas as pd  # here: every Python worker imports this module, and most never need pandas

    jvm = spark._jvm
    rows = []
    for uri in uris:
        path = jvm.org.apache.hadoop.fs.Path(jvm.java.net.URI(uri))
        if str(path.toString()) in exclude:
            continue
        status = path.getFileSystem(spark._jsc.hadoopConfiguration()).getFileStatus(path)
        rows.append((str(path.toString()), int(status.getLen()), int(status.getModificationTime()) * 1000))
    return pd.DataFrame(rows, columns=["path", "length", "modification_us"])
