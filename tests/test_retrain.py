"""Retraining a faiss-ivf memory's quantizer (Memory.retrain_index): queries and writes go on while it trains,
the slots written meanwhile land in the new lists where a fresh build over the same keys puts them, and the
log replays the retrain at its place in the commit order, so a recovered memory answers exactly as before."""

from __future__ import annotations

import threading

import pytest
import torch
from test_approximate import clustered, write_stream

from lifelong_memory.client import FailedPrecondition, ResourceExhausted
from lifelong_memory.server import memory as memory_module
from lifelong_memory.server.index import build_index
from lifelong_memory.server.memory import Memory, MemoryConfig
from lifelong_memory.server.registry import MemoryRegistry

D = 32
CONFIG = dict(key_dim=D, memory_size=2048, choose_k=16, backend="faiss-ivf", ivf_lists=8, ivf_probes=2, age_noise=2.0)
QUERIES = torch.nn.functional.normalize(torch.randn(256, D, generator=torch.Generator().manual_seed(77)), dim=1)
LABELS = torch.randint(0, 64, (256,), generator=torch.Generator().manual_seed(78))


def same_answers(a: Memory, b: Memory) -> None:
    x, y = a.query(QUERIES, LABELS), b.query(QUERIES, LABELS)
    for field in ("neighbor_slots", "neighbor_similarities", "positive_slots", "negative_slots"):
        assert torch.equal(getattr(x, field), getattr(y, field)), field


@pytest.mark.parametrize("shards, codes", [(1, "flat"), (2, "sq8")])
def test_queries_and_writes_go_on_while_it_trains_and_the_new_lists_are_a_fresh_build(monkeypatch, shards, codes):
    memory = Memory(MemoryConfig(**CONFIG, shards=shards, ivf_codes=codes))
    write_stream(memory, 40, seed=1)
    old = memory.index.state()
    training, release = threading.Event(), threading.Event()

    def built_then_held(*args):  # the new lists hold the keys as they were: the writes below must be caught up
        index = build_index(*args)
        training.set()
        assert release.wait(30)
        return index

    monkeypatch.setattr(memory_module, "build_index", built_then_held)
    results = []
    retrain = threading.Thread(target=lambda: results.append(memory.retrain_index()))
    retrain.start()
    assert training.wait(30)
    before = memory.commit_sequence
    written = set()
    for step in range(5):  # the memory's lock is free: every one of these completes while the retrain waits
        queries, labels = clustered(32, 1024, 0.4, seed=500 + step)
        written |= set(memory.query(queries, labels + 5000, update=True).written_slots.tolist())
    assert memory.commit_sequence == before + 5 and retrain.is_alive()
    release.set()
    retrain.join(30)
    (result,) = results
    assert result.commit_sequence == before + 6 == memory.commit_sequence
    assert result.rewritten_slots == len(written) and result.seconds > 0
    new = memory.index.state()
    assert new.keys() == old.keys() and any(not torch.equal(new[name], old[name]) for name in new)
    # The live index (built beside the writes, then caught up) answers as one built now over these keys.
    fresh = build_index(memory.keys, memory.config, 16, new)
    for a, b in zip(memory.index.search(QUERIES, 16), fresh.search(QUERIES, 16), strict=True):
        assert torch.equal(a, b)


def test_the_log_replays_a_retrain_at_its_place_in_the_commit_order(tmp_path):
    registry = MemoryRegistry(data_dir=tmp_path)
    memory = registry.create("m", **CONFIG)
    write_stream(memory, 40, seed=2)
    registry.snapshot("m")
    write_stream(memory, 10, seed=3)
    memory.retrain_index()
    write_stream(memory, 10, seed=4)
    live_state = memory.index.state()
    registry.storage.close()  # a restart without a final snapshot: the retrain comes back from the log alone
    recovered = MemoryRegistry(data_dir=tmp_path).get("m")
    assert recovered.commit_sequence == memory.commit_sequence
    assert all(torch.equal(recovered.index.state()[name], t) for name, t in live_state.items())
    same_answers(recovered, memory)
    for target in (recovered, memory):  # and they go on alike
        write_stream(target, 5, seed=5)
    same_answers(recovered, memory)


def test_a_snapshot_after_a_retrain_keeps_the_new_quantizer(tmp_path):
    registry = MemoryRegistry(data_dir=tmp_path)
    memory = registry.create("m", **CONFIG)
    write_stream(memory, 40, seed=6)
    memory.retrain_index()
    registry.snapshot("m")
    registry.storage.close()
    recovered = MemoryRegistry(data_dir=tmp_path).get("m")
    same_answers(recovered, memory)


def test_only_a_faiss_ivf_memory_with_a_key_per_list_retrains(store):
    exact = store.create_memory("exact", key_dim=D, memory_size=64)
    with pytest.raises(FailedPrecondition, match="config.backend"):
        exact.retrain_index()
    ivf = store.create_memory("ivf", **CONFIG)
    ivf.query(QUERIES[:7], LABELS[:7], update=True)
    sequence = ivf.info().stats["commit_sequence"]
    with pytest.raises(FailedPrecondition, match="config.ivf_lists: shard 0 holds 7 keys, fewer than its 8 lists"):
        ivf.retrain_index()
    assert ivf.info().stats["commit_sequence"] == sequence
    ivf.query(QUERIES[7:64], LABELS[7:64], update=True)
    ivf.retrain_index()  # trained early
    ivf.clear()
    sequence = ivf.info().stats["commit_sequence"]
    with pytest.raises(FailedPrecondition, match="config.ivf_lists: shard 0 holds 0 keys, fewer than its 8 lists"):
        ivf.retrain_index()
    assert ivf.info().stats["commit_sequence"] == sequence


def test_a_retrain_before_the_first_fill_trains_early_and_the_log_replays_it(tmp_path):
    registry = MemoryRegistry(data_dir=tmp_path)
    memory = registry.create("m", **CONFIG)
    write_stream(memory, 2, seed=8)  # 64 keys: far below the 512 of the first fill
    assert memory.index.shards[0].index is None
    memory.retrain_index()
    assert memory.index.shards[0].index is not None
    early = memory.index.state()["shard0.centroids"]
    write_stream(memory, 30, seed=9)  # past the first fill: the early quantizer stays
    assert torch.equal(memory.index.state()["shard0.centroids"], early)
    fresh = Memory(MemoryConfig(**CONFIG))
    write_stream(fresh, 2, seed=8)
    write_stream(fresh, 30, seed=9)
    assert not torch.equal(fresh.index.state()["shard0.centroids"], early)  # trained at its first fill instead
    registry.storage.close()
    recovered = MemoryRegistry(data_dir=tmp_path).get("m")
    assert torch.equal(recovered.index.state()["shard0.centroids"], early)
    same_answers(recovered, memory)


def test_retrain_over_grpc_and_embedded(store):
    memory = store.create_memory("ivf", **CONFIG)
    for step in range(40):
        queries, labels = clustered(32, 1024, 0.3, seed=900 + step)
        memory.query(queries, labels + 1024 * step, update=True)
    sequence = memory.info().stats["commit_sequence"]
    result = memory.retrain_index()
    assert result.commit_sequence == sequence + 1 == memory.info().stats["commit_sequence"]
    assert result.rewritten_slots == 0


def test_the_second_index_a_retrain_builds_counts_in_the_footprint_and_against_the_budget(monkeypatch):
    config = MemoryConfig(**CONFIG)
    footprint = config.footprint(4096)["cpu"]
    assert config.retrain_bytes() > 2048 * D * 4, "the new lists hold every key again"
    during = []

    def built(*args):  # what describe shows while the new index is built
        during.append(registry.get("ivf").footprint()["cpu"])
        return build_index(*args)

    registry = MemoryRegistry(memory_budget_bytes=footprint + config.retrain_bytes())
    write_stream(registry.create("ivf", **CONFIG), 20, seed=3)
    monkeypatch.setattr(memory_module, "build_index", built)
    registry.retrain_index("ivf")
    monkeypatch.undo()
    assert during == [footprint + config.retrain_bytes()]
    assert registry.get("ivf").footprint()["cpu"] == footprint, "and no longer once it is swapped in"

    tight = MemoryRegistry(memory_budget_bytes=footprint + config.retrain_bytes() - 1)
    memory = tight.create("ivf", **CONFIG)
    write_stream(memory, 20, seed=3)
    before = memory.commit_sequence
    with pytest.raises(ResourceExhausted, match=r"name: retraining 'ivf' builds a second index of .* budget are left"):
        tight.retrain_index("ivf")
    assert memory.commit_sequence == before and len(during) == 1
