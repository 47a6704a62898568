"""Server plumbing: health, reflection, retries on UNAVAILABLE."""

from __future__ import annotations

import socket
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from lifelong_memory.client import Unavailable, connect
from lifelong_memory.client import store as store_module
from lifelong_memory.server.registry import MemoryRegistry
from lifelong_memory.server.service import build_server


def test_health_and_reflection(server_url):
    with grpc.insecure_channel(server_url.removeprefix("grpc://")) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "lifelong_memory.v1.MemoryService"):
            status = health.Check(health_pb2.HealthCheckRequest(service=service)).status
            assert status == health_pb2.HealthCheckResponse.SERVING
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        response = next(reflection.ServerReflectionInfo(iter([request])))
        names = {s.name for s in response.list_services_response.service}
        assert "lifelong_memory.v1.MemoryService" in names


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_idempotent_calls_retry_until_the_server_is_up():
    port = free_port()
    started = []

    def start_later():
        time.sleep(0.5)
        server, _ = build_server(f"127.0.0.1:{port}", MemoryRegistry())
        server.start()
        started.append(server)

    thread = threading.Thread(target=start_later)
    thread.start()
    try:
        with connect(f"grpc://127.0.0.1:{port}", retries=8) as store:
            assert store.list_memories() == []
    finally:
        thread.join()
        for server in started:
            server.stop(None)


def test_non_idempotent_calls_do_not_retry(monkeypatch):
    backoffs = []
    monkeypatch.setattr(store_module.time, "sleep", backoffs.append)
    with connect(f"grpc://127.0.0.1:{free_port()}", retries=8) as store:
        with pytest.raises(Unavailable):
            store.create_memory("never")
        assert backoffs == []
        with pytest.raises(Unavailable):
            store.list_memories()
        assert len(backoffs) == 8
