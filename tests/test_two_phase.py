"""The two-phase form: Query, then Update with the query's ticket."""

from __future__ import annotations

import pytest
import torch

from lifelong_memory.client import InvalidArgument

CONFIG = dict(key_dim=8, memory_size=32, choose_k=4, age_noise=0.0)


def unit(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x, dim=-1)


def test_query_then_update_equals_fused(store):
    fused = store.create_memory("fused", **CONFIG)
    two_phase = store.create_memory("two-phase", **CONFIG)
    generator = torch.Generator().manual_seed(3)
    centres = unit(torch.randn(6, 8, generator=generator))
    merges = 0
    for _ in range(25):
        labels = torch.randint(0, 6, (4,), generator=generator)
        queries = unit(centres[labels] + 0.2 * torch.randn(4, 8, generator=generator))
        a = fused.query(queries, labels, update=True)
        b = two_phase.query(queries, labels)
        u = two_phase.update(queries, labels, b)
        assert u.revalidated_rows == 0
        assert torch.equal(a.written_slots, u.written_slots)
        assert torch.equal(a.incorrect, u.incorrect)
        merges += int((~u.incorrect).sum())
    assert merges > 0
    for x, y in zip(fused.slots(range(32)), two_phase.slots(range(32)), strict=True):
        assert torch.equal(x, y)


def test_update_notices_a_rewritten_slot_and_never_merges_into_a_stranger(store):
    memory = store.create_memory("stale", **{**CONFIG, "memory_size": 4})
    ours = unit(torch.ones(1, 8))
    memory.query(ours, torch.tensor([7]), update=True)  # label 7 -> slot 0
    result = memory.query(ours, torch.tensor([7]))
    assert result.positive_slots.tolist() == [0] and not bool(result.incorrect[0])

    # Another trainer writes four new labels: slots 1, 2, 3, then 0 (the oldest) is overwritten.
    stranger = None
    for label in (1, 2, 3, 4):
        stranger = unit(torch.randn(1, 8, generator=torch.Generator().manual_seed(label)))
        memory.query(stranger, torch.tensor([label]), update=True)
    keys, values, _ = memory.slots([0])
    assert values.tolist() == [4]

    update = memory.update(ours, torch.tensor([7]), result)
    assert update.revalidated_rows == 1
    assert bool(update.incorrect[0]), "label 7 is gone: the row must write, not merge"
    assert update.written_slots.tolist() == [1]  # the oldest slot now
    keys_after, values_after, _ = memory.slots([0, 1])
    assert torch.equal(keys_after[0], keys[0]) and values_after[0] == 4, "the stranger's slot was touched"
    assert values_after[1] == 7


def test_a_fused_result_cannot_be_updated_again(store):
    memory = store.create_memory("fused-once", **CONFIG)
    queries, labels = unit(torch.ones(1, 8)), torch.tensor([3])
    fused = memory.query(queries, labels, update=True)
    assert fused.ticket is None
    with pytest.raises(InvalidArgument) as error:
        memory.update(queries, labels, fused)
    assert error.value.field == "result"


def test_a_ticket_from_a_memory_made_again_under_its_name_has_every_row_queried_again(store):
    """Delete and create again: the same slot is written at the same commit, so slot and generation alone
    would call the old ticket fresh and merge this row into the new memory's stranger."""
    config = dict(key_dim=8, memory_size=4, choose_k=4, age_noise=0.0)
    ours, stranger, label = unit(torch.ones(1, 8)), unit(-torch.ones(1, 8)), torch.tensor([7])
    memory = store.create_memory("again", **config)
    memory.query(ours, label, update=True)  # commit 1: slot 0
    result = memory.query(ours, label)  # relies on slot 0 at generation 1
    store.delete_memory("again")
    memory = store.create_memory("again", **config)
    memory.query(stranger, label, update=True)  # commit 1 again: slot 0, another key
    assert memory.read_slots([0]).generations.tolist() == [1]
    update = memory.update(ours, label, result)
    assert update.revalidated_rows == 1
    assert update.incorrect.tolist() == [True] and update.written_slots.tolist() != [0]  # a write, not a merge
    keys, _, _ = memory.slots([0])
    assert torch.equal(keys, stranger)  # the stranger's key is untouched


def test_a_ticket_outlives_a_restart_but_not_an_import(tmp_path):
    from lifelong_memory.client import connect

    config = dict(key_dim=8, memory_size=32, choose_k=4, age_noise=0.0)
    queries, labels = unit(torch.randn(4, 8, generator=torch.Generator().manual_seed(0))), torch.arange(4)
    with connect("local", data_dir=tmp_path / "data") as store:
        memory = store.create_memory("kept", **config)
        memory.query(queries, labels, update=True)
        result = memory.query(queries, labels)
        store.export_memory("kept", tmp_path / "kept.lmem")
    with connect("local", data_dir=tmp_path / "data") as store:  # restarted: snapshot and log, one history
        assert store.memory("kept").update(queries, labels, result).revalidated_rows == 0
        imported = store.import_memory("copy", tmp_path / "kept.lmem")
        assert store.memory(imported.name).update(queries, labels, result).revalidated_rows == 4
