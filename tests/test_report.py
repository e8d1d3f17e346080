"""The report job on a small real run: sheets of the right size, every query listed, escaping holds; a big
neighbours table gets a bounded sample of queries and the map a bounded sample of points."""

from __future__ import annotations

import json
import shutil
from html.parser import HTMLParser
from pathlib import Path

import pytest
from conftest import run_job
from PIL import Image

from jobs.report import sheet_size


class Collector(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.sections: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag == "section":
            self.sections.append(dict(attrs)["id"])


@pytest.fixture(scope="module")
def small_run(spark, tmp_path_factory, demo_dir, mobilenet_weights):
    folder = tmp_path_factory.mktemp("report")
    catalog = folder / "catalog"
    shutil.copytree(demo_dir / "catalog", catalog)
    queries = folder / "queries" / "<script>alert(1)</script>"  # a hostile folder name becomes a label
    queries.mkdir(parents=True)
    shutil.copy(next((demo_dir / "queries" / "cat").iterdir()), queries / "<img src=x onerror=alert(2)>.jpg")
    shutil.copy(next((demo_dir / "queries" / "motorcycle").iterdir()), queries / "moto & co.jpg")
    weights = ["--model", "mobilenet_v2", "--weights", mobilenet_weights]
    assert run_job(spark, "embed", "--input", catalog, "--output", folder / "emb", *weights) == 0
    assert run_job(spark, "embed", "--input", folder / "queries", "--output", folder / "qemb", *weights) == 0
    assert run_job(spark, "index", "--embeddings", folder / "emb", "--output", folder / "index") == 0
    assert (
        run_job(
            spark,
            "search",
            "--index",
            folder / "index",
            "--queries",
            folder / "qemb",
            "--output",
            folder / "nb",
            "-k",
            "4",
        )
        == 0
    )
    return folder


def test_report_renders_sheets_gallery_and_map(spark, small_run):
    out = small_run / "report"
    # one neighbour image disappears before the report: it must become a placeholder, not a crash
    victim = Path(spark.read.parquet(str(small_run / "nb")).first().neighbor_path.removeprefix("file:"))
    original = victim.read_bytes()
    victim.write_bytes(b"")
    try:
        assert (
            run_job(
                spark,
                "report",
                "--neighbours",
                small_run / "nb",
                "--output",
                out,
                "--embeddings",
                small_run / "emb",
                "--embeddings",
                small_run / "qemb",
                "--map-points",
                "5",
            )
            == 0
        )
    finally:
        victim.write_bytes(original)
    sheets = sorted((out / "sheets").glob("*.png"))
    assert len(sheets) == 2
    for sheet in sheets:
        assert Image.open(sheet).size == sheet_size(4)
    assert Image.open(out / "embedding_map.png").size[0] >= 800
    page = (out / "index.html").read_text()
    parser = Collector()
    parser.feed(page)
    queries = spark.read.parquet(str(small_run / "nb")).select("query_id").distinct().count()
    assert len(parser.sections) == queries == 2
    assert "script" not in parser.tags and parser.tags.count("img") == 3  # two sheets and the map, nothing injected
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "&lt;img src=x onerror=alert(2)&gt;.jpg" in page
    assert "moto &amp; co.jpg" in page
    summary = json.loads((out / "report_summary.json").read_text())
    assert summary["counts"]["sheets"] == 2 and summary["counts"]["placeholders"] >= 1
    assert summary["counts"]["map_points"] == 5 < spark.read.parquet(str(small_run / "emb")).count()  # a bounded sample


def test_report_of_missing_table_is_a_usage_error(spark, tmp_path):
    assert run_job(spark, "report", "--neighbours", tmp_path / "none", "--output", tmp_path / "r") == 2


def test_a_big_table_renders_only_max_queries_chosen_in_spark(spark, tmp_path):
    queries = 120
    rows = [
        (
            f"q{i:03d}",
            f"file:{tmp_path}/photos/q{i:03d}.jpg",
            rank,
            f"n{rank}",
            f"file:{tmp_path}/photos/n{rank}.jpg",
            "car",
            1.0 - rank / 10,
        )
        for i in range(queries)
        for rank in (1, 2)
    ]
    table = spark.createDataFrame(
        rows,
        "query_id string, query_path string, rank int, neighbor_id string, neighbor_path string, neighbor_label "
        "string, similarity double",
    )
    table.repartition(4).write.parquet(str(tmp_path / "nb"))
    out = tmp_path / "report"
    assert run_job(spark, "report", "--neighbours", tmp_path / "nb", "--output", out, "--max-queries", "3") == 0
    parser = Collector()
    parser.feed((out / "index.html").read_text())
    assert parser.sections == ["q000", "q001", "q002"]  # the first queries by path, whatever the partitioning
    assert len(list((out / "sheets").glob("*.png"))) == 3 and "3 of 120" in (out / "index.html").read_text()
    assert json.loads((out / "report_summary.json").read_text())["counts"]["queries"] == queries
    assert run_job(spark, "report", "--neighbours", tmp_path / "nb", "--output", out, "--max-queries", "0") == 2
