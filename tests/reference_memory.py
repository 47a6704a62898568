"""An independent numpy reference of the memory module, written only from docs/memory-module.md.

It is deliberately slow and plain (loops where they read better, float64 where precision helps) so that
it can serve as an oracle for the service's memory in tests/test_equivalence.py. It knows nothing about
shards, search backends or devices: those must not change the semantics.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

EMPTY = -1  # value of a slot never written: matches no label
NONE = -1  # slot id meaning "no such slot" (no positive / negative / recent slot)


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """TF's l2_normalize: x * rsqrt(max(sum(x^2), 1e-12)), epsilon on the squared norm."""
    x = np.asarray(x, dtype=np.float64)
    return (x / np.sqrt(np.maximum(np.sum(x * x, axis=-1, keepdims=True), 1e-12))).astype(np.float32)


def splitmix64_finalizer(z: np.ndarray) -> np.ndarray:
    """splitmix64's output function on uint64 arrays (numpy's uint64 arithmetic wraps mod 2^64)."""
    z = np.asarray(z, dtype=np.uint64)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def age_noise(seed: int, commit: int, memory_size: int, half_width: float) -> np.ndarray:
    """The spec's noise of write number ``commit`` for every slot, float32: a function of (seed, commit,
    slot) through splitmix64, uniform on 2^24 steps of [-half_width, half_width)."""
    gamma = np.uint64(0x9E3779B97F4A7C15)
    stream = splitmix64_finalizer(np.array([(seed + commit * 0x9E3779B97F4A7C15) % 2**64], dtype=np.uint64))[0]
    with np.errstate(over="ignore"):
        h = splitmix64_finalizer(stream + (np.arange(memory_size, dtype=np.uint64) + np.uint64(1)) * gamma)
    steps = (h >> np.uint64(40)).astype(np.float32)
    return steps * np.float32(2 * half_width / 2**24) - np.float32(half_width)


def memory_loss(positive_similarities, negative_similarities, alpha: float) -> np.ndarray:
    """Per-row memory loss relu(neg - pos + alpha) - alpha (floor -alpha)."""
    pos = np.asarray(positive_similarities, dtype=np.float64)
    neg = np.asarray(negative_similarities, dtype=np.float64)
    return np.maximum(neg - pos + alpha, 0.0) - alpha


@dataclass
class ReferenceResult:
    predictions: np.ndarray  # [B] int64, value of the nearest searched slot (EMPTY if that slot is empty)
    neighbor_slots: np.ndarray  # [B, k] int64, the k searched slots, similarity desc then slot asc
    neighbor_similarities: np.ndarray  # [B, k] float32
    neighbor_values: np.ndarray  # [B, k] int64
    weights: np.ndarray  # [B, k] float32, softmax(s * t)
    written_slots: np.ndarray  # [B] int64, NONE without update
    # The fields below are only filled when labels are given.
    incorrect: np.ndarray | None = None  # [B] bool
    positive_slots: np.ndarray | None = None  # [B] int64
    positive_similarities: np.ndarray | None = None  # [B] float32
    negative_slots: np.ndarray | None = None
    negative_similarities: np.ndarray | None = None
    positive_keys: np.ndarray | None = None  # [B, D] float32, zeros where there is no slot
    negative_keys: np.ndarray | None = None


@dataclass
class ReferenceMemory:
    key_dim: int
    memory_size: int
    choose_k: int
    alpha: float = 0.1
    age_noise: float = 0.0
    correct_in_top: int = 1
    seed: int = 0
    # What the update did so far, so that tests can check a stream really exercised every path.
    merges: int = 0
    writes: int = 0
    overwrites: int = 0  # writes into a slot that already held a label
    commits: int = 0  # updates so far: the commit number the age noise is drawn for
    keys: np.ndarray = field(init=False)
    values: np.ndarray = field(init=False)
    ages: np.ndarray = field(init=False)
    recent: dict[int, int] = field(init=False)

    def __post_init__(self):
        self.keys = np.zeros((self.memory_size, self.key_dim), dtype=np.float32)
        self.values = np.full(self.memory_size, EMPTY, dtype=np.int64)
        self.ages = np.zeros(self.memory_size, dtype=np.float32)
        self.recent = {}

    # ------------------------------------------------------------------ read
    def _k(self, k: int | None) -> int:
        return min(self.choose_k if k is None else k, self.memory_size)

    def query(self, queries, labels=None, *, k: int | None = None, use_recent: bool = True, update: bool = False):
        q = np.asarray(queries, dtype=np.float32)
        batch = q.shape[0]
        k = self._k(k)

        # Exact search. float64 so that the ranking is the mathematical one; empty slots have zero keys
        # and score exactly 0, so they tie with each other (and with any orthogonal key).
        sims = q.astype(np.float64) @ self.keys.astype(np.float64).T  # [B, M]
        # A stable sort of -s orders by similarity descending with ties towards the lower slot index.
        searched = np.argsort(-sims, axis=1, kind="stable")[:, :k]
        searched_sims = np.take_along_axis(sims, searched, axis=1)
        searched_values = self.values[searched]

        # Softmax temperature from the paper: t = max(1, ln(0.2 k) / alpha).
        t = max(1.0, math.log(0.2 * k) / self.alpha)
        logits = searched_sims * t
        logits = logits - logits.max(axis=1, keepdims=True)  # for numerical stability only
        weights = np.exp(logits)
        weights /= weights.sum(axis=1, keepdims=True)

        result = ReferenceResult(
            predictions=searched_values[:, 0].copy(),  # read before any update of this step
            neighbor_slots=searched.astype(np.int64),
            neighbor_similarities=searched_sims.astype(np.float32),
            neighbor_values=searched_values.copy(),
            weights=weights.astype(np.float32),
            written_slots=np.full(batch, NONE, dtype=np.int64),
        )
        if labels is None:
            if update:
                raise ValueError("update needs labels")
            return result

        y = np.asarray(labels, dtype=np.int64)
        # Pool = the k searched slots, plus the recent slot R[y_b] as column k when asked for and known.
        # Rows without a recent slot get NONE there, which takes part in nothing.
        pool = searched.astype(np.int64)
        if use_recent:
            recent_col = np.array([self.recent.get(int(label), NONE) for label in y], dtype=np.int64)
            pool = np.concatenate([pool, recent_col[:, None]], axis=1)
        present = pool != NONE
        pool_sims = np.where(present, sims[np.arange(batch)[:, None], np.where(present, pool, 0)], 0.0)
        pool_values = np.where(present, self.values[np.where(present, pool, 0)], EMPTY)

        matching = present & (pool_values == y[:, None])
        non_matching = present & ~matching
        pos_slots, pos_sims = self._best(pool, pool_sims, matching)
        neg_slots, neg_sims = self._best(pool, pool_sims, non_matching)

        # Correct when one of the first correct_in_top pool entries holds y_b.
        incorrect = ~matching[:, : self.correct_in_top].any(axis=1)

        result.incorrect = incorrect
        result.positive_slots = pos_slots
        result.positive_similarities = pos_sims.astype(np.float32)
        result.negative_slots = neg_slots
        result.negative_similarities = neg_sims.astype(np.float32)
        result.positive_keys = self._keys_or_zeros(pos_slots)
        result.negative_keys = self._keys_or_zeros(neg_slots)

        if update:
            result.written_slots = self._update(q, y, incorrect, pos_slots)
        return result

    @staticmethod
    def _best(pool, pool_sims, mask):
        """Slot and similarity of the masked pool entry with the highest similarity (first in pool order on
        ties), or (NONE, 0) for rows where the mask is empty: the true maximum, not max(s * mask)."""
        masked = np.where(mask, pool_sims, -np.inf)
        col = np.argmax(masked, axis=1)  # argmax returns the first maximum, i.e. pool order
        rows = np.arange(pool.shape[0])
        found = mask.any(axis=1)
        slots = np.where(found, pool[rows, col], NONE)
        sims = np.where(found, pool_sims[rows, col], 0.0)
        return slots.astype(np.int64), sims

    def _keys_or_zeros(self, slots):
        out = np.zeros((len(slots), self.key_dim), dtype=np.float32)
        has = slots != NONE
        out[has] = self.keys[slots[has]]
        return out

    # ---------------------------------------------------------------- update
    def _update(self, q, y, incorrect, pos_slots):
        batch = len(y)
        correct = ~incorrect
        merged = set(int(s) for s in pos_slots[correct])

        # Old slots for writes: the B slots with the largest A + u, excluding slots merged into by this
        # batch's correct rows, in decreasing A + u with ties towards the lower slot index. Row b uses the
        # b-th of them, whether or not the other rows are correct.
        self.commits += 1
        noise = age_noise(self.seed, self.commits, self.memory_size, self.age_noise) if self.age_noise > 0 else 0.0
        score = self.ages + noise  # float32, as the spec adds them
        candidates = np.array([s for s in range(self.memory_size) if s not in merged], dtype=np.int64)
        order = np.argsort(-score[candidates], kind="stable")  # stable: ties keep the lower slot first
        oldest = candidates[order][:batch]

        # Every new key and value is computed from the pre-update state ...
        slots = np.empty(batch, dtype=np.int64)
        new_keys = np.empty((batch, self.key_dim), dtype=np.float32)
        new_values = np.empty(batch, dtype=np.int64)
        for b in range(batch):
            if correct[b]:
                slots[b] = pos_slots[b]
                new_keys[b] = l2_normalize(q[b].astype(np.float64) + self.keys[slots[b]])
                new_values[b] = self.values[slots[b]]  # merging leaves the value unchanged (it is y_b)
            else:
                slots[b] = oldest[b]
                new_keys[b] = q[b]
                new_values[b] = y[b]

        # ... then applied in batch order, so the later row wins on a shared slot.
        for b in range(batch):
            s = slots[b]
            if correct[b]:
                self.merges += 1
            else:
                self.writes += 1
                self.overwrites += int(self.values[s] != EMPTY)
            self.keys[s] = new_keys[b]
            self.values[s] = new_values[b]

        self.ages += 1
        self.ages[slots] = 0
        for b in range(batch):
            self.recent[int(y[b])] = int(slots[b])  # batch order: later row wins
        return slots
