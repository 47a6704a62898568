"""Snapshots and exports stream the keys (KeysAtCommit) instead of copying the memory first: what they
write is the memory at the commit they started at, whatever is written or cleared while they are read; what
they hold meanwhile counts in the memory's footprint and is bounded by max_query_bytes."""

from __future__ import annotations

import gc
import io

import pytest
import torch

from lifelong_memory.server import persistence
from lifelong_memory.server.errors import ResourceExhausted
from lifelong_memory.server.memory import DEFAULT_MAX_BATCH, KeysAtCommit, Memory, MemoryConfig
from lifelong_memory.server.registry import MemoryRegistry

CONFIG = MemoryConfig(key_dim=128, memory_size=8192, choose_k=16, age_noise=2.0, seed=4)  # keys: 4 chunks of 1 MiB


def unit_rows(rows: int, seed: int) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.randn(rows, 128, generator=torch.Generator().manual_seed(seed)), dim=1)


def written_memory() -> Memory:
    memory = Memory(CONFIG)
    for step in range(40):
        memory.query(unit_rows(256, step), torch.arange(step * 256, (step + 1) * 256), update=True)
    return memory


@pytest.mark.parametrize("then_clear", [False, True])
def test_a_streamed_snapshot_is_the_memory_at_its_commit_while_writes_go_on(then_clear):
    memory = written_memory()
    expected = memory.capture()
    chunks = persistence.snapshot_chunks(memory.capture(streamed=True))
    data = [next(chunks), next(chunks), next(chunks)]  # the header and the first two chunks of keys
    for step in range(6):  # writes spread over every slot: some behind the reader, most ahead of it
        memory.query(unit_rows(512, 100 + step), torch.arange(512) + 90_000 + 512 * step, update=True)
    if then_clear:
        memory.clear()
        memory.query(unit_rows(64, 200), torch.arange(64), update=True)
    data += list(chunks)
    restored = persistence.read_snapshot(io.BytesIO(b"".join(data)))
    assert restored.commit_sequence == expected.commit_sequence < memory.commit_sequence
    for name in ("keys", "values", "ages", "generations", "writers", "recent_labels", "recent_slots"):
        assert torch.equal(getattr(restored, name), getattr(expected, name)), name
    assert not memory._streamed_keys  # read to the end: no longer told about writes


def test_only_the_keys_of_slots_written_ahead_of_the_reader_are_kept():
    memory = written_memory()
    keys = memory.capture(streamed=True).keys
    assert isinstance(keys, KeysAtCommit)
    blocks = keys.chunks(2048)
    next(blocks)  # slots 0-2047 read
    written = memory.query(unit_rows(64, 300), torch.arange(64) + 50_000, update=True).written_slots.tolist()
    assert any(slot < 2048 for slot in written) and any(slot >= 2048 for slot in written)
    assert set(keys._saved) == {slot for slot in written if slot >= 2048}


def test_a_streamed_capture_dropped_unread_stops_saving_keys():
    memory = written_memory()
    state = memory.capture(streamed=True)
    assert len(memory._streamed_keys) == 1
    del state
    gc.collect()
    assert len(memory._streamed_keys) == 0
    memory.query(unit_rows(8, 400), torch.arange(8) + 70_000, update=True)  # nothing left to tell


def held_copies(state) -> int:
    """Bytes of a capture's copies of the arrays besides the keys."""
    arrays = [state.values, state.ages, state.generations, state.recent_labels, state.recent_slots, state.writers]
    return sum(a.numel() * a.element_size() for a in arrays)


def test_the_footprint_counts_what_a_capture_holds_until_it_is_read_abandoned_or_dropped():
    memory = written_memory()
    own = memory.footprint()["cpu"]
    state = memory.capture(streamed=True)
    assert memory.footprint()["cpu"] == own + held_copies(state)
    blocks = state.keys.chunks(2048)
    next(blocks)
    written = memory.query(unit_rows(64, 300), torch.arange(64) + 50_000, update=True).written_slots.tolist()
    ahead = len({slot for slot in written if slot >= 2048})
    assert ahead and memory.footprint()["cpu"] == own + held_copies(state) + ahead * 128 * 4
    next(blocks)  # slots 2048-4095: their saved keys are handed over
    ahead_after = len({slot for slot in written if slot >= 4096})
    assert memory.footprint()["cpu"] == own + held_copies(state) + ahead_after * 128 * 4
    list(blocks)
    assert memory.footprint()["cpu"] == own, "read to the end"

    blocks = memory.capture(streamed=True).keys.chunks(2048)
    next(blocks)
    memory.clear()  # freezes the 6,144 keys left to read
    assert memory.footprint()["cpu"] > own + 6144 * 128 * 4
    blocks.close()
    assert memory.footprint()["cpu"] == own, "abandoned"

    state = memory.capture(streamed=True)
    memory.query(unit_rows(64, 301), torch.arange(64) + 60_000, update=True)
    del state
    gc.collect()
    assert memory.footprint()["cpu"] == own, "dropped unread"


@pytest.mark.parametrize("then_clear", [False, True])
def test_a_write_that_would_make_a_capture_keep_more_than_max_query_bytes_ends_it_and_goes_on(then_clear):
    memory, twin = written_memory(), written_memory()
    memory.max_query_bytes = 1024 * 128 * 4  # the keys of 1,024 slots (and a query of 256 rows)
    own = memory.footprint()["cpu"]
    blocks = memory.capture(streamed=True).keys.chunks(2048)
    next(blocks)
    for m in (memory, twin):  # at most 64 slots ahead of the reader: kept
        m.query(unit_rows(64, 300), torch.arange(64) + 50_000, update=True)
    assert memory._streamed_keys
    for m in (memory, twin):
        if then_clear:  # the 6,144 keys left to read
            m.clear()
        else:  # about 3 in 4 of 2,048 slots ahead
            for step in range(8):
                m.query(unit_rows(256, 310 + step), torch.arange(256) + 60_000 + 256 * step, update=True)
    after, expected = memory.capture(), twin.capture()
    assert after.commit_sequence == expected.commit_sequence
    for name in ("keys", "values", "ages", "generations", "writers", "recent_labels", "recent_slots"):
        assert torch.equal(getattr(after, name), getattr(expected, name)), f"the write went on: {name}"
    assert not memory._streamed_keys and memory.footprint()["cpu"] == own, "it copies and holds nothing more"
    with pytest.raises(ResourceExhausted, match=r"had not read yet .* \(0\.5 MiB, lmem serve --max-query-mb\)"):
        next(blocks)
    memory.query(unit_rows(8, 302), torch.arange(8) + 70_000, update=True)
    chunks = persistence.snapshot_chunks(memory.capture(streamed=True))  # the next one, with no writes meanwhile
    restored = persistence.read_snapshot(io.BytesIO(b"".join(chunks)))
    assert torch.equal(restored.keys, memory.keys)


def test_a_create_counts_the_captures_being_read_against_the_budget():
    config = dict(key_dim=128, memory_size=8192, choose_k=16)
    footprint = MemoryConfig(**config).footprint(DEFAULT_MAX_BATCH)["cpu"]
    registry = MemoryRegistry(memory_budget_bytes=2 * footprint + 1024)
    exported = registry.create("exported", **config)
    state = exported.capture(streamed=True)  # its copies of values, ages, ...: more than 1 KiB
    with pytest.raises(ResourceExhausted, match="config.memory_size: .* memory budget there are left"):
        registry.create("second", **config)
    del state
    gc.collect()
    registry.create("second", **config)
