"""Shared bench helpers: timing, results tables on stdout and in JSON under bench/results/ (bench/report.py turns
the JSON into bench/README.md)."""

from __future__ import annotations

import functools
import json
import os
import platform
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
PRINTED: list[dict[str, Any]] = []  # the tables and notes this run printed, kept in its JSON for the report


LOWER, HIGHER = "lower is better", "higher is better"  # how the columns' definitions say which way is better


def timed(fn: Callable[[], Any], repeat: int = 1) -> tuple[float, Any]:
    """Best wall time of `repeat` runs, and the last result."""
    best, result = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def print_table(title: str, header: list[str], rows: list[list[Any]], columns: dict[str, str]) -> None:
    """A table on stdout and in the run's JSON; columns defines each header: its unit, which way is better, what it
    measures (the report prints the definitions under the table)."""
    if missing := [h for h in header if h not in columns]:
        raise ValueError(f"columns not defined: {missing}")
    cells = [[f"{c:.3f}" if isinstance(c, float) else str(c) for c in row] for row in rows]
    PRINTED.append({"title": title, "header": header, "rows": cells, "columns": {h: columns[h] for h in header}})
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(header)]
    print(f"\n{title}\nmachine: {machine_line()}")
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)))


def note(text: str) -> None:
    """A line printed under the tables, and kept for the report."""
    print(text)
    PRINTED.append({"note": text})


DATA_FIELDS = ("what", "rows", "dimension", "row_bytes", "from")


def described(what: str, rows: int, dimension: int | str, row_bytes: int, source: str) -> dict[str, Any]:
    """What a benchmark's data is: the description every results JSON carries and the report prints."""
    return dict(zip(DATA_FIELDS, (what, rows, dimension, row_bytes, source)))


def write_json(name: str, data: dict[str, Any]) -> Path:
    """The run's results under bench/results/, with the machine; data["data"] describes the data (one described()
    or a list of them)."""
    descriptions = data.get("data")
    descriptions = descriptions if isinstance(descriptions, list) else [descriptions]
    if not all(isinstance(d, dict) and set(DATA_FIELDS) <= set(d) for d in descriptions):
        raise ValueError("a results JSON needs data: described(...) for each data set it measured")
    RESULTS.mkdir(parents=True, exist_ok=True)
    data = {
        "machine": {
            "cpu": _cpu(),
            "cores": os.cpu_count(),
            "vector_flags": _vector_flags(),
            "fresh_memory_gb_s": round(fresh_memory_rate(), 2),
            "python": platform.python_version(),
        },
        "at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "printed": PRINTED,
        **data,
    }
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(data, indent=2, default=str))
    print(f"\nwrote {path}")
    return path


def _cpu() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _vector_flags() -> list[str]:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return []
    return sorted(f for f in set(flags) if f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16"))


@functools.cache
def fresh_memory_rate() -> float:
    """GB/s of writing 256 MiB of memory this process never touched: some VMs back a guest's pages only when first
    touched (~50 us a 4 KiB page, against ~0.1 us), which slows whatever allocates, and varies by the hour."""
    import numpy as np

    start = time.perf_counter()
    np.ones(256 << 18, np.float32)
    return (256 << 20) / (time.perf_counter() - start) / 1e9


def machine_line() -> str:
    """What a table's numbers were measured on: CPU, cores, vector extensions, and how fast fresh memory was."""
    flags = "+".join(_vector_flags()) or "no AVX2"
    return f"{_cpu()}, {os.cpu_count()} cores, {flags}; fresh memory {fresh_memory_rate():.1f} GB/s"
