"""The server as a whole under bad input and limits: each case gets a precise status or log line, the
server stays up, and the other memories are untouched (compared before and after, slot by slot)."""

from __future__ import annotations

import hashlib
import signal
import subprocess
import sys
import textwrap
import threading
import time

import grpc
import pytest
import torch

from lifelong_memory.client import DeadlineExceeded, ResourceExhausted, connect
from lifelong_memory.server import wire
from lifelong_memory.server.registry import MemoryRegistry
from lifelong_memory.server.service import ServerLimits, build_server
from lifelong_memory.v1 import memory_pb2 as pb
from lifelong_memory.v1 import memory_pb2_grpc as pb_grpc

CONFIG = dict(key_dim=16, memory_size=64, choose_k=8)
MESSAGE_LIMIT = 1 << 20


@pytest.fixture
def server():
    """A fresh server with small limits and a bystander memory that no case may change."""
    registry = MemoryRegistry(max_memories=3)
    grpc_server, port = build_server(
        "127.0.0.1:0", registry, ServerLimits(max_batch=64, max_message_bytes=MESSAGE_LIMIT), max_workers=4
    )
    grpc_server.start()
    url = f"grpc://127.0.0.1:{port}"
    with connect(url) as store:
        bystander = store.create_memory("bystander", **CONFIG)
        bystander.query(*batch(0), update=True)
    before = digest(url, "bystander")
    yield url, registry
    assert digest(url, "bystander") == before, "the bystander memory changed"
    grpc_server.stop(grace=None)


def batch(seed: int, rows: int = 4, dim: int = 16):
    generator = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(rows, dim, generator=generator), dim=1), torch.arange(rows)


def digest(url: str, name: str) -> str:
    with connect(url) as store:
        arrays = store.memory(name).read_slots(range(CONFIG["memory_size"]))
    h = hashlib.sha256()
    for a in arrays[:-1]:
        h.update(torch.as_tensor(a).numpy().tobytes())
    h.update("\n".join(arrays.writers).encode())
    return h.hexdigest()


def stub(url: str, max_message_bytes: int = 64 << 20):
    options = [("grpc.max_send_message_length", max_message_bytes)]
    channel = grpc.insecure_channel(url.removeprefix("grpc://"), options=options)
    return channel, pb_grpc.MemoryServiceStub(channel)


def test_oversized_message_is_refused(server):
    url, _ = server
    channel, service = stub(url)
    queries = torch.nn.functional.normalize(torch.ones(32, 16384), dim=1)  # 2 MiB of queries
    request = pb.QueryRequest(memory="bystander", queries=wire.encode_array(queries))
    with channel, pytest.raises(grpc.RpcError) as error:
        service.Query(request)
    assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "larger than max" in error.value.details() or "exceeds" in error.value.details()


def test_memory_larger_than_ram_is_refused_not_killed(server):
    url, registry = server
    with connect(url) as store, pytest.raises(ResourceExhausted, match="config.memory_size: .* memory budget"):
        store.create_memory("enormous", key_dim=4096, memory_size=2**30)
    with connect(url) as store:
        assert [m.name for m in store.list_memories()] == ["bystander"]


def test_too_many_memories(server):
    url, _ = server
    with connect(url) as store:
        store.create_memory("second", **CONFIG)
        store.create_memory("third", **CONFIG)
        with pytest.raises(ResourceExhausted, match="at most 3 memories"):
            store.create_memory("fourth", **CONFIG)


def occupy_workers(service, registry, release: threading.Event, monkeypatch, workers: int = 4) -> list:
    """Start ReadSlots calls until every worker thread runs one, each blocked inside the memory until ``release``."""
    memory = registry.get("bystander")
    read_slots = memory.read_slots
    entered = threading.Semaphore(0)

    def blocked_read_slots(slots):
        entered.release()
        release.wait()
        return read_slots(slots)

    monkeypatch.setattr(memory, "read_slots", blocked_read_slots)
    request = pb.ReadSlotsRequest(memory="bystander", slots=wire.encode_array(torch.arange(2)))
    calls = [service.ReadSlots.future(request) for _ in range(workers)]
    for _ in range(workers):
        assert entered.acquire(timeout=60), "a ReadSlots call never reached a worker"
    return calls


def test_write_whose_deadline_passes_in_the_queue_is_not_applied(server, monkeypatch):
    url, registry = server
    channel, service = stub(url)
    with channel, connect(url, timeout=0.5) as store:
        memory = store.memory("bystander")
        release = threading.Event()
        reads = occupy_workers(service, registry, release, monkeypatch)
        with pytest.raises(DeadlineExceeded):
            memory.query(*batch(1), update=True)
        # The server's deadline is its own receipt of the call plus the timeout: on a loaded machine that can
        # be later than the client's. Release the workers once it has surely passed too.
        time.sleep(1.0)
        release.set()
        for read in reads:
            assert read.result(timeout=60).commit_sequence == 1
    time.sleep(0.5)  # time enough for a queued write to run, had it not been dropped
    with connect(url) as store:
        assert store.memory("bystander").info().stats["commit_sequence"] == 1


def test_client_killed_mid_stream(server):
    url, _ = server
    with connect(url) as store:
        store.create_memory("streamed", **CONFIG)
    script = textwrap.dedent(
        f"""
        import sys, torch
        from lifelong_memory.client import connect
        with connect("{url}") as store, store.memory("streamed").stream() as stream:
            for step in range(10**6):
                q = torch.nn.functional.normalize(torch.randn(4, 16), dim=1)
                stream.query(q, torch.arange(4), update=True)
                if step == 20:
                    print("streaming", flush=True)
        """
    )
    client = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert client.stdout.readline().strip() == "streaming"
    client.send_signal(signal.SIGKILL)
    client.wait()
    with connect(url) as store:  # the server goes on, for that memory and every other
        memory = store.memory("streamed")
        written = memory.info().stats["commit_sequence"]
        assert written >= 21
        with memory.stream() as stream:
            stream.query(*batch(2), update=True)
        assert memory.info().stats["commit_sequence"] == written + 1


def test_malformed_files_on_start_are_logged_and_the_rest_served(tmp_path):
    registry = MemoryRegistry(data_dir=tmp_path)
    registry.create("healthy", **CONFIG).query(*batch(3), update=True)
    registry.create("broken", **CONFIG).query(*batch(4), update=True)
    torn = registry.create("torn", **CONFIG)
    torn.query(*batch(5), update=True)
    registry.snapshot("torn")
    torn.query(*batch(6), update=True)
    registry.close()  # snapshots at 1 and 2; the log from 2 on
    (tmp_path / "memories" / "broken" / "config.json").write_bytes(b"\x00garbage")
    for snapshot in (tmp_path / "memories" / "torn").glob("snapshot-*.lmem"):
        snapshot.write_bytes(snapshot.read_bytes()[:-50])
    serve = [sys.executable, "-m", "lifelong_memory.client.cli", "serve", "--port", "0", "--data-dir", str(tmp_path)]
    process = subprocess.Popen(serve, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = process.stdout.readline()
        assert "serving on 127.0.0.1:" in line
        url = "grpc://" + line.strip().rsplit(" ", 1)[-1]
        with connect(url) as store:
            assert store.memory("healthy").info().stats["commit_sequence"] == 1
            for name in ("broken", "torn"):
                with pytest.raises(Exception, match="could not be recovered") as error:
                    store.memory(name)
                assert error.value.code == "FAILED_PRECONDITION"
    finally:
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
    assert process.returncode == 0
    assert "memory 'broken' could not be recovered" in stderr and "config.json" in stderr
    for sequence in (1, 2):
        assert f"snapshot-{sequence:020d}.lmem is unusable (truncated" in stderr
