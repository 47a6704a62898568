"""Drive the service's memory and the independent numpy reference (tests/reference_memory.py) side by side
and check that they agree after every step: every result field and the full memory state.

The main tests go through the public client (`store` fixture from conftest.py: embedded "local" and a live
"grpc" server). The `*_core` tests drive lifelong_memory.server.memory.Memory directly, so the semantics
are also pinned without any transport in between.
"""

from __future__ import annotations

import functools
import itertools
import uuid

import numpy as np
import pytest
import torch
from reference_memory import EMPTY, NONE, ReferenceMemory, memory_loss

from lifelong_memory.server.memory import Memory, MemoryConfig

ATOL = 1e-5
D, K, ALPHA = 16, 8, 0.1


# ----------------------------------------------------------------------------- drivers
class CoreDriver:
    """The core Memory class, called the way the service calls it."""

    def __init__(self, *, memory_size, **config):
        self.memory_size = memory_size
        self.memory = Memory(MemoryConfig(memory_size=memory_size, **config))

    def query(self, q, y=None, *, update=False, use_recent=True):
        labels = None if y is None else torch.from_numpy(y)
        return self.memory.query(torch.from_numpy(q), labels, update=update, use_recent=use_recent)

    def state(self):
        read = self.memory.read_slots(torch.arange(self.memory_size))
        return read.keys, read.values, read.ages


class ClientDriver:
    """A memory created through the public client API (embedded or remote)."""

    def __init__(self, store, *, memory_size, **config):
        self.memory_size = memory_size
        self.memory = store.create_memory(f"equiv-{uuid.uuid4().hex[:12]}", memory_size=memory_size, **config)

    def query(self, q, y=None, *, update=False, use_recent=True):
        return self.memory.query(q, labels=y, update=update, use_recent=use_recent)

    def state(self):
        return self.memory.slots(range(self.memory_size))


@pytest.fixture
def client_driver(store):
    """Makes memories through `store` (conftest.py), which deletes them after the test."""
    return functools.partial(ClientDriver, store)


# ----------------------------------------------------------------------------- data
def unit(x):
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def clustered_stream(seed, *, steps, batch, vocab, noise):
    """Queries for a label cluster around a per-label centre, so that the same label finds its own slots
    again (correct lookups and merges) while nearby labels and a small memory still cause writes."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((vocab, D))
    for _ in range(steps):
        y = rng.integers(0, vocab, batch).astype(np.int64)
        q = unit(centres[y] + noise * rng.standard_normal((batch, D)))
        yield q, y


# ----------------------------------------------------------------------------- comparison
def as_np(x):
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def assert_read_agrees(got, want, where):
    """The fields every query returns, with or without labels."""
    np.testing.assert_array_equal(as_np(got.predictions), want.predictions, err_msg=f"{where}: predictions")
    np.testing.assert_array_equal(as_np(got.neighbor_slots), want.neighbor_slots, err_msg=f"{where}: neighbor_slots")
    np.testing.assert_array_equal(as_np(got.neighbor_values), want.neighbor_values, err_msg=f"{where}: values")
    np.testing.assert_allclose(
        as_np(got.neighbor_similarities), want.neighbor_similarities, atol=ATOL, err_msg=f"{where}: similarities"
    )
    np.testing.assert_allclose(as_np(got.weights), want.weights, atol=ATOL, err_msg=f"{where}: weights")


def assert_labelled_agrees(got, want, where):
    assert_read_agrees(got, want, where)
    np.testing.assert_array_equal(as_np(got.incorrect).astype(bool), want.incorrect, err_msg=f"{where}: incorrect")
    np.testing.assert_array_equal(as_np(got.written_slots), want.written_slots, err_msg=f"{where}: written_slots")
    for side in ("positive", "negative"):
        np.testing.assert_array_equal(
            as_np(getattr(got, f"{side}_slots")), getattr(want, f"{side}_slots"), err_msg=f"{where}: {side}_slots"
        )
        for name in (f"{side}_similarities", f"{side}_keys"):
            np.testing.assert_allclose(
                as_np(getattr(got, name)), getattr(want, name), atol=ATOL, err_msg=f"{where}: {name}"
            )
    np.testing.assert_allclose(
        memory_loss(as_np(got.positive_similarities), as_np(got.negative_similarities), ALPHA),
        memory_loss(want.positive_similarities, want.negative_similarities, ALPHA),
        atol=ATOL,
        err_msg=f"{where}: loss",
    )


def assert_state_agrees(driver, ref, where):
    keys, values, ages = (as_np(x) for x in driver.state())
    np.testing.assert_allclose(keys, ref.keys, atol=ATOL, err_msg=f"{where}: keys")
    np.testing.assert_array_equal(values, ref.values, err_msg=f"{where}: values")
    np.testing.assert_array_equal(ages, ref.ages, err_msg=f"{where}: ages")


# ----------------------------------------------------------------------------- scenarios
# (backend, shards, correct_in_top, use_recent); the stream seed differs per case.
STREAM_CASES = [
    pytest.param(backend, shards, 1, True, id=f"{backend}-shards{shards}")
    for backend, shards in itertools.product(("torch", "faiss", "lsh", "faiss-ivf"), (1, 3, 4))
] + [
    pytest.param("lsh", 3, 2, True, id="lsh-shards3-top2"),
    pytest.param("faiss-ivf", 1, 1, False, id="faiss-ivf-shards1-norecent"),
    pytest.param("torch", 3, 2, True, id="torch-shards3-top2"),
    pytest.param("faiss", 1, 1, False, id="faiss-shards1-norecent"),
]
# Seeded age noise: the reference evaluates the spec's hash of (seed, commit, slot) on its own, so the
# written slots must agree exactly, for any shard count and placement of the shards. (age_noise, seed, devices)
NOISY_CASES = [
    pytest.param("torch", 1, 1, True, (2.0, 5, ()), id="torch-shards1-noise"),
    pytest.param("faiss", 3, 1, True, (8.0, 2**63 - 1, ()), id="faiss-shards3-noise-largest-seed"),
    pytest.param("torch", 4, 2, True, (2.0, 5, ("cpu", "cpu")), id="torch-shards4-two-devices-noise"),
    pytest.param("lsh", 3, 1, True, (8.0, 2**63 - 1, ()), id="lsh-shards3-noise-largest-seed"),
    pytest.param("faiss-ivf", 4, 1, True, (2.0, 5, ()), id="faiss-ivf-shards4-noise"),
]
# The approximate backends with their search made exhaustive: every LSH bucket of every table probed,
# nprobe = nlist. The IVF lists are trained as the memory first fills (16 rows per list), in the stream.
EXHAUSTIVE = {
    "lsh": dict(lsh_tables=2, lsh_bits=3, lsh_probes=8),
    "faiss-ivf": dict(ivf_lists=2, ivf_probes=2),
}
M, B, STEPS, VOCAB, NOISE = 64, 8, 48, 48, 1.0


def config(backend, shards, correct_in_top, memory_size=M, noise=(0.0, 0, ())):
    age_noise, seed, devices = noise
    return dict(
        key_dim=D,
        memory_size=memory_size,
        choose_k=K,
        alpha=ALPHA,
        age_noise=age_noise,
        correct_in_top=correct_in_top,
        seed=seed,
        backend=backend,
        search_dtype="float32",
        shards=shards,
        devices=devices,
        **EXHAUSTIVE.get(backend, {}),
    )


def reference_for(cfg):
    keep = ("key_dim", "memory_size", "choose_k", "alpha", "age_noise", "correct_in_top", "seed")
    return ReferenceMemory(**{name: cfg[name] for name in keep})


def run_stream(driver, ref, *, use_recent, seed):
    assert_state_agrees(driver, ref, "initial state")
    for step, (q, y) in enumerate(clustered_stream(seed, steps=STEPS, batch=B, vocab=VOCAB, noise=NOISE)):
        where = f"step {step}"
        got = driver.query(q, y, update=True, use_recent=use_recent)
        want = ref.query(q, y, update=True, use_recent=use_recent)
        assert_labelled_agrees(got, want, where)
        assert_state_agrees(driver, ref, where)
    # A stream that never merged, never wrote or never evicted an old label would prove little.
    assert ref.merges > 0, "the stream produced no correct lookup (no merge)"
    assert ref.writes > 0, "the stream produced no write"
    assert ref.overwrites > 0, "the memory never filled up (no old slot overwritten)"
    assert (ref.values != EMPTY).all()


def run_fill_in_order(driver, ref):
    """Distinct, never-seen labels are always incorrect, so every row writes; with age_noise = 0 an empty
    memory fills slots 0, 1, 2, ... and then the oldest slots, again from 0."""
    rng = np.random.default_rng(7)
    memory_size = driver.memory_size
    written = []
    for step in range(memory_size // B + 1):
        q = unit(rng.standard_normal((B, D)))
        y = np.arange(step * B, (step + 1) * B, dtype=np.int64)
        got = driver.query(q, y, update=True)
        want = ref.query(q, y, update=True)
        assert_labelled_agrees(got, want, f"fill step {step}")
        assert_state_agrees(driver, ref, f"fill step {step}")
        assert as_np(got.incorrect).all()
        written.append(as_np(got.written_slots))
    written = np.concatenate(written)
    np.testing.assert_array_equal(written[:memory_size], np.arange(memory_size))
    np.testing.assert_array_equal(written[memory_size:], np.arange(B))  # the oldest slots are reused first
    np.testing.assert_array_equal(as_np(driver.state()[1])[:B], np.arange(memory_size, memory_size + B))


def run_unlabelled(driver, ref):
    """A query without labels only reads: predictions and neighbours agree and nothing changes."""
    for q, y in clustered_stream(3, steps=6, batch=B, vocab=VOCAB, noise=NOISE):
        driver.query(q, y, update=True)
        ref.query(q, y, update=True)
    before = [as_np(x).copy() for x in driver.state()]
    q = unit(np.random.default_rng(11).standard_normal((5, D)))
    got = driver.query(q)
    want = ref.query(q)
    assert_read_agrees(got, want, "unlabelled")
    assert (want.predictions != EMPTY).any()  # the memory held something to predict from
    assert (as_np(got.written_slots) == NONE).all()
    for name, old, new in zip(("keys", "values", "ages"), before, (as_np(x) for x in driver.state()), strict=True):
        np.testing.assert_array_equal(new, old, err_msg=f"unlabelled query changed {name}")
    assert_state_agrees(driver, ref, "after unlabelled")


def run_decisions(make_driver):
    """Hand-made steps for the spec's **Decisions** that a random stream rarely reaches: label 0 does not match
    an empty slot, a negative is the true maximum even when it is below 0, and a row whose pool holds only its
    own label has no negative (slot -1, similarity 0, zero key)."""
    e = np.eye(D, dtype=np.float32)

    def step(driver, ref, q, y, where):
        q, y = np.asarray(q, dtype=np.float32)[None], np.array([y], dtype=np.int64)
        got, want = driver.query(q, y, update=True), ref.query(q, y, update=True)
        assert_labelled_agrees(got, want, where)
        assert_state_agrees(driver, ref, where)
        return want

    cfg = config("torch", 1, 1, memory_size=4) | {"choose_k": 4}
    driver, ref = make_driver(**cfg), reference_for(cfg)
    first = step(driver, ref, e[0], 0, "label 0 into empty memory")
    assert first.incorrect[0] and first.written_slots[0] == 0 and first.predictions[0] == EMPTY
    for slot, (q, y) in enumerate([(-e[0], 1), (e[1], 2), (e[2], 3)], start=1):
        assert step(driver, ref, q, y, f"fill slot {slot}").written_slots[0] == slot
    # Every non-matching key has similarity -1/sqrt(3): the negative is that, not a masked-out 0.
    want = step(driver, ref, unit(-e[0] - e[1] - e[2]), 1, "negative below zero")
    assert not want.incorrect[0] and want.positive_slots[0] == 1
    assert want.negative_slots[0] == 0 and want.negative_similarities[0] == pytest.approx(-1 / np.sqrt(3), abs=ATOL)

    cfg = config("torch", 1, 1, memory_size=2) | {"choose_k": 2}
    driver, ref = make_driver(**cfg), reference_for(cfg)
    step(driver, ref, e[0], 0, "write slot 0")
    assert step(driver, ref, -e[0], 0, "empty slot is nearest").written_slots[0] == 1
    want = step(driver, ref, e[1], 0, "every pool entry matches")
    assert not want.incorrect[0] and want.positive_slots[0] == 0
    assert want.negative_slots[0] == NONE and want.negative_similarities[0] == 0 and not want.negative_keys.any()


# ----------------------------------------------------------------------------- through the public client
@pytest.mark.parametrize("backend, shards, correct_in_top, use_recent", STREAM_CASES)
def test_stream_matches_reference(client_driver, backend, shards, correct_in_top, use_recent):
    cfg = config(backend, shards, correct_in_top)
    run_stream(client_driver(**cfg), reference_for(cfg), use_recent=use_recent, seed=shards * 10 + correct_in_top)


@pytest.mark.parametrize("backend, shards, correct_in_top, use_recent, noise", NOISY_CASES)
def test_noisy_stream_matches_reference(client_driver, backend, shards, correct_in_top, use_recent, noise):
    cfg = config(backend, shards, correct_in_top, noise=noise)
    run_stream(client_driver(**cfg), reference_for(cfg), use_recent=use_recent, seed=shards * 10 + correct_in_top)


@pytest.mark.parametrize("shards", [1, 3])
def test_empty_memory_fills_in_order(client_driver, shards):
    cfg = config("torch", shards, 1, memory_size=32)
    run_fill_in_order(client_driver(**cfg), reference_for(cfg))


def test_spec_decisions(client_driver):
    run_decisions(client_driver)


def test_query_without_labels(client_driver):
    cfg = config("faiss", 3, 1)
    run_unlabelled(client_driver(**cfg), reference_for(cfg))


# ----------------------------------------------------------------------------- against the core class
@pytest.mark.parametrize("backend, shards, correct_in_top, use_recent", STREAM_CASES)
def test_stream_matches_reference_core(backend, shards, correct_in_top, use_recent):
    cfg = config(backend, shards, correct_in_top)
    run_stream(CoreDriver(**cfg), reference_for(cfg), use_recent=use_recent, seed=shards * 10 + correct_in_top)


@pytest.mark.parametrize("backend, shards, correct_in_top, use_recent, noise", NOISY_CASES)
def test_noisy_stream_matches_reference_core(backend, shards, correct_in_top, use_recent, noise):
    cfg = config(backend, shards, correct_in_top, noise=noise)
    run_stream(CoreDriver(**cfg), reference_for(cfg), use_recent=use_recent, seed=shards * 10 + correct_in_top)


@pytest.mark.parametrize("shards", [1, 3])
def test_empty_memory_fills_in_order_core(shards):
    cfg = config("torch", shards, 1, memory_size=32)
    run_fill_in_order(CoreDriver(**cfg), reference_for(cfg))


def test_query_without_labels_core():
    cfg = config("faiss", 3, 1)
    run_unlabelled(CoreDriver(**cfg), reference_for(cfg))


def test_spec_decisions_core():
    run_decisions(CoreDriver)


# ----------------------------------------------------------------------------- the noisy choice, in distribution
def rule_choice_probabilities(ages: np.ndarray, half_width: float, grid: int = 4_000) -> np.ndarray:
    """P(slot i has the largest A_i + u_i) for independent u_i ~ U(-w, w), by numeric integration: the
    rule's own distribution of the write choice, with no hash and no memory code involved."""
    top = ages.max()
    candidates = np.flatnonzero(ages + half_width > top - half_width)  # the others can never win
    lo, hi = ages[candidates].min() - half_width, top + half_width
    x = lo + (np.arange(grid) + 0.5) * (hi - lo) / grid  # midpoints
    cdf = np.clip((x[None, :] - (ages[candidates, None] - half_width)) / (2 * half_width), 0.0, 1.0)
    density = (np.abs(x[None, :] - ages[candidates, None]) < half_width) / (2 * half_width)
    # The product of every other candidate's cdf, from prefix and suffix products.
    ones = np.ones((1, grid))
    before = np.cumprod(np.vstack([ones, cdf[:-1]]), axis=0)
    after = np.cumprod(np.vstack([cdf[1:], ones])[::-1], axis=0)[::-1]
    probabilities = np.zeros(len(ages))
    probabilities[candidates] = np.sum(density * before * after, axis=1) * (hi - lo) / grid
    return probabilities


def test_noisy_write_choice_has_the_rule_s_age_distribution():
    """Over thousands of writes into a full memory, how much younger than the oldest slot the chosen slot
    is follows the rule (largest age + uniform noise) in distribution: Pearson's chi-square against the
    expected counts the rule gives step by step, from the ages the memory had before each step."""
    memory_size, half_width, steps = 48, 4.0, 3000
    memory = Memory(MemoryConfig(key_dim=4, memory_size=memory_size, choose_k=4, age_noise=half_width, seed=9))
    queries = torch.nn.functional.normalize(
        torch.randn(memory_size + steps, 4, generator=torch.Generator().manual_seed(0))
    )
    younger_by = np.arange(int(2 * half_width) + 1)  # age of the oldest slot minus age of the chosen one
    observed, expected = np.zeros(len(younger_by)), np.zeros(len(younger_by))
    for step in range(memory_size + steps):  # a new label every step: every lookup is incorrect, every step writes
        ages = memory.ages.numpy().astype(np.float64)
        written = memory.query(queries[step : step + 1], torch.tensor([step]), update=True, use_recent=False)
        if step < memory_size:
            continue  # filling: empty slots tie in age until the memory is full
        probabilities = rule_choice_probabilities(ages, half_width)
        assert abs(probabilities.sum() - 1) < 1e-3
        gap = (ages.max() - ages).astype(int)
        expected += np.bincount(gap, weights=probabilities, minlength=len(younger_by))[: len(younger_by)]
        observed[gap[int(written.written_slots[0])]] += 1
    assert observed.sum() == steps and abs(expected.sum() - steps) < 1
    # Pool the sparse tail so that every cell expects at least 5.
    cells = [[0]]
    for i in younger_by[1:]:
        if expected[cells[-1]].sum() >= 5:
            cells.append([i])
        else:
            cells[-1].append(i)
    if expected[cells[-1]].sum() < 5:
        tail = cells.pop()
        cells[-1] += tail
    obs = np.array([observed[c].sum() for c in cells])
    exp = np.array([expected[c].sum() for c in cells])
    assert len(cells) >= 4, "the noise must spread the choice over several ages for the test to mean anything"
    chi_square = float(((obs - exp) ** 2 / exp).sum())
    dof = len(cells) - 1
    p_value = float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), torch.tensor(chi_square / 2)))
    assert p_value > 1e-3, (
        f"chosen-age histogram {obs.tolist()} vs the rule's {np.round(exp, 1).tolist()}: p = {p_value:.2g}"
    )
