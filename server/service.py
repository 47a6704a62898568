"""The gRPC server: MemoryService v1 over a MemoryRegistry, plus health and reflection."""

from __future__ import annotations

import functools
import logging
import signal
import threading
from concurrent import futures
from dataclasses import dataclass

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from lifelong_memory.server import wire
from lifelong_memory.server.errors import InvalidArgument, MemoryServiceError
from lifelong_memory.server.memory import Memory
from lifelong_memory.server.registry import MemoryRegistry
from lifelong_memory.v1 import memory_pb2 as pb
from lifelong_memory.v1 import memory_pb2_grpc as pb_grpc

log = logging.getLogger("lifelong_memory.server")
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["MemoryService"].full_name
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class ServerLimits:
    max_batch: int = 4096
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES


def _rpc(method):
    """Turns the memory's errors into gRPC statuses; the memory is untouched when one is raised."""

    @functools.wraps(method)
    def wrapper(self, request, context):
        try:
            return method(self, request, context)
        except MemoryServiceError as exc:
            context.abort(getattr(grpc.StatusCode, exc.code), str(exc))

    return wrapper


class MemoryServicer(pb_grpc.MemoryServiceServicer):
    def __init__(self, registry: MemoryRegistry, limits: ServerLimits = ServerLimits()):
        self.registry = registry
        self.limits = limits

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
        for request in request_iterator:
            try:
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

    # ---------------------------------------------------------------- helpers

    def _query(self, request: pb.QueryRequest) -> pb.QueryResponse:
        memory = self.registry.get(request.memory, "memory")
        queries, labels = self._batch(request, memory, labels_required=request.update)
        unknown = [f for f in request.fields if f not in wire.RESULT_FIELDS]
        if unknown:
            raise InvalidArgument("fields", f"unknown result fields {unknown}")
        result = memory.query(
            queries,
            labels,
            k=request.k,
            use_recent=request.use_recent if request.HasField("use_recent") else True,
            update=request.update,
            fields={wire.RESULT_FIELDS[f] for f in request.fields},
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
) -> tuple[grpc.Server, int]:
    """A server bound to ``address``, not yet started, and the port it bound."""
    options = [
        ("grpc.max_send_message_length", limits.max_message_bytes),
        ("grpc.max_receive_message_length", limits.max_message_bytes),
    ]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers), options=options)
    pb_grpc.add_MemoryServiceServicer_to_server(MemoryServicer(registry, limits), server)
    health_servicer = health.HealthServicer()
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_servicer.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server
    )
    port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"could not bind {address}")
    return server, port


def serve(
    address: str = "127.0.0.1:50051",
    defaults: dict | None = None,
    limits: ServerLimits = ServerLimits(),
    max_memories: int = 64,
    max_workers: int = 16,
) -> None:
    """Run a server until SIGINT or SIGTERM, then stop accepting and let in-flight calls finish."""
    registry = MemoryRegistry(defaults, max_memories=max_memories)
    server, port = build_server(address, registry, limits, max_workers)
    server.start()
    host = address.rsplit(":", 1)[0]
    log.info("lifelong memory server listening on %s:%d", host, port)
    print(f"lmem: serving on {host}:{port}", flush=True)
    stopped = threading.Event()

    def stop(signum, frame):
        log.info("signal %d: stopping", signum)
        stopped.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    stopped.wait()
    server.stop(grace=10).wait()
