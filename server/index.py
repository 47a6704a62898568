"""Exact inner-product search over a memory's keys, behind one small seam.

An index covers a contiguous range of slots. ``search`` returns, per query,
the k slots with the largest inner product (global slot ids) and their
similarities computed in float32; ``update`` overwrites stored keys in place.
Backends (torch, faiss) and sharding compose behind the same two methods.
The order of tied results is unspecified: the memory canonicalises it.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch

RESCORE_ROWS = 16
# Largest score matrix one search holds per shard; bigger batches are searched in row chunks so a
# big memory never needs batch x size scores at once (256 rows of a million float32 slots).
SCORE_BUFFER_BYTES = 1 << 30


class Index(Protocol):
    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]: ...

    def update(self, slots: torch.Tensor, keys: torch.Tensor) -> None: ...


class TorchFlatIndex:
    """Matrix product + top-k in torch, on the keys' device.

    ``keys`` is a view of the memory's float32 key rows [start, start + n), so
    float32 search needs no copy and no update. With bfloat16 search a bf16
    copy is searched and the chosen candidates are rescored in float32.
    """

    def __init__(self, keys: torch.Tensor, start: int, search_dtype: torch.dtype = torch.float32):
        self.keys = keys
        self.start = start
        self.search_dtype = search_dtype
        self.search_keys = keys if search_dtype == torch.float32 else keys.to(search_dtype)
        self._scores = torch.empty(0, len(keys), dtype=search_dtype, device=keys.device)

    def _score_buffer(self, batch: int) -> torch.Tensor:
        # Grown on demand and reused, so a training loop allocates nothing per step.
        if self._scores.shape[0] < batch:
            self._scores = torch.empty(batch, len(self.keys), dtype=self.search_dtype, device=self.keys.device)
        return self._scores[:batch]

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        k = min(k, len(self.keys))
        rows = max(1, SCORE_BUFFER_BYTES // (len(self.keys) * self.search_keys.element_size()))
        if len(queries) <= rows:
            return self._search(queries, k)
        parts = [self._search(queries[start : start + rows], k) for start in range(0, len(queries), rows)]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    def _search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        scores = self._score_buffer(len(queries))
        torch.mm(queries.to(self.search_dtype), self.search_keys.T, out=scores)
        similarities, local = torch.topk(scores, k, dim=1)
        if self.search_dtype != torch.float32:
            similarities = self._rescore(queries, local)
        return similarities.float(), local + self.start

    def _rescore(self, queries: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
        """Exact float32 similarities of the chosen candidates, a few rows at a time so the gathered
        keys stay in cache (twice as fast as one [B, k, D] gather at B=256)."""
        similarities = torch.empty(local.shape, dtype=torch.float32, device=local.device)
        for start in range(0, len(queries), RESCORE_ROWS):
            rows = slice(start, start + RESCORE_ROWS)
            similarities[rows] = torch.bmm(self.keys[local[rows]], queries[rows].unsqueeze(2)).squeeze(2)
        return similarities

    def update(self, slots: torch.Tensor, keys: torch.Tensor) -> None:
        if self.search_keys is not self.keys:
            self.search_keys[slots - self.start] = keys.to(self.search_dtype)


class FaissFlatIndex:
    """faiss IndexFlatIP whose stored vectors are overwritten in place (CPU)."""

    def __init__(self, keys: torch.Tensor, start: int):
        import faiss

        n, dim = keys.shape
        self.start = start
        self.index = faiss.IndexFlatIP(dim)
        self.index.add(np.ascontiguousarray(keys.numpy()))
        # A numpy view of faiss's own storage: writes land in the index directly,
        # never remove + add.
        self.stored = faiss.rev_swig_ptr(self.index.get_xb(), n * dim).reshape(n, dim)

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        k = min(k, self.index.ntotal)
        similarities, local = self.index.search(np.ascontiguousarray(queries.numpy()), k)
        return torch.from_numpy(similarities), torch.from_numpy(local) + self.start

    def update(self, slots: torch.Tensor, keys: torch.Tensor) -> None:
        self.stored[(slots - self.start).numpy()] = keys.numpy()


class ShardedIndex:
    """Slot-range shards searched independently, merged into one global top-k."""

    def __init__(self, shards: list[Index], bounds: list[int]):
        self.shards = shards
        self.bounds = bounds  # shard i covers slots [bounds[i], bounds[i + 1])

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        if len(self.shards) == 1:
            return self.shards[0].search(queries, k)
        parts = [shard.search(queries, k) for shard in self.shards]
        similarities = torch.cat([p[0] for p in parts], dim=1)
        slots = torch.cat([p[1] for p in parts], dim=1)
        similarities, best = torch.topk(similarities, k, dim=1)
        return similarities, torch.gather(slots, 1, best)

    def update(self, slots: torch.Tensor, keys: torch.Tensor) -> None:
        owner = torch.bucketize(slots, torch.tensor(self.bounds[1:-1], device=slots.device), right=True)
        for i, shard in enumerate(self.shards):
            mine = owner == i
            if bool(mine.any()):
                shard.update(slots[mine], keys[mine])


def build_index(keys: torch.Tensor, backend: str, search_dtype: torch.dtype, shards: int) -> ShardedIndex:
    """One index over ``keys`` (the memory's float32 key matrix), split into ``shards`` slot ranges."""
    size = len(keys)
    bounds = [size * i // shards for i in range(shards + 1)]
    parts: list[Index] = []
    for start, stop in zip(bounds[:-1], bounds[1:], strict=True):
        if backend == "torch":
            parts.append(TorchFlatIndex(keys[start:stop], start, search_dtype))
        else:
            parts.append(FaissFlatIndex(keys[start:stop], start))
    return ShardedIndex(parts, bounds)
