"""A real Spark standalone cluster on 127.0.0.1 (a master and two one-core workers from the pyspark installation,
sharing no local folder) running the README's standalone block against an S3-compatible server, equal to local[2];
a Python worker killed mid-run; the cluster is stopped even when a test fails."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import boto3
import numpy as np
import pytest
from conftest import ROOT, run_job
from helpers import build_dist, submit_command, submit_env
from test_s3 import KEYS, read_remote

S3_KEYS = {"aws_access_key_id": KEYS["AWS_ACCESS_KEY_ID"], "aws_secret_access_key": KEYS["AWS_SECRET_ACCESS_KEY"]}

pytestmark = pytest.mark.slow
SPARK_CLASS = str(Path(sys.executable).parent / "spark-class")


def free_ports(count: int) -> list[int]:
    """Distinct free ports: all held open at once while chosen (one at a time, the system may give one twice)."""
    with contextlib.ExitStack() as held:
        sockets = [held.enter_context(socket.socket()) for _ in range(count)]
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]


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


def start(command: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
    with open(log, "w") as out:  # the child keeps its own descriptor
        return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A master and two workers of one core each on 127.0.0.1; each worker (and so its executor) has its own work and
    local directories. Each executor unpacks the environment (1.2 GB) for every job: the workers delete a finished
    job's folders after a few seconds (spark.worker.cleanup, as README advises), or ten jobs would leave 36 GB."""
    folder = tmp_path_factory.mktemp("cluster")
    scratch = folder
    port, ui, *worker_ui = free_ports(4)
    cleanup = (
        "-Dspark.worker.cleanup.enabled=true -Dspark.worker.cleanup.interval=5 -Dspark.worker.cleanup.appDataTtl=5"
    )
    env = {**os.environ, "SPARK_LOCAL_IP": "127.0.0.1", "SPARK_LOG_DIR": str(folder), "SPARK_WORKER_OPTS": cleanup}
    env["SPARK_DAEMON_JAVA_OPTS"] = "-XX:TieredStopAtLevel=1"  # the master and workers only pass messages here
    processes = []
    try:
        master = [SPARK_CLASS, "org.apache.spark.deploy.master.Master", "--host", "127.0.0.1", "--port", str(port)]
        processes.append(start([*master, "--webui-port", str(ui)], folder / "master.log", env))
        wait_until(lambda: alive_workers(ui) == 0 and _listening(port), 90, "the master")
        for n in (1, 2):
            own = {"SPARK_WORKER_DIR": str(scratch / f"work{n}"), "SPARK_LOCAL_DIRS": str(scratch / f"local{n}")}
            worker = [SPARK_CLASS, "org.apache.spark.deploy.worker.Worker", f"spark://127.0.0.1:{port}"]
            options = ["--host", "127.0.0.1", "--cores", "1", "--memory", "2g", "--webui-port", str(worker_ui[n - 1])]
            processes.append(start([*worker, *options], folder / f"worker{n}.log", {**env, **own}))
        wait_until(lambda: alive_workers(ui) == 2, 90, "both workers to register")
        yield f"spark://127.0.0.1:{port}", scratch
    finally:
        for process in reversed(processes):
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def readme_block(heading: str) -> str:
    """The first bash block after a heading of the README."""
    text = (ROOT / "README.md").read_text()
    return text[text.index(heading) :].split("```bash\n", 1)[1].split("```", 1)[0]


def run_block(commands: str, env: dict[str, str]) -> str:
    """Run the commands in bash, printing each `make` line's seconds (bash -x stamps each command's start)."""
    started = time.time()
    script = f"PS4='+ ${{EPOCHREALTIME}} '\nset -x\n{commands}"  # bash run as root takes no PS4 from the environment
    result = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    stamps = re.findall(r"^\+ (\d+\.\d+) (.*)$", result.stderr, re.M)
    ends = [float(t) for t, _ in stamps[1:]] + [time.time()]
    for (start, command), end in zip(stamps, ends):
        if command.startswith("make "):
            print(f"{end - float(start):6.1f} s  {command[:100]}")
    print(f"{time.time() - started:6.1f} s  in all")
    print("".join(re.findall(r"^.*jobs in one application.*\n", result.stdout + result.stderr, re.M)), end="")
    output = result.stdout + re.sub(r"^\+ \d+\.\d+ .*\n", "", result.stderr, flags=re.M)  # the trace shows the keys
    return output


class TaskWatch:
    """Which workers' executors ran a task, read from their logs while the jobs run (the workers delete a finished
    job's folders within seconds)."""

    def __init__(self, scratch: Path) -> None:
        self.scratch, self.seen, self.done = scratch, set(), threading.Event()

    def scan(self) -> None:
        for n in (1, 2):
            for log in (self.scratch / f"work{n}").glob("app-*/*/stderr"):
                with contextlib.suppress(OSError):
                    if "Running task" in log.read_text(errors="replace"):
                        self.seen.add(n)

    def watch(self) -> None:
        while not self.done.wait(1.0):
            self.scan()

    def __enter__(self) -> TaskWatch:
        self.thread = threading.Thread(target=self.watch, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.done.set()
        self.thread.join()


def short(path: str) -> str:
    """label/file.jpg: the same for a photo on S3 and its local copy."""
    return "/".join(path.rsplit("/", 2)[-2:])


def named(frame, *columns: str) -> list[tuple]:
    return sorted(
        tuple(short(v) if "path" in c else v for c, v in zip(columns, row))
        for row in frame[list(columns)].itertuples(index=False)
    )


# Photos embedded by the executors here (no torch: Pillow's resize) and by the local run (torch's) differ by one grey
# level, which bf16 turns into similarities up to ~3e-3 apart: two neighbours closer than that may trade ranks.
TIE = 5e-3


def mirror(s3, prefix: str, folder: Path) -> Path:
    """A local copy of the table under prefix (its committed files), replacing the folder's."""
    shutil.rmtree(folder, ignore_errors=True)
    for item in s3.list_objects_v2(Bucket="vehicles", Prefix=prefix)["Contents"]:
        name = item["Key"].removeprefix(prefix)
        if "_temporary" not in name and "staging" not in name:
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            s3.download_file("vehicles", item["Key"], str(folder / name))
    return folder


def same_neighbours(remote, local) -> None:
    """The same similarities at every rank, and the same neighbours but where two of them tie to within TIE."""
    for table in (remote, local):
        table["query"], table["neighbour"] = table["query_path"].map(short), table["neighbor_path"].map(short)
    ours, theirs = (t.sort_values(["query", "rank"]).groupby("query") for t in (remote, local))
    assert sorted(dict(list(ours)).keys()) == sorted(dict(list(theirs)).keys())
    theirs = dict(list(theirs))
    for query, mine in ours:
        other = theirs[query]
        assert list(mine["rank"]) == list(other["rank"]), query
        np.testing.assert_allclose(mine["similarity"], other["similarity"], atol=TIE, err_msg=query)
        # a neighbour clear of the last rank by more than TIE in one answer is among the other's
        kth = min(mine["similarity"].min(), other["similarity"].min())
        for one, another in ((mine, other), (other, mine)):
            assert set(one.loc[one["similarity"] > kth + TIE, "neighbour"]) <= set(another["neighbour"]), query


def test_readme_standalone_block_runs_the_pipeline_on_two_workers_and_s3_as_local(
    cluster, moto, spark, tmp_path, demo_dir, mobilenet_weights
):
    """The README's standalone block, as written but for the master, the bucket, the keys and the model (the only
    real weights offline are MobileNetV2's), with the endpoint in SUBMIT_OPTS: photos from s3a, every output to s3a,
    on two executors that share no disk; its answers equal the same pipeline's on local[2] with local paths."""
    master, scratch = cluster
    s3 = boto3.client("s3", endpoint_url=moto, **S3_KEYS)
    s3.create_bucket(Bucket="vehicles")
    block = readme_block("### Standalone")
    for old, new in {
        "spark://master-host:7077": master,
        "my-bucket": "vehicles",
        "your-key-id": KEYS["AWS_ACCESS_KEY_ID"],
        "your-secret": KEYS["AWS_SECRET_ACCESS_KEY"],
        "--model resnet18": "--model mobilenet_v2",
        "resnet18-f37072fd.pth": "mobilenet_v2-b0353104.pth",
    }.items():
        assert old in block, old
        block = block.replace(old, new)
    first, later = block.split("\n# later, ")
    later = f"# later, {later}"
    setup = first.split("\n# the whole pipeline")[0]  # the exports, for the later lines
    assert first.count("make pipeline") == 1 and later.count("make pipeline") == 1
    endpoint = f"--conf spark.hadoop.fs.s3a.endpoint={moto} --conf spark.hadoop.fs.s3a.path.style.access=true"
    # the driver's own local directory (it unpacks the environment too) beside the workers', never shared with them
    env = {**submit_env(), "SUBMIT_OPTS": endpoint, "SPARK_LOCAL_DIRS": str(scratch / "driver")}
    photos, queries = tmp_path / "photos", tmp_path / "queries"
    for label in ("cat", "coffee", "motorcycle", "rocket"):
        shutil.copytree(demo_dir / "catalog" / label, photos / label)
        shutil.copytree(demo_dir / "queries" / label, queries / label)
    s3.upload_file(mobilenet_weights, "vehicles", "vehicle-search/models/mobilenet_v2-b0353104.pth")
    for folder in (photos, queries):
        for path in folder.rglob("*.jpg"):
            s3.upload_file(str(path), "vehicles", f"vehicle-search/{folder.name}/{path.relative_to(folder)}")

    with TaskWatch(scratch) as tasks:
        output = run_block(first, env)
    assert tasks.seen == {1, 2}, f"only the executors of workers {tasks.seen} ran tasks"
    assert KEYS["AWS_SECRET_ACCESS_KEY"] not in output
    remote = {name: read_remote(s3, f"vehicle-search/{name}/") for name in ("embeddings", "similar", "duplicates")}
    remote["knn_graph"] = read_remote(s3, "vehicle-search/knn_graph/")
    evaluation = json.loads(s3.get_object(Bucket="vehicles", Key="vehicle-search/evaluation.json")["Body"].read())
    report = {o["Key"] for o in s3.list_objects_v2(Bucket="vehicles", Prefix="vehicle-search/report/")["Contents"]}
    embedded, searched = (
        json.loads(s3.get_object(Bucket="vehicles", Key=f"vehicle-search/{name}/_summary.json")["Body"].read())
        for name in ("embeddings", "similar")
    )

    # The same pipeline on local[2]. It embeds the same photos with torch's resize (the executors here have none and
    # use Pillow's): the vectors agree to cosine 0.999. From them on, it reads the cluster's own vectors (a copy of the
    # table), so every answer after embed must equal the cluster's exactly; photo queries, embedded here, up to ties.
    out = tmp_path / "local"
    table = mirror(s3, "vehicle-search/embeddings/", out / "cluster_embeddings")
    ours, local = replay_locally(spark, photos, queries, table, out, mobilenet_weights)
    assert named(remote["embeddings"], "path") == named(ours, "path") and len(ours) == 24
    assert remote["embeddings"]["path"].str.startswith("s3a://vehicles/vehicle-search/photos/").all()
    vectors = [dict(zip(t["path"].map(short), t["embedding"])) for t in (remote["embeddings"], ours)]
    assert min(float(np.dot(v, vectors[1][path])) for path, v in vectors[0].items()) >= 0.999
    same_neighbours(remote["similar"], local["similar"])
    assert named(remote["knn_graph"], "query_path", "rank", "neighbor_path") == named(
        local["knn_graph"], "query_path", "rank", "neighbor_path"
    )
    # a pair is written once, in the order of its ids, which hash the paths: compare pairs of names, unordered
    pairs = [sorted(map(sorted, named(t, "path_a", "path_b"))) for t in (remote["duplicates"], local["duplicates"])]
    assert pairs[0] == pairs[1] and pairs[0]
    assert evaluation["metrics"]["recall@10"] >= 0.9 and evaluation["metrics"]["queries"] == 24, evaluation
    assert {"vehicle-search/report/index.html", "vehicle-search/report/report_summary.json"} <= report
    assert embedded["weights"]["source"] == "s3a://vehicles/vehicle-search/models/mobilenet_v2-b0353104.pth"
    assert searched["touched"]["reader"] == "executors"  # pyarrow on the executors read the catalog from S3
    assert KEYS["AWS_SECRET_ACCESS_KEY"] not in json.dumps([embedded, searched])

    # photos added and removed, then the README's later lines (embed the new ones, update the index) and a search;
    # then the same update on local[2], of a copy of the table the cluster updated
    for path in sorted((demo_dir / "catalog" / "grace_hopper").glob("*.jpg")):
        s3.upload_file(str(path), "vehicles", f"vehicle-search/photos/grace_hopper/{path.name}")
    for path in sorted((photos / "cat").glob("*.jpg"))[:3]:
        s3.delete_object(Bucket="vehicles", Key=f"vehicle-search/photos/cat/{path.name}")
    assert "--then search --index $B/index --all -k 10 --output $B/knn_graph" in later
    run_block(f"{setup}\n{later}", env)
    mirror(s3, "vehicle-search/embeddings/", table)
    for args in (["index", "--embeddings", table, "--output", out / "index", "--mode", "incremental"], graph(out)):
        assert run_job(spark, *args) == 0, args
    updated = read_remote(s3, "vehicle-search/knn_graph/")
    index_summary = json.loads(
        s3.get_object(Bucket="vehicles", Key="vehicle-search/index/_summary.json")["Body"].read()
    )
    assert index_summary["counts"] == {**index_summary["counts"], "added": 6, "dropped": 3, "indexed": 27}
    local_graph = spark.read.parquet(str(out / "knn_graph")).toPandas()
    assert len(local_graph) == 27 * 10
    assert named(updated, "query_path", "rank", "neighbor_path") == named(
        local_graph, "query_path", "rank", "neighbor_path"
    )


def graph(out: Path) -> list:
    return ["search", "--index", out / "index", "--all", "-k", "10", "--output", out / "knn_graph"]


def replay_locally(spark, photos: Path, queries: Path, table: Path, out: Path, weights: str):
    """The first block on local[2] with local paths: the photos embedded here, then the cluster's table (a copy)
    indexed and searched; the local embeddings, and the similar, knn_graph and duplicates tables."""
    embed = ["embed", "--input", photos, "--output", out / "embeddings", "--model", "mobilenet_v2"]
    search = ["search", "--index", out / "index"]
    duplicates = [*search, "--duplicates", "--min-similarity", "0.95", "--output", out / "duplicates"]
    for args in (
        [*embed, "--weights", weights],
        ["index", "--embeddings", table, "--output", out / "index"],
        [*search, "--images", queries, "--weights", weights, "--output", out / "similar", "-k", "10"],
        graph(out),
        duplicates,
    ):
        assert run_job(spark, *args) == 0, args
    tables = {name: spark.read.parquet(str(out / name)).toPandas() for name in ("similar", "knn_graph", "duplicates")}
    return spark.read.parquet(str(out / "embeddings")).toPandas(), tables


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

    master, scratch = cluster
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
            return any("jobs.embed.task" in p.read_text(errors="replace") for p in scratch.glob("work*/app-*/*/stderr"))

        wait_until(
            lambda: process.poll() is not None or (embedding_started() and executor_python_workers(scratch)),
            240,
            "embedding to start on the executor",
        )
        assert process.poll() is None, "the job ended before a worker could be killed"
        killed = executor_python_workers(scratch)
        for pid in killed:
            os.kill(pid, SIGKILL)
        assert process.wait(timeout=400) == 0, (tmp_path / "submit.log").read_text()[-3000:]
    finally:
        if process.poll() is None:
            process.kill()
        log.close()
    executor_logs = "".join(p.read_text(errors="replace") for p in scratch.glob("work*/app-*/*/stderr"))
    assert (
        killed and "Python worker exited unexpectedly" in executor_logs
    )  # the kill really failed a task; Spark retried it
    rows = spark.read.parquet(str(tmp_path / "emb")).toPandas()
    assert len(rows) == 48 and rows["image_id"].is_unique and rows["error"].isna().all()
