"""Submit a job to a running EMR cluster: upload the artefacts to S3, add a spark-submit step.

  python scripts/emr_submit.py --cluster-id j-XXXX --s3-prefix s3://bucket/vehicle-search \
    [--env dist/env-full.tar.gz | --no-env] \
      -- embed --input s3://bucket/photos --output s3://bucket/out/embeddings

The step runs `spark-submit --deploy-mode cluster` through command-runner.jar with conf/emr.conf's
properties, jobs.zip as --py-files and the packed environment (make pack-env-full; the supported way) as
--archives ...#environment, which runs the driver and the executors. --no-env uses the nodes' own
/usr/bin/python3.11 instead (EMR 7.1+; scripts/emr_bootstrap.sh installs the dependencies into it).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from urllib.parse import urlparse

ROOT = Path(__file__).resolve().parents[1]
# EMR 7's python3 is 3.9; the project needs >= 3.10, and EMR 7.1+ nodes carry 3.11 beside it
NODE_PYTHON = "/usr/bin/python3.11"


def read_properties(path: Path) -> dict[str, str]:
    """A Spark properties file as a dict (comments and blank lines skipped)."""
    props = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition(" ")
            props[key] = value.strip()
    return props


def spark_submit_args(prefix: str, job_args: list[str], props: dict[str, str], env_archive: bool) -> list[str]:
    """The step's spark-submit command: with the packed environment, or with the nodes' python3.11."""
    args = ["spark-submit", "--deploy-mode", "cluster", "--py-files", f"{prefix}/jobs.zip"]
    if env_archive:
        args += ["--archives", f"{prefix}/env-full.tar.gz#environment"]
    else:
        props = {k: v for k, v in props.items() if not k.startswith("spark.pyspark.")} | {
            "spark.pyspark.python": NODE_PYTHON
        }
    for key, value in props.items():
        args += ["--conf", f"{key}={value}"]
    return [*args, f"{prefix}/main.py", *job_args]


def upload(s3, prefix: str, files: dict[str, Path]) -> None:  # type: ignore[no-untyped-def]
    parsed = urlparse(prefix)
    for name, path in files.items():
        s3.upload_file(str(path), parsed.netloc, f"{parsed.path.strip('/')}/{name}".lstrip("/"))


def main(argv: list[str] | None = None) -> str:
    import boto3

    argv = sys.argv[1:] if argv is None else argv
    ours, job_args = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cluster-id", required=True)
    parser.add_argument("--s3-prefix", required=True, help="s3://bucket/prefix for the three files")
    parser.add_argument(
        "--env",
        type=Path,
        default=ROOT / "dist" / "env-full.tar.gz",
        help="packed environment (make pack-env-full) shipped with --archives",
    )
    parser.add_argument(
        "--no-env",
        action="store_true",
        help=f"use the nodes' {NODE_PYTHON} (set up by scripts/emr_bootstrap.sh) instead",
    )
    parser.add_argument("--dist", type=Path, default=ROOT / "dist")
    parser.add_argument("--conf", type=Path, default=ROOT / "conf" / "emr.conf")
    parser.add_argument("--region", default=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"))
    parser.add_argument(
        "--endpoint-url", default=os.environ.get("AWS_ENDPOINT_URL"), help="for S3/EMR-compatible test servers"
    )
    parser.add_argument("--name", help="step name (default: the job name)")
    args = parser.parse_args(ours)
    if not job_args:
        parser.error("give the job and its arguments after --, e.g. -- embed --input s3://... --output s3://...")
    prefix = args.s3_prefix.rstrip("/")
    if urlparse(prefix).scheme != "s3":
        parser.error("--s3-prefix must be an s3:// URI")
    files = {"jobs.zip": args.dist / "jobs.zip", "main.py": args.dist / "main.py"}
    if not args.no_env:
        files["env-full.tar.gz"] = args.env
    for name, path in files.items():  # before any upload: one line, nothing half-shipped
        if not path.exists():
            how = (
                "make pack-env-full, or pass --no-env for nodes set up by scripts/emr_bootstrap.sh"
                if name == "env-full.tar.gz"
                else "make build"
            )
            raise SystemExit(f"emr_submit: {path} does not exist: run {how}")
    session = boto3.session.Session(region_name=args.region)
    upload(session.client("s3", endpoint_url=args.endpoint_url), prefix, files)
    step = {
        "Name": args.name or f"vehicle-search {job_args[0]}",
        "ActionOnFailure": "CONTINUE",
        "HadoopJarStep": {
            "Jar": "command-runner.jar",
            "Args": spark_submit_args(prefix, job_args, read_properties(args.conf), not args.no_env),
        },
    }
    response = session.client("emr", endpoint_url=args.endpoint_url).add_job_flow_steps(
        JobFlowId=args.cluster_id, Steps=[step]
    )
    step_id = response["StepIds"][0]
    print(f"added step {step_id} to {args.cluster_id}: {' '.join(step['HadoopJarStep']['Args'])}")
    return step_id


if __name__ == "__main__":
    main()
