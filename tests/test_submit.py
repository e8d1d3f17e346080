"""End to end: the built dist/jobs.zip through spark-submit --master local[2], on good and bad files."""

from __future__ import annotations

import hashlib
import shutil

import numpy as np
import pytest
from helpers import build_dist, spark_submit

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def dist(tmp_path_factory):
    return build_dist(tmp_path_factory.mktemp("dist"))


def test_embed_through_spark_submit_checks_every_row(spark, dist, tmp_path, nasty_dir, mobilenet_weights):
    folder, expected = nasty_dir
    images = tmp_path / "in put#1 %20 =x ü"  # odd characters survive the whole path
    shutil.copytree(folder, images / "mixed")
    out = tmp_path / "emb"
    result = spark_submit(
        dist,
        [
            "embed",
            "--input",
            images,
            "--output",
            out,
            "--model",
            "mobilenet_v2",
            "--weights",
            mobilenet_weights,
            "--batch-size",
            "4",
        ],
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "embed summary" in result.stdout
    rows = spark.read.parquet(str(out)).toPandas()
    assert len(rows) == len(expected)
    for row in rows.itertuples():
        name = row.path.rsplit("/", 1)[1]
        assert row.path == f"file:{images}/mixed/{name}"
        assert row.image_id == hashlib.sha1(row.path.encode()).hexdigest()
        assert row.label == "mixed"
        if expected[name] is None:
            assert row.error is None and len(row.embedding) == 1280, name
            assert abs(np.linalg.norm(row.embedding) - 1) < 1e-4
        else:
            assert expected[name] in row.error, (name, row.error)


def test_usage_error_through_spark_submit_is_one_line_exit_2(dist, tmp_path):
    result = spark_submit(
        dist,
        [
            "embed",
            "--input",
            tmp_path / "missing",
            "--output",
            tmp_path / "out",
            "--model",
            "mobilenet_v2",
            "--weights",
            tmp_path / "w.pth",
        ],
    )
    assert result.returncode == 2, result.stderr[-2000:]
    # spark-submit's PythonRunner merges the Python driver's stderr into its stdout
    assert "Traceback" not in result.stdout + result.stderr
    last_line = result.stdout.strip().splitlines()[-1]
    assert last_line.startswith("main.py embed: error: input") and last_line.endswith("does not exist"), result.stdout[
        -1500:
    ]


def test_help_lists_every_option_with_defaults(dist):
    result = spark_submit(dist, ["embed", "--help"])
    assert result.returncode == 0
    for option in (
        "--input",
        "--output",
        "--labels",
        "--crop-to-box",
        "--model",
        "--weights",
        "--batch-size",
        "--precision",
        "--mode",
    ):
        assert option in result.stdout
    text = " ".join(result.stdout.split())  # argparse wraps lines
    assert "(default: resnet18)" in text and "(default: incremental)" in text
