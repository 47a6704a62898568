"""The data directory: snapshots, the write-ahead log, recovery, export and import, the memory budget."""

from __future__ import annotations

import os
import threading
import time

import pytest
import torch

from lifelong_memory.client import FailedPrecondition, InvalidArgument, ResourceExhausted, Unavailable, connect
from lifelong_memory.server import persistence
from lifelong_memory.server.persistence import Durability, segments
from lifelong_memory.server.registry import MemoryRegistry

CONFIG = dict(key_dim=8, memory_size=48, choose_k=6, age_noise=3.0, seed=5)
# The arrays of format 1 (besides its generator state) and 2.
STATE = ("keys", "values", "ages", "generations", "recent_labels", "recent_slots")


def assert_same_slots(a, b) -> None:
    assert a.commit_sequence == b.commit_sequence and a.writers == b.writers
    for name in ("keys", "values", "ages", "generations"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


def batch(step: int, size: int = 4):
    generator = torch.Generator().manual_seed(step)
    labels = torch.randint(0, 12, (size,), generator=generator)
    centres = torch.nn.functional.normalize(torch.randn(12, 8, generator=torch.Generator().manual_seed(0)), dim=1)
    queries = torch.nn.functional.normalize(centres[labels] + 0.3 * torch.randn(size, 8, generator=generator), dim=1)
    return queries, labels


# Writer tags of the steps: untagged, and two trainers.
WRITERS = ("", "trainer-a", "model/b:2")


def write(memory, steps: range) -> None:
    """Every kind of write: fused, two-phase (some revalidated), clear; untagged and tagged."""
    for step in steps:
        queries, labels = batch(step)
        writer = WRITERS[step % 5 % 3]
        if step % 3 == 0:
            memory.query(queries, labels, update=True, writer=writer)
        else:
            memory.update(queries, labels, memory.query(queries, labels).ticket, writer)
        if step % 17 == 16:
            memory.clear()


def assert_same(a, b) -> None:
    x, y = a.capture(), b.capture()
    assert x.commit_sequence == y.commit_sequence
    assert x.config == y.config
    assert x.counters["writes"] == y.counters["writes"] and x.counters["merges"] == y.counters["merges"]
    for name in (*STATE, "writers"):
        assert torch.equal(getattr(x, name), getattr(y, name)), name
    assert x.writer_names == y.writer_names and x.writer_counters == y.writer_counters


def reopen(registry: MemoryRegistry, **options) -> MemoryRegistry:
    """What a restarted server finds: the files as the first one left them (it is not closed: no final
    snapshot, no flush), and the data directory's lock released, as a process's death releases it."""
    registry.storage.close()
    return MemoryRegistry(data_dir=registry.storage.root, **options)


def twin(tmp_path, **config):
    """A durable memory and an in-memory twin that receives the same writes."""
    registry = MemoryRegistry(data_dir=tmp_path)
    return registry, registry.create("m", **CONFIG, **config), MemoryRegistry().create("twin", **CONFIG, **config)


@pytest.mark.parametrize("sync", ["always", "interval", "off"])
@pytest.mark.parametrize("config", [{}, dict(backend="faiss", shards=3), dict(search_dtype="bfloat16")])
def test_recovery_after_a_crash_equals_the_memory_and_goes_on_alike(tmp_path, sync, config):
    registry = MemoryRegistry(data_dir=tmp_path, durability=Durability(sync=sync))
    memory = registry.create("m", **CONFIG, **config)
    live = MemoryRegistry().create("twin", **CONFIG, **config)
    for target in (memory, live):
        write(target, range(40))
    registry.snapshot("m")
    for target in (memory, live):
        write(target, range(40, 70))
    # No close: the files are what a killed process leaves behind.
    recovered = reopen(registry, durability=Durability(sync=sync)).get("m")
    assert_same(recovered, live)
    for target in (recovered, live):
        write(target, range(70, 90))
    assert_same(recovered, live)


def test_clean_close_snapshots_everything_so_nothing_is_replayed(tmp_path, caplog):
    registry, memory, live = twin(tmp_path)
    write(memory, range(30))
    write(live, range(30))
    registry.close()
    caplog.set_level("INFO", logger="lifelong_memory.server.persistence")
    again = MemoryRegistry(data_dir=tmp_path)
    assert_same(again.get("m"), live)
    assert "0 writes replayed" in caplog.text


def test_torn_tail_is_truncated_and_reported(tmp_path, caplog):
    registry, memory, live = twin(tmp_path)
    write(memory, range(20))
    write(live, range(20))
    _, newest = segments(tmp_path / "memories" / "m")[-1]
    size = newest.stat().st_size
    queries, labels = batch(99)
    memory.query(queries, labels, update=True)  # a last record, then torn in half
    with open(newest, "r+b") as f:
        f.truncate(size + (newest.stat().st_size - size) // 2)
    recovered = reopen(registry).get("m")
    assert_same(recovered, live)
    assert "unfinished write-ahead log tail" in caplog.text
    assert newest.stat().st_size == size  # cut back to the last whole record
    # and the memory goes on from there
    write(recovered, range(20, 25))
    write(live, range(20, 25))
    assert_same(recovered, live)


def test_corrupt_record_cuts_the_log_there(tmp_path, caplog):
    registry, memory, live = twin(tmp_path)
    write(memory, range(10))
    write(live, range(10))
    _, path = segments(tmp_path / "memories" / "m")[-1]
    good = path.stat().st_size
    write(memory, range(10, 14))
    with open(path, "r+b") as f:  # flip a byte inside the first record after `good`
        f.seek(good + 30)
        byte = f.read(1)
        f.seek(good + 30)
        f.write(bytes([byte[0] ^ 0xFF]))
    assert_same(reopen(registry).get("m"), live)
    assert "checksum mismatch" in caplog.text


def test_damaged_newest_snapshot_falls_back_to_the_older_one(tmp_path, caplog):
    registry, memory, live = twin(tmp_path)
    for steps in (range(0, 10), range(10, 20), range(20, 30)):
        write(memory, steps)
        write(live, steps)
        registry.snapshot("m")
    folder = tmp_path / "memories" / "m"
    snapshots = sorted(folder.glob("snapshot-*.lmem"))
    assert len(snapshots) == 2  # the newest two are kept
    with open(snapshots[-1], "r+b") as f:  # inside the arrays, past the header
        f.seek(-200, os.SEEK_END)
        f.write(b"\xff" * 16)
    assert_same(reopen(registry).get("m"), live)
    assert "checksum mismatch" in caplog.text


def test_snapshots_drop_the_log_they_cover(tmp_path):
    registry, memory, _ = twin(tmp_path)
    folder = tmp_path / "memories" / "m"
    for steps in (range(0, 10), range(10, 20), range(20, 30)):
        write(memory, steps)
        registry.snapshot("m")
    older = int(sorted(folder.glob("snapshot-*.lmem"))[0].stem.removeprefix("snapshot-"))
    firsts = [first for first, _ in segments(folder)]
    # Only segments holding writes after the older kept snapshot remain.
    assert firsts[0] <= older + 1 and all(first > older for first in firsts[1:])
    assert len(firsts) <= 3


def test_unrecoverable_memory_is_reported_and_others_come_back(tmp_path, caplog):
    registry = MemoryRegistry(data_dir=tmp_path)
    good, bad = registry.create("good", **CONFIG), registry.create("bad", **CONFIG)
    write(good, range(10))
    write(bad, range(10))
    before = good.capture()
    (tmp_path / "memories" / "bad" / "config.json").write_text("{not json")
    again = reopen(registry)
    assert "memory 'bad' could not be recovered" in caplog.text
    with pytest.raises(FailedPrecondition, match="could not be recovered"):
        again.get("bad")
    after = again.get("good").capture()
    assert after.commit_sequence == before.commit_sequence and torch.equal(after.keys, before.keys)
    again.delete("bad")  # and can be deleted to start over
    assert not (tmp_path / "memories" / "bad").exists()


def test_log_starting_after_the_state_is_refused_not_guessed(tmp_path, caplog):
    registry, memory, _ = twin(tmp_path)
    write(memory, range(10))
    registry.snapshot("m")
    write(memory, range(10, 20))
    registry.snapshot("m")
    write(memory, range(20, 25))
    for path in (tmp_path / "memories" / "m").glob("snapshot-*.lmem"):
        path.unlink()
    with pytest.raises(FailedPrecondition, match="writes in between are lost"):
        reopen(registry).get("m")


def test_create_and_delete_are_durable(tmp_path):
    registry = MemoryRegistry(data_dir=tmp_path)
    registry.create("kept", **CONFIG)
    registry.create("gone", **CONFIG)
    registry.delete("gone")
    again = reopen(registry)
    assert [name for name, _ in again.list()] == ["kept"]
    assert again.get("kept").config == registry.get("kept").config


def test_group_commit_shares_fsyncs_among_concurrent_writers(tmp_path, monkeypatch):
    registry = MemoryRegistry(data_dir=tmp_path)
    memory = registry.create("m", **CONFIG)
    fsyncs = []
    real_fsync = os.fsync

    def slow_fsync(fd):  # a slow disk, so that writers queue up behind the one fsync in progress
        time.sleep(0.02)
        fsyncs.append(fd)
        real_fsync(fd)

    monkeypatch.setattr(persistence.os, "fsync", slow_fsync)
    writers, writes = 8, 10

    def writer(index):
        for step in range(writes):
            memory.query(*batch(1000 * index + step), update=True)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert memory.commit_sequence == writers * writes
    assert len(fsyncs) <= writers * writes // 2, f"{len(fsyncs)} fsyncs for {writers * writes} writes"
    recovered = reopen(registry).get("m")
    assert recovered.commit_sequence == writers * writes


def test_failed_log_refuses_the_write_and_all_later_ones(tmp_path, monkeypatch):
    registry = MemoryRegistry(data_dir=tmp_path)
    memory = registry.create("m", **CONFIG)
    write(memory, range(5))

    def broken_fsync(fd):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(persistence.os, "fsync", broken_fsync)
    with pytest.raises(Unavailable, match="not durable"):
        memory.query(*batch(50), update=True)
    with pytest.raises(FailedPrecondition, match="write-ahead log failed"):
        memory.query(*batch(51), update=True)
    # Nor reads: the failed write is in memory, and only a restart can tell whether the disk holds it.
    with pytest.raises(FailedPrecondition, match="write-ahead log failed"):
        memory.query(batch(52)[0])


def test_memory_budget_refuses_what_the_machine_cannot_hold(tmp_path):
    registry = MemoryRegistry(memory_budget_bytes=64 << 20)
    small = registry.create("small", key_dim=64, memory_size=1000)
    write_free = small.capture()
    with pytest.raises(ResourceExhausted, match="config.memory_size"):
        registry.create("huge", key_dim=64, memory_size=1_000_000)
    assert [name for name, _ in registry.list()] == ["small"]
    assert torch.equal(small.capture().keys, write_free.keys)


def test_export_import_roundtrip_on_both_transports(store, tmp_path):
    memory = store.create_memory("exported", **CONFIG)
    for step in range(30):
        memory.query(*batch(step), update=True)
    path = tmp_path / "exported.lmem"
    size = store.export_memory("exported", path)
    assert size == path.stat().st_size
    copy = store.import_memory("imported", path, backend="faiss", shards=2)
    assert copy.config.backend == "faiss" and copy.config.shards == 2
    assert_same_slots(memory.read_slots(range(48)), copy.read_slots(range(48)))
    # Both go on identically: the age-noise generator travelled too.
    for step in range(30, 40):
        a = memory.query(*batch(step), update=True)
        b = copy.query(*batch(step), update=True)
        assert torch.equal(a.written_slots, b.written_slots)


def test_import_refuses_damaged_files_and_content_changes(store, tmp_path):
    memory = store.create_memory("source", **CONFIG)
    memory.query(*batch(0), update=True)
    path = tmp_path / "source.lmem"
    store.export_memory("source", path)
    with pytest.raises(InvalidArgument, match="config"):
        store.import_memory("bigger", path, memory_size=100)
    damaged = tmp_path / "damaged.lmem"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    damaged.write_bytes(bytes(data))
    with pytest.raises(InvalidArgument, match="data: checksum mismatch"):
        store.import_memory("damaged", damaged)
    truncated = tmp_path / "truncated.lmem"
    truncated.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(InvalidArgument, match="data: truncated"):
        store.import_memory("truncated", truncated)
    assert {info.name for info in store.list_memories()} >= {"source"}
    assert not {"bigger", "damaged", "truncated"} & {info.name for info in store.list_memories()}


def test_snapshot_needs_a_data_directory(store):
    memory = store.create_memory("volatile", **CONFIG)
    with pytest.raises(FailedPrecondition, match="data directory"):
        memory.snapshot()


def test_embedded_store_with_data_dir_survives_restart(tmp_path):
    with connect("local", data_dir=tmp_path) as store:
        memory = store.create_memory("notes", **CONFIG)
        written = memory.query(*batch(0), update=True).written_slots
        assert memory.snapshot().commit_sequence == 1
    with connect("local", data_dir=tmp_path) as store:
        _, values = store.memory("notes").slots(written.tolist())[:2]
        assert torch.equal(values, batch(0)[1])


def test_a_snapshot_file_restores_into_a_new_memory(tmp_path):
    with connect("local", data_dir=tmp_path / "server") as store:
        memory = store.create_memory("source", **CONFIG)
        for step in range(12):
            memory.query(*batch(step), update=True)
        snapshot = memory.snapshot()
        restored = store.import_memory("restored", snapshot.path)
        assert restored.info().stats["commit_sequence"] == snapshot.commit_sequence
        assert_same_slots(memory.read_slots(range(48)), restored.read_slots(range(48)))


def format_1_file(state, rng_state: torch.Tensor) -> bytes:
    """A snapshot as format 1 wrote it: the same arrays, then the age-noise generator's state."""
    import json
    import struct
    import zlib

    arrays = {name: getattr(state, name).contiguous() for name in STATE} | {"rng_state": rng_state}
    names = {torch.float32: "float32", torch.int64: "int64", torch.uint8: "uint8"}
    config = {k: v for k, v in vars(state.config).items() if k != "devices"}  # format 1 had no devices
    header = json.dumps(
        {
            "format": 1,
            "config": config,
            "commit_sequence": state.commit_sequence,
            "counters": state.counters,
            "arrays": [{"name": n, "dtype": names[a.dtype], "shape": list(a.shape)} for n, a in arrays.items()],
        }
    ).encode()
    body = b"LMEMSNAP" + struct.pack("<IQ", 1, len(header)) + header
    body += b"".join(a.numpy().tobytes() for a in arrays.values())
    return body + struct.pack("<I", zlib.crc32(body)) + b"LMEMEND!"


def test_a_format_1_snapshot_still_imports(store, tmp_path):
    source = MemoryRegistry().create("m", **CONFIG)
    write(source, range(10))
    path = tmp_path / "old.lmem"
    path.write_bytes(format_1_file(source.capture(), torch.Generator().get_state()))
    imported = store.import_memory("from-format-1", path)
    keys, values, ages = imported.slots(range(CONFIG["memory_size"]))
    assert torch.equal(keys, source.keys) and torch.equal(values, source.values) and torch.equal(ages, source.ages)
    assert imported.info().stats["commit_sequence"] == source.commit_sequence
    damaged = bytearray(path.read_bytes())
    damaged[-20] ^= 1  # in the dropped generator state: still covered by the checksum
    path.write_bytes(bytes(damaged))
    with pytest.raises(InvalidArgument, match="checksum"):
        store.import_memory("damaged", path)
