"""Write bench/README.md from bench/results/*.json: each benchmark's current tables, with the machine it ran on.

  python bench/report.py        (make bench-report)

A run of a benchmark replaces its JSON, so a new run replaces its tables; what was tried before is in git and in
bench/tried.md, which is copied in at the end.
"""

from __future__ import annotations

import json
from pathlib import Path

BENCH = Path(__file__).resolve().parent
HEAD = """# Benchmarks

The current results of every benchmark, one section each, written by `make bench-report` from
`bench/results/*.json`; rerun a benchmark to replace its section. Ratios are within one run on one machine:
the machines here are shared, noisy and unlike each other, so compare a section's rows, not sections.

| benchmark | command | what it measures |
|---|---|---|
| search | `make bench-search` | sizes x query counts: build, search, end to end beside FAISS and nearestByJoin |
| shifted | `make bench-shifted` | queries unlike the catalog: estimated and true recall, the cost of measuring |
| index_update | `make bench-update` | index --mode incremental after adds, drops and ten 1% updates, beside rebuilds |
| embed | `make bench-embed` | images/s per model and runtime x precision: model-only, and the whole job |
| photo_query | `python bench/photo_query.py` | one photo against a 100k index, end to end and by part |
| bf16_fidelity | `python bench/bf16_fidelity.py` | each bf16 backend against fp32 vectors on real photos |
"""


def markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(str(c).replace("|", "/") for c in row) + " |" for row in rows]


def machine_line(machine: dict) -> str:
    flags = "+".join(machine.get("vector_flags", [])) or "no AVX2"
    return (
        f"{machine.get('cpu', '?')}, {machine.get('cores', '?')} cores, {flags}; "
        f"fresh memory {machine.get('fresh_memory_gb_s', '?')} GB/s"
    )


def data_lines(data: dict | list[dict]) -> list[str]:
    """One line per data set a benchmark measured: what it is, its size and where it came from."""
    return [
        f"data: {d['what']}; {d['rows']:,} rows x {d['dimension']}, {d['row_bytes']:,} bytes a row; from {d['from']}"
        for d in (data if isinstance(data, list) else [data])
    ]


def section(path: Path) -> list[str]:
    """One results file as markdown: its name, the machine and data, then what it printed, each table followed by
    its columns' definitions (where they differ from the table before)."""
    data = json.loads(path.read_text())
    lines = [f"## {path.stem}", "", f"{data.get('at', '?')} on {machine_line(data.get('machine', {}))}", ""]
    for line in data_lines(data["data"]):
        lines += [line, ""]
    defined: dict[str, str] = {}
    for item in data.get("printed") or []:
        if "note" in item:
            lines += [item["note"], ""]
            continue
        lines += [f"**{item['title']}**", "", *markdown_table(item["header"], item["rows"]), ""]
        if item["columns"] != defined:
            lines += [f"- `{name}`: {meaning}" for name, meaning in item["columns"].items()] + [""]
            defined = item["columns"]
    return lines


def render() -> str:
    """bench/README.md as it should read from the results on disk."""
    lines = HEAD.splitlines() + [""]
    for path in sorted((BENCH / "results").glob("*.json")):
        lines += section(path)
    tried = BENCH / "tried.md"
    if tried.exists():
        lines += tried.read_text().splitlines()
    return "\n".join(lines).rstrip() + "\n"


def main() -> None:
    (BENCH / "README.md").write_text(render())
    print(f"wrote {BENCH / 'README.md'} from {len(list((BENCH / 'results').glob('*.json')))} result file(s)")


if __name__ == "__main__":
    main()
