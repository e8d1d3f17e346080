"""Fetch a model's pretrained weights once, where there is internet, for clusters whose nodes have none: prints where
the file is, its sha256 and how to hand it to the jobs (make weights MODEL=resnet18).

  python -m scripts.weights --model resnet18 [--weights URL|PATH]

Without --weights it downloads torchvision's checkpoint into torchvision's cache (once: a second run reads the cache).
The jobs check the same sha256 prefix when they load the file from wherever you copy it.
"""

from __future__ import annotations

import argparse
import os
import sys

from jobs.errors import StorageError, UsageError
from jobs.weights import TORCHVISION_URLS, build_model, fetch_bytes, verify_hash


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(TORCHVISION_URLS), default="resnet18")
    parser.add_argument("--weights", help="a URL or path to take them from instead (default: torchvision's URL)")
    args = parser.parse_args(argv)
    try:
        source, data = fetch_bytes(args.model, args.weights)
        digest = verify_hash(source, data)
        build_model(args.model, data)  # a file that does not load fails here, not on the cluster
    except (UsageError, StorageError) as e:
        print(f"weights: error: {e}", file=sys.stderr)
        return e.exit_code
    name = os.path.basename(source)
    print(f"{args.model} weights: {os.path.abspath(source) if '://' not in source else source}")
    print(f"sha256: {digest}")
    print(
        f"copy it where the cluster reads (aws s3 cp {name} s3://BUCKET/models/, gcloud storage cp {name} "
        f"gs://BUCKET/models/, hdfs dfs -put {name} /models/) and pass --weights s3a://BUCKET/models/{name} "
        "(or s3://, gs://, hdfs://)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
