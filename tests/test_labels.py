"""Labels from CSVs (plain, Stanford Cars with boxes, headerless annos) matched to files by their path relative
to the labels file's folder; an ambiguous key is an error that names it, never a guess."""

from __future__ import annotations

import pandas as pd
import pytest
from conftest import run_job

from jobs.errors import UsageError
from jobs.labels import label_files, parse_labels, read_labels

PATHS = pd.Series(
    [
        "file:/data/cars_train/00001.jpg",
        "file:/data/cars_test/00001.jpg",
        "file:/data/cars_train/00002.jpg",
        "s3a://bucket/other/ford/x.png",
    ]
)


def test_plain_csv_matches_on_relative_path_and_prefers_the_longest_key():
    labels = parse_labels(
        b"path,label\n00001.jpg,anything\ncars_test/00001.jpg,BMW M3\ncars_train/00001.jpg,Audi A4\n", "l.csv"
    )
    out = label_files(PATHS, labels).set_index("path")["label"]
    assert out["file:/data/cars_train/00001.jpg"] == "Audi A4"
    assert out["file:/data/cars_test/00001.jpg"] == "BMW M3"
    assert out["file:/data/cars_train/00002.jpg"] is None  # not in the file: unlabelled, not guessed
    assert len(out) == len(PATHS)


def test_stanford_cars_csv_with_boxes():
    data = b"fname,bbox_x1,bbox_y1,bbox_x2,bbox_y2,class_name\n00002.jpg,10,20,300,200,Acura TL Sedan 2012\n"
    out = label_files(PATHS, parse_labels(data, "car_dataset_train.csv")).set_index("path")
    row = out.loc["file:/data/cars_train/00002.jpg"]
    assert row["label"] == "Acura TL Sedan 2012" and (row["x1"], row["y2"]) == (10, 200)


def test_headerless_kaggle_annos():
    data = b"00001.jpg,39,116,569,375,14\n00002.jpg,36,116,868,587,3\n"
    labels = parse_labels(data, "anno_train.csv")
    assert list(labels["label"]) == ["14", "3"] and list(labels["x2"]) == [569, 868]


def test_folder_name_is_the_default_label():
    out = label_files(PATHS, None)
    assert list(out["label"]) == ["cars_train", "cars_test", "cars_train", "ford"]


def test_csv_without_usable_columns_is_a_usage_error():
    with pytest.raises(UsageError, match="need a path column"):
        parse_labels(b"a,b\n1,2\n", "bad.csv")


def test_same_file_name_in_two_folders_gets_each_folders_label(spark, tmp_path):
    # Stanford Cars: cars_train/ and cars_test/ both hold 00001.jpg; keys are relative to the labels file's folder
    csv = tmp_path / "labels.csv"
    csv.write_text("path,label\ncars_test/00001.jpg,BMW M3\ncars_train/00001.jpg,Audi A4\n")
    paths = pd.Series([f"file:{tmp_path}/cars_train/00001.jpg", f"file:{tmp_path}/cars_test/00001.jpg"])
    out = label_files(paths, read_labels(spark, str(csv))).set_index("path")["label"]
    assert out[paths[0]] == "Audi A4" and out[paths[1]] == "BMW M3"


def test_a_key_exact_for_one_file_does_not_label_its_namesake_elsewhere(spark, tmp_path):
    # the train labels file lives in cars_train/: its 00001.jpg is that folder's file, not cars_test's
    (tmp_path / "cars_train").mkdir()
    csv = tmp_path / "cars_train" / "car_dataset_train.csv"
    csv.write_text("fname,class_name\n00001.jpg,Audi A4\n")
    paths = pd.Series([f"file:{tmp_path}/cars_train/00001.jpg", f"file:{tmp_path}/cars_test/00001.jpg"])
    out = label_files(paths, read_labels(spark, str(csv))).set_index("path")["label"]
    assert out[paths[0]] == "Audi A4" and out[paths[1]] is None


def test_an_ambiguous_key_is_named_not_guessed():
    labels = parse_labels(b"fname,class_name\n00001.jpg,Audi A4\n00002.jpg,Acura TL\n", "car_dataset_train.csv")
    with pytest.raises(
        UsageError,
        match=r"key '00001.jpg' matches 2 files \(file:/data/cars_test/00001.jpg, file:/data/cars_train/00001.jpg\)",
    ) as e:
        label_files(PATHS, labels, root="file:/data")
    assert "\n" not in str(e.value) and "cars_test/00001.jpg" in str(e.value).split("relative to file:/data")[1]


def test_embed_with_an_ambiguous_labels_file_exits_2_with_one_line(spark, tmp_path, photos, capsys):
    photo = next(iter(photos.values()))[0]
    for folder in ("cars_train", "cars_test"):
        (tmp_path / "images" / folder).mkdir(parents=True)
        (tmp_path / "images" / folder / "00001.png").write_bytes(photo.read_bytes())
    (tmp_path / "images" / "labels.csv").write_text("path,label\n00001.png,Audi A4\n")
    code = run_job(
        spark,
        "embed",
        "--input",
        tmp_path / "images",
        "--output",
        tmp_path / "emb",
        "--labels",
        tmp_path / "images" / "labels.csv",
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "key '00001.png' matches 2 files" in err[0]
    assert not (tmp_path / "emb").exists()
