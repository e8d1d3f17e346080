"""Class labels (and optional car bounding boxes) from a CSV or Stanford Cars devkit file, or folder names."""

from __future__ import annotations

import io
import posixpath

import pandas as pd
from pyspark.sql import SparkSession

from jobs import storage
from jobs.errors import UsageError

PATH_COLUMNS = ("path", "relative_im_path", "filename", "fname", "file", "image", "image_path", "img")
LABEL_COLUMNS = ("label", "class_name", "classname", "class", "make_model", "category", "name")
BOX_COLUMNS = (("x1", "y1", "x2", "y2"), ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2"), ("xmin", "ymin", "xmax", "ymax"))


def _first(columns: list[str], candidates: tuple[str, ...]) -> str | None:
    lowered = {c.lower().strip(): c for c in columns}
    return next((lowered[c] for c in candidates if c in lowered), None)


def _from_devkit(data: bytes, meta: bytes | None) -> pd.DataFrame:
    from scipy.io import loadmat  # scipy comes with scikit-image; only devkit users need it

    annotations = loadmat(io.BytesIO(data), squeeze_me=True)["annotations"]
    fields = annotations.dtype.names
    frame = pd.DataFrame({name: list(annotations[name]) for name in fields})
    if meta is not None:
        names = [str(n) for n in loadmat(io.BytesIO(meta), squeeze_me=True)["class_names"]]
        frame["class"] = [names[int(c) - 1] for c in frame["class"]]
    return frame


def normalise_labels(frame: pd.DataFrame, source: str) -> pd.DataFrame:
    """Any supported layout to columns key, label, x1, y1, x2, y2 (boxes null when absent)."""
    columns = [str(c) for c in frame.columns]
    path_col, label_col = _first(columns, PATH_COLUMNS), _first(columns, LABEL_COLUMNS)
    if path_col is None or label_col is None:
        raise UsageError(
            f"labels file {source}: need a path column ({'/'.join(PATH_COLUMNS)}) and a label column "
            f"({'/'.join(LABEL_COLUMNS)}); found {', '.join(columns)}"
        )
    out = pd.DataFrame(
        {
            "key": frame[path_col].astype(str).str.replace("\\", "/", regex=False).str.lstrip("./"),
            "label": frame[label_col].astype(str),
        }
    )
    box = next((b for b in BOX_COLUMNS if all(_first(columns, (c,)) for c in b)), None)
    for target, name in zip(("x1", "y1", "x2", "y2"), box or (None,) * 4):
        out[target] = pd.to_numeric(frame[_first(columns, (name,))], errors="coerce") if name else float("nan")
    return out.drop_duplicates("key", keep="last")


def parse_labels(data: bytes, source: str, meta: bytes | None = None) -> pd.DataFrame:
    """Parse a labels file's bytes: CSV with a header, headerless Stanford Cars annos, or devkit .mat."""
    if source.lower().endswith(".mat"):
        return normalise_labels(_from_devkit(data, meta), source)
    try:
        frame = pd.read_csv(io.BytesIO(data), dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise UsageError(f"labels file {source} is not a readable CSV: {e}") from e
    if len(frame.columns) == 6 and _first([str(c) for c in frame.columns], PATH_COLUMNS) is None:
        # Kaggle's Stanford Cars anno_*.csv: fname,x1,y1,x2,y2,class with no header row
        frame = pd.read_csv(io.BytesIO(data), header=None, names=["fname", "x1", "y1", "x2", "y2", "class"], dtype=str)
    return normalise_labels(frame, source)


def read_labels(spark: SparkSession, uri: str) -> pd.DataFrame:
    """The labels file at uri (any Hadoop filesystem): key, label, x1, y1, x2, y2; attrs["root"] is its folder."""
    if not storage.exists(spark, uri):
        raise UsageError(f"labels file {uri} does not exist")
    meta_uri = posixpath.join(posixpath.dirname(uri), "cars_meta.mat")
    meta = storage.read_bytes(spark, meta_uri) if uri.endswith(".mat") and storage.exists(spark, meta_uri) else None
    labels = parse_labels(storage.read_bytes(spark, uri), uri, meta)
    # keys are relative to the labels file's folder, qualified the way Spark lists the images (file:/..., s3a://...)
    labels.attrs["root"] = posixpath.dirname(storage.qualify(spark, uri))
    labels.attrs["source"] = uri
    return labels


def parent_folder(paths: pd.Series) -> pd.Series:
    """The name of the folder holding each file: the label when no labels file is given."""
    return paths.str.rsplit("/", n=2).str[-2]


def relative_paths(paths: pd.Series, root: str | None) -> pd.Series:
    """Each path relative to root when it lies under root, else the path itself (then only a key's tail can match)."""
    if not root:
        return paths
    prefix = root.rstrip("/") + "/"
    return paths.where(~paths.str.startswith(prefix), paths.str.slice(len(prefix)))


def _ambiguity(claims: pd.DataFrame, source: str, root: str | None) -> UsageError:
    key = claims["key"].iloc[0]
    files = claims.loc[claims["key"] == key, "path"].sort_values().tolist()
    others = claims["key"].nunique() - 1
    more = f" ({others} more keys are ambiguous)" if others else ""
    shown = ", ".join(files[:3]) + (", ..." if len(files) > 3 else "")
    example = relative_paths(pd.Series(files[:1]), root).iloc[0]
    return UsageError(
        f"labels file {source}: key {key!r} matches {len(files)} files ({shown}){more}; "
        f"write the paths relative to {root or 'the images'} (e.g. {example}) or label one folder at a time"
    )


def label_files(paths: pd.Series, labels: pd.DataFrame | None, root: str | None = None) -> pd.DataFrame:
    """path, label, x1..y2 for each path, else its folder's name when no labels are given.

    A key matches a file when it is the file's path relative to root (default: labels.attrs["root"], the
    labels file's folder) or that path's tail. A file takes its exact key, else its longest matching key;
    a key that is then the best match of two files (cars_train/00001.jpg and cars_test/00001.jpg for
    `00001.jpg`) is a UsageError naming it: a label is never guessed.
    """
    files = pd.DataFrame({"path": paths.astype(str)})
    if labels is None:
        return files.assign(label=parent_folder(files["path"]), x1=None, y1=None, x2=None, y2=None)
    root = root or labels.attrs.get("root")
    files["relative"] = relative_paths(files["path"], root)
    files["basename"] = files["path"].str.rsplit("/", n=1).str[-1]
    keyed = labels.assign(basename=labels["key"].str.rsplit("/", n=1).str[-1])
    joined = files.merge(keyed, on="basename", how="inner")
    exact = joined["relative"] == joined["key"]
    tail = [r.endswith("/" + k) for r, k in zip(joined["relative"], joined["key"])]
    joined = joined.assign(exact=exact, key_length=joined["key"].str.len())[exact | tail]
    # each file's best key: an exact match first, then the longest (most specific) tail
    best = joined.sort_values(["exact", "key_length"], ascending=False).drop_duplicates("path")
    # a key that is an exact match for one file does not also label the files it is merely a tail of
    best = best[best["exact"] | ~best["key"].isin(best.loc[best["exact"], "key"])]
    shared = best[best.duplicated("key", keep=False)].sort_values("key")
    if len(shared):
        raise _ambiguity(shared, labels.attrs.get("source", "given"), root)
    out = files[["path"]].merge(best[["path", "label", "x1", "y1", "x2", "y2"]], on="path", how="left")
    return out.astype(object).where(out.notna(), None)
