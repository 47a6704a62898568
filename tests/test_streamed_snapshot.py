"""Snapshots and exports stream the keys (KeysAtCommit) instead of copying the memory first: what they
write is the memory at the commit they started at, whatever is written or cleared while they are read."""

from __future__ import annotations

import gc
import io

import pytest
import torch

from lifelong_memory.server import persistence
from lifelong_memory.server.memory import KeysAtCommit, Memory, MemoryConfig

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
