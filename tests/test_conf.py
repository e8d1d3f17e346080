"""What ships besides the code: the conf/ files give every Python worker the address space an embed worker needs
(and that figure is real: a worker's model load and forward pass run under it and fail under the 512 MB the old
emr.conf gave); the packed environment holds what the jobs import; make help and clean; the console entry point."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

from scripts import sample_data
from scripts.emr_submit import read_properties

# Largest address space (VmPeak, MB) of a real embed worker: spark-submit --master local[2] with
# spark.executor.cores=2, embed of 74 demo photos (batch 32), polling /proc/PID/status of the pyspark.daemon processes
# (Spark 4.3, Python 3.11, x86_64, torch 2.13.0 CPU, onnxruntime), with ARROW_DEFAULT_MEMORY_POOL=system and
# MALLOC_ARENA_MAX=2 as the confs set them: MobileNetV2 TorchScript 1741, ResNet-18 onnxruntime 1372, MobileNetV2
# onnxruntime 1254, MobileNetV2 eager 1124, ResNet-18 eager 1093, ResNet-18 TorchScript 1072. Without the two settings
# MobileNetV2 onnxruntime peaked at 2595 MB (and failed
# under a 2 GiB RLIMIT_AS, passed under 2.5 GiB): Arrow's jemalloc pool and glibc's arenas reserve address space.
EMBED_WORKER_PEAK_MB = 1741
# Beyond the measurement: bigger photos and Arrow batches than the sample's, more thread stacks on bigger nodes.
HEADROOM_MB = 512
CONFS = sorted((ROOT / "conf").glob("*.conf"))
UNITS = {"k": 1 / 1024, "m": 1, "g": 1024, "t": 1024 * 1024}


def mebibytes(value: str) -> float:
    """A Spark size ('7g', '1792m', '2048': pyspark.memory's unit is MiB) in MiB."""
    number, unit = re.fullmatch(r"(\d+)([kmgt]?)b?", value.strip().lower()).groups()
    return int(number) * UNITS[unit or "m"]


def worker_budget_mb(props: dict[str, str]) -> float | None:
    """RLIMIT_AS each Python worker gets from these properties, or None where Spark sets none."""
    if "spark.executor.pyspark.memory" not in props:
        return None
    return mebibytes(props["spark.executor.pyspark.memory"]) / int(props["spark.executor.cores"])


def test_every_conf_gives_each_python_worker_the_embed_peak_plus_headroom():
    assert {c.name for c in CONFS} >= {"local.conf", "standalone.conf", "emr.conf", "dataproc.conf"}
    for conf in CONFS:
        props = read_properties(conf)
        if "spark.executor.pyspark.memory" in props:
            # the divisor must be explicit: EMR and Dataproc put their own per-machine spark.executor.cores in
            # spark-defaults.conf, and standalone divides by 1 while the executor takes every core (SPARK-30299)
            assert "spark.executor.cores" in props, f"{conf.name} sets pyspark.memory without spark.executor.cores"
            budget = worker_budget_mb(props)
            assert budget >= EMBED_WORKER_PEAK_MB + HEADROOM_MB, f"{conf.name}: {budget:.0f} MB per Python worker"
            assert f"{EMBED_WORKER_PEAK_MB} MB" in conf.read_text(), f"{conf.name} must show the arithmetic"
            # the measured figure holds only with these: Arrow's jemalloc pool and glibc's arenas reserve far more
            assert props.get("spark.executorEnv.ARROW_DEFAULT_MEMORY_POOL") == "system", conf.name
            assert props.get("spark.executorEnv.MALLOC_ARENA_MAX") == "2", conf.name


def test_the_old_emr_setting_fails_the_check():
    assert worker_budget_mb({"spark.executor.pyspark.memory": "2g", "spark.executor.cores": "4"}) == 512
    assert worker_budget_mb({"spark.executor.pyspark.memory": "2048", "spark.executor.cores": "1"}) == 2048
    assert worker_budget_mb({}) is None


# A worker's embed path: Arrow batches of 32 real photos read from a stream (as the worker reads them, through Arrow's
# default memory pool), each turned into pandas and run through the onnxruntime model exported as the driver exports
# it, in a process holding what Spark's forked worker holds. Three batches stand in for the socket's stream.
PROBE = """
import resource, sys
limit = int(sys.argv[1]) << 20
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
import numpy as np
import pyarrow as pa
import pyspark.worker  # noqa: F401 - what Spark's forked worker already holds
from jobs.embed.runtimes import Backend, load_exported
table = pa.table({"content": [open(p, "rb").read() for p in sys.argv[4:]]})
sink = pa.BufferOutputStream()
with pa.ipc.new_stream(sink, table.schema) as writer:
    for _ in range(3):
        writer.write_table(table)
runtime, precision = sys.argv[3].split()
runner = load_exported(Backend(runtime, precision, open(sys.argv[2], "rb").read()), 1)
for batch in pa.ipc.open_stream(sink.getvalue()):
    contents = batch.to_pandas()["content"]
    vectors = runner(np.random.default_rng(0).integers(0, 255, (len(contents), 224, 224, 3), dtype=np.uint8))
    assert vectors.shape[0] == 32
print("embedded 96")
"""


@pytest.fixture(scope="module")
def onnx_model(mobilenet_weights, tmp_path_factory) -> str:
    from jobs.embed.network import export_onnx

    path = tmp_path_factory.mktemp("onnx") / "mobilenet_v2.onnx"
    path.write_bytes(export_onnx("mobilenet_v2", Path(mobilenet_weights).read_bytes()))
    return str(path)


def run_probe(limit_mb: float, artifact: str, env: dict[str, str], backend: str) -> subprocess.CompletedProcess:
    photos = [str(p) for paths in sample_data.photo_paths().values() for p in paths]
    # Spark sets OMP_NUM_THREADS = spark.task.cpus for its workers
    env = {
        **{k: v for k, v in os.environ.items() if k not in ("ARROW_DEFAULT_MEMORY_POOL", "MALLOC_ARENA_MAX")},
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(ROOT),
        **env,
    }
    return subprocess.run(
        [sys.executable, "-c", PROBE, str(int(limit_mb)), artifact, backend, *(photos * 3)[:32]],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["openvino bf16", "openvino fp32", "onnxruntime fp32"])
def test_a_worker_embeds_within_the_smallest_budget_only_with_the_confs_allocator_settings(onnx_model, backend):
    budgets = {c.name: worker_budget_mb(read_properties(c)) for c in CONFS}
    name, budget = min(((n, b) for n, b in budgets.items() if b is not None), key=lambda item: item[1])
    executor_env = {
        k.removeprefix("spark.executorEnv."): v
        for k, v in read_properties(ROOT / "conf" / name).items()
        if k.startswith("spark.executorEnv.")
    }
    ok = run_probe(budget, onnx_model, executor_env, backend)
    assert ok.returncode == 0 and "embedded 96" in ok.stdout, ok.stderr[-2000:]
    # Arrow's jemalloc pool and glibc's arenas reserve address space: without the settings the same budget is not enough
    if backend != "onnxruntime fp32":
        return
    starved = run_probe(budget, onnx_model, {}, backend)
    assert starved.returncode != 0 and "embedded 96" not in starved.stdout, starved.stdout
    assert re.search(r"[Mm]emory|[Aa]llocat|ImportError|failed to map|bad_alloc", starved.stderr), starved.stderr[
        -2000:
    ]


def test_packed_environments_hold_what_the_jobs_import():
    """The full environment (cluster deploy mode runs the driver on it) packs every third-party import of jobs/; the
    executors' one packs no torch (tests/test_runtimes.py and the cluster test run the tasks without it)."""
    makefile = (ROOT / "Makefile").read_text()
    executor = re.search(r"^EXECUTOR_PACKAGES = (.*)$", makefile, re.M).group(1).lower()
    full = executor + " " + re.search(r"^DRIVER_PACKAGES = (.*)$", makefile, re.M).group(1).lower()
    imports = set()
    for source in Path(ROOT / "jobs").rglob("*.py"):
        imports |= set(re.findall(r"^\s*(?:from|import) ([a-zA-Z_]\w*)", source.read_text(), re.M))
    distributions = {"PIL": "pillow", "botocore": "boto3", "yaml": "pyyaml", "sklearn": "scikit-learn"}
    third_party = imports - set(sys.stdlib_module_names) - {"jobs", "pyspark", "__future__"}
    missing = [m for m in sorted(third_party) if distributions.get(m, m).lower() not in full]
    assert third_party >= {"torch", "numpy", "boto3", "matplotlib", "openvino"} and not missing, missing
    assert "torch" not in executor and {"openvino", "onnxruntime", "pyarrow"} <= set(re.findall(r"([a-z]+)", executor))
    assert "--python-prefix" in makefile  # relocatable: the archive's python points at the nodes' interpreter


def test_make_help_lists_every_target():
    makefile = (ROOT / "Makefile").read_text()
    phony = set(re.search(r"^\.PHONY: (.*)$", makefile, re.M).group(1).split())
    listed = subprocess.run(["make", "-s", "-C", str(ROOT), "help"], capture_output=True, text=True, check=True).stdout
    shown = {name for line in listed.splitlines() for name in line.split("  ")[1].split()}
    assert phony <= shown and {"test-spark35", "s3a-jars"} <= shown, phony - shown


def test_make_clean_removes_build_outputs_and_keeps_results(tmp_path):
    shutil.copy(ROOT / "Makefile", tmp_path / "Makefile")
    for path in ("out/demo/report/index.html", "dist/jobs.zip", ".venv-exec/pyvenv.cfg"):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text("x")
    subprocess.run(["make", "-s", "-C", str(tmp_path), "clean"], capture_output=True, check=True)
    assert (tmp_path / "out/demo/report/index.html").exists()
    assert not (tmp_path / "dist").exists() and not (tmp_path / ".venv-exec").exists()


def test_console_entry_point_is_main_py():
    """`vehicle-search` (pyproject [project.scripts], installed by make setup) parses exactly as main.py does."""
    script = Path(sys.executable).parent / "vehicle-search"
    result = subprocess.run([str(script), "report", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "--max-queries" in result.stdout
    assert subprocess.run([str(script), "nosuchjob"], capture_output=True, text=True, timeout=120).returncode == 2
