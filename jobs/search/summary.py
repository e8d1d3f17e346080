"""The search's one-screen summary: what was asked, how it ran, what it read, and the recall it measured."""

from __future__ import annotations

import argparse

from jobs import ivf
from jobs.runlog import RunSummary
from jobs.search.recall import Estimate


def rows(
    args: argparse.Namespace,
    index: ivf.Index,
    nprobe: int,
    measured: Estimate | None,
    count: int,
    written: int,
    touched: dict,
    summary: RunSummary,
    seconds: float,
) -> list[tuple[str, object]]:
    """The summary's rows, in the order a reader asks: what, how, the recall, what was read, how long."""
    excluding = args.exclude_self or args.all or args.duplicates
    method = args.method + (f", nprobe {nprobe} of {index.cells} cells" if args.method == "ivf" else "")
    rows = [
        ("index", f"{args.index} ({index.count} images, {index.model})"),
        ("queries", count),
        ("method", f"{method}, k={args.k}" + (", excluding self" if excluding else "")),
        ("duplicate pairs" if args.duplicates else "neighbour rows", written),
        ("output", args.output),
        ("plan", touched["plan"]),
        (
            "read",
            f"{touched['catalog_bytes_read'] / 2**20:.1f} of {touched['catalog_bytes'] / 2**20:.1f} MiB of the catalog "
            f"({touched['catalog_bytes_read'] / max(touched['catalog_bytes'], 1):.2f}x), "
            f"{touched['row_groups_read']} row groups, "
            f"{touched['catalog_rows_scanned']} rows scored; {touched['cells_probed']} of {touched['cells']} cells "
            f"probed",
        ),
        (
            "seconds",
            f"{summary.data['seconds']['total']:.1f} total, {seconds:.1f} searching "
            f"({summary.data['queries_per_second']} queries/s)",
        ),
    ]
    if measured:
        rows.insert(3, (f"recall@{args.k}", measured.line()))
    elif args.method == "ivf" and nprobe < index.cells:
        calibrated = index.manifest.calibrated_recall
        rows.insert(3, (f"recall@{args.k}", f"not measured (--recall-sample); the index's own rows: {calibrated}"))
    if args.duplicates:
        rows.append(("images with a pair", touched["images_with_pairs"]))
    if args.groups:
        rows.append(
            (
                "duplicate groups",
                f"{touched['groups']} groups, largest {touched['largest_group']} images -> {args.groups}",
            )
        )
    if args.method == "lsh":
        rows.append(
            ("lsh fallbacks", f"{touched['lsh_fallback_queries']} queries had < k candidates and were answered exactly")
        )
    return rows
