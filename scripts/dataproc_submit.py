"""The `gcloud dataproc jobs submit pyspark` command for a job (printed; run it with --run).

  python scripts/dataproc_submit.py --cluster C --region R --gs-prefix gs://bucket/vehicle-search [--env] \
      -- embed --input gs://bucket/photos --output gs://bucket/out/embeddings

Upload dist/jobs.zip, dist/main.py (and dist/env.tar.gz with --env) to the prefix first:
`gsutil cp dist/jobs.zip dist/main.py dist/env.tar.gz gs://bucket/vehicle-search/`.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def command(cluster: str, region: str, prefix: str, job_args: list[str], env: bool, conf: Path) -> list[str]:
    cmd = ["gcloud", "dataproc", "jobs", "submit", "pyspark", f"{prefix}/main.py", f"--cluster={cluster}", f"--region={region}",
           f"--py-files={prefix}/jobs.zip", f"--properties-file={conf}"]
    if env:
        cmd.append(f"--archives={prefix}/env.tar.gz#environment")
    return [*cmd, "--", *job_args]


def main(argv: list[str] | None = None) -> list[str]:
    argv = sys.argv[1:] if argv is None else argv
    ours, job_args = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cluster", required=True)
    parser.add_argument("--region", required=True)
    parser.add_argument("--gs-prefix", required=True)
    parser.add_argument("--env", action="store_true", help="ship env.tar.gz from the prefix as the executors' python")
    parser.add_argument("--conf", type=Path, default=ROOT / "conf" / "dataproc.conf")
    parser.add_argument("--run", action="store_true", help="run the command instead of printing it")
    args = parser.parse_args(ours)
    if not job_args:
        parser.error("give the job and its arguments after --")
    cmd = command(args.cluster, args.region, args.gs_prefix.rstrip("/"), job_args, args.env, args.conf)
    print(shlex.join(cmd))
    if args.run:
        subprocess.run(cmd, check=True)
    return cmd


if __name__ == "__main__":
    main()
