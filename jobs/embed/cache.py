"""embed, what the driver keeps between runs on one machine: the ONNX export of each model and weights, and the
candidates' measured speed, so that only a machine's first job pays for exporting and timing."""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

from jobs.embed.runtimes import cpu
from jobs.runlog import get_logger

log = get_logger("jobs.embed")
RUNTIME_PACKAGES = ("torch", "openvino", "onnxruntime")


def folder() -> Path:
    """$VEHICLE_SEARCH_CACHE, else $XDG_CACHE_HOME/vehicle-search, else ~/.cache/vehicle-search."""
    if os.environ.get("VEHICLE_SEARCH_CACHE"):
        return Path(os.environ["VEHICLE_SEARCH_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vehicle-search"


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "-"


def key(model: str, sha256: str, candidates: list[str], threads: int) -> str:
    """What a measurement depends on: model, weights, candidates, threads, CPU and runtime versions."""
    versions = [f"{p} {_version(p)}" for p in RUNTIME_PACKAGES]
    name, flags = cpu()
    speed = sorted(f for f in flags if f.startswith(("avx", "amx", "fma")))  # what decides a runtime's speed
    text = json.dumps([model, sha256, candidates, threads, f"{name} {os.cpu_count()} {' '.join(speed)}", versions])
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _write(path: Path, data: bytes) -> None:
    """Written whole or not at all: two jobs starting together never read half a file."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.{os.getpid()}")
        partial.write_bytes(data)
        partial.replace(path)
    except OSError as e:  # a read-only home (some cluster containers): the next run measures again
        log.info("could not keep %s (%s): the next run will measure again", path, e)


def recall(measurement: str) -> dict[str, float] | None:
    """The images/s an earlier run measured for this key, if any."""
    try:
        found = json.loads((folder() / "runtimes.json").read_text()).get(measurement)
    except (OSError, ValueError):
        return None
    return found["images_per_second"] if found else None


def remember(measurement: str, rates: dict[str, float]) -> None:
    path = folder() / "runtimes.json"
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):
        known = {}
    known[measurement] = {"images_per_second": rates, "measured": time.strftime("%Y-%m-%dT%H:%M:%S")}
    _write(path, json.dumps(known, indent=1).encode())


def onnx(model: str, sha256: str, build: Callable[[], bytes]) -> bytes:
    """The model's ONNX export, built once per model, weights and torch version."""
    path = folder() / "onnx" / f"{model}-{sha256[:16]}-torch{_version('torch')}.onnx"
    try:
        return path.read_bytes()
    except OSError:
        data = build()
        _write(path, data)
        return data
