#!/usr/bin/env bash
# EMR bootstrap action: install the executors' Python dependencies on every node, as the alternative to
# shipping a packed environment. Use: --bootstrap-actions Path=s3://bucket/emr_bootstrap.sh
set -euo pipefail
sudo python3 -m pip install --quiet --index-url https://download.pytorch.org/whl/cpu torch==2.13.0
sudo python3 -m pip install --quiet "pillow>=10.1" "pyarrow>=14" "numpy>=1.24" "pandas>=2.0,<3"
