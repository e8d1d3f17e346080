"""Photos to report in one session, every job once: embed, index, search (--images, --queries, --all,
--duplicates), evaluate, report. CI runs it on pyspark 3.5 too (make test-spark35)."""

from __future__ import annotations

import json

from conftest import read_neighbours, run_job, search


def test_photos_to_report_in_one_session(spark, demo_dir, tmp_path, mobilenet_weights):
    model = ["--model", "mobilenet_v2", "--weights", mobilenet_weights]
    out = tmp_path / "out"
    # three jobs chained in one application, as `make pipeline` runs them
    chain = [
        *("embed", "--input", demo_dir / "catalog", "--output", out / "emb", *model),
        *("--then", "embed", "--input", demo_dir / "queries", "--output", out / "q", *model),
        *("--then", "index", "--embeddings", out / "emb", "--output", out / "index"),
    ]
    assert run_job(spark, *chain) == 0
    # the index says how its vectors were made, as the embed run recorded it; --images embeds queries the same way
    embedded = json.loads((out / "emb" / "_summary.json").read_text())
    made = json.loads((out / "index" / "index.json").read_text())["embedded_with"]
    assert made == {"precision": embedded["precision"], "backend": embedded["backend"]}
    # the query photos embedded in the search job, and the same photos embedded by embed: the same answers
    search(
        spark, out / "index", out / "photos", "--images", demo_dir / "queries", "-k", "5", "--report", out / "report"
    )
    search(spark, out / "index", out / "vectors", "--queries", out / "q", "-k", "5")
    photos, vectors = (read_neighbours(spark, out / name) for name in ("photos", "vectors"))
    assert len(photos) == len(vectors) == 15 * 5
    assert list(photos["neighbor_id"]) == list(vectors["neighbor_id"])
    top1 = photos[photos["rank"] == 1]
    assert (
        top1["neighbor_label"].to_numpy() == top1["query_path"].str.rsplit("/", n=2).str[-2].to_numpy()
    ).mean() >= 0.9
    assert (out / "report" / "index.html").exists() and len(list((out / "report" / "sheets").glob("*.png"))) == 15
    # the catalog against itself
    graph = search(spark, out / "index", out / "graph", "--all", "-k", "3")
    assert graph["counts"]["queries"] == 90 and graph["counts"]["rows"] == 270
    pairs = search(spark, out / "index", out / "dups", "--duplicates", "--min-similarity", "0.99")
    assert pairs["counts"]["rows"] == spark.read.parquet(str(out / "dups")).count()
    # evaluate: the index against exact search, and precision by label
    assert run_job(spark, "evaluate", "--index", out / "index", "-k", "5", "--output", out / "evaluation.json") == 0
    metrics = json.loads((out / "evaluation.json").read_text())["metrics"]
    assert metrics["recall@5"] >= 0.95 and metrics["ivf_precision@5"] >= 0.8 and metrics["ivf_mAP@5"] >= 0.8
