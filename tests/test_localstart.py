"""Local start-up: pyspark.zip's bytecode (checked against each source) and the driver JVM's class archive."""

from __future__ import annotations

import subprocess
import sys
import zipfile

import pytest
from helpers import ROOT, spark_submit, submit_env

from jobs import localstart
from jobs.cli import local_java_options
from scripts.local_start import compile_zip

IMPORTED = "import sys; sys.path.insert(0, sys.argv[1]); import pkg.mod as m; print(m.__file__, m.VALUE)"


def imported_from(archive) -> tuple[str, str]:
    done = subprocess.run([sys.executable, "-c", IMPORTED, str(archive)], capture_output=True, text=True, check=True)
    path, value = done.stdout.split()
    return path.rsplit("/", 1)[1], value


def test_a_compiled_zip_imports_its_bytecode_and_a_changed_source_still_wins(tmp_path):
    archive = tmp_path / "lib.zip"
    with zipfile.ZipFile(archive, "w") as out:
        out.writestr("pkg/__init__.py", "")
        out.writestr("pkg/mod.py", "VALUE = 'one'\n")
        out.writestr("pkg/tests/test_mod.py", "import pkg.mod\n")
    assert imported_from(archive) == ("mod.py", "one")
    assert compile_zip(archive) == 2  # pkg/__init__ and pkg/mod; test modules are never imported by jobs
    assert imported_from(archive) == ("mod.pyc", "one")
    assert compile_zip(archive) == 0  # once is enough
    # the bytecode is checked against its source's hash: a source changed since is compiled again
    with zipfile.ZipFile(archive) as old, zipfile.ZipFile(tmp_path / "changed.zip", "w") as new:
        for info in old.infolist():
            new.writestr(info.filename, "VALUE = 'two'\n" if info.filename == "pkg/mod.py" else old.read(info))
    assert imported_from(tmp_path / "changed.zip") == ("mod.py", "two")


def test_only_a_process_starting_its_own_jvm_asks_for_the_archive(spark, monkeypatch):
    from pyspark import SparkConf

    assert local_java_options(SparkConf()) is None  # this test session's JVM runs already
    monkeypatch.setattr("pyspark.SparkContext._gateway", None)
    monkeypatch.setattr(localstart, "class_archive", lambda: localstart.Path("/nowhere/classes.jsa"))
    assert localstart.java_options() == localstart.NO_ARCHIVE and local_java_options(SparkConf()) is None


def test_only_the_jobs_that_work_in_python_get_the_quick_compiler_on_a_small_machine(monkeypatch):
    from pyspark import SparkConf

    monkeypatch.setattr("pyspark.SparkContext._gateway", None)
    given = SparkConf(loadDefaults=False).set("spark.driver.extraJavaOptions", "-Dmine=1")
    monkeypatch.setattr(localstart.os, "cpu_count", lambda: 2)
    for job in ("search", "embed", "evaluate", "report"):
        options = local_java_options(given, job).split()
        assert options[0] == "-Dmine=1" and localstart.QUICK_COMPILER in options, job  # the user's own options kept
    # Spark ML's KMeans runs in the JVM: the index job keeps the optimising compiler
    for job in ("index",):
        assert localstart.QUICK_COMPILER not in (local_java_options(given, job) or ""), job
    # an index update trains nothing; --mode auto may rebuild
    for argv, quick in (
        (["--mode", "incremental"], True),
        (["--embeddings", "t", "--mode=incremental"], True),
        (["--mode", "auto"], False),
        (["--mode", "overwrite"], False),
        (["--output", "incremental"], False),
    ):
        assert (localstart.QUICK_COMPILER in (local_java_options(given, "index", argv) or "")) == quick, argv
    # jobs chained in one application: the quick compiler only where none of them trains
    for argv, quick in (
        (["--input", "p", "--then", "search", "--all", "--then", "index", "--mode", "incremental"], True),
        (["--input", "p", "--then", "search", "--all", "--then", "index", "--output", "i"], False),
        (["--input", "p", "--then", "index", "--output", "r"], False),
        (["--input", "p", "--then"], False),
    ):
        assert (localstart.QUICK_COMPILER in (local_java_options(given, "embed", argv) or "")) == quick, argv
    assert localstart.java_options() in (
        localstart.NO_ARCHIVE,
        f"-XX:SharedArchiveFile={localstart.class_archive()}",
    )  # one word
    monkeypatch.setattr(localstart.os, "cpu_count", lambda: 16)
    assert localstart.QUICK_COMPILER not in (local_java_options(given, "search") or "")


def test_local_runs_map_the_class_archive_setup_wrote(tmp_path, monkeypatch):
    if not localstart.class_archive().is_file():
        pytest.skip("make setup wrote no class archive here (scripts/local_start.py said why)")
    # -Xshare:on: a JVM that cannot map the archive (another JVM, class path or pyspark) refuses to start
    monkeypatch.setattr(
        localstart,
        "java_options",
        lambda *_: f"-XX:SharedArchiveFile={localstart.class_archive()} -Xshare:on {localstart.QUICK_COMPILER}",
    )
    from helpers import build_dist

    result = spark_submit(build_dist(tmp_path / "dist"), ["search", "--help"])
    assert result.returncode == 0, result.stderr[-2000:]
    assert "--nprobe" in result.stdout


STOPPED = """
import threading
from pyspark import SparkContext
from jobs.cli import spark_session, stop
spark = spark_session("search", {"spark.master": "local[1]", "spark.ui.enabled": "false"})
total = spark.sparkContext.accumulator(0)
spark.sparkContext.parallelize(range(10), 2).foreach(lambda x: total.add(x))  # the JVM connects to the server
server = spark.sparkContext._accumulatorServer
stop(spark)
[t.join(10) for t in threading.enumerate() if t.name == "accumulator-server-shutdown"]
print(total.value, SparkContext._active_spark_context is None, server.server_shutdown, server.socket.fileno())
"""


def test_a_job_that_used_accumulators_stops_its_session_and_their_server(tmp_path):
    # its own JVM, started as vehicle-search starts one: with the search job's options (archive, quick compiler)
    env = {**submit_env(), "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", STOPPED], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-4:] == ["45", "True", "True", "-1"]  # counted, context gone, server shut and closed
