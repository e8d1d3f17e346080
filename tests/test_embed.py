"""The embed job on a real local SparkSession: contract, bad files, re-runs, usage errors."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from conftest import run_job

from jobs.embed import EMBEDDINGS_SCHEMA, plan_files
from jobs.vectors import spark_fingerprints


def read_table(spark, path: Path) -> pd.DataFrame:
    return spark.read.parquet(str(path)).toPandas()


def check_contract(spark, path: Path, dim: int) -> pd.DataFrame:
    table = spark.read.parquet(str(path))
    assert [(f.name, f.dataType) for f in table.schema] == [(f.name, f.dataType) for f in EMBEDDINGS_SCHEMA]
    rows = table.toPandas()
    assert rows["path"].is_unique
    for row in rows.itertuples():
        assert row.image_id == hashlib.sha1(row.path.encode()).hexdigest()
        local = Path(row.path.removeprefix("file:"))
        assert row.length == local.stat().st_size
        assert abs(row.modification_time.timestamp() - local.stat().st_mtime) < 1.0
        if row.error is None:
            assert len(row.embedding) == dim and abs(np.linalg.norm(row.embedding) - 1) < 1e-4
            assert row.width > 0 and row.height > 0
        else:
            assert row.embedding is None
    return rows


@pytest.mark.parametrize("reader", ["auto", "spark"])
def test_embeds_real_photos_and_names_every_bad_file(spark, tmp_path, nasty_dir, mobilenet_weights, capsys, reader):
    folder, expected = nasty_dir
    out = tmp_path / "emb"
    assert (
        run_job(
            spark,
            "embed",
            "--input",
            folder,
            "--output",
            out,
            "--model",
            "mobilenet_v2",
            "--weights",
            mobilenet_weights,
            "--batch-size",
            "4",
            "--backend",
            "onnxruntime",
            "--precision",  # ONNX Runtime runs fp32: on a CPU with native bf16, auto would run eager bf16
            "fp32",
            "--reader",
            reader,
        )
        == 0
    )
    rows = check_contract(spark, out, 1280)
    by_name = {Path(p).name: r for p, r in zip(rows["path"], rows.itertuples())}
    assert set(by_name) == set(expected)
    for name, error in expected.items():
        row = by_name[name]
        if error is None:
            assert row.error is None, f"{name}: {row.error}"
            assert row.label == "images" and row.model == "mobilenet_v2"
        else:
            assert error in row.error, f"{name}: {row.error}"
    good = np.array(by_name["good.jpg"].embedding)
    assert np.dot(good, by_name["cmyk.jpg"].embedding) > 0.99
    assert np.dot(good, by_name["exif_rotated.jpg"].embedding) > 0.99  # orientation undone
    summary = json.loads((out / "_summary.json").read_text())
    failed = sum(e is not None for e in expected.values())
    assert summary["counts"]["embedded"] == len(expected) - failed and summary["counts"]["failed"] == failed
    assert summary["weights"]["sha256"].startswith("b03531047ffacf1e")
    assert (
        summary["backend"] == "onnxruntime"
    )  # installed here, and faithful: auto picks it from AUTO_MIN_IMAGES images on
    assert summary["photos_read_by"] == ("tasks" if reader == "auto" else "spark")
    assert set(rows.loc[rows["error"].isna(), "weights_sha256"]) == {
        summary["weights"]["sha256"]
    }  # provenance on every vector
    # each vector's fingerprint beside it (an index update reads these, not the vectors); none without a vector
    written = pq.read_table(out, columns=["embedding", "fingerprint"]).to_pandas(integer_object_nulls=True)
    good_rows = written[written["embedding"].notna()]
    assert good_rows["fingerprint"].tolist() == spark_fingerprints(np.stack(good_rows["embedding"])).tolist()
    assert written.loc[written["embedding"].isna(), "fingerprint"].isna().all() and len(good_rows) < len(written)
    printed = capsys.readouterr().out
    assert "embed summary" in printed and f"failed                {failed}".split()[-1] in printed


def test_incremental_skips_unchanged_and_replaces_changed_files(spark, tmp_path, photos, mobilenet_weights):
    images = tmp_path / "images" / "bikes"
    images.mkdir(parents=True)
    shutil.copy(photos["motorcycle"][0], images / "a.png")
    shutil.copy(photos["rocket"][0], images / "b.jpg")
    out = tmp_path / "emb"
    args = [
        "embed",
        "--input",
        tmp_path / "images",
        "--output",
        out,
        "--model",
        "mobilenet_v2",
        "--weights",
        mobilenet_weights,
    ]
    assert run_job(spark, *args) == 0
    first = read_table(spark, out).set_index("path")
    assert run_job(spark, *args) == 0
    summary = json.loads((out / "_summary.json").read_text())
    assert summary["counts"]["skipped"] == 2 and summary["counts"]["embedded"] == 0
    # one file changes content, one is added
    shutil.copy(photos["cat"][0], images / "b.jpg")
    os.utime(images / "b.jpg", (1_700_000_000, 1_700_000_000))
    shutil.copy(photos["coffee"][0], images / "c.png")
    assert run_job(spark, *args) == 0
    third = check_contract(spark, out, 1280).set_index("path")
    assert len(third) == 3
    a, b = f"file:{images}/a.png", f"file:{images}/b.jpg"
    np.testing.assert_array_equal(third.loc[a, "embedding"], first.loc[a, "embedding"])
    assert np.dot(third.loc[b, "embedding"], first.loc[b, "embedding"]) < 0.9  # recomputed for the new content
    summary = json.loads((out / "_summary.json").read_text())
    assert (summary["counts"]["skipped"], summary["counts"]["embedded"]) == (1, 2)
    # a file removed from the input: its row goes; rows of another input's files in the same table stay
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(photos["cat"][0], other / "d.jpg")
    assert run_job(spark, "embed", "--input", other, *args[3:]) == 0
    (images / "a.png").unlink()
    assert run_job(spark, *args) == 0
    counts = json.loads((out / "_summary.json").read_text())["counts"]
    assert (counts["removed"], counts["embedded"], counts["table_rows"]) == (1, 0, 3)
    assert sorted(check_contract(spark, out, 1280)["path"]) == [b, f"file:{images}/c.png", f"file:{other}/d.jpg"]
    # overwrite recomputes everything
    assert run_job(spark, *args, "--mode", "overwrite") == 0
    assert json.loads((out / "_summary.json").read_text())["counts"]["embedded"] == 2


def test_labels_csv_and_crop_to_box(spark, tmp_path, photos, mobilenet_weights):
    images = tmp_path / "cars_train"
    images.mkdir()
    shutil.copy(photos["motorcycle"][0], images / "00001.png")
    shutil.copy(photos["motorcycle"][1], images / "00002.png")
    csv = tmp_path / "car_dataset_train.csv"
    csv.write_text(
        "fname,x1,y1,x2,y2,class_name\n00001.png,0,0,370,500,Honda left\n00002.png,0,0,741,500,Honda right\n"
    )
    out = tmp_path / "emb"
    assert (
        run_job(
            spark,
            "embed",
            "--input",
            images,
            "--output",
            out,
            "--labels",
            csv,
            "--crop-to-box",
            "--model",
            "mobilenet_v2",
            "--weights",
            mobilenet_weights,
        )
        == 0
    )
    rows = read_table(spark, out).set_index("label")
    assert set(rows.index) == {"Honda left", "Honda right"}
    assert rows.loc["Honda left", "width"] == 741  # the original size, not the box's


@pytest.mark.parametrize(
    "case",
    [
        "missing input",
        "empty input",
        "unknown model",
        "bad weights",
        "foreign output",
        "other model",
        "other weights",
        "bad batch",
    ],
)
def test_usage_errors_exit_2_with_one_line(spark, tmp_path, photos, mobilenet_weights, capsys, case):
    images = tmp_path / "images"
    images.mkdir()
    shutil.copy(photos["cat"][0], images / "cat.png")
    out = tmp_path / "out"
    args = ["embed", "--input", images, "--output", out, "--model", "mobilenet_v2", "--weights", mobilenet_weights]
    if case == "missing input":
        args[2] = tmp_path / "nope"
    elif case == "empty input":
        (tmp_path / "empty").mkdir()
        (tmp_path / "empty" / "notes.txt").write_text("no images here")
        args[2] = tmp_path / "empty"
    elif case == "unknown model":
        args[6] = "vgg16"
    elif case == "bad weights":
        (tmp_path / "w.pth").write_bytes(b"not a checkpoint")
        args[8] = tmp_path / "w.pth"
    elif case == "foreign output":
        out.mkdir()
        spark.createDataFrame([(1, "x")], "a int, b string").write.mode("overwrite").parquet(str(out))
    elif case == "other model":
        spark.createDataFrame([], EMBEDDINGS_SCHEMA).write.parquet(str(out))
        spark.createDataFrame(
            [("i", "file:/x.jpg", None, 1, 1, "resnet18", [0.0], None, 1, datetime(2024, 1, 1), None, None)],
            EMBEDDINGS_SCHEMA,
        ).write.mode("append").parquet(str(out))
    elif case == "other weights":  # adding vectors of another checkpoint would mix two spaces in one table
        spark.createDataFrame(
            [("i", "file:/x.jpg", None, 1, 1, "mobilenet_v2", [0.0], None, 1, datetime(2024, 1, 1), "f" * 64, None)],
            EMBEDDINGS_SCHEMA,
        ).write.parquet(str(out))
    elif case == "bad batch":
        args += ["--batch-size", "0"]
    capsys.readouterr()
    assert run_job(spark, *args) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert [line for line in err.splitlines() if "error" in line.lower()], err


def test_run_where_most_files_fail_exits_2_and_names_them(spark, tmp_path, photos, mobilenet_weights, capsys):
    images = tmp_path / "images"
    images.mkdir()
    shutil.copy(photos["cat"][0], images / "cat.png")
    (images / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 cut short")
    (images / "notes.png").write_bytes(b"plain text, not a picture")
    out = tmp_path / "emb"
    capsys.readouterr()
    # no --max-error-rate: the default must fail a run where 2 of 3 files failed
    assert (
        run_job(
            spark,
            "embed",
            "--input",
            images,
            "--output",
            out,
            "--model",
            "mobilenet_v2",
            "--weights",
            mobilenet_weights,
        )
        == 2
    )
    captured = capsys.readouterr()
    assert "2 of 3 files (67%)" in captured.err and "Traceback" not in captured.err
    summary = json.loads((out / "_summary.json").read_text())
    failed = {Path(f["path"]).name: f["error"] for f in summary["failed_files"]}
    assert set(failed) == {"broken.jpg", "notes.png"} and all(failed.values())
    assert "broken.jpg" in captured.out and "notes.png" in captured.out  # the console summary names them too


def test_plan_files_finds_new_and_changed():
    listing = pd.DataFrame({"path": ["a", "b", "c"], "length": [1, 2, 3], "modification_us": [10, 20, 30]})
    done = pd.DataFrame({"path": ["a", "b"], "length": [1, 2], "modification_us": [10, 25]})
    todo, changed = plan_files(listing, done)
    assert list(todo["path"]) == ["b", "c"] and changed == ["b"]


def test_tasks_reading_photos_leave_out_those_gone_since_the_listing(tmp_path):
    import pyarrow.fs as pafs

    from jobs.embed.model import read_photos

    for name in ("a.jpg", "b.jpg", "c.jpg"):
        (tmp_path / name).write_bytes(name.encode() * 3)
    (tmp_path / "b.jpg").unlink()
    batch = pd.DataFrame(
        {"path": [f"file:{tmp_path}/{n}" for n in ("a.jpg", "b.jpg", "c.jpg")], "label": ["x", "y", "z"]}
    )
    kept, contents = read_photos(pafs.LocalFileSystem(), batch)
    assert kept["label"].tolist() == ["x", "z"] and contents == [b"a.jpga.jpga.jpg", b"c.jpgc.jpgc.jpg"]
