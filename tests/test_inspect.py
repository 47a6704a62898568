"""Memory.inspect and Memory.find_label against a known state, over both transports."""

from __future__ import annotations

import math

import pytest
import torch

from lifelong_memory.client import InvalidArgument
from lifelong_memory.server.memory import Memory, MemoryConfig


def unit(*components: float) -> list[float]:
    norm = math.sqrt(sum(c * c for c in components))
    return [c / norm for c in components]


# Step 1 writes four rows into slots 0..3 (an empty memory: every row is incorrect). Step 2 writes a
# fifth key far from all of them into the oldest slot, 4, and merges a key near slot 3's into it.
STEP_1 = (
    [unit(1, 0.2, 0.1, 0.1), unit(0.9, 0.5, 0.1, 0.1), unit(-1, -0.1, -0.2, -0.3), unit(0.1, -0.2, 1, 0.3)],
    [3, 3, 5, 7],
)
STEP_2 = ([unit(-0.2, 0.1, -0.3, 1), unit(0.1, -0.2, 1, 0.35)], [3, 7])


def known_memory(store, name: str):
    memory = store.create_memory(name, key_dim=4, memory_size=8, choose_k=4, age_noise=0.0)
    for keys, labels in (STEP_1, STEP_2):
        result = memory.query(torch.tensor(keys), torch.tensor(labels), update=True)
    assert result.written_slots.tolist() == [4, 3]  # the state the expectations below are about
    return memory


def test_inspect_reports_the_known_state(store):
    memory = known_memory(store, "inspected")
    # Ages now: slots 0-2 one update old, 3 and 4 just touched, the empty slots 5-7 two.
    report = memory.inspect(age_bins=2, top_labels=2)
    assert (report.commit_sequence, report.memory_size, report.filled_slots) == (2, 8, 5)
    assert report.fill_ratio == 5 / 8
    assert (report.queries, report.writes, report.merges) == (6, 5, 1)
    assert report.age_bin_edges == [0, 1, 2]
    assert report.age_counts == [2, 3]
    assert report.distinct_labels == 3
    assert report.top_labels == [3, 5]  # 3 holds three slots; 5 and 7 one each: the tie goes to the lower label
    assert report.top_label_counts == [3, 1]
    assert report.key_norm_min == pytest.approx(1, abs=1e-6) and report.key_norm_max == pytest.approx(1, abs=1e-6)
    assert (report.keys_off_unit, report.keys_non_finite) == (0, 0)

    wide = memory.inspect(age_bins=1, top_labels=10)
    assert (wide.age_bin_edges, wide.age_counts) == ([0, 2], [5])
    assert (wide.top_labels, wide.top_label_counts) == ([3, 5, 7], [3, 1, 1])


def test_inspect_of_an_empty_memory(store):
    report = store.create_memory("empty", key_dim=4, memory_size=8).inspect(age_bins=3)
    assert (report.filled_slots, report.fill_ratio, report.distinct_labels) == (0, 0.0, 0)
    assert (report.age_bin_edges, report.age_counts) == ([0, 1, 2, 3], [0, 0, 0])
    assert (report.top_labels, report.key_norm_min, report.key_norm_max) == ([], 0.0, 0.0)


def test_find_label(store):
    memory = known_memory(store, "labelled")
    found = memory.find_label(3)
    assert (found.commit_sequence, found.slots.tolist(), found.ages.tolist(), found.recent_slot) == (
        2,
        [0, 1, 4],
        [1.0, 1.0, 0.0],
        4,
    )
    absent = memory.find_label(11)
    assert (absent.slots.tolist(), absent.ages.tolist(), absent.recent_slot) == ([], [], -1)


@pytest.mark.parametrize(
    "call, field",
    [
        (lambda m: m.inspect(age_bins=0), "age_bins"),
        (lambda m: m.inspect(age_bins=1001), "age_bins"),
        (lambda m: m.inspect(top_labels=-1), "top_labels"),
        (lambda m: m.inspect(top_labels=2.5), "top_labels"),
        (lambda m: m.find_label(-1), "label"),
        (lambda m: m.find_label("3"), "label"),
        (lambda m: m.find_label(2**63), "label"),
        (lambda m: m.find_label(2**70), "label"),
    ],
    ids=[
        "no-bins",
        "too-many-bins",
        "negative-top",
        "float-top",
        "negative-label",
        "string-label",
        "label-2^63",
        "label-2^70",
    ],  # fmt: skip
)
def test_bad_inspection_arguments_name_the_field(store, call, field):
    memory = known_memory(store, "checked")
    before = memory.inspect()
    with pytest.raises(InvalidArgument) as raised:
        call(memory)
    assert raised.value.field == field
    assert memory.inspect() == before


def test_inspect_counts_keys_off_unit_length_and_not_finite():
    # Keys reach the memory only through validated unit queries; corrupt them directly to see the check work.
    memory = Memory(MemoryConfig(key_dim=4, memory_size=6, choose_k=4, age_noise=0.0))
    memory.query(torch.eye(4)[:3], torch.tensor([0, 1, 2]), update=True)
    memory.keys[0, 1] = math.nan
    memory.keys[1] *= 2
    report = memory.inspect()
    assert (report.keys_non_finite, report.keys_off_unit) == (1, 1)
    assert (report.key_norm_min, report.key_norm_max) == (1.0, 2.0)
