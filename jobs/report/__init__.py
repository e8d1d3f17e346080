"""report: neighbours table -> contact sheets (PNG), a self-contained HTML gallery and an embedding map.

Runs on the driver: it reads the (small) neighbours table and the images it names through the same
URIs (local, s3a://, ...). Unreadable images become placeholders that say why.
"""

from __future__ import annotations

import argparse
import hashlib
import html
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageFont
from pyspark.sql import SparkSession
from pyspark.sql import functions as F

from jobs import storage
from jobs.errors import UsageError
from jobs.imaging import ImageError, decode
from jobs.runlog import RunSummary, get_logger, print_summary

log = get_logger("jobs.report")
TILE = 200
PAD = 10
CAPTION = 46
HEADER = 34
GAP = 24  # between the query and its neighbours
MATCH, MISMATCH, QUERY, INK, PAPER = (46, 160, 67), (214, 39, 40), (31, 119, 180), (33, 33, 33), (250, 250, 250)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--neighbours", required=True, help="neighbours table written by search")
    parser.add_argument("--output", required=True, help="local folder for index.html, sheets/ and embedding_map.png")
    parser.add_argument("--embeddings", action="append", default=[], help="embeddings table(s): labels of the queries and the points of the map (repeatable)")
    parser.add_argument("--evaluation", help="evaluation JSON written by evaluate, shown in the gallery")
    parser.add_argument("--max-queries", type=int, default=50, help="contact sheets for at most this many queries")
    parser.add_argument("--map-points", type=int, default=5000, help="points drawn on the embedding map (sampled)")


def font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    import matplotlib

    path = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
    return ImageFont.truetype(str(path), size) if path.exists() else ImageFont.load_default()


def sheet_size(k: int, tile: int = TILE) -> tuple[int, int]:
    """Width and height of a contact sheet with one query and k neighbours."""
    return PAD + (k + 1) * (tile + PAD) + GAP, HEADER + tile + CAPTION + PAD


def placeholder(reason: str, tile: int = TILE) -> Image.Image:
    img = Image.new("RGB", (tile, tile), (235, 235, 235))
    draw = ImageDraw.Draw(img)
    draw.line((0, 0, tile, tile), fill=(200, 200, 200), width=2)
    draw.line((0, tile, tile, 0), fill=(200, 200, 200), width=2)
    words, lines, line = reason.split(), [], ""
    for word in ["image", "unavailable:", *words]:
        if len(line) + len(word) > 24:
            lines.append(line)
            line = ""
        line = f"{line} {word}".strip()
    lines.append(line)
    draw.multiline_text((8, 8), "\n".join(lines[:8]), fill=INK, font=font(13), spacing=3)
    img.info["placeholder"] = reason
    return img


def thumbnail(spark: SparkSession, uri: str | None, tile: int = TILE) -> Image.Image:
    """The image fitted in a tile x tile square, or a placeholder saying why not."""
    if not uri:
        return placeholder("no path", tile)
    try:
        img, _, _ = decode(storage.read_bytes(spark, uri))
    except ImageError as e:
        return placeholder(str(e), tile)
    except Exception as e:  # missing file, permissions, object store errors
        return placeholder(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:120], tile)
    img.thumbnail((tile, tile), Image.LANCZOS)
    framed = Image.new("RGB", (tile, tile), PAPER)
    framed.paste(img, ((tile - img.width) // 2, (tile - img.height) // 2))
    return framed


def _clip(text: str, width: int, face) -> str:  # type: ignore[no-untyped-def]
    while text and face.getlength(text) > width:
        text = text[:-2] + "…" if len(text) > 1 else ""
    return text


@dataclass
class Sheet:
    query_id: str
    query_path: str
    query_label: str | None
    neighbours: pd.DataFrame

    @property
    def precision(self) -> float | None:
        if self.query_label is None:
            return None
        return float((self.neighbours["neighbor_label"] == self.query_label).mean())


def draw_sheet(spark: SparkSession, sheet: Sheet, k: int, cache: dict[str, Image.Image]) -> Image.Image:
    """Query on the left, then its neighbours in rank order with rank, label and similarity."""
    width, height = sheet_size(k)
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    title, small, bold = font(15), font(13), font(14)
    name = sheet.query_path.rsplit("/", 1)[-1]
    heading = f"query: {name}" + (f"   label: {sheet.query_label}" if sheet.query_label else "")
    if sheet.precision is not None:
        heading += f"   precision@{len(sheet.neighbours)}: {sheet.precision:.2f}"
    draw.text((PAD, 9), _clip(heading, width - 2 * PAD, title), fill=INK, font=title)

    def tile(path: str) -> Image.Image:
        if path not in cache:
            cache[path] = thumbnail(spark, path)
        return cache[path]

    top = HEADER
    canvas.paste(tile(sheet.query_path), (PAD, top))
    draw.rectangle((PAD - 3, top - 3, PAD + TILE + 2, top + TILE + 2), outline=QUERY, width=3)
    draw.text((PAD, top + TILE + 6), "QUERY", fill=QUERY, font=bold)
    draw.text((PAD, top + TILE + 24), _clip(sheet.query_label or "", TILE, small), fill=INK, font=small)
    for i, row in enumerate(sheet.neighbours.itertuples(index=False)):
        x = PAD + GAP + (i + 1) * (TILE + PAD)
        canvas.paste(tile(row.neighbor_path), (x, top))
        colour = None
        if sheet.query_label is not None and row.neighbor_label is not None:
            colour = MATCH if row.neighbor_label == sheet.query_label else MISMATCH
        if colour:
            draw.rectangle((x - 3, top - 3, x + TILE + 2, top + TILE + 2), outline=colour, width=3 if colour == MATCH else 5)
        mark = "" if colour is None else ("✓ " if colour == MATCH else "✗ ")
        draw.text((x, top + TILE + 6), f"#{row.rank}  sim {row.similarity:.3f}", fill=INK, font=bold)
        draw.text((x, top + TILE + 24), _clip(mark + (row.neighbor_label or "(no label)"), TILE, small), fill=colour or INK, font=small)
    return canvas


def embedding_map(points: pd.DataFrame, out: Path, spark: SparkSession, thumbs: int = 16) -> None:
    """Scatter of the 2-D PCA projection coloured by label, with a few thumbnails; PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.offsetbox import AnnotationBbox, OffsetImage

    fig, ax = plt.subplots(figsize=(11, 8), dpi=110)
    labels = points["label"].fillna("(no label)")
    names = sorted(labels.unique())
    cmap = plt.get_cmap("tab20" if len(names) > 10 else "tab10")
    for i, name in enumerate(names):
        chosen = labels == name
        ax.scatter(points.loc[chosen, "x"], points.loc[chosen, "y"], s=14, alpha=0.75, color=cmap(i % cmap.N), label=name if len(names) <= 25 else None)
    # one representative per label (the point nearest its label's median), offset so points stay visible
    labelled = points.assign(label=labels)
    medians = labelled.groupby("label")[["x", "y"]].transform("median")
    spread = (labelled["x"] - medians["x"]) ** 2 + (labelled["y"] - medians["y"]) ** 2
    representatives = labelled.loc[spread.groupby(labelled["label"]).idxmin()].head(thumbs)
    for i, row in enumerate(representatives.itertuples()):
        img = thumbnail(spark, row.path, 64)
        offset = (40 if i % 2 else -40, 36 if (i // 2) % 2 else -36)
        ax.add_artist(AnnotationBbox(OffsetImage(np.asarray(img), zoom=0.6), (row.x, row.y), xybox=offset, boxcoords="offset points",
                                     frameon=True, pad=0.1, arrowprops={"arrowstyle": "-", "color": "0.4", "lw": 0.8}))
    ax.set_title(f"Embedding map: PCA of {len(points)} image embeddings ({points['model'].iloc[0]})")
    ax.set_xlabel("principal component 1")
    ax.set_ylabel("principal component 2")
    if len(names) <= 25:
        ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, frameon=False)
    ax.grid(alpha=0.2)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def pca_points(spark: SparkSession, uris: list[str], limit: int) -> pd.DataFrame:
    """PCA (fitted in Spark on every embedding) to 2-D; a sample of points for drawing."""
    from pyspark.ml.feature import PCA
    from pyspark.ml.functions import array_to_vector, vector_to_array

    tables = [spark.read.parquet(u).where(F.col("embedding").isNotNull()).select("image_id", "path", "label", "model", "embedding") for u in uris]
    table = tables[0]
    for other in tables[1:]:
        table = table.unionByName(other)
    vectors = table.withColumn("features", array_to_vector("embedding"))
    model = PCA(k=2, inputCol="features", outputCol="pc").fit(vectors)
    total = vectors.count()
    sampled = vectors if total <= limit else vectors.sample(fraction=limit / total, seed=0)
    projected = model.transform(sampled).withColumn("pc", vector_to_array("pc"))
    return projected.select("image_id", "path", "label", "model", F.col("pc")[0].alias("x"), F.col("pc")[1].alias("y")).toPandas()


def gallery_html(sheets: list[tuple[Sheet, str]], facts: list[tuple[str, str]], has_map: bool) -> str:
    """index.html: facts, then every query's sheet with its precision. Everything shown is escaped."""
    e = html.escape
    rows = "\n".join(f"<tr><th>{e(k)}</th><td>{e(str(v))}</td></tr>" for k, v in facts)
    cards = []
    for sheet, file_name in sheets:
        precision = "" if sheet.precision is None else f' <span class="p">precision@{len(sheet.neighbours)} {sheet.precision:.2f}</span>'
        label = "" if sheet.query_label is None else f" — {e(sheet.query_label)}"
        cards.append(
            f'<section id="{e(sheet.query_id)}"><h2>{e(sheet.query_path.rsplit("/", 1)[-1])}{label}{precision}</h2>'
            f'<p class="path">{e(sheet.query_path)}</p><a href="sheets/{e(file_name)}"><img src="sheets/{e(file_name)}" '
            f'alt="{e(sheet.query_path)}" loading="lazy"></a></section>'
        )
    figure = '<h2>Embedding map</h2><img src="embedding_map.png" alt="embedding map">' if has_map else ""
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Vehicle similarity search report</title>
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; img-src 'self'; style-src 'unsafe-inline'">
<style>body{{font-family:system-ui,sans-serif;margin:24px;color:#222;background:#fafafa}}table{{border-collapse:collapse;margin-bottom:16px}}
th,td{{text-align:left;padding:3px 12px 3px 0}}section{{background:#fff;padding:8px 12px;margin:12px 0;border-radius:6px;box-shadow:0 1px 3px #0002}}
section img{{max-width:100%}}h2{{font-size:16px;margin:4px 0}}.p{{color:#2e7d32;font-weight:normal;margin-left:8px}}.path{{color:#777;font-size:12px;margin:0 0 6px}}</style>
</head><body><h1>Vehicle similarity search</h1><table>{rows}</table>{figure}
<h2>{len(sheets)} queries</h2>
{chr(10).join(cards)}
</body></html>
"""


def query_labels(spark: SparkSession, uris: list[str], queries: pd.DataFrame) -> dict[str, str | None]:
    """Labels of the queries from the embeddings tables, else their folder names."""
    found: dict[str, str | None] = {}
    wanted = spark.createDataFrame(queries[["query_id"]].drop_duplicates(), "query_id string")
    for uri in uris:
        rows = spark.read.parquet(uri).select(F.col("image_id").alias("query_id"), "label").join(F.broadcast(wanted), "query_id")
        found.update({r.query_id: r.label for r in rows.collect()})
    return {q: found.get(q, p.rsplit("/", 2)[-2] if p.count("/") >= 2 else None) for q, p in zip(queries["query_id"], queries["query_path"])}


def run(spark: SparkSession, args: argparse.Namespace) -> int:
    if args.max_queries < 1:
        raise UsageError("--max-queries must be at least 1")
    if not storage.exists(spark, args.neighbours):
        raise UsageError(f"neighbours table {args.neighbours} does not exist")
    for uri in args.embeddings:
        if not storage.exists(spark, uri):
            raise UsageError(f"embeddings table {uri} does not exist")
    summary = RunSummary("report", vars(args))
    neighbours = spark.read.parquet(args.neighbours)
    missing = {"query_id", "query_path", "rank", "neighbor_id", "neighbor_path", "neighbor_label", "similarity"} - set(neighbours.columns)
    if missing:
        raise UsageError(f"{args.neighbours} is not a neighbours table: missing {', '.join(sorted(missing))}")
    frame = neighbours.toPandas().sort_values(["query_id", "rank"])
    order = frame.drop_duplicates("query_id")[["query_id", "query_path"]].sort_values("query_path").head(args.max_queries)
    labels = query_labels(spark, args.embeddings, order)
    out = Path(args.output)
    (out / "sheets").mkdir(parents=True, exist_ok=True)
    k = int(frame["rank"].max()) if len(frame) else 0
    sheets, cache = [], {}
    with summary.stage("sheets"):
        for n, (query_id, query_path) in enumerate(order.itertuples(index=False), 1):
            sheet = Sheet(query_id, query_path, labels.get(query_id), frame[frame["query_id"] == query_id])
            file_name = f"{n:04d}_{hashlib.sha1(query_id.encode()).hexdigest()[:10]}.png"
            draw_sheet(spark, sheet, k, cache).save(out / "sheets" / file_name, optimize=True)
            sheets.append((sheet, file_name))
            if n % 10 == 0:
                log.info("%d/%d contact sheets", n, len(order))
    has_map = False
    if args.embeddings:
        with summary.stage("map"):
            embedding_map(pca_points(spark, args.embeddings, args.map_points), out / "embedding_map.png", spark)
            has_map = True
    facts = [("neighbours", args.neighbours), ("queries shown", f"{len(sheets)} of {frame['query_id'].nunique()}"), ("k", k)]
    if storage.exists(spark, f"{args.neighbours}/_summary.json"):
        run_info = json.loads(storage.read_text(spark, f"{args.neighbours}/_summary.json"))
        facts += [("index", run_info.get("index", "")), ("method", run_info.get("method", "")),
                  ("catalog images", run_info.get("counts", {}).get("catalog", ""))]
    precisions = [s.precision for s, _ in sheets if s.precision is not None]
    if precisions:
        facts.append((f"mean precision@{k} (shown queries)", f"{np.mean(precisions):.3f}"))
    if args.evaluation:
        evaluation = json.loads(storage.read_text(spark, args.evaluation))
        facts += [(key, f"{v:.4f}" if isinstance(v, float) else str(v)) for key, v in evaluation.get("metrics", {}).items()]
    (out / "index.html").write_text(gallery_html(sheets, facts, has_map), encoding="utf-8")
    summary.count(sheets=len(sheets), placeholders=sum("placeholder" in img.info for img in cache.values()))
    summary.finish()
    (out / "report_summary.json").write_text(summary.to_json())
    print_summary("report summary", [
        ("contact sheets", f"{len(sheets)} in {out / 'sheets'}"), ("embedding map", out / "embedding_map.png" if has_map else "(no --embeddings given)"),
        ("gallery", os.path.abspath(out / "index.html")), ("seconds", f"{summary.data['seconds']['total']:.1f}"),
    ])
    return 0
