"""Build the shipped artefacts and run them through spark-submit, as users do."""

from __future__ import annotations

import contextlib
import http.server
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

from jobs import localstart
from scripts.build_zip import build

ROOT = Path(__file__).resolve().parents[1]
SPARK_SUBMIT = str(Path(sys.executable).parent / "spark-submit")


def build_dist(folder: Path) -> tuple[Path, Path]:
    """jobs.zip and main.py exactly as `make build` writes them."""
    folder.mkdir(parents=True, exist_ok=True)
    build(ROOT / "jobs", folder / "jobs.zip")
    shutil.copy(ROOT / "jobs" / "__main__.py", folder / "main.py")
    return folder / "jobs.zip", folder / "main.py"


def submit_command(
    dist: tuple[Path, Path],
    job_args: list,
    master: str = "local[2]",
    conf: dict | None = None,
    jvm_as: str | None = None,
) -> list[str]:
    """`spark-submit --master M --conf ... --py-files jobs.zip main.py JOB ...` as an argument list; the driver JVM's
    options are those of JOB (of `jvm_as` where given: a script that is not one of the jobs)."""
    zip_path, main_py = dist
    command = [
        SPARK_SUBMIT,
        "--master",
        master,
        "--conf",
        "spark.ui.enabled=false",
        "--conf",
        "spark.ui.showConsoleProgress=false",
    ]
    # tiny inputs: 4 shuffle partitions, as in the test session (Spark's 200 make a 3-query search ~3x slower)
    for key, value in {"spark.sql.shuffle.partitions": "4", **(conf or {})}.items():
        command += ["--conf", f"{key}={value}"]
    # as the Makefile's submit: the job's local driver JVM options (the class archive of make setup, the quick compiler)
    words = [str(a) for a in job_args]
    command += ["--driver-java-options", localstart.java_options(jvm_as or (words[0] if words else None), words[1:])]
    return [*command, "--py-files", str(zip_path), str(main_py), *[str(a) for a in job_args]]


def submit_env(extra: dict | None = None) -> dict[str, str]:
    """This venv's python for driver and executors, loopback only, and the jobs only from the zip."""
    env = {
        **os.environ,
        "PYSPARK_PYTHON": sys.executable,
        "PYSPARK_DRIVER_PYTHON": sys.executable,
        "SPARK_LOCAL_IP": "127.0.0.1",
        **(extra or {}),
    }
    env.pop("PYTHONPATH", None)
    return env


def spark_submit(
    dist: tuple[Path, Path],
    job_args: list,
    master: str = "local[2]",
    conf: dict | None = None,
    timeout: int = 600,
    env: dict | None = None,
) -> subprocess.CompletedProcess:
    """Run spark-submit to completion from the folder of the zip (outside the repository)."""
    return subprocess.run(
        submit_command(dist, job_args, master, conf),
        cwd=dist[0].parent,
        env=submit_env(env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@contextlib.contextmanager
def serve_files(folder: Path) -> Iterator[tuple[str, list[str]]]:
    """An HTTP server of folder's files on 127.0.0.1: (its base URL, the paths asked for so far)."""
    requests: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(folder), **kwargs)

        def log_message(self, *args):
            requests.append(self.path)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}", requests
    finally:
        server.shutdown()
