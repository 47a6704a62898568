"""The committed generated modules match proto/ (run proto/generate.sh after editing the .proto)."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest

PROTO_ROOT = pathlib.Path(__file__).resolve().parents[1] / "proto"
GENERATED = ("memory_pb2.py", "memory_pb2.pyi", "memory_pb2_grpc.py")


def test_generated_code_is_current(tmp_path):
    pytest.importorskip("grpc_tools")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            "-I",
            str(PROTO_ROOT),
            f"--python_out={tmp_path}",
            f"--pyi_out={tmp_path}",
            f"--grpc_python_out={tmp_path}",
            "lifelong_memory/v1/memory.proto",
        ],
        check=True,
    )
    for name in GENERATED:
        fresh = (tmp_path / "lifelong_memory" / "v1" / name).read_text()
        committed = (PROTO_ROOT / "lifelong_memory" / "v1" / name).read_text()
        assert fresh == committed, f"{name} is stale: run proto/generate.sh"


def test_package_is_versioned():
    from lifelong_memory.v1 import memory_pb2

    assert memory_pb2.DESCRIPTOR.package == "lifelong_memory.v1"
