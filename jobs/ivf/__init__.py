"""The IVF index as one object: its cells (centroids, sizes), the groups of cells a search task scores, and probing.

Cells are numbered in locality order (nearby centroids get nearby numbers), so the cells a query probes
fall into few groups; a group is a run of consecutive cells holding at most `max_group_rows` rows, and
a cell larger than that is split over several groups.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pyspark.sql import SparkSession

from jobs import storage
from jobs.errors import UsageError
from jobs.ivf.manifest import Manifest
from jobs.knn import LshParams, squared_distances

FORMAT_VERSION = 3
MANIFESTS = "_manifests"  # one immutable manifest per version: vN.json
PROBE_BLOCK = 2048  # queries whose distances to every centroid are computed and ranked at once


def unit_length(centroids: np.ndarray) -> bool:
    """Whether every centroid is of unit length (KMeans with cosine distance: cosine cells)."""
    return bool(len(centroids)) and bool(np.abs(np.linalg.norm(centroids, axis=1) - 1).max() < 1e-4)


def cell_scores(vectors: np.ndarray, centroids: np.ndarray, unit: bool) -> np.ndarray:
    """Each vector's score to each centroid, lowest nearest: the one order in which a search probes cells, the index
    assigns rows and its calibration counts recall. For unit centroids (cosine cells) the negated dot product, else
    the squared distance."""
    if not unit:
        return squared_distances(vectors, centroids)
    scores = vectors @ centroids.T
    return np.negative(scores, out=scores)


@dataclass(frozen=True)
class IvfParams:
    """How the index was built and how it searches by default."""

    cells: int
    nprobe: int
    train_sample: int
    iterations: int
    max_group_rows: int
    seed: int = 42


@dataclass
class CellPlan:
    """Rows per cell, and the groups each cell's rows are stored in (first_group .. first_group + parts - 1)."""

    sizes: np.ndarray
    first_group: np.ndarray
    parts: np.ndarray

    @property
    def groups(self) -> int:
        return int((self.first_group + self.parts).max()) if len(self.sizes) else 0

    @classmethod
    def build(cls, sizes: np.ndarray, max_group_rows: int) -> CellPlan:
        """Greedy runs of consecutive cells up to max_group_rows rows; a bigger cell gets groups of its own."""
        first = np.zeros(len(sizes), np.int32)
        parts = np.ones(len(sizes), np.int32)
        group, rows = 0, 0
        for cell, size in enumerate(sizes):
            if size > max_group_rows:
                group += 1 if rows else 0
                first[cell], parts[cell] = group, -(-size // max_group_rows)
                group, rows = group + parts[cell], 0
                continue
            if rows and rows + size > max_group_rows:
                group, rows = group + 1, 0
            first[cell] = group
            rows += size
        return cls(np.asarray(sizes, np.int64), first, parts)


@dataclass
class Index:
    """A loaded index: where it lives, what it holds, its cells and parameters (see index.json)."""

    uri: str
    model: str
    dim: int
    count: int
    params: IvfParams
    centroids: np.ndarray
    plan: CellPlan
    lsh: LshParams | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    lsh_vectors: np.ndarray | None = field(default=None, repr=False, compare=False)  # kept beside the cells
    _unit: bool | None = field(default=None, repr=False, compare=False)
    _manifest: Manifest | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def manifest(self) -> Manifest:
        """The version's manifest as typed fields (meta is the same as written)."""
        if self._manifest is None:
            self._manifest = Manifest.of(self.meta)
        return self._manifest

    @property
    def catalog_uri(self) -> str:
        return f"{self.uri}/catalog"

    @property
    def cells(self) -> int:
        return len(self.centroids)

    def probe(self, queries: np.ndarray, nprobe: int, min_rows: int) -> tuple[np.ndarray, np.ndarray]:
        """Each query's nprobe nearest cells, nearest first, and further cells while they hold < min_rows rows.

        Returns CSR (flat cells, offsets).
        """
        lists = [
            cell
            for first in range(0, len(queries), PROBE_BLOCK)
            for cell in self.probe_block(queries[first : first + PROBE_BLOCK], nprobe, min_rows)
        ]
        counts = np.array([len(c) for c in lists], np.int64)
        return np.concatenate(lists).astype(np.int32) if lists else np.empty(0, np.int32), np.concatenate(
            [[0], np.cumsum(counts)]
        ).astype(np.int32)

    def probe_block(self, queries: np.ndarray, nprobe: int, min_rows: int) -> list[np.ndarray]:
        """probe's cells for a block of queries (a block's distances stay in cache: 3.5x faster than all at once)."""
        n, p = len(queries), min(max(nprobe, 1), self.cells)
        queries = queries.astype(np.float32, copy=False)
        d2 = cell_scores(queries, self.centroids, self.unit_centroids)
        near = np.argpartition(d2, p - 1, axis=1)[:, :p] if p < self.cells else np.tile(np.arange(self.cells), (n, 1))
        near = np.take_along_axis(near, np.argsort(np.take_along_axis(d2, near, axis=1), axis=1), axis=1)
        lists = list(near)
        target = min(min_rows, int(self.plan.sizes.sum()))
        for row in np.flatnonzero(self.plan.sizes[near].sum(axis=1) < target):
            ranked = np.argsort(d2[row], kind="stable")
            lists[row] = ranked[: max(p, int(np.searchsorted(np.cumsum(self.plan.sizes[ranked]), target)) + 1)]
        return lists

    @property
    def unit_centroids(self) -> bool:
        if self._unit is None:
            self._unit = unit_length(self.centroids)
        return self._unit

    def files_holding(self, cells: np.ndarray) -> np.ndarray:
        """The manifest positions of the catalog files whose range of cells holds one of these (a mask per cell)."""
        files = self.manifest.files
        first = np.array([f.first_cell for f in files], np.int64)
        last = np.array([f.last_cell for f in files], np.int64)
        before = np.concatenate([[0], np.cumsum(cells)])  # marked cells below each cell number
        return np.flatnonzero(before[last + 1] > before[first]) if len(files) else np.empty(0, np.int64)

    @property
    def catalog_bytes(self) -> int:
        return self.manifest.catalog_bytes


def save(
    spark: SparkSession,
    uri: str,
    meta: dict[str, Any],
    centroids: np.ndarray,
    plan: CellPlan,
    lsh_vectors: np.ndarray | None = None,
) -> None:
    """A new version of the index at uri: its cells (centroids and the cell plan, cells-vN.npz), then its manifest
    (_manifests/vN.json), which makes it the index's current version, then index.json, a readable copy.

    Readers take the newest manifest, so a reader sees one version whole; UsageError if another writer took N first.
    """
    version = meta.get("version", 1)
    buffer = io.BytesIO()
    np.savez(
        buffer,
        centroids=centroids.astype(np.float32),
        sizes=plan.sizes,
        first_group=plan.first_group,
        parts=plan.parts,
        **({} if lsh_vectors is None else {"lsh_vectors": lsh_vectors.astype(np.float32)}),
    )
    cells = f"cells-v{version}.npz"
    storage.write_bytes(spark, f"{uri}/{cells}", buffer.getvalue())
    text = json.dumps({"format_version": FORMAT_VERSION, **meta, "version": version, "cells": cells}, indent=2)
    if not storage.create_new(spark, f"{uri}/{MANIFESTS}/v{version:08d}.json", text.encode()):
        raise UsageError(f"index {uri} was updated by another run meanwhile (version {version}); run this one again")
    storage.write_text(spark, f"{uri}/index.json", text)


def versions(spark: SparkSession, uri: str) -> list[int]:
    """The index's versions, oldest first."""
    found = storage.names(spark, f"{uri}/{MANIFESTS}")
    return sorted(int(n[1:-5]) for n in found if n.startswith("v") and n.endswith(".json") and n[1:-5].isdigit())


def referenced(meta: dict) -> set[str]:
    """The files a version's manifest refers to, relative to the index's folder."""
    return {
        meta["cells"],
        *(f"catalog/{e['name']}" for e in meta["files"]),
        *(f"catalog/{e['deleted']}" for e in meta["files"] if e.get("deleted")),
    }


def remove_unused(spark: SparkSession, uri: str, version: int) -> None:
    """Delete what neither this version nor the one before refers to: a search that began on the version before
    still finds every file it needs (and a killed update's files go at the next update)."""
    kept = set()
    for v in (version - 1, version):
        path = f"{uri}/{MANIFESTS}/v{v:08d}.json"
        if storage.exists(spark, path):
            kept |= referenced(json.loads(storage.read_text(spark, path)))
    for v in versions(spark, uri):
        if v < version - 1:
            storage.delete(spark, f"{uri}/{MANIFESTS}/v{v:08d}.json")
    candidates = [n for n in storage.names(spark, uri) if n.startswith("cells-v")]
    candidates += [f"catalog/{n}" for n in storage.names(spark, f"{uri}/catalog") if n.endswith(".parquet")]
    candidates += [f"catalog/_deleted/{n}" for n in storage.names(spark, f"{uri}/catalog/_deleted")]
    for name in candidates:
        if name not in kept:
            storage.delete(spark, f"{uri}/{name}")


def load(spark: SparkSession, uri: str) -> Index:
    """The index's newest version; UsageError if there is none, or if an older version of this tool wrote it."""
    known = versions(spark, uri)
    manifest = f"{uri}/{MANIFESTS}/v{known[-1]:08d}.json" if known else f"{uri}/index.json"
    if not storage.exists(spark, manifest):
        raise UsageError(f"{uri} is not an index (no index.json); build one with the index job")
    meta = json.loads(storage.read_text(spark, manifest))
    if meta.get("format_version") != FORMAT_VERSION:
        raise UsageError(f"index {uri} was written by an older version of this tool; rebuild it with the index job")
    with np.load(io.BytesIO(storage.read_bytes(spark, f"{uri}/{meta['cells']}")), allow_pickle=False) as cells:
        plan = CellPlan(cells["sizes"], cells["first_group"], cells["parts"])
        centroids = cells["centroids"]
        vectors = cells["lsh_vectors"] if "lsh_vectors" in cells.files else None
    lsh = LshParams(**meta["lsh"]) if meta.get("lsh") else None
    if lsh and vectors is None:  # LSH functions kept in a Spark ML model folder, as built before
        raise UsageError(f"index {uri} was written by an older version of this tool; rebuild it with the index job")
    params = IvfParams(**meta["ivf"])
    return Index(uri, meta["model"], meta["dim"], meta["count"], params, centroids, plan, lsh, meta, vectors)
