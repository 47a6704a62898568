"""No client can stall the server by holding calls open: idle streams, health watches and half-sent
messages cost no worker thread; calls in progress are capped per client address and in total with a
clear RESOURCE_EXHAUSTED; idle calls are closed; an unauthenticated call is refused before its message
is read; and a client's calls end at their deadline when the server never answers."""

from __future__ import annotations

import contextlib
import socket
import struct
import subprocess
import sys
import threading
import time

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from lifelong_memory.client import DeadlineExceeded, ResourceExhausted, connect
from lifelong_memory.server import wire
from lifelong_memory.server.admission import PROBE_CALLS_PER_PEER
from lifelong_memory.server.auth import TokenAuth
from lifelong_memory.server.registry import MemoryRegistry
from lifelong_memory.server.service import ServerLimits, build_server
from lifelong_memory.v1 import memory_pb2 as pb
from lifelong_memory.v1 import memory_pb2_grpc as pb_grpc

WORKERS = 4
HOLDERS = 3 * WORKERS  # idle calls held open: more than the server has worker threads
# A live server answers these calls in milliseconds; a stalled one never does. The deadline is the issue's
# one second with room for a loaded 2-core machine.
ANSWER_DEADLINE = 5.0
HOLD_DEADLINE = 60.0  # the held calls' own deadline: a server that never lets them start fails the test then
CONFIG = dict(key_dim=8, memory_size=32, choose_k=4)
QUERY_PATH = "/lifelong_memory.v1.MemoryService/Query"


@contextlib.contextmanager
def running_server(limits: ServerLimits | None = None, auth: TokenAuth | None = None):
    limits = limits or ServerLimits()
    server, port = build_server("127.0.0.1:0", MemoryRegistry(), limits, max_workers=WORKERS, auth=auth)
    server.start()
    try:
        yield port
    finally:
        server.stop(grace=None)


def unit_rows(seed: int) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.randn(3, 8, generator=torch.Generator().manual_seed(seed)), dim=1)


def assert_answered(port: int) -> None:
    """A normal client and the health check get their answers."""
    with connect(f"grpc://127.0.0.1:{port}", timeout=ANSWER_DEADLINE, retries=0) as store:
        memory = store.create_memory(f"normal-{port}", **CONFIG)
        assert memory.query(unit_rows(0), torch.arange(3), update=True).commit_sequence == 1
        assert f"normal-{port}" in [m.name for m in store.list_memories()]
        store.delete_memory(memory.name)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=ANSWER_DEADLINE)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


# ------------------------------------------------------------------------------------- holding calls open


@contextlib.contextmanager
def idle_health_watches(port: int, count: int):
    """``count`` Health.Watch streams, each past its first answer, then idle; fewer than the PROBE_CALLS_PER_PEER
    one client address may hold (test_security), leaving room for assert_answered's Check from this address."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        held = min(count, PROBE_CALLS_PER_PEER - 1)
        watches = [health.Watch(health_pb2.HealthCheckRequest(), timeout=HOLD_DEADLINE) for _ in range(held)]
        for watch in watches:
            assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        yield
        for watch in watches:
            watch.cancel()


@contextlib.contextmanager
def idle_query_streams(port: int, count: int):
    """``count`` QueryStreams on one connection, each past one answered query, then idle."""
    with connect(f"grpc://127.0.0.1:{port}") as store:
        store.create_memory("streamed", **CONFIG)
    release = threading.Event()
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        service = pb_grpc.MemoryServiceStub(channel)

        def one_query_then_idle():
            yield pb.QueryRequest(memory="streamed", queries=wire.encode_array(unit_rows(1)))
            release.wait()

        streams = [service.QueryStream(one_query_then_idle(), timeout=HOLD_DEADLINE) for _ in range(count)]
        for stream in streams:
            next(stream)
        yield
        release.set()
        for stream in streams:
            stream.cancel()


@contextlib.contextmanager
def half_sent_queries(port: int, count: int):
    """``count`` Query calls on one HTTP/2 connection, each with only the first bytes of its message sent."""
    with RawHttp2(port) as connection:
        connection.wait_until_started([connection.start_call(QUERY_PATH) for _ in range(count)])
        yield


@pytest.mark.parametrize("hold", [idle_health_watches, idle_query_streams, half_sent_queries])
def test_calls_held_open_do_not_stall_the_others(hold):
    with running_server() as port, hold(port, HOLDERS):
        assert_answered(port)


# ---------------------------------------------------------------------------------------------- limits


@pytest.mark.parametrize(
    "limits, flag",
    [
        (ServerLimits(max_calls=HOLDERS, max_calls_per_peer=2 * HOLDERS), "--max-calls"),
        (ServerLimits(max_calls=2 * HOLDERS, max_calls_per_peer=HOLDERS), "--max-calls-per-peer"),
    ],
)
def test_calls_past_the_cap_are_resource_exhausted_until_one_ends(limits, flag):
    with running_server(limits) as port:
        with RawHttp2(port) as connection, connect(f"grpc://127.0.0.1:{port}", retries=0) as store:
            held = [connection.start_call(QUERY_PATH) for _ in range(HOLDERS)]
            connection.wait_until_started(held)
            with pytest.raises(ResourceExhausted, match=f"at most {HOLDERS} calls at once.*\\({flag}\\)"):
                store.list_memories()
            connection.reset(held[0])  # the client gives up one held call: room for one more
            assert eventually(lambda: store.list_memories() == [])


def test_one_connection_carries_at_most_max_streams_per_connection_calls():
    # Without the limit, the fifth call would wait like the others until the idle timeout ends them all.
    limits = ServerLimits(max_streams_per_connection=4, idle_timeout=10.0)
    with running_server(limits) as port, RawHttp2(port) as connection:
        connection.wait_for_settings()
        calls = [connection.start_call(QUERY_PATH) for _ in range(5)]
        connection.wait_until_started(calls[:4])
        connection.wait_until_ended(calls[4])  # refused by HTTP/2, past the connection's limit
        assert connection.ended == {calls[4]}


def test_idle_stream_is_closed_and_frees_its_place():
    limits = ServerLimits(max_calls_per_peer=1, idle_timeout=0.5)
    with running_server(limits) as port:
        with connect(f"grpc://127.0.0.1:{port}") as store:
            memory = store.create_memory("paused", **CONFIG)
        release = threading.Event()

        def one_query_then_idle():
            yield pb.QueryRequest(memory="paused", queries=wire.encode_array(unit_rows(2)))
            release.wait()

        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stream = pb_grpc.MemoryServiceStub(channel).QueryStream(one_query_then_idle(), timeout=HOLD_DEADLINE)
            next(stream)
            with pytest.raises(grpc.RpcError) as closed:
                next(stream)
            release.set()
        assert closed.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "no message from the client for 0.5 s" in closed.value.details()
        with connect(f"grpc://127.0.0.1:{port}", retries=0) as store:
            assert store.memory(memory.name).info().stats["commit_sequence"] == 0


def test_stream_sending_within_the_idle_timeout_stays_open_past_it():
    """The idle timer re-arms for what is left of each wait: a stream whose messages come every 0.15 s stays
    open for many idle timeouts, and is closed once it pauses for longer than one."""
    limits = ServerLimits(idle_timeout=0.5)
    with running_server(limits) as port:
        with connect(f"grpc://127.0.0.1:{port}") as store:
            store.create_memory("steady", **CONFIG)
        pause = threading.Event()

        def steady_then_paused():
            for step in range(12):  # 1.8 s: more than three idle timeouts
                yield pb.QueryRequest(memory="steady", queries=wire.encode_array(unit_rows(step)))
                time.sleep(0.15)
            pause.wait()

        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stream = pb_grpc.MemoryServiceStub(channel).QueryStream(steady_then_paused(), timeout=HOLD_DEADLINE)
            answers = [next(stream) for _ in range(12)]
            with pytest.raises(grpc.RpcError) as closed:
                next(stream)
            pause.set()
        assert len(answers) == 12
        assert closed.value.code() == grpc.StatusCode.UNAVAILABLE


def test_client_stream_opens_a_new_call_after_the_server_closed_an_idle_one():
    with running_server(ServerLimits(idle_timeout=0.5)) as port, connect(f"grpc://127.0.0.1:{port}") as store:
        memory = store.create_memory("resumed", **CONFIG)
        with memory.stream() as stream:
            assert stream.query(unit_rows(3), torch.arange(3), update=True).commit_sequence == 1
            closed = threading.Event()
            stream._responses.add_done_callback(lambda call: closed.set())  # the gRPC call under the stream
            assert closed.wait(HOLD_DEADLINE), "the server never closed the idle stream"
            assert stream.query(unit_rows(4), torch.arange(3), update=True).commit_sequence == 2


def test_half_sent_message_is_closed_when_the_client_goes_quiet():
    with running_server(ServerLimits(idle_timeout=0.5)) as port, RawHttp2(port) as connection:
        stream = connection.start_call(QUERY_PATH)
        connection.wait_until_ended(stream)


def test_unauthenticated_call_is_refused_before_its_message_is_read():
    auth = TokenAuth({"writer-token": "read-write"})
    with running_server(auth=auth) as port, RawHttp2(port) as connection:
        stream = connection.start_call(QUERY_PATH)  # no token; the message is never finished
        connection.wait_until_ended(stream)


def eventually(check) -> bool:
    """``check()``, tried again while the server still refuses it for want of room (it frees a call's place
    once it has seen the call end, which the client cannot observe)."""
    for _ in range(100):
        try:
            return check()
        except ResourceExhausted:
            time.sleep(0.05)
    return check()


# ----------------------------------------------------------------------- deadlines against a silent server


@pytest.fixture
def black_hole():
    """A port that accepts connections and never answers."""
    listener = socket.create_server(("127.0.0.1", 0))
    accepted = []

    def accept():
        while True:
            try:
                accepted.append(listener.accept()[0])
            except OSError:  # shut down
                return

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield listener.getsockname()[1]
    listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept
    thread.join()
    listener.close()
    for connection in accepted:
        connection.close()


def test_calls_to_a_silent_server_end_at_their_deadline(black_hole):
    with connect(f"grpc://127.0.0.1:{black_hole}", timeout=0.5) as store:
        with pytest.raises(DeadlineExceeded, match="no answer from 127.0.0.1:.* within the deadline of 0.5 s"):
            store.list_memories()


def test_lmem_gives_up_on_a_silent_server(black_hole):
    lmem = [sys.executable, "-m", "lifelong_memory.client.cli"]
    command = [*lmem, "ls", "--url", f"grpc://127.0.0.1:{black_hole}", "--timeout", "0.5"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 8
    assert "lmem: DEADLINE_EXCEEDED: no answer from" in done.stderr and "--timeout" in done.stderr


# ------------------------------------------------------------------------------- a bare HTTP/2 connection

DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY = 0x0, 0x1, 0x3, 0x4, 0x6, 0x7
END_STREAM, ACK, END_HEADERS = 0x1, 0x1, 0x4


class RawHttp2:
    """An HTTP/2 client connection that starts gRPC calls and sends only the first bytes of each call's
    message, which no gRPC client library can do."""

    def __init__(self, port: int):
        self.socket = socket.create_connection(("127.0.0.1", port), timeout=HOLD_DEADLINE)
        self.socket.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + frame(SETTINGS, 0, 0))
        self.next_stream = 1
        self.started: set[int] = set()
        self.ended: set[int] = set()

    def start_call(self, path: str) -> int:
        """Headers, then 5 bytes of a 1 KiB message: the call waits for the rest, which never comes."""
        stream, self.next_stream = self.next_stream, self.next_stream + 2
        headers = [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", path),
            (":authority", "127.0.0.1"),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
        ]
        block = b"".join(b"\x00" + hpack_string(name) + hpack_string(value) for name, value in headers)
        self.socket.sendall(
            frame(HEADERS, END_HEADERS, stream, block) + frame(DATA, 0, stream, b"\x00" + struct.pack(">I", 1024))
        )
        return stream

    def reset(self, stream: int) -> None:
        self.socket.sendall(frame(RST_STREAM, 0, stream, struct.pack(">I", 0x8)))  # CANCEL

    def wait_for_settings(self) -> None:
        """Return once the server's settings have come (and been acknowledged): its limits apply from then."""
        while self._read_frame()[:2] != (SETTINGS, 0):
            pass

    def wait_until_started(self, streams: list[int]) -> None:
        """Return once the server has started every call in ``streams`` (it sends their response headers
        first); fails after HOLD_DEADLINE."""
        while not self.started.issuperset(streams):
            self._read_frame()

    def wait_until_ended(self, stream: int) -> None:
        """Return once the server has ended ``stream`` (trailers or a reset); fails after HOLD_DEADLINE."""
        while stream not in self.ended:
            self._read_frame()

    def _read_frame(self) -> tuple[int, int, bytes]:
        header = self._read(9)
        kind, flags, stream = struct.unpack(">BBI", header[3:])
        payload = self._read(int.from_bytes(header[:3], "big"))
        stream &= 0x7FFFFFFF
        if kind == SETTINGS and not flags & ACK:
            self.socket.sendall(frame(SETTINGS, ACK, 0))
        elif kind == PING and not flags & ACK:
            self.socket.sendall(frame(PING, ACK, 0, payload))
        elif kind == HEADERS:
            (self.ended if flags & END_STREAM else self.started).add(stream)
        elif kind == RST_STREAM:
            self.ended.add(stream)
        elif kind == GOAWAY:
            raise ConnectionError("the server closed the connection")
        return kind, flags, payload

    def _read(self, size: int) -> bytes:
        data = b""
        while len(data) < size:
            chunk = self.socket.recv(size - len(data))
            if not chunk:
                raise ConnectionError("the server closed the connection")
            data += chunk
        return data

    def __enter__(self) -> RawHttp2:
        return self

    def __exit__(self, *exc) -> None:
        self.socket.close()


def frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return struct.pack(">I", len(payload))[1:] + struct.pack(">BBI", kind, flags, stream) + payload


def hpack_string(text: str) -> bytes:
    """An HPACK string literal without Huffman coding (lengths below 127 fit the one-byte prefix)."""
    data = text.encode()
    assert len(data) < 127
    return bytes([len(data)]) + data


def test_an_export_whose_client_stops_reading_is_ended_and_copies_nothing_more():
    """Each write during an export saves the keys it overwrites for the export: an export whose client stopped
    reading would hold them for good (a read-only token suffices to start one)."""
    registry = MemoryRegistry()
    server, port = build_server("127.0.0.1:0", registry, ServerLimits(idle_timeout=0.5), max_workers=WORKERS)
    server.start()
    try:
        with connect(f"grpc://127.0.0.1:{port}") as store:
            # 32 MiB of keys: more than the transport buffers for a client that reads nothing
            store.create_memory("exported", key_dim=128, memory_size=65536, choose_k=4)
        memory = registry.get("exported")
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            export = pb_grpc.MemoryServiceStub(channel).ExportMemory(pb.ExportMemoryRequest(name="exported"))
            next(export)  # and no more
            waited = time.monotonic()
            while memory._streamed_keys and time.monotonic() - waited < HOLD_DEADLINE:
                time.sleep(0.1)
            assert not memory._streamed_keys, "the export still copies what writes overwrite"
            with pytest.raises(grpc.RpcError) as ended:
                for _ in export:
                    pass
            assert ended.value.code() == grpc.StatusCode.UNAVAILABLE and "read nothing" in ended.value.details()
    finally:
        server.stop(grace=None)


def test_an_export_that_writes_would_make_keep_more_than_max_query_bytes_is_ended_and_the_writes_go_on(tmp_path):
    registry = MemoryRegistry(max_query_bytes=1 << 20)
    server, port = build_server("127.0.0.1:0", registry, ServerLimits(), max_workers=WORKERS)
    server.start()
    try:
        with connect(f"grpc://127.0.0.1:{port}") as store:
            store.create_memory("exported", key_dim=128, memory_size=65536, choose_k=4)  # 32 MiB of keys
            memory = registry.get("exported")
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                export = pb_grpc.MemoryServiceStub(channel).ExportMemory(pb.ExportMemoryRequest(name="exported"))
                next(export)
                cleared = memory.commit_sequence + 1
                store.memory("exported").clear()  # the keys not read yet, kept for the export: more than 1 MiB
                with pytest.raises(grpc.RpcError) as ended:
                    for _ in export:
                        pass
            assert ended.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert ended.value.details().startswith("name: ") and "--max-query-mb" in ended.value.details()
            assert memory.commit_sequence == cleared and not memory._streamed_keys
            assert memory.footprint() == memory.config.footprint(memory.max_batch)
            assert store.export_memory("exported", tmp_path / "exported.lmem") > 32 << 20  # with no writes meanwhile
    finally:
        server.stop(grace=None)
