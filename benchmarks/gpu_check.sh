#!/usr/bin/env bash
# The GPU check (benchmarks/gpu_check.py), for a machine with an NVIDIA GPU and a Python whose torch is a
# CUDA build; the environment as benchmarks/gpu_env.sh sets it (see there for WHEELS=DIR).
#
#   benchmarks/gpu_check.sh [gpu_check.py options]      # PYTHON=... picks the Python (default: python3)
#   WHEELS=DIR benchmarks/gpu_check.sh ...              # first install DIR/*.whl into a temporary folder
#
# Without a faiss that searches on this GPU the check still runs, and its report says why the faiss rows are
# missing. Exits as gpu_check.py does: 0 passed, 1 a check failed, 2 no CUDA. The report goes to
# benchmarks/results/gpu-check-HOST.json (--out to change), the GPU table to stdout.
set -euo pipefail
cd "$(dirname "$0")/.."
source benchmarks/gpu_env.sh
"$python" benchmarks/gpu_check.py "$@"
