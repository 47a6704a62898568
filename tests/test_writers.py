"""Writer tags: which trainer wrote which slots, when several share one memory.

A tag travels with every update (QueryRequest.writer, UpdateRequest.writer, a handle's ``writer``), is kept per
slot (the tag of the slot's last write or merge), counted per tag, logged, snapshotted, and shown by inspection.
"""

from __future__ import annotations

import dataclasses
import json
import struct
import zlib

import grpc
import numpy as np
import pytest
import torch

from lifelong_memory.client import EMPTY, InvalidArgument, MemoryModule, ResourceExhausted, cli, connect
from lifelong_memory.server import memory as memory_module
from lifelong_memory.server import persistence
from lifelong_memory.server.memory import Delta, Memory, MemoryConfig
from lifelong_memory.server.registry import MemoryRegistry
from lifelong_memory.server.wire import encode_array, slots_from_proto, ticket_to_proto
from lifelong_memory.v1 import memory_pb2 as pb
from lifelong_memory.v1 import memory_pb2_grpc as pb_grpc

CONFIG = dict(key_dim=4, memory_size=8, choose_k=4, age_noise=0.0)
E = torch.eye(4)


def test_slots_carry_the_tag_of_their_last_write_or_merge(store):
    a = store.create_memory("shared", writer="convnet", **CONFIG)
    b = store.memory("shared", writer="mlp/view-2")
    untagged = store.memory("shared")
    a.query(E[:2], torch.tensor([0, 1]), update=True)  # writes slots 0, 1
    b.query(E[2:3], torch.tensor([2]), update=True)  # writes slot 2
    b.update(E[:1], torch.tensor([0]), b.query(E[:1], torch.tensor([0])))  # merges into a's slot 0
    with untagged.stream() as stream:
        stream.query(E[3:4], torch.tensor([3]), update=True)  # writes slot 3
    read = a.read_slots(range(8))
    assert read.writers == ("mlp/view-2", "convnet", "mlp/view-2", "", "", "", "", "")
    assert read.values[:4].tolist() == [0, 1, 2, 3] and (read.values[4:] == EMPTY).all()
    report = a.inspect()
    assert [(w.name, w.slots, w.writes, w.merges) for w in report.writers] == [
        ("mlp/view-2", 2, 1, 1),
        ("", 1, 1, 0),
        ("convnet", 1, 2, 0),
    ]
    a.clear()  # the slots are empty again; what each tag did since create stays counted
    assert a.read_slots(range(8)).writers == ("",) * 8
    assert [(w.name, w.slots, w.writes) for w in a.inspect().writers] == [
        ("", 0, 1),
        ("convnet", 0, 2),
        ("mlp/view-2", 0, 1),
    ]


def test_a_module_tags_its_steps(store):
    config = {name: value for name, value in CONFIG.items() if name != "key_dim"}
    module = MemoryModule(store, 4, name="tagged-module", writer="trainer-7", **config)
    module(torch.randn(3, 4), torch.tensor([0, 1, 2]))
    assert set(module.memory.read_slots(range(3)).writers) == {"trainer-7"}
    with pytest.raises(ValueError, match="writer="):
        MemoryModule(module.memory, 4, writer="other")


@pytest.mark.parametrize("writer", ["has space", "x" * 129, "é", 7])
def test_a_bad_tag_is_refused_naming_the_field(store, writer):
    memory = store.create_memory("bad-tag", **CONFIG)
    with pytest.raises(InvalidArgument, match="^writer: "):
        store.memory("bad-tag", writer=writer)
    assert memory.info().stats["commit_sequence"] == 0


@pytest.mark.parametrize("call", ["Query", "Update"])
def test_the_server_refuses_a_bad_tag_on_the_wire_and_changes_nothing(server_url, call):
    with connect(server_url) as store:
        memory = store.create_memory(f"wire-tag-{call}", **CONFIG)
        memory.query(E[:1], torch.tensor([0]), update=True)
        before = memory.read_slots(range(8))
        ticket = memory.query(E[1:2], torch.tensor([1])).ticket
        with grpc.insecure_channel(server_url.removeprefix("grpc://")) as channel:
            stub = pb_grpc.MemoryServiceStub(channel)
            arrays = dict(memory=memory.name, queries=encode_array(E[1:2]), labels=encode_array(torch.tensor([1])))
            with pytest.raises(grpc.RpcError) as error:
                if call == "Query":
                    stub.Query(pb.QueryRequest(**arrays, update=True, writer="no spaces"))
                else:
                    stub.Update(pb.UpdateRequest(**arrays, ticket=ticket_to_proto(ticket), writer="no spaces"))
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error.value.details().startswith("writer: ")
        after = memory.read_slots(range(8))
        assert after.commit_sequence == before.commit_sequence and after.writers == before.writers
        store.delete_memory(memory.name)


def test_the_tag_table_is_bounded_and_a_refused_write_leaves_no_trace(monkeypatch):
    monkeypatch.setattr(memory_module, "MAX_WRITERS", 3)
    memory = Memory(MemoryConfig(**CONFIG))
    for step, writer in enumerate(["a", "b", "a", ""]):  # "" and two tags: the table is full
        memory.query(E[step : step + 1], torch.tensor([step]), update=True, writer=writer)
    before = memory.capture()
    with pytest.raises(ResourceExhausted, match="^writer: .*3 writer tags"):
        memory.query(E[:1], torch.tensor([9]), update=True, writer="c")
    after = memory.capture()
    assert after.commit_sequence == before.commit_sequence and torch.equal(after.keys, before.keys)
    assert after.writer_names == ["", "a", "b"] and torch.equal(after.writers, before.writers)
    memory.query(E[:1], torch.tensor([9]), update=True, writer="b")  # a known tag still writes


def test_tags_survive_a_crash_and_a_snapshot(tmp_path):
    registry = MemoryRegistry(data_dir=tmp_path)
    memory = registry.create("m", **CONFIG)
    memory.query(E[:2], torch.tensor([0, 1]), update=True, writer="a")
    registry.snapshot("m")
    memory.query(E[2:3], torch.tensor([2]), update=True, writer="b")  # only in the log
    memory.query(E[:1], torch.tensor([0]), update=True)  # an untagged merge: slot 0 loses its tag
    registry.storage.close()  # no final snapshot: what a killed server leaves
    recovered = MemoryRegistry(data_dir=tmp_path).get("m")
    assert recovered.read_slots(range(4)).writers == ("", "a", "b", "")
    assert [(w.name, w.slots, w.writes, w.merges) for w in recovered.inspect().writers] == [
        ("", 1, 0, 1),
        ("a", 1, 2, 0),
        ("b", 1, 1, 0),
    ]


def test_log_records_of_untagged_writes_keep_the_old_kind_and_tagged_ones_round_trip():
    delta = Delta(torch.tensor([3]), torch.ones(1, 4) / 2, torch.tensor([5]), torch.tensor([5]), torch.tensor([3]), 1)
    for writer, kind in (("", persistence.WRITE), ("model/b:2", persistence.TAGGED_WRITE)):
        tagged = Delta(**{**delta.__dict__, "writer": writer})
        record = persistence.encode_record(7, tagged)
        assert record[persistence.RECORD_HEADER.size - 1] == kind
        payload = record[persistence.RECORD_HEADER.size :]
        assert persistence.decode_record(kind, payload).writer == writer
    with pytest.raises(ValueError, match="writer tag"):
        persistence.decode_record(persistence.TAGGED_WRITE, bytes([200]) + b"short")


def test_a_format_2_snapshot_restores_every_slot_untagged(tmp_path):
    memory = Memory(MemoryConfig(**CONFIG))
    memory.query(E[:2], torch.tensor([0, 1]), update=True)
    state = memory.capture()
    header = {
        "format": 2,
        "config": dataclasses.asdict(state.config),
        "commit_sequence": state.commit_sequence,
        "counters": state.counters,
        "arrays": [],
    }
    arrays = {name: getattr(state, name) for name in persistence.STATE_ARRAYS if name != "writers"}
    names = {torch.float32: "float32", torch.int64: "int64"}
    header["arrays"] = [{"name": n, "dtype": names[a.dtype], "shape": list(a.shape)} for n, a in arrays.items()]
    encoded = json.dumps(header).encode()
    body = b"LMEMSNAP" + struct.pack("<IQ", 2, len(encoded)) + encoded
    body += b"".join(a.contiguous().numpy().tobytes() for a in arrays.values())
    path = tmp_path / "format-2.lmem"
    path.write_bytes(body + struct.pack("<I", zlib.crc32(body)) + b"LMEMEND!")
    restored = persistence.read_snapshot_file(path)
    assert restored.writer_names == [""] and not restored.writers.any()
    assert restored.writer_counters == [(state.counters["writes"], state.counters["merges"])]


def test_lmem_shows_who_wrote_what(server_url, capsys):
    with connect(server_url) as store:
        store.create_memory("cli-writers", writer="convnet", **CONFIG).query(E[:2], torch.tensor([0, 1]), update=True)
        store.memory("cli-writers", writer="mlp").query(E[2:3], torch.tensor([2]), update=True)
        try:
            assert cli.main(["stats", "cli-writers", "--url", server_url]) == 0
            lines = capsys.readouterr().out.splitlines()
            table = lines[next(i for i, line in enumerate(lines) if line.split()[:1] == ["writer"]) + 1 :]
            assert [line.split()[:4] for line in table] == [["convnet", "2", "2", "0"], ["mlp", "1", "1", "0"]]
            assert cli.main(["slots", "cli-writers", "--range", "0:4", "--json", "--url", server_url]) == 0
            rows = json.loads(capsys.readouterr().out)["slots"]
            assert [r["writer"] for r in rows] == ["convnet", "convnet", "mlp", ""]
        finally:
            store.delete_memory("cli-writers")


def test_untagged_memories_show_no_writer_table(server_url, capsys):
    with connect(server_url) as store:
        store.create_memory("cli-untagged", **CONFIG).query(E[:2], torch.tensor([0, 1]), update=True)
        try:
            assert cli.main(["stats", "cli-untagged", "--url", server_url]) == 0
            assert not [line for line in capsys.readouterr().out.splitlines() if line.startswith("writer")]
        finally:
            store.delete_memory("cli-untagged")


def test_reading_slots_from_a_server_without_tags_reads_them_untagged():
    message = pb.ReadSlotsResponse(
        commit_sequence=3,
        slots=encode_array(torch.tensor([0, 1])),
        keys=encode_array(torch.zeros(2, 4)),
        values=encode_array(torch.tensor([1, EMPTY])),
        ages=encode_array(torch.zeros(2)),
        generations=encode_array(torch.tensor([3, 0])),
    )
    assert slots_from_proto(message).writers == ("", "")
    assert np.array_equal(slots_from_proto(message).values.numpy(), [1, EMPTY])
