"""Faults a hostile or careless user can cause: administration racing writes, damaged data directories,
a full disk, oversized queries, unbounded tables. Each case causes the fault and checks that nothing
acknowledged is lost and that a refused call leaves every memory as it was."""

from __future__ import annotations

import errno
import json
import os
import struct
import subprocess
import threading

import pytest
import torch

from lifelong_memory.client import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
    connect,
)
from lifelong_memory.server import persistence
from lifelong_memory.server.memory import KeysAtCommit, Memory, MemoryConfig
from lifelong_memory.server.persistence import scan_segment, segments, snapshot_chunks
from lifelong_memory.server.registry import MemoryRegistry
from lifelong_memory.server.service import ServerLimits, build_server

CONFIG = dict(key_dim=8, memory_size=48, choose_k=6, age_noise=3.0, seed=5)
STATE = ("keys", "values", "ages", "generations", "recent_labels", "recent_slots")


def batch(step: int, size: int = 4, dim: int = 8, labels: int = 12):
    generator = torch.Generator().manual_seed(step)
    y = torch.randint(0, labels, (size,), generator=generator)
    return torch.nn.functional.normalize(torch.randn(size, dim, generator=generator), dim=1), y


def write(memory, steps) -> None:
    for step in steps:
        memory.query(*batch(step, dim=memory.config.key_dim), update=True)


def assert_same(a: Memory, b: Memory) -> None:
    x, y = a.capture(), b.capture()
    assert x.commit_sequence == y.commit_sequence
    for name in STATE:
        assert torch.equal(getattr(x, name), getattr(y, name)), name


def durable_with_twin(tmp_path, steps: int) -> tuple[MemoryRegistry, Memory, Memory]:
    """A memory "m" with a data directory and its twin without one, after the same ``steps`` writes."""
    registry = MemoryRegistry(data_dir=tmp_path)
    memory, live = registry.create("m", **CONFIG), MemoryRegistry().create("twin", **CONFIG)
    write(memory, range(steps))
    write(live, range(steps))
    return registry, memory, live


def reopen(registry: MemoryRegistry, **options) -> MemoryRegistry:
    """What a restarted server finds after a SIGKILL: the files as they are, the directory lock released."""
    registry.storage.close()
    return MemoryRegistry(data_dir=registry.storage.root, **options)


def hold_search(memory: Memory) -> tuple[threading.Event, threading.Event]:
    """Make the memory's next search wait (holding the memory's lock) until released."""
    entered, release = threading.Event(), threading.Event()
    search = memory.index.search

    def held(queries, k, empty_slots=0):
        entered.set()
        assert release.wait(30)
        return search(queries, k, empty_slots)

    memory.index.search = held
    return entered, release


# ----------------------------------------------------------------- delete racing a write


@pytest.mark.parametrize("durable", [True, False])
def test_a_write_racing_delete_fails_or_lands_before_it_and_never_in_another_memory(tmp_path, durable):
    registry = MemoryRegistry(data_dir=tmp_path) if durable else MemoryRegistry()
    doomed = registry.create("a", key_dim=16, memory_size=512, choose_k=8)
    entered, release = hold_search(doomed)
    outcome = {}

    def write_doomed():
        try:
            outcome["commit"] = doomed.query(*batch(1, size=64, dim=16), update=True).commit_sequence
        except NotFound as exc:
            outcome["error"] = exc

    writer = threading.Thread(target=write_doomed)
    writer.start()
    assert entered.wait(30)
    deleter = threading.Thread(target=registry.delete, args=("a",))
    deleter.start()
    deleter.join(0.2)
    assert deleter.is_alive(), "the delete must wait for the write in progress"
    other = registry.create("b", key_dim=8, memory_size=64, choose_k=4)  # reuses whatever a delete freed
    release.set()
    writer.join(30)
    deleter.join(30)
    assert outcome.get("commit") == 1 or "error" in outcome
    with pytest.raises(NotFound):
        registry.get("a")
    with pytest.raises(NotFound):
        doomed.query(*batch(2, dim=16))
    write(other, range(3))
    assert other.commit_sequence == 3
    if durable:
        records = [r for _, path in segments(tmp_path / "memories" / "b") for r in scan_segment(path).records]
        assert [sequence for sequence, _, _ in records] == [1, 2, 3]
        assert all(delta.keys.shape[1] == 8 for _, _, delta in records)
        restarted = reopen(registry)
        assert [name for name, _ in restarted.list()] == ["b"]
        assert_same(restarted.get("b"), other)


def test_calls_after_a_delete_answer_not_found_on_both_transports(store):
    memory = store.create_memory("deleted", **CONFIG)
    store.delete_memory("deleted")
    with pytest.raises(NotFound):
        memory.query(*batch(0), update=True)
    with pytest.raises(NotFound):
        store.delete_memory("deleted")


# ------------------------------------------------------------------------- recovery


def three_snapshot_history(tmp_path):
    """30 writes with snapshots at 10 and 20, then a SIGKILL: snapshots 10 and 20, segments from 11 and 21."""
    registry = MemoryRegistry(data_dir=tmp_path)
    memory = registry.create("m", **CONFIG)
    live = MemoryRegistry().create("twin", **CONFIG)
    for steps in (range(0, 10), range(10, 20)):
        write(memory, steps)
        write(live, steps)
        registry.snapshot("m")
    write(memory, range(20, 30))
    write(live, range(20, 30))
    folder = tmp_path / "memories" / "m"
    assert [first for first, _ in segments(folder)] == [11, 21]
    assert [p.name for p in sorted(folder.glob("snapshot-*"))] == [f"snapshot-{s:020d}.lmem" for s in (10, 20)]
    return registry, live, folder


def flip_byte(path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_damage_to_a_covered_segment_loses_nothing_and_deletes_nothing(tmp_path, damage):
    registry, live, folder = three_snapshot_history(tmp_path)
    covered, needed = (path for _, path in segments(folder))
    if damage == "flip":
        flip_byte(covered, covered.stat().st_size // 2)
    else:
        with open(covered, "r+b") as f:
            f.truncate(covered.stat().st_size // 2)
    covered_bytes, needed_bytes = covered.read_bytes(), needed.read_bytes()
    recovered = reopen(registry).get("m")
    assert_same(recovered, live)  # snapshot 20 + segment 21: writes 21-30 are all there
    assert needed.read_bytes() == needed_bytes
    assert covered.read_bytes() == covered_bytes  # not needed, so not touched


def test_a_damaged_record_in_the_needed_log_stops_replay_there_and_keeps_the_files(tmp_path, caplog):
    registry, _, folder = three_snapshot_history(tmp_path)
    segment_11, segment_21 = (path for _, path in segments(folder))
    snapshot_20 = folder / f"snapshot-{20:020d}.lmem"
    flip_byte(snapshot_20, snapshot_20.stat().st_size - 100)  # so the log from 11 on is needed
    records = scan_segment(segment_11).records
    damaged_offset = records[4][1]  # write 15
    flip_byte(segment_11, damaged_offset + 30)
    original_11, original_21 = segment_11.read_bytes(), segment_21.read_bytes()

    restarted = reopen(registry)
    recovered = restarted.get("m")
    expected = MemoryRegistry().create("twin", **CONFIG)
    write(expected, range(14))
    assert_same(recovered, expected)  # snapshot 10, then writes 11-14: replay stopped at the damage
    assert f"{segment_11.name} at byte {damaged_offset}: checksum mismatch" in caplog.text
    aside = {p.name.split(".")[0]: p for p in (folder / "damaged").iterdir()}
    assert aside[segment_11.stem].read_bytes() == original_11  # the damaged segment, whole
    assert aside[segment_21.stem].read_bytes() == original_21  # and what followed it
    assert aside[snapshot_20.stem].exists()
    assert segment_11.read_bytes() == original_11[:damaged_offset]  # its good records stay in the log
    # The memory goes on, and a second crash recovers it exactly.
    write(recovered, range(100, 105))
    write(expected, range(100, 105))
    assert_same(reopen(restarted).get("m"), expected)


def damage_middle_record(path, index: int) -> None:
    flip_byte(path, scan_segment(path).records[index][1] + 30)


def tear_last_record(path) -> None:
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 10)


SNAPSHOT_10, SNAPSHOT_20 = f"snapshot-{10:020d}.lmem", f"snapshot-{20:020d}.lmem"
SEGMENT_11, SEGMENT_21 = f"wal-{11:020d}.log", f"wal-{21:020d}.log"


@pytest.mark.parametrize(
    "damaged, harm, recovered_at",
    [
        (["config.json"], lambda p: p.write_bytes(b"{not json"), None),
        ([SNAPSHOT_20], lambda p: flip_byte(p, p.stat().st_size - 100), 30),  # snapshot 10 + log 11-30
        ([SNAPSHOT_10], lambda p: flip_byte(p, p.stat().st_size - 100), 30),  # snapshot 20 + log 21-30
        ([SNAPSHOT_10, SNAPSHOT_20], lambda p: p.write_bytes(p.read_bytes()[:-9]), None),  # the log from 1 is gone
        ([SEGMENT_11], lambda p: damage_middle_record(p, 3), 30),  # covered by snapshot 20
        ([SEGMENT_21], lambda p: damage_middle_record(p, 4), 24),  # stops at the damage
        ([SEGMENT_21], tear_last_record, 29),  # an unfinished last append
        ([SNAPSHOT_20, SEGMENT_11], lambda p: flip_byte(p, p.stat().st_size - 100), 19),  # 10, log to the damage at 20
    ],
    ids=[
        "config",
        "newest-snapshot",
        "older-snapshot",
        "both-snapshots",
        "covered-segment",
        "needed-segment",
        "torn-tail",
        "newest-snapshot-and-its-log",
    ],
)
def test_damage_to_each_kind_of_file_loses_nothing_recoverable(tmp_path, damaged, harm, recovered_at):
    registry, _, folder = three_snapshot_history(tmp_path)
    bystander = registry.create("bystander", **CONFIG)
    write(bystander, range(50, 53))
    for name in damaged:
        harm(folder / name)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    restarted = reopen(registry)
    assert_same(restarted.get("bystander"), bystander)
    aside = {p.name.split(".")[0]: p.read_bytes() for p in (folder / "damaged").glob("*")}
    for name, content in before.items():  # every file is still there, or whole in damaged/
        now = (folder / name).read_bytes() if (folder / name).exists() else None
        if now != content and aside.get(name.split(".")[0]) != content:
            # Only an unfinished last record may be cut: a write that was never acknowledged.
            assert recovered_at == 29 and name == SEGMENT_21 and content.startswith(now), name
    if recovered_at is None:
        with pytest.raises(FailedPrecondition, match="could not be recovered"):
            restarted.get("m")
        return
    expected = MemoryRegistry().create("twin", **CONFIG)
    write(expected, range(recovered_at))
    assert_same(restarted.get("m"), expected)


def test_describe_tells_what_recovery_set_aside(tmp_path, capsys):
    from lifelong_memory.client.cli import main
    from lifelong_memory.server.service import build_server

    registry, _, folder = three_snapshot_history(tmp_path)
    registry.create("intact", **CONFIG)
    (_, segment_21) = segments(folder)[-1]
    damaged_offset = scan_segment(segment_21).records[4][1]  # write 25
    flip_byte(segment_21, damaged_offset + 30)
    restarted = reopen(registry)
    server, port = build_server("127.0.0.1:0", restarted)
    server.start()
    try:
        url = f"grpc://127.0.0.1:{port}"
        with connect(url) as store:
            report = store.memory("m").info().recovery
            assert f"{segment_21.name} at byte {damaged_offset}: checksum mismatch" in report
            assert "replay stopped at write 24" in report and "damaged/" in report
            assert store.memory("intact").info().recovery == ""
        assert main(["describe", "m", "--url", url]) == 0
        assert f"recovery: {segment_21.name} at byte {damaged_offset}" in capsys.readouterr().out
    finally:
        server.stop(grace=None)


def test_a_snapshot_of_another_memory_in_the_folder_is_set_aside(tmp_path):
    registry, memory, live = durable_with_twin(tmp_path, 5)
    stranger = MemoryRegistry().create("other", **{**CONFIG, "key_dim": 16})
    write(stranger, range(3))
    foreign = tmp_path / "memories" / "m" / f"snapshot-{99:020d}.lmem"
    foreign.write_bytes(b"".join(snapshot_chunks(stranger.capture())))
    restarted = reopen(registry)
    assert_same(restarted.get("m"), live)
    assert not foreign.exists() and any((tmp_path / "memories" / "m" / "damaged").iterdir())


@pytest.mark.parametrize(
    "failure",
    [torch.OutOfMemoryError("CUDA out of memory"), RuntimeError("anything at all"), MemoryError()],
    ids=["out-of-memory", "runtime-error", "memory-error"],
)
def test_any_failure_to_recover_one_memory_leaves_the_others_served(tmp_path, monkeypatch, failure):
    registry = MemoryRegistry(data_dir=tmp_path)
    for name, seed in (("a", 1), ("b", 2), ("c", 3)):
        write(registry.create(name, **{**CONFIG, "seed": seed}), range(3))
        registry.snapshot(name)
    registry.storage.close()
    build = Memory.__init__

    def fails_for_b(self, config, *args, **kwargs):
        if config.seed == 2:
            raise failure
        build(self, config, *args, **kwargs)

    monkeypatch.setattr(Memory, "__init__", fails_for_b)
    restarted = MemoryRegistry(data_dir=tmp_path)
    assert [name for name, _ in restarted.list()] == ["a", "c"]
    with pytest.raises(FailedPrecondition, match=f"'b' could not be recovered .*{type(failure).__name__}"):
        restarted.get("b")
    assert sorted(p.name for p in (tmp_path / "memories" / "b").iterdir()) == [
        "config.json",
        f"snapshot-{3:020d}.lmem",
        f"wal-{1:020d}.log",
    ]  # its files are left as they were, for a retry


# ------------------------------------------------------------------------ disk full


def disk_full_after(budget: int):
    """A _write_all that writes ``budget`` more bytes, then fails part-way as a full disk does."""
    written = [0]
    real = persistence._write_all

    def write_all(fd, data):
        room = budget - written[0]
        if room >= len(data):
            written[0] += len(data)
            return real(fd, data)
        real(fd, data[: max(room, 0)])
        written[0] = budget
        raise OSError(errno.ENOSPC, "No space left on device")

    return write_all


def test_a_write_refused_for_a_full_disk_leaves_no_trace(tmp_path, monkeypatch):
    registry, memory, live = durable_with_twin(tmp_path, 10)
    ((_, segment),) = segments(tmp_path / "memories" / "m")
    size, before = segment.stat().st_size, memory.capture()
    monkeypatch.setattr(persistence, "_write_all", disk_full_after(50))  # half a record fits
    for attempt in range(3):
        with pytest.raises(ResourceExhausted, match="disk full"):
            memory.query(*batch(10 + attempt), update=True)
    with pytest.raises(ResourceExhausted, match="disk full"):
        memory.clear()
    assert segment.stat().st_size == size  # cut back to the last whole record
    assert_same(memory, live)
    assert memory.stats()["commit_sequence"] == before.commit_sequence == 10
    memory.query(batch(10)[0])  # reads go on: nothing is in doubt
    monkeypatch.undo()  # space is freed: writes go on, and the refused ones were never there
    write(memory, range(20, 25))
    write(live, range(20, 25))
    assert_same(memory, live)
    assert_same(reopen(registry).get("m"), live)


@pytest.fixture
def small_disk(tmp_path):
    """A real 1 MiB file system (tmpfs), to fill up."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)]).returncode:
        pytest.skip("mounting a small tmpfs needs root")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=True)


def test_a_really_full_disk_refuses_writes_and_creates_without_a_trace(small_disk):
    registry = MemoryRegistry(data_dir=small_disk / "data")
    memory = registry.create("m", **CONFIG)
    live = MemoryRegistry().create("twin", **CONFIG)
    filler = small_disk / "filler"
    with open(filler, "wb", buffering=0) as f:  # take every free block
        with pytest.raises(OSError) as full:
            while True:
                f.write(b"\0" * 4096)
    assert full.value.errno == errno.ENOSPC
    refused = None
    for step in range(200):  # what is left of the log's last block fills first
        try:
            memory.query(*batch(step), update=True)
        except ResourceExhausted as exc:
            refused = exc
            break
        live.query(*batch(step), update=True)
    assert refused is not None and "disk full" in str(refused)
    assert_same(memory, live)  # the refused write is nowhere
    with pytest.raises(ResourceExhausted, match="disk full.*could not be created"):
        registry.create("another", **CONFIG)
    assert [p.name for p in (small_disk / "data" / "memories").iterdir()] == ["m"]
    filler.unlink()  # room again: writes go on
    write(memory, range(300, 305))
    write(live, range(300, 305))
    assert_same(reopen(registry).get("m"), live)


# ------------------------------------------ a rotation that fails, a write that fails after it is logged


def failing_directory_syncs(times: int | None):
    """fsync_directory failing with EIO its next ``times`` calls (None: every call)."""
    real, left = persistence.fsync_directory, [times]

    def sync(path):
        if left[0] is None or left[0] > 0:
            left[0] = None if left[0] is None else left[0] - 1
            raise OSError(errno.EIO, "Input/output error")
        real(path)

    return sync


def no_room_for_a_new_segment(fd, data):
    """A full disk whose last free bytes are in the current segment's last block: records fit, a new file's
    first block (its magic) does not."""
    if data == persistence.WAL_MAGIC:
        raise OSError(errno.ENOSPC, "No space left on device")
    os.write(fd, data)


def assert_named_by_first_record(folder) -> None:
    """Recovery reads a segment's name as its first record."""
    for first, path in segments(folder):
        records = scan_segment(path).records
        assert not records or records[0][0] == first, path.name


@pytest.mark.parametrize(
    "patch, attribute, fails",
    [
        (no_room_for_a_new_segment, "_write_all", False),
        (failing_directory_syncs(1), "fsync_directory", False),  # the new segment's folder entry, once
        (failing_directory_syncs(None), "fsync_directory", True),  # the folder cannot be synced at all
    ],
    ids=["disk-full", "folder-sync-once", "folder-sync-always"],
)
def test_a_rotation_that_cannot_make_its_segment_loses_no_acknowledged_write(tmp_path, monkeypatch, patch, attribute,
                                                                             fails):  # fmt: skip
    registry, memory, live = durable_with_twin(tmp_path, 5)
    registry.snapshot("m")  # the log starts a new segment at the next write
    folder = tmp_path / "memories" / "m"
    monkeypatch.setattr(persistence, attribute, patch)
    if fails:  # no new segment, and the half-made one cannot be removed for good: no write is taken
        with pytest.raises(Unavailable, match="could not be removed either"):
            memory.query(*batch(5), update=True)
        with pytest.raises(FailedPrecondition, match="write-ahead log failed"):
            memory.query(batch(5)[0])
    else:  # the rotation is put off: the writes go on in the current segment, acknowledged
        write(memory, range(5, 10))
        write(live, range(5, 10))
        assert_same(memory, live)
    monkeypatch.undo()
    assert_named_by_first_record(folder)
    registry = reopen(registry)
    recovered = registry.get("m")
    assert_same(recovered, live)
    assert recovered.recovery_report == ""
    write(recovered, range(10, 13))
    write(live, range(10, 13))
    assert_same(reopen(registry).get("m"), live)


@pytest.mark.parametrize("stray", ["empty", "magic-only"])
def test_segments_without_a_record_left_by_earlier_versions_hide_nothing(tmp_path, monkeypatch, stray):
    """Before a failed rotation removed its half-made segment, every write after it left one behind while the
    records went on in the old segment; recovery took the strays' names for first records and lost them."""
    registry, memory, live = durable_with_twin(tmp_path, 5)
    registry.snapshot("m")
    folder = tmp_path / "memories" / "m"
    monkeypatch.setattr(persistence, "remove_durably", lambda path: None)  # the earlier versions
    monkeypatch.setattr(
        persistence, *(("_write_all", no_room_for_a_new_segment) if stray == "empty" else
                       ("fsync_directory", failing_directory_syncs(1)))
    )  # fmt: skip
    write(memory, range(5, 10))
    write(live, range(5, 10))
    monkeypatch.undo()
    left = [path.name for _, path in segments(folder) if path.stat().st_size <= len(persistence.WAL_MAGIC)]
    assert left  # what the earlier versions left behind
    registry = reopen(registry)
    recovered = registry.get("m")
    assert_same(recovered, live)
    for name in left:
        assert f"{name} holds no record" in recovered.recovery_report
    assert_named_by_first_record(folder)
    write(recovered, range(10, 13))
    write(live, range(10, 13))
    registry = reopen(registry)
    assert_same(registry.get("m"), live)
    registry.snapshot("m")  # the snapshot drops what it covers, and only that
    write(registry.get("m"), range(13, 15))
    write(live, range(13, 15))
    assert_same(reopen(registry).get("m"), live)


def test_a_write_that_fails_after_it_is_logged_fails_the_log_and_is_recovered(tmp_path, monkeypatch):
    registry, memory, live = durable_with_twin(tmp_path, 5)

    def out_of_memory(self, *args):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 MiB")

    monkeypatch.setattr(Memory, "_commit", out_of_memory)
    with pytest.raises(Unavailable, match="in the write-ahead log but could not be applied"):
        memory.query(*batch(5), update=True)
    monkeypatch.undo()
    with pytest.raises(FailedPrecondition, match="write-ahead log failed"):  # the log holds what the memory lacks
        memory.query(*batch(6), update=True)
    write(live, range(5, 6))  # the logged write counts, and nothing after it was taken
    assert_same(reopen(registry).get("m"), live)


def test_a_memory_without_a_log_whose_write_fails_midway_answers_nothing_more():
    """Half a write (values and commit changed, the index not) cannot be undone or recovered: the memory says
    so instead of answering from an index that disagrees with its keys."""
    registry = MemoryRegistry()
    memory = registry.create("m", **CONFIG)
    write(memory, range(3))

    def out_of_memory(slots, keys):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 bytes")

    memory.index.update = out_of_memory
    with pytest.raises(FailedPrecondition, match="a write failed midway .* no log to recover from"):
        memory.query(*batch(3), update=True)
    with pytest.raises(FailedPrecondition, match="delete it"):
        memory.query(batch(4)[0])
    registry.delete("m")
    assert registry.list() == []


@pytest.mark.parametrize("call", ["clear", "write"])
def test_a_write_that_cannot_copy_for_a_streamed_snapshot_is_refused_and_not_logged(tmp_path, monkeypatch, call):
    """A clear during an export copies every key the export has yet to read: the allocation that fails is
    refused before the log records anything, so the next write takes the same place in the log."""
    registry, memory, live = durable_with_twin(tmp_path, 5)
    exporting, at_capture = memory.capture(streamed=True), memory.capture().keys

    def out_of_memory(self, targets):
        raise MemoryError("cannot allocate memory")

    monkeypatch.setattr(KeysAtCommit, "before_write", out_of_memory)
    with pytest.raises(ResourceExhausted, match="the memory is unchanged"):
        memory.clear() if call == "clear" else memory.query(*batch(5), update=True)
    monkeypatch.undo()
    assert_same(memory, live)
    write(memory, range(5, 10))
    write(live, range(5, 10))
    assert torch.equal(torch.cat(list(exporting.keys.chunks(16))), at_capture)  # the export reads on, unharmed
    assert_same(reopen(registry).get("m"), live)


def test_create_on_a_full_disk_is_refused_and_leaves_nothing(tmp_path, monkeypatch):
    registry = MemoryRegistry(data_dir=tmp_path)
    registry.create("kept", **CONFIG)
    monkeypatch.setattr(persistence, "_write_all", disk_full_after(0))
    with pytest.raises(ResourceExhausted, match="disk full.*could not be created"):
        registry.create("new", **CONFIG)
    assert [name for name, _ in registry.list()] == ["kept"]
    assert [p.name for p in (tmp_path / "memories").iterdir()] == ["kept"]
    monkeypatch.undo()
    registry.create("new", **CONFIG)  # the name is free


def test_delete_after_a_log_failure_completes(tmp_path, monkeypatch):
    registry = MemoryRegistry(data_dir=tmp_path)
    memory = registry.create("m", **CONFIG)
    write(memory, range(3))

    def broken_fsync(fd):
        raise OSError(errno.EIO, "Input/output error")

    with monkeypatch.context() as patch:
        patch.setattr(persistence.os, "fsync", broken_fsync)
        with pytest.raises(Exception, match="not durable"):
            write(memory, range(3, 4))
    assert registry.close() == ["m"]  # not snapshotted at shutdown, and said so
    registry = MemoryRegistry(data_dir=tmp_path)
    memory = registry.get("m")
    with monkeypatch.context() as patch:
        patch.setattr(persistence.os, "fsync", broken_fsync)
        with pytest.raises(Exception, match="not durable"):
            write(memory, range(4, 5))
    registry.delete("m")
    assert registry.list() == [] and not (tmp_path / "memories" / "m").exists()
    with pytest.raises(NotFound):
        registry.get("m")


def test_delete_that_cannot_remove_the_folder_changes_nothing(tmp_path, monkeypatch):
    registry = MemoryRegistry(data_dir=tmp_path)
    memory = registry.create("m", **CONFIG)
    write(memory, range(3))
    real_rename = persistence.os.rename

    def failing_rename(src, dst, *args, **kwargs):
        if ".deleted-" in str(dst):
            raise OSError(errno.EIO, "Input/output error")
        return real_rename(src, dst, *args, **kwargs)

    monkeypatch.setattr(persistence.os, "rename", failing_rename)
    with pytest.raises(Exception, match="could not be deleted; it is unchanged"):
        registry.delete("m")
    monkeypatch.undo()
    assert registry.get("m") is memory
    write(memory, range(3, 5))  # still live, still durable
    assert reopen(registry).get("m").commit_sequence == 5


@pytest.mark.parametrize("fails", ["once", "always"])
def test_delete_whose_rename_cannot_be_synced_is_undone_durably_or_takes_no_more_writes(tmp_path, monkeypatch, fails):
    registry = MemoryRegistry(data_dir=tmp_path)
    memory = registry.create("m", **CONFIG)
    write(memory, range(3))
    monkeypatch.setattr(persistence, "fsync_directory", failing_directory_syncs(1 if fails == "once" else None))
    if fails == "once":  # the rename back is synced: the memory is as it was, and goes on
        with pytest.raises(Unavailable, match="could not be deleted; it is unchanged"):
            registry.delete("m")
        monkeypatch.undo()
        write(memory, range(3, 5))
        assert reopen(registry).get("m").commit_sequence == 5
        return
    with pytest.raises(Unavailable, match="undoing that could not be made durable"):
        registry.delete("m")
    with pytest.raises(FailedPrecondition, match="write-ahead log failed"):  # nothing a start could remove
        write(memory, range(3, 4))
    monkeypatch.undo()
    assert reopen(registry).get("m").commit_sequence == 3


def test_recovery_syncs_its_copy_of_a_damaged_segment_before_cutting_the_original(tmp_path, monkeypatch):
    registry, _, folder = three_snapshot_history(tmp_path)
    (_, segment_21) = segments(folder)[-1]
    damage_middle_record(segment_21, 4)
    events, real_fsync, real_truncate = [], persistence.os.fsync, persistence._truncate

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def truncate(path, size):
        events.append(("truncate", str(path)))
        real_truncate(path, size)

    monkeypatch.setattr(persistence.os, "fsync", fsync)
    monkeypatch.setattr(persistence, "_truncate", truncate)
    reopen(registry)
    (copy,) = (folder / "damaged").iterdir()
    cut = events.index(("truncate", str(segment_21)))
    assert ("fsync", str(copy)) in events[:cut]


# -------------------------------------------------------------------- bounded queries


def test_a_query_too_big_for_its_working_memory_is_refused_before_any_work():
    registry = MemoryRegistry(memory_budget_bytes=512 << 20)
    memory = registry.create("m", key_dim=128, memory_size=8192)
    write(memory, range(2))
    searches = []
    search = memory.index.search
    memory.index.search = lambda q, k, empty=0: searches.append(k) or search(q, k, empty)
    before = memory.capture()
    queries = torch.nn.functional.normalize(torch.randn(256, 128), dim=1)
    for fields in ({"neighbors", "neighbor_keys"}, {"neighbors", "weights"}):
        with pytest.raises(ResourceExhausted, match="k: a query of 256 rows with k = 8192"):
            memory.query(queries, k=8192, fields=fields)
    with pytest.raises(ResourceExhausted, match="k: a query of 256 rows"):
        memory.query(queries, torch.zeros(256, dtype=torch.int64), k=8192, update=True)
    assert searches == []
    assert_same_state(memory.capture(), before)
    memory.query(queries, k=256, fields={"neighbors", "neighbor_keys"})  # a training-sized one is served


def assert_same_state(x, y) -> None:
    assert x.commit_sequence == y.commit_sequence and x.counters == y.counters
    for name in STATE:
        assert torch.equal(getattr(x, name), getattr(y, name)), name


def test_a_reply_over_the_message_limit_is_refused_before_any_work():
    from lifelong_memory.server.service import ServerLimits, build_server

    registry = MemoryRegistry()
    server, port = build_server("127.0.0.1:0", registry, ServerLimits(max_message_bytes=4 << 20), max_workers=4)
    server.start()
    try:
        with connect(f"grpc://127.0.0.1:{port}") as store:
            remote = store.create_memory("m", key_dim=64, memory_size=4096, choose_k=16)
            remote.query(*batch(0, dim=64), update=True)
            memory = registry.get("m")
            searches = []
            search = memory.index.search
            memory.index.search = lambda q, k, empty=0: searches.append(k) or search(q, k, empty)
            queries = torch.nn.functional.normalize(torch.randn(64, 64), dim=1)
            with pytest.raises(ResourceExhausted, match="fields: the reply to 64 rows with k = 4096"):
                remote.query(queries, k=4096, fields={"neighbors", "neighbor_keys"})
            assert searches == []
            assert remote.info().stats["queries"] == 4
            remote.query(queries, k=2048, fields={"neighbors"})  # 2.6 MB: served
    finally:
        server.stop(grace=None)


# --------------------------------------------------------------- the recent-label table


def test_the_recent_label_table_holds_at_most_memory_size_labels(tmp_path):
    registry = MemoryRegistry(data_dir=tmp_path)
    memory = registry.create("m", key_dim=8, memory_size=16, choose_k=4)
    for step in range(200):  # 800 distinct labels, four per write
        queries = batch(step, dim=8)[0]
        memory.query(queries, torch.arange(4 * step, 4 * step + 4), update=True)
        assert len(memory.recent) <= 16
    assert list(memory.recent) == list(range(784, 800))  # the most recently written labels, oldest first
    assert memory.stats()["recent_labels"] == 16
    _, path, size = registry.snapshot("m")
    assert size < 8192  # proportional to the memory, not to the labels ever seen
    restarted = reopen(registry).get("m")
    assert list(restarted.recent.items()) == list(memory.recent.items())
    small = MemoryConfig(key_dim=8, memory_size=16).footprint(1)["cpu"]
    large = MemoryConfig(key_dim=8, memory_size=32).footprint(1)["cpu"]
    assert large - small >= 16 * 160  # the table is counted in the memory budget


def test_a_label_written_again_moves_to_the_end_of_the_table():
    memory = MemoryRegistry().create("m", key_dim=8, memory_size=4, choose_k=2, age_noise=0.0)
    for label in (0, 1, 2, 3):
        memory.query(batch(label, size=1)[0], torch.tensor([label]), update=True)
    memory.query(batch(9, size=1)[0], torch.tensor([0]), update=True)  # label 0 again
    memory.query(batch(10, size=1)[0], torch.tensor([7]), update=True)  # a fifth label: 1 is forgotten
    assert list(memory.recent) == [2, 3, 0, 7]


# ---------------------------------------------------------------------- smaller ones


def test_an_import_header_announcing_a_huge_array_is_invalid_argument(store, tmp_path):
    source = MemoryRegistry().create("src", **CONFIG)
    write(source, range(3))
    data = b"".join(snapshot_chunks(source.capture()))
    prefix = len(persistence.SNAPSHOT_MAGIC) + 12  # magic, format version, header length
    (header_length,) = struct.unpack_from("<Q", data, prefix - 8)
    header = json.loads(data[prefix : prefix + header_length])
    header["arrays"][4]["shape"] = [2**62]  # recent_labels
    new_header = json.dumps(header).encode()
    crafted = data[: prefix - 8] + struct.pack("<Q", len(new_header)) + new_header + data[prefix + header_length :]
    path = tmp_path / "crafted.lmem"
    path.write_bytes(crafted)
    with pytest.raises(InvalidArgument, match="data: .*truncated"):
        store.import_memory("crafted", path)
    assert "crafted" not in {info.name for info in store.list_memories()}


def with_header(data: bytes, change) -> bytes:
    """A snapshot's bytes with ``change`` applied to its JSON header (the checksum is not redone)."""
    prefix = len(persistence.SNAPSHOT_MAGIC) + 12  # magic, format version, header length
    (header_length,) = struct.unpack_from("<Q", data, prefix - 8)
    header = json.loads(data[prefix : prefix + header_length])
    change(header)
    new_header = json.dumps(header).encode()
    return data[: prefix - 8] + struct.pack("<Q", len(new_header)) + new_header + data[prefix + header_length :]


def set_array_spec(index: int, spec):
    def change(header):
        header["arrays"][index] = spec

    return change


@pytest.mark.parametrize(
    "change, error",
    [
        (set_array_spec(0, {"name": "keys", "dtype": "float32", "shape": [0, 2**40]}), "array keys has shape"),
        (set_array_spec(2, {"name": "ages", "dtype": "float32", "shape": [2**40]}), "array ages has shape"),
        (set_array_spec(0, {"name": "keys", "dtype": "float32", "shape": 32}), "array keys: bad dtype or shape"),
        (set_array_spec(0, {"name": "keys", "shape": [48, 8]}), "array keys: bad dtype or shape"),
        (set_array_spec(0, [48, 8]), "bad header"),
    ],
    ids=["no-rows-wide-keys", "huge-ages", "shape-not-a-list", "no-dtype", "spec-not-an-object"],
)
def test_an_import_whose_arrays_do_not_fit_its_config_is_refused_before_allocating(store, tmp_path, change, error):
    source = MemoryRegistry().create("src", **CONFIG)
    write(source, range(3))
    path = tmp_path / "crafted.lmem"
    path.write_bytes(with_header(b"".join(snapshot_chunks(source.capture())), change))
    with pytest.raises(InvalidArgument, match=f"data: .*{error}"):
        store.import_memory("crafted", path)
    assert "crafted" not in {info.name for info in store.list_memories()}


@pytest.mark.parametrize(
    "change, error",
    [
        (lambda state: state.counters.update(bogus=1), "counters .* must be among"),
        (lambda state: state.counters.update(writes=-7), "counters .* must be among"),
        (lambda state: setattr(state, "commit_sequence", 2**63 - 1), "commit_sequence .* is not in"),
        (lambda state: state.ages.__setitem__(0, -5.0), "ages must be whole numbers"),
        (lambda state: state.ages.__setitem__(0, 0.5), "ages must be whole numbers"),
        (lambda state: state.ages.__setitem__(0, 1e30), "ages must be whole numbers"),
        (lambda state: state.generations.__setitem__(0, 10**6), "generations must be in"),
        (lambda state: state.writer_counters.__setitem__(0, (-1, 0)), "writer table's counts"),
    ],
    ids=["unknown-counter", "negative-counter", "commit-overflow", "negative-age", "half-age", "huge-age",
         "future-generation", "negative-writer-count"],
)  # fmt: skip
def test_an_import_whose_state_no_memory_can_hold_is_invalid_argument(store, tmp_path, change, error):
    source = MemoryRegistry().create("src", **CONFIG)
    write(source, range(3))
    state = source.capture()
    change(state)
    path = tmp_path / "crafted.lmem"
    path.write_bytes(b"".join(snapshot_chunks(state)))
    with pytest.raises(InvalidArgument, match=f"data: .*{error}"):
        store.import_memory("crafted", path)
    assert "crafted" not in {info.name for info in store.list_memories()}
    store.list_memories()  # and every memory is still listed


def test_an_import_beyond_the_budget_is_refused_from_its_header_before_any_array_is_read(tmp_path):
    data = b"".join(snapshot_chunks(Memory(MemoryConfig(**CONFIG)).capture()))
    header_only = tmp_path / "header-only.lmem"  # the arrays cut off: reading any would fail as truncated
    prefix = len(persistence.SNAPSHOT_MAGIC) + 12  # magic, format version, header length
    (header_length,) = struct.unpack_from("<Q", data, prefix - 8)
    header_only.write_bytes(data[: prefix + header_length])
    registry = MemoryRegistry(memory_budget_bytes=MemoryConfig(**CONFIG).footprint(4096)["cpu"] - 1)
    server, port = build_server("127.0.0.1:0", registry, ServerLimits())
    server.start()
    try:
        with connect(f"grpc://127.0.0.1:{port}") as store:
            with pytest.raises(ResourceExhausted, match="config.memory_size"):
                store.import_memory("big", header_only)
            assert store.list_memories() == []
    finally:
        server.stop(grace=None)


def test_shards_are_capped(store):
    with pytest.raises(InvalidArgument, match=r"config.shards: must be in \[1, 256\]"):
        store.create_memory("sharded", key_dim=8, memory_size=200_000, shards=200_000)


def test_the_budget_error_says_exactly_what_is_missing():
    registry = MemoryRegistry(memory_budget_bytes=MemoryConfig(key_dim=64, memory_size=1000).footprint(4096)["cpu"])
    with pytest.raises(ResourceExhausted) as error:
        registry.create("m", key_dim=64, memory_size=1001)
    needed = MemoryConfig(key_dim=64, memory_size=1001).footprint(4096)["cpu"]
    assert f"({needed:,} bytes)" in str(error.value) and f"({registry.memory_budget_bytes:,} bytes)" in str(error.value)
