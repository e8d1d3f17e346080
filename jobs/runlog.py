"""Logging, stage timers and the JSON run summary every job writes beside its output."""

from __future__ import annotations

import json
import logging
import platform
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Any

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def get_logger(name: str) -> logging.Logger:
    """A logger that writes to stderr on the driver and in Python workers (whose stderr Spark keeps)."""
    logger = logging.getLogger(name)
    if not logging.getLogger().handlers and not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(LOG_FORMAT, "%H:%M:%S"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    return logger


def versions() -> dict[str, str]:
    import numpy
    import pyspark

    found = {"python": platform.python_version(), "pyspark": pyspark.__version__, "numpy": numpy.__version__}
    for module in ("torch", "PIL", "pyarrow", "pandas"):
        if module in sys.modules:
            found[module] = getattr(sys.modules[module], "__version__", "?")
    return found


class RunSummary:
    """Counts, parameters and seconds per stage of one job run; serialised as the run summary JSON."""

    def __init__(self, job: str, parameters: dict[str, Any]) -> None:
        self.job = job
        self.started = time.time()
        self.data: dict[str, Any] = {
            "job": job,
            "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "parameters": {k: v for k, v in parameters.items() if not _secret(k)},
            "counts": {},
            "seconds": {},
        }

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        log = get_logger(f"jobs.{self.job}")
        log.info("%s ...", name)
        start = time.perf_counter()
        try:
            yield
        finally:
            seconds = time.perf_counter() - start
            self.data["seconds"][name] = round(self.data["seconds"].get(name, 0.0) + seconds, 3)
            log.info("%s done in %.1f s", name, seconds)

    def count(self, **counts: int) -> None:
        self.data["counts"].update(counts)

    def set(self, **values: Any) -> None:
        self.data.update(values)

    def finish(self) -> dict[str, Any]:
        self.data["seconds"]["total"] = round(time.time() - self.started, 3)
        self.data["versions"] = versions()
        return self.data

    def to_json(self) -> str:
        return json.dumps(self.data, indent=2, sort_keys=False, default=str)


def _secret(key: str) -> bool:
    return any(word in key.lower() for word in ("secret", "password", "token", "credential", "access_key"))


def print_summary(title: str, rows: list[tuple[str, Any]], notes: list[str] | None = None) -> None:
    """A one-screen summary on stdout: a title, aligned key/value rows, then notes."""
    width = max(len(k) for k, _ in rows)
    lines = [f"== {title} " + "=" * max(0, 60 - len(title))]
    lines += [f"  {k.ljust(width)}  {v}" for k, v in rows]
    lines += [f"  {n}" for n in notes or []]
    print("\n".join(lines), flush=True)


class Stopwatch:
    """Seconds a task spends on each of its parts: blocks timed by name, and the time an iterator takes to give its
    items."""

    def __init__(self) -> None:
        self.spent: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.spent[name] = self.spent.get(name, 0.0) + time.perf_counter() - started

    def timed(self, name: str, items: Iterator[Any]) -> Iterator[Any]:
        """The items, the time taken to produce each added to `name`."""
        while True:
            with self(name):
                item = next(items, _END)
            if item is _END:
                return
            yield item

    def line(self) -> str:
        return ", ".join(f"{seconds:.1f} s {name}" for name, seconds in self.spent.items())


_END = object()
