"""Translation between the v1 protocol messages and the memory's Python types.

Arrays travel as raw little-endian bytes with dtype and shape. Decoding checks
dtype, shape and byte length, and raises InvalidArgument naming the field.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch

from lifelong_memory.server.errors import InvalidArgument
from lifelong_memory.server.memory import (
    FIELDS,
    LabelSlots,
    MemoryConfig,
    MemoryReport,
    QueryResult,
    QueryTicket,
    SlotsRead,
    WriterReport,
)
from lifelong_memory.v1 import memory_pb2 as pb

NUMPY_DTYPES = {pb.FLOAT32: np.dtype("<f4"), pb.INT64: np.dtype("<i8"), pb.BOOL: np.dtype("?")}
WIRE_DTYPES = {np.dtype("float32"): pb.FLOAT32, np.dtype("int64"): pb.INT64, np.dtype("bool"): pb.BOOL}
BACKENDS = {pb.TORCH: "torch", pb.FAISS: "faiss", pb.LSH: "lsh", pb.FAISS_IVF: "faiss-ivf"}
SEARCH_DTYPES = {pb.SEARCH_FLOAT32: "float32", pb.SEARCH_BFLOAT16: "bfloat16"}
RESULT_FIELDS = {
    pb.NEIGHBORS: "neighbors",
    pb.NEIGHBOR_KEYS: "neighbor_keys",
    pb.WEIGHTS: "weights",
    pb.POSITIVE_NEGATIVE: "positive_negative",
    pb.POSITIVE_NEGATIVE_KEYS: "positive_negative_keys",
}
RESULT_FIELD_IDS = {name: number for number, name in RESULT_FIELDS.items()}
# Result tensors that travel, by proto field name (the same as QueryResult's).
RESULT_ARRAYS = ("predictions", "incorrect", "written_slots") + tuple(a for part in FIELDS.values() for a in part)
# MemoryReport's list fields travel as int64 Arrays; the others are scalars of the same name.
REPORT_ARRAYS = ("age_bin_edges", "age_counts", "top_labels", "top_label_counts")


def encode_array(x) -> pb.Array:
    """A numpy array or torch tensor as an Array message."""
    message = pb.Array()
    fill_array(message, x)
    return message


def fill_array(message: pb.Array, x) -> None:
    """Writes ``x`` into an Array field of a message being built, without copying a finished Array into it
    (CopyFrom copies the data again: at B = 256 a fused reply's arrays are 0.5 MB)."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    x = np.asarray(x)
    wire = WIRE_DTYPES.get(x.dtype)
    if wire is None:
        raise TypeError(f"no wire dtype for {x.dtype}")
    message.dtype = wire
    message.shape[:] = x.shape
    message.data = np.ascontiguousarray(x, dtype=NUMPY_DTYPES[wire]).tobytes()


def decode_array(message: pb.Array, field: str, dtype: int, ndim: int | None = None) -> torch.Tensor:
    """An Array message as a CPU tensor, checked against the expected dtype and rank."""
    if message.dtype != dtype:
        got = pb.DType.Name(message.dtype) if message.dtype in pb.DType.values() else message.dtype
        raise InvalidArgument(field, f"dtype must be {pb.DType.Name(dtype)}, got {got}")
    shape = tuple(message.shape)
    if ndim is not None and len(shape) != ndim:
        raise InvalidArgument(field, f"must have {ndim} dimensions, got shape {list(shape)}")
    if any(n < 0 for n in shape):
        raise InvalidArgument(field, f"negative dimension in shape {list(shape)}")
    numpy_dtype = NUMPY_DTYPES[dtype]
    # math.prod, not np.prod: int64 products of huge dimensions wrap around (2^32 * 2^32 == 0).
    expected_bytes = math.prod(shape) * numpy_dtype.itemsize
    if len(message.data) != expected_bytes:
        raise InvalidArgument(
            field, f"data holds {len(message.data)} bytes; shape {list(shape)} needs {expected_bytes}"
        )
    array = np.frombuffer(message.data, dtype=numpy_dtype).reshape(shape)
    # frombuffer is read-only; torch wants a writable array.
    return torch.from_numpy(array.astype(numpy_dtype.newbyteorder("="), copy=True))


def config_to_proto(config: MemoryConfig) -> pb.MemoryConfig:
    return pb.MemoryConfig(
        key_dim=config.key_dim,
        memory_size=config.memory_size,
        choose_k=config.choose_k,
        alpha=config.alpha,
        age_noise=config.age_noise,
        correct_in_top=config.correct_in_top,
        seed=config.seed,
        device=config.device,
        search_dtype={v: k for k, v in SEARCH_DTYPES.items()}[config.search_dtype],
        backend={v: k for k, v in BACKENDS.items()}[config.backend],
        shards=config.shards,
        devices=config.devices,
        lsh_tables=config.lsh_tables,
        lsh_bits=config.lsh_bits,
        lsh_probes=config.lsh_probes,
        ivf_lists=config.ivf_lists,
        ivf_probes=config.ivf_probes,
        ivf_codes=config.ivf_codes,
        ivf_quantizer=config.ivf_quantizer,
        placement=config.placement,
    )


def config_from_proto(message: pb.MemoryConfig) -> dict:
    """The fields a create request sets; unset ones are left to the server's defaults."""
    config = {}
    for name in (
        "key_dim",
        "memory_size",
        "choose_k",
        "correct_in_top",
        "seed",
        "shards",
        "alpha",
        "age_noise",
        "device",
        "lsh_tables",
        "lsh_bits",
        "lsh_probes",
        "ivf_lists",
        "ivf_probes",
        "ivf_codes",
        "ivf_quantizer",
        "placement",
    ):
        if message.HasField(name):
            config[name] = getattr(message, name)
    for name, names in (("backend", BACKENDS), ("search_dtype", SEARCH_DTYPES)):
        if message.HasField(name):
            number = getattr(message, name)
            if number not in names:
                raise InvalidArgument(f"config.{name}", f"unknown value {number}; known: {sorted(names.values())}")
            config[name] = names[number]
    if message.devices:  # empty: unset (every shard on device, or an import keeps the file's)
        config["devices"] = tuple(message.devices)
    return config


def ticket_to_proto(ticket: QueryTicket) -> pb.QueryTicket:
    return pb.QueryTicket(
        relied_slots=encode_array(ticket.relied_slots),
        relied_generations=encode_array(ticket.relied_generations),
        k=ticket.k,
        use_recent=ticket.use_recent,
        memory_incarnation=ticket.incarnation,
    )


def ticket_from_proto(message: pb.QueryTicket) -> QueryTicket:
    return QueryTicket(
        relied_slots=decode_array(message.relied_slots, "ticket.relied_slots", pb.INT64, 2),
        relied_generations=decode_array(message.relied_generations, "ticket.relied_generations", pb.INT64, 2),
        k=int(message.k),
        use_recent=bool(message.use_recent),
        incarnation=int(message.memory_incarnation),
    )


def result_to_proto(result: QueryResult) -> pb.QueryResponse:
    response = pb.QueryResponse(commit_sequence=result.commit_sequence)
    for name in RESULT_ARRAYS:
        value = getattr(result, name)
        if value is not None:
            fill_array(getattr(response, name), value)
    if result.ticket is not None:
        response.ticket.CopyFrom(ticket_to_proto(result.ticket))
    return response


def result_from_proto(message: pb.QueryResponse) -> QueryResult:
    arrays = {}
    for name in RESULT_ARRAYS:
        if message.HasField(name):
            part = getattr(message, name)
            arrays[name] = decode_array(part, name, part.dtype)
    ticket = ticket_from_proto(message.ticket) if message.HasField("ticket") else None
    return QueryResult(commit_sequence=message.commit_sequence, ticket=ticket, **arrays)


def report_to_proto(report: MemoryReport) -> pb.MemoryReport:
    fields = dataclasses.asdict(report)
    for name in REPORT_ARRAYS:
        fields[name] = encode_array(np.asarray(fields[name], dtype=np.int64))
    fields["writers"] = [pb.WriterReport(**w) for w in fields["writers"]]
    return pb.MemoryReport(**fields)


def report_from_proto(message: pb.MemoryReport) -> MemoryReport:
    fields = {f.name: getattr(message, f.name) for f in dataclasses.fields(MemoryReport)}
    for name in REPORT_ARRAYS:
        fields[name] = decode_array(fields[name], name, pb.INT64, 1).tolist()
    fields["writers"] = [WriterReport(w.name, w.slots, w.writes, w.merges) for w in message.writers]
    return MemoryReport(**fields)


def slots_to_proto(slots: torch.Tensor, read: SlotsRead) -> pb.ReadSlotsResponse:
    names = sorted(set(read.writers))
    index = {name: i for i, name in enumerate(names)}
    return pb.ReadSlotsResponse(
        commit_sequence=read.commit_sequence,
        slots=encode_array(slots),
        keys=encode_array(read.keys),
        values=encode_array(read.values),
        ages=encode_array(read.ages),
        generations=encode_array(read.generations),
        writers=encode_array(np.array([index[w] for w in read.writers], dtype=np.int64)),
        writer_names=names,
    )


def slots_from_proto(message: pb.ReadSlotsResponse) -> SlotsRead:
    values = decode_array(message.values, "values", pb.INT64, 1)
    if message.HasField("writers"):
        names = list(message.writer_names)
        writers = tuple(names[i] for i in decode_array(message.writers, "writers", pb.INT64, 1).tolist())
    else:  # a server from before writer tags
        writers = ("",) * len(values)
    return SlotsRead(
        message.commit_sequence,
        decode_array(message.keys, "keys", pb.FLOAT32, 2),
        values,
        decode_array(message.ages, "ages", pb.FLOAT32, 1),
        decode_array(message.generations, "generations", pb.INT64, 1),
        writers,
    )


def label_slots_to_proto(found: LabelSlots) -> pb.FindLabelResponse:
    return pb.FindLabelResponse(
        commit_sequence=found.commit_sequence,
        slots=encode_array(found.slots),
        ages=encode_array(found.ages),
        recent_slot=found.recent_slot,
    )


def label_slots_from_proto(message: pb.FindLabelResponse) -> LabelSlots:
    return LabelSlots(
        commit_sequence=message.commit_sequence,
        slots=decode_array(message.slots, "slots", pb.INT64, 1),
        ages=decode_array(message.ages, "ages", pb.FLOAT32, 1),
        recent_slot=message.recent_slot,
    )
