"""The committed bench results: each says the machine and data it measured and defines every column it prints, and
bench/README.md is what `make bench-report` writes from them."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
RESULTS = sorted((BENCH / "results").glob("*.json"))


def load_report():
    spec = importlib.util.spec_from_file_location("bench_report", BENCH / "report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_there_are_results():
    assert len(RESULTS) >= 5


@pytest.mark.parametrize("path", RESULTS, ids=[p.stem for p in RESULTS])
def test_each_result_describes_its_machine_data_and_columns(path):
    data = json.loads(path.read_text())
    machine = data["machine"]
    assert machine["cpu"] and machine["cores"] >= 1 and isinstance(machine["vector_flags"], list)
    described = data["data"] if isinstance(data["data"], list) else [data["data"]]
    assert described
    for each in described:
        assert each["what"] and each["from"] and each["rows"] > 0 and each["row_bytes"] > 0 and each["dimension"]
    tables = [item for item in data["printed"] if "header" in item]
    assert tables, "a result with no table"
    for table in tables:
        assert table["rows"], table["title"]
        for name in table["header"]:
            meaning = table["columns"].get(name, "")
            assert len(meaning) > 10, f"{path.stem}: column {name!r} is not defined"
    section = "\n".join(load_report().section(path))
    assert machine["cpu"] in section
    assert all(f"data: {each['what']}" in section for each in described)
    assert all(f"- `{name}`:" in section for table in tables for name in table["header"])


def test_readme_is_the_report_of_the_results():
    assert (BENCH / "README.md").read_text() == load_report().render(), "run make bench-report"
