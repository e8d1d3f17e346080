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

from scripts.emr_submit import read_properties

# Smallest RLIMIT_AS (MB) under which one embed worker ran: pyspark.worker, pandas, pyarrow and jobs.embed imported,
# the driver's exported backend loaded, then embed_partition over an Arrow-sized batch of 32 real photos
# (scikit-image's), OMP_NUM_THREADS=1 as Spark sets it. Bisected in a subprocess under resource.setrlimit on
# x86_64, Python 3.11, torch 2.13.0 CPU, onnxruntime: MobileNetV2 on onnxruntime (the default backend) 1406-1417 MB,
# ResNet-18 on onnxruntime 1231-1242, MobileNetV2 TorchScript 1067-1078, eager 1201-1210, ResNet-18 eager
# 1133-1142 (VmPeak unlimited 1460 MB for the first, peak RSS only 728 MB: RLIMIT_AS counts address space).
EMBED_WORKER_PEAK_MB = 1417
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


def test_the_old_emr_setting_fails_the_check():
    assert worker_budget_mb({"spark.executor.pyspark.memory": "2g", "spark.executor.cores": "4"}) == 512
    assert worker_budget_mb({"spark.executor.pyspark.memory": "2048", "spark.executor.cores": "1"}) == 2048
    assert worker_budget_mb({}) is None


# A worker's embed path on the default (heaviest) backend: the onnxruntime model exported as the driver exports it,
# loaded and run on a batch of 32 crops in a process holding what Spark's forked worker holds.
PROBE = """
import resource, sys
limit = int(sys.argv[1]) << 20
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
import numpy as np
import pyspark.worker  # noqa: F401 - what Spark's forked worker already holds
from jobs.embed.model import Backend, load_runner
runner = load_runner(Backend("onnxruntime", open(sys.argv[2], "rb").read()), 1)
vectors = runner(np.random.default_rng(0).integers(0, 255, (32, 224, 224, 3), dtype=np.uint8))
assert vectors.shape[0] == 32
print("embedded 32")
"""


@pytest.fixture(scope="module")
def onnx_model(mobilenet_weights, tmp_path_factory) -> str:
    from jobs.embed.model import export

    path = tmp_path_factory.mktemp("onnx") / "mobilenet_v2.onnx"
    path.write_bytes(export("onnxruntime", "mobilenet_v2", Path(mobilenet_weights).read_bytes()))
    return str(path)


def run_probe(limit_mb: float, artifact: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}  # Spark sets OMP_NUM_THREADS = task cpus
    return subprocess.run([sys.executable, "-c", PROBE, str(int(limit_mb)), artifact], capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.slow
def test_a_worker_loads_and_runs_the_model_within_the_smallest_budget(onnx_model):
    budget = min(b for b in (worker_budget_mb(read_properties(c)) for c in CONFS) if b is not None)
    ok = run_probe(budget, onnx_model)
    assert ok.returncode == 0 and "embedded 32" in ok.stdout, ok.stderr[-2000:]
    starved = run_probe(512, onnx_model)  # the old emr.conf: 2g / 4 cores
    assert starved.returncode != 0 and "embedded 32" not in starved.stdout, starved.stdout
    assert re.search(r"[Mm]emory|ImportError|cannot allocate|failed to map|bad_alloc", starved.stderr), starved.stderr[-2000:]


def test_packed_environment_holds_what_the_jobs_import():
    """Cluster mode runs the driver in the packed environment too: every third-party import of jobs/ is packed."""
    makefile = (ROOT / "Makefile").read_text()
    packed = " ".join(line for line in makefile.splitlines() if "pip install" in line and ".venv-exec" in line).lower()
    imports = set()
    for source in Path(ROOT / "jobs").rglob("*.py"):
        imports |= set(re.findall(r"^\s*(?:from|import) ([a-zA-Z_]\w*)", source.read_text(), re.M))
    distributions = {"PIL": "pillow", "botocore": "boto3", "yaml": "pyyaml", "sklearn": "scikit-learn"}
    third_party = imports - set(sys.stdlib_module_names) - {"jobs", "pyspark", "__future__"}
    missing = [m for m in sorted(third_party) if distributions.get(m, m).lower() not in packed]
    assert third_party >= {"torch", "numpy", "boto3", "matplotlib"} and not missing, missing
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
