"""The one search kernel, run by every search task: a chunk of queries against the catalog rows of the cells they
probe, streamed once, file by file; each file's cells are scored against every query that probes them, and a
running top-k per query keeps its neighbours' strings as they enter (or, for a range search, every close pair)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from jobs.ivf import Index
from jobs.knn import LshParams, probe_keys
from jobs.search.catalog import CatalogFiles
from jobs.search.results import PARTIAL_ARROW
from jobs.search.scoring import Wanted, cosine
from jobs.search.topk import Kept, Similar, TopK
from jobs.vectors import matrix_from_binary, values_from_binary

FILE_ROW = 1 << 32  # rows of a file being scored are numbered (file + 1) * FILE_ROW + position; kept rows below
QUERY_COLUMNS = ["qidx", "query_id", "query_path", "query_label"]


@dataclass
class Asked:
    """A chunk of queries: their rows, vectors, probed cells (CSR, nearest first; None: every cell) and, for catalog
    rows searching the catalog, their own cells."""

    rows: pa.RecordBatch  # qidx, query_id, query_path, query_label
    vectors: np.ndarray
    probes: tuple[np.ndarray, np.ndarray] | None
    own_cells: np.ndarray | None = None
    candidates: np.ndarray | None = None  # LSH: rows each query scored
    fallbacks: int = 0  # LSH: queries answered exactly instead

    @classmethod
    def probed(
        cls, batch: pa.RecordBatch, vectors: np.ndarray, index: Index, nprobe: int | None, wanted: Wanted
    ) -> Asked:
        """Queries with their nprobe nearest cells (more while those hold too few rows); nprobe None: every cell."""
        probes = None if nprobe is None else index.probe(vectors, nprobe, wanted.enough)
        own = batch.column("own_cell").to_numpy() if "own_cell" in batch.schema.names else None
        return cls(batch.select(QUERY_COLUMNS), vectors, probes, own)

    @classmethod
    def routed(cls, batch: pa.RecordBatch, dim: int) -> Asked:
        """Queries as a routed row carries them: vector bytes and probes (packed int32) of this tile's cells."""
        own, probes = batch.column("own_cell"), batch.column("probes")
        return cls(
            batch.select(QUERY_COLUMNS),
            matrix_from_binary(batch.column("vector"), dim),
            None if probes.null_count == len(batch) else values_from_binary(probes, np.int32),
            None if own.null_count == len(batch) else own.to_numpy(zero_copy_only=False),
        )

    def subset(self, chosen: np.ndarray) -> Asked:
        """These queries alone, probing every cell."""
        picked = np.flatnonzero(chosen)
        own = self.own_cells[picked] if self.own_cells is not None else None
        return Asked(self.rows.take(pa.array(picked)), self.vectors[picked], None, own)

    def probed_mask(self, cells: np.ndarray) -> np.ndarray:
        """The cells any query probes, among `cells` (a mask)."""
        if self.probes is None:
            return cells
        mask = np.zeros(len(cells), bool)
        mask[self.probes[0]] = True
        return mask & cells


def answer(
    catalog: CatalogFiles,
    asked: Asked,
    wanted: Wanted,
    cells: np.ndarray,
    lsh: tuple[np.ndarray, LshParams] | None = None,
) -> Iterator[pa.RecordBatch]:
    """Candidates of the asked queries among the rows of the cells they probe within `cells` (a mask), as PARTIAL_ARROW
    rows: each query's k nearest after the last file or, with wanted.min_similarity, each file's close pairs.

    lsh: (the LSH model's projections, its parameters): score only rows that share a probed bucket with the query;
    the queries' candidate counts are left in asked.candidates.
    """
    probed = asked.probed_mask(cells)
    query_sq = np.einsum("ij,ij->i", asked.vectors, asked.vectors)
    ids = asked.rows.column("query_id").to_pylist() if wanted.exclude_self else None
    keys = probe_keys(asked.vectors, *lsh) if lsh is not None else None
    asked.candidates = np.zeros(len(asked.vectors), np.int64)
    keep, kept = TopK(len(asked.vectors), wanted.k), Kept()
    for file, held in catalog.shards(probed):
        base = (file + 1) * FILE_ROW
        own_row = held.own_rows(ids, asked.own_cells) if ids is not None else None
        if wanted.min_similarity is not None:
            close = Similar(wanted.min_similarity, query_sq, held.squares, base)
            held.score(close, asked.vectors, asked.probes, own_row, base)
            q, positions, d2 = close.found()
            yield candidates(
                asked.rows, q, query_sq, held.strings(positions), np.arange(len(positions)), held.squares[positions], d2
            )
            continue
        if keys is not None:
            held.score_lsh(keep, asked.vectors, keys, own_row, base, asked.candidates)
        else:
            held.score(keep, asked.vectors, asked.probes, own_row, base)
        kept.take_in(keep, held, base)
    if wanted.min_similarity is None:
        q, rows, d2 = keep.found()
        yield candidates(asked.rows, q, query_sq, kept.rows, rows, kept.squares, d2)


def candidates(
    queries: pa.RecordBatch,
    query_rows: np.ndarray,
    query_sq: np.ndarray,
    catalog: pa.Table,
    catalog_rows: np.ndarray,
    catalog_sq: np.ndarray,
    d2: np.ndarray,
) -> pa.RecordBatch:
    """Candidate rows: query row i matched catalog row j at squared distance d2 (all arrays aligned)."""
    similarity = cosine(query_sq[query_rows], catalog_sq[catalog_rows], d2)
    q, c = pa.array(query_rows, pa.int64()), pa.array(catalog_rows, pa.int64())
    columns = [queries.column(name).take(q) for name in QUERY_COLUMNS]
    columns += [
        catalog.column(name).take(c).combine_chunks() if isinstance(catalog, pa.Table) else catalog.column(name).take(c)
        for name in ("image_id", "path", "label")
    ]
    return pa.RecordBatch.from_arrays(
        [*columns, pa.array(np.sqrt(d2).astype(np.float32)), pa.array(similarity)], schema=PARTIAL_ARROW
    )
