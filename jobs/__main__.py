"""Entry point shipped as dist/main.py: `spark-submit --py-files dist/jobs.zip dist/main.py JOB [args]`."""

import sys

from jobs.cli import main

if __name__ == "__main__":
    sys.exit(main())
