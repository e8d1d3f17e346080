"""EMR submission against moto's EMR and S3 on 127.0.0.1: artefacts uploaded, step holds the right spark-submit;
the Dataproc command ships the environment and runs the driver in it; both node-Python paths are Python 3.11."""

from __future__ import annotations

import re
import shlex

import boto3
import pytest
from conftest import ROOT
from helpers import build_dist

from scripts import dataproc_submit, emr_submit


@pytest.fixture
def aws_env(monkeypatch, moto):
    for key, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(key, value)
    return moto


@pytest.fixture
def emr_cluster(aws_env) -> tuple[str, str]:
    """moto's S3 bucket `artefacts` and a running EMR 7.1 cluster: (endpoint, cluster id)."""
    boto3.client("s3", endpoint_url=aws_env).create_bucket(Bucket="artefacts")
    emr = boto3.client("emr", endpoint_url=aws_env)
    cluster = emr.run_job_flow(
        Name="test",
        ReleaseLabel="emr-7.1.0",
        Instances={"MasterInstanceType": "m5.xlarge", "InstanceCount": 1, "KeepJobFlowAliveWhenNoSteps": True},
        JobFlowRole="EMR_EC2_DefaultRole",
        ServiceRole="EMR_DefaultRole",
    )["JobFlowId"]
    return aws_env, cluster


def test_emr_step_and_artefacts(emr_cluster, tmp_path, capsys):
    endpoint, cluster = emr_cluster
    dist = build_dist(tmp_path / "dist")[0].parent
    env_archive = tmp_path / "env-full.tar.gz"
    env_archive.write_bytes(b"packed environment stand-in")
    s3 = boto3.client("s3", endpoint_url=endpoint)
    emr = boto3.client("emr", endpoint_url=endpoint)
    step_id = emr_submit.main(
        [
            "--cluster-id",
            cluster,
            "--s3-prefix",
            "s3://artefacts/vs",
            "--env",
            str(env_archive),
            "--dist",
            str(dist),
            "--endpoint-url",
            endpoint,
            "--",
            "embed",
            "--input",
            "s3://data/photos",
            "--output",
            "s3://data/emb",
        ]
    )
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket="artefacts")["Contents"]}
    assert keys == {"vs/jobs.zip", "vs/main.py", "vs/env-full.tar.gz"}
    assert s3.get_object(Bucket="artefacts", Key="vs/jobs.zip")["Body"].read() == (dist / "jobs.zip").read_bytes()
    step = emr.describe_step(ClusterId=cluster, StepId=step_id)["Step"]
    assert step["Config"]["Jar"] == "command-runner.jar"
    args = step["Config"]["Args"]
    assert args[:5] == ["spark-submit", "--deploy-mode", "cluster", "--py-files", "s3://artefacts/vs/jobs.zip"]
    assert args[5:7] == ["--archives", "s3://artefacts/vs/env-full.tar.gz#environment"]
    assert "spark.pyspark.python=./environment/bin/python" in args
    assert args[args.index("s3://artefacts/vs/main.py") + 1 :] == [
        "embed",
        "--input",
        "s3://data/photos",
        "--output",
        "s3://data/emb",
    ]
    assert "testing" not in capsys.readouterr().out  # credentials are never printed


def test_emr_without_the_environment_uses_the_nodes_python311(emr_cluster, tmp_path):
    endpoint, cluster = emr_cluster
    dist = build_dist(tmp_path / "dist")[0].parent
    step_id = emr_submit.main(
        [
            "--cluster-id",
            cluster,
            "--s3-prefix",
            "s3://artefacts/nv",
            "--no-env",
            "--dist",
            str(dist),
            "--endpoint-url",
            endpoint,
            "--",
            "index",
            "--embeddings",
            "s3://data/emb",
            "--output",
            "s3://data/idx",
        ]
    )
    args = boto3.client("emr", endpoint_url=endpoint).describe_step(ClusterId=cluster, StepId=step_id)["Step"][
        "Config"
    ]["Args"]
    assert "--archives" not in args and "spark.pyspark.python=/usr/bin/python3.11" in args
    assert not any(a.startswith("spark.pyspark.python=./environment") for a in args)
    keys = {
        o["Key"]
        for o in boto3.client("s3", endpoint_url=endpoint).list_objects_v2(Bucket="artefacts", Prefix="nv/")["Contents"]
    }
    assert keys == {"nv/jobs.zip", "nv/main.py"}


def test_emr_with_a_missing_environment_says_how_to_build_it_and_uploads_nothing(emr_cluster, tmp_path):
    endpoint, cluster = emr_cluster
    dist = build_dist(tmp_path / "dist")[0].parent
    with pytest.raises(SystemExit) as exit_info:
        emr_submit.main(
            [
                "--cluster-id",
                cluster,
                "--s3-prefix",
                "s3://artefacts/missing",
                "--env",
                str(tmp_path / "env-full.tar.gz"),
                "--dist",
                str(dist),
                "--endpoint-url",
                endpoint,
                "--",
                "embed",
                "--input",
                "s3://data/photos",
                "--output",
                "s3://data/emb",
            ]
        )
    message = str(exit_info.value.code)
    assert (
        "\n" not in message
        and "env-full.tar.gz does not exist" in message
        and "make pack-env-full" in message
        and "--no-env" in message
    )
    assert "Contents" not in boto3.client("s3", endpoint_url=endpoint).list_objects_v2(
        Bucket="artefacts", Prefix="missing/"
    )


def test_dataproc_ships_the_environment_and_runs_the_driver_in_it():
    cmd = dataproc_submit.main(
        [
            "--cluster",
            "c1",
            "--region",
            "europe-west1",
            "--gs-prefix",
            "gs://b/vs",
            "--",
            "index",
            "--embeddings",
            "gs://b/emb",
            "--output",
            "gs://b/idx",
        ]
    )
    assert cmd[:6] == ["gcloud", "dataproc", "jobs", "submit", "pyspark", "gs://b/vs/main.py"]
    assert "--py-files=gs://b/vs/jobs.zip" in cmd and "--archives=gs://b/vs/env-full.tar.gz#environment" in cmd
    assert cmd[cmd.index("--") + 1 :] == ["index", "--embeddings", "gs://b/emb", "--output", "gs://b/idx"]
    props = dict(
        p.split("=", 1)
        for p in next(c for c in cmd if c.startswith("--properties=")).removeprefix("--properties=").split(",")
    )
    # Dataproc runs drivers in client mode on the master, where the archive is not unpacked: cluster mode instead
    assert props["spark.submit.deployMode"] == "cluster"
    assert props["spark.pyspark.python"] == props["spark.pyspark.driver.python"] == "./environment/bin/python"
    assert props["spark.executor.pyspark.memory"] == "9g"  # the whole conf file travels
    bare = dataproc_submit.main(
        ["--cluster", "c1", "--region", "r", "--gs-prefix", "gs://b/vs", "--no-env", "--", "index"]
    )
    assert (
        not any(c.startswith("--archives") for c in bare)
        and "spark.pyspark.driver.python=/opt/conda/default/bin/python" in bare[-3]
    )


def test_dataproc_properties_with_commas_use_gclouds_delimiter_escape():
    flag = dataproc_submit.properties_flag({"a": "1", "spark.hadoop.x": "p,q"})
    assert flag == "--properties=^|^a=1|spark.hadoop.x=p,q"


def test_bootstrap_installs_the_full_packed_environments_packages_into_python311():
    def packages(text: str) -> set[str]:
        return {
            re.split(r"[<>=]", p)[0]
            for line in text.splitlines()
            if "pip install" in line
            for p in shlex.split(line.split("install", 1)[1].replace("\\", ""))
            if not p.startswith(("-", "$", "https:"))
        }

    bootstrap = (ROOT / "scripts" / "emr_bootstrap.sh").read_text()
    makefile = (ROOT / "Makefile").read_text()
    packed = packages("pip install " + " ".join(re.findall(r"^(?:EXECUTOR|DRIVER)_PACKAGES = (.*)$", makefile, re.M)))
    assert "PY=/usr/bin/python3.11" in bootstrap and "python3 -m pip" not in bootstrap
    assert packages(bootstrap) == packed and {"torch", "boto3", "matplotlib"} <= packed
