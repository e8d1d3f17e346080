"""A real Spark standalone cluster on 127.0.0.1: master + worker from the pyspark installation,
the built jobs.zip and the packed environment submitted with spark-submit, embed -> index -> search,
a Python worker killed mid-run; the cluster is stopped even when a test fails.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import ROOT
from helpers import build_dist, spark_submit, submit_command, submit_env
from test_conf import worker_budget_mb

from scripts.emr_submit import read_properties

pytestmark = pytest.mark.slow
SPARK_CLASS = str(Path(sys.executable).parent / "spark-class")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.5)  # polling a condition with a deadline, not sleeping in place of synchronisation
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def alive_workers(ui_port: int) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{ui_port}/json/", timeout=2) as response:
            return int(json.load(response).get("aliveworkers", 0))
    except OSError:
        return 0


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cluster")
    port, ui, worker_ui = free_port(), free_port(), free_port()
    env = {**os.environ, "SPARK_LOCAL_IP": "127.0.0.1", "SPARK_LOG_DIR": str(folder)}
    logs = [open(folder / name, "w") for name in ("master.log", "worker.log")]  # noqa: SIM115 - closed in finally
    processes = []
    try:
        processes.append(
            subprocess.Popen(
                [
                    SPARK_CLASS,
                    "org.apache.spark.deploy.master.Master",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(port),
                    "--webui-port",
                    str(ui),
                ],
                stdout=logs[0],
                stderr=subprocess.STDOUT,
                env=env,
            )
        )
        wait_until(lambda: alive_workers(ui) == 0 and _listening(port), 90, "the master")
        processes.append(
            subprocess.Popen(
                [
                    SPARK_CLASS,
                    "org.apache.spark.deploy.worker.Worker",
                    f"spark://127.0.0.1:{port}",
                    "--host",
                    "127.0.0.1",
                    "--cores",
                    "2",
                    "--memory",
                    "3g",
                    "--webui-port",
                    str(worker_ui),
                    "--work-dir",
                    str(folder / "work"),
                ],
                stdout=logs[1],
                stderr=subprocess.STDOUT,
                env=env,
            )
        )
        wait_until(lambda: alive_workers(ui) == 1, 90, "the worker to register")
        yield f"spark://127.0.0.1:{port}", folder
    finally:
        for process in reversed(processes):
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
        for log in logs:
            log.close()


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_embed_index_search_on_a_standalone_cluster(cluster, spark, tmp_path, demo_dir, mobilenet_weights):
    master, folder = cluster
    dist = build_dist(tmp_path / "dist")
    archive = ROOT / "dist" / "env.tar.gz"
    assert archive.exists(), "make test builds the executors' environment with `make pack-env`"
    # executors run Python from the venv-pack archive, as on a cluster without torch on its nodes
    # EMR's Python memory per worker, scaled to this worker's 2 cores, with its allocator settings: the embed and
    # the search's own photo embedding run under the address-space limit that emr.conf gives each Python worker
    emr = read_properties(ROOT / "conf" / "emr.conf")
    conf = {
        "spark.archives": f"{archive}#environment",
        "spark.pyspark.python": "./environment/bin/python",
        "spark.pyspark.driver.python": sys.executable,
        "spark.executor.memory": "2g",
        "spark.task.cpus": "1",
        "spark.executor.cores": "2",
        "spark.executor.pyspark.memory": f"{2 * worker_budget_mb(emr):.0f}m",
        **{k: v for k, v in emr.items() if k.startswith("spark.executorEnv.")},
    }
    shm = Path("/dev/shm")
    if shm.is_dir() and shutil.disk_usage(shm).free > 4 << 30:
        # the driver unpacks its own copy of the archive and deletes it at exit: 37,000 files, ~85 s on a disk
        # mounted with discard, a second in memory
        conf["spark.local.dir"] = str(shm)
    out = tmp_path / "out"
    steps = [
        [
            "embed",
            "--input",
            demo_dir / "catalog",
            "--output",
            out / "emb",
            "--model",
            "mobilenet_v2",
            "--weights",
            mobilenet_weights,
        ],
        ["index", "--embeddings", out / "emb", "--output", out / "index"],
        # the query photos are embedded inside the search job, with the weights index.json names
        ["search", "--index", out / "index", "--images", demo_dir / "queries", "--output", out / "nb", "-k", "3"],
    ]
    for step in steps:
        result = spark_submit(dist, step, master=master, conf=conf)
        assert result.returncode == 0, f"{step[0]} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        if "spark.archives" in conf:
            # shipped once: unpacking 0.5 GB (driver and executor) and deleting it (driver, at exit) takes minutes;
            # index and search run on the Python that embed's executor unpacked from the archive
            shipped = sorted(folder.glob("work/app-*/*/environment/bin/python"))[-1]
            conf = {**{k: v for k, v in conf.items() if k != "spark.archives"}, "spark.pyspark.python": str(shipped)}
    assert "query file:" in result.stdout and "rank  similarity" in result.stdout  # the console's top-k table
    catalog = spark.read.parquet(str(out / "emb")).toPandas()
    assert len(catalog) == 15 * 6 and catalog["error"].isna().all()
    neighbours = spark.read.parquet(str(out / "nb")).toPandas()
    assert neighbours.groupby("query_id").size().tolist() == [3] * 15
    top1 = neighbours[neighbours["rank"] == 1]
    assert (
        top1["neighbor_label"].to_numpy() == top1["query_path"].str.rsplit("/", n=2).str[-2].to_numpy()
    ).mean() >= 0.9


def processes() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line) of every process, from /proc."""
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                found[int(entry.name)] = (
                    ppid,
                    (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"),
                )
            except (OSError, IndexError, ValueError):
                continue
    return found


def _cwd(pid: int) -> str:
    try:
        return os.readlink(f"/proc/{pid}/cwd")
    except OSError:
        return ""


def executor_python_workers(work_dir: Path) -> list[int]:
    """Python worker processes forked under this cluster's executor JVMs (whose working directory is
    under its worker's work dir): never the test's local session or another cluster on the machine."""
    table = processes()
    executors = {
        pid
        for pid, (_, cmd) in table.items()
        if "CoarseGrainedExecutorBackend" in cmd and _cwd(pid).startswith(str(work_dir))
    }
    daemons = {pid for pid, (ppid, cmd) in table.items() if ppid in executors and "python" in cmd}
    return [pid for pid, (ppid, _) in table.items() if ppid in daemons]


def test_killed_python_workers_are_retried_and_every_image_is_embedded_once(
    cluster, spark, tmp_path, mobilenet_weights
):
    from signal import SIGKILL

    from scripts.sample_data import synthetic_photos

    master, folder = cluster
    synthetic_photos(tmp_path / "images" / "batch", 48, seed=9)
    command = submit_command(
        build_dist(tmp_path / "dist"),
        [
            "embed",
            "--input",
            tmp_path / "images",
            "--output",
            tmp_path / "emb",
            "--model",
            "mobilenet_v2",
            "--weights",
            mobilenet_weights,
            "--batch-size",
            "2",
            "--log-every",
            "1",
        ],
        master=master,
        conf={"spark.pyspark.python": sys.executable, "spark.executor.memory": "2g", "spark.task.maxFailures": "4"},
    )
    log = open(tmp_path / "submit.log", "w")  # noqa: SIM115 - closed below
    process = subprocess.Popen(command, env=submit_env(), stdout=log, stderr=subprocess.STDOUT)
    try:

        def embedding_started() -> bool:
            return any(
                "jobs.embed.task" in p.read_text(errors="replace") for p in (folder / "work").glob("app-*/*/stderr")
            )

        wait_until(
            lambda: process.poll() is not None or (embedding_started() and executor_python_workers(folder / "work")),
            240,
            "embedding to start on the executor",
        )
        assert process.poll() is None, "the job ended before a worker could be killed"
        killed = executor_python_workers(folder / "work")
        for pid in killed:
            os.kill(pid, SIGKILL)
        assert process.wait(timeout=400) == 0, (tmp_path / "submit.log").read_text()[-3000:]
    finally:
        if process.poll() is None:
            process.kill()
        log.close()
    executor_logs = "".join(p.read_text(errors="replace") for p in (folder / "work").glob("app-*/*/stderr"))
    assert (
        killed and "Python worker exited unexpectedly" in executor_logs
    )  # the kill really failed a task; Spark retried it
    rows = spark.read.parquet(str(tmp_path / "emb")).toPandas()
    assert len(rows) == 48 and rows["image_id"].is_unique and rows["error"].isna().all()
