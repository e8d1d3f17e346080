"""Print the demo's closing summary from the run summaries the jobs wrote under OUT."""

import json
import sys
from pathlib import Path


def summary_lines(out: Path) -> list[str]:
    embed = json.loads((out / "embeddings" / "_summary.json").read_text())
    evaluation = json.loads((out / "evaluation.json").read_text())
    metrics = evaluation["metrics"]
    k = evaluation["k"]
    method = evaluation["method"]  # the approximate method evaluate measured (the index's default)
    counts = embed["counts"]
    return [
        "== demo summary " + "=" * 46,
        f"  model                {embed['model']} ({embed['precision']}), weights {embed['weights']['source']}",
        f"  catalog images       {counts['table_rows']} in the table; this run embedded {counts['embedded']}, "
        f"failed {counts['failed']}, skipped {counts['skipped']} unchanged",
        f"  recall@{k} {method}/exact   {metrics[f'recall@{k}']:.3f} over {metrics['queries']} queries",
        f"  precision@{k}         {metrics.get(f'{method}_precision@{k}', float('nan')):.3f} ({method}), "
        f"{metrics.get(f'exact_precision@{k}', float('nan')):.3f} (exact); "
        f"mAP@{k} {metrics.get(f'{method}_mAP@{k}', float('nan')):.3f}",
        f"  report               {(out / 'report' / 'index.html').resolve()}",
    ]


if __name__ == "__main__":
    print("\n".join(summary_lines(Path(sys.argv[1]))))
