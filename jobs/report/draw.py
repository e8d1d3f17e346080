"""Drawing for the report: contact sheets (query + neighbours with rank, label, similarity) and the embedding map.

Images are read through the same URIs the tables name (local, s3a://, gs://, ...); an unreadable image becomes
a placeholder that says why.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageFont
from pyspark.sql import SparkSession

from jobs import storage
from jobs.imaging import ImageError, decode

TILE = 200
PAD = 10
CAPTION = 46
HEADER = 34
GAP = 24  # between the query and its neighbours
MATCH, MISMATCH, QUERY, INK, PAPER = (46, 160, 67), (214, 39, 40), (31, 119, 180), (33, 33, 33), (250, 250, 250)


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
            draw.rectangle(
                (x - 3, top - 3, x + TILE + 2, top + TILE + 2), outline=colour, width=3 if colour == MATCH else 5
            )
        mark = "" if colour is None else ("✓ " if colour == MATCH else "✗ ")
        draw.text((x, top + TILE + 6), f"#{row.rank}  sim {row.similarity:.3f}", fill=INK, font=bold)
        draw.text(
            (x, top + TILE + 24),
            _clip(mark + (row.neighbor_label or "(no label)"), TILE, small),
            fill=colour or INK,
            font=small,
        )
    return canvas


def embedding_map(points: pd.DataFrame, spark: SparkSession, thumbs: int = 16) -> bytes:
    """Scatter of the 2-D PCA projection coloured by label, with a few thumbnails, as PNG bytes."""
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
        ax.scatter(
            points.loc[chosen, "x"],
            points.loc[chosen, "y"],
            s=14,
            alpha=0.75,
            color=cmap(i % cmap.N),
            label=name if len(names) <= 25 else None,
        )
    # one representative per label (the point nearest its label's median), offset so points stay visible
    labelled = points.assign(label=labels)
    medians = labelled.groupby("label")[["x", "y"]].transform("median")
    spread = (labelled["x"] - medians["x"]) ** 2 + (labelled["y"] - medians["y"]) ** 2
    representatives = labelled.loc[spread.groupby(labelled["label"]).idxmin()].head(thumbs)
    for i, row in enumerate(representatives.itertuples()):
        img = thumbnail(spark, row.path, 64)
        offset = (40 if i % 2 else -40, 36 if (i // 2) % 2 else -36)
        ax.add_artist(
            AnnotationBbox(
                OffsetImage(np.asarray(img), zoom=0.6),
                (row.x, row.y),
                xybox=offset,
                boxcoords="offset points",
                frameon=True,
                pad=0.1,
                arrowprops={"arrowstyle": "-", "color": "0.4", "lw": 0.8},
            )
        )
    ax.set_title(f"Embedding map: PCA of {len(points)} image embeddings ({points['model'].iloc[0]})")
    ax.set_xlabel("principal component 1")
    ax.set_ylabel("principal component 2")
    if len(names) <= 25:
        ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, frameon=False)
    ax.grid(alpha=0.2)
    fig.tight_layout()
    png = io.BytesIO()  # bytes, so the caller can write them to any filesystem
    fig.savefig(png, format="png")
    plt.close(fig)
    return png.getvalue()


def png_bytes(image: Image.Image) -> bytes:
    """The image as PNG bytes, ready for storage.write_bytes on any filesystem."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()
