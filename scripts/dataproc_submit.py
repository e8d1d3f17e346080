"""Ship the jobs to Dataproc and submit one: `gcloud storage cp` of the three files, then
`gcloud dataproc jobs submit pyspark` (both printed; --upload runs the first, --run both).

  python -m scripts.dataproc_submit --cluster C --region R --gs-prefix gs://bucket/vehicle-search [--no-env] \
      [--upload | --run] -- embed --input gs://bucket/photos --output gs://bucket/out/embeddings

The files are dist/jobs.zip, dist/main.py (make build) and dist/env-full.tar.gz (make -B pack-env
PYTHON_PREFIX=/opt/conda/default: Dataproc's Python 3.11 lives there). The job ships the packed environment and
runs in cluster mode (conf/dataproc.conf), so the driver and the executors both run ./environment/bin/python.
--no-env is for images whose own Python already has the dependencies: it drops the archive and points driver and
executors at Dataproc's /opt/conda/default/bin/python.
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from scripts.emr_submit import read_properties

ROOT = Path(__file__).resolve().parents[1]
NODE_PYTHON = "/opt/conda/default/bin/python"  # Dataproc 2.2's Python 3.11


def properties_flag(props: dict[str, str]) -> str:
    """--properties=k=v,...; gcloud's ^DELIM^ escape when a value holds a comma."""
    delimiter = "," if not any("," in v for v in props.values()) else "|"
    joined = delimiter.join(f"{k}={v}" for k, v in props.items())
    return f"--properties={joined}" if delimiter == "," else f"--properties=^{delimiter}^{joined}"


def command(cluster: str, region: str, prefix: str, job_args: list[str], env: bool, conf: Path) -> list[str]:
    """The gcloud command: the conf file's properties (and the packed environment unless env is False)."""
    props = read_properties(conf)
    if not env:
        props = {k: v for k, v in props.items() if not k.startswith("spark.pyspark.")}
        props |= {"spark.pyspark.python": NODE_PYTHON, "spark.pyspark.driver.python": NODE_PYTHON}
    cmd = [
        "gcloud",
        "dataproc",
        "jobs",
        "submit",
        "pyspark",
        f"{prefix}/main.py",
        f"--cluster={cluster}",
        f"--region={region}",
        f"--py-files={prefix}/jobs.zip",
        properties_flag(props),
    ]
    if env:
        cmd.append(f"--archives={prefix}/env-full.tar.gz#environment")
    return [*cmd, "--", *job_args]


def upload_command(prefix: str, files: list[Path]) -> list[str]:
    """gcloud storage cp of the files into the prefix (a folder: the trailing slash keeps their names)."""
    return ["gcloud", "storage", "cp", *[str(f) for f in files], f"{prefix}/"]


def main(argv: list[str] | None = None) -> list[str]:
    argv = sys.argv[1:] if argv is None else argv
    ours, job_args = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cluster", required=True)
    parser.add_argument("--region", required=True)
    parser.add_argument("--gs-prefix", required=True)
    parser.add_argument("--no-env", action="store_true", help=f"ship no environment: use the nodes' {NODE_PYTHON}")
    parser.add_argument("--conf", type=Path, default=ROOT / "conf" / "dataproc.conf")
    parser.add_argument("--dist", type=Path, default=ROOT / "dist", help="holds jobs.zip, main.py, env-full.tar.gz")
    parser.add_argument("--upload", action="store_true", help="upload the files (and print the job's command)")
    parser.add_argument("--run", action="store_true", help="upload the files and submit the job")
    args = parser.parse_args(ours)
    if not job_args:
        parser.error("give the job and its arguments after --")
    if not args.gs_prefix.startswith("gs://"):
        parser.error("--gs-prefix must be a gs:// URI")
    prefix = args.gs_prefix.rstrip("/")
    files = [args.dist / "jobs.zip", args.dist / "main.py"] + ([] if args.no_env else [args.dist / "env-full.tar.gz"])
    missing = [str(f) for f in files if not f.exists()]
    if missing and (args.upload or args.run):  # before any upload: one line, nothing half-shipped
        parser.exit(
            2,
            f"dataproc_submit: {', '.join(missing)} missing: run make build (and make -B pack-env-full "
            "PYTHON_PREFIX=/opt/conda/default), or pass --no-env\n",
        )
    upload = upload_command(prefix, files)
    cmd = command(args.cluster, args.region, prefix, job_args, not args.no_env, args.conf)
    for step, runs in ((upload, args.upload or args.run), (cmd, args.run)):
        print(("running: " if runs else "") + shlex.join(step), flush=True)
        if runs and shutil.which(step[0]) is None:
            parser.exit(2, f"dataproc_submit: {step[0]} not found: install the Google Cloud CLI\n")
        if runs and subprocess.run(step).returncode != 0:
            parser.exit(1, f"dataproc_submit: {step[0]} {step[1]} {step[2]} failed (see above)\n")
    return cmd


if __name__ == "__main__":
    main()
