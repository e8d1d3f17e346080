"""The shipped conf/ files give every Python worker the address space an embed worker needs, and that figure is
real: a worker's model load and forward pass run under it and fail under the 512 MB the old emr.conf gave."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

from scripts.emr_submit import read_properties

# Smallest RLIMIT_AS (MB) under which one embed worker ran: pyspark.worker, pandas, pyarrow and jobs.embed imported,
# the backbone built from its checkpoint bytes, then embed_partition over an Arrow-sized batch of 32 real photos
# (scikit-image's), OMP_NUM_THREADS=1 as Spark sets it. Bisected in a subprocess under resource.setrlimit on
# x86_64, Python 3.11, torch 2.13.0 CPU: MobileNetV2 1201-1210 MB, ResNet-18 1133-1142 MB (VmPeak unlimited:
# 1204 / 1140 MB; peak RSS only 703 / 641 MB: RLIMIT_AS counts address space, not resident memory).
EMBED_WORKER_PEAK_MB = 1210
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
    assert worker_budget_mb({"spark.executor.pyspark.memory": "1792", "spark.executor.cores": "1"}) == 1792
    assert worker_budget_mb({}) is None


# A worker's model half, through jobs.weights (stable while the embed internals change); the full embed path
# under this budget is what the standalone cluster test runs with the confs' per-worker pyspark memory.
PROBE = """
import resource, sys
limit = int(sys.argv[1]) << 20
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
import pyspark.worker  # what Spark's forked worker already holds
import torch
from jobs.weights import build_model
net = build_model(sys.argv[2], open(sys.argv[3], "rb").read()).eval()
with torch.inference_mode():
    out = net.embed(torch.rand(32, 3, 224, 224))
assert out.shape[0] == 32
print("embedded 32")
"""


def run_probe(limit_mb: float, model: str, weights: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", PROBE, str(int(limit_mb)), model, weights], capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.slow
def test_a_worker_loads_and_runs_the_model_within_the_smallest_budget(mobilenet_weights):
    budget = min(b for b in (worker_budget_mb(read_properties(c)) for c in CONFS) if b is not None)
    ok = run_probe(budget, "mobilenet_v2", mobilenet_weights)
    assert ok.returncode == 0 and "embedded 32" in ok.stdout, ok.stderr[-2000:]
    starved = run_probe(512, "mobilenet_v2", mobilenet_weights)  # the old emr.conf: 2g / 4 cores
    assert starved.returncode != 0 and "embedded 32" not in starved.stdout, starved.stdout
    assert re.search(r"[Mm]emory|ImportError|cannot allocate|failed to map", starved.stderr), starved.stderr[-2000:]


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
