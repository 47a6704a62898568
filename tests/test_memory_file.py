"""The bulk load (client/memory_file.py) and a restore that adopts the keys it read instead of copying them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lifelong_memory.client import InvalidArgument, write_memory_file
from lifelong_memory.server import persistence
from lifelong_memory.server.memory import Memory, MemoryConfig

D, M, ROWS = 64, 200, 32
CONFIG = dict(key_dim=D, memory_size=M, choose_k=8, age_noise=0.0)


def unit_rows(n: int, seed: int) -> torch.Tensor:
    x = torch.randn(n, D, generator=torch.Generator().manual_seed(seed))
    return x / torch.linalg.vector_norm(x, dim=1, keepdim=True)


def exported(store, name: str, path) -> persistence.MemoryState:
    store.export_memory(name, path)
    return persistence.read_snapshot_file(path)


@pytest.mark.parametrize("entries", [150, M], ids=["part-filled", "full"])
def test_the_file_holds_the_memory_that_writing_the_entries_in_order_makes(store, tmp_path, entries):
    keys = unit_rows(entries, seed=1)
    # Distinct labels, so that every row writes (a repeated label may find its earlier entry nearest and merge).
    labels = torch.randperm(10 * entries, generator=torch.Generator().manual_seed(2))[:entries]
    written = store.create_memory("written", **CONFIG)
    for start in range(0, entries, ROWS):
        stop = min(entries, start + ROWS)
        result = written.query(keys[start:stop], labels[start:stop], update=True)
        assert result.written_slots.tolist() == list(range(start, stop))  # a fresh memory fills slots in order

    path = tmp_path / "bulk.lmem"
    blocks = (keys[i : i + 50].numpy() for i in range(0, entries, 50))  # a generator: streamed once
    config = write_memory_file(path, blocks, labels.numpy(), rows_per_commit=ROWS, **CONFIG)
    assert config == MemoryConfig(**CONFIG).validated()
    loaded = store.import_memory("loaded", path)

    a, b = exported(store, "written", tmp_path / "a.lmem"), exported(store, "loaded", tmp_path / "b.lmem")
    assert a.commit_sequence == b.commit_sequence == -(-entries // ROWS)
    for name in ("keys", "values", "ages", "generations", "writers", "recent_labels", "recent_slots"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert a.counters | {"queries": 0} == b.counters == {"queries": 0, "writes": entries, "merges": 0}
    # And both go on alike: the same answers and the same writes.
    for step in range(3):
        queries, query_labels = unit_rows(ROWS, seed=10 + step), torch.arange(ROWS) % 60
        x = written.query(queries, query_labels, update=True)
        y = loaded.query(queries, query_labels, update=True)
        assert torch.equal(x.neighbor_slots, y.neighbor_slots) and torch.equal(x.written_slots, y.written_slots)


def test_the_recent_table_holds_each_label_s_last_entry_least_recent_first(tmp_path):
    path = tmp_path / "repeats.lmem"
    write_memory_file(path, unit_rows(7, seed=2), [5, 3, 5, 9, 3, 3, 8], rows_per_commit=2, **CONFIG)
    state = persistence.read_snapshot_file(path)
    assert state.recent_labels.tolist() == [5, 9, 3, 8] and state.recent_slots.tolist() == [2, 3, 5, 6]
    assert state.generations[:8].tolist() == [1, 1, 2, 2, 3, 3, 4, 0]
    assert state.ages[:8].tolist() == [3, 3, 2, 2, 1, 1, 0, 4]  # an empty slot is the oldest: never written


def test_a_writer_tag_marks_every_entry(tmp_path):
    path = tmp_path / "tagged.lmem"
    write_memory_file(path, unit_rows(10, seed=2), torch.arange(10), writer="encoder-v1", **CONFIG)
    state = persistence.read_snapshot_file(path)
    assert state.writer_names == ["", "encoder-v1"] and state.writer_counters == [(0, 0), (10, 0)]
    assert state.writers[:10].tolist() == [1] * 10 and not state.writers[10:].any()


@pytest.mark.parametrize(
    "keys, values, options, field",
    [
        (unit_rows(10, 3) * 1.01, torch.arange(10), {}, "keys"),
        (unit_rows(10, 3)[:, :8], torch.arange(10), {}, "keys"),
        (torch.full((10, D), float("nan")), torch.arange(10), {}, "keys"),
        (unit_rows(10, 3), torch.arange(9), {}, "keys"),
        (unit_rows(10, 3), torch.arange(11), {}, "keys"),
        (unit_rows(10, 3), torch.arange(10) - 1, {}, "values"),
        (unit_rows(10, 3), torch.arange(10) * 0.5, {}, "values"),
        (unit_rows(10, 3), torch.arange(10), {"memory_size": 8}, "values"),
        (unit_rows(10, 3), torch.arange(10), {"rows_per_commit": 0}, "rows_per_commit"),
        (unit_rows(10, 3), torch.arange(10), {"writer": "no spaces"}, "writer"),
        (unit_rows(10, 3), torch.arange(10), {"age_noise": -1.0}, "config.age_noise"),
    ],
    ids=[
        "not-unit",
        "wrong-dim",
        "nan",
        "more-keys",
        "fewer-keys",
        "negative-label",
        "float-labels",
        "too-many",
        "rows-per-commit",
        "writer",
        "config",
    ],
)
def test_bad_input_names_the_argument_and_writes_nothing(tmp_path, keys, values, options, field):
    path = tmp_path / "bad.lmem"
    with pytest.raises(InvalidArgument) as raised:
        write_memory_file(path, keys, values, **{**CONFIG, **options})
    assert raised.value.field == field
    assert list(tmp_path.iterdir()) == []


def test_a_restore_adopts_the_keys_it_read_rather_than_copying_them(tmp_path):
    path = tmp_path / "m.lmem"
    write_memory_file(path, unit_rows(100, seed=4), np.arange(100), **CONFIG)
    state = persistence.read_snapshot_file(path)
    buffer = state.padded_keys
    assert buffer.shape == (M + 1, D) and not buffer[M].any()
    memory = Memory(state.config, state)
    assert memory.keys.data_ptr() == buffer.data_ptr() and state.keys is None
    with pytest.raises(ValueError, match="handed to another memory"):
        Memory(state.config, state)
    # A state captured from a live memory is copied: the two memories stay apart.
    captured = memory.capture()
    copy = Memory(captured.config, captured)
    copy.query(unit_rows(4, seed=5), torch.arange(4) + 500, update=True)
    assert torch.equal(memory.keys, captured.keys) and not torch.equal(copy.keys, captured.keys)
