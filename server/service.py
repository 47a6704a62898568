"""The gRPC server: MemoryService v1 over a MemoryRegistry, plus health and reflection."""

from __future__ import annotations

import functools
import ipaddress
import logging
import signal
import tempfile
import threading
from concurrent import futures
from dataclasses import dataclass

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from lifelong_memory.server import wire
from lifelong_memory.server.auth import TokenAuth
from lifelong_memory.server.errors import InvalidArgument, MemoryServiceError, ResourceExhausted
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


# What a read-only token may call (Query and QueryStream only without update); everything else writes.
READ_METHODS = frozenset(
    {"GetMemory", "ListMemories", "ReadSlots", "InspectMemory", "FindLabel", "ExportMemory", "Query", "QueryStream"}
)


def _rpc(method):
    """Checks the caller's token, and turns the memory's errors into gRPC statuses;
    the memory is untouched when one is raised."""
    writes = method.__name__ not in READ_METHODS

    @functools.wraps(method)
    def wrapper(self, request, context):
        try:
            self._authorize(context, writes or bool(getattr(request, "update", False)))
            return method(self, request, context)
        except MemoryServiceError as exc:
            context.abort(getattr(grpc.StatusCode, exc.code), str(exc))

    return wrapper


class MemoryServicer(pb_grpc.MemoryServiceServicer):
    def __init__(self, registry: MemoryRegistry, limits: ServerLimits = ServerLimits(), auth: TokenAuth | None = None):
        self.registry = registry
        self.limits = limits
        self.auth = auth

    def _authorize(self, context, write: bool) -> None:
        if self.auth is not None:
            self.auth.authorize(context.invocation_metadata(), write)

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

    def QueryStream(self, request_iterator, context):
        try:
            self._authorize(context, write=False)
            for request in request_iterator:
                if request.update:
                    self._authorize(context, write=True)
                yield self._query(request)
        except MemoryServiceError as exc:
            context.abort(getattr(grpc.StatusCode, exc.code), str(exc))

    @_rpc
    def Update(self, request, context):
        memory = self.registry.get(request.memory, "memory")
        queries, labels = self._batch(request, memory, labels_required=True)
        if not request.HasField("ticket"):
            raise InvalidArgument("ticket", "required: pass the ticket of the query being updated")
        result = memory.update(queries, labels, wire.ticket_from_proto(request.ticket))
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
        per_slot = memory.config.key_dim * 4 + 8 + 4 + 8 + 8
        if len(slots) * per_slot > self.limits.max_message_bytes - 1024:
            most = (self.limits.max_message_bytes - 1024) // per_slot
            raise InvalidArgument(selection, f"{len(slots)} slots exceed one message ({most} at most); read in pages")
        sequence, keys, values, ages, generations = memory.read_slots(slots)
        return pb.ReadSlotsResponse(
            commit_sequence=sequence,
            slots=wire.encode_array(slots),
            keys=wire.encode_array(keys),
            values=wire.encode_array(values),
            ages=wire.encode_array(ages),
            generations=wire.encode_array(generations),
        )

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
    def SnapshotMemory(self, request, context):
        sequence, path, size = self.registry.snapshot(request.name)
        log.info("memory %r: snapshot at %d, %d bytes", request.name, sequence, size)
        return pb.SnapshotMemoryResponse(commit_sequence=sequence, path=str(path), bytes=size)

    @_rpc
    def ExportMemory(self, request, context):
        state = self.registry.get(request.name).capture()
        return (pb.FileChunk(data=chunk) for chunk in snapshot_chunks(state))

    @_rpc
    def ImportMemory(self, request_iterator, context):
        first = next(request_iterator, None)
        if first is None or first.WhichOneof("part") != "header":
            raise InvalidArgument("header", "the first message must be the header naming the new memory")
        name = first.header.name
        check_name(name, "header.name")
        overrides = wire.config_from_proto(first.header.config)
        with tempfile.SpooledTemporaryFile(max_size=self.limits.max_message_bytes) as file:
            for message in request_iterator:
                if message.WhichOneof("part") != "data":
                    raise InvalidArgument("data", "only file chunks may follow the header")
                file.write(message.data)
                if file.tell() > self.registry.memory_budget_bytes:
                    raise ResourceExhausted(
                        f"data: the file exceeds this server's memory budget of {self.registry.memory_budget_bytes} "
                        "bytes"
                    )
            file.seek(0)
            try:
                state = read_snapshot(file)
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
                f"fields: the reply to {len(queries)} rows with k = {k} and fields {sorted(request.fields)} would "
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
            name=name, config=wire.config_to_proto(memory.config), stats=pb.MemoryStats(**memory.stats())
        )


def build_server(
    address: str,
    registry: MemoryRegistry,
    limits: ServerLimits = ServerLimits(),
    max_workers: int = 16,
    *,
    auth: TokenAuth | None = None,
    credentials: grpc.ServerCredentials | None = None,
) -> tuple[grpc.Server, int]:
    """A server bound to ``address``, not yet started, and the port it bound.

    ``auth``: bearer tokens the MemoryService requires (health and reflection stay open, for probes).
    ``credentials``: TLS (see auth.server_credentials); plaintext without."""
    options = [
        ("grpc.max_send_message_length", limits.max_message_bytes),
        ("grpc.max_receive_message_length", limits.max_message_bytes),
        ("grpc.so_reuseport", 0),  # a second server on a port in use must fail, not share its traffic
    ]
    # RpcObserver first, outermost: request ids, logs and metrics cover every call, rejected ones too.
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers), interceptors=[RpcObserver()], options=options
    )
    pb_grpc.add_MemoryServiceServicer_to_server(MemoryServicer(registry, limits, auth), server)
    health_servicer = health.HealthServicer()
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_servicer.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server
    )
    try:
        port = (
            server.add_insecure_port(address) if credentials is None else server.add_secure_port(address, credentials)
        )
    except RuntimeError:  # grpc's way of saying the address is in use or not ours
        port = 0
    if port == 0:
        raise OSError(f"could not bind {address}: in use, or not an address of this machine")
    return server, port


def serve(
    address: str,
    registry: MemoryRegistry,
    limits: ServerLimits = ServerLimits(),
    max_workers: int = 16,
    metrics_port: int = 0,
    *,
    auth: TokenAuth | None = None,
    credentials: grpc.ServerCredentials | None = None,
) -> None:
    """Run a server until SIGINT or SIGTERM; then stop accepting calls, let in-flight ones finish
    (10 s at most), snapshot every memory and close the logs.

    With a ``metrics_port`` (0: none), Prometheus metrics are served at /metrics on the same host."""
    server, port = build_server(address, registry, limits, max_workers, auth=auth, credentials=credentials)
    host = address.rsplit(":", 1)[0]
    if auth is None and not _is_loopback(host):
        log.warning("listening on %s without tokens: anyone who can reach it may read and write (see --tokens)", host)
    if metrics_port:  # before the gRPC server starts: a metrics port in use stops the start
        serve_metrics(host, metrics_port, registry)
    server.start()
    log.info("lifelong memory server listening on %s:%d", host, port)
    print(f"lmem: serving on {host}:{port}", flush=True)
    if metrics_port:
        log.info("metrics on http://%s:%d/metrics", host, metrics_port)
        print(f"lmem: metrics on http://{host}:{metrics_port}/metrics", flush=True)
    stopped = threading.Event()

    def stop(signum, frame):
        log.info("signal %d: stopping", signum)
        stopped.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    stopped.wait()
    server.stop(grace=10).wait()
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
