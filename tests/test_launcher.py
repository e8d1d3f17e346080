"""The cluster command lines that need a cloud or a YARN cluster to run, checked by what would run them: the make
targets' and emr_submit's spark-submit lines by Spark's own SparkSubmit (it parses them and prepares the YARN
application, as it does before contacting the resource manager), the Dataproc ones against gcloud's documented form."""

from __future__ import annotations

import hashlib
import os
import shlex
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT
from helpers import serve_files

from scripts import dataproc_submit, emr_submit

PY = str(ROOT / ".venv" / "bin" / "python")
ARGS = "--input s3a://my-bucket/photos --output s3a://my-bucket/out/embeddings"
JOB = f"embed {ARGS}"


@pytest.fixture(scope="module")
def jvm(tmp_path_factory):
    """A JVM of this pyspark, started as spark-submit starts one, with HADOOP_CONF_DIR set as the README's YARN block
    sets it (SparkSubmit refuses --master yarn without it)."""
    from pyspark.java_gateway import launch_gateway

    conf_dir = tmp_path_factory.mktemp("hadoop-conf")
    saved, cwd = os.environ.get("HADOOP_CONF_DIR"), os.getcwd()
    os.environ["HADOOP_CONF_DIR"] = str(conf_dir)
    os.chdir(ROOT)  # make runs spark-submit from the repository's root: the conf files' paths are relative to it
    try:
        gateway = launch_gateway()
    finally:
        os.chdir(cwd)
        if saved is None:
            os.environ.pop("HADOOP_CONF_DIR")
        else:
            os.environ["HADOOP_CONF_DIR"] = saved
    yield gateway.jvm
    gateway.shutdown()


def parsed(jvm, argv: list[str]):  # type: ignore[no-untyped-def]
    """spark-submit's arguments as SparkSubmit parses and validates them (its SparkSubmitArguments)."""
    words = jvm.java.util.ArrayList()
    for word in argv:
        words.add(word)
    submit_arguments = jvm.org.apache.spark.deploy.SparkSubmitArguments
    environment = getattr(submit_arguments, "$lessinit$greater$default$2")()  # the JVM's own environment
    return submit_arguments(jvm.scala.jdk.javaapi.CollectionConverters.asScala(words).toSeq(), environment)


def local(uri: str) -> str:
    """A file: URI's path (file:/a, file:///a -> /a)."""
    return "/" + uri.removeprefix("file:").lstrip("/")


def prepared(jvm, argv: list[str]) -> tuple[str, list[str], dict[str, str]]:
    """What SparkSubmit makes of spark-submit's arguments whose files are here: the class it would start, that class's
    arguments and the application's Spark properties."""
    child = jvm.org.apache.spark.deploy.SparkSubmit().prepareSubmitEnvironment(
        parsed(jvm, argv), jvm.scala.Option.empty()
    )
    args = list(jvm.scala.jdk.javaapi.CollectionConverters.asJava(child._1()))
    conf = {str(pair._1()): str(pair._2()) for pair in child._3().getAll()}
    return str(child._4()), args, conf


def make_dry_run(target: str, **variables: str) -> list[str]:
    """The commands `make TARGET VAR=...` would run, one a line as the shell reads them (continued lines joined)."""
    printed = subprocess.run(
        ["make", "-s", "-n", "-C", str(ROOT), target, *[f"{k}={v}" for k, v in variables.items()]],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return [" ".join(line.split()) for line in printed.replace("\\\n", " ").splitlines()]


def make_submit(target: str, **variables: str) -> list[str]:
    """The spark-submit command `make TARGET VAR=...` runs, without running it."""
    lines = [line for line in make_dry_run(target, **variables) if "/spark-submit " in line]
    assert len(lines) == 1, lines
    return shlex.split(lines[0])


def test_yarn_cluster_mode_runs_the_driver_on_the_packed_environment(jvm):
    command = make_submit("embed", MASTER="yarn", CONF="conf/yarn.conf", DEPLOY_MODE="cluster", ARGS=ARGS)
    main_class, args, conf = prepared(jvm, command[1:])
    assert main_class == "org.apache.spark.deploy.yarn.YarnClusterApplication"
    assert args[args.index("--primary-py-file") + 1] == f"file:{ROOT}/dist/main.py"
    assert [a for i, a in enumerate(args) if i and args[i - 1] == "--arg"] == JOB.split()
    assert conf["spark.submit.deployMode"] == "cluster"
    # the driver is the application master: it runs the full archive's python (torch), which YARN unpacks there too
    assert conf["spark.pyspark.python"] == "./environment/bin/python" and "spark.pyspark.driver.python" not in conf
    assert local(conf["spark.archives"]) == f"{ROOT}/dist/env-full.tar.gz#environment"
    assert f"{ROOT}/dist/jobs.zip" in conf["spark.submit.pyFiles"]
    assert {f"{ROOT}/jars/hadoop-aws-3.3.1.jar", f"{ROOT}/jars/aws-java-sdk-bundle-1.11.901.jar"} <= {
        local(jar) for jar in conf["spark.jars"].split(",")
    }
    assert "-XX:SharedArchiveFile" not in " ".join(command)  # this machine's class archive is not on the cluster's
    assert conf["spark.hadoop.fs.s3a.threads.keepalivetime"] == "60"


def test_yarn_client_mode_runs_the_driver_here_on_this_venv(jvm):
    command = make_submit("index", MASTER="yarn", CONF="conf/yarn.conf", ARGS="--embeddings e --output i")
    main_class, args, conf = prepared(jvm, command[1:])
    assert main_class == "org.apache.spark.deploy.PythonRunner" and args[-4:] == ["--embeddings", "e", "--output", "i"]
    assert conf["spark.submit.deployMode"] == "client" and conf["spark.master"] == "yarn"
    assert conf["spark.pyspark.driver.python"] == PY and conf["spark.pyspark.python"] == "./environment/bin/python"
    assert conf["spark.archives"].endswith("/dist/env.tar.gz#environment")


def test_standalone_command_is_client_mode_on_this_venv(jvm):
    command = make_submit("search", MASTER="spark://master-host:7077", CONF="conf/standalone.conf", ARGS="--all")
    main_class, _, conf = prepared(jvm, command[1:])
    assert main_class == "org.apache.spark.deploy.PythonRunner" and conf["spark.master"] == "spark://master-host:7077"
    assert conf["spark.pyspark.driver.python"] == PY and conf["spark.executor.cores"] == "1"


def test_emr_step_is_a_cluster_mode_application_with_the_environment(jvm):
    step = emr_submit.spark_submit_args(
        "s3://my-bucket/vs", JOB.split(), emr_submit.read_properties(ROOT / "conf" / "emr.conf"), True
    )
    assert step[0] == "spark-submit"
    # EMR's spark-defaults.conf says spark.master yarn; the files are on S3, which only EMR's own filesystem globs
    args = parsed(jvm, ["--master", "yarn", *step[1:]])
    assert (args.master(), args.deployMode(), args.primaryResource()) == (
        "yarn",
        "cluster",
        "s3://my-bucket/vs/main.py",
    )
    assert (
        args.archives() == "s3://my-bucket/vs/env-full.tar.gz#environment"
        and args.pyFiles() == "s3://my-bucket/vs/jobs.zip"
    )
    assert list(jvm.scala.jdk.javaapi.CollectionConverters.asJava(args.childArgs())) == JOB.split()
    assert args.sparkProperties().get("spark.pyspark.python").get() == "./environment/bin/python"


def test_dataproc_properties_are_a_cluster_mode_application(jvm):
    """The properties dataproc_submit passes, as spark-submit options, make the application Dataproc starts."""
    command = dataproc_submit.command("c", "r", "gs://b/vs", JOB.split(), True, ROOT / "conf" / "dataproc.conf")
    flag = next(a for a in command if a.startswith("--properties="))
    options = [w for pair in flag.removeprefix("--properties=").split(",") for w in ("--conf", pair)]
    archive = next(a for a in command if a.startswith("--archives=")).removeprefix("--archives=")
    argv = [
        "--master",
        "yarn",
        *options,
        "--archives",
        archive,
        "--py-files",
        "gs://b/vs/jobs.zip",
        "gs://b/vs/main.py",
    ]
    args = parsed(jvm, argv)
    assert (args.deployMode(), args.archives()) == ("cluster", "gs://b/vs/env-full.tar.gz#environment")
    properties = args.sparkProperties()
    assert properties.get("spark.pyspark.python").get() == properties.get("spark.pyspark.driver.python").get()
    assert properties.get("spark.pyspark.python").get() == "./environment/bin/python"


def test_dataproc_submit_uploads_the_three_files_then_submits_in_gclouds_documented_form(tmp_path, monkeypatch):
    """With RUN=1: `gcloud storage cp FILE... gs://PREFIX/`, then `gcloud dataproc jobs submit pyspark PY_FILE
    --cluster=C --region=R --py-files=... --properties=... --archives=... -- JOB_ARGS`, in that order. gcloud is a
    recording stand-in (no cloud here) that checks each call against those forms."""
    dist = tmp_path / "dist"
    dist.mkdir()
    for name in ("jobs.zip", "main.py", "env-full.tar.gz"):
        (dist / name).write_text(name)
    calls = tmp_path / "calls"
    gcloud = tmp_path / "bin" / "gcloud"
    gcloud.parent.mkdir()
    gcloud.write_text(f'#!/bin/sh\nprintf "%s\\0" "$@" >> {calls}\nprintf "\\n" >> {calls}\n')
    gcloud.chmod(gcloud.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{gcloud.parent}{os.pathsep}{os.environ['PATH']}")
    result = subprocess.run(
        [sys.executable, "-m", "scripts.dataproc_submit", "--cluster", "c", "--region", "europe-west1"]
        + ["--gs-prefix", "gs://b/vs/", "--dist", str(dist), "--run", "--", *JOB.split()],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    upload, submit = [line.strip("\0").split("\0") for line in calls.read_text().splitlines()]
    assert upload == [
        "storage",
        "cp",
        *[str(dist / n) for n in ("jobs.zip", "main.py", "env-full.tar.gz")],
        "gs://b/vs/",
    ]
    assert submit[:5] == ["dataproc", "jobs", "submit", "pyspark", "gs://b/vs/main.py"]
    flags = submit[5 : submit.index("--")]
    assert all(f.startswith("--") and "=" in f for f in flags)
    assert {f.split("=", 1)[0] for f in flags} == {"--cluster", "--region", "--py-files", "--properties", "--archives"}
    assert "--archives=gs://b/vs/env-full.tar.gz#environment" in flags
    assert submit[submit.index("--") + 1 :] == JOB.split()


def test_dataproc_submit_without_the_files_says_what_to_build_and_uploads_nothing(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "scripts.dataproc_submit", "--cluster", "c", "--region", "r", "--gs-prefix", "gs://b/x"]
        + ["--dist", str(tmp_path), "--upload", "--", "embed"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "missing: run make build" in result.stderr and "gcloud storage cp" not in result.stdout


def test_make_dataproc_submit_passes_run_and_the_jobs_arguments_apart():
    where = {"CLUSTER": "c", "REGION": "r", "GS_PREFIX": "gs://b/vs"}
    plain = next(line for line in make_dry_run("dataproc-submit", **where, ARGS="embed --x y") if "dataproc_s" in line)
    run = next(line for line in make_dry_run("dataproc-submit", **where, ARGS="embed", RUN="1") if "dataproc_s" in line)
    assert plain.endswith("--upload -- embed --x y") and run.endswith("--run -- embed")


def test_weights_are_fetched_once_and_their_place_and_sha256_printed(tmp_path, mobilenet_weights):
    """make weights: the first run downloads into torchvision's cache, the second reads it; both print the file and
    its sha256 (a server on 127.0.0.1 stands in for torchvision's)."""
    served = tmp_path / "served"
    served.mkdir()
    (served / "mobilenet_v2-b0353104.pth").write_bytes(Path(mobilenet_weights).read_bytes())
    env = {**os.environ, "TORCH_HOME": str(tmp_path / "torch")}
    with serve_files(served) as (base, requests):
        command = [
            "make",
            "-s",
            "-C",
            str(ROOT),
            "weights",
            "MODEL=mobilenet_v2",
            f"WEIGHTS={base}/mobilenet_v2-b0353104.pth",
        ]
        runs = [subprocess.run(command, capture_output=True, text=True, env=env) for _ in range(2)]
    cached = tmp_path / "torch" / "hub" / "checkpoints" / "mobilenet_v2-b0353104.pth"
    digest = hashlib.sha256(Path(mobilenet_weights).read_bytes()).hexdigest()
    for run in runs:
        assert run.returncode == 0, run.stderr
        assert f"mobilenet_v2 weights: {cached}" in run.stdout and f"sha256: {digest}" in run.stdout
    assert len(requests) == 1 and cached.read_bytes() == Path(mobilenet_weights).read_bytes()
