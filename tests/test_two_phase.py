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
