"""Many trainers at once: several processes stream fused query+updates into one memory.

Checked after the fact: commit sequence numbers are unique and gap-free (one
commit order), and replaying every acknowledged request serially in that order
on a fresh embedded memory reproduces each acknowledged response and the final
state exactly (no lost, torn or reordered write; ages consistent). Age noise
is on: the noise generator is consumed in commit order, so the replay matches.
"""

from __future__ import annotations

import multiprocessing

import torch
from crash_harness import client_batch

from lifelong_memory.client import connect

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
