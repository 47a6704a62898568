"""Server plumbing: health, reflection, retries on UNAVAILABLE."""

from __future__ import annotations

import socket
import threading
import time

import grpc
import pytest
import torch
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


def test_a_server_on_a_unix_socket_answers_as_over_tcp(tmp_path, server_url):
    """A same-host client reaches a server on a Unix domain socket (connect("unix:///path")) and gets, bit for
    bit, what the same memory answers over TCP."""
    path = tmp_path / "lmem.sock"
    server, _ = build_server(f"unix://{path}", MemoryRegistry())
    server.start()
    try:
        with connect(f"unix://{path}") as unix, connect(server_url) as tcp:
            name = f"unix-{time.monotonic_ns()}"
            config = dict(key_dim=16, memory_size=64, choose_k=8, age_noise=2.0, seed=3)
            memories = [unix.create_memory(name, **config), tcp.create_memory(name, **config)]
            try:
                generator = torch.Generator().manual_seed(0)
                streams = [memory.stream() for memory in memories]
                for step in range(12):
                    queries = torch.nn.functional.normalize(torch.randn(4, 16, generator=generator), dim=1)
                    labels = torch.randint(0, 10, (4,), generator=generator)
                    via = streams if step % 2 else memories  # the stream and unary calls alike
                    over_unix, over_tcp = (m.query(queries, labels, update=True) for m in via)
                    for field in ("predictions", "written_slots", "neighbor_slots", "positive_keys", "weights"):
                        assert torch.equal(getattr(over_unix, field), getattr(over_tcp, field)), (step, field)
                for stream in streams:
                    stream.close()
                assert all(torch.equal(a, b) for a, b in zip(*(m.slots(range(64)) for m in memories), strict=True))
            finally:
                unix.delete_memory(name)
                tcp.delete_memory(name)
    finally:
        server.stop(grace=None)
    with pytest.raises(ValueError, match="TLS options need a grpcs:// url"):
        connect(f"unix://{path}", ca_cert="ca.pem")


class Interrupted(Exception):
    """What a timeout signal or KeyboardInterrupt raises inside a training step."""


class InterruptedOnce:
    """A stream's replies whose first read is interrupted, with the reply still on its way."""

    def __init__(self, responses):
        self.responses, self.armed = responses, True

    def __next__(self):
        if self.armed:
            self.armed = False
            raise Interrupted
        return next(self.responses)

    def done(self):
        return self.responses.done()

    def cancel(self):
        return self.responses.cancel()


@pytest.mark.parametrize("url", ["local", "server_url"])
def test_threads_sharing_one_stream_each_get_the_reply_to_their_own_query(url, request):
    """A MemoryModule shared by the threads of a data loader shares its stream: each round trip must be whole."""
    with connect(request.getfixturevalue(url) if url == "server_url" else url) as store:
        memory = store.create_memory("shared-stream", key_dim=16, memory_size=64, choose_k=4)
        try:
            memory.query(torch.eye(16), torch.arange(16), update=True)
            wrong, failed = [], []

            def ask(thread: int) -> None:
                for i in range(150):
                    row = (thread * 5 + i) % 16
                    try:
                        predicted = int(stream.query(torch.eye(16)[row : row + 1]).predictions[0])
                    except Exception as exc:  # noqa: BLE001 - any failure is the finding
                        failed.append(repr(exc))
                        continue
                    if predicted != row:
                        wrong.append((row, predicted))

            with memory.stream() as stream:
                threads = [threading.Thread(target=ask, args=(t,)) for t in range(4)]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join(60)
            assert not any(t.is_alive() for t in threads)
            assert not failed and not wrong, (len(failed), failed[:3], len(wrong), wrong[:3])
        finally:
            store.delete_memory("shared-stream")


def test_a_stream_query_interrupted_before_its_reply_never_hands_that_reply_to_the_next(server_url):
    with connect(server_url) as store:
        memory = store.create_memory("interrupted", key_dim=8, memory_size=64, choose_k=4)
        try:
            with memory.stream() as stream:
                stream._responses = InterruptedOnce(stream._responses)
                with pytest.raises(Interrupted):
                    stream.query(torch.eye(8)[:1], torch.tensor([5]), update=True)
                for rows in (3, 2):
                    result = stream.query(torch.eye(8)[:rows], torch.arange(rows), update=True)
                    assert len(result.predictions) == rows  # its own reply, not the one before
        finally:
            store.delete_memory("interrupted")
