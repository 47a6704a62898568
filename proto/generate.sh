#!/usr/bin/env bash
# Regenerates the Python modules for the v1 API (needs grpcio-tools: pip install -e '.[dev]').
# The generated files are committed; tests/test_proto.py checks they are current.
set -euo pipefail
cd "$(dirname "$0")"
python -m grpc_tools.protoc -I . --python_out=. --pyi_out=. --grpc_python_out=. lifelong_memory/v1/memory.proto
