"""S3 through s3a:// on an S3-compatible server (moto) on 127.0.0.1 (the whole pipeline on S3 runs in
test_cluster.py): when the endpoint fails mid-run the job retries, exits 3 with one line, and loses nothing; a
missing or mismatched connector and missing credentials are one line each."""

from __future__ import annotations

import io
import json
import socket
from collections.abc import Callable

import boto3
import pandas as pd
import pytest
from conftest import ROOT, run_job
from faulty_endpoint import FaultyEndpoint
from helpers import build_dist, spark_submit

pytestmark = pytest.mark.slow
JARS = [ROOT / "jars" / "hadoop-aws-3.3.1.jar", ROOT / "jars" / "aws-java-sdk-bundle-1.11.901.jar"]
KEYS = {
    "AWS_ACCESS_KEY_ID": "test-key-id",
    "AWS_SECRET_ACCESS_KEY": "test-secret-value",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def s3a_conf(endpoint: str) -> dict[str, str]:
    missing = [str(j) for j in JARS if not j.exists()]
    assert not missing, f"run `make s3a-jars` first: missing {missing}"
    return {
        "spark.jars": ",".join(str(j) for j in JARS),
        "spark.hadoop.fs.s3a.endpoint": endpoint,
        "spark.hadoop.fs.s3a.path.style.access": "true",
        "spark.hadoop.fs.s3a.connection.ssl.enabled": "false",
        "spark.hadoop.fs.s3a.aws.credentials.provider": "com.amazonaws.auth.EnvironmentVariableCredentialsProvider",
        # hadoop-aws 3.3 on Hadoop 3.5's defaults: these must be plain numbers
        "spark.hadoop.fs.s3a.threads.keepalivetime": "60",
        "spark.hadoop.fs.s3a.connection.establish.timeout": "5000",
        "spark.hadoop.fs.s3a.connection.timeout": "10000",
        "spark.hadoop.fs.s3a.multipart.purge.age": "86400",
        "spark.hadoop.fs.s3a.attempts.maximum": "3",
        "spark.hadoop.fs.s3a.retry.limit": "2",
    }


def read_remote(s3, prefix: str, bucket: str = "vehicles") -> pd.DataFrame:
    listing = s3.list_objects_v2(Bucket=bucket, Prefix=prefix)["Contents"]
    parts = [o["Key"] for o in listing if o["Key"].removeprefix(prefix).startswith("part-")]  # not _temporary/'s
    return pd.concat(
        [pd.read_parquet(io.BytesIO(s3.get_object(Bucket=bucket, Key=k)["Body"].read())) for k in parts],
        ignore_index=True,
    )


def nth_task_output(n: int, bucket: str) -> Callable[[str, str], bool]:
    """A trigger that fires on the n-th upload of a Spark task's output file into the staging table."""
    seen = []

    def trigger(method: str, path: str) -> bool:
        if (
            method == "PUT"
            and path.startswith(f"/{bucket}/out/.emb.staging/_temporary/0/_temporary/attempt_")
            and "/part-" in path
        ):
            seen.append(path)
        return len(seen) == n

    return trigger


@pytest.mark.parametrize("fault", ["refused", "503"])
def test_storage_failing_mid_run_fails_cleanly_keeps_committed_chunks_and_resumes(
    moto, tmp_path, demo_dir, mobilenet_weights, monkeypatch, fault
):
    """After chunk 1 of 3 is committed the endpoint goes down (connections refused) or answers 503 to
    everything: s3a retries with backoff, embed exits 3 with one line, nothing appears under the output
    name, chunk 1 stays in the hidden staging table, and a run against the healthy endpoint finishes the
    rest without redoing chunk 1."""
    for key, value in KEYS.items():
        monkeypatch.setenv(key, value)
    bucket = f"faults-{fault}"
    s3 = boto3.client("s3", endpoint_url=moto)
    s3.create_bucket(Bucket=bucket)
    for label in ("motorcycle", "cat"):
        for path in sorted((demo_dir / "catalog" / label).glob("*.jpg")):
            s3.upload_file(str(path), bucket, f"photos/{label}/{path.name}")
    dist = build_dist(tmp_path / "dist")
    args = [
        "embed",
        "--input",
        f"s3a://{bucket}/photos",
        "--output",
        f"s3a://{bucket}/out/emb",
        "--model",
        "mobilenet_v2",
        "--weights",
        mobilenet_weights,
        "--chunk-files",
        "4",
    ]
    # chunk 1 is two tasks of two images: the third task output is chunk 2's first
    with FaultyEndpoint(moto, nth_task_output(3, bucket), fault) as endpoint:
        # Hadoop's default retries wait minutes (throttling) or seconds (each failed request); shorter waits keep
        # the test short, and still show backoff
        conf = {
            **s3a_conf(endpoint.url),
            "spark.hadoop.fs.s3a.retry.throttle.limit": "2",
            "spark.hadoop.fs.s3a.retry.throttle.interval": "100ms",
            "spark.hadoop.fs.s3a.retry.interval": "100ms",
        }
        failed = spark_submit(dist, args, conf=conf, env=KEYS)
    output = failed.stdout + failed.stderr
    assert endpoint.broke_at is not None, output[-3000:]
    assert failed.returncode == 3, output[-5000:]
    errors = [line for line in output.splitlines() if line.startswith("main.py embed: error:")]
    assert len(errors) == 1 and "Traceback (most recent call last)" not in output, output[-5000:]
    # which request gives up first (a task's upload, the driver's cleanup) is up to the scheduler
    assert "storage failed after retries" in errors[0] and "out/.emb.staging" in errors[0], errors[0]
    assert any(
        cause in errors[0] for cause in (["Connection refused"] if fault == "refused" else ["503", "SlowDown"])
    ), errors[0]
    assert "4/12 files of this run are committed" in output and KEYS["AWS_SECRET_ACCESS_KEY"] not in output

    if fault == "503":  # every failed request was retried, with waits between tries rather than at once
        retried = [s for s in endpoint.after_break() if s.status == 503]
        by_request: dict[tuple[str, str], list[float]] = {}
        for s in retried:
            by_request.setdefault((s.method, s.path), []).append(s.at)
        tries = max(by_request.values(), key=len)
        assert len(tries) >= 3 and tries[-1] - tries[0] >= 0.3, by_request

    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="out/").get("Contents", [])]
    assert not [k for k in keys if k.startswith("out/emb/")], keys
    kept = [k for k in keys if k.startswith("out/.emb.staging/part-")]
    assert len(read_remote(s3, "out/.emb.staging/", bucket)) == 4 and kept, keys

    if fault == "refused":
        resumed = spark_submit(dist, args, conf=s3a_conf(moto), env=KEYS)
        assert resumed.returncode == 0, resumed.stdout[-5000:]
        summary = json.loads(s3.get_object(Bucket=bucket, Key="out/emb/_summary.json")["Body"].read())
        assert summary["counts"]["embedded"] == 8 and summary["counts"]["skipped"] == 4
        table = read_remote(s3, "out/emb/", bucket)
        assert len(table) == 12 and table["path"].is_unique and table["error"].isna().all()
        assert not [o for o in s3.list_objects_v2(Bucket=bucket, Prefix="out/.emb.staging").get("Contents", [])]


def test_weights_endpoint_down_is_a_storage_failure(spark, tmp_path, demo_dir, monkeypatch, capsys):
    with socket.socket() as s:  # a port nothing listens on: connections are refused
        s.bind(("127.0.0.1", 0))
        down = f"http://127.0.0.1:{s.getsockname()[1]}"
    for key, value in {**KEYS, "AWS_ENDPOINT_URL": down, "AWS_MAX_ATTEMPTS": "2"}.items():
        monkeypatch.setenv(key, value)
    code = run_job(
        spark,
        "embed",
        "--input",
        demo_dir / "catalog" / "cat",
        "--output",
        tmp_path / "emb",
        "--model",
        "mobilenet_v2",
        "--weights",
        "s3://vehicles/models/mobilenet_v2-b0353104.pth",
    )
    err = capsys.readouterr().err
    assert (
        code == 3 and "cannot get mobilenet_v2 weights from s3://vehicles/models/" in err and "after retries" in err
    ), err
    assert "Traceback" not in err and not (tmp_path / "emb").exists()


def test_s3a_without_the_connector_is_one_line_that_says_how_to_add_it(spark, tmp_path, capsys):
    """This session has no hadoop-aws on its class path, as a cluster without --jars or --packages."""
    code = run_job(spark, "index", "--embeddings", "s3a://vehicles/out/emb", "--output", "s3a://vehicles/out/index")
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    assert "main.py index: error: no s3a connector: run `make s3a-jars`" in err.strip().splitlines()[-1]


@pytest.mark.parametrize("mistake", ["connector", "credentials"])
def test_s3a_setup_mistakes_are_one_line_each(moto, tmp_path, demo_dir, mobilenet_weights, mistake):
    """The offline connector without the conf file's fs.s3a lines (Hadoop 3.5's defaults it cannot read), and the
    conf file's settings with no keys anywhere: each fails with its own one line, exit 2."""
    from scripts.emr_submit import read_properties

    conf = {k: v for k, v in read_properties(ROOT / "conf" / "standalone.conf").items() if "fs.s3a" in k}
    conf |= {
        "spark.jars": ",".join(str(j) for j in JARS),
        "spark.hadoop.fs.s3a.endpoint": moto,
        "spark.hadoop.fs.s3a.path.style.access": "true",
    }
    if mistake == "connector":
        conf = {k: v for k, v in conf.items() if "timeout" not in k and "keepalive" not in k and "purge" not in k}
        conf.pop("spark.hadoop.fs.s3a.aws.credentials.provider")
        env = KEYS
    else:  # keys only from the settings or the environment: no instance profile outside 127.0.0.1 to ask
        conf["spark.hadoop.fs.s3a.aws.credentials.provider"] = "org.apache.hadoop.fs.s3a.SimpleAWSCredentialsProvider"
        env = {"AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": ""}
    args = ["index", "--embeddings", "s3a://vehicles/out/emb", "--output", "s3a://vehicles/out/index"]
    result = spark_submit(build_dist(tmp_path / "dist"), args, conf=conf, env=env)
    output = result.stdout + result.stderr
    errors = [line for line in output.splitlines() if line.startswith("main.py index: error:")]
    assert result.returncode == 2 and len(errors) == 1 and "Traceback" not in output, output[-3000:]
    expected = "does not match this Spark's Hadoop" if mistake == "connector" else "no S3 credentials: export"
    assert expected in errors[0], errors[0]
