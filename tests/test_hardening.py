"""Hardening: interruption and resume, files Spark cannot read, too many failures, odd paths end to end."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import run_job
from helpers import build_dist, submit_command, submit_env

from scripts.sample_data import synthetic_photos

pytestmark = pytest.mark.slow


def committed_chunks(staging: Path) -> int:
    """Spark jobs whose files were committed into the folder (one per chunk)."""
    if not staging.exists():
        return 0
    return len({p.name.split("-", 2)[2][:36] for p in staging.glob("part-*.parquet")})


def test_killed_run_resumes_and_equals_an_uninterrupted_run(spark, tmp_path, mobilenet_weights):
    images = tmp_path / "images"
    synthetic_photos(images / "batch", 72, seed=5)
    out = tmp_path / "emb"
    args = [
        "embed",
        "--input",
        images,
        "--output",
        out,
        "--model",
        "mobilenet_v2",
        "--weights",
        mobilenet_weights,
        "--chunk-files",
        "12",
        "--batch-size",
        "4",
    ]
    process = subprocess.Popen(
        submit_command(build_dist(tmp_path / "dist"), args),
        env=submit_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    staging = tmp_path / ".emb.staging"
    deadline = time.monotonic() + 300
    try:
        while committed_chunks(staging) < 2:
            assert process.poll() is None, "the job ended before it could be interrupted"
            assert time.monotonic() < deadline, "no chunk committed in time"
            time.sleep(0.2)
    finally:
        os.killpg(process.pid, signal.SIGKILL)  # the driver JVM and its Python workers, as a kill -9 would
        process.wait()
    assert not out.exists(), "a killed first run must not leave a table under the real name"

    assert run_job(spark, *args) == 0
    summary = json.loads((out / "_summary.json").read_text())
    assert summary["counts"]["skipped"] >= 24 and summary["counts"]["embedded"] == 72 - summary["counts"]["skipped"]
    assert not staging.exists()
    resumed = spark.read.parquet(str(out)).toPandas()
    assert resumed["image_id"].is_unique and len(resumed) == 72

    assert run_job(spark, *[a if a != out else tmp_path / "straight" for a in args]) == 0
    straight = spark.read.parquet(str(tmp_path / "straight")).toPandas().set_index("image_id")
    assert set(straight.index) == set(resumed["image_id"])
    for row in resumed.itertuples():
        np.testing.assert_allclose(row.embedding, straight.loc[row.image_id, "embedding"], atol=1e-5)


def test_file_too_large_for_spark_and_max_error_rate(spark, tmp_path, photos, mobilenet_weights, capsys):
    images = tmp_path / "images"
    images.mkdir()
    shutil.copy(photos["motorcycle"][0], images / "good.png")
    with open(images / "huge_scan.jpg", "wb") as f:  # sparse: 2.2 GB long, no disk used
        f.truncate(2_200_000_000)
    (images / "saved_error_page.jpg").write_text("<html>404</html>")
    args = [
        "embed",
        "--input",
        images,
        "--output",
        tmp_path / "emb",
        "--model",
        "mobilenet_v2",
        "--weights",
        mobilenet_weights,
    ]
    capsys.readouterr()
    assert run_job(spark, *args, "--max-error-rate", "0.5") == 2
    err = capsys.readouterr().err
    assert "2 of 3 files (67%) could not be embedded" in err and "--max-error-rate" in err and "Traceback" not in err
    rows = spark.read.parquet(str(tmp_path / "emb")).toPandas()
    errors = dict(zip(rows["path"].str.rsplit("/", n=1).str[-1], rows["error"]))
    assert errors["good.png"] is None
    assert errors["huge_scan.jpg"].startswith("file too large: 2200000000 bytes")
    assert errors["saved_error_page.jpg"].startswith("not a recognised image")


def test_odd_paths_survive_the_whole_pipeline(spark, tmp_path, demo_dir, mobilenet_weights):
    odd = tmp_path / "in put" / "Citroën #2 100% a=b"
    odd.mkdir(parents=True)
    for i, source in enumerate(sorted((demo_dir / "catalog" / "motorcycle").iterdir())[:3]):
        shutil.copy(source, odd / f"photo {i} #x %41 =y ü.jpg")
    shutil.copytree(demo_dir / "catalog" / "cat", tmp_path / "in put" / "cat")
    weights = ["--model", "mobilenet_v2", "--weights", mobilenet_weights]
    assert run_job(spark, "embed", "--input", tmp_path / "in put", "--output", tmp_path / "emb", *weights) == 0
    table = spark.read.parquet(str(tmp_path / "emb")).toPandas()
    assert table["error"].isna().all() and len(table) == 9
    odd_rows = table[table["label"] == "Citroën #2 100% a=b"].sort_values("path")  # photo 0 is the query below
    assert list(odd_rows["path"]) == [f"file:{odd}/photo {i} #x %41 =y ü.jpg" for i in range(3)]
    assert run_job(spark, "index", "--embeddings", tmp_path / "emb", "--output", tmp_path / "index") == 0
    query = odd_rows["image_id"].iloc[0]
    assert (
        run_job(
            spark,
            "search",
            "--index",
            tmp_path / "index",
            "--query-ids",
            query,
            "--output",
            tmp_path / "nb",
            "-k",
            "2",
            "--exclude-self",
        )
        == 0
    )
    neighbours = spark.read.parquet(str(tmp_path / "nb")).toPandas()
    assert set(neighbours["neighbor_path"]) == set(odd_rows["path"]) - {odd_rows["path"].iloc[0]}
    assert (
        run_job(
            spark,
            "report",
            "--neighbours",
            tmp_path / "nb",
            "--output",
            tmp_path / "report",
            "--embeddings",
            tmp_path / "emb",
        )
        == 0
    )
    page = (tmp_path / "report" / "index.html").read_text()
    assert "photo 0 #x %41 =y ü.jpg" in page and "Citroën #2 100% a=b" in page
    summary = json.loads((tmp_path / "report" / "report_summary.json").read_text())
    assert summary["counts"]["placeholders"] == 0  # every odd path was found and drawn
