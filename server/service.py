"""The gRPC server: MemoryService v1 over a MemoryRegistry, plus health and reflection.

An asyncio server: a call waiting on its client (an idle stream, a health watch, a message half
sent) costs a coroutine, never a thread, so no client can stall the others by holding calls open.
The memory's work (decoding, torch, encoding) runs in a bounded pool of worker threads; each memory
still serialises its own calls with its lock, so writes commit in one order. Admission
(server/admission.py) authenticates, caps the calls in progress and closes idle calls.
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import faulthandler
import functools
import ipaddress
import logging
import signal
import sys
import tempfile
import threading
import time
from concurrent import futures
from dataclasses import dataclass

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from lifelong_memory.server import wire
from lifelong_memory.server.admission import Admission
from lifelong_memory.server.auth import TokenAuth
from lifelong_memory.server.cluster import shard_health
from lifelong_memory.server.errors import (
    DeadlineExceeded,
    InvalidArgument,
    MemoryServiceError,
    ResourceExhausted,
    Unavailable,
)
from lifelong_memory.server.memory import Memory, result_bytes
from lifelong_memory.server.metrics import RpcObserver, serve_metrics
from lifelong_memory.server.persistence import SnapshotError, read_snapshot, snapshot_chunks
from lifelong_memory.server.registry import MemoryRegistry, check_name
from lifelong_memory.v1 import memory_pb2 as pb
from lifelong_memory.v1 import memory_pb2_grpc as pb_grpc

log = logging.getLogger("lifelong_memory.server")
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["MemoryService"].full_name
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class ServerLimits:
    max_batch: int = 4096
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    max_calls: int = 1024  # calls in progress at once, every client together
    max_calls_per_peer: int = 256  # calls in progress at once from one client address
    max_streams_per_connection: int = 128  # HTTP/2 streams open at once on one connection; more wait their turn
    idle_timeout: float = 300.0  # seconds the server waits for a client's next message before closing its call


# What a read-only token may call (Query and QueryStream only without update); everything else writes.
READ_METHODS = frozenset(
    {"GetMemory", "ListMemories", "ReadSlots", "InspectMemory", "FindLabel", "ExportMemory", "Query", "QueryStream"}
)


def _statuses(handler):
    """Turns the memory's errors into gRPC statuses; the memory is untouched when one is raised."""

    @functools.wraps(handler)
    async def wrapper(self, request, context):
        try:
            return await handler(self, request, context)
        except MemoryServiceError as exc:
            await context.abort(getattr(grpc.StatusCode, exc.code), str(exc))

    return wrapper


def _rpc(method):
    """A unary handler: checks the caller's role, then runs ``method`` on a worker thread."""
    writes = method.__name__ not in READ_METHODS

    @_statuses
    @functools.wraps(method)
    async def handler(self, request, context):
        self._authorize(context, writes or bool(getattr(request, "update", False)))
        return await self._in_worker(context, method, self, request, context)

    return handler


class MemoryServicer(pb_grpc.MemoryServiceServicer):
    def __init__(
        self,
        registry: MemoryRegistry,
        workers: futures.Executor,
        limits: ServerLimits = ServerLimits(),
        auth: TokenAuth | None = None,
    ):
        self.registry = registry
        self.workers = workers
        self.limits = limits
        self.auth = auth

    def _authorize(self, context, write: bool) -> None:
        if self.auth is not None:
            self.auth.authorize(context.invocation_metadata(), write)

    async def _in_worker(self, context, function, *args):
        """``function(*args)`` on a worker thread, with the call's request id. Work still queued when the
        call's deadline passes is not started (DeadlineExceeded): a write whose client stopped waiting for
        it in the queue is not applied."""
        remaining = context.time_remaining()
        deadline = None if remaining is None else time.monotonic() + remaining
        job = functools.partial(contextvars.copy_context().run, _unless_past, deadline, function, *args)
        return await asyncio.get_running_loop().run_in_executor(self.workers, job)

    # --------------------------------------------------------- administration

    @_rpc
    def CreateMemory(self, request, context):
        memory = self.registry.create(request.name, **wire.config_from_proto(request.config))
        log.info("created memory %r %s", request.name, memory.config)
        return self._info(request.name, memory)

    @_rpc
    def GetMemory(self, request, context):
        return self._info(request.name, self.registry.get(request.name))

    @_rpc
    def ListMemories(self, request, context):
        return pb.ListMemoriesResponse(memories=[self._info(name, m) for name, m in self.registry.list()])

    @_rpc
    def DeleteMemory(self, request, context):
        self.registry.delete(request.name)
        log.info("deleted memory %r", request.name)
        return pb.DeleteMemoryResponse()

    @_rpc
    def ClearMemory(self, request, context):
        memory = self.registry.get(request.name)
        memory.clear()
        return self._info(request.name, memory)

    # ------------------------------------------------------- query and update

    @_rpc
    def Query(self, request, context):
        return self._query(request)

    @_statuses
    async def QueryStream(self, request_iterator, context):
        self._authorize(context, write=False)
        async for request in request_iterator:
            if request.update:
                self._authorize(context, write=True)
            await context.write(await self._in_worker(context, self._query, request))

    @_rpc
    def Update(self, request, context):
        memory = self.registry.get(request.memory, "memory")
        queries, labels = self._batch(request, memory, labels_required=True)
        if not request.HasField("ticket"):
            raise InvalidArgument("ticket", "required: pass the ticket of the query being updated")
        result = memory.update(queries, labels, wire.ticket_from_proto(request.ticket), request.writer)
        return pb.UpdateResponse(
            commit_sequence=result.commit_sequence,
            written_slots=wire.encode_array(result.written_slots),
            incorrect=wire.encode_array(result.incorrect),
            revalidated_rows=result.revalidated_rows,
        )

    @_rpc
    def ReadSlots(self, request, context):
        memory = self.registry.get(request.memory, "memory")
        selection = request.WhichOneof("selection")
        size = memory.config.memory_size
        if selection == "slots":
            slots = wire.decode_array(request.slots, "slots", pb.INT64, 1)
        elif selection == "range":
            start, stop = request.range.start, request.range.stop
            if not 0 <= start <= stop <= size:
                raise InvalidArgument("range", f"must satisfy 0 <= start <= stop <= {size}, got [{start}, {stop})")
            slots = torch.arange(start, stop)
        else:
            raise InvalidArgument("selection", "give slots or range")
        per_slot = memory.config.key_dim * 4 + 8 + 4 + 8 + 8 + 8  # slot, key, value, age, generation, writer
        if len(slots) * per_slot > self.limits.max_message_bytes - 1024:
            most = (self.limits.max_message_bytes - 1024) // per_slot
            raise InvalidArgument(selection, f"{len(slots)} slots exceed one message ({most} at most); read in pages")
        reply = wire.slots_to_proto(slots, memory.read_slots(slots))
        if reply.ByteSize() > self.limits.max_message_bytes:  # the slots' writer tags, up to 1024 of 128 characters
            raise InvalidArgument(
                selection,
                f"{len(slots)} slots and their {len(reply.writer_names)} writer tags take {reply.ByteSize()} bytes, "
                f"more than one message ({self.limits.max_message_bytes}); read in smaller pages",
            )
        return reply

    @_rpc
    def InspectMemory(self, request, context):
        memory = self.registry.get(request.memory, "memory")
        options = {name: getattr(request, name) for name in ("age_bins", "top_labels") if request.HasField(name)}
        return wire.report_to_proto(memory.inspect(**options))

    @_rpc
    def FindLabel(self, request, context):
        return wire.label_slots_to_proto(self.registry.get(request.memory, "memory").find_label(request.label))

    # ------------------------------------------------- snapshot, export, import

    @_rpc
    def RetrainIndex(self, request, context):
        result = self.registry.retrain_index(request.name)
        log.info(
            "memory %r: index retrained at %d in %.1f s (%d slots written meanwhile)",
            request.name,
            result.commit_sequence,
            result.seconds,
            result.rewritten_slots,
        )
        return pb.RetrainIndexResponse(
            commit_sequence=result.commit_sequence, rewritten_slots=result.rewritten_slots, seconds=result.seconds
        )

    @_rpc
    def SnapshotMemory(self, request, context):
        sequence, path, size = self.registry.snapshot(request.name)
        log.info("memory %r: snapshot at %d, %d bytes", request.name, sequence, size)
        return pb.SnapshotMemoryResponse(commit_sequence=sequence, path=str(path), bytes=size)

    @_statuses
    async def ExportMemory(self, request, context):
        self._authorize(context, write=False)
        chunks = await self._in_worker(
            context, lambda: snapshot_chunks(self.registry.get(request.name).capture(streamed=True))
        )
        try:
            while (chunk := await self._in_worker(context, next, chunks, None)) is not None:
                try:  # a client that stops reading would keep the export, and its copy of every key overwritten
                    await asyncio.wait_for(context.write(pb.FileChunk(data=chunk)), self.limits.idle_timeout)
                except TimeoutError:
                    raise Unavailable(
                        f"the client read nothing for {self.limits.idle_timeout:g} s: the server ended this "
                        "export; export again"
                    ) from None
        finally:  # the keys' reader stops copying what writes overwrite now, not when the collector finds it
            await asyncio.get_running_loop().run_in_executor(self.workers, chunks.close)

    @_statuses
    async def ImportMemory(self, request_iterator, context):
        self._authorize(context, write=True)
        messages = aiter(request_iterator)
        first = await anext(messages, None)
        if first is None or first.WhichOneof("part") != "header":
            raise InvalidArgument("header", "the first message must be the header naming the new memory")
        name = first.header.name
        check_name(name, "header.name")
        overrides = wire.config_from_proto(first.header.config)
        with tempfile.SpooledTemporaryFile(max_size=self.limits.max_message_bytes) as file:
            async for message in messages:
                if message.WhichOneof("part") != "data":
                    raise InvalidArgument("data", "only file chunks may follow the header")
                await self._in_worker(context, file.write, message.data)
                if file.tell() > self.registry.memory_budget_bytes:
                    raise ResourceExhausted(
                        f"data: the file exceeds this server's memory budget of {self.registry.memory_budget_bytes} "
                        "bytes"
                    )
            return await self._in_worker(context, self._import, name, overrides, file)

    def _import(self, name: str, overrides: dict, file) -> pb.MemoryInfo:
        file.seek(0)
        try:
            state = read_snapshot(file, lambda config: self.registry.import_config(name, config, overrides))
        except SnapshotError as exc:
            raise InvalidArgument("data", str(exc)) from None
        memory = self.registry.import_state(name, state, **overrides)
        log.info("imported memory %r at commit %d", name, memory.commit_sequence)
        return self._info(name, memory)

    # ---------------------------------------------------------------- helpers

    def _query(self, request: pb.QueryRequest) -> pb.QueryResponse:
        memory = self.registry.get(request.memory, "memory")
        queries, labels = self._batch(request, memory, labels_required=request.update)
        unknown = [f for f in request.fields if f not in wire.RESULT_FIELDS]
        if unknown:
            raise InvalidArgument("fields", f"unknown result fields {unknown}")
        fields = frozenset(wire.RESULT_FIELDS[f] for f in request.fields)
        config = memory.config
        k = min(request.k or config.choose_k, config.memory_size)  # an invalid k is the memory's to name
        reply = result_bytes(config.key_dim, len(queries), k, fields, config.correct_in_top)
        if reply > self.limits.max_message_bytes - 1024:
            raise ResourceExhausted(
                f"fields: the reply to {len(queries)} rows with k = {k} and fields {sorted(fields)} would "
                f"hold {reply:,} bytes, over this server's message limit of {self.limits.max_message_bytes:,}; "
                "ask for fewer rows, a smaller k or fewer fields"
            )
        result = memory.query(
            queries,
            labels,
            k=request.k,
            use_recent=request.use_recent if request.HasField("use_recent") else True,
            update=request.update,
            fields=fields,
            writer=request.writer,
        )
        return wire.result_to_proto(result)

    def _batch(self, request, memory: Memory, *, labels_required: bool):
        queries = wire.decode_array(request.queries, "queries", pb.FLOAT32, 2)
        if len(queries) > self.limits.max_batch:
            raise InvalidArgument(
                "queries", f"batch of {len(queries)} exceeds this server's max_batch {self.limits.max_batch}"
            )
        labels = None
        if request.HasField("labels"):
            labels = wire.decode_array(request.labels, "labels", pb.INT64, 1)
        elif labels_required:
            raise InvalidArgument("labels", "required to update the memory")
        return queries, labels

    @staticmethod
    def _info(name: str, memory: Memory) -> pb.MemoryInfo:
        return pb.MemoryInfo(
            name=name,
            config=wire.config_to_proto(memory.config),
            stats=pb.MemoryStats(**memory.stats()),
            recovery=memory.recovery_report,
            shards=[pb.ShardStatus(**dataclasses.asdict(health)) for health in shard_health(memory)],
            footprint_bytes=memory.footprint(),
        )


def _unless_past(deadline: float | None, function, *args):
    if deadline is not None and time.monotonic() > deadline:
        raise DeadlineExceeded("the call's deadline passed while it waited for a worker; nothing was done")
    return function(*args)


def format_address(host: str, port: int) -> str:
    """``host:port`` as gRPC reads it: an IPv6 literal in brackets (``[::]:50051``)."""
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


class MemoryServer:
    """A MemoryService server bound to an address, run by an asyncio loop on its own thread; ``start``
    and ``stop`` may be called from any other thread."""

    def __init__(self, registry: MemoryRegistry, limits: ServerLimits, max_workers: int, auth: TokenAuth | None):
        self.registry = registry
        self.limits = limits
        self.auth = auth
        self.workers = futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="memory-worker")
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="grpc-server", daemon=True)
        self._thread.start()
        self._server = self._run(self._build())

    def _run(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    async def _build(self) -> grpc.aio.Server:
        limits = self.limits
        options = [
            ("grpc.max_send_message_length", limits.max_message_bytes),
            ("grpc.max_receive_message_length", limits.max_message_bytes),
            ("grpc.so_reuseport", 0),  # a second server on a port in use must fail, not share its traffic
            ("grpc.max_concurrent_streams", limits.max_streams_per_connection),
            # Ping a connection after a minute without traffic and drop it when the ping goes unanswered for
            # 20 s, also while only idle streams are open on it: a vanished client frees its calls.
            ("grpc.keepalive_time_ms", 60_000),
            ("grpc.keepalive_timeout_ms", 20_000),
            ("grpc.http2.max_pings_without_data", 0),
            # Clients may keep their connections alive with pings every 10 s or more.
            ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
            ("grpc.max_connection_idle_ms", 600_000),  # a connection without calls for 10 minutes is closed
        ]
        admission = Admission(
            max_calls=limits.max_calls,
            max_calls_per_peer=limits.max_calls_per_peer,
            idle_timeout=limits.idle_timeout,
            auth=self.auth,
            guarded_service=SERVICE_NAME,
        )
        # RpcObserver first, outermost: request ids, logs and metrics cover every call, refused ones too.
        server = grpc.aio.server(interceptors=[RpcObserver(), admission], options=options)
        servicer = MemoryServicer(self.registry, self.workers, limits, self.auth)
        pb_grpc.add_MemoryServiceServicer_to_server(servicer, server)
        self.health = health.aio.HealthServicer()
        await self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        await self.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server
        )
        return server

    def bind(self, address: str, credentials: grpc.ServerCredentials | None) -> int:
        try:
            if credentials is None:
                return self._server.add_insecure_port(address)
            return self._server.add_secure_port(address, credentials)
        except RuntimeError:  # grpc's way of saying the address is in use or not ours
            return 0

    def start(self) -> None:
        self._run(self._server.start())

    def stop(self, grace: float | None = None) -> None:
        """Refuse new calls, let calls in progress finish for ``grace`` seconds (None: cancel them now) and
        let the work they started finish; then stop the loop and the workers."""

        async def stop():
            await self.health.enter_graceful_shutdown()
            await self._server.stop(grace)
            # Calls the server cancelled may still be unwinding: let them end before the loop closes.
            calls = asyncio.all_tasks() - {asyncio.current_task()}
            await asyncio.gather(*calls, return_exceptions=True)

        self._run(stop())
        self.workers.shutdown(wait=True, cancel_futures=True)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()


def build_server(
    address: str,
    registry: MemoryRegistry,
    limits: ServerLimits = ServerLimits(),
    max_workers: int = 16,
    *,
    auth: TokenAuth | None = None,
    credentials: grpc.ServerCredentials | None = None,
) -> tuple[MemoryServer, int]:
    """A server bound to ``address``, not yet started, and the port it bound.

    ``max_workers``: threads that run the memory's work (the calls themselves wait as coroutines).
    ``auth``: bearer tokens the MemoryService requires (health and reflection stay open, for probes).
    ``credentials``: TLS (see auth.server_credentials); plaintext without."""
    server = MemoryServer(registry, limits, max_workers, auth)
    port = server.bind(address, credentials)
    if port == 0:
        server.stop()
        raise OSError(f"could not bind {address}: in use, or not an address of this machine")
    return server, port


def serve(
    address: str,
    registry: MemoryRegistry,
    limits: ServerLimits = ServerLimits(),
    max_workers: int = 16,
    metrics_port: int = 0,
    *,
    metrics_host: str = "127.0.0.1",
    auth: TokenAuth | None = None,
    credentials: grpc.ServerCredentials | None = None,
) -> None:
    """Run a server until SIGINT or SIGTERM; then stop accepting calls, let in-flight ones finish
    (10 s at most), snapshot every memory and close the logs.

    With a ``metrics_port`` (0: none), Prometheus metrics are served at /metrics on ``metrics_host``
    (default the loopback address, whatever ``address`` is: the metrics name every memory and need no token)."""
    # The event loop hands every call's work to a worker thread and back: a short GIL switch interval
    # (5 ms by default) lets each side take the GIL soon after the other is done (docs/benchmarks.md).
    sys.setswitchinterval(0.0005)
    server, port = build_server(address, registry, limits, max_workers, auth=auth, credentials=credentials)
    unix = address.startswith("unix:")  # a Unix domain socket: reached from this host only
    host = address.rsplit(":", 1)[0]
    if auth is None and not unix and not _is_loopback(host):
        log.warning("listening on %s without tokens: anyone who can reach it may read and write (see --tokens)", host)
    if metrics_port:  # before the gRPC server starts: a metrics port in use stops the start
        try:
            serve_metrics(metrics_host, metrics_port, registry)
        except OSError:
            server.stop()
            raise
        if not _is_loopback(metrics_host):
            log.warning("metrics on %s: anyone who can reach it may read every memory's name and stats", metrics_host)
    # Before the server says it serves: a signal sent as soon as it does must find these handlers, not the
    # default action (which ends the process without a snapshot).
    stopped = threading.Event()

    def stop(signum, frame):
        log.info("signal %d: stopping", signum)
        stopped.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    # A server that does not stop, or stalls, can be asked where each of its threads is: `kill -USR1 PID`.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    server.start()
    shown = address if unix else f"{host}:{port}"
    log.info("lifelong memory server listening on %s", shown)
    print(f"lmem: serving on {shown}", flush=True)
    if metrics_port:
        metrics_url = f"http://{format_address(metrics_host, metrics_port)}/metrics"
        log.info("metrics on %s", metrics_url)
        print(f"lmem: metrics on {metrics_url}", flush=True)
    stopped.wait()
    server.stop(grace=10)
    not_snapshotted = registry.close()
    if not_snapshotted:
        log.warning("stopped: no snapshot of %s; their logs are replayed at the next start", not_snapshotted)
    else:
        log.info("stopped: every memory snapshotted")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
