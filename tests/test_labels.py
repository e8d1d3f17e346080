"""Labels from CSVs (plain, Stanford Cars with boxes, headerless annos) matched to files by path tail."""

from __future__ import annotations

import pandas as pd
import pytest

from jobs.errors import UsageError
from jobs.labels import label_files, parse_labels

PATHS = pd.Series([
    "file:/data/cars_train/00001.jpg",
    "file:/data/cars_test/00001.jpg",
    "file:/data/cars_train/00002.jpg",
    "s3a://bucket/other/ford/x.png",
])


def test_plain_csv_matches_on_relative_path_and_prefers_the_longest_key():
    labels = parse_labels(b"path,label\n00001.jpg,anything\ncars_test/00001.jpg,BMW M3\ncars_train/00001.jpg,Audi A4\n", "l.csv")
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
