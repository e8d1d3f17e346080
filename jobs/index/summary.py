"""The index job's one-screen summaries: a build's, an update's."""

from __future__ import annotations

import argparse

import numpy as np

from jobs.index import calibrate
from jobs.index.update import Update
from jobs.ivf import CellPlan, Index, IvfParams
from jobs.ivf.manifest import Manifest
from jobs.knn import LshParams
from jobs.runlog import RunSummary


def calibration_line(measured: calibrate.Calibration | None, nprobe: int, given: bool) -> str:
    if measured is None:
        return "no (about 2.25 x sqrt(cells))" if not given else "no (--nprobe given)"
    at = measured.recall[min(nprobe, len(measured.recall)) - 1]
    chosen = "given" if given else f"the smallest reaching {measured.target:g}"
    return (
        f"recall@{measured.k} {at:.3f} at nprobe {nprobe} ({chosen}) on {measured.sample} catalog rows, self excluded"
    )


def model_line(manifest: Manifest) -> str:
    """The model, and how its vectors were made where the embed run said."""
    digest = manifest.weights_sha256
    made = [manifest.made_with(k) for k in ("precision", "backend")]
    parts = [manifest.model, f"{manifest.dim}-d", *(m for m in made if m)]
    return ", ".join(parts + ([f"weights {digest[:12]}"] if digest else []))


def built_rows(
    args: argparse.Namespace,
    manifest: Manifest,
    params: IvfParams,
    measured: calibrate.Calibration | None,
    plan: CellPlan,
    sizes: np.ndarray,
    lsh_params: LshParams | None,
    summary: RunSummary,
) -> list[tuple[str, object]]:
    return [
        ("embeddings", args.embeddings),
        ("index", args.output),
        ("model", model_line(manifest)),
        ("vectors indexed", manifest.count),
        (
            "IVF",
            f"{params.cells} cells (KMeans on {params.train_sample} vectors, {params.iterations} iterations), "
            f"default nprobe {params.nprobe}",
        ),
        ("calibrated", calibration_line(measured, params.nprobe, args.nprobe is not None)),
        (
            "layout",
            f"{plan.groups} groups in {len(manifest.files)} files; largest cell {int(sizes.max())} rows, "
            f"{int((sizes == 0).sum())} cells empty",
        ),
        (
            "LSH",
            f"{lsh_params.tables} tables x {lsh_params.hashes_per_table} hashes, bucketLength "
            f"{lsh_params.bucket_length:g}, {lsh_params.probes} probes"
            if lsh_params
            else "none",
        ),
        ("seconds", " ".join(f"{k} {v:.1f}" for k, v in summary.data["seconds"].items())),
    ]


def updated_rows(args: argparse.Namespace, after: Index, done: Update, summary: RunSummary) -> list[tuple[str, object]]:
    """An update's summary (or that of finding nothing to update)."""
    rows: list[tuple[str, object]] = [
        ("embeddings", args.embeddings),
        ("index", f"{args.output} (version {after.manifest.version})"),
    ]
    if done.nothing:
        rows.append(("changes", "none: the index already holds the table's rows; nothing written"))
    else:
        deltas = sum(1 for e in after.manifest.files if e.added_in)
        rows += [
            ("changes", f"{done.added} added, {done.dropped} dropped, {done.changed} changed (moved to their cells)"),
            ("vectors indexed", after.count),
            (
                "files",
                f"{len(after.manifest.files)} ({deltas} written by updates: {done.files_written} now, "
                f"{done.files_compacted} compacted)",
            ),
        ]
    if done.compared:
        rows.append(("compared", done.compared))
    drift = done.drift
    rows.append(
        (
            "drift",
            f"{drift['added_since_training']} rows added since training ({drift['trained_rows']} trained on); largest "
            f"cell {drift['largest_over_mean']}x the mean ({drift['training_largest_over_mean']}x at training)",
        )
    )
    advised = drift.get("rebuild_advised")
    rows.append(("advice", f"rebuild (--mode overwrite): {advised}" if advised else "none: the cells still fit"))
    rows.append(("seconds", " ".join(f"{k} {v:.1f}" for k, v in summary.data["seconds"].items())))
    return rows
