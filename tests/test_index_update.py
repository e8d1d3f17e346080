"""index --mode incremental: rows added, dropped and changed without retraining, seen whole or not at all."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from conftest import read_neighbours, run_job, search, write_embeddings

from jobs import ivf
from jobs.index import diff, update
from jobs.knn import squared_distances
from jobs.tables import fingerprint
from jobs.vectors import spark_fingerprints
from scripts.vectors import clustered_unit_vectors

DIM = 32


@pytest.fixture(scope="module")
def base(spark, tmp_path_factory):
    """An index of 2,000 vectors, and the table it was built from: (folder, vectors, ids)."""
    folder = tmp_path_factory.mktemp("update")
    vectors, _ = clustered_unit_vectors(2600, dim=DIM, cluster_size=20, noise=0.4, seed=12)
    ids = write_embeddings(spark, folder / "emb", vectors[:2000])
    assert (
        run_job(spark, "index", "--embeddings", folder / "emb", "--output", folder / "index", "--num-hash-tables", "0")
        == 0
    )
    return folder, vectors, ids


def changed_table(spark, path, vectors: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """The base table less 200 rows, with 50 vectors moved and 300 new rows: its vectors and ids."""
    kept = np.r_[0:1700, 1900:2000]  # rows 1700-1899 dropped
    table = vectors[kept].copy()
    table[:50] = vectors[2300:2350]  # the first 50 ids get new vectors
    table = np.vstack([table, vectors[2000:2300]])  # 300 new rows
    ids = [f"img{i:05d}" for i in kept] + [f"new{i:05d}" for i in range(300)]
    write_embeddings(spark, path / "a", table[: len(kept)], numbers=kept)
    write_embeddings(spark, path / "b", table[len(kept) :], prefix="new")
    spark.read.parquet(str(path / "b")).write.mode("append").parquet(str(path / "a"))
    return table, ids


def ivf_truth(index: ivf.Index, table: np.ndarray, ids: list[str], queries: np.ndarray, k: int) -> list[list[str]]:
    """What an index of `table` on these centroids answers: each query's k nearest in the cells it probes."""
    cells = np.argmin(squared_distances(table, index.centroids), axis=1)
    probes, offsets = index.probe(queries, index.params.nprobe, k)
    found = []
    for q in range(len(queries)):
        rows = np.flatnonzero(np.isin(cells, probes[offsets[q] : offsets[q + 1]]))
        d2 = squared_distances(queries[q : q + 1], table[rows])[0]
        found.append([ids[rows[i]] for i in np.lexsort(([ids[r] for r in rows], d2))[:k]])
    return found


def test_an_update_adds_drops_and_moves_rows_as_a_rebuild_on_the_same_centroids_would(
    spark, base, tmp_path, copy_tree, capsys
):
    folder, vectors, _ = base
    index_dir = copy_tree(folder / "index", tmp_path / "index")
    table, ids = changed_table(spark, tmp_path, vectors)
    before = ivf.load(spark, str(index_dir))
    capsys.readouterr()
    assert run_job(spark, "index", "--embeddings", tmp_path / "a", "--output", index_dir, "--mode", "incremental") == 0
    out = capsys.readouterr().out
    assert "300 added, 200 dropped, 50 changed" in out
    after = ivf.load(spark, str(index_dir))
    assert after.meta["version"] == before.meta["version"] + 1 and after.count == len(ids) == 2100
    assert np.array_equal(after.centroids, before.centroids) and after.plan.sizes.sum() == 2100
    assert after.meta["added_since_training"] == 350 and after.meta["trained_rows"] == 2000
    # the index holds exactly the table's rows: the kNN graph's queries and neighbours are its ids
    search(spark, index_dir, tmp_path / "graph", "--all", "-k", "5")
    graph = read_neighbours(spark, tmp_path / "graph")
    assert set(graph["query_id"]) == set(ids) and set(graph["neighbor_id"]) <= set(ids)
    # exact: the table's exact neighbours; ivf: those among the cells each query probes, as on these centroids
    queries = vectors[2350:2400]
    write_embeddings(spark, tmp_path / "q", queries, prefix="q")
    for method in ("exact", "ivf"):
        search(spark, index_dir, tmp_path / method, "--queries", tmp_path / "q", "-k", "6", "--method", method)
        got = read_neighbours(spark, tmp_path / method).groupby("query_id")["neighbor_id"].apply(list)
        if method == "exact":
            order = np.argsort(squared_distances(queries, table), axis=1)[:, :6]
            expected = [[ids[i] for i in row] for row in order]
        else:
            expected = ivf_truth(after, table, ids, queries, 6)
        assert [got[f"q{q:05d}"] for q in range(50)] == expected, method
    # nothing changed: nothing written
    capsys.readouterr()
    assert run_job(spark, "index", "--embeddings", tmp_path / "a", "--output", index_dir, "--mode", "incremental") == 0
    assert (
        "nothing written" in capsys.readouterr().out
        and ivf.load(spark, str(index_dir)).meta["version"] == after.meta["version"]
    )


def test_a_killed_update_leaves_the_old_version_searchable_and_the_next_run_completes_it(
    spark, base, tmp_path, copy_tree, monkeypatch
):
    folder, vectors, ids = base
    index_dir = copy_tree(folder / "index", tmp_path / "index")
    changed_table(spark, tmp_path, vectors)
    files_before = sorted(p.name for p in (index_dir / "catalog").iterdir())

    def killed(*args, **kwargs):
        raise SystemExit(137)  # the update dies after writing its files, before its manifest

    monkeypatch.setattr(ivf, "save", killed)
    with pytest.raises(SystemExit):
        run_job(spark, "index", "--embeddings", tmp_path / "a", "--output", index_dir, "--mode", "incremental")
    monkeypatch.undo()
    assert len(list((index_dir / "catalog").iterdir())) > len(files_before)  # its files are there, unreferenced
    summary = search(spark, index_dir, tmp_path / "graph", "--all", "-k", "3")
    graph = read_neighbours(spark, tmp_path / "graph")
    assert summary["counts"]["queries"] == 2000 and set(graph["query_id"]) == set(ids)  # the old version, whole
    assert run_job(spark, "index", "--embeddings", tmp_path / "a", "--output", index_dir, "--mode", "incremental") == 0
    index = ivf.load(spark, str(index_dir))
    assert index.count == 2100
    names = {p.name for p in (index_dir / "catalog").iterdir() if p.suffix == ".parquet"}
    assert names == {e["name"] for e in index.meta["files"]}  # the killed run's files were removed


def test_a_search_that_loaded_the_version_before_an_update_reads_it_whole(spark, base, tmp_path, copy_tree):
    from jobs.search import answer, catalog, queries
    from jobs.search.scoring import Wanted

    folder, vectors, ids = base
    index_dir = copy_tree(folder / "index", tmp_path / "index")
    changed_table(spark, tmp_path, vectors)
    old = ivf.load(spark, str(index_dir))  # as a search does when it starts
    assert run_job(spark, "index", "--embeddings", tmp_path / "a", "--output", index_dir, "--mode", "incremental") == 0
    files = catalog.locate(spark, old)
    found = answer(spark, old, queries.catalog_source(spark, old, files), "exact", Wanted(3, True), None, files)
    rows = found.answers.table.toPandas()
    assert set(rows["query_id"]) == set(ids) and set(rows["neighbor_id"]) <= set(ids)


def test_compaction_rewrites_piled_up_files_and_keeps_the_answers(
    spark, base, tmp_path, copy_tree, monkeypatch, capsys
):
    folder, vectors, _ = base
    index_dir = copy_tree(folder / "index", tmp_path / "index")
    monkeypatch.setattr(update, "COMPACT_UPDATES", 0)
    table, ids = changed_table(spark, tmp_path, vectors)
    write_embeddings(spark, tmp_path / "more", vectors[2400:2450], prefix="more")
    spark.read.parquet(str(tmp_path / "more")).write.mode("append").parquet(str(tmp_path / "a"))
    capsys.readouterr()
    assert run_job(spark, "index", "--embeddings", tmp_path / "a", "--output", index_dir, "--mode", "incremental") == 0
    assert "compacted" in capsys.readouterr().out
    index = ivf.load(spark, str(index_dir))
    assert index.count == 2150 and sum(1 for e in index.meta["files"] if e.get("added_in")) <= len(index.meta["files"])
    search(spark, index_dir, tmp_path / "graph", "--all", "-k", "4", "--method", "exact")
    graph = read_neighbours(spark, tmp_path / "graph").groupby("query_id")["neighbor_id"].apply(list)
    everything = np.vstack([table, vectors[2400:2450]])
    names = ids + [f"more{i:05d}" for i in range(50)]
    d2 = squared_distances(everything, everything)
    np.fill_diagonal(d2, np.inf)
    for q in range(0, len(names), 97):
        assert graph[names[q]] == [names[i] for i in np.argsort(d2[q])[:4]]


def test_one_updates_files_wait_for_the_files_of_more_updates(spark, base, tmp_path, copy_tree, monkeypatch):
    """However many files one update writes (they span the cells side by side), compaction waits until the files of
    more than COMPACT_UPDATES updates lie over the same cells."""
    folder, vectors, _ = base
    index_dir = copy_tree(folder / "index", tmp_path / "index")
    monkeypatch.setattr(update, "COMPACT_UPDATES", 1)
    added_in = []
    for step, end in enumerate((2100, 2200)):
        write_embeddings(spark, tmp_path / f"t{step}", vectors[:2000])
        write_embeddings(spark, tmp_path / f"n{step}", vectors[2000:end], prefix="new")
        spark.read.parquet(str(tmp_path / f"n{step}")).write.mode("append").parquet(str(tmp_path / f"t{step}"))
        job = ["index", "--embeddings", tmp_path / f"t{step}", "--output", index_dir, "--mode", "incremental"]
        assert run_job(spark, *job) == 0
        meta = json.loads((index_dir / "index.json").read_text())
        added_in.append(sorted({e["added_in"] for e in meta["files"] if e.get("added_in")}))
        assert meta["count"] == end
    assert added_in == [[2], [3]]  # the second update's files and the first's rewritten as one set of version 3


def test_an_update_of_other_weights_or_an_old_index_is_refused_with_one_line(spark, base, tmp_path, copy_tree, capsys):
    _, vectors, _ = base
    write_embeddings(spark, tmp_path / "emb", vectors[:300], weights="a" * 64)
    index_dir = tmp_path / "index"
    assert (
        run_job(spark, "index", "--embeddings", tmp_path / "emb", "--output", index_dir, "--num-hash-tables", "0") == 0
    )
    write_embeddings(spark, tmp_path / "other", vectors[:100], weights="c" * 64)
    meta = json.loads((index_dir / "index.json").read_text())
    capsys.readouterr()
    assert (
        run_job(spark, "index", "--embeddings", tmp_path / "other", "--output", index_dir, "--mode", "incremental") == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--mode overwrite" in err[0] and "cccccccccccc" in err[0]
    assert ivf.load(spark, str(index_dir)).meta["version"] == meta["version"]  # untouched
    old = tmp_path / "old"
    old.mkdir()
    (old / "index.json").write_text(json.dumps({**meta, "format_version": 2}))
    assert run_job(spark, "index", "--embeddings", tmp_path / "other", "--output", old, "--mode", "incremental") == 2
    assert "rebuild" in capsys.readouterr().err
    # an index whose rows' fingerprints were made another way would see every row as changed
    unfingerprinted = copy_tree(index_dir, tmp_path / "unfingerprinted")
    manifest = unfingerprinted / ivf.MANIFESTS / f"v{meta['version']:08d}.json"
    manifest.write_text(json.dumps({k: v for k, v in meta.items() if k != "fingerprint"}))
    assert (
        run_job(spark, "index", "--embeddings", tmp_path / "emb", "--output", unfingerprinted, "--mode", "incremental")
        == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "rebuild with --mode overwrite" in err[0] and "fingerprints" in err[0]


def test_an_update_from_a_folder_that_is_no_embeddings_table_is_refused_with_one_line(
    spark, base, tmp_path, copy_tree, capsys
):
    folder, _, _ = base
    index_dir = copy_tree(folder / "index", tmp_path / "index")
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "a.jpg").write_bytes(b"\xff\xd8 a photo, not Parquet")
    spark.createDataFrame([("x", 1)], "image_id string, n int").write.parquet(str(tmp_path / "other"))
    for table, said in (
        (tmp_path / "photos", "is not Parquet"),
        (tmp_path / "other", "missing column(s) path, label, model, embedding"),
        (tmp_path / "missing", "does not exist"),
    ):
        capsys.readouterr()
        assert run_job(spark, "index", "--embeddings", table, "--output", index_dir, "--mode", "incremental") == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and said in err[0], err
    assert ivf.load(spark, str(index_dir)).meta["version"] == 1  # untouched


def test_drift_past_the_threshold_is_reported_and_auto_rebuilds(spark, base, tmp_path, copy_tree, capsys):
    folder, vectors, _ = base
    index_dir = copy_tree(folder / "index", tmp_path / "index")
    write_embeddings(spark, tmp_path / "grown", vectors[:2000])
    outputs = []
    for prefix in ("extra", "again"):  # 600 rows, then 600 more: past half of the 2,000 trained on
        write_embeddings(spark, tmp_path / prefix, vectors[2000:2600], prefix=prefix)
        spark.read.parquet(str(tmp_path / prefix)).write.mode("append").parquet(str(tmp_path / "grown"))
        capsys.readouterr()
        assert (
            run_job(spark, "index", "--embeddings", tmp_path / "grown", "--output", index_dir, "--mode", "incremental")
            == 0
        )
        outputs.append(capsys.readouterr().out)
    assert "none: the cells still fit" in outputs[0]
    assert "rebuild (--mode overwrite): 1200 rows added since training" in outputs[1]
    write_embeddings(spark, tmp_path / "last", vectors[2000:2100], prefix="last")
    spark.read.parquet(str(tmp_path / "last")).write.mode("append").parquet(str(tmp_path / "grown"))
    assert run_job(spark, "index", "--embeddings", tmp_path / "grown", "--output", index_dir, "--mode", "auto") == 0
    index = ivf.load(spark, str(index_dir))
    assert index.meta["version"] == 1 and index.meta["trained_rows"] == index.count == 3300  # rebuilt


def test_the_diff_tells_each_row_apart_and_the_rows_to_add_are_read_again_at_their_places(spark, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from pyspark.sql.pandas.types import from_arrow_schema

    from jobs.filesystems import location
    from jobs.tables import rows_at

    one_ulp = float(np.nextafter(np.float32(0), np.float32(1)))
    vectors = np.array([[0.5, 0.25], [1.0, one_ulp], [0.6, 0.8], [0.0, 1.0]], np.float32)
    for fingerprints in (True, False):  # the embed job's column, or the vectors fingerprinted here as Spark does
        folder = tmp_path / f"table{fingerprints}"
        write_embeddings(spark, folder, vectors[:3], numbers=[0, 1, 2], fingerprints=fingerprints)
        parts, stats = [str(p) for p in sorted(folder.glob("*.parquet"))], diff.StatsParam().zero({})
        batches = [b for n, part in enumerate(parts) for b in diff.table_side(pq.ParquetFile(part), n, stats)]
        table = pa.Table.from_batches(batches, diff.SIDES)
        assert ("embedding" in diff.table_columns(pq.read_schema(parts[0]))) == (not fingerprints)
        assert [stats[k] for k in ("rows", "model", "other_model")] == [3, "resnet18", "resnet18"]
        assert stats["min_dim"] == stats["max_dim"] == (None if fingerprints else 2)
        held_vectors = np.array([[0.5, 0.25], [1.0, 0.0], [0.0, 1.0]], np.float32)
        held = pa.table(
            {
                "side": pa.array([diff.HELD] * 3, pa.int8()),
                "image_id": ["img00000", "img00001", "img00009"],
                "fingerprint": spark_fingerprints(held_vectors),
                "file": pa.array([0, 0, 1], pa.int32()),
                "row": pa.array([7, 8, 2], pa.int64()),
                "cell": pa.array([3, 3, 4], pa.int32()),
            },
            schema=diff.SIDES,
        )
        changed, copies = diff.join_sides(pa.concat_tables([table, held]), parts, full=True)
        found = {r["image_id"]: r for r in changed.to_pylist()}
        assert {i: r["change"] for i, r in found.items()} == {
            "img00001": "changed",  # one ulp apart
            "img00009": "dropped",
            "img00002": "added",
        }
        assert copies == 1 and (found["img00009"]["file"], found["img00009"]["row"]) == (1, 2)
        # where only appended files were read, an id the index holds is not dropped but met (the same or not)
        grown, _ = diff.join_sides(pa.concat_tables([table, held]), parts, full=False)
        assert sorted(grown.column("change").to_pylist()) == ["added", "changed", "same"]
        again, copies = diff.join_sides(pa.concat_tables([table, table]), parts, full=True)
        assert copies == 2
        places = spark.createDataFrame(changed.to_pylist(), from_arrow_schema(diff.CHANGED)).where(
            "change in ('added', 'changed')"
        )
        read = {r["image_id"]: r["embedding"] for r in rows_at(places, 2, location(spark, str(folder)), 2, 2).collect()}
        assert read == {"img00001": [1.0, one_ulp], "img00002": [0.6000000238418579, 0.800000011920929]}


def test_the_filter_of_appended_ids_passes_every_one_of_them_and_few_others():
    import pyarrow as pa

    ids = pa.array([f"{i:040x}" for i in range(40_000)])
    bits = np.zeros(diff.ID_FILTER_BITS // 8, np.uint8)
    diff.mark(bits, ids[:20_000])
    passed = diff.passes(bits, ids)
    assert passed[:20_000].all() and passed[20_000:].sum() < 20  # about 2e-5 of others at 20k ids in 8M bits


def test_an_update_reads_the_vectors_of_files_without_fingerprints_and_each_row_is_right(
    spark, base, tmp_path, copy_tree, capsys
):
    folder, vectors, _ = base
    # a table of files with and without the column (an older table an embed appended to): each row right
    kept = np.r_[0:1900]  # 100 dropped
    moved = vectors[:1900].copy()
    moved[:50] = vectors[2300:2350]
    write_embeddings(spark, tmp_path / "mixed", moved, numbers=kept, fingerprints=False)
    write_embeddings(spark, tmp_path / "new", vectors[2000:2100], prefix="new")
    for n, part in enumerate(sorted((tmp_path / "new").glob("*.parquet"))):  # first by name: the schema read has it
        shutil.copy(part, tmp_path / "mixed" / f"0-{n}.parquet")
    index_dir = copy_tree(folder / "index", tmp_path / "index")
    capsys.readouterr()
    assert (
        run_job(spark, "index", "--embeddings", tmp_path / "mixed", "--output", index_dir, "--mode", "incremental") == 0
    )
    assert "100 added, 100 dropped, 50 changed" in capsys.readouterr().out
    assert ivf.load(spark, str(index_dir)).count == 2000
    # vectors of another length among the rows to add: one line, nothing written
    wide, _ = clustered_unit_vectors(20, dim=DIM + 1, seed=3)
    write_embeddings(spark, tmp_path / "wide", wide, prefix="wide")
    spark.read.parquet(str(tmp_path / "wide")).write.mode("append").parquet(str(tmp_path / "new"))
    assert (
        run_job(spark, "index", "--embeddings", tmp_path / "new", "--output", index_dir, "--mode", "incremental") == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"other than {DIM} values" in err[0], err
    assert ivf.load(spark, str(index_dir)).count == 2000


def test_a_table_that_only_grew_is_compared_by_its_appended_files_alone(spark, base, tmp_path, capsys):
    import os

    _, vectors, _ = base
    table, index_dir = tmp_path / "table", tmp_path / "index"
    write_embeddings(spark, table, vectors[:1000])
    assert run_job(spark, "index", "--embeddings", table, "--output", index_dir, "--num-hash-tables", "0") == 0

    def update_with(*appended: tuple[str, np.ndarray]) -> tuple[int, str, str]:
        for prefix, rows in appended:  # as the embed job adds new photos: new files beside the old
            write_embeddings(spark, tmp_path / prefix, rows, prefix=prefix)
            spark.read.parquet(str(tmp_path / prefix)).write.mode("append").parquet(str(table))
        capsys.readouterr()
        code = run_job(spark, "index", "--embeddings", table, "--output", index_dir, "--mode", "incremental")
        out, err = capsys.readouterr()
        return code, out, err

    read = len(list(table.glob("*.parquet")))
    code, out, _ = update_with(("new", vectors[1000:1100]))
    appended = len(list(table.glob("*.parquet"))) - read
    assert code == 0 and "100 added, 0 dropped, 0 changed" in out
    assert f"{appended} appended file(s) alone; its {read} other files unchanged since the index read them" in out
    code, out, _ = update_with()
    assert code == 0 and "nothing written" in out and "no file appended" in out
    # an appended row whose id an unchanged file holds: refused, nothing written
    before = set(table.glob("*.parquet"))
    code, _, err = update_with(("img", vectors[2000:2001]))
    assert code == 2 and "repeated image_id" in err
    assert ivf.load(spark, str(index_dir)).count == 1100
    for part in set(table.glob("*.parquet")) - before:
        part.unlink()
    # a file the index read, changed: every row is compared again, and the answer is the same as a rebuild's
    first = sorted(table.glob("part-*.parquet"))[0]
    os.utime(first, ns=(first.stat().st_atime_ns, first.stat().st_mtime_ns + 10**9))
    code, out, _ = update_with(("more", vectors[1100:1150]))
    files = len(list(table.glob("*.parquet")))
    assert code == 0 and "50 added, 0 dropped, 0 changed" in out and f"every row of the table's {files} files" in out
    graph = tmp_path / "graph"
    search(spark, index_dir, graph, "--all", "-k", "3")
    assert len(read_neighbours(spark, graph)) == 1150 * 3


def test_vectors_are_fingerprinted_here_as_spark_fingerprints_them(spark):
    matrix = np.random.default_rng(1).standard_normal((40, 9)).astype(np.float32)
    matrix[0, 0], matrix[1, 1], matrix[2] = -0.0, np.nan, 0.0
    rows = [(i, [float(x) for x in row]) for i, row in enumerate(matrix)]
    made = spark.createDataFrame(rows, "i int, embedding array<float>").orderBy("i").select(fingerprint())
    assert [r[0] for r in made.collect()] == spark_fingerprints(matrix).tolist()


def test_read_rows_reads_the_row_groups_that_hold_the_rows_and_a_moved_row_is_an_error(spark, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from jobs.errors import UsageError, known_error_from_spark
    from jobs.filesystems import location
    from jobs.tables import read_rows, rows_at

    ids = [f"id{i}" for i in range(100)]
    table = pa.table({"image_id": ids, "path": ids, "label": ids, "embedding": [[float(i)] for i in range(100)]})
    pq.write_table(table, tmp_path / "f.parquet", row_group_size=7)
    rows = np.array([0, 6, 7, 8, 50, 98, 99])
    read = read_rows(pq.ParquetFile(tmp_path / "f.parquet"), rows, ["image_id"])
    assert read.column("image_id").to_pylist() == [ids[r] for r in rows]
    # a place that holds another id than the one found there before: the table changed meanwhile
    places = spark.createDataFrame(
        [("id5", str(tmp_path / "f.parquet"), 6)], "image_id string, source_file string, source_row long"
    )
    with pytest.raises(Exception, match="changed while it was read") as caught:
        rows_at(places, 1, location(spark, str(tmp_path)), 1, dim=1).collect()
    assert isinstance(known_error_from_spark(caught.value), UsageError)


def test_a_table_with_repeated_ids_is_refused_by_an_update_and_a_build(spark, base, tmp_path, copy_tree, capsys):
    folder, vectors, _ = base
    index_dir = copy_tree(folder / "index", tmp_path / "index")
    version = json.loads((index_dir / "index.json").read_text())["version"]
    table = tmp_path / "repeated"
    for numbers in ([0, 1, 1, 2], [0, 1, 2, 2500, 2500]):  # an id the index holds, twice; a new id, twice
        write_embeddings(spark, table, vectors[: len(numbers)], numbers=numbers)
        capsys.readouterr()
        assert run_job(spark, "index", "--embeddings", table, "--output", index_dir, "--mode", "incremental") == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "repeated image_id" in err[0], err
    assert ivf.load(spark, str(index_dir)).meta["version"] == version  # untouched
    assert run_job(spark, "index", "--embeddings", table, "--output", tmp_path / "new", "--num-hash-tables", "0") == 2
    assert "repeated image_id" in capsys.readouterr().err
