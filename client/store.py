"""One typed client for a memory store, embedded in this process or remote over gRPC.

    store = connect("local")                    # embedded: same process, same semantics
    store = connect("grpc://127.0.0.1:50051")   # remote

Both give a ``Store`` whose ``MemoryClient`` handles return the same
``QueryResult``; only the transport behind them differs.
"""

from __future__ import annotations

import dataclasses
import queue
import random
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from numbers import Integral
from pathlib import Path
from typing import Protocol

import grpc
import numpy as np
import torch

from lifelong_memory.server import wire
from lifelong_memory.server.cluster import ShardHealth, shard_health
from lifelong_memory.server.errors import (
    ERRORS_BY_CODE,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    MemoryServiceError,
)
from lifelong_memory.server.memory import (
    ALL_FIELDS,
    LabelSlots,
    MemoryConfig,
    MemoryReport,
    QueryResult,
    QueryTicket,
    RetrainResult,
    SlotsRead,
    UpdateResult,
    check_writer,
)
from lifelong_memory.server.persistence import (
    CHUNK_BYTES,
    SnapshotError,
    read_snapshot_file,
    snapshot_chunks,
    write_atomically,
)
from lifelong_memory.server.registry import MemoryRegistry, check_name
from lifelong_memory.server.service import DEFAULT_MAX_MESSAGE_BYTES
from lifelong_memory.v1 import memory_pb2 as pb
from lifelong_memory.v1 import memory_pb2_grpc as pb_grpc

DEFAULT_TIMEOUT = 30.0  # seconds: the deadline of each remote call unless connect() is given another
UNIX_SCHEME = "unix:"


@dataclass(frozen=True)
class MemoryInfo:
    name: str
    config: MemoryConfig
    stats: dict[str, int]
    recovery: str = ""  # what recovery at the server's last start cut or set aside; "" if nothing
    shards: list[ShardHealth] = dataclasses.field(default_factory=list)  # placed on a cluster: node and health
    # Bytes the memory holds at most per device ("cpu", "cuda:0"), as the server's memory budget counts them.
    footprint: dict[str, int] = dataclasses.field(default_factory=dict)


class Transport(Protocol):
    def create(self, name: str, config: dict) -> MemoryInfo: ...
    def get(self, name: str) -> MemoryInfo: ...
    def list(self) -> list[MemoryInfo]: ...
    def delete(self, name: str) -> None: ...
    def clear(self, name: str) -> MemoryInfo: ...
    def query(self, name: str, queries, labels, k, use_recent, update, fields, writer: str) -> QueryResult: ...
    def update(self, name: str, queries, labels, ticket: QueryTicket, writer: str) -> UpdateResult: ...
    def read_slots(self, name: str, slots: torch.Tensor) -> SlotsRead: ...
    def inspect(self, name: str, age_bins: int, top_labels: int) -> MemoryReport: ...
    def find_label(self, name: str, label: int) -> LabelSlots: ...
    def stream(self, name: str, writer: str): ...
    def snapshot(self, name: str) -> Snapshot: ...
    def retrain_index(self, name: str) -> RetrainResult: ...
    def export(self, name: str) -> Iterator[bytes]: ...
    def import_file(self, name: str, path: Path, overrides: dict) -> MemoryInfo: ...
    def close(self) -> None: ...


@dataclass(frozen=True)
class Snapshot:
    commit_sequence: int  # the state the snapshot holds
    path: str  # the file, on the server's machine
    bytes: int


class Store:
    """Administration of named memories, whichever transport is behind."""

    def __init__(self, transport: Transport):
        self._transport = transport

    def create_memory(self, name: str, *, writer: str = "", **config) -> MemoryClient:
        """Create a memory; ``config`` takes MemoryConfig's fields (key_dim, memory_size, choose_k, ...).
        ``writer``: the returned handle's writer tag (see ``memory``)."""
        info = self._transport.create(name, config)
        return MemoryClient(self._transport, info, writer)

    def memory(self, name: str, *, writer: str = "") -> MemoryClient:
        """A handle to an existing memory (NotFound otherwise). Every slot the handle's updates write or
        merge is tagged with ``writer`` (a trainer's or model's name; "" untagged): inspection shows who
        wrote what when several trainers share the memory."""
        return MemoryClient(self._transport, self._transport.get(name), writer)

    def list_memories(self) -> list[MemoryInfo]:
        return self._transport.list()

    def delete_memory(self, name: str) -> None:
        self._transport.delete(name)

    def export_memory(self, name: str, path: str | Path) -> int:
        """Write memory ``name`` to a portable file (the snapshot format), atomically; returns its size."""
        return write_atomically(Path(path), self._transport.export(name))

    def import_memory(self, name: str, path: str | Path, **overrides) -> MemoryClient:
        """A new memory ``name`` from an exported or snapshot file. ``overrides`` may set device, backend,
        search_dtype, shards and the approximate-search fields (lsh_*, ivf_*: a new ivf_lists or ivf_codes
        trains a new quantizer); what the memory holds comes from the file."""
        return MemoryClient(self._transport, self._transport.import_file(name, Path(path), overrides))

    def close(self) -> None:
        self._transport.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class MemoryClient:
    """One named memory: query, update, inspect."""

    def __init__(self, transport: Transport, info: MemoryInfo, writer: str = ""):
        self._transport = transport
        self.name = info.name
        self.config = info.config
        check_writer(writer)  # here, as the server would: a handle with a bad tag fails before its first update
        self.writer = writer

    def query(
        self,
        queries,
        labels=None,
        *,
        k: int | None = None,
        use_recent: bool = True,
        update: bool = False,
        fields: Iterable[str] = ALL_FIELDS,
    ) -> QueryResult:
        """Nearest neighbours of unit-length ``queries`` [B, D]; with ``update`` (and labels) also
        apply the memory update atomically. ``fields`` picks the optional result parts: neighbors,
        neighbor_keys, weights, positive_negative, positive_negative_keys."""
        return self._transport.query(
            self.name,
            _as_queries(queries),
            _as_labels(labels),
            _as_k(k),
            _as_flag(use_recent, "use_recent"),
            _as_flag(update, "update"),
            _as_fields(fields),
            self.writer,
        )

    def update(self, queries, labels, result: QueryResult) -> UpdateResult:
        """Two-phase update: apply ``labels`` to ``result``, an earlier query of these ``queries``."""
        if result.ticket is None:
            raise InvalidArgument("result", "has no ticket: query with labels first")
        return self._transport.update(self.name, _as_queries(queries), _as_labels(labels), result.ticket, self.writer)

    def stream(self):
        """A bidirectional stream for training loops: ``with mem.stream() as s: s.query(...)``."""
        return self._transport.stream(self.name, self.writer)

    def slots(self, slots) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(keys, values, ages) of the given slot ids (a sequence, tensor or range)."""
        read = self.read_slots(slots)
        return read.keys, read.values, read.ages

    def read_slots(self, slots) -> SlotsRead:
        """Keys, values, ages, generations and writer tags of the given slot ids, read in one state."""
        return self._transport.read_slots(self.name, _as_slots(slots))

    def inspect(self, *, age_bins: int = 10, top_labels: int = 10) -> MemoryReport:
        """Fill ratio, age histogram, label counts, key-norm sanity and write/merge counters."""
        return self._transport.inspect(self.name, age_bins, top_labels)

    def find_label(self, label: int) -> LabelSlots:
        """The slots holding ``label``, with their ages."""
        return self._transport.find_label(self.name, label)

    def clear(self) -> None:
        self._transport.clear(self.name)

    def snapshot(self) -> Snapshot:
        """Snapshot now into the server's data directory (FailedPrecondition without one)."""
        return self._transport.snapshot(self.name)

    def retrain_index(self) -> RetrainResult:
        """Train a faiss-ivf memory's quantizer anew on its keys as they are now, while queries and writes go
        on (docs/approximate-search.md); FailedPrecondition for other backends."""
        return self._transport.retrain_index(self.name)

    def info(self) -> MemoryInfo:
        return self._transport.get(self.name)


def connect(
    url: str = "local",
    *,
    data_dir: str | Path | None = None,
    token: str | None = None,
    ca_cert: str | None = None,
    client_cert: str | None = None,
    client_key: str | None = None,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    retries: int = 5,
    timeout: float | None = DEFAULT_TIMEOUT,
) -> Store:
    """``"local"`` for an embedded store; ``"grpc://host:port"`` for a server, ``"grpcs://host:port"`` over TLS,
    ``"unix:///path"`` for a server on this host listening on that Unix domain socket (the fastest way there).

    An embedded store keeps its memories in ``data_dir`` across runs, as a server does, when one is given.

    ``token`` is sent as ``authorization: Bearer <token>`` on every call. Over TLS, ``ca_cert`` (PEM
    path) verifies the server (default: the system's roots); ``client_cert`` and ``client_key`` are
    this client's certificate for servers that require mutual TLS. ``timeout`` (seconds, default 30; None:
    none) is the deadline of each call, an export or import being one call (DeadlineExceeded past it: a
    write may or may not have been applied, as with any write in flight when a connection fails); a
    QueryStream has none, since it lasts as long as its training loop.
    """
    if url == "local":
        return Store(LocalTransport(MemoryRegistry(data_dir=data_dir)))
    if data_dir is not None:
        raise ValueError("data_dir is for the embedded store; a server has its own (lmem serve --data-dir)")
    plain = url.startswith(("grpc://", UNIX_SCHEME))
    if plain and not (ca_cert or client_cert or client_key):
        credentials = None
    elif url.startswith("grpcs://"):
        if bool(client_cert) != bool(client_key):
            raise ValueError("client_cert and client_key go together")
        credentials = grpc.ssl_channel_credentials(
            root_certificates=_read(ca_cert), private_key=_read(client_key), certificate_chain=_read(client_cert)
        )
    elif plain:
        raise ValueError("TLS options need a grpcs:// url")
    else:
        raise ValueError(f"url must be 'local', 'grpc://host:port', 'grpcs://host:port' or 'unix:///path', got {url!r}")
    # gRPC reads a Unix socket's url as it is (unix:///absolute or unix:relative).
    target = url if url.startswith(UNIX_SCHEME) else url.split("://", 1)[1]
    if not url.startswith(UNIX_SCHEME):
        _check_port(target, url)
    return Store(GrpcTransport(target, credentials, token, max_message_bytes, retries, timeout))


def _check_port(target: str, url: str) -> None:
    """gRPC would dial port 99999 as 34463, and a token sent there would go to whoever listens."""
    host, colon, port = target.rpartition(":")
    if not (colon and host and port.isdigit() and 1 <= int(port) <= 65535):
        raise ValueError(f"url {url!r}: give host:port, the port in [1, 65535]")


def _read(path: str | None) -> bytes | None:
    if path is None:
        return None
    with open(path, "rb") as f:
        return f.read()


def _as_k(k) -> int:
    """A query's k as the wire carries it (0: the memory's choose_k); the memory checks it against its size."""
    if k is None:
        return 0
    if isinstance(k, bool) or not isinstance(k, Integral):
        raise InvalidArgument("k", f"must be an integer, got {k!r}")
    if not 0 <= k < 1 << 63:
        raise InvalidArgument("k", f"must be in [0, 2^63), got {k}")
    return int(k)


def _as_flag(value, field: str) -> bool:
    if not isinstance(value, (bool, np.bool_)):  # a string such as "no" would be true
        raise InvalidArgument(field, f"must be True or False, got {value!r}")
    return bool(value)


def _as_tensor(value, field: str) -> torch.Tensor:
    """A tensor of what the caller passed (a tensor, an array, nested lists), or InvalidArgument naming it."""
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, np.ndarray) and any(stride < 0 for stride in value.strides):
        value = np.ascontiguousarray(value)  # np.flip, a[::-1]: torch takes no negative strides
    try:
        return torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError, OverflowError) as exc:
        raise InvalidArgument(field, f"must be an array of numbers: {exc}") from None


def _as_fields(fields) -> frozenset[str]:
    try:
        return frozenset(fields)
    except TypeError:
        raise InvalidArgument("fields", f"must be a set of result field names, got {fields!r}") from None


def _as_queries(queries) -> torch.Tensor:
    q = _as_tensor(queries, "queries")
    return q.float() if q.is_floating_point() and q.dtype != torch.float32 else q


def _as_labels(labels) -> torch.Tensor | None:
    if labels is None:
        return None
    y = _as_tensor(labels, "labels")
    if y.dtype == torch.bool:  # not a label: a mask passed by mistake
        raise InvalidArgument("labels", "must be integers, got bool")
    return y.long() if not y.is_floating_point() and y.dtype != torch.int64 else y


def _as_slots(slots) -> torch.Tensor:
    """Slot ids as int64, refusing what would be rounded or wrapped into another slot (0.7, True, 2^64)."""
    if not isinstance(slots, torch.Tensor):
        try:
            slots = list(slots)  # a range, a generator
        except TypeError:
            raise InvalidArgument("slots", f"must be a sequence of slot ids, got {slots!r}") from None
    ids = _as_tensor(slots, "slots")
    if ids.numel() == 0:
        return ids.long()
    if ids.dtype == torch.bool or ids.is_floating_point() or ids.is_complex():
        raise InvalidArgument("slots", f"must be integer slot ids, got {ids.dtype}")
    return ids.long()


def _info(name: str, memory) -> MemoryInfo:
    return MemoryInfo(
        name, memory.config, memory.stats(), memory.recovery_report, shard_health(memory), memory.footprint()
    )


# --------------------------------------------------------------------- local


class _Closed:
    """What a closed store's transport calls: every use is FailedPrecondition, in process or remote alike."""

    def __getattr__(self, name):
        raise FailedPrecondition("store: closed (its with block ended, or close() was called); connect again")


class LocalTransport:
    """The memory in this process: calls the memory core directly."""

    def __init__(self, registry: MemoryRegistry):
        self.registry = registry

    def create(self, name, config):
        return _info(name, self.registry.create(name, **config))

    def get(self, name):
        return _info(name, self.registry.get(name))

    def list(self):
        return [_info(name, memory) for name, memory in self.registry.list()]

    def delete(self, name):
        self.registry.delete(name)

    def clear(self, name):
        memory = self.registry.get(name)
        memory.clear()
        return _info(name, memory)

    # Query, Update and ReadSlots name their memory in a field called "memory".
    def query(self, name, queries, labels, k, use_recent, update, fields, writer):
        memory = self.registry.get(name, "memory")
        return memory.query(queries, labels, k=k, use_recent=use_recent, update=update, fields=fields, writer=writer)

    def update(self, name, queries, labels, ticket, writer):
        return self.registry.get(name, "memory").update(queries, labels, ticket, writer)

    def read_slots(self, name, slots):
        return self.registry.get(name, "memory").read_slots(slots)

    def inspect(self, name, age_bins, top_labels):
        return self.registry.get(name, "memory").inspect(age_bins, top_labels)

    def find_label(self, name, label):
        return self.registry.get(name, "memory").find_label(label)

    def stream(self, name, writer):
        return _LocalStream(self, name, writer)

    def snapshot(self, name):
        return Snapshot(*self.registry.snapshot(name))

    def retrain_index(self, name):
        return self.registry.retrain_index(name)

    def export(self, name):
        return snapshot_chunks(self.registry.get(name).capture(streamed=True))

    def import_file(self, name, path, overrides):
        check_name(name)
        try:
            state = read_snapshot_file(path, lambda config: self.registry.import_config(name, config, overrides))
        except SnapshotError as exc:
            raise InvalidArgument("data", str(exc)) from None
        return _info(name, self.registry.import_state(name, state, **overrides))

    def close(self):
        if not isinstance(self.registry, _Closed):  # closing twice is closing once
            self.registry.close()
            self.registry = _Closed()


class _LocalStream:
    def __init__(self, transport: LocalTransport, name: str, writer: str):
        self._transport, self._name, self._writer = transport, name, writer

    def query(self, queries, labels=None, *, k=None, use_recent=True, update=False, fields=ALL_FIELDS):
        return self._transport.query(
            self._name,
            _as_queries(queries),
            _as_labels(labels),
            _as_k(k),
            _as_flag(use_recent, "use_recent"),
            _as_flag(update, "update"),
            _as_fields(fields),
            self._writer,
        )

    def close(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ---------------------------------------------------------------------- gRPC


def _raise_from(error: grpc.RpcError):
    """Raise the library's own error for a gRPC status, so local and remote fail alike."""
    code, message = error.code(), error.details() or ""
    cls = ERRORS_BY_CODE.get(code.name)
    if cls is InvalidArgument:
        field, _, rest = message.partition(": ")
        raise InvalidArgument(field, rest) from None
    if cls is None:
        exc = MemoryServiceError(f"{code.name}: {message}")
        exc.code = code.name
        raise exc from None
    raise cls(message) from None


class _BearerToken(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds ``authorization: Bearer <token>`` to every call (also over plain channels, unlike call credentials)."""

    def __init__(self, token: str):
        self._metadata = (("authorization", f"Bearer {token}"),)

    def _details(self, details):
        return details._replace(metadata=tuple(details.metadata or ()) + self._metadata)

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._details(details), request)

    intercept_unary_stream = intercept_stream_unary = intercept_stream_stream = intercept_unary_unary


class GrpcTransport:
    """A MemoryService server, reached over one channel."""

    def __init__(
        self,
        target: str,
        credentials: grpc.ChannelCredentials | None,
        token: str | None,
        max_message_bytes: int,
        retries: int,
        timeout: float | None,
    ):
        options = [
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
        ]
        if credentials is None:
            self.channel = grpc.insecure_channel(target, options=options)
        else:
            self.channel = grpc.secure_channel(target, credentials, options=options)
        channel = self.channel if token is None else grpc.intercept_channel(self.channel, _BearerToken(token))
        self.stub = pb_grpc.MemoryServiceStub(channel)
        self.target = target
        self.retries = retries
        self.timeout = timeout

    def _raise_from(self, error: grpc.RpcError):
        if error.code() == grpc.StatusCode.DEADLINE_EXCEEDED and self.timeout is not None:
            raise DeadlineExceeded(
                f"no answer from {self.target} within the deadline of {self.timeout:g} s (connect(timeout=...), "
                "lmem --timeout); a write may or may not have been applied"
            ) from None
        _raise_from(error)

    def _call(self, method, request, *, idempotent: bool):
        """One RPC; idempotent ones retry on UNAVAILABLE with jittered exponential backoff."""
        attempts = self.retries + 1 if idempotent else 1
        attempt = 0
        while True:
            try:
                return method(request, timeout=self.timeout)
            except grpc.RpcError as error:
                attempt += 1
                if error.code() != grpc.StatusCode.UNAVAILABLE or attempt >= attempts:
                    self._raise_from(error)
                time.sleep(min(2.0, 0.05 * 2**attempt) * (0.5 + random.random()))

    @staticmethod
    def _info(message: pb.MemoryInfo) -> MemoryInfo:
        config = MemoryConfig(**wire.config_from_proto(message.config))
        stats = {f.name: getattr(message.stats, f.name) for f in message.stats.DESCRIPTOR.fields}
        shards = [ShardHealth(**{f.name: getattr(s, f.name) for f in s.DESCRIPTOR.fields}) for s in message.shards]
        return MemoryInfo(message.name, config, stats, message.recovery, shards, dict(message.footprint_bytes))

    def create(self, name, config):
        message = pb.CreateMemoryRequest(name=name, config=_config_message(config))
        return self._info(self._call(self.stub.CreateMemory, message, idempotent=False))

    def get(self, name):
        return self._info(self._call(self.stub.GetMemory, pb.GetMemoryRequest(name=name), idempotent=True))

    def list(self):
        response = self._call(self.stub.ListMemories, pb.ListMemoriesRequest(), idempotent=True)
        return [self._info(m) for m in response.memories]

    def delete(self, name):
        self._call(self.stub.DeleteMemory, pb.DeleteMemoryRequest(name=name), idempotent=False)

    def clear(self, name):
        return self._info(self._call(self.stub.ClearMemory, pb.ClearMemoryRequest(name=name), idempotent=False))

    def query(self, name, queries, labels, k, use_recent, update, fields, writer):
        request = query_request(name, queries, labels, k, use_recent, update, fields, writer)
        return wire.result_from_proto(self._call(self.stub.Query, request, idempotent=not update))

    def update(self, name, queries, labels, ticket, writer):
        request = pb.UpdateRequest(memory=name, ticket=wire.ticket_to_proto(ticket), writer=writer)
        _fill(request.queries, queries, "queries")
        _fill(request.labels, labels, "labels")
        response = self._call(self.stub.Update, request, idempotent=False)
        return UpdateResult(
            response.commit_sequence,
            wire.decode_array(response.written_slots, "written_slots", pb.INT64, 1),
            wire.decode_array(response.incorrect, "incorrect", pb.BOOL, 1),
            response.revalidated_rows,
        )

    def read_slots(self, name, slots):
        request = pb.ReadSlotsRequest(memory=name, slots=wire.encode_array(slots))
        return wire.slots_from_proto(self._call(self.stub.ReadSlots, request, idempotent=True))

    def inspect(self, name, age_bins, top_labels):
        request = pb.InspectMemoryRequest(memory=name)
        _set_field(request, "age_bins", age_bins)
        _set_field(request, "top_labels", top_labels)
        return wire.report_from_proto(self._call(self.stub.InspectMemory, request, idempotent=True))

    def find_label(self, name, label):
        request = pb.FindLabelRequest(memory=name)
        _set_field(request, "label", label)
        return wire.label_slots_from_proto(self._call(self.stub.FindLabel, request, idempotent=True))

    def stream(self, name, writer):
        return _GrpcStream(self, name, writer)

    def snapshot(self, name):
        response = self._call(self.stub.SnapshotMemory, pb.SnapshotMemoryRequest(name=name), idempotent=False)
        return Snapshot(response.commit_sequence, response.path, response.bytes)

    def retrain_index(self, name):
        response = self._call(self.stub.RetrainIndex, pb.RetrainIndexRequest(name=name), idempotent=False)
        return RetrainResult(response.commit_sequence, response.rewritten_slots, response.seconds)

    def export(self, name):
        try:
            for chunk in self.stub.ExportMemory(pb.ExportMemoryRequest(name=name), timeout=self.timeout):
                yield chunk.data
        except grpc.RpcError as error:
            self._raise_from(error)

    def import_file(self, name, path, overrides):
        header = pb.ImportHeader(name=name, config=_config_message(overrides))

        with open(path, "rb") as file:  # opened here, so a missing file fails before the call

            def messages():
                yield pb.ImportMemoryRequest(header=header)
                while chunk := file.read(CHUNK_BYTES):
                    yield pb.ImportMemoryRequest(data=chunk)

            return self._info(self._call(self.stub.ImportMemory, messages(), idempotent=False))

    def close(self):
        self.channel.close()
        self.stub = _Closed()


def query_request(name, queries, labels, k, use_recent, update, fields, writer) -> pb.QueryRequest:
    unknown = set(fields) - set(wire.RESULT_FIELD_IDS)
    if unknown:
        raise InvalidArgument("fields", f"unknown {sorted(unknown)}; known: {sorted(wire.RESULT_FIELD_IDS)}")
    request = pb.QueryRequest(
        memory=name,
        k=k,
        use_recent=use_recent,
        update=update,
        fields=sorted(wire.RESULT_FIELD_IDS[f] for f in fields),
        writer=writer,
    )
    _fill(request.queries, queries, "queries")
    if labels is not None:
        _fill(request.labels, labels, "labels")
    return request


def _fill(message: pb.Array, x: torch.Tensor, field: str) -> None:
    try:
        wire.fill_array(message, x)
    except TypeError as exc:
        raise InvalidArgument(field, str(exc)) from None


def _set_field(message, name: str, value) -> None:
    """Set a scalar request field; a value of the wrong type or range is the caller's InvalidArgument."""
    if isinstance(value, bool):  # protobuf would take it as 0 or 1
        raise InvalidArgument(name, f"must be an integer, got {value!r}")
    try:
        setattr(message, name, value)
    except (TypeError, ValueError) as exc:
        raise InvalidArgument(name, f"got {value!r}: {exc}") from None


def _config_message(config: dict) -> pb.MemoryConfig:
    unknown = set(config) - {f.name for f in dataclasses.fields(MemoryConfig)}
    if unknown:
        raise InvalidArgument("config", f"unknown fields {sorted(unknown)}")
    message = pb.MemoryConfig()
    plain = (
        *("key_dim", "memory_size", "choose_k", "correct_in_top", "seed", "shards", "alpha", "device", "age_noise"),
        *("lsh_tables", "lsh_bits", "lsh_probes", "ivf_lists", "ivf_probes", "ivf_codes", "ivf_quantizer"),
        "placement",
    )
    for name in plain:
        if name in config:
            try:
                setattr(message, name, config[name])
            except (TypeError, ValueError) as exc:  # wrong type, or out of the field's range
                raise InvalidArgument(f"config.{name}", f"got {config[name]!r}: {exc}") from None
    for name, numbers in (("backend", wire.BACKENDS), ("search_dtype", wire.SEARCH_DTYPES)):
        if name in config:
            by_name = {v: k for k, v in numbers.items()}
            if config[name] not in by_name:
                raise InvalidArgument(f"config.{name}", f"must be one of {sorted(by_name)}, got {config[name]!r}")
            setattr(message, name, by_name[config[name]])
    if "devices" in config:
        devices = config["devices"]
        if isinstance(devices, str) or not all(isinstance(d, str) for d in devices):
            raise InvalidArgument("config.devices", f"must be a list of device strings, got {devices!r}")
        message.devices.extend(devices)
    return message


class _GrpcStream:
    """Request/response pairs over one QueryStream call: one round trip per query, no per-call setup.

    A query finding the call ended (the server closed it as idle, or it failed) opens a new one first:
    nothing was sent on the old call, so nothing is repeated. Replies are paired with requests by their
    order, so a query interrupted between its request and its reply (KeyboardInterrupt, a timeout signal)
    ends the call: its reply, should it come, is never taken for the next query's; and queries from several
    threads take turns, each round trip whole (a MemoryModule shared by threads shares its stream)."""

    _CLOSE = object()

    def __init__(self, transport: GrpcTransport, name: str, writer: str):
        self._transport = transport
        self._name = name
        self._writer = writer
        self._turn = threading.Lock()
        self._open()

    def _open(self) -> None:
        self._requests: queue.SimpleQueue = queue.SimpleQueue()
        self._responses = self._transport.stub.QueryStream(iter(self._requests.get, self._CLOSE))

    def query(self, queries, labels=None, *, k=None, use_recent=True, update=False, fields=ALL_FIELDS):
        request = query_request(
            self._name,
            _as_queries(queries),
            _as_labels(labels),
            _as_k(k),
            _as_flag(use_recent, "use_recent"),
            _as_flag(update, "update"),
            _as_fields(fields),
            self._writer,
        )
        with self._turn:
            if self._responses.done():
                self._requests.put(self._CLOSE)  # ends the old call's request reader
                self._open()
            self._requests.put(request)
            try:
                reply = next(self._responses)
            except grpc.RpcError as error:
                self._requests.put(self._CLOSE)  # the call ended: so does the thread feeding it requests
                _raise_from(error)
            except BaseException:
                self.close()
                raise
        return wire.result_from_proto(reply)

    def close(self):
        self._requests.put(self._CLOSE)
        self._responses.cancel()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
