"""EMR submission against moto's EMR and S3 on 127.0.0.1: artefacts uploaded, step holds the right spark-submit."""

from __future__ import annotations

import boto3
import pytest
from helpers import build_dist

from scripts import dataproc_submit, emr_submit


@pytest.fixture
def aws_env(monkeypatch, moto):
    for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(key, value)
    return moto


def test_emr_step_and_artefacts(aws_env, tmp_path, capsys):
    endpoint = aws_env
    dist = build_dist(tmp_path / "dist")[0].parent
    env_archive = tmp_path / "env.tar.gz"
    env_archive.write_bytes(b"packed environment stand-in")
    s3 = boto3.client("s3", endpoint_url=endpoint)
    s3.create_bucket(Bucket="artefacts")
    emr = boto3.client("emr", endpoint_url=endpoint)
    cluster = emr.run_job_flow(Name="test", ReleaseLabel="emr-7.1.0", Instances={"MasterInstanceType": "m5.xlarge", "InstanceCount": 1, "KeepJobFlowAliveWhenNoSteps": True},
                               JobFlowRole="EMR_EC2_DefaultRole", ServiceRole="EMR_DefaultRole")["JobFlowId"]
    step_id = emr_submit.main(["--cluster-id", cluster, "--s3-prefix", "s3://artefacts/vs", "--env", str(env_archive), "--dist", str(dist),
                               "--endpoint-url", endpoint, "--", "embed", "--input", "s3://data/photos", "--output", "s3://data/emb"])
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket="artefacts")["Contents"]}
    assert keys == {"vs/jobs.zip", "vs/main.py", "vs/env.tar.gz"}
    assert s3.get_object(Bucket="artefacts", Key="vs/jobs.zip")["Body"].read() == (dist / "jobs.zip").read_bytes()
    step = emr.describe_step(ClusterId=cluster, StepId=step_id)["Step"]
    assert step["Config"]["Jar"] == "command-runner.jar"
    args = step["Config"]["Args"]
    assert args[:5] == ["spark-submit", "--deploy-mode", "cluster", "--py-files", "s3://artefacts/vs/jobs.zip"]
    assert args[5:7] == ["--archives", "s3://artefacts/vs/env.tar.gz#environment"]
    assert "spark.pyspark.python=./environment/bin/python" in args
    assert args[args.index("s3://artefacts/vs/main.py") + 1 :] == ["embed", "--input", "s3://data/photos", "--output", "s3://data/emb"]
    assert "testing" not in capsys.readouterr().out  # credentials are never printed


def test_dataproc_command():
    cmd = dataproc_submit.main(["--cluster", "c1", "--region", "europe-west1", "--gs-prefix", "gs://b/vs", "--env", "--", "index", "--embeddings", "gs://b/emb", "--output", "gs://b/idx"])
    assert cmd[:6] == ["gcloud", "dataproc", "jobs", "submit", "pyspark", "gs://b/vs/main.py"]
    assert "--py-files=gs://b/vs/jobs.zip" in cmd and "--archives=gs://b/vs/env.tar.gz#environment" in cmd
    assert cmd[cmd.index("--") + 1 :] == ["index", "--embeddings", "gs://b/emb", "--output", "gs://b/idx"]
