#!/usr/bin/env bash
# EMR bootstrap action (EMR 7.1+): install the jobs' dependencies into every node's Python 3.11, for clusters
# that run `scripts/emr_submit.py --no-env`. The packed environment (make pack-env-full, shipped by default) is the
# supported way; this is the alternative. EMR 7's python3 is 3.9 and the project needs >= 3.10: python3.11
# ships beside it from EMR 7.1 (installed here from the Amazon Linux 2023 repository where it is missing).
# Use: --bootstrap-actions Path=s3://bucket/emr_bootstrap.sh
set -euo pipefail
PY=/usr/bin/python3.11
if ! "$PY" -m pip --version >/dev/null 2>&1; then
  sudo dnf install -y -q python3.11 python3.11-pip
fi
# the same packages as the full packed environment (Makefile, pack-env-full): the driver runs here in cluster mode too
sudo "$PY" -m pip install --quiet --index-url https://download.pytorch.org/whl/cpu torch==2.13.0
sudo "$PY" -m pip install --quiet 'pillow>=10.1' 'pyarrow>=14' 'numpy>=1.24' 'pandas>=2.0,<3' 'onnxruntime>=1.20' 'openvino>=2025.0' 'boto3>=1.28' 'matplotlib>=3.7' scipy 'onnx>=1.17'
