"""Search: the canonical order of neighbours; bfloat16 search: approximate candidates, exact float32
similarities, high recall."""

from __future__ import annotations

import logging

import pytest
import torch

from lifelong_memory.server import devices
from lifelong_memory.server.index import FILLED_SEARCH_MAX_SHARE, TorchFlatIndex, build_index
from lifelong_memory.server.memory import Memory, MemoryConfig, _canonical, _canonical_on_host


def filled(search_dtype: str, shards: int) -> Memory:
    memory = Memory(
        MemoryConfig(key_dim=64, memory_size=4096, choose_k=32, age_noise=0.0, search_dtype=search_dtype, shards=shards)
    )
    generator = torch.Generator().manual_seed(0)
    for _ in range(16):
        keys = torch.nn.functional.normalize(torch.randn(256, 64, generator=generator), dim=1)
        memory.query(keys, torch.randint(0, 1000, (256,), generator=generator), update=True)
    return memory


def test_bfloat16_search_returns_exact_similarities_and_high_recall():
    exact, approximate = filled("float32", 1), filled("bfloat16", 3)
    assert torch.equal(exact.keys, approximate.keys)
    queries = torch.nn.functional.normalize(torch.randn(64, 64, generator=torch.Generator().manual_seed(1)), dim=1)
    a = exact.query(queries, fields={"neighbors"})
    b = approximate.query(queries, fields={"neighbors"})
    rescored = torch.einsum("bd,bkd->bk", queries, approximate.keys[b.neighbor_slots])
    torch.testing.assert_close(b.neighbor_similarities, rescored, rtol=0, atol=1e-6)
    assert (b.neighbor_similarities[:, :-1] >= b.neighbor_similarities[:, 1:]).all()
    recall = sum(
        len(set(x.tolist()) & set(y.tolist())) for x, y in zip(a.neighbor_slots, b.neighbor_slots, strict=True)
    )
    assert recall / a.neighbor_slots.numel() >= 0.95
    assert (a.predictions == b.predictions).float().mean() >= 0.95


def test_native_bfloat16_reads_the_cpu_flags():
    assert devices.native_bfloat16("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512_bf16\n") is True
    assert devices.native_bfloat16("processor\t: 0\nflags\t\t: fpu sse avx avx2 fma\n") is False
    assert devices.native_bfloat16("flags\t\t: avx2 amx_bf16 amx_tile\n") is True
    assert devices.native_bfloat16("Features\t: fp asimd bf16 i8mm\n") is True  # Arm
    assert devices.native_bfloat16("no flags here") is None


@pytest.mark.parametrize(
    "native, search_dtype, warned",
    [(False, "bfloat16", True), (True, "bfloat16", False), (None, "bfloat16", False), (False, "float32", False)],
)
def test_a_bfloat16_search_on_a_cpu_without_bfloat16_instructions_is_logged(
    monkeypatch, caplog, native, search_dtype, warned
):
    """torch emulates bf16 there: such a search is several times slower than float32, so the memory says so."""
    monkeypatch.setattr(devices, "cpu_has_native_bfloat16", lambda: native)
    with caplog.at_level(logging.WARNING, logger="lifelong_memory.server.index"):
        Memory(MemoryConfig(key_dim=8, memory_size=64, choose_k=8, search_dtype=search_dtype))
    logged = [r.getMessage() for r in caplog.records if r.name == "lifelong_memory.server.index"]
    assert (len(logged) == 1 and "config.search_dtype bfloat16" in logged[0]) if warned else not logged


@pytest.mark.parametrize("backend, shards", [("torch", 1), ("torch", 3), ("faiss", 1)])
def test_tied_neighbours_come_lower_slot_first_whatever_order_the_index_returns(backend, shards):
    """Each index returns its top k in an order of its own (numpy's partition, torch.topk unsorted, faiss): the
    memory orders them by similarity, equal similarities by slot."""
    memory = Memory(MemoryConfig(key_dim=8, memory_size=64, choose_k=8, age_noise=0.0, backend=backend, shards=shards))
    tied = [31, 3, 25, 9, 20, 14, 30, 21]  # eight slots holding one key: a query of that key ties them all
    generator = torch.Generator().manual_seed(2)
    keys = -torch.nn.functional.normalize(torch.rand(64, 8, generator=generator) + 0.1, dim=1)
    keys[tied] = torch.eye(8)[0]
    memory.keys.copy_(keys)
    memory.index = build_index(memory.keys, memory.config, 16)
    result = memory.query(torch.eye(8)[:1], fields={"neighbors"})
    assert result.neighbor_slots.tolist() == [sorted(tied)]
    assert (result.neighbor_similarities == 1).all()


class FixedIndex:
    """An index answering every search with the same (similarities, slots), in the order given."""

    def __init__(self, similarities: torch.Tensor, slots: torch.Tensor):
        self.answer = similarities, slots

    def search(self, queries, k, empty_slots=0):
        return self.answer


def test_the_canonical_order_holds_in_rows_with_and_without_ties_and_puts_nan_first():
    """Rows without ties are ordered by one float sort; a row with ties, or a NaN, by slot among equals."""
    generator = torch.Generator().manual_seed(3)
    slots = torch.stack([torch.randperm(60, generator=generator)[:12] for _ in range(3)])
    similarities = torch.stack(
        [
            torch.rand(12, generator=generator) + 0.5,  # distinct
            torch.tensor([0.5, 0.25, 0.75]).repeat(4),  # four slots at each of three values
            torch.rand(12, generator=generator) + 0.5,
        ]
    )
    similarities[2, [4, 9]] = float("nan")
    memory = Memory(MemoryConfig(key_dim=4, memory_size=64, choose_k=12, age_noise=0.0))
    memory.index = FixedIndex(similarities, slots)
    got_slots, got_similarities = memory._search(torch.zeros(3, 4), 12)
    for row in range(3):
        pairs = sorted(
            zip(similarities[row].tolist(), slots[row].tolist(), strict=True),
            key=lambda pair: (pair[0] == pair[0], -pair[0] if pair[0] == pair[0] else 0.0, pair[1]),
        )
        assert got_slots[row].tolist() == [slot for _, slot in pairs]
        assert torch.equal(got_similarities[row].isnan(), torch.tensor([s != s for s, _ in pairs]))


@pytest.mark.parametrize("shards", [1, 2])
def test_a_mostly_empty_shard_scores_only_its_filled_rows_and_answers_as_scoring_every_row(shards, monkeypatch):
    """From empty to full, then cleared, in batches twice a score buffer's rows: every answer and write as a
    memory whose index scores every row (similarities to float32 round-off); the search over the filled rows
    (and k empty ones) ran while those were at most FILLED_SEARCH_MAX_SHARE of a shard, and only then."""
    config = MemoryConfig(key_dim=16, memory_size=512, choose_k=16, age_noise=2.0, shards=shards)
    filled_rows, every_row = Memory(config, max_batch=4), Memory(config, max_batch=4)
    for shard in every_row.index.shards:
        shard.zero = None  # no empty-row mask: every search scores every row
    searched_rows = []
    original = TorchFlatIndex._search_rows

    def counted(self, queries, k, scored):
        searched_rows.append((len(scored), len(self.keys)))
        return original(self, queries, k, scored)

    monkeypatch.setattr(TorchFlatIndex, "_search_rows", counted)
    generator = torch.Generator().manual_seed(4)
    fields = frozenset({"neighbors", "positive_negative"})
    calls_per_step = []
    for step in range(110):
        if step == 90:
            filled_rows.clear()
            every_row.clear()
        queries = torch.nn.functional.normalize(torch.randn(8, 16, generator=generator), dim=1)
        labels = torch.randint(0, 600, (8,), generator=generator)
        before = len(searched_rows)
        got = filled_rows.query(queries, labels, update=True, fields=fields)
        want = every_row.query(queries, labels, update=True, fields=fields)
        calls_per_step.append((len(searched_rows) - before, filled_rows.empty_slots))
        assert torch.equal(got.neighbor_slots, want.neighbor_slots), step
        assert torch.allclose(got.neighbor_similarities, want.neighbor_similarities, atol=1e-6, rtol=0), step
        assert torch.equal(got.written_slots, want.written_slots) and torch.equal(got.predictions, want.predictions)
        assert torch.equal(got.positive_slots, want.positive_slots), step
        assert torch.equal(got.negative_slots, want.negative_slots), step
    assert torch.equal(filled_rows.keys, every_row.keys) and torch.equal(filled_rows.values, every_row.values)
    assert all(rows <= FILLED_SEARCH_MAX_SHARE * shard_rows for rows, shard_rows in searched_rows)
    assert calls_per_step[0][0] == 2 * shards  # a batch of 8 in two chunks of 4 per shard, on the empty memory
    assert calls_per_step[85] == (0, 0)  # full: every row is scored
    assert calls_per_step[90][0] == 2 * shards  # cleared


def test_the_filled_rows_search_offers_k_empty_rows_and_uses_no_memory_beyond_the_score_buffer():
    """Which empty rows is the index's choice (the memory answers with the lowest-numbered ones)."""
    generator = torch.Generator().manual_seed(5)
    keys = torch.zeros(64, 8)
    filled = torch.tensor([3, 17, 40, 41, 63])
    keys[filled] = torch.nn.functional.normalize(torch.randn(5, 8, generator=generator), dim=1)
    index = TorchFlatIndex(keys, 100, torch.float32, rows=3, owns_keys=False)
    buffer = index._scores.data_ptr()
    queries = torch.nn.functional.normalize(torch.randn(7, 8, generator=generator), dim=1)
    similarities, slots = index.search(queries, 8)  # three chunks of at most 3 rows
    assert index._scores.data_ptr() == buffer and index._scores.shape == (3, 64)
    lowest_empty = {100, 101, 102, 104, 105, 106, 107, 108}  # the 8 lowest rows not in ``filled``
    for row in range(7):
        exact = {100 + s: float(queries[row] @ keys[s]) for s in filled.tolist()}
        positive = {slot for slot, similarity in exact.items() if similarity > 0}
        got = dict(zip(slots[row].tolist(), similarities[row].tolist(), strict=True))
        assert len(got) == 8 and positive <= got.keys() and got.keys() - positive <= lowest_empty | exact.keys()
        for slot, similarity in got.items():
            assert similarity == pytest.approx(exact.get(slot, 0.0), abs=1e-6)
        assert all(similarity <= 0 for slot, similarity in exact.items() if slot not in got)
    keys[filled] = 0.0  # a write of zero keys empties the rows (a clear)
    index.update(filled + 100, keys[filled])
    similarities, slots = index.search(queries, 4)
    assert index.zero.count == 64 and (similarities == 0).all()
    assert all(len(set(row)) == 4 and min(row) >= 100 for row in slots.tolist())


def test_the_host_order_is_the_device_order_bit_for_bit():
    """_canonical_on_host (numpy, CPU tensors) against _canonical (torch, the path of a GPU memory), on the same
    index answers: rows without ties, with ties, with NaN and -0.0, and with empty slots scoring 0 in any order."""
    generator = torch.Generator().manual_seed(5)
    size, k = 96, 24
    for trial in range(200):
        values = torch.randint(0, 5, (size,), generator=generator)
        empty = torch.randperm(size, generator=generator)[: int(torch.randint(0, size, (), generator=generator))]
        values[empty] = -1  # EMPTY
        slots = torch.stack([torch.randperm(size, generator=generator)[:k] for _ in range(4)])
        similarities = torch.rand(4, k, generator=generator) * 2 - 1
        if trial % 2:
            similarities = (similarities * 4).round() / 4  # ties between filled slots
        similarities[values[slots] == -1] = 0.0  # an empty slot's key is zero
        if trial % 5 == 0:
            similarities[0, 3] = float("nan")
            similarities[0, 7] = -float("nan")  # the sign bit set: a NaN orders first whatever its bits
            similarities[1, 2] = -0.0
            similarities[1, 5] = 0.0
        given = values if len(empty) else None  # None: no slot is empty
        want = _canonical(similarities.clone(), slots.clone(), given, size)
        got = _canonical_on_host(similarities.clone(), slots.clone(), given, size)
        assert torch.equal(got[0], want[0])
        assert torch.equal(got[1].view(torch.int32), want[1].view(torch.int32))  # -0.0 and NaN bits too
