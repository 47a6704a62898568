#!/usr/bin/env bash
# The GPU check (benchmarks/gpu_check.py), for a machine with an NVIDIA GPU and a Python whose torch is a
# CUDA build. Builds nothing and downloads nothing: when the project is not installed in that Python,
# it is imported from this checkout through a folder of links (lifelong_memory/server -> server/, ...),
# which is all the check needs besides torch and numpy.
#
#   benchmarks/gpu_check.sh [gpu_check.py options]      # PYTHON=... picks the Python (default: python3)
#
# Exits as gpu_check.py does: 0 passed, 1 a check failed, 2 no CUDA. The report goes to
# benchmarks/results/gpu-check-HOST.json.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
if ! "$python" -c 'import lifelong_memory.server.memory' 2>/dev/null; then
    links=$(mktemp -d)
    trap 'rm -rf "$links"' EXIT
    mkdir "$links/lifelong_memory"
    ln -s "$PWD/server" "$links/lifelong_memory/server"
    ln -s "$PWD/client" "$links/lifelong_memory/client"
    ln -s "$PWD/proto/lifelong_memory/v1" "$links/lifelong_memory/v1"
    export PYTHONPATH=$links${PYTHONPATH:+:$PYTHONPATH}
fi
"$python" -c 'import torch; print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.device_count()} GPU(s)")'
exec "$python" benchmarks/gpu_check.py "$@"
