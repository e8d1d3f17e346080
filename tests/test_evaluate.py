"""The evaluate job's metrics."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from conftest import run_job

from jobs.evaluate import label_metrics, recall_at_k


def test_evaluate_reports_recall_precision_and_map(spark, catalog, tmp_path):
    folder, *_ = catalog
    assert (
        run_job(
            spark,
            "evaluate",
            "--index",
            folder / "index",
            "-k",
            "5",
            "--sample",
            "60",
            "--output",
            tmp_path / "eval.json",
        )
        == 0
    )
    metrics = json.loads((tmp_path / "eval.json").read_text())["metrics"]
    assert metrics["queries"] == 60 and metrics["recall@5"] >= 0.9
    assert metrics["exact_precision@5"] > 0.9  # neighbours in these clusters share the cluster label


def test_recall_and_label_metrics_on_known_cases():
    exact = pd.DataFrame({"query_id": ["q"] * 4, "rank": [1, 2, 3, 4], "neighbor_id": ["a", "b", "c", "d"]})
    approx = pd.DataFrame({"query_id": ["q"] * 4, "rank": [1, 2, 3, 4], "neighbor_id": ["a", "x", "c", "y"]})
    assert recall_at_k(approx, exact, 4) == 0.5
    neighbours = pd.DataFrame(
        {"query_id": ["q"] * 4, "rank": [1, 2, 3, 4], "neighbor_label": ["car", "bus", "car", "bus"]}
    )
    metrics = label_metrics(neighbours, {"q": "car"}, {"car": 3, "bus": 9}, k=4, self_in_catalog=True)
    assert metrics["precision@4"] == 0.5
    assert metrics["mAP@4"] == pytest.approx((1 / 1 + 2 / 3) / 2)  # two relevant images exist besides the query
