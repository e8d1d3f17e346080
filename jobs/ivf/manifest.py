"""An index version's manifest as typed fields: what it holds, how its vectors were made, how it was calibrated, and
its catalog files with their deletion lists. index.json is this, written as JSON (jobs.ivf.save)."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any


@dataclass(frozen=True)
class CatalogFile:
    """One catalog file: its name, rows and bytes, its range of cells (and of the cell groups it was written in), the
    file listing its deleted rows and how many, and the version whose update added it (None: the build's)."""

    name: str
    rows: int
    bytes: int
    first_cell: int
    last_cell: int
    first_group: int = 0
    last_group: int = 0
    deleted: str | None = None
    deleted_rows: int = 0
    added_in: int | None = None

    @classmethod
    def of(cls, entry: dict[str, Any]) -> CatalogFile:
        return cls(**{f.name: entry[f.name] for f in fields(cls) if f.name in entry})


@dataclass(frozen=True)
class Manifest:
    """A version of the index: its number, model, dimension and rows, its catalog files, the search method it
    defaults to, the weights and runtime its vectors were made with, its calibration, the embeddings table's files it
    last read (an update compares against them), and how far it has drifted from the cells' training."""

    version: int
    model: str
    dim: int
    count: int
    files: tuple[CatalogFile, ...]
    default_method: str = "ivf"
    weights_sha256: str | None = None
    weights_source: str | None = None
    embedded_with: dict[str, str] | None = None
    calibration: dict[str, Any] | None = None
    table_files: dict[str, Any] | None = None
    fingerprint: str | None = None
    trained_rows: int | None = None
    added_since_training: int = 0
    training_largest_over_mean: float | None = None

    @classmethod
    def of(cls, meta: dict[str, Any]) -> Manifest:
        known = {f.name for f in fields(cls)} - {"files", "version"}
        return cls(
            version=meta.get("version", 1),
            files=tuple(CatalogFile.of(e) for e in meta.get("files", [])),
            **{k: v for k, v in meta.items() if k in known and v is not None},
        )

    @property
    def catalog_bytes(self) -> int:
        return sum(f.bytes for f in self.files)

    @property
    def calibrated_recall(self) -> float | None:
        """The recall@k the build measured on the index's own rows at its default nprobe."""
        return (self.calibration or {}).get("recall")

    @property
    def target_recall(self) -> float | None:
        return (self.calibration or {}).get("target_recall")

    def made_with(self, key: str) -> str | None:
        """How the catalog's vectors were made: their precision or backend (None where not recorded)."""
        return (self.embedded_with or {}).get(key)
