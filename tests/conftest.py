"""Shared fixtures: a live gRPC server on a free 127.0.0.1 port, and stores over both transports."""

from __future__ import annotations

import pytest

from lifelong_memory.client import connect
from lifelong_memory.server.registry import MemoryRegistry
from lifelong_memory.server.service import ServerLimits, build_server


@pytest.fixture(scope="session")
def server_url():
    """A server in this process (its own gRPC threads), for the whole test session."""
    server, port = build_server("127.0.0.1:0", MemoryRegistry(max_memories=1000), ServerLimits(max_batch=512))
    server.start()
    yield f"grpc://127.0.0.1:{port}"
    server.stop(grace=None)


@pytest.fixture(params=["local", "grpc"])
def store(request, server_url):
    """A store over each transport; memories it creates are deleted afterwards."""
    url = "local" if request.param == "local" else server_url
    with connect(url) as store:
        before = {info.name for info in store.list_memories()}
        yield store
        for info in store.list_memories():
            if info.name not in before:
                store.delete_memory(info.name)
