"""The embeddings table's files an index has read, kept in its manifest: an update of a table that only grew (the
embed job appends new photos in new files) then reads the appended files alone."""

from __future__ import annotations

from urllib.parse import unquote

from pyarrow import fs as pafs
from pyspark.sql import Row

from jobs.filesystems import Location


def relative(uri: str, table: Location) -> str:
    """A file's name under the table's folder, however its URI is spelled (scheme, quoting)."""
    return unquote(uri).split(f"{table.root}/", 1)[-1]


def recorded(table: Location, files: list[Row]) -> dict:
    """The files a read found (tables.source_file()) as the manifest keeps them: the table's folder, and each file's
    name under it, size and modification time."""
    entries = {relative(f["path"], table): {"size": f["size"], "mtime_ms": f["mtime_ms"]} for f in files}
    return {"root": table.root, "files": [{"name": name, **entries[name]} for name in sorted(entries)]}


def listing(table: Location) -> dict[str, dict]:
    """The table's data files now (as Spark reads a folder: no name part starting with _ or .): name -> size, mtime."""
    infos = table.filesystem().get_file_info(pafs.FileSelector(table.root, recursive=True, allow_not_found=True))
    found = {}
    for info in infos:
        name = info.path[len(table.root) + 1 :]
        if info.type == pafs.FileType.File and not any(part[:1] in "_." for part in name.split("/")):
            mtime = info.mtime_ns // 1_000_000 if info.mtime_ns is not None else None
            found[name] = {"size": info.size, "mtime_ms": mtime}
    return found


def appended(seen: dict | None, table: Location, now: dict[str, dict]) -> list[str] | None:
    """The files of `now` the index has not read, where every file it read (`seen`, as recorded() keeps them) is still
    there unchanged in the same folder; None where one changed or went (or the index kept no record): then every row
    of the table is compared."""
    if not seen or seen["root"] != table.root:
        return None
    # a file without a modification time can change at the same size unseen: never "unchanged"
    if any(
        f["mtime_ms"] is None or now.get(f["name"]) != {"size": f["size"], "mtime_ms": f["mtime_ms"]}
        for f in seen["files"]
    ):
        return None
    known = {f["name"] for f in seen["files"]}
    return sorted(name for name in now if name not in known)
