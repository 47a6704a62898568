"""Many trainers at once: several processes stream fused query+updates into one memory.

Checked after the fact: commit sequence numbers are unique and gap-free (one
commit order), and replaying every acknowledged request serially in that order
on a fresh embedded memory reproduces each acknowledged response and the final
state exactly (no lost, torn or reordered write; ages consistent). Age noise
is on: the noise generator is consumed in commit order, so the replay matches.
"""

from __future__ import annotations

import multiprocessing
import threading

import pytest
import torch
from crash_harness import client_batch

from lifelong_memory.client import AlreadyExists, ResourceExhausted, connect
from lifelong_memory.server.memory import MemoryConfig
from lifelong_memory.server.registry import MemoryRegistry

CONFIG = dict(key_dim=16, memory_size=96, choose_k=8, age_noise=2.0, seed=7)
CLIENTS, STEPS = 4, 40


def run_client(url: str, name: str, client: int, results) -> None:
    acks = []
    with connect(url) as store, store.memory(name).stream() as stream:
        for step in range(STEPS):
            queries, labels = client_batch(client, step)
            r = stream.query(queries, labels, update=True, fields={"positive_negative"})
            acks.append((r.commit_sequence, client, step, r.written_slots.tolist(), r.predictions.tolist()))
    results.put(acks)


def test_concurrent_trainers_commit_in_one_order(server_url):
    with connect(server_url) as store:
        memory = store.create_memory("concurrent", **CONFIG)
        context = multiprocessing.get_context("spawn")
        results = context.Queue()
        processes = [
            context.Process(target=run_client, args=(server_url, "concurrent", c, results)) for c in range(CLIENTS)
        ]
        for p in processes:
            p.start()
        acks = sorted(ack for _ in processes for ack in results.get(timeout=120))
        for p in processes:
            p.join(timeout=60)
            assert p.exitcode == 0
        final_keys, final_values, final_ages = memory.slots(range(CONFIG["memory_size"]))
        final_sequence = memory.info().stats["commit_sequence"]
        store.delete_memory("concurrent")

    assert [a[0] for a in acks] == list(range(1, CLIENTS * STEPS + 1)), "commit sequence not unique and gap-free"
    assert final_sequence == CLIENTS * STEPS
    # Each client's own requests commit in the order it sent them.
    for c in range(CLIENTS):
        steps = [a[2] for a in acks if a[1] == c]
        assert steps == sorted(steps)

    with connect("local") as local:
        replay = local.create_memory("replay", **CONFIG)
        last_write: dict[int, tuple[int, int]] = {}
        for sequence, client, step, written, predictions in acks:
            queries, labels = client_batch(client, step)
            r = replay.query(queries, labels, update=True, fields={"positive_negative"})
            assert r.written_slots.tolist() == written, f"commit {sequence}: written slots differ from replay"
            assert r.predictions.tolist() == predictions, f"commit {sequence}: predictions differ from replay"
            for slot, label in zip(written, labels.tolist(), strict=True):
                last_write[slot] = (sequence, label)
        keys, values, ages = replay.slots(range(CONFIG["memory_size"]))

    torch.testing.assert_close(final_keys, keys, rtol=0, atol=1e-6)
    assert torch.equal(final_values, values)
    assert torch.equal(final_ages, ages)
    # Every written slot holds the label of its last write; its age counts commits since.
    for slot, (sequence, label) in last_write.items():
        assert int(final_values[slot]) == label
        assert float(final_ages[slot]) == final_sequence - sequence


def test_a_create_in_progress_holds_its_name_and_room_but_no_other_memory(tmp_path, monkeypatch):
    """A large import takes seconds to build and write: calls on other memories go on meanwhile, while the
    name it takes and the room it needs are already counted."""
    config = dict(key_dim=8, memory_size=1024, choose_k=4)
    footprint = MemoryConfig(**config).footprint(4096)["cpu"]
    registry = MemoryRegistry(data_dir=tmp_path, memory_budget_bytes=int(2.5 * footprint))
    other = registry.create("other", **config)
    writing, release = threading.Event(), threading.Event()
    create = registry.storage.create

    def slow_create(name, memory):
        if name == "slow":
            writing.set()
            assert release.wait(60)
        create(name, memory)

    monkeypatch.setattr(registry.storage, "create", slow_create)
    creator = threading.Thread(target=registry.create, args=("slow",), kwargs=config)
    creator.start()
    try:
        assert writing.wait(60)
        queries = torch.nn.functional.normalize(torch.randn(2, 8), dim=1)
        assert registry.get("other").query(queries, torch.arange(2), update=True).commit_sequence == 1
        with pytest.raises(AlreadyExists):
            registry.create("slow", **config)
        with pytest.raises(ResourceExhausted, match="config.memory_size"):  # "slow"'s room is taken
            registry.create("third", **config)
        assert [name for name, _ in registry.list()] == ["other"]
    finally:
        release.set()
        creator.join(60)
    assert [name for name, _ in registry.list()] == ["other", "slow"]
    assert other.commit_sequence == 1
