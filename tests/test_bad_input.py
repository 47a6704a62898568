"""The bad-input matrix: every malformed request is rejected with a precise status, and the memory is untouched.

Statuses: INVALID_ARGUMENT naming the offending request field (``InvalidArgument.field`` in the client; the
details string ``"<field>: <why>"`` on the wire), NOT_FOUND, ALREADY_EXISTS and RESOURCE_EXHAUSTED.
"Untouched" means every key, value and age, and every counter of the memory's stats (queries, writes, merges,
filled slots, commit sequence), read back after the failure equal what they were before it.

Sections:
1. the public client (``store`` fixture: embedded "local" and a live "grpc" server), so both transports fail
   alike;
2. the raw generated stub, so that nothing in the client library can sanitise the request first;
3. the limit on the number of memories;
4. a QueryStream whose third request is bad.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import math
import uuid

import grpc
import numpy as np
import pytest
import torch

from lifelong_memory.client import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    connect,
)
from lifelong_memory.client.store import LocalTransport, Store
from lifelong_memory.server import wire
from lifelong_memory.server.memory import UNIT_NORM_TOLERANCE, Memory, MemoryConfig
from lifelong_memory.server.registry import MemoryRegistry
from lifelong_memory.server.service import ServerLimits, build_server
from lifelong_memory.v1 import memory_pb2 as pb
from lifelong_memory.v1 import memory_pb2_grpc as pb_grpc

D, M, K = 8, 32, 4
CONFIG = dict(key_dim=D, memory_size=M, choose_k=K, age_noise=2.0, seed=7)
MAX_BATCH = 512  # conftest.py's server
PAGE = 256  # slots per ReadSlots call when taking a snapshot (fits the small-message servers below)


def unit(x) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


_rng = np.random.default_rng(2017)
Q = unit(_rng.standard_normal((3, D)))  # a valid batch ...
Y = np.array([0, 1, 2], dtype=np.int64)  # ... and its labels


def with_element(value, row=1, col=3) -> np.ndarray:
    q = Q.copy()
    q[row, col] = value
    return q


def with_norm(norm, row=1) -> np.ndarray:
    q = Q.copy()
    q[row] *= norm
    return q


def fill(memory) -> None:
    """A few real fused updates (writes and merges), so the state every test guards is not trivial.
    Works on a client handle and on a core Memory alike."""
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((5, D))
    for _ in range(4):
        y = rng.integers(0, 5, 6).astype(np.int64)
        q = unit(centres[y] + 0.3 * rng.standard_normal((6, D)))
        memory.query(torch.from_numpy(q), torch.from_numpy(y), update=True)


def snapshot(mem):
    """(keys, values, ages, stats) of a client handle, read in pages."""
    size = mem.config.memory_size
    pages = [mem.slots(range(start, min(start + PAGE, size))) for start in range(0, size, PAGE)]
    keys, values, ages = (torch.cat(part) for part in zip(*pages, strict=True))
    return keys, values, ages, dict(mem.info().stats)


def core_snapshot(memory: Memory):
    read = memory.read_slots(torch.arange(memory.config.memory_size))
    return read.keys, read.values, read.ages, memory.stats()


def assert_same_state(got, expected) -> None:
    for name, a, b in zip(("keys", "values", "ages"), got[:3], expected[:3], strict=True):
        assert torch.equal(a, b), f"{name} changed"
    assert got[3] == expected[3], "stats changed"


@contextlib.contextmanager
def unchanged(mem):
    """Asserts on exit that the memory behind ``mem`` is exactly as it was on entry."""
    before = snapshot(mem)
    yield
    assert_same_state(snapshot(mem), before)


def new_name(prefix="bad") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def mem(store):
    """A filled memory over each transport (deleted by the store fixture)."""
    handle = store.create_memory(new_name(), **CONFIG)
    fill(handle)
    stats = handle.info().stats
    assert stats["writes"] > 0 and stats["merges"] > 0 and stats["filled_slots"] > 0
    return handle


@contextlib.contextmanager
def raises_invalid(field: str):
    """pytest.raises(InvalidArgument), checking the field it names."""
    with pytest.raises(InvalidArgument) as info:
        yield info
    assert info.value.field == field, str(info.value)
    assert str(info.value).startswith(f"{field}: ")


# =============================================================================================================
# 1. Through the public client, both transports
# =============================================================================================================

# (queries, labels, extra query kwargs, field named): each fails as a plain query and as a fused update.
BAD_QUERIES = [
    pytest.param(with_element(np.nan), Y, {}, "queries", id="nan"),
    pytest.param(with_element(np.inf), Y, {}, "queries", id="inf"),
    pytest.param(with_element(-np.inf), Y, {}, "queries", id="-inf"),
    pytest.param(unit(_rng.standard_normal((3, D + 1))), Y, {}, "queries", id="key-dim-too-large"),
    pytest.param(unit(Q[:, :-1]), Y, {}, "queries", id="key-dim-too-small"),
    pytest.param(Q[0], Y[:1], {}, "queries", id="1-d-queries"),
    pytest.param(Q[None], Y, {}, "queries", id="3-d-queries"),
    pytest.param(np.float32(1.0), Y[:1], {}, "queries", id="0-d-queries"),
    pytest.param(with_norm(1.5), Y, {}, "queries", id="norm-1.5"),
    pytest.param(with_norm(0.0), Y, {}, "queries", id="norm-0"),
    pytest.param(with_norm(1 + 2 * UNIT_NORM_TOLERANCE), Y, {}, "queries", id="norm-just-above-tolerance"),
    pytest.param(with_norm(1 - 2 * UNIT_NORM_TOLERANCE), Y, {}, "queries", id="norm-just-below-tolerance"),
    pytest.param(np.zeros((0, D), np.float32), Y[:0], {}, "queries", id="empty-batch"),
    pytest.param(Q.astype(np.int64), Y, {}, "queries", id="int64-queries"),
    pytest.param(Q, Y[:2], {}, "labels", id="labels-too-short"),
    pytest.param(Q, np.append(Y, 0), {}, "labels", id="labels-too-long"),
    pytest.param(Q, Y[:, None], {}, "labels", id="labels-2-d"),
    pytest.param(Q, np.array([0, -1, 2]), {}, "labels", id="labels-negative"),
    pytest.param(Q, Y.astype(np.float32), {}, "labels", id="labels-float"),
    pytest.param(Q, np.array([True, False, True]), {}, "labels", id="labels-bool"),
    pytest.param(Q, Y, {"k": -1}, "k", id="k-negative"),
    pytest.param(Q, Y, {"k": M + 1}, "k", id="k-above-memory-size"),
    pytest.param(Q, Y, {"k": 2.5}, "k", id="k-not-an-integer"),
    pytest.param(Q, Y, {"fields": {"neighbors", "nope"}}, "fields", id="unknown-result-field"),
    pytest.param(Q, Y, {"fields": "neighbors"}, "fields", id="fields-as-one-string"),
    pytest.param(Q, Y, {"fields": None}, "fields", id="fields-none"),
    pytest.param("abc", Y, {}, "queries", id="queries-a-string"),
    pytest.param([[1.0], [0.0, 1.0], [1.0]], Y, {}, "queries", id="queries-ragged"),
    pytest.param(Q, [0, [1], 2], {}, "labels", id="labels-ragged"),
]


@pytest.mark.parametrize("update", [False, True], ids=["query", "fused-update"])
@pytest.mark.parametrize("queries, labels, kwargs, field", BAD_QUERIES)
def test_bad_query_is_rejected(mem, update, queries, labels, kwargs, field):
    with unchanged(mem), raises_invalid(field):
        mem.query(queries, labels, update=update, **kwargs)


@pytest.mark.parametrize(
    "queries, labels, field",
    [
        pytest.param(Q, None, "labels", id="no-labels"),
        pytest.param(unit(_rng.standard_normal((M + 1, D))), np.arange(M + 1), "queries", id="batch-above-memory-size"),
    ],
)
def test_bad_fused_update_is_rejected(mem, queries, labels, field):
    with unchanged(mem), raises_invalid(field):
        mem.query(queries, labels, update=True)


@pytest.mark.parametrize("queries, labels, kwargs, field", BAD_QUERIES)
def test_bad_query_through_a_stream_is_rejected(mem, queries, labels, kwargs, field):
    with unchanged(mem), raises_invalid(field), mem.stream() as stream:
        stream.query(queries, labels, update=True, **kwargs)


def test_k_zero_means_choose_k_and_the_bounds_are_inclusive(mem):
    for k, width in ((None, K), (0, K), (1, 1), (M, M)):
        result = mem.query(Q, Y, k=k, fields={"neighbors"})
        assert result.neighbor_slots.shape == (len(Q), width)


def test_near_unit_queries_within_the_tolerance_are_accepted(mem):
    for norm in (1 + UNIT_NORM_TOLERANCE / 2, 1 - UNIT_NORM_TOLERANCE / 2):
        mem.query(with_norm(norm), Y)


# ------------------------------------------------------------------------------------------- create / names
BAD_CONFIGS = [
    pytest.param({"key_dim": 0}, "config.key_dim", id="key_dim-0"),
    pytest.param({"key_dim": -1}, "config.key_dim", id="key_dim-negative"),
    pytest.param({"key_dim": 65537}, "config.key_dim", id="key_dim-too-large"),
    pytest.param({"key_dim": 1.5}, "config.key_dim", id="key_dim-float"),
    pytest.param({"key_dim": "8"}, "config.key_dim", id="key_dim-string"),
    pytest.param({"memory_size": 0}, "config.memory_size", id="memory_size-0"),
    pytest.param({"memory_size": -5}, "config.memory_size", id="memory_size-negative"),
    pytest.param({"choose_k": 0}, "config.choose_k", id="choose_k-0"),
    pytest.param({"alpha": 0.0}, "config.alpha", id="alpha-0"),
    pytest.param({"alpha": -0.1}, "config.alpha", id="alpha-negative"),
    pytest.param({"alpha": math.nan}, "config.alpha", id="alpha-nan"),
    pytest.param({"alpha": math.inf}, "config.alpha", id="alpha-inf"),
    pytest.param({"alpha": 1e-40}, "config.alpha", id="alpha-overflows-the-temperature"),
    pytest.param({"alpha": "0.1"}, "config.alpha", id="alpha-string"),
    pytest.param({"age_noise": -1.0}, "config.age_noise", id="age_noise-negative"),
    pytest.param({"age_noise": math.nan}, "config.age_noise", id="age_noise-nan"),
    pytest.param({"choose_k": 4, "correct_in_top": 5}, "config.correct_in_top", id="correct_in_top-above-k"),
    pytest.param({"correct_in_top": 0}, "config.correct_in_top", id="correct_in_top-0"),
    pytest.param({"shards": 0}, "config.shards", id="shards-0"),
    pytest.param({"memory_size": 4, "shards": 5}, "config.shards", id="shards-above-memory-size"),
    pytest.param({"seed": -1}, "config.seed", id="seed-negative"),
    pytest.param({"seed": 2**63}, "config.seed", id="seed-2^63"),
    pytest.param({"seed": 2**64}, "config.seed", id="seed-beyond-uint64"),
    pytest.param({"backend": "nope"}, "config.backend", id="backend-nope"),
    pytest.param({"search_dtype": "float16"}, "config.search_dtype", id="search_dtype-float16"),
    pytest.param({"backend": "faiss", "search_dtype": "bfloat16"}, "config.search_dtype", id="faiss-bfloat16"),
    pytest.param({"backend": "lsh", "search_dtype": "bfloat16"}, "config.search_dtype", id="lsh-bfloat16"),
    pytest.param({"backend": "lsh", "lsh_tables": -1}, "config.lsh_tables", id="lsh_tables-negative"),
    pytest.param({"backend": "lsh", "lsh_tables": 65}, "config.lsh_tables", id="lsh_tables-too-many"),
    pytest.param({"backend": "lsh", "lsh_bits": 31}, "config.lsh_bits", id="lsh_bits-too-many"),
    pytest.param({"backend": "lsh", "lsh_bits": 2, "lsh_probes": 5}, "config.lsh_probes", id="lsh_probes-above-2^bits"),
    pytest.param({"backend": "lsh", "lsh_tables": 2**31}, "config.lsh_tables", id="lsh_tables-beyond-int32"),
    pytest.param({"lsh_probes": -1}, "config.lsh_probes", id="lsh_probes-negative-other-backend"),
    pytest.param(
        {"backend": "faiss-ivf", "ivf_lists": 17, "shards": 2}, "config.ivf_lists", id="ivf_lists-above-shard"
    ),
    pytest.param(
        {"backend": "faiss-ivf", "ivf_lists": 4, "ivf_probes": 5}, "config.ivf_probes", id="ivf_probes-above-lists"
    ),
    pytest.param({"backend": "faiss-ivf", "ivf_probes": -2}, "config.ivf_probes", id="ivf_probes-negative"),
    pytest.param({"backend": "faiss-ivf", "ivf_codes": "pq"}, "config.ivf_codes", id="ivf_codes-unknown"),
    pytest.param({"ivf_codes": 8}, "config.ivf_codes", id="ivf_codes-not-a-string"),
    pytest.param({"backend": "faiss-ivf", "ivf_quantizer": "ivf"}, "config.ivf_quantizer", id="ivf_quantizer-unknown"),
    pytest.param({"ivf_quantizer": 1}, "config.ivf_quantizer", id="ivf_quantizer-not-a-string"),
    pytest.param({"device": "tpu"}, "config.device", id="device-tpu"),
    pytest.param({"device": "cuda:x"}, "config.device", id="device-malformed"),
    pytest.param({"device": 5}, "config.device", id="device-not-a-string"),
    pytest.param(
        {"device": "cuda"},
        "config.device",
        id="device-cuda-without-cuda",
        marks=pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here"),
    ),
    # Only torch searches on CUDA (docs/approximate-search.md, "FAISS on the GPU"): refused on any host.
    pytest.param({"device": "cuda", "backend": "faiss"}, "config.backend", id="faiss-on-cuda"),
    pytest.param(
        {"devices": ["cpu", "cuda:0"], "shards": 2, "backend": "faiss-ivf"},
        "config.backend",
        id="faiss-ivf-shard-on-cuda",
    ),
    pytest.param({"device": "cuda", "backend": "lsh"}, "config.backend", id="lsh-on-cuda"),
    pytest.param({"placement": "rack"}, "config.placement", id="placement-unknown"),
    pytest.param({"placement": "node", "backend": "faiss"}, "config.backend", id="placement-node-faiss"),
    pytest.param({"placement": "gpu", "devices": ["cpu"]}, "config.devices", id="placement-gpu-with-devices"),
    pytest.param({"nope": 1}, "config", id="unknown-config-field"),
]


@pytest.mark.parametrize("config, field", BAD_CONFIGS)
def test_create_with_a_bad_config_is_rejected(store, config, field):
    before = sorted(info.name for info in store.list_memories())
    with raises_invalid(field):
        store.create_memory(new_name(), **{**CONFIG, **config})
    assert sorted(info.name for info in store.list_memories()) == before


def test_create_too_large_to_allocate_is_resource_exhausted(store):
    name = new_name()
    with pytest.raises(ResourceExhausted):  # 2^31 x 65536 float32 keys: 512 TiB
        store.create_memory(name, key_dim=65536, memory_size=2**31)
    assert name not in {info.name for info in store.list_memories()}


def test_create_with_an_existing_name_is_already_exists(store, mem):
    config = mem.info().config
    with unchanged(mem):
        for other in (CONFIG, {**CONFIG, "memory_size": 2 * M}):
            with pytest.raises(AlreadyExists, match=mem.name):
                store.create_memory(mem.name, **other)
    assert mem.info().config == config


INVALID_NAMES = ["", "has space", "a/b", "x" * 129, "naïve", "tab\there", "semi;colon"]


@pytest.mark.parametrize("name", INVALID_NAMES)
@pytest.mark.parametrize(
    "call, field",
    [
        pytest.param(lambda store, handle, result: store.create_memory(handle.name, **CONFIG), "name", id="create"),
        pytest.param(lambda store, handle, result: store.memory(handle.name), "name", id="get"),
        pytest.param(lambda store, handle, result: store.delete_memory(handle.name), "name", id="delete"),
        pytest.param(lambda store, handle, result: handle.clear(), "name", id="clear"),
        pytest.param(lambda store, handle, result: handle.info(), "name", id="info"),
        # Query, Update and ReadSlots name their memory in a field called "memory".
        pytest.param(lambda store, handle, result: handle.query(Q, Y, update=True), "memory", id="query"),
        pytest.param(lambda store, handle, result: handle.update(Q, Y, result), "memory", id="update"),
        pytest.param(lambda store, handle, result: handle.slots([0]), "memory", id="slots"),
    ],
)
def test_invalid_memory_name_is_rejected(store, mem, call, field, name):
    result = mem.query(Q, Y)  # a valid ticket, for the update case
    names = sorted(info.name for info in store.list_memories())
    with unchanged(mem), raises_invalid(field):
        call(store, renamed(mem, name), result)
    assert sorted(info.name for info in store.list_memories()) == names


def renamed(mem, name):
    """A handle like ``mem`` that names another memory."""
    handle = copy.copy(mem)
    handle.name = name
    return handle


def _stream_query(handle):
    with handle.stream() as stream:
        stream.query(Q, Y, update=True)


@pytest.mark.parametrize(
    "call",
    [
        pytest.param(lambda store, gone: store.memory(gone.name), id="get"),
        pytest.param(lambda store, gone: store.delete_memory(gone.name), id="delete"),
        pytest.param(lambda store, gone: gone.info(), id="info"),
        pytest.param(lambda store, gone: gone.clear(), id="clear"),
        pytest.param(lambda store, gone: gone.query(Q), id="query"),
        pytest.param(lambda store, gone: gone.query(Q, Y, update=True), id="fused-update"),
        pytest.param(lambda store, gone: gone.slots([0]), id="slots"),
        pytest.param(lambda store, gone: _stream_query(gone), id="stream"),
    ],
)
def test_unknown_memory_is_not_found(store, mem, call):
    gone = renamed(mem, new_name("missing"))
    with unchanged(mem), pytest.raises(NotFound, match=gone.name):
        call(store, gone)


def test_update_of_a_deleted_memory_is_not_found(store):
    handle = store.create_memory(new_name(), **CONFIG)
    fill(handle)
    result = handle.query(Q, Y)
    store.delete_memory(handle.name)
    with pytest.raises(NotFound, match=handle.name):
        handle.update(Q, Y, result)


@pytest.mark.parametrize(
    "slots",
    [
        pytest.param([M], id="slot-memory_size"),
        pytest.param([0, M + 100], id="slot-beyond"),
        pytest.param([-1], id="slot-negative"),
        pytest.param([[0, 1]], id="2-d"),
        pytest.param([0.7], id="fraction"),  # would read slot 0
        pytest.param([True], id="bool"),  # would read slot 1
        pytest.param([2**64], id="beyond-int64"),
        pytest.param(["a"], id="not-a-number"),
    ],
)
def test_slots_out_of_range_are_rejected(mem, slots):
    with unchanged(mem), raises_invalid("slots"):
        mem.slots(slots)


# ------------------------------------------------------------------------------------- two-phase update
def replace_ticket(result, **changes):
    return dataclasses.replace(result, ticket=dataclasses.replace(result.ticket, **changes))


def column(t: torch.Tensor, col: int, value) -> torch.Tensor:
    t = t.clone()
    t[:, col] = value
    return t


def forged(result):
    """Rows swap positive slots (with their true generations): each row's positive then holds the other
    row's label although the row's top slot holds its own, so nothing looks stale."""
    slots, generations = result.ticket.relied_slots, result.ticket.relied_generations
    return replace_ticket(
        result,
        relied_slots=column(slots, -1, slots[:, -1].flip(0)),
        relied_generations=column(generations, -1, generations[:, -1].flip(0)),
    )


def spoil_slots(change):
    return lambda r: replace_ticket(r, relied_slots=change(r.ticket.relied_slots))


def spoil_generations(change):
    return lambda r: replace_ticket(r, relied_generations=change(r.ticket.relied_generations))


RS, RG = "ticket.relied_slots", "ticket.relied_generations"

# (how to spoil the earlier query's result, field named)
BAD_TICKETS = [
    pytest.param(lambda r: dataclasses.replace(r, ticket=None), "result", id="no-ticket"),
    pytest.param(spoil_slots(lambda t: t[:, :1]), RS, id="relied_slots-too-narrow"),
    pytest.param(spoil_slots(lambda t: t[:1]), RS, id="relied_slots-too-few-rows"),
    pytest.param(spoil_slots(lambda t: t[:, 0]), RS, id="relied_slots-1-d"),
    pytest.param(spoil_slots(lambda t: t.float()), RS, id="relied_slots-float"),
    pytest.param(spoil_slots(lambda t: column(t, 0, M)), RS, id="relied_slot-memory_size"),
    pytest.param(spoil_slots(lambda t: column(t, 0, -2)), RS, id="relied_slot-below-none"),
    pytest.param(forged, RS, id="forged-positive-slot"),
    pytest.param(spoil_generations(lambda t: t[:, :1]), RG, id="relied_generations-too-narrow"),
    pytest.param(spoil_generations(lambda t: t.float()), RG, id="relied_generations-float"),
    pytest.param(lambda r: replace_ticket(r, k=-1), "ticket.k", id="ticket-k-negative"),
    pytest.param(lambda r: replace_ticket(r, k=M + 1), "ticket.k", id="ticket-k-above-memory-size"),
]

# (how to spoil the queries and labels sent with a good ticket, field named)
BAD_UPDATE_BATCHES = [
    pytest.param(lambda q, y: (q.clone().fill_(math.nan), y), "queries", id="nan-queries"),
    pytest.param(lambda q, y: (q * 1.5, y), "queries", id="non-unit-queries"),
    pytest.param(lambda q, y: (q[0], y), "queries", id="1-d-queries"),
    pytest.param(lambda q, y: (q[:1], y[:1]), RS, id="fewer-rows-than-the-ticket"),
    pytest.param(lambda q, y: (q, y[:1]), "labels", id="labels-too-short"),
    pytest.param(lambda q, y: (q, -y - 1), "labels", id="labels-negative"),
    pytest.param(lambda q, y: (q, None), "labels", id="no-labels"),
]


@pytest.fixture
def self_finding(mem):
    """Queries that find their own slots (stored keys of two slots with different labels), their labels, and
    the labelled query's result: its ticket relies on those slots."""
    keys, values, _ = mem.slots(range(M))
    first = int((values >= 0).nonzero()[0])
    second = int(((values >= 0) & (values != values[first])).nonzero()[0])
    queries, labels = keys[[first, second]], values[[first, second]]
    result = mem.query(queries, labels)
    assert not result.incorrect.any()
    return queries, labels, result


@pytest.mark.parametrize("spoil, field", BAD_TICKETS)
def test_bad_ticket_is_rejected(mem, self_finding, spoil, field):
    queries, labels, result = self_finding
    with unchanged(mem), raises_invalid(field):
        mem.update(queries, labels, spoil(result))


@pytest.mark.parametrize("spoil, field", BAD_UPDATE_BATCHES)
def test_bad_two_phase_batch_is_rejected(mem, self_finding, spoil, field):
    queries, labels, result = self_finding
    with unchanged(mem), raises_invalid(field):
        mem.update(*spoil(queries, labels), result)


@pytest.mark.parametrize("backend", ["torch", "faiss"])
def test_ticket_k_zero_means_choose_k(store, backend):
    """k = 0 in a ticket means the memory's choose_k, as in a query: stale rows re-query with it."""
    outcomes = []
    for k in (0, K):
        handle = store.create_memory(new_name(), **CONFIG, backend=backend)
        fill(handle)
        result = handle.query(Q, Y)
        handle.query(Q, Y, update=True)  # rewrites slots the ticket relied on
        update = handle.update(Q, Y, replace_ticket(result, k=k))
        assert update.revalidated_rows > 0
        outcomes.append((update, snapshot(handle)))
    (zero, zero_state), (explicit, explicit_state) = outcomes
    assert torch.equal(zero.written_slots, explicit.written_slots)
    assert torch.equal(zero.incorrect, explicit.incorrect)
    assert_same_state(zero_state, explicit_state)


def test_update_needs_a_labelled_query(mem):
    unlabelled = mem.query(Q)
    assert unlabelled.ticket is None
    with unchanged(mem), raises_invalid("result"):
        mem.update(Q, Y, unlabelled)


# =============================================================================================================
# 2. On the wire, with the raw stub
# =============================================================================================================


@pytest.fixture
def stub(server_url):
    channel = grpc.insecure_channel(server_url.removeprefix("grpc://"))
    yield pb_grpc.MemoryServiceStub(channel)
    channel.close()


@pytest.fixture
def remote(server_url):
    """A filled memory on the conftest server, through the client (to read it back)."""
    with connect(server_url) as store:
        handle = store.create_memory(new_name("wire"), **CONFIG)
        fill(handle)
        yield handle
        store.delete_memory(handle.name)


def encode(x) -> pb.Array:
    return wire.encode_array(np.asarray(x))


def base_query(name: str) -> pb.QueryRequest:
    """A valid fused query + update."""
    return pb.QueryRequest(memory=name, queries=encode(Q), labels=encode(Y), update=True, fields=[pb.NEIGHBORS])


def base_update(stub, name: str) -> pb.UpdateRequest:
    """A valid two-phase update (queries the memory once, for the ticket)."""
    response = stub.Query(pb.QueryRequest(memory=name, queries=encode(Q), labels=encode(Y)))
    return pb.UpdateRequest(memory=name, queries=encode(Q), labels=encode(Y), ticket=response.ticket)


def wire_error(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


def assert_status(error: grpc.RpcError, code: grpc.StatusCode, field: str | None = None) -> None:
    assert error.code() == code, (error.code(), error.details())
    if field is not None:
        assert error.details().startswith(f"{field}: "), error.details()


@pytest.mark.parametrize(
    "method, raw",
    [
        pytest.param("GetMemory", b"\x0a\x02\xff\xfe", id="name-not-utf8"),
        pytest.param("CreateMemory", b"\x0a\x03a\xffb", id="create-name-not-utf8"),
        pytest.param("Query", b"\x0a\x01m\x42\x02\xc3\x28", id="writer-not-utf8"),
        pytest.param("Query", b"\x0a\x05m", id="truncated"),
    ],
)
def test_a_message_that_does_not_decode_is_invalid_argument(server_url, remote, method, raw):
    with grpc.insecure_channel(server_url.removeprefix("grpc://")) as channel, unchanged(remote):
        call = channel.unary_unary(f"/lifelong_memory.v1.MemoryService/{method}")  # bytes as they are
        assert_status(wire_error(lambda: call(raw, timeout=10)), grpc.StatusCode.INVALID_ARGUMENT, "request")


def edit(path: str, *, dtype=None, shape=None, data=None):
    """A change to the Array at ``path`` in a request: dtype, shape and/or data (a value or a function of it)."""

    def apply(request):
        array = functools.reduce(getattr, path.split("."), request)
        if dtype is not None:
            array.dtype = dtype
        if shape is not None:
            new_shape = shape(list(array.shape)) if callable(shape) else shape
            del array.shape[:]
            array.shape.extend(new_shape)
        if data is not None:
            array.data = data(array.data) if callable(data) else data

    return apply


def setting(**fields):
    def apply(request):
        for name, value in fields.items():
            if isinstance(value, pb.Array):
                getattr(request, name).CopyFrom(value)
            else:
                setattr(request, name, value)

    return apply


def both(*changes):
    def apply(request):
        for change in changes:
            change(request)

    return apply


def clear(path: str):
    def apply(request):
        *parents, name = path.split(".")
        functools.reduce(getattr, parents, request).ClearField(name)

    return apply


ROW = 4 * D  # bytes in one float32 query row
BIG = unit(_rng.standard_normal((MAX_BATCH + 1, D)))

# Changes that spoil a Query (fused update) and an Update alike: (change, field named).
WIRE_BATCH_CASES = [
    pytest.param(edit("queries", data=lambda d: d[:-1]), "queries", id="queries-truncated-by-a-byte"),
    pytest.param(edit("queries", data=lambda d: d[:-ROW]), "queries", id="queries-truncated-by-a-row"),
    pytest.param(edit("queries", data=b""), "queries", id="queries-no-data"),
    pytest.param(edit("queries", data=lambda d: d + b"\0"), "queries", id="queries-extra-byte"),
    pytest.param(edit("queries", data=lambda d: d + d[:ROW]), "queries", id="queries-extra-row"),
    pytest.param(edit("queries", dtype=pb.INT64, data=lambda d: d + d), "queries", id="queries-int64"),
    pytest.param(edit("queries", dtype=pb.BOOL), "queries", id="queries-bool"),
    pytest.param(edit("queries", dtype=pb.DTYPE_UNSPECIFIED), "queries", id="queries-dtype-unspecified"),
    pytest.param(edit("queries", dtype=99), "queries", id="queries-dtype-unknown"),
    pytest.param(edit("queries", shape=[-3, D]), "queries", id="queries-negative-batch"),
    pytest.param(edit("queries", shape=[3, -D]), "queries", id="queries-negative-key-dim"),
    pytest.param(edit("queries", shape=[1, 3, D]), "queries", id="queries-3-d"),
    pytest.param(edit("queries", shape=[3 * D]), "queries", id="queries-1-d"),
    pytest.param(edit("queries", shape=[]), "queries", id="queries-0-d"),
    pytest.param(edit("queries", shape=[2**32, 2**32], data=b""), "queries", id="queries-shape-overflows-int64"),
    pytest.param(edit("queries", shape=[2 * 3, D // 2]), "queries", id="queries-wrong-key-dim"),
    pytest.param(clear("queries"), "queries", id="queries-missing"),
    pytest.param(edit("queries", data=encode(with_element(np.nan)).data), "queries", id="queries-nan"),
    pytest.param(edit("queries", data=encode(with_norm(1.5)).data), "queries", id="queries-not-unit"),
    pytest.param(
        both(edit("queries", shape=[0, D], data=b""), edit("labels", shape=[0], data=b"")),
        "queries",
        id="queries-empty-batch",
    ),
    pytest.param(
        both(setting(queries=encode(BIG)), setting(labels=encode(np.zeros(len(BIG), np.int64)))),
        "queries",
        id="queries-above-max-batch",
    ),
    pytest.param(edit("labels", dtype=pb.FLOAT32, data=lambda d: d[: len(d) // 2]), "labels", id="labels-float32"),
    pytest.param(edit("labels", data=lambda d: d[:-1]), "labels", id="labels-truncated"),
    pytest.param(edit("labels", data=lambda d: d + d[:8]), "labels", id="labels-extra-bytes"),
    pytest.param(edit("labels", shape=[3, 1]), "labels", id="labels-2-d"),
    pytest.param(edit("labels", shape=[2], data=lambda d: d[:16]), "labels", id="labels-too-short"),
    pytest.param(edit("labels", data=encode(np.array([0, -1, 2])).data), "labels", id="labels-negative"),
    pytest.param(clear("labels"), "labels", id="labels-missing"),
    pytest.param(setting(memory="bad name"), "memory", id="memory-name-invalid"),
    pytest.param(setting(memory=""), "memory", id="memory-name-empty"),
]


def send(stub, rpc: str, request):
    if rpc == "QueryStream":
        return next(stub.QueryStream(iter([request])))
    return getattr(stub, rpc)(request)


@pytest.mark.parametrize("rpc", ["Query", "QueryStream", "Update"])
@pytest.mark.parametrize("change, field", WIRE_BATCH_CASES)
def test_wire_bad_batch_is_invalid_argument(stub, remote, rpc, change, field):
    request = base_update(stub, remote.name) if rpc == "Update" else base_query(remote.name)
    change(request)
    with unchanged(remote):
        error = wire_error(lambda: send(stub, rpc, request))
    assert_status(error, grpc.StatusCode.INVALID_ARGUMENT, field)


def test_wire_max_batch_is_the_server_limit(stub, remote):
    request = base_query(remote.name)
    both(setting(queries=encode(BIG)), setting(labels=encode(np.zeros(len(BIG), np.int64))))(request)
    assert f"max_batch {MAX_BATCH}" in wire_error(lambda: stub.Query(request)).details()
    request.update = False
    for rows in (MAX_BATCH, 1):
        request.queries.CopyFrom(encode(BIG[:rows]))
        request.labels.CopyFrom(encode(np.zeros(rows, np.int64)))
        stub.Query(request)


def test_wire_base_requests_are_valid(stub, remote):
    """The requests the cases above spoil are themselves accepted (so each case fails for its one change)."""
    assert stub.Query(base_query(remote.name)).commit_sequence > 0
    next(stub.QueryStream(iter([base_query(remote.name)])))
    stub.Update(base_update(stub, remote.name))


@pytest.mark.parametrize(
    "change, field",
    [
        pytest.param(setting(k=-1), "k", id="k-negative"),
        pytest.param(setting(k=M + 1), "k", id="k-above-memory-size"),
        pytest.param(lambda r: r.fields.append(99), "fields", id="result-field-unknown"),
        pytest.param(lambda r: r.fields.append(pb.RESULT_FIELD_UNSPECIFIED), "fields", id="result-field-unspecified"),
    ],
)
@pytest.mark.parametrize("rpc", ["Query", "QueryStream"])
def test_wire_bad_query_options_are_invalid_argument(stub, remote, rpc, change, field):
    request = base_query(remote.name)
    change(request)
    with unchanged(remote):
        error = wire_error(lambda: send(stub, rpc, request))
    assert_status(error, grpc.StatusCode.INVALID_ARGUMENT, field)


@pytest.mark.parametrize(
    "change, field",
    [
        pytest.param(clear("ticket"), "ticket", id="no-ticket"),
        pytest.param(clear(RS), RS, id="relied_slots-missing"),
        pytest.param(edit(RS, data=lambda d: d[:-1]), RS, id="relied_slots-truncated"),
        pytest.param(edit(RS, data=lambda d: d + d), RS, id="relied_slots-extra-bytes"),
        pytest.param(edit(RS, dtype=pb.FLOAT32), RS, id="relied_slots-float32"),
        pytest.param(edit(RS, shape=lambda s: [s[0] * s[1]]), RS, id="relied_slots-1-d"),
        pytest.param(edit(RS, shape=lambda s: [s[1], s[0]]), RS, id="relied_slots-transposed"),
        pytest.param(edit(RS, shape=[-3, -2]), RS, id="relied_slots-negative-shape"),
        pytest.param(edit(RS, data=encode(np.full((3, 2), M)).data), RS, id="relied_slot-out-of-range"),
        pytest.param(clear(RG), RG, id="relied_generations-missing"),
        pytest.param(edit(RG, data=lambda d: d[:-8]), RG, id="relied_generations-truncated"),
        pytest.param(edit(RG, dtype=pb.BOOL), RG, id="relied_generations-bool"),
        pytest.param(lambda r: setattr(r.ticket, "k", -1), "ticket.k", id="ticket-k-negative"),
        pytest.param(lambda r: setattr(r.ticket, "k", M + 1), "ticket.k", id="ticket-k-above-memory-size"),
    ],
)
def test_wire_bad_ticket_is_invalid_argument(stub, remote, change, field):
    request = base_update(stub, remote.name)
    change(request)
    with unchanged(remote):
        error = wire_error(lambda: stub.Update(request))
    assert_status(error, grpc.StatusCode.INVALID_ARGUMENT, field)


@pytest.mark.parametrize(
    "selection, field",
    [
        pytest.param({"range": pb.SlotRange(start=0, stop=M + 1)}, "range", id="range-beyond-memory-size"),
        pytest.param({"range": pb.SlotRange(start=M, stop=M + 5)}, "range", id="range-entirely-beyond"),
        pytest.param({"range": pb.SlotRange(start=5, stop=3)}, "range", id="range-start-after-stop"),
        pytest.param({"range": pb.SlotRange(start=-1, stop=3)}, "range", id="range-negative-start"),
        pytest.param({}, "selection", id="no-selection"),
        pytest.param({"slots": encode(np.array([0, M]))}, "slots", id="slot-memory_size"),
        pytest.param({"slots": encode(np.array([-1]))}, "slots", id="slot-negative"),
        pytest.param({"slots": encode(np.array([0.0, 1.0], np.float32))}, "slots", id="slots-float32"),
        pytest.param({"slots": encode(np.array([[0, 1]]))}, "slots", id="slots-2-d"),
        pytest.param({"slots": pb.Array(dtype=pb.INT64, shape=[2], data=b"\0" * 15)}, "slots", id="slots-truncated"),
        pytest.param({"slots": pb.Array(dtype=pb.INT64, shape=[-2], data=b"")}, "slots", id="slots-negative-shape"),
    ],
)
def test_wire_bad_read_slots_is_invalid_argument(stub, remote, selection, field):
    with unchanged(remote):
        error = wire_error(lambda: stub.ReadSlots(pb.ReadSlotsRequest(memory=remote.name, **selection)))
    assert_status(error, grpc.StatusCode.INVALID_ARGUMENT, field)


def test_wire_read_slots_bounds_are_inclusive(stub, remote):
    for start, stop in ((0, M), (M, M), (0, 0)):
        response = stub.ReadSlots(pb.ReadSlotsRequest(memory=remote.name, range=pb.SlotRange(start=start, stop=stop)))
        assert list(response.keys.shape) == [stop - start, D]


@pytest.mark.parametrize(
    "call",
    [
        pytest.param(lambda stub, name: stub.GetMemory(pb.GetMemoryRequest(name=name)), id="GetMemory"),
        pytest.param(lambda stub, name: stub.DeleteMemory(pb.DeleteMemoryRequest(name=name)), id="DeleteMemory"),
        pytest.param(lambda stub, name: stub.ClearMemory(pb.ClearMemoryRequest(name=name)), id="ClearMemory"),
        pytest.param(lambda stub, name: stub.Query(base_query(name)), id="Query"),
        pytest.param(lambda stub, name: next(stub.QueryStream(iter([base_query(name)]))), id="QueryStream"),
        pytest.param(
            lambda stub, name: stub.ReadSlots(pb.ReadSlotsRequest(memory=name, range=pb.SlotRange(stop=1))),
            id="ReadSlots",
        ),
    ],
)
def test_wire_unknown_memory_is_not_found(stub, remote, call):
    name = new_name("missing")
    with unchanged(remote):
        error = wire_error(lambda: call(stub, name))
    assert_status(error, grpc.StatusCode.NOT_FOUND)
    assert name in error.details()


def test_wire_update_of_unknown_memory_is_not_found(stub, remote):
    request = base_update(stub, remote.name)
    request.memory = new_name("missing")
    with unchanged(remote):
        assert_status(wire_error(lambda: stub.Update(request)), grpc.StatusCode.NOT_FOUND)


@pytest.mark.parametrize(
    "request_, field",
    [
        pytest.param(pb.CreateMemoryRequest(name=""), "name", id="create-name-empty"),
        pytest.param(pb.CreateMemoryRequest(name="a/b"), "name", id="create-name-slash"),
        pytest.param(pb.CreateMemoryRequest(name="x" * 129), "name", id="create-name-too-long"),
        pytest.param(
            pb.CreateMemoryRequest(name="ok", config=pb.MemoryConfig(key_dim=0)),
            "config.key_dim",
            id="create-key_dim-0",
        ),
        pytest.param(
            pb.CreateMemoryRequest(name="ok", config=pb.MemoryConfig(memory_size=0)),
            "config.memory_size",
            id="create-memory_size-0",
        ),
        pytest.param(
            pb.CreateMemoryRequest(name="ok", config=pb.MemoryConfig(alpha=math.nan)),
            "config.alpha",
            id="create-alpha-nan",
        ),
        pytest.param(
            pb.CreateMemoryRequest(name="ok", config=pb.MemoryConfig(backend=99)),
            "config.backend",
            id="create-backend-unknown",
        ),
        pytest.param(
            pb.CreateMemoryRequest(name="ok", config=pb.MemoryConfig(search_dtype=99)),
            "config.search_dtype",
            id="create-search_dtype-unknown",
        ),
        pytest.param(
            pb.CreateMemoryRequest(name="ok", config=pb.MemoryConfig(device="tpu")),
            "config.device",
            id="create-device-tpu",
        ),
        pytest.param(pb.GetMemoryRequest(name="bad name"), "name", id="get-name-invalid"),
        pytest.param(pb.DeleteMemoryRequest(name=""), "name", id="delete-name-empty"),
        pytest.param(pb.ClearMemoryRequest(name="a/b"), "name", id="clear-name-invalid"),
    ],
)
def test_wire_bad_admin_request_is_invalid_argument(stub, remote, request_, field):
    rpc = type(request_).__name__.removesuffix("Request")
    with unchanged(remote):
        error = wire_error(lambda: getattr(stub, rpc)(request_))
    assert_status(error, grpc.StatusCode.INVALID_ARGUMENT, field)
    assert "ok" not in {m.name for m in stub.ListMemories(pb.ListMemoriesRequest()).memories}


def test_wire_create_existing_is_already_exists(stub, remote):
    request = pb.CreateMemoryRequest(name=remote.name, config=pb.MemoryConfig(key_dim=2 * D))
    with unchanged(remote):
        assert_status(wire_error(lambda: stub.CreateMemory(request)), grpc.StatusCode.ALREADY_EXISTS)
    assert remote.info().config.key_dim == D


# ------------------------------------------------------------------------------------ message size limits
SMALL_MESSAGES = 64 * 1024


@contextlib.contextmanager
def own_server(registry: MemoryRegistry, limits: ServerLimits | None = None):
    """A server of the test's own on 127.0.0.1, with its own limits; yields its grpc:// url."""
    server, port = build_server("127.0.0.1:0", registry, limits or ServerLimits(), max_workers=4)
    server.start()
    try:
        yield f"grpc://127.0.0.1:{port}"
    finally:
        server.stop(grace=None)


@contextlib.contextmanager
def raw_stub(url: str):
    with grpc.insecure_channel(url.removeprefix("grpc://")) as channel:
        yield pb_grpc.MemoryServiceStub(channel)


def test_message_above_the_server_limit_is_resource_exhausted():
    limits = ServerLimits(max_message_bytes=SMALL_MESSAGES)
    with own_server(MemoryRegistry(), limits) as url, connect(url) as store, raw_stub(url) as stub:
        mem = store.create_memory("small", **CONFIG)
        fill(mem)
        big = unit(_rng.standard_normal((SMALL_MESSAGES // ROW + 1, D)))  # data alone exceeds the limit
        labels = np.zeros(len(big), np.int64)
        request = pb.QueryRequest(memory=mem.name, queries=encode(big), labels=encode(labels), update=True)
        with unchanged(mem):
            assert_status(wire_error(lambda: stub.Query(request)), grpc.StatusCode.RESOURCE_EXHAUSTED)
            with pytest.raises(ResourceExhausted):
                mem.query(big, labels, update=True)


def test_a_query_whose_reply_would_exceed_the_limit_names_the_fields_asked_for():
    limits = ServerLimits(max_message_bytes=SMALL_MESSAGES)
    named = r"and fields \['neighbor_keys', 'neighbors'\] would"  # not their enum numbers
    with own_server(MemoryRegistry(), limits) as url, connect(url) as store:
        mem = store.create_memory("wide-reply", **{**CONFIG, "memory_size": 4096})
        with unchanged(mem), pytest.raises(ResourceExhausted, match=named):
            mem.query(Q, k=4096, fields=["neighbors", "neighbor_keys"])


def test_read_slots_selection_too_large_for_one_message_is_invalid_argument():
    limits = ServerLimits(max_message_bytes=SMALL_MESSAGES)
    size = 2048  # 2048 slots of 8 float32 and 4 more numbers each: about 120 KiB, twice the limit
    with own_server(MemoryRegistry(), limits) as url, connect(url) as store, raw_stub(url) as stub:
        mem = store.create_memory("wide", **{**CONFIG, "memory_size": size})
        fill(mem)
        with unchanged(mem):  # the snapshot reads in pages of PAGE slots, which fit
            for selection, field in (
                ({"range": pb.SlotRange(start=0, stop=size)}, "range"),
                ({"slots": encode(np.arange(size))}, "slots"),
            ):
                error = wire_error(lambda s=selection: stub.ReadSlots(pb.ReadSlotsRequest(memory=mem.name, **s)))
                assert_status(error, grpc.StatusCode.INVALID_ARGUMENT, field)
                assert "read in pages" in error.details()
            with raises_invalid("slots"):
                mem.slots(range(size))


def test_read_slots_whose_writer_tags_overflow_one_message_is_invalid_argument():
    """The slots' arrays fit the limit, but each slot carries another 128-character writer tag."""
    limits = ServerLimits(max_message_bytes=SMALL_MESSAGES)
    size = 600  # 600 slots of 8 float32 and 4 more numbers each: about 40 KiB; their tags about 78 KiB more
    with own_server(MemoryRegistry(), limits) as url, connect(url) as store, raw_stub(url) as stub:
        mem = store.create_memory("tagged", **{**CONFIG, "memory_size": size})
        rng = np.random.default_rng(0)
        keys = rng.standard_normal((size, D)).astype(np.float32)
        keys /= np.linalg.norm(keys, axis=1, keepdims=True)
        for i in range(size):
            tagged = store.memory("tagged", writer=f"w{i:04d}-" + "x" * 122)
            tagged.query(keys[i : i + 1], np.array([i]), update=True)
        with unchanged(mem):
            error = wire_error(
                lambda: stub.ReadSlots(pb.ReadSlotsRequest(memory=mem.name, range=pb.SlotRange(start=0, stop=size)))
            )
            assert_status(error, grpc.StatusCode.INVALID_ARGUMENT, "range")
            assert "writer tags" in error.details()
            assert len(mem.read_slots(range(100)).writers) == 100  # a smaller page fits


# =============================================================================================================
# 3. Too many memories
# =============================================================================================================


@pytest.mark.parametrize("transport", ["local", "grpc"])
def test_third_memory_beyond_max_memories_is_resource_exhausted(transport):
    registry = MemoryRegistry(max_memories=2)
    with contextlib.ExitStack() as stack:
        if transport == "local":
            store = stack.enter_context(Store(LocalTransport(registry)))
        else:
            url = stack.enter_context(own_server(registry))
            store = stack.enter_context(connect(url))
            stub = stack.enter_context(raw_stub(url))
        first = store.create_memory("first", **CONFIG)
        fill(first)
        store.create_memory("second", **CONFIG)
        with unchanged(first):
            with pytest.raises(ResourceExhausted, match="at most 2"):
                store.create_memory("third", **CONFIG)
            with pytest.raises(AlreadyExists):  # an existing name is still ALREADY_EXISTS when full
                store.create_memory("first", **CONFIG)
            if transport == "grpc":
                error = wire_error(lambda: stub.CreateMemory(pb.CreateMemoryRequest(name="third")))
                assert_status(error, grpc.StatusCode.RESOURCE_EXHAUSTED)
        assert sorted(info.name for info in store.list_memories()) == ["first", "second"]
        store.delete_memory("second")
        store.create_memory("third", **CONFIG)  # room again


# =============================================================================================================
# 4. A QueryStream whose third request is bad
# =============================================================================================================
STREAM_STEPS = [
    (unit(_rng.standard_normal((4, D))), np.array([0, 1, 7, 8])),
    (unit(_rng.standard_normal((4, D))), np.array([7, 2, 9, 0])),
]
BAD_STEP = (with_element(np.nan), Y)


def expected_after_two_steps():
    """A fresh core memory, filled the same way, after the two good steps."""
    reference = Memory(MemoryConfig(**CONFIG))
    fill(reference)
    for q, y in STREAM_STEPS:
        reference.query(torch.from_numpy(q), torch.from_numpy(y), update=True)
    return core_snapshot(reference)


def test_wire_stream_fails_at_the_bad_request_after_applying_the_good_ones(stub, remote):
    requests = [
        pb.QueryRequest(memory=remote.name, queries=encode(q), labels=encode(y), update=True)
        for q, y in [*STREAM_STEPS, BAD_STEP, STREAM_STEPS[0]]  # the fourth is never served
    ]
    before = remote.info().stats["commit_sequence"]
    responses = stub.QueryStream(iter(requests))
    first, second = next(responses), next(responses)
    assert (first.commit_sequence, second.commit_sequence) == (before + 1, before + 2)
    error = wire_error(lambda: next(responses))
    assert_status(error, grpc.StatusCode.INVALID_ARGUMENT, "queries")
    assert_same_state(snapshot(remote), expected_after_two_steps())


def test_client_stream_fails_at_the_bad_request_after_applying_the_good_ones(mem):
    with mem.stream() as stream:
        results = [stream.query(q, y, update=True) for q, y in STREAM_STEPS]
        with raises_invalid("queries"):
            stream.query(*BAD_STEP, update=True)
    assert all(bool((r.written_slots >= 0).all()) for r in results)
    assert_same_state(snapshot(mem), expected_after_two_steps())


@pytest.mark.parametrize(
    "options, field",
    [
        (dict(k=True), "k"),  # embedded took it for k = 1; protobuf's TypeError remotely
        (dict(k=2**70), "k"),  # protobuf's ValueError remotely
        (dict(k=-1), "k"),
        (dict(update="no"), "update"),  # embedded took "no" as true and wrote
        (dict(use_recent=1), "use_recent"),
    ],
)
def test_query_options_of_the_wrong_type_are_refused_alike_over_both_transports(mem, options, field):
    with unchanged(mem):
        for query in (mem.query, mem.stream().query):
            with raises_invalid(field):
                query(Q, Y, **options)


def test_a_numpy_array_with_negative_strides_is_taken_as_it_reads(mem):
    """np.flip and a[::-1] (an argsort reversed) give negative strides, which torch.as_tensor refuses."""
    flipped = mem.query(np.flip(Q, axis=0), Y[::-1].copy())
    assert torch.equal(flipped.predictions, mem.query(Q[::-1].copy(), Y[::-1].copy()).predictions)
    assert torch.equal(mem.query(Q, Y[::-1]).predictions, mem.query(Q, Y[::-1].copy()).predictions)


@pytest.mark.parametrize("url", ["local", "grpc"])
def test_a_closed_store_refuses_every_call_alike(url, server_url):
    store = connect("local" if url == "local" else server_url)
    memory = store.create_memory(new_name("closed"), **CONFIG)
    stream = memory.stream()
    stream.query(Q, Y, update=True)
    name = memory.name
    store.close()
    closed = r"store: closed \(its with block ended, or close\(\) was called\); connect again"
    for call in (store.list_memories, lambda: memory.query(Q), lambda: stream.query(Q, Y, update=True), memory.info):
        with pytest.raises(FailedPrecondition, match=closed):
            call()
    store.close()  # twice is once
    with connect("local" if url == "local" else server_url) as again:
        if url == "grpc":
            assert again.memory(name).info().stats["commit_sequence"] == 1, "the refused write was not sent"
            again.delete_memory(name)
