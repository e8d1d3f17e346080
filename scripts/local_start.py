"""Remove two start-up costs of pip's pyspark from local runs (make setup runs this; safe to run again).

1. pyspark.zip, which every local Python worker and spark-submit driver imports pyspark from, holds only
   sources: each process compiles pyspark again (0.7 s here; 0.15 s from bytecode). Bytecode is added to
   the zip, checked against each source's hash, so a changed source is still compiled.
2. The driver JVM loads and verifies thousands of classes from pyspark's jars on every start. A class-data
   sharing archive of them (jobs.localstart) is written by one small Spark job run with the JVM dumping
   what it loaded; local runs map it instead.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import os
import subprocess
import sys
import tempfile
import warnings
import zipfile
from importlib import _bootstrap_external  # type: ignore[attr-defined]
from pathlib import Path

import pyspark

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from jobs import localstart  # noqa: E402

# what the archive should hold: the classes of reading and writing Parquet, Arrow batches to and from Python
# workers, a shuffle, a window and a join (the jobs' common path); other classes still load from the jars
WARM_JOB = """
import sys
import pyarrow as pa
from pyspark.sql import SparkSession, Window, functions as F
spark = SparkSession.builder.config("spark.ui.enabled", "false").getOrCreate()
out = sys.argv[1]
rows = spark.range(2000).select((F.col("id") % 7).alias("cell"), F.col("id").cast("string").alias("image_id"))
rows.write.parquet(out + "/a")
table = spark.read.parquet(out + "/a").mapInArrow(lambda batches: (b for b in batches), rows.schema)
ranked = table.repartition(4, "cell").withColumn("rank",
F.row_number().over(Window.partitionBy("cell").orderBy("image_id")))
ranked.join(F.broadcast(spark.range(7).withColumnRenamed("id", "cell")), "cell").write.parquet(out + "/b")
print(spark.read.parquet(out + "/b").count())
spark.stop()
"""


def python_zips() -> list[Path]:
    """pyspark.zip and py4j's zip, which spark-submit puts first on the Python path of drivers and workers."""
    return sorted((Path(pyspark.__file__).parent / "python" / "lib").glob("*.zip"))


def compile_zip(path: Path) -> int:
    """Add checked-hash bytecode beside every source in the zip (where zipimport looks for it); the modules compiled."""
    magic = importlib.util.MAGIC_NUMBER
    with zipfile.ZipFile(path) as old:
        names = set(old.namelist())
        sources = [n for n in names if n.endswith(".py") and n[:-3] + ".pyc" not in names and "/tests/" not in n]
        if not sources:
            return 0
        handle, temporary = tempfile.mkstemp(dir=path.parent, suffix=".zip")
        os.close(handle)
        with zipfile.ZipFile(temporary, "w", zipfile.ZIP_DEFLATED) as new:
            for info in old.infolist():
                new.writestr(copy.copy(info), old.read(info))  # writestr renumbers the info it is given
            for name in sorted(sources):
                source = old.read(name)
                with warnings.catch_warnings():  # pyspark's own sources warn of their style; not ours to report
                    warnings.simplefilter("ignore")
                    code = compile(source, f"{path}/{name}", "exec", dont_inherit=True)
                data = _bootstrap_external._code_to_hash_pyc(code, importlib.util.source_hash(source), checked=True)
                assert data[:4] == magic
                new.writestr(zipfile.ZipInfo(name[:-3] + ".pyc", old.getinfo(name).date_time), bytes(data))
    os.chmod(temporary, path.stat().st_mode)
    os.replace(temporary, path)
    return len(sources)


def write_archive(archive: Path) -> None:
    """Run WARM_JOB through spark-submit (whose JVM waits for the job, then exits and writes the archive)."""
    archive.parent.mkdir(parents=True, exist_ok=True)
    partial = archive.with_suffix(".partial")
    partial.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory() as work:
        job = Path(work) / "warm.py"
        job.write_text(WARM_JOB)
        env = {
            **os.environ,
            "PYSPARK_PYTHON": sys.executable,
            "PYSPARK_DRIVER_PYTHON": sys.executable,
            "SPARK_LOCAL_IP": "127.0.0.1",
        }
        env.pop("PYTHONPATH", None)
        submit = Path(sys.executable).parent / "spark-submit"
        subprocess.run(
            [
                str(submit),
                "--master",
                "local[2]",
                "--driver-java-options",
                f"-XX:ArchiveClassesAtExit={partial}",
                str(job),
                f"{work}/out",
            ],
            env=env,
            check=True,
            capture_output=True,
            timeout=900,
        )
    if not partial.exists():
        raise RuntimeError(f"the JVM wrote no archive at {partial}")
    os.replace(partial, archive)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-archive", action="store_true", help="only compile pyspark.zip")
    args = parser.parse_args()
    for path in python_zips():
        try:
            print(f"{path.name}: {compile_zip(path)} modules compiled into {path}")
        except OSError as error:  # a read-only pyspark: it compiles its modules in each process, as it ships
            print(f"{path} left as it is ({error})", file=sys.stderr)
    if not args.skip_archive:
        try:
            write_archive(localstart.class_archive())
            print(
                f"class-data sharing archive: {localstart.class_archive()} "
                f"({localstart.class_archive().stat().st_size >> 20} MiB)"
            )
        except (
            OSError,
            RuntimeError,
            subprocess.SubprocessError,
        ) as error:  # local runs work without it, only slower to start
            print(f"no class-data sharing archive ({error}); local runs start as pyspark ships", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
