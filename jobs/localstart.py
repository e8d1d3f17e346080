"""Faster local starts: the class-data sharing archive of the driver JVM's classes (scripts/local_start.py writes it)."""

from __future__ import annotations

import sys
from pathlib import Path

import pyspark

NO_ARCHIVE = "-Xshare:auto"  # the JVM's default: a command line that names this option stays valid without an archive


def class_archive() -> Path:
    """Where this environment's archive lives: beside its pyspark, named for pyspark's version (its jars)."""
    return Path(sys.prefix) / "share" / "vehicle-search" / f"spark-{pyspark.__version__}-classes.jsa"


def java_option() -> str:
    """The driver JVM option that maps the archive, one word (NO_ARCHIVE where none was written). A JVM or class path
    other than the archive's prints one warning and loads every class from the jars, as without it."""
    archive = class_archive()
    return f"-XX:SharedArchiveFile={archive}" if archive.is_file() else NO_ARCHIVE


if __name__ == "__main__":  # `python -m jobs.localstart`: the option, for a spark-submit command line
    print(java_option())
