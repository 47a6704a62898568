"""The write choice without a pass over every slot (server/age_order.py, Memory._oldest): the slots it
chooses are exactly the rule's, evaluated directly over every slot (age + noise, merged-into slots left
out, largest first, ties to the lower slot), for random histories, noise widths, exclusions and ages at
float32's limit; and in a full memory it scores a band of slots near the oldest, not the memory."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lifelong_memory.server import memory as memory_module
from lifelong_memory.server.age_order import AgeOrder
from lifelong_memory.server.memory import MAX_AGE, Memory, MemoryConfig, age_noise


def rule(memory: Memory, count: int, excluded: np.ndarray) -> list[int]:
    """The rule over every slot, written out directly."""
    size = memory.config.memory_size
    score = memory.ages.clone()
    if memory.config.age_noise:
        noise = age_noise(memory.config.seed, memory.commit_sequence + 1, np.arange(size), memory.config.age_noise)
        score = torch.from_numpy(noise) + memory.ages
    score[torch.from_numpy(excluded)] = -math.inf
    order = sorted(range(size), key=lambda slot: (-float(score[slot]), slot))
    return order[:count]


def with_ages(memory: Memory, ages, commit: int) -> None:
    """Give ``memory`` these ages at this commit (the stamps they imply), as a restore would."""
    memory.commit_sequence = commit
    memory._touched = commit - np.asarray(ages, dtype=np.int64)
    memory._age_order = AgeOrder(memory._touched)


def test_oldest_ties_go_to_the_lower_slot():
    memory = Memory(MemoryConfig(key_dim=4, memory_size=16, choose_k=2, age_noise=0.0))
    with_ages(memory, [3, 7, 7, 1, 7, 0, 3, 7, 2, 2, 2, 2, 9, 0, 0, 0], commit=20)
    # 12 is merged into (excluded, though the oldest).
    assert memory._oldest(6, np.array([12])).tolist() == [1, 2, 4, 7, 0, 6]


@pytest.mark.parametrize("half_width", [0.0, 0.5, 3.0, 40.0])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_choice_is_the_rule_s_over_a_random_history(half_width, seed):
    generator = np.random.default_rng(seed)
    size = int(generator.integers(20, 300))
    memory = Memory(MemoryConfig(key_dim=4, memory_size=size, choose_k=2, age_noise=half_width, seed=seed))
    for _ in range(200):  # writes and merges of random slots: ages with ties, gaps and stale log entries
        count = int(generator.integers(1, min(size, 24) + 1))
        targets = torch.from_numpy(np.unique(generator.integers(0, size, count)))
        keys = torch.nn.functional.normalize(torch.randn(len(targets), 4), dim=1)
        delta = memory_module.Delta(targets, keys, targets, targets, targets, len(targets))
        memory._prepare_commit(delta)()
        count = int(generator.integers(1, size + 1))
        excluded = np.unique(generator.integers(0, size, int(generator.integers(0, 8))))
        assert memory._oldest(count, excluded).tolist() == rule(memory, count, excluded)
    assert len(memory._age_order) <= 2 * size + 24  # compacted as it went


def test_a_slot_up_to_2a_younger_than_the_count_th_oldest_can_win():
    """The band must reach 2a below the count-th oldest age: 10 slots of age 100 and 50 of age 100 - 1.5a,
    10 rows; over several commits' noise some of the younger slots outscore some of the oldest."""
    half_width = 10.0
    memory = Memory(MemoryConfig(key_dim=4, memory_size=60, choose_k=2, age_noise=half_width, seed=7))
    younger_won = 0
    for commit in range(200, 240):
        with_ages(memory, [100] * 10 + [85] * 50, commit=commit)
        chosen = memory._oldest(10, np.array([], dtype=np.int64))
        assert chosen.tolist() == rule(memory, 10, np.array([], dtype=np.int64))
        younger_won += int((chosen >= 10).sum())
    assert younger_won > 0


def test_ages_stop_at_float32_s_limit_as_the_rule_counts_them():
    memory = Memory(MemoryConfig(key_dim=4, memory_size=64, choose_k=2, age_noise=4.0, seed=3))
    ages = np.concatenate([np.full(20, MAX_AGE), MAX_AGE - np.arange(20), np.arange(24)])
    with_ages(memory, ages + np.arange(64) % 3, commit=MAX_AGE + 1000)
    assert float(memory.ages.max()) == MAX_AGE
    for count in (1, 5, 30, 64):
        assert memory._oldest(count, np.array([0, 21])).tolist() == rule(memory, count, np.array([0, 21]))


def test_more_rows_than_slots_outside_the_merged_ones():
    memory = Memory(MemoryConfig(key_dim=4, memory_size=8, choose_k=2, age_noise=2.0, seed=5))
    with_ages(memory, [5, 4, 3, 2, 1, 0, 0, 1], commit=9)
    excluded = np.array([0, 1, 2, 3, 4])
    assert memory._oldest(6, excluded).tolist() == rule(memory, 6, excluded)


def test_a_full_memory_scores_a_band_near_the_oldest_not_every_slot(monkeypatch):
    size, batch, half_width = 16384, 16, 8.0
    memory = Memory(MemoryConfig(key_dim=8, memory_size=size, choose_k=4, age_noise=half_width, seed=1))
    queries = torch.nn.functional.normalize(
        torch.randn(size + 64 * batch, 8, generator=torch.Generator().manual_seed(0))
    )
    for start in range(0, size, 64):  # fill: every slot written once, 64 per commit
        memory.query(queries[start : start + 64], torch.arange(start, start + 64), update=True, use_recent=False)
    scored = []
    real_noise = memory_module.age_noise
    monkeypatch.setattr(
        memory_module,
        "age_noise",
        lambda seed, commit, slots, a: scored.append(len(slots)) or real_noise(seed, commit, slots, a),
    )
    for step in range(64):  # new labels: every row writes the oldest slots
        rows = slice(size + step * batch, size + (step + 1) * batch)
        memory.query(queries[rows], torch.arange(size + step * batch, size + (step + 1) * batch), update=True)
    assert len(scored) == 64
    # The fill wrote 64 slots per commit: the band holds the slots of about 2a + 1 commits past the oldest.
    assert max(scored) <= 64 * (2 * half_width + 3) < size / 8
