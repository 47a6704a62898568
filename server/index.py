"""Exact inner-product search over a memory's keys, behind one small seam.

An index covers a contiguous range of slots. ``search`` returns, per query,
the k slots with the largest inner product (global slot ids) and their
similarities computed in float32, in no particular order; ``update`` overwrites
stored keys in place. Backends (torch, faiss), sharding and the placement of
shards on several devices compose behind the same two methods: the memory's
semantics never ask where a shard lives. Which of several slots tied at the
k-th similarity is returned is unspecified, and so is the order: the memory
canonicalises both.
"""

from __future__ import annotations

import functools
import importlib.metadata
import logging
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch

from lifelong_memory.server import devices
from lifelong_memory.server.ann import FaissIvfIndex, LshIndex, ZeroRows
from lifelong_memory.server.devices import canonical_device, score_buffer_bytes
from lifelong_memory.server.errors import FailedPrecondition

if TYPE_CHECKING:
    from lifelong_memory.server.memory import MemoryConfig

log = logging.getLogger("lifelong_memory.server.index")

SEARCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
RESCORE_ROWS = 16
# torch.topk on the CPU sorts a row once k is more than about 1/64 of it; numpy's introselect (argpartition)
# is then 2-5x faster, up to rows of about 256 * k (measured at B = 16, k = 64 to 1024, one thread), unless
# thousands of scores tie at the k-th: the zeros of empty slots while fewer than k slots score above 0. It is
# then 10x slower and torch.topk 4x faster than usual, so an index partitions only with fewer than k empty slots.
PARTITION_MAX_ROWS_PER_K = 256
# A shard whose filled rows and k empty ones are at most this share of it scores only those: a cleared memory
# (every Omniglot episode) or a young one. At N = 8,192, B = 16, k = 256, one thread, gathering the rows and
# scoring them took 0.09-0.15x the time of scoring every row with up to 480 filled, 0.44x at N / 4, 0.72x at N / 2.
FILLED_SEARCH_MAX_SHARE = 0.5
# The distributions that install the `faiss` package; two of them would share one faiss/ folder.
FAISS_DISTRIBUTIONS = ("faiss-cpu", "faiss-gpu", "faiss-gpu-cu11", "faiss-gpu-cu12")


class Index(Protocol):
    def search(self, queries: torch.Tensor, k: int, empty_slots: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """``empty_slots``: how many slots of the memory hold a zero key (they tie at similarity 0)."""

    def update(self, slots: torch.Tensor, keys: torch.Tensor) -> None: ...

    def state(self) -> dict[str, torch.Tensor]:
        """What a snapshot keeps of the index beyond the keys (a trained quantizer); empty for most."""


def score_rows(slots: int, element_bytes: int, device: str, max_batch: int) -> int:
    """Query rows one search of a ``slots``-slot shard scores at once on ``device``: all of a batch of
    ``max_batch`` rows where the device's score-buffer size allows, else chunks of this many rows."""
    return max(1, min(max_batch, score_buffer_bytes(device) // (slots * element_bytes)))


class TorchFlatIndex:
    """Matrix product + top-k in torch, on the device of ``keys``.

    ``keys`` holds the float32 key rows [start, start + n): a view of the
    memory's own keys when the shard lives on the memory's device (float32
    search then needs no copy and no update), else the shard's own copy
    (``owns_keys``). With bfloat16 search a bf16 copy is searched and the
    chosen candidates are rescored in float32. The score buffer for ``rows``
    query rows is allocated here, up front; larger batches are searched in
    chunks of ``rows``.

    A float32 shard on the CPU knows its empty (zero-key) rows: while its filled rows and k empty ones are
    at most FILLED_SEARCH_MAX_SHARE of it, a search scores only those (the other empty rows tie with the
    offered ones at 0, and the memory answers with the lowest-numbered empty slots whichever it gets),
    gathering them into the score buffer, so it allocates nothing more. Same slots; the similarities
    may differ from a product over every row in the last bit (another summation order).
    """

    def __init__(self, keys: torch.Tensor, start: int, search_dtype: torch.dtype, rows: int, owns_keys: bool):
        self.keys = keys
        self.start = start
        self.search_dtype = search_dtype
        self.owns_keys = owns_keys
        self.search_keys = keys if search_dtype == torch.float32 else keys.to(search_dtype)
        self._scores = torch.empty(rows, len(keys), dtype=search_dtype, device=keys.device)
        self.zero = ZeroRows(keys) if keys.device.type == "cpu" and search_dtype == torch.float32 else None

    def search(self, queries: torch.Tensor, k: int, empty_slots: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        k = min(k, self.keys.shape[0])
        queries = queries.to(self.keys.device)
        rows, batch = self._scores.shape[0], queries.shape[0]  # shapes, not len(): torch's __len__ is a Python call
        scored = self._rows_to_score(k, rows)
        if scored is not None:
            search = functools.partial(self._search_rows, k=k, scored=scored)
        else:
            search = functools.partial(self._search, k=k, partition=self._partitions(k, empty_slots))
        if batch <= rows:
            return search(queries)
        parts = [search(queries[start : start + rows]) for start in range(0, batch, rows)]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    def _rows_to_score(self, k: int, rows: int) -> torch.Tensor | None:
        """The filled rows and up to k empty ones, when scoring just those is the cheaper search and they and
        their scores for ``rows`` queries fit the score buffer; else None."""
        if self.zero is None:
            return None
        n, dim = self.keys.shape
        count = n - self.zero.count + min(k, self.zero.count)
        if count > FILLED_SEARCH_MAX_SHARE * n or count * (rows + dim) > rows * n:
            return None
        return torch.from_numpy(np.concatenate([np.flatnonzero(~self.zero.zero), self.zero.some(k)]))

    def _search_rows(self, queries: torch.Tensor, k: int, scored: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        count, dim = scored.shape[0], self.keys.shape[1]
        buffer = self._scores.view(-1)
        keys = buffer[: count * dim].view(count, dim)
        scores = buffer[count * dim : count * (dim + queries.shape[0])].view(queries.shape[0], count)
        torch.index_select(self.keys, 0, scored, out=keys)
        torch.mm(queries, keys.T, out=scores)
        similarities, chosen = torch.topk(scores, k, dim=1, sorted=False)
        return similarities, scored[chosen] + self.start

    def _search(self, queries: torch.Tensor, k: int, partition: bool) -> tuple[torch.Tensor, torch.Tensor]:
        scores = self._scores[: queries.shape[0]]
        torch.mm(queries.to(self.search_dtype), self.search_keys.T, out=scores)
        if partition:
            n = scores.shape[1]
            local = torch.from_numpy(np.argpartition(scores.numpy(), n - k, axis=1)[:, n - k :])
            similarities = scores.gather(1, local)
        else:
            similarities, local = torch.topk(scores, k, dim=1, sorted=False)
        if self.search_dtype != torch.float32:
            similarities = self._rescore(queries, local)
        return similarities, local + self.start

    def _partitions(self, k: int, empty_slots: int) -> bool:
        """Whether the top k of a row are chosen by numpy's partition rather than torch.topk."""
        return (
            self.keys.device.type == "cpu"
            and self.search_dtype == torch.float32
            and self.keys.shape[0] <= PARTITION_MAX_ROWS_PER_K * k
            and empty_slots < k
        )

    def _rescore(self, queries: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
        """Exact float32 similarities of the chosen candidates, a few rows at a time so the gathered
        keys stay in cache (twice as fast as one [B, k, D] gather at B=256)."""
        similarities = torch.empty(local.shape, dtype=torch.float32, device=local.device)
        for start in range(0, len(queries), RESCORE_ROWS):
            rows = slice(start, start + RESCORE_ROWS)
            similarities[rows] = torch.bmm(self.keys[local[rows]], queries[rows].unsqueeze(2)).squeeze(2)
        return similarities

    def update(self, slots: torch.Tensor, keys: torch.Tensor) -> None:
        """Follow a write of the memory's keys: which rows are empty, and its own copies (a view already sees
        the write)."""
        if self.zero is not None:
            self.zero.update((slots - self.start).numpy(), keys.any(dim=1).cpu().numpy())
        if not self.owns_keys and self.search_keys is self.keys:
            return
        local = (slots - self.start).to(self.keys.device)
        keys = keys.to(self.keys.device)
        if self.owns_keys:
            self.keys[local] = keys
        if self.search_keys is not self.keys:
            self.search_keys[local] = keys.to(self.search_dtype)

    def state(self) -> dict[str, torch.Tensor]:
        return {}


def import_faiss():
    """The faiss module, once it is clear which faiss this environment has (FailedPrecondition if none,
    or if two distributions share its faiss/ folder: then the import breaks or silently stays CPU-only)."""
    check_one_faiss()
    try:
        import faiss
    except ImportError:
        raise FailedPrecondition(
            "the faiss backend needs faiss: pip install 'lifelong-memory[cpu]' (or [gpu])"
        ) from None
    return faiss


def check_one_faiss() -> None:
    """FailedPrecondition if two faiss distributions are installed (they share one faiss/ folder)."""
    installed = installed_faiss_distributions()
    if len(installed) > 1:
        raise FailedPrecondition(
            f"{' and '.join(installed)} are both installed into one faiss/ folder; uninstall all of them "
            "(pip uninstall) and install one: lifelong-memory[cpu] or lifelong-memory[gpu], never both"
        )


def installed_faiss_distributions() -> list[str]:
    found = []
    for name in FAISS_DISTRIBUTIONS:
        try:
            importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        found.append(name)
    return found


class FaissFlatIndex:
    """faiss IndexFlatIP whose stored vectors are overwritten in place (CPU)."""

    def __init__(self, keys: torch.Tensor, start: int):
        faiss = import_faiss()
        n, dim = keys.shape
        self.start = start
        self.index = faiss.IndexFlatIP(dim)
        self.index.add(np.ascontiguousarray(keys.numpy()))
        # A numpy view of faiss's own storage: writes land in the index directly,
        # never remove + add.
        self.stored = faiss.rev_swig_ptr(self.index.get_xb(), n * dim).reshape(n, dim)

    def search(self, queries: torch.Tensor, k: int, empty_slots: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        k = min(k, self.index.ntotal)
        similarities, local = self.index.search(np.ascontiguousarray(queries.numpy()), k)
        return torch.from_numpy(similarities), torch.from_numpy(local) + self.start

    def update(self, slots: torch.Tensor, keys: torch.Tensor) -> None:
        self.stored[(slots - self.start).numpy()] = keys.numpy()

    def state(self) -> dict[str, torch.Tensor]:
        return {}


class ShardedIndex:
    """Slot-range shards searched independently, merged into one global top-k on the memory's device."""

    def __init__(self, shards: list[Index], bounds: list[int], device: torch.device):
        self.shards = shards
        self.bounds = bounds  # shard i covers slots [bounds[i], bounds[i + 1])
        self.device = device

    def search(self, queries: torch.Tensor, k: int, empty_slots: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        if len(self.shards) == 1:
            similarities, slots = self.shards[0].search(queries, k, empty_slots)
            return similarities.to(self.device), slots.to(self.device)
        parts = [shard.search(queries, k, empty_slots) for shard in self.shards]
        similarities = torch.cat([p[0].to(self.device) for p in parts], dim=1)
        slots = torch.cat([p[1].to(self.device) for p in parts], dim=1)
        similarities, best = torch.topk(similarities, k, dim=1, sorted=False)
        return similarities, torch.gather(slots, 1, best)

    def update(self, slots: torch.Tensor, keys: torch.Tensor) -> None:
        """``slots``: global slot ids on the CPU (so finding their shards costs the GPU nothing); ``keys``
        their new rows, on the memory's device."""
        if len(self.shards) == 1:
            self.shards[0].update(slots, keys)
            return
        owner = torch.searchsorted(torch.tensor(self.bounds[1:-1]), slots, right=True)
        for i, shard in enumerate(self.shards):
            rows = torch.nonzero(owner == i).flatten()
            if len(rows):
                shard.update(slots[rows], keys[rows.to(keys.device)])

    def state(self) -> dict[str, torch.Tensor]:
        """Each shard's state, its names prefixed with ``shard<i>.``."""
        return {f"shard{i}.{name}": t for i, shard in enumerate(self.shards) for name, t in shard.state().items()}

    def training_samples(self) -> list:
        """Per shard, a copy of the keys a retrain of its quantizer trains on (faiss-ivf shards): at least one per
        list. A shard not yet trained (before its first fill) trains early on the keys it holds."""
        for i, shard in enumerate(self.shards):
            filled = len(shard.keys) - shard.zero.count
            if filled < shard.lists:
                raise FailedPrecondition(
                    f"config.ivf_lists: shard {i} holds {filled} keys, fewer than its {shard.lists} lists: too few "
                    f"to train on (it trains by itself once {shard.train_size} of its slots are filled)"
                )
        return [shard.training_sample() for shard in self.shards]

    def retrained_state(self, samples: list) -> dict[str, torch.Tensor]:
        """The state of every shard's quantizer trained anew on ``samples``, named as ``state`` names it; the
        index itself is untouched (run it beside searches and writes)."""
        return {
            f"shard{i}.{name}": t
            for i, (shard, sample) in enumerate(zip(self.shards, samples, strict=True))
            for name, t in shard.retrained_state(sample).items()
        }


def shard_bounds(size: int, shards: int) -> list[int]:
    """Shard i covers slots [bounds[i], bounds[i + 1])."""
    return [size * i // shards for i in range(shards + 1)]


def build_index(
    keys: torch.Tensor, config: MemoryConfig, max_batch: int, state: dict[str, torch.Tensor] | None = None
) -> ShardedIndex:
    """One index over ``keys`` (the memory's float32 key matrix) of the validated ``config``'s backend, split
    into one slot range per shard and placed on the shard's device; score buffers sized for batches of
    ``max_batch`` rows. ``state``: what ``state()`` gave of an index of this same config, if any."""
    state = state or {}
    shard_devices = config.shard_devices()
    bounds = shard_bounds(len(keys), len(shard_devices))
    home = canonical_device(str(keys.device))
    search_dtype = SEARCH_DTYPES[config.search_dtype]
    element_bytes = torch.empty(0, dtype=search_dtype).element_size()
    if search_dtype == torch.bfloat16 and "cpu" in shard_devices and devices.cpu_has_native_bfloat16() is False:
        log.warning(
            "config.search_dtype bfloat16 on a CPU without bfloat16 instructions (no avx512_bf16, amx_bf16 or bf16 "
            "in /proc/cpuinfo): torch emulates them, and such a search is several times slower than float32 "
            "(3-5x per search, measured on an AVX2-only CPU); float32 is the faster choice here"
        )
    parts: list[Index] = []
    for i, (start, stop, device) in enumerate(zip(bounds[:-1], bounds[1:], shard_devices, strict=True)):
        rows = keys[start:stop]
        if config.backend == "faiss":
            parts.append(FaissFlatIndex(rows, start))
            continue
        if config.backend == "faiss-ivf":
            prefix = f"shard{i}."
            own = {name[len(prefix) :]: t for name, t in state.items() if name.startswith(prefix)}
            parts.append(
                FaissIvfIndex(
                    rows,
                    start,
                    config.ivf_lists,
                    config.ivf_probes,
                    config.ivf_codes,
                    config.ivf_quantizer,
                    config.seed,
                    own,
                )
            )
            continue
        if config.backend == "lsh":
            parts.append(LshIndex(rows, start, config.lsh_tables, config.lsh_bits, config.lsh_probes, config.seed))
            continue
        owns_keys = device != home
        if owns_keys:
            rows = rows.to(device, copy=True)
        parts.append(
            TorchFlatIndex(
                rows, start, search_dtype, score_rows(stop - start, element_bytes, device, max_batch), owns_keys
            )
        )
    return ShardedIndex(parts, bounds, keys.device)
