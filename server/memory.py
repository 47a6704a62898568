"""The memory module of Kaiser et al., "Learning to Remember Rare Events" (ICLR 2017).

This is the one implementation of the memory's semantics (docs: the project's
memory-module spec): the query pool, recent slot, positive and negative
neighbours, prediction, softmax weights, the incorrect flag, and the update
(merge into the positive slot, or write into an old slot chosen by noisy age).
The gRPC server and the embedded client both call it; nothing else
re-implements any of it.

Conventions: keys are float32 unit rows, values int64 labels (>= 0), EMPTY (-1)
marks a slot never written, which matches no label; slot id -1 means "none".
Ties are broken towards the lower slot index everywhere, so a memory with
age_noise 0 is fully determined by its inputs, and a seeded one by its seed.
The age noise is a pure function of (seed, commit, slot) (see age_noise), the
same on every device and for any shard count.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import heapq
import logging
import math
import numbers
import re
import secrets
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import numpy as np
import torch

from lifelong_memory.server.age_order import AgeOrder
from lifelong_memory.server.ann import (
    LOW_HALF,
    MONOTONE_NAN,
    descending_then_lower_index_key,
    ivf_bytes,
    lsh_bytes,
)
from lifelong_memory.server.devices import canonical_device, check_usable, is_out_of_memory
from lifelong_memory.server.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from lifelong_memory.server.index import SEARCH_DTYPES, build_index, score_rows, shard_bounds

log = logging.getLogger("lifelong_memory.server.memory")

EMPTY = -1
NO_SLOT = -1
UNIT_NORM_TOLERANCE = 1e-3
BACKENDS = ("torch", "faiss", "lsh", "faiss-ivf")
# Why a backend other than torch stays on the CPU (the error a CUDA memory of it gets):
CPU_ONLY_BACKENDS = {
    "faiss": "the faiss backend runs on the CPU: PyPI's faiss-gpu-cu12 has no kernels for Hopper GPUs (CUDA "
    "error 209 on an H200, docs/approximate-search.md) and GPU FAISS code that has not run is not shipped; use "
    "torch on CUDA",
    "lsh": "the lsh backend runs on the CPU (its buckets are host arrays); use torch on CUDA",
    "faiss-ivf": "the faiss-ivf backend runs on the CPU: FAISS's GPU IVF indexes cannot remove ids, so a write "
    "cannot replace a key in place (docs/approximate-search.md); use torch on CUDA",
}
# Where the shards' searches run: "local", in this process (on ``devices``); "node", one Ray actor per shard,
# spread over the cluster's nodes; "gpu", one Ray actor with one GPU per shard (server/cluster.py).
PLACEMENTS = ("local", "node", "gpu")
IVF_CODES = ("flat", "sq8")
IVF_QUANTIZERS = ("flat", "hnsw")
MAX_LSH_TABLES = 64
MAX_LSH_BITS = 30  # a bucket code and a row id share one int64
MAX_PROBES = 4096  # LSH buckets probed per table: the probe order enumerates up to 2 * probes flip sets
MAX_AGE_BINS = 1000
MAX_TOP_LABELS = 10000
# Each shard costs a search call per query: more than this only adds overhead on any one machine.
MAX_SHARDS = 256
MIB = 1 << 20
DEFAULT_MAX_BATCH = 4096
# Bytes per slot besides its key on the memory's device: value and generation.
DEVICE_SLOT_BYTES = 8 + 8
# Bytes per slot in host memory, whatever the device: the stamp, filled and merge-target flags and slot id; the
# age order's log (slot and stamp, up to twice the memory size); what a write that scores every slot computes
# (age, noise, hash scratch, sort key); and a snapshot's copies of the value, age, generation and writer tag.
HOST_SLOT_BYTES = (8 + 1 + 1 + 8) + 2 * (8 + 8) + (4 + 4 + 8 + 8 + 8) + (8 + 4 + 8 + 4)
# Host bytes one entry of the recent-label table costs (an OrderedDict entry and two ints), whatever the device.
RECENT_ENTRY_BYTES = 160
# Working memory of a query per (row, neighbour), measured on the CPU: search output, canonical order,
# pool and gathered values (80 bytes), plus 4 * key_dim with neighbour keys.
QUERY_BYTES_PER_NEIGHBOR = 80
# Writer tags: who wrote each slot (a trainer, a model). "" is untagged, the default; a memory keeps a table of
# the tags it has seen, so a slot costs 4 bytes for it, and the table is bounded.
WRITER_PATTERN = re.compile(r"[A-Za-z0-9_.:@/+-]{0,128}")
MAX_WRITERS = 1024
MIN_ALPHA = 1e-30  # below, ln(0.2 k) / alpha overflows float32 and every weight is NaN
# CUDA graphs of labelled reads a GPU memory keeps, one per (batch, k, recent) shape, least recently used dropped.
MAX_GRAPHED_READS = 4
# A capture costs a few eager reads, so a shape is captured on its GRAPH_AFTER_READS-th read among the last
# SHAPES_COUNTED shapes read eagerly: a trainer's fixed batch soon is; a batch whose row count changes with every
# call (a sequence model's target subwords) mostly is never, instead of being captured and dropped call after call.
GRAPH_AFTER_READS = 3
SHAPES_COUNTED = 256
CONFIG_TYPES = {"int": numbers.Integral, "float": numbers.Real, "str": str, "tuple[str, ...]": (tuple, list)}


@dataclass(frozen=True)
class MemoryConfig:
    key_dim: int = 128
    memory_size: int = 8192
    choose_k: int = 256
    alpha: float = 0.1
    age_noise: float = 8.0
    correct_in_top: int = 1
    seed: int = 0
    device: str = "cpu"
    search_dtype: str = "float32"
    backend: str = "torch"
    shards: int = 1
    devices: tuple[str, ...] = ()  # where the shards' searches run: empty, all on device
    # Approximate search (docs/approximate-search.md); 0: chosen from memory_size, shards and choose_k.
    lsh_tables: int = 0  # backend lsh: L libraries (tables) of hyperplanes; default ceil(sqrt(choose_k))
    lsh_bits: int = 0  # hyperplanes per table when the shard is full; default round(log2(shard slots * L / choose_k))
    lsh_probes: int = 0  # buckets probed per table; default 1 (the paper); 2^lsh_bits: exhaustive
    ivf_lists: int = 0  # backend faiss-ivf: nlist; default the power of two nearest sqrt(shard slots)
    ivf_probes: int = 0  # nprobe; default max(1, ivf_lists // 32); ivf_lists: exhaustive
    ivf_codes: str = "flat"  # "flat" (float32 vectors) or "sq8" (8-bit codes, candidates re-ranked exactly)
    ivf_quantizer: str = "flat"  # how a query finds its lists: "flat" (exact) or "hnsw" (a graph: for many lists)
    placement: str = "local"  # PLACEMENTS: in this process, or each shard a Ray actor (lmem serve --cluster)

    def validated(self) -> MemoryConfig:
        """This config with choose_k capped at memory_size and device names canonical; InvalidArgument
        names a bad field. Only the config itself is checked: whether this host has its devices is
        check_usable's question, asked where a memory is placed."""

        def check(ok: bool, field: str, message: str) -> None:
            if not ok:
                raise InvalidArgument(f"config.{field}", message)

        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            typed = isinstance(value, CONFIG_TYPES[f.type]) and not isinstance(value, bool)  # True is an Integral
            check(typed, f.name, f"must be {f.type}, got {value!r}")
        check(1 <= self.key_dim <= 65536, "key_dim", f"must be in [1, 65536], got {self.key_dim}")
        check(1 <= self.memory_size <= 2**31, "memory_size", f"must be in [1, 2^31], got {self.memory_size}")
        check(self.choose_k >= 1, "choose_k", f"must be >= 1, got {self.choose_k}")
        check(
            math.isfinite(self.alpha) and self.alpha >= MIN_ALPHA,
            "alpha",
            f"must be finite and >= {MIN_ALPHA} (the softmax temperature ln(0.2 k) / alpha must fit a float32), "
            f"got {self.alpha}",
        )
        check(
            math.isfinite(self.age_noise) and self.age_noise >= 0,
            "age_noise",
            f"must be finite and >= 0, got {self.age_noise}",
        )
        choose_k = min(self.choose_k, self.memory_size)
        check(
            1 <= self.correct_in_top <= choose_k,
            "correct_in_top",
            f"must be in [1, choose_k={choose_k}], got {self.correct_in_top}",
        )
        check(0 <= self.seed < 2**63, "seed", f"must be in [0, 2^63), got {self.seed}")
        check(self.search_dtype in SEARCH_DTYPES, "search_dtype", f"must be one of {sorted(SEARCH_DTYPES)}")
        check(self.backend in BACKENDS, "backend", f"must be one of {list(BACKENDS)}, got {self.backend!r}")
        most_shards = min(MAX_SHARDS, self.memory_size)
        check(1 <= self.shards <= most_shards, "shards", f"must be in [1, {most_shards}], got {self.shards}")
        device = canonical_device(self.device)
        devices = tuple(canonical_device(d, f"config.devices[{i}]") for i, d in enumerate(self.devices))
        check(
            len(devices) <= self.shards,
            "devices",
            f"{len(devices)} devices for {self.shards} shards: each device needs a shard (raise shards)",
        )
        if any(d != "cpu" for d in (device, *devices)):
            check(self.backend == "torch", "backend", CPU_ONLY_BACKENDS.get(self.backend, ""))
        check(
            self.backend == "torch" or self.search_dtype == "float32",
            "search_dtype",
            "bfloat16 search needs the torch backend",
        )
        check(self.placement in PLACEMENTS, "placement", f"must be one of {list(PLACEMENTS)}, got {self.placement!r}")
        if self.placement != "local":
            check(self.backend == "torch", "backend", f"placement {self.placement} needs the torch backend")
            check(not devices, "devices", f"placement {self.placement} places the shards itself; leave devices empty")
        # alpha and age_noise as float32, the precision the wire carries them in: an embedded memory then computes
        # the same softmax temperature and age noise, bit for bit, as the same memory behind a server.
        resolved = dataclasses.replace(
            self,
            choose_k=choose_k,
            seed=int(self.seed),
            device=device,
            devices=devices,
            alpha=float(np.float32(self.alpha)),
            age_noise=float(np.float32(self.age_noise)),
        )
        return resolved._approximate_search_validated(check)

    def _approximate_search_validated(self, check: Callable[[bool, str, str], None]) -> MemoryConfig:
        """The approximate-search fields checked, and for the memory's own backend with their defaults filled
        in (a config read back shows what the index uses); a backend's fields must be 0 (default) or in range."""
        shard_slots = self.memory_size // self.shards  # the smallest shard
        for field, low, high in (
            ("lsh_tables", 1, MAX_LSH_TABLES),
            ("lsh_bits", 1, MAX_LSH_BITS),
            ("ivf_lists", 1, shard_slots),
        ):
            value = getattr(self, field)
            check(value == 0 or low <= value <= high, field, f"must be 0 (default) or in [{low}, {high}], got {value}")
        check(self.ivf_codes in IVF_CODES, "ivf_codes", f"must be one of {list(IVF_CODES)}, got {self.ivf_codes!r}")
        check(
            self.ivf_quantizer in IVF_QUANTIZERS,
            "ivf_quantizer",
            f"must be one of {list(IVF_QUANTIZERS)}, got {self.ivf_quantizer!r}",
        )
        if self.backend == "lsh":
            tables = self.lsh_tables or min(MAX_LSH_TABLES, math.ceil(math.sqrt(self.choose_k)))
            bucket_slots = self.choose_k / tables
            bits = self.lsh_bits or min(MAX_LSH_BITS, max(1, round(math.log2(max(1.0, shard_slots / bucket_slots)))))
            most = min(MAX_PROBES, 1 << bits)
            check(
                0 <= self.lsh_probes <= most,
                "lsh_probes",
                f"must be 0 (default) or in [1, {most}], got {self.lsh_probes}",
            )
            return dataclasses.replace(self, lsh_tables=tables, lsh_bits=bits, lsh_probes=self.lsh_probes or 1)
        check(self.lsh_probes >= 0, "lsh_probes", f"must be >= 0, got {self.lsh_probes}")
        if self.backend == "faiss-ivf":
            lists = self.ivf_lists or min(shard_slots, 1 << max(0, round(math.log2(math.sqrt(shard_slots)))))
            check(
                0 <= self.ivf_probes <= lists,
                "ivf_probes",
                f"must be 0 (default) or in [1, ivf_lists={lists}], got {self.ivf_probes}",
            )
            return dataclasses.replace(self, ivf_lists=lists, ivf_probes=self.ivf_probes or max(1, lists // 32))
        check(self.ivf_probes >= 0, "ivf_probes", f"must be >= 0, got {self.ivf_probes}")
        return self

    def check_usable(self) -> None:
        """InvalidArgument naming the field unless this host has the config's devices."""
        check_usable(self.device, "config.device")
        for i, device in enumerate(self.devices):
            check_usable(device, f"config.devices[{i}]")

    def shard_devices(self) -> list[str]:
        """The device of each shard: ``devices`` in consecutive blocks of shards (shard i on
        devices[i * len(devices) // shards]), or all on ``device``."""
        if not self.devices:
            return [self.device] * self.shards
        return [self.devices[i * len(self.devices) // self.shards] for i in range(self.shards)]

    @property
    def reads_through_cuda_graphs(self) -> bool:
        """Whether a memory of this validated config reads a labelled batch through CUDA graphs once full
        (Memory._graphed_read): on a GPU, with every shard there, in this process."""
        return self.device != "cpu" and self.placement == "local" and set(self.shard_devices()) == {self.device}

    @property
    def softmax_temperature(self) -> float:
        return softmax_temperature(self.choose_k, self.alpha)

    def retrain_bytes(self) -> int:
        """Host bytes a RetrainIndex of a faiss-ivf memory holds beside the live index: the new index, and the
        training sample (at most FAISS's 256 points per list)."""
        bounds = shard_bounds(self.memory_size, self.shards)
        return sum(
            ivf_bytes(stop - start, self.key_dim, self.ivf_lists, self.ivf_codes, self.ivf_quantizer)
            + min(stop - start, 256 * self.ivf_lists) * self.key_dim * 4
            for start, stop in zip(bounds[:-1], bounds[1:], strict=True)
        )

    def footprint(self, max_batch: int) -> dict[str, int]:
        """Bytes a memory of this config holds at most, per device: its slots on ``device``; the
        recent-label table (at most memory_size labels), the slots' writer tags and the write and snapshot
        bookkeeping (HOST_SLOT_BYTES) in host memory; per shard the index's own copies of its keys (bf16;
        float32 on another device; faiss; an approximate index's buckets or lists, of a validated config; a
        float32 CPU shard's empty-row mask) and the score buffer for batches of up to ``max_batch`` rows, on
        the shard's device (shards placed on a cluster hold these in their actors, not here); on a GPU the
        working memory its CUDA graphs keep. Call it once the
        devices are known to be usable (a CUDA score buffer is sized from the device's memory)."""
        dim = self.key_dim
        needed = {self.device: self.memory_size * (dim * 4 + DEVICE_SLOT_BYTES)}
        # The recent-label table, the writer tag of each slot (int32) and the write's bookkeeping live in host memory.
        needed["cpu"] = needed.get("cpu", 0) + self.memory_size * (RECENT_ENTRY_BYTES + 4 + HOST_SLOT_BYTES)
        score_element = 2 if self.search_dtype == "bfloat16" else 4
        if self.placement != "local":  # each shard's copy of its keys and its score buffer live in its actor
            return needed
        if self.reads_through_cuda_graphs:  # each graph keeps a query's working memory
            needed[self.device] += MAX_GRAPHED_READS * query_working_bytes(dim, max_batch, self.choose_k, frozenset())
        bounds = shard_bounds(self.memory_size, self.shards)
        for start, stop, device in zip(bounds[:-1], bounds[1:], self.shard_devices(), strict=True):
            rows = stop - start
            if self.backend == "faiss":
                shard = rows * dim * 4
            elif self.backend == "lsh":
                shard = lsh_bytes(rows, dim, self.lsh_tables, self.lsh_bits)
            elif self.backend == "faiss-ivf":
                shard = ivf_bytes(rows, dim, self.ivf_lists, self.ivf_codes, self.ivf_quantizer)
            else:
                if self.search_dtype == "bfloat16":
                    shard = rows * dim * 2
                else:
                    shard = rows if device == "cpu" else 0  # a CPU shard's empty-row mask
                shard += rows * dim * 4 if device != self.device else 0
                shard += score_rows(rows, score_element, device, max_batch) * rows * score_element
            needed[device] = needed.get(device, 0) + shard
        return needed


def query_working_bytes(key_dim: int, batch: int, k: int, fields: frozenset[str]) -> int:
    """Working memory of one query of ``batch`` rows and ``k`` neighbours beyond the index's score buffers."""
    per_neighbor = QUERY_BYTES_PER_NEIGHBOR + (4 * key_dim if "neighbor_keys" in fields else 0)
    return batch * k * per_neighbor


def result_bytes(key_dim: int, batch: int, k: int, fields: frozenset[str], correct_in_top: int = 1) -> int:
    """Bytes of the arrays in a QueryResult: what a reply carries, before any framing."""
    per_row = 8 + 8 + 1 + 16 * (correct_in_top + 1)  # predictions, written slots, incorrect, a ticket
    per_row += k * (8 + 4 + 8) if "neighbors" in fields else 0
    per_row += k * 4 * key_dim if "neighbor_keys" in fields else 0
    per_row += k * 4 if "weights" in fields else 0
    per_row += 24 if "positive_negative" in fields else 0
    per_row += 8 * key_dim if "positive_negative_keys" in fields else 0
    return batch * per_row


def new_incarnation() -> int:
    return secrets.randbits(63)


def softmax_temperature(k: int, alpha: float) -> float:
    """t = max(1, ln(0.2 k) / alpha): 39.36 for k = 256, alpha = 0.1."""
    return max(1.0, math.log(0.2 * k) / alpha)


@dataclass
class QueryTicket:
    """What a query relied on, for a later two-phase update (see Memory.update)."""

    relied_slots: torch.Tensor  # int64 [B, correct_in_top + 1]: first pool slots, then positive
    relied_generations: torch.Tensor  # int64 [B, correct_in_top + 1]
    k: int
    use_recent: bool
    # The memory's incarnation the query read: a ticket from another (the memory deleted and made again under
    # its name, or imported) has every row queried again, since the same slot and generation may hold another key.
    incarnation: int = 0


@dataclass
class QueryResult:
    """A query's answer. Optional parts are None unless requested (see FIELDS)."""

    commit_sequence: int
    predictions: torch.Tensor  # int64 [B], EMPTY where the nearest slot is empty
    written_slots: torch.Tensor  # int64 [B], NO_SLOT without update
    incorrect: torch.Tensor | None = None  # bool [B]
    ticket: QueryTicket | None = None  # with labels and without update
    neighbor_slots: torch.Tensor | None = None  # int64 [B, k], nearest first
    neighbor_similarities: torch.Tensor | None = None  # float32 [B, k]
    neighbor_values: torch.Tensor | None = None  # int64 [B, k]
    neighbor_keys: torch.Tensor | None = None  # float32 [B, k, D]
    weights: torch.Tensor | None = None  # float32 [B, k]
    positive_slots: torch.Tensor | None = None  # int64 [B]
    positive_similarities: torch.Tensor | None = None  # float32 [B]
    negative_slots: torch.Tensor | None = None  # int64 [B]
    negative_similarities: torch.Tensor | None = None  # float32 [B]
    positive_keys: torch.Tensor | None = None  # float32 [B, D]
    negative_keys: torch.Tensor | None = None  # float32 [B, D]


# Optional result parts, by the name clients ask for them with.
FIELDS = {
    "neighbors": ("neighbor_slots", "neighbor_similarities", "neighbor_values"),
    "neighbor_keys": ("neighbor_keys",),
    "weights": ("weights",),
    "positive_negative": ("positive_slots", "positive_similarities", "negative_slots", "negative_similarities"),
    "positive_negative_keys": ("positive_keys", "negative_keys"),
}
ALL_FIELDS = frozenset(FIELDS) - {"neighbor_keys"}


class SlotsRead(NamedTuple):
    """Slots as one committed state holds them (Memory.read_slots)."""

    commit_sequence: int
    keys: torch.Tensor  # float32 [n, D]
    values: torch.Tensor  # int64 [n], EMPTY for empty slots
    ages: torch.Tensor  # float32 [n]
    generations: torch.Tensor  # int64 [n]: commit sequence of the slot's last write, merge or clear
    writers: tuple[str, ...]  # the writer tag of each slot's last write or merge; "" untagged or never written


@dataclass(frozen=True)
class WriterReport:
    """One writer tag's share of a memory (MemoryReport.writers)."""

    name: str  # "" for untagged writes
    slots: int  # filled slots whose last write or merge carried this tag
    writes: int  # rows it wrote into an old slot, since create
    merges: int  # rows it merged into their positive slot, since create


@dataclass
class UpdateResult:
    commit_sequence: int
    written_slots: torch.Tensor  # int64 [B]
    incorrect: torch.Tensor  # bool [B]: the row wrote an old slot (else it merged)
    revalidated_rows: int


@dataclass
class RetrainResult:
    commit_sequence: int  # the retrain's own commit: answers from this one on use the new quantizer
    rewritten_slots: int  # slots written while it trained, re-added to the new lists when it was swapped in
    seconds: float  # all of it; queries and writes went on meanwhile


@dataclass(frozen=True)
class MemoryReport:
    """What a person looking into a memory wants to know, read from one committed state (Memory.inspect).

    Everything but the counters is about the filled slots (value != EMPTY).
    """

    commit_sequence: int
    memory_size: int
    filled_slots: int
    queries: int  # query rows served since create, as in stats()
    writes: int  # rows written into an old slot
    merges: int  # rows merged into their positive slot
    age_bin_edges: list[int]  # bin i counts slots with edges[i] <= age < edges[i + 1]
    age_counts: list[int]
    distinct_labels: int
    top_labels: list[int]  # the most frequent labels, most slots first, ties to the lower label
    top_label_counts: list[int]  # slots holding each of top_labels
    key_norm_min: float  # over filled keys of finite norm; 0 when there are none
    key_norm_max: float
    keys_off_unit: int  # filled keys of finite norm off 1 by more than UNIT_NORM_TOLERANCE
    keys_non_finite: int  # filled keys with an inf or nan component (or too large to square in float32)
    writers: list[WriterReport]  # every tag that wrote or merged since create, most slots first

    @property
    def fill_ratio(self) -> float:
        return self.filled_slots / self.memory_size


@dataclass
class LabelSlots:
    """Where one label lives (Memory.find_label)."""

    commit_sequence: int
    slots: torch.Tensor  # int64 [n], ascending: the slots whose value is the label
    ages: torch.Tensor  # float32 [n]
    recent_slot: int  # where the label was last written or merged (since overwritten, maybe); NO_SLOT if never


@dataclass
class Delta:
    """One committed write, as the write-ahead log keeps it: enough to redo it exactly."""

    targets: torch.Tensor  # int64 [n]: distinct slots written or merged into
    keys: torch.Tensor  # float32 [n, D]: their new keys
    values: torch.Tensor  # int64 [n]: their new values
    labels: torch.Tensor  # int64 [B]: the batch's labels, in order, for the recent slots
    slots: torch.Tensor  # int64 [B]: the slot each row wrote or merged into
    writes: int  # rows that wrote an old slot; the rest merged
    writer: str = ""  # the writer tag of the whole batch


@dataclass
class Retrain:
    """A retrain of the search index's quantizer, as the write-ahead log keeps it: the trained state (per shard
    centroids, and sq8's ranges) that every answer from this commit on is searched with."""

    index_state: dict[str, torch.Tensor]


class KeysAtCommit:
    """A memory's keys as they were at one commit, read in ranges of slots while its writes go on, so a
    snapshot or export streams them instead of holding a second copy of the memory's largest part.

    Copy on write: until the reader has passed a slot, a write or clear saves the slot's key as it was
    first (Memory._commit, _clear), and the reader takes the saved key instead of the live one. What it
    holds beyond one chunk is the keys of the slots written meanwhile ahead of the reader: at most the
    memory's ``max_query_bytes`` (a server's working memory per call); a write that would make it more ends
    the reader instead (its next chunk raises ResourceExhausted) and goes on. What a capture holds, these
    keys and its copies of the other arrays, counts in the memory's footprint while it is read."""

    def __init__(self, memory: Memory, copies_bytes: int):
        self._memory = memory
        self.dtype = torch.float32
        self.shape = tuple(memory.keys.shape)
        self._row_bytes = self.shape[1] * 4
        self._read_up_to = 0  # slots below this were read
        self._saved: dict[int, torch.Tensor] = {}  # slot -> key at the commit, for slots written since
        self._saved_order: list[int] = []  # the same slots, a heap
        self._frozen: torch.Tensor | None = None  # after a clear: every key from _frozen_from on, at the commit
        self._frozen_from = 0
        self._finished = False  # read to the end, abandoned or ended: nothing more to save
        self._ended: ResourceExhausted | None = None  # why a write ended this reader, raised at its next chunk
        self._copies_bytes = copies_bytes  # the capture's copies of the other arrays
        self._saved_bytes = 0  # keys saved or frozen
        memory._count_held(copies_bytes)

    def before_write(self, targets: np.ndarray | None) -> None:
        """Called under the memory's lock before the slots ``targets`` (None: every slot) change."""
        if self._frozen is not None or self._finished:
            return
        keys = self._memory.keys
        if targets is None:  # a clear: keep what is left to read, as it is now, in one block
            if self._would_exceed((self.shape[0] - self._read_up_to) * self._row_bytes):
                return
            block = keys[self._read_up_to :].to("cpu", copy=True)
            for slot, row in self._saved.items():
                block[slot - self._read_up_to] = row
            self._frozen, self._frozen_from = block, self._read_up_to
            self._saved.clear()
            self._saved_order.clear()
            self._set_saved_bytes(block.numel() * 4)
            return
        new = [int(slot) for slot in targets[targets >= self._read_up_to] if int(slot) not in self._saved]
        if new and not self._would_exceed(self._saved_bytes + len(new) * self._row_bytes):
            rows = keys[torch.tensor(new, device=keys.device)].cpu()
            self._saved.update(zip(new, rows, strict=True))
            for slot in new:
                heapq.heappush(self._saved_order, slot)
            self._set_saved_bytes(self._saved_bytes + len(new) * self._row_bytes)

    def _would_exceed(self, saved_bytes: int) -> bool:
        """Whether keeping ``saved_bytes`` of keys is over the limit; if so, this reader is ended."""
        limit = self._memory.max_query_bytes
        if limit is None or saved_bytes <= limit:
            return False
        self._ended = ResourceExhausted(
            f"name: the writes since commit {self._memory.commit_sequence} overwrote more keys this snapshot or "
            f"export had not read yet than the server keeps for one call ({limit / MIB:.1f} MiB, lmem serve "
            "--max-query-mb): it was ended, and the writes went on; try again, or while fewer writes go on"
        )
        self._finish()
        self._memory._streamed_keys.discard(self)
        return True

    def _set_saved_bytes(self, saved_bytes: int) -> None:
        with self._memory._held_bytes_lock:
            if not self._finished:  # else _finish has uncounted them all
                self._memory._count_held(saved_bytes - self._saved_bytes)
                self._saved_bytes = saved_bytes

    def __del__(self) -> None:  # a capture dropped unread
        self._finish()

    def _finish(self) -> None:
        """Nothing more to save or to count; idempotent, and safe in any thread (the collector's too)."""
        with self._memory._held_bytes_lock:
            if self._finished:
                return
            self._finished = True
            self._saved.clear()
            self._saved_order.clear()
            self._frozen = None
            self._memory._count_held(-self._copies_bytes - self._saved_bytes)
            self._saved_bytes = 0

    def chunks(self, rows: int) -> Iterator[torch.Tensor]:
        """The keys at the commit, ``rows`` slots at a time, on the CPU."""
        memory, size = self._memory, self.shape[0]
        try:
            for start in range(0, size, rows):
                stop = min(size, start + rows)
                with memory._locked():
                    if self._ended is not None:
                        raise self._ended
                    if self._frozen is not None:
                        block = self._frozen[start - self._frozen_from : stop - self._frozen_from]
                    else:
                        block = memory.keys[start:stop].to("cpu", copy=True)
                        popped = 0
                        while self._saved_order and self._saved_order[0] < stop:
                            slot = heapq.heappop(self._saved_order)
                            block[slot - start] = self._saved.pop(slot)
                            popped += 1
                        if popped:
                            self._set_saved_bytes(self._saved_bytes - popped * self._row_bytes)
                    self._read_up_to = stop
                yield block
            with memory._lock:
                memory._streamed_keys.discard(self)
        finally:  # or abandoned (an export whose client stopped reading): writes copy nothing more for it
            self._finish()  # without the memory's lock: the collector may close this in any thread


@dataclass
class MemoryState:
    """Everything a memory is, on the CPU: what a snapshot stores and a restore rebuilds."""

    config: MemoryConfig
    commit_sequence: int
    # float32 [M, D]; KeysAtCommit from capture(streamed=True); None once handed to a memory (take_padded_keys)
    keys: torch.Tensor | KeysAtCommit | None
    values: torch.Tensor  # int64 [M]
    ages: torch.Tensor  # float32 [M]
    generations: torch.Tensor  # int64 [M]
    recent_labels: torch.Tensor  # int64 [L]
    recent_slots: torch.Tensor  # int64 [L]
    counters: dict[str, int]
    writers: torch.Tensor  # int32 [M]: index into writer_names of each slot's last write or merge
    writer_names: list[str]  # the writer table; writer_names[0] == "" (untagged)
    writer_counters: list[tuple[int, int]]  # (writes, merges) per entry of writer_names
    # The index's own state (Index.state: a trained IVF quantizer), for an index of the same config.
    index_state: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    # [M + 1, D], ``keys`` followed by a zero row (persistence.read_snapshot reads keys into this): the layout
    # a memory keeps, so a restore on the CPU adopts it rather than holding the keys twice.
    padded_keys: torch.Tensor | None = None
    # Which history of writes this is (Memory.incarnation); None: start a new one (an import, an older file).
    incarnation: int | None = None

    def take_padded_keys(self) -> torch.Tensor | None:
        """The padded key buffer, handed over once: the keys are then the new memory's own, and this state
        has none left to restore a second memory from."""
        padded, self.padded_keys = self.padded_keys, None
        if padded is not None:
            self.keys = None
        return padded


class Journal(Protocol):
    """Where a memory records its writes (the write-ahead log); see server/persistence.py."""

    failure: Exception | None  # set when the log can no longer be trusted: the memory then answers nothing

    def append(self, sequence: int, delta: Delta | Retrain | None) -> None:
        """Record a write (None: a clear; or a retrain) before it is applied. Called under the memory's lock, in commit
        order. Raises (ResourceExhausted, Unavailable) with the log as it was: the write is then not applied."""

    def wait(self, sequence: int) -> None:
        """Return once the write ``sequence`` is durable under the journal's policy (Unavailable if it can't be)."""


@dataclass
class _Read:
    """Everything one query reads, before any update of its step."""

    slots: torch.Tensor  # [B, k] canonical order
    similarities: torch.Tensor  # [B, k]
    values: torch.Tensor  # [B, k]
    best_slots: torch.Tensor | None = None  # [2, B]: positive, negative (NO_SLOT if none)
    best_similarities: torch.Tensor | None = None  # [2, B]: theirs, 0 if none
    incorrect: torch.Tensor | None = None

    @property
    def positive_slots(self) -> torch.Tensor:
        return self.best_slots[0]


class IndexBuilder(Protocol):
    """Builds an index over a memory's live ``keys`` [M, D]; ``generations`` [M] (live too) say which commit
    last wrote each slot, so an index kept elsewhere can tell what a copy of it that fell behind lacks."""

    def __call__(self, keys: torch.Tensor, generations: torch.Tensor, config: MemoryConfig, max_batch: int): ...


class _GraphedRead:
    """A GPU memory's labelled read of one shape (batch, k, recent slot or not) captured as one CUDA graph: the
    search, the canonical order, the pool, positive and negative, about 60 kernels launched by one replay. The
    graph reads the memory's tensors where they are, so it sees every write; inputs are copied into its own
    buffers and its outputs cloned, so that no caller holds a tensor the next replay overwrites."""

    def __init__(self, memory: Memory, batch: int, k: int, use_recent: bool):
        device = memory.device
        self.q = torch.zeros(batch, memory.config.key_dim, device=device)
        self.labels = torch.zeros(batch, dtype=torch.int64, device=device)
        self.recent = torch.full((batch,), NO_SLOT, dtype=torch.int64, device=device) if use_recent else None
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # warm-up off the capturing stream, as torch.cuda.graph asks
            for _ in range(2):
                memory._read_labelled(self.q, self.labels, self.recent, k)
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: the server's other threads may go on using the GPU for other memories meanwhile.
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            self.read = memory._read_labelled(self.q, self.labels, self.recent, k)

    def __call__(self, q: torch.Tensor, labels: torch.Tensor, recent: torch.Tensor | None) -> _Read:
        self.q.copy_(q)
        self.labels.copy_(labels, non_blocking=not labels.is_pinned())
        if recent is not None:
            self.recent.copy_(recent, non_blocking=True)  # the memory's own pageable tensor
        self.graph.replay()
        read = self.read
        return _Read(
            read.slots.clone(),
            read.similarities.clone(),
            read.values.clone(),
            read.best_slots.clone(),
            read.best_similarities.clone(),
            read.incorrect.clone(),
        )


class _GraphCache:
    """The captured reads of recurring shapes: at most MAX_GRAPHED_READS, the least recently used dropped; a
    shape is captured on its GRAPH_AFTER_READS-th read (counted while it has no graph)."""

    def __init__(self):
        self._graphs: OrderedDict = OrderedDict()  # shape -> its capture, most recently used last
        self._reads: OrderedDict = OrderedDict()  # shape -> eager reads so far, for the last SHAPES_COUNTED shapes

    def get(self, shape, capture: Callable):
        """The capture of ``shape``, made now by ``capture()`` if this is its GRAPH_AFTER_READS-th read; None while
        it should be read eagerly."""
        graphed = self._graphs.pop(shape, None)
        if graphed is None:
            reads = self._reads.pop(shape, 0) + 1
            if reads < GRAPH_AFTER_READS:
                self._reads[shape] = reads
                if len(self._reads) > SHAPES_COUNTED:
                    self._reads.popitem(last=False)
                return None
            graphed = capture()
        self._graphs[shape] = graphed
        if len(self._graphs) > MAX_GRAPHED_READS:
            self._graphs.popitem(last=False)  # counted again from its next read
        return graphed


def _out_of_memory_is_resource_exhausted(method):
    """An allocation that fails inside a call is RESOURCE_EXHAUSTED, and the memory is as it was: every
    call allocates what it needs before it changes anything, or logs it (see _journaled)."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except (RuntimeError, MemoryError) as exc:
            if not is_out_of_memory(exc):
                raise
            raise ResourceExhausted(
                f"out of memory on {self.config.device} in {method.__name__} (the memory is unchanged): {exc}"
            ) from None

    return wrapper


class Memory:
    """One memory: keys, values, ages, recent slots and the index over the keys.

    Thread-safe: each call holds the memory's lock, so writes commit in one
    order, reads see only committed state and a fused query + update is atomic.
    With a ``journal`` every write is recorded under the lock and acknowledged
    (returned) only once the journal says it is durable. Everything the memory
    needs, score buffers for batches of ``max_batch`` rows included, is
    allocated here; an allocation that fails is ResourceExhausted. ``index_builder`` places the index
    elsewhere (a cluster's actors, server/cluster.py) instead of build_index here.
    """

    def __init__(
        self,
        config: MemoryConfig,
        state: MemoryState | None = None,
        journal: Journal | None = None,
        max_batch: int = DEFAULT_MAX_BATCH,
        max_query_bytes: int | None = None,
        index_builder: IndexBuilder | None = None,
    ):
        self.config = config.validated()
        # Working memory one query may use (None: unbounded); a larger query is refused before any work.
        self.max_query_bytes = max_query_bytes
        self.max_batch = max_batch
        cfg = self.config
        cfg.check_usable()
        self.device = torch.device(cfg.device)
        size, dim = cfg.memory_size, cfg.key_dim
        self._graphs = _GraphCache() if cfg.reads_through_cuda_graphs else None
        try:
            # One row past the last slot stands for NO_SLOT (-1 indexes it): a zero key, the value EMPTY and
            # generation -1, never written. Reading the slots of a pool, a positive or a ticket then needs no mask.
            adoptable = state is not None and state.padded_keys is not None and self.device.type == "cpu"
            adopted = state.take_padded_keys() if adoptable and state.padded_keys.shape == (size + 1, dim) else None
            if adopted is not None:
                self._padded_keys = adopted
            else:
                self._padded_keys = torch.zeros(size + 1, dim, dtype=torch.float32, device=self.device)
            self._padded_values = torch.full((size + 1,), EMPTY, dtype=torch.int64, device=self.device)
            self._padded_generations = torch.full((size + 1,), NO_SLOT, dtype=torch.int64, device=self.device)
            self.keys = self._padded_keys[:size]
            self.values = self._padded_values[:size]
            # Commit sequence of each slot's last write, merge or clear: how a
            # two-phase update tells that a slot changed under it.
            self.generations = self._padded_generations[:size]
            self.generations.zero_()
            # Host-side bookkeeping, on the CPU whatever the device. A slot's age is the commits since it was
            # last written, merged into or cleared (its stamp in ``_touched``); ``_age_order`` finds the oldest.
            self._touched = np.zeros(size, dtype=np.int64)
            self._filled = np.zeros(size, dtype=bool)
            self._merge_targets = np.zeros(size, dtype=bool)  # a write's scratch: the slots its rows merge into
            self._slot_ids = np.arange(size)
            # Streamed captures still being read (capture(streamed=True)); one dropped unread goes with it.
            self._streamed_keys: weakref.WeakSet[KeysAtCommit] = weakref.WeakSet()
            # Bytes the streamed captures (their copies and saved keys) and a retrain's second index hold, counted
            # in the footprint; a reentrant lock of its own: the collector may finish a capture in a thread holding it.
            self.held_bytes = 0
            self._held_bytes_lock = threading.RLock()
            self.writers = torch.zeros(size, dtype=torch.int32)
            self.writer_names = [""]
            self._writer_ids = {"": 0}
            self.writer_counters = [[0, 0]]  # (writes, merges) per writer
            # label -> slot of its last write or merge, least recently written first; at most memory_size labels.
            self.recent: OrderedDict[int, int] = OrderedDict()
            self.commit_sequence = 0
            # A random id of this history of writes, drawn at create and import and kept by snapshots and
            # recovery: the same slot and generation name the same key only within one incarnation.
            self.incarnation = new_incarnation()
            self.empty_slots = size
            self.counters = {"queries": 0, "writes": 0, "merges": 0}
            if state is not None:
                self._load(state, keys_adopted=adopted is not None)
            self._age_order = AgeOrder(self._touched)
            if index_builder is None:
                self.index = build_index(self.keys, cfg, max_batch, self._index_state(state))
            else:
                self.index = index_builder(self.keys, self.generations, cfg, max_batch)
        except (RuntimeError, MemoryError) as exc:
            if not is_out_of_memory(exc):
                raise
            raise ResourceExhausted(
                f"config.memory_size: cannot allocate {size} slots of dimension {dim} on {cfg.device} "
                f"(shards on {sorted(set(cfg.shard_devices()))}): {exc}"
            ) from None
        self._lock = threading.Lock()
        self._retraining = threading.Lock()  # one retrain at a time; it holds ``_lock`` only to start and to swap
        self._retired = False
        self._broken: str | None = None  # why a memory without a log answers nothing (see _journaled)
        # What recovery at the last start cut from the log or set aside (persistence.py); "" if nothing.
        self.recovery_report = ""
        self.journal = journal

    @property
    def ages(self) -> torch.Tensor:
        """Every slot's age, float32 [M] on the CPU: commits since its last write, merge or clear. float32 as
        the rule counts them (adding 1 per commit, which stops at 2^24)."""
        return self._ages_of(self._touched)

    def _ages_of(self, touched: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(self._host_ages(touched))

    def _host_ages(self, touched: np.ndarray) -> np.ndarray:
        return np.minimum(self.commit_sequence - touched, MAX_AGE).astype(np.float32)

    # ----------------------------------------------------------------- public

    @_out_of_memory_is_resource_exhausted
    def query(
        self,
        queries,
        labels=None,
        *,
        k: int | None = None,
        use_recent: bool = True,
        update: bool = False,
        fields=ALL_FIELDS,
        writer: str = "",
    ) -> QueryResult:
        """Search the memory; with ``update`` apply the memory update in the same step, tagging the slots it
        writes or merges with ``writer``."""
        for flag, value in (("use_recent", use_recent), ("update", update)):
            if not isinstance(value, (bool, np.bool_)):  # a string such as "no" would be true
                raise InvalidArgument(flag, f"must be True or False, got {value!r}")
        q = self._check_queries(queries)
        batch = q.shape[0]  # not len(q): a tensor's __len__ is a Python call through torch's function hooks
        y = self._check_labels(labels, batch, required=update)
        k = self._check_k(k)
        fields = self._check_fields(fields, labelled=y is not None)
        if update:
            self._check_update_batch(batch)
            check_writer(writer)
        self._check_query_bytes(batch, k, fields)
        with self._locked():
            read = self._read(q, y, k, use_recent)
            result = self._result(q, read, fields, k, use_recent, ticket=not update)
            if update:
                result.written_slots = self._apply(q, y, read.incorrect, read.positive_slots, writer)
                result.commit_sequence = self.commit_sequence
            self.counters["queries"] += batch
        if "weights" in fields:  # computed after releasing the lock: it reads only this query's own tensors
            result.weights = torch.softmax(read.similarities * softmax_temperature(k, self.config.alpha), dim=1)
        if update:
            self._wait_durable(result.commit_sequence)
        return result

    @_out_of_memory_is_resource_exhausted
    def update(self, queries, labels, ticket: QueryTicket, writer: str = "") -> UpdateResult:
        """Two-phase update: apply labels to the result of an earlier query.

        Rows whose relied-on slots (first pool entries, positive slot) were
        rewritten since, by this or another trainer, are queried again against
        the memory as it is now, so no row ever merges into a stranger.
        """
        q = self._check_queries(queries)
        y = self._check_labels(labels, len(q), required=True)
        relied, generations, k = self._check_ticket(ticket, len(q))
        self._check_update_batch(len(q))
        check_writer(writer)
        c = self.config.correct_in_top
        self._check_query_bytes(len(q), k, frozenset())
        with self._locked():
            stale = (self._padded_generations[relied] != generations).any(dim=1)
            if ticket.incarnation != self.incarnation:
                stale = torch.ones_like(stale)
            labels = _to_device(y, self.device)
            # NO_SLOT reads EMPTY, which matches no label.
            incorrect = ~(self._padded_values[relied[:, :c]] == labels[:, None]).any(dim=1)
            positive = relied[:, c].clone()
            holds_label = self._padded_values[positive] == labels
            forged = ~stale & ~incorrect & ~holds_label
            if bool(forged.any()):
                row = int(forged.nonzero()[0])
                raise InvalidArgument("ticket.relied_slots", f"row {row}: the positive slot does not hold the label")
            revalidated = int(stale.sum())
            if revalidated:
                fresh = self._read(q[stale], y[stale.cpu()], k, ticket.use_recent)
                incorrect[stale] = fresh.incorrect
                positive[stale] = fresh.positive_slots
            written = self._apply(q, y, incorrect, positive, writer)
            sequence = self.commit_sequence
        self._wait_durable(sequence)
        return UpdateResult(sequence, written, incorrect, revalidated)

    @_out_of_memory_is_resource_exhausted
    def read_slots(self, slots) -> SlotsRead:
        """The given slot ids' keys, values, ages, generations and writers, from one committed state."""
        slots = torch.as_tensor(slots, dtype=torch.int64).to(self.device)
        if slots.dim() != 1:
            raise InvalidArgument("slots", f"must be one-dimensional, got shape {list(slots.shape)}")
        if len(slots) and (int(slots.min()) < 0 or int(slots.max()) >= self.config.memory_size):
            raise InvalidArgument("slots", f"slot ids must be in [0, {self.config.memory_size})")
        with self._locked():
            return SlotsRead(
                self.commit_sequence,
                self.keys[slots].clone(),
                self.values[slots].clone(),
                self._ages_of(self._touched[slots.cpu().numpy()]).to(self.device),
                self.generations[slots].clone(),
                tuple(self.writer_names[i] for i in self.writers[slots.cpu()].tolist()),
            )

    @_out_of_memory_is_resource_exhausted
    def clear(self) -> None:
        """Forget everything (the commit sequence goes on, and with it the age noise)."""
        with self._locked():
            self._journaled(None, self._prepare_clear())
            sequence = self.commit_sequence
        self._wait_durable(sequence)

    def retire(self, commit: Callable[[], None]) -> None:
        """Take no more calls (a delete): once the calls in progress are done, run ``commit`` (which removes
        the memory's files) under the lock; from then on every call raises NotFound. If ``commit`` raises,
        the memory goes on as it was."""
        with self._lock:
            commit()
            self._retired = True

    @_out_of_memory_is_resource_exhausted
    def replay(self, sequence: int, delta: Delta | Retrain | None) -> None:
        """Redo a write from the journal (None: a clear; or a retrain), exactly as it was first committed."""
        with self._lock:
            if sequence != self.commit_sequence + 1:
                raise ValueError(f"write {sequence} does not follow commit {self.commit_sequence}")
            if delta is None:
                self._prepare_clear()()
            elif isinstance(delta, Retrain):
                self._retrain(delta, build_index(self.keys, self.config, self.max_batch, delta.index_state))
            else:
                self._prepare_commit(delta)()

    @_out_of_memory_is_resource_exhausted
    def retrain_index(self) -> RetrainResult:
        """Train the IVF quantizer anew on the keys as they are now (as keys drift under training, lists
        trained on the first fill find less; docs/approximate-search.md), without stopping queries or writes.

        Under the lock only a copy of the training sample is taken; k-means and the new lists (every filled
        key assigned to its nearest new centroid) are built beside the live index. Under the lock again, the
        slots written meanwhile are re-added to the new lists from their current keys, the new centroids go to
        the journal, and the new index is swapped in. A retrain is a commit, as a clear is: the log replays it
        at its place in the commit order, so a recovered memory answers exactly as this one."""
        cfg = self.config
        if cfg.backend != "faiss-ivf" or cfg.placement != "local":
            raise FailedPrecondition(
                f"config.backend: only a faiss-ivf memory in this process has a quantizer to retrain; this one is "
                f"{cfg.backend!r} placed {cfg.placement!r}"
            )
        with self._retraining:
            started = time.perf_counter()
            self._count_held(cfg.retrain_bytes())  # the second index, counted in the footprint while it is built
            try:
                with self._locked():
                    begun = self.commit_sequence
                    samples = self.index.training_samples()
                state = self.index.retrained_state(samples)
                # Keys a write changes meanwhile may be read half-written here; every such slot is re-added below.
                index = build_index(self.keys, cfg, self.max_batch, state)
                with self._locked():
                    changed = torch.from_numpy(np.flatnonzero(self._touched > begun))
                    if len(changed):
                        index.update(changed, self.keys[changed.to(self.device)])
                    record = Retrain(state)
                    self._journaled(record, lambda: self._retrain(record, index))
                    sequence = self.commit_sequence
            finally:
                self._count_held(-cfg.retrain_bytes())
        self._wait_durable(sequence)
        return RetrainResult(sequence, len(changed), time.perf_counter() - started)

    @_out_of_memory_is_resource_exhausted
    def capture(self, streamed: bool = False) -> MemoryState:
        """A consistent copy of the whole memory, on the CPU. ``streamed`` (for snapshots and export): the
        keys, most of a memory, are not copied now but read later in chunks as they are at this commit
        (KeysAtCommit), while writes go on."""
        with self._locked():
            recent = torch.tensor(list(self.recent.items()), dtype=torch.int64).reshape(-1, 2)
            state = MemoryState(
                config=self.config,
                commit_sequence=self.commit_sequence,
                keys=None,
                values=self.values.to("cpu", copy=True),
                ages=self.ages,
                generations=self.generations.to("cpu", copy=True),
                recent_labels=recent[:, 0].clone(),
                recent_slots=recent[:, 1].clone(),
                counters=dict(self.counters),
                writers=self.writers.clone(),
                writer_names=list(self.writer_names),
                writer_counters=[tuple(c) for c in self.writer_counters],
                index_state=self.index.state(),
                incarnation=self.incarnation,
            )
            if streamed:
                copies = [state.values, state.ages, state.generations, state.recent_labels, state.recent_slots]
                copies += [state.writers, *state.index_state.values()]
                state.keys = KeysAtCommit(self, sum(a.numel() * a.element_size() for a in copies))
                self._streamed_keys.add(state.keys)
            else:
                state.keys = self.keys.to("cpu", copy=True)
            return state

    def footprint(self) -> dict[str, int]:
        """Bytes this memory holds at most per device, as a server's memory budget counts them: its own, and
        what the snapshots and exports being read and an index being retrained hold now (on the CPU)."""
        footprint = self.config.footprint(self.max_batch)
        if self.held_bytes:
            footprint["cpu"] = footprint.get("cpu", 0) + self.held_bytes
        return footprint

    def _count_held(self, change: int) -> None:
        with self._held_bytes_lock:
            self.held_bytes += change

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {
                "filled_slots": self.config.memory_size - self.empty_slots,
                "commit_sequence": self.commit_sequence,
                "recent_labels": len(self.recent),
                **self.counters,
            }

    @_out_of_memory_is_resource_exhausted
    def inspect(self, age_bins: int = 10, top_labels: int = 10) -> MemoryReport:
        """Fill, age histogram, label counts and key-norm sanity of the filled slots, and the counters."""
        _check_count(age_bins, "age_bins", 1, MAX_AGE_BINS)
        _check_count(top_labels, "top_labels", 0, MAX_TOP_LABELS)
        with self._locked():  # copies of the per-slot vectors; the statistics are computed after releasing it
            values = self.values.clone()
            ages = self.ages
            # A norm is inf or nan exactly when a component is (or squares past float32), so one pass
            # over the keys serves both the norm range and the non-finite count.
            norms = torch.linalg.vector_norm(self.keys, dim=1)
            sequence, counters = self.commit_sequence, dict(self.counters)
            writers, writer_names = self.writers.clone(), list(self.writer_names)
            writer_counters = [tuple(c) for c in self.writer_counters]
        filled = values != EMPTY
        writer_slots = torch.bincount(writers[filled.cpu()].long(), minlength=len(writer_names)).tolist()
        writer_reports = sorted(
            (
                WriterReport(name, slots, writes, merges)
                for name, slots, (writes, merges) in zip(writer_names, writer_slots, writer_counters, strict=True)
                if slots or writes or merges
            ),
            key=lambda w: (-w.slots, w.name),
        )
        values, ages, norms = values[filled].cpu(), ages[filled.cpu()], norms[filled].cpu()

        width = max(1, math.ceil((float(ages.max()) + 1 if len(ages) else 1) / age_bins))
        age_counts = torch.bincount(torch.div(ages, width, rounding_mode="floor").long(), minlength=age_bins)
        labels, label_counts = torch.unique(values, return_counts=True)  # ascending labels
        most = torch.argsort(label_counts, descending=True, stable=True)[:top_labels]
        finite = torch.isfinite(norms)
        finite_norms = norms[finite]
        return MemoryReport(
            commit_sequence=sequence,
            memory_size=self.config.memory_size,
            filled_slots=len(values),
            queries=counters["queries"],
            writes=counters["writes"],
            merges=counters["merges"],
            age_bin_edges=[width * i for i in range(age_bins + 1)],
            age_counts=age_counts.tolist(),
            distinct_labels=len(labels),
            top_labels=labels[most].tolist(),
            top_label_counts=label_counts[most].tolist(),
            key_norm_min=float(finite_norms.min()) if len(finite_norms) else 0.0,
            key_norm_max=float(finite_norms.max()) if len(finite_norms) else 0.0,
            keys_off_unit=int(((finite_norms - 1).abs() > UNIT_NORM_TOLERANCE).sum()),
            keys_non_finite=int((~finite).sum()),
            writers=writer_reports,
        )

    @_out_of_memory_is_resource_exhausted
    def find_label(self, label: int) -> LabelSlots:
        """The slots holding ``label``, with their ages, and the label's recent slot."""
        if not isinstance(label, numbers.Integral) or isinstance(label, bool) or not 0 <= label < 2**63:
            raise InvalidArgument("label", f"must be an integer in [0, 2^63), got {label!r}")
        with self._locked():
            slots = torch.nonzero(self.values == label).flatten()
            return LabelSlots(
                self.commit_sequence,
                slots.cpu(),
                self._ages_of(self._touched[slots.cpu().numpy()]),
                self.recent.get(int(label), NO_SLOT),
            )

    # ------------------------------------------------------------- validation

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """The memory's lock, for a call on a live memory. A deleted memory answers NotFound; one whose log
        failed answers nothing (FailedPrecondition) until a restart recovers it from disk, so no caller sees
        a write that the log may not hold."""
        with self._lock:
            if self._retired:
                raise NotFound("the memory was deleted")
            if self._broken is not None:
                raise FailedPrecondition(f"{self._broken}; it answers no calls: delete it")
            if self.journal is not None and self.journal.failure is not None:
                raise FailedPrecondition(
                    f"this memory's write-ahead log failed ({self.journal.failure}); it answers no calls until the "
                    "server restarts and recovers it from disk"
                )
            yield

    def _check_query_bytes(self, batch: int, k: int, fields: frozenset[str]) -> None:
        if self.max_query_bytes is None:
            return
        needed = query_working_bytes(self.config.key_dim, batch, k, fields)
        if needed > self.max_query_bytes:
            keys = " with neighbor_keys" if "neighbor_keys" in fields else ""
            raise ResourceExhausted(
                f"k: a query of {batch} rows with k = {k}{keys} needs about {needed / MIB:.1f} MiB of working "
                f"memory; this server allows {self.max_query_bytes / MIB:.1f} MiB per query: send fewer rows, a "
                "smaller k or fewer fields"
            )

    def _wait_durable(self, sequence: int) -> None:
        if self.journal is not None:
            self.journal.wait(sequence)

    def _check_queries(self, queries) -> torch.Tensor:
        q = torch.as_tensor(queries)
        if q.dtype != torch.float32:
            raise InvalidArgument("queries", f"must be float32, got {q.dtype}")
        if q.dim() != 2 or q.shape[1] != self.config.key_dim:
            raise InvalidArgument("queries", f"must have shape [B, {self.config.key_dim}], got {list(q.shape)}")
        if q.shape[0] == 0:
            raise InvalidArgument("queries", "the batch is empty")
        # Checked where the caller's rows are (the CPU, from the wire): no GPU round trip per check. One pass
        # in the common case: a row that is not finite has no norm within the tolerance either.
        norm_error = torch.linalg.vector_norm(q, dim=1).sub_(1).abs_()
        if not bool((norm_error <= UNIT_NORM_TOLERANCE).all()):
            finite = torch.isfinite(q).all(dim=1)
            if not bool(finite.all()):
                raise InvalidArgument("queries", f"row {int((~finite).nonzero()[0])} is not finite")
            row = int((norm_error > UNIT_NORM_TOLERANCE).nonzero()[0])
            raise InvalidArgument(
                "queries",
                f"row {row} has norm {float(q[row].norm()):.6g}; rows must be unit length "
                f"(within {UNIT_NORM_TOLERANCE})",
            )
        return _to_device(q, self.device).contiguous()

    def _check_labels(self, labels, batch: int, *, required: bool) -> torch.Tensor | None:
        """The labels on the CPU (the recent-slot table is a Python dict), or None."""
        if labels is None:
            if required:
                raise InvalidArgument("labels", "required to update the memory")
            return None
        y = torch.as_tensor(labels)
        if y.dtype != torch.int64:
            raise InvalidArgument("labels", f"must be int64, got {y.dtype}")
        if y.shape != (batch,):
            raise InvalidArgument("labels", f"must have shape [{batch}] to match queries, got {list(y.shape)}")
        y = y.cpu()
        if bool((y < 0).any()):
            raise InvalidArgument("labels", "must be non-negative")
        return y

    def _check_k(self, k: int | None, field: str = "k") -> int:
        if k is None or (isinstance(k, numbers.Integral) and k == 0):
            return self.config.choose_k
        if isinstance(k, bool) or not isinstance(k, numbers.Integral):
            raise InvalidArgument(field, f"must be an integer, got {k!r}")
        if not self.config.correct_in_top <= k <= self.config.memory_size:
            raise InvalidArgument(
                field, f"must be in [correct_in_top={self.config.correct_in_top}, {self.config.memory_size}], got {k}"
            )
        return int(k)

    @staticmethod
    def _check_fields(fields, *, labelled: bool) -> frozenset[str]:
        fields = frozenset(fields)
        unknown = fields - set(FIELDS)
        if unknown:
            raise InvalidArgument("fields", f"unknown {sorted(unknown)}; known: {sorted(FIELDS)}")
        if not labelled:
            fields -= {"positive_negative", "positive_negative_keys"}
        return fields

    def _check_update_batch(self, batch: int) -> None:
        if batch > self.config.memory_size:
            raise InvalidArgument(
                "queries", f"an update of {batch} rows needs distinct slots; memory_size is {self.config.memory_size}"
            )

    def _check_ticket(self, ticket: QueryTicket | None, batch: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        if ticket is None:
            raise InvalidArgument("ticket", "required: pass the result of the query being updated")
        width = self.config.correct_in_top + 1
        checked = []
        for name in ("relied_slots", "relied_generations"):
            t = torch.as_tensor(getattr(ticket, name))
            if t.dtype != torch.int64 or t.shape != (batch, width):
                raise InvalidArgument(
                    f"ticket.{name}", f"must be int64 of shape [{batch}, {width}], got {t.dtype} {list(t.shape)}"
                )
            checked.append(_to_device(t, self.device))
        slots = checked[0]
        if bool(((slots < NO_SLOT) | (slots >= self.config.memory_size)).any()):
            raise InvalidArgument("ticket.relied_slots", f"slot ids must be -1 or in [0, {self.config.memory_size})")
        k = self._check_k(ticket.k, "ticket.k")
        return slots, checked[1], k

    # -------------------------------------------------------------- semantics

    def _search(self, q: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k slots in canonical order: similarity descending, ties to the lower slot."""
        similarities, slots = self.index.search(q, k, self.empty_slots)
        values = self.values if self.empty_slots else None
        in_order = _canonical_on_host if similarities.device.type == "cpu" else _canonical
        return in_order(similarities, slots, values, self.config.memory_size)

    def _read(self, q: torch.Tensor, labels: torch.Tensor | None, k: int, use_recent: bool) -> _Read:
        """``labels`` on the CPU."""
        if labels is None:
            slots, similarities = self._search(q, k)
            return _Read(slots, similarities, self.values.take(slots))
        recent = None
        if use_recent:
            recent = torch.tensor([self.recent.get(label, NO_SLOT) for label in labels.tolist()])
        graphed = self._graphed_read(q.shape[0], k, use_recent)
        if graphed is not None:
            return graphed(q, labels, recent)
        return self._read_labelled(
            q, _to_device(labels, self.device), None if recent is None else _to_device(recent, self.device), k
        )

    def _read_labelled(self, q: torch.Tensor, labels: torch.Tensor, recent: torch.Tensor | None, k: int) -> _Read:
        """The read of a labelled batch, every tensor on the memory's device: ``recent`` each label's recent
        slot (NO_SLOT if none), None when the pool has no recent slot."""
        slots, similarities = self._search(q, k)
        pool_slots, pool_similarities = slots, similarities
        if recent is not None:
            recent_similarities = (q * self._padded_keys[recent]).sum(dim=1)
            pool_slots = torch.cat([slots, recent[:, None]], dim=1)
            pool_similarities = torch.cat([similarities, recent_similarities[:, None]], dim=1)
        pool_values = self._padded_values.take(pool_slots)  # NO_SLOT reads EMPTY, which matches no label
        hint = pool_values == labels[:, None]
        # Positive: the best entry holding the label; negative: the best other one, never NO_SLOT.
        sides = torch.stack([hint, ~hint & (pool_slots >= 0)])
        best_slots, best_similarities = _best(pool_slots, pool_similarities, sides)
        incorrect = ~hint[:, : self.config.correct_in_top].any(dim=1)
        return _Read(slots, similarities, pool_values[:, :k], best_slots, best_similarities, incorrect)

    def _graphed_read(self, batch: int, k: int, use_recent: bool) -> _GraphedRead | None:
        """The labelled read of this shape as a CUDA graph, for a full GPU memory whose shards are all on its
        device; None otherwise (a memory with empty slots orders them with a lookup of data-dependent size)."""
        if self._graphs is None or self.empty_slots:
            return None
        try:
            return self._graphs.get(
                (batch, k, use_recent, id(self.index)), lambda: _GraphedRead(self, batch, k, use_recent)
            )
        except RuntimeError as exc:  # a step that cannot be captured: this memory reads eagerly from now on
            log.warning("memory on %s: reads without CUDA graphs (%s)", self.device, exc)
            self._graphs = None
            return None

    def _result(
        self, q: torch.Tensor, read: _Read, fields: frozenset[str], k: int, use_recent: bool, ticket: bool
    ) -> QueryResult:
        batch = q.shape[0]
        result = QueryResult(
            commit_sequence=self.commit_sequence,
            predictions=read.values[:, 0].clone(),
            written_slots=torch.full((batch,), NO_SLOT, dtype=torch.int64, device=self.device),
            incorrect=read.incorrect,
        )
        if ticket and read.incorrect is not None:  # a fused update's result has nothing left to update
            relied = torch.cat([read.slots[:, : self.config.correct_in_top], read.positive_slots[:, None]], dim=1)
            result.ticket = QueryTicket(relied, self._padded_generations[relied], k, use_recent, self.incarnation)
        if "neighbors" in fields:
            result.neighbor_slots = read.slots
            result.neighbor_similarities = read.similarities
            result.neighbor_values = read.values
        if "neighbor_keys" in fields:
            result.neighbor_keys = self.keys[read.slots]
        if "positive_negative" in fields:
            result.positive_slots, result.negative_slots = read.best_slots
            result.positive_similarities, result.negative_similarities = read.best_similarities
        if "positive_negative_keys" in fields:
            result.positive_keys, result.negative_keys = self._padded_keys[read.best_slots]  # zeros for NO_SLOT
        return result

    def _oldest(self, count: int, excluded: np.ndarray) -> np.ndarray:
        """The ``count`` slots of largest age + noise, in decreasing order, ties to the lower slot, leaving out
        ``excluded`` (the slots this batch's merging rows merge into)."""
        candidates = self._oldest_candidates(count, excluded)
        if candidates is None:  # score every slot, as the rule reads
            ids, score = self._slot_ids, self._host_ages(self._touched)
            score[excluded] = -math.inf
        else:
            ids, score = candidates, self._host_ages(self._touched[candidates])
        if self.config.age_noise:
            score += age_noise(self.config.seed, self.commit_sequence + 1, ids, self.config.age_noise)
        return _descending_then_lower_slot(score, ids, count, self.config.memory_size)

    def _oldest_candidates(self, count: int, excluded: np.ndarray) -> np.ndarray | None:
        """The slots outside ``excluded`` that can be among the ``count`` chosen, or None where every slot is
        to be scored. With noise in [-a, a), a slot more than 2a (and float32's rounding) younger than the
        count-th oldest cannot outscore any of the count oldest, so the walk from the oldest stops there.
        None: fewer than ``count`` slots lie outside ``excluded``, or the band holds much of the memory (a
        fresh or cleared memory's slots share one age), where one pass over every slot costs less."""
        self._merge_targets[excluded] = True
        try:
            return self._walk_oldest(count, len(excluded) > 0)
        finally:
            self._merge_targets[excluded] = False

    def _walk_oldest(self, count: int, excluding: bool) -> np.ndarray | None:
        """_oldest_candidates with the excluded slots marked in ``_merge_targets``."""
        half_width = self.config.age_noise
        most = self.config.memory_size // 8  # more candidates than this: one pass over every slot is cheaper
        candidates, found, bound = [], 0, None
        for slots, stamps in self._age_order.oldest_first(self._touched):  # ages never increase along the walk
            if excluding:
                kept = ~self._merge_targets[slots]
                slots, stamps = slots[kept], stamps[kept]
            ages = np.minimum(self.commit_sequence - stamps, MAX_AGE)
            if bound is None and found + len(slots) >= count:
                kth = int(ages[count - 1 - found])  # the age of the count-th oldest slot
                # Rounding: age + noise is a float32, off by at most half a unit in its last place.
                bound = kth - 2 * half_width - 4 * float(np.spacing(np.float32(kth + half_width))) - 1
                if self._age_order.live_stamped_by_at_least(math.floor(self.commit_sequence - bound)) > most:
                    return None
            inside = slots if bound is None else slots[ages >= bound]
            candidates.append(inside)
            found += len(inside)
            if len(inside) < len(slots):  # the walk passed the bound: every slot left is younger
                break
            if bound is not None and found > most:
                return None
        return None if bound is None else np.concatenate(candidates)

    def _apply(
        self, q: torch.Tensor, y: torch.Tensor, incorrect: torch.Tensor, positive_slots: torch.Tensor, writer: str
    ):
        """The memory update for one batch (``y`` on the CPU); returns the slot each row wrote or merged
        into. Everything is computed before the memory changes, with one copy to the host, and the journal
        records the write before it is applied: a write the journal refuses leaves no trace."""
        if writer not in self._writer_ids and len(self.writer_names) >= MAX_WRITERS:
            raise ResourceExhausted(
                f"writer: this memory already keeps {MAX_WRITERS} writer tags; a new one, {writer!r}, would "
                "exceed that: reuse a tag"
            )
        host_incorrect, host_positive = torch.stack([incorrect.long(), positive_slots]).cpu().numpy()
        host_incorrect = host_incorrect.astype(bool)
        oldest = self._oldest(q.shape[0], np.unique(host_positive[~host_incorrect & (host_positive >= 0)]))
        host_slots = np.where(host_incorrect, oldest, host_positive)
        slots = torch.from_numpy(host_slots)
        device_slots = _to_device(slots, self.device)
        merged_keys = _l2_normalize_(self._padded_keys[device_slots].add_(q))  # used only where a row merges
        new_keys = torch.where(incorrect[:, None], q, merged_keys)
        # Rows apply in batch order: where two rows touch one slot, the later wins.
        order = np.argsort(host_slots, kind="stable")
        sorted_slots = host_slots[order]
        last = np.append(sorted_slots[1:] != sorted_slots[:-1], True)
        rows = torch.from_numpy(order[last])
        delta = Delta(
            torch.from_numpy(sorted_slots[last]),
            new_keys[_to_device(rows, self.device)],
            y[rows],
            y,
            slots,
            int(host_incorrect.sum()),
            writer,
        )
        self._journaled(delta, self._prepare_commit(delta))
        return device_slots

    def _journaled(self, record: Delta | Retrain | None, apply: Callable[[], None]) -> None:
        """Log a write, then ``apply`` it. Whatever could fail for want of memory was done before it was
        logged (_prepare_commit, _prepare_clear); should applying fail all the same, the log holds a write the
        memory lacks, so the log is failed: the memory answers nothing until a restart recovers what the log
        holds, and the caller is told that the write may yet count. Without a log nothing can recover it: the
        memory, holding part of the write, answers nothing more."""
        if self.journal is None:
            try:
                apply()
            except Exception as exc:
                self._broken = f"a write failed midway ({exc}) and this memory has no log to recover from"
                raise FailedPrecondition(f"{self._broken}; it answers no calls: delete it") from None
            return
        self.journal.append(self.commit_sequence + 1, record)
        try:
            apply()
        except Exception as exc:
            self.journal.fail(exc)
            raise Unavailable(
                f"this write is in the write-ahead log but could not be applied ({exc}); the memory answers no "
                "calls until the server restarts and recovers it from the log, with this write"
            ) from None

    def _prepare_commit(self, delta: Delta) -> Callable[[], None]:
        """What a write needs that can fail (its arrays on the device, the streamed readers' copies of the
        slots it overwrites), done now without changing the memory; returns what commits it: the only place
        slots change, live or replayed."""
        targets = _to_device(delta.targets, self.device)
        keys, values = _to_device(delta.keys, self.device), _to_device(delta.values, self.device)
        recent = list(zip(delta.labels.tolist(), delta.slots.tolist(), strict=True))
        host_targets = delta.targets.numpy()
        if self._streamed_keys:  # cheaper to ask than to iterate a WeakSet
            for reader in list(self._streamed_keys):
                reader.before_write(host_targets)  # a copy of what is there now: still true if nothing follows
        return functools.partial(self._commit, delta, targets, keys, values, recent, host_targets)

    def _commit(self, delta: Delta, targets, keys, values, recent, host_targets: np.ndarray) -> None:
        self.empty_slots -= int((~self._filled[host_targets]).sum())
        self._filled[host_targets] = True
        self.keys.index_copy_(0, targets, keys)
        self.values.index_copy_(0, targets, values)
        self.commit_sequence += 1
        self._touched[host_targets] = self.commit_sequence
        self._age_order.record(host_targets, self.commit_sequence, self._touched)
        self.generations.index_fill_(0, targets, self.commit_sequence)
        for label, slot in recent:
            self.recent[label] = slot
            self.recent.move_to_end(label)
        while len(self.recent) > self.config.memory_size:  # forget the least recently written labels
            self.recent.popitem(last=False)
        self.index.update(delta.targets, keys)
        self.counters["writes"] += delta.writes
        merges = delta.labels.shape[0] - delta.writes
        self.counters["merges"] += merges
        writer = self._writer_ids.get(delta.writer)
        if writer is None:
            writer = self._writer_ids[delta.writer] = len(self.writer_names)
            self.writer_names.append(delta.writer)
            self.writer_counters.append([0, 0])
        self.writers.index_fill_(0, delta.targets, writer)
        self.writer_counters[writer][0] += delta.writes
        self.writer_counters[writer][1] += merges

    def _retrain(self, record: Retrain, index) -> None:
        """Search with ``index`` (built with ``record``'s quantizer over the current keys) from this commit on."""
        self.index = index
        self.commit_sequence += 1

    def _prepare_clear(self) -> Callable[[], None]:
        """The streamed readers' copies of what a clear overwrites (can fail); returns what clears."""
        for reader in list(self._streamed_keys):
            reader.before_write(None)
        return self._clear

    def _clear(self) -> None:
        self.keys.zero_()
        self.values.fill_(EMPTY)
        self.writers.zero_()
        self.recent.clear()
        self.empty_slots = self.config.memory_size
        self._filled[:] = False
        self.commit_sequence += 1
        self._touched[:] = self.commit_sequence
        self._age_order = AgeOrder(self._touched)
        self.generations.fill_(self.commit_sequence)
        self.index.update(torch.arange(self.config.memory_size), self.keys)

    def _index_state(self, state: MemoryState | None) -> dict[str, torch.Tensor]:
        """The captured index state if the index it came from searched the way this one will (an import may
        change the backend or the shards: the new index then trains anew)."""
        same = ("key_dim", "backend", "shards", "ivf_lists", "ivf_codes")
        if state is None or any(getattr(state.config, f) != getattr(self.config, f) for f in same):
            return {}
        return state.index_state

    def _load(self, state: MemoryState, keys_adopted: bool) -> None:
        """Take a captured state, already checked against the config (persistence.read_snapshot), before the
        index is built over the keys."""
        if not keys_adopted:
            if state.keys is None:
                raise ValueError("this state's keys were handed to another memory (MemoryState.take_padded_keys)")
            self.keys.copy_(state.keys)
        for name in ("values", "generations"):
            getattr(self, name).copy_(getattr(state, name))
        bound = self.config.memory_size  # an older snapshot may hold more: keep the most recently written
        recent = zip(state.recent_labels[-bound:].tolist(), state.recent_slots[-bound:].tolist(), strict=True)
        self.recent = OrderedDict(recent)
        self.commit_sequence = state.commit_sequence
        if state.incarnation is not None:
            self.incarnation = state.incarnation
        # Ages saturate at MAX_AGE, so a stamp this far back stands for every earlier one.
        self._touched = state.commit_sequence - state.ages.numpy().astype(np.int64)
        self._filled = (state.values != EMPTY).numpy()
        self.empty_slots = int((~self._filled).sum())
        self.counters = {**self.counters, **state.counters}
        self.writers.copy_(state.writers)
        self.writer_names = list(state.writer_names)
        self._writer_ids = {name: i for i, name in enumerate(self.writer_names)}
        self.writer_counters = [list(c) for c in state.writer_counters]


# splitmix64 (Steele, Lea and Flood 2014): its increment and its finaliser's multipliers.
GOLDEN_GAMMA = 0x9E3779B97F4A7C15
MIX_1, MIX_2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB
NOISE_BITS = 24  # a float32 holds 24-bit integers exactly
MAX_AGE = 2**24  # where a float32 age, counted up by 1 per commit, stops growing


def _mix64_high_bits(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on a uint64 array, in place (products wrap), correct in bits 33-63: its last
    step, z ^= z >> 31, changes only bits 0-32, so it is left out."""
    for bits, multiplier in ((30, MIX_1), (27, MIX_2)):
        z ^= z >> np.uint64(bits)
        z *= np.uint64(multiplier)
    return z


def _mix64_int(z: int) -> int:
    mask = (1 << 64) - 1
    z = ((z ^ (z >> 30)) * MIX_1) & mask
    z = ((z ^ (z >> 27)) * MIX_2) & mask
    return z ^ (z >> 31)


def age_noise(seed: int, commit: int, slots: np.ndarray, half_width: float) -> np.ndarray:
    """The age noise of write ``commit`` for ``slots`` (int64), float32 in [-half_width, half_width].

    A pure function of these, computed on the host whatever the memory's device (the write choice is host
    bookkeeping), for any shard count and whatever else the memory did:
        stream = mix64(seed + commit * G)                    (Python integers, mod 2^64)
        h      = mix64(stream + (slot + 1) * G)              (mod 2^64; G = 0x9E3779B97F4A7C15)
        noise  = float32(h >> 40) * float32(2 a / 2^24) - float32(a)      (float32 arithmetic)
    with mix64 splitmix64's finaliser. tests/reference_memory.py evaluates it independently in numpy.
    """
    stream = _mix64_int((seed + commit * GOLDEN_GAMMA) & ((1 << 64) - 1))
    h = slots.view(np.uint64) * np.uint64(GOLDEN_GAMMA)
    h += np.uint64((GOLDEN_GAMMA + stream) & ((1 << 64) - 1))  # (slot + 1) * G + stream
    _mix64_high_bits(h)
    h >>= np.uint64(64 - NOISE_BITS)
    noise = h.astype(np.float32)
    noise *= np.float32(2 * half_width / 2**NOISE_BITS)
    noise -= np.float32(half_width)
    return noise


def _descending_then_lower_slot(score: np.ndarray, indices: np.ndarray, count: int, size: int) -> np.ndarray:
    """The ``count`` of ``indices`` (int64, distinct, in [0, size), size <= 2^31) of largest float32 ``score``
    (never NaN), in decreasing order, ties to the lower index: one partition of an int64 key with no two alike,
    as descending_then_lower_index_key builds it: the float's bits made monotone, then size - 1 - index."""
    bits = (score + np.float32(0.0)).view(np.int32)  # +0.0 stands in for -0.0
    bits ^= (bits >> 31) & np.int32(0x7FFFFFFF)
    key = bits.astype(np.int64)
    key <<= 32
    key -= indices
    key += size - 1
    key.partition(len(key) - count)
    top = np.sort(key[len(key) - count :])[::-1]
    return (size - 1) - (top & LOW_HALF)


def check_writer(writer) -> None:
    if not isinstance(writer, str) or not WRITER_PATTERN.fullmatch(writer):
        raise InvalidArgument(
            "writer", f"must be at most 128 characters of letters, digits and _ . : @ / + -, got {writer!r}"
        )


def _check_count(value, field: str, low: int, high: int) -> None:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or not low <= value <= high:
        raise InvalidArgument(field, f"must be an integer in [{low}, {high}], got {value!r}")


def _canonical(
    similarities: torch.Tensor, slots: torch.Tensor, values: torch.Tensor | None, size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """An index's top k per row ([B, k], any order) as (slots, similarities) in canonical order: similarity
    descending, ties to the lower slot, NaN first. Empty slots all score exactly 0 and an index may return any of
    them, so those it returns become the lowest-numbered empty slots. ``values`` is None when no slot is empty.
    For a GPU memory: one sort of keys with none alike, rather than a float sort and a host check for ties, so
    that nothing here waits for the device."""
    if values is not None:
        zero_empty = (similarities == 0) & (values[slots] == EMPTY)
        lowest_empty = torch.nonzero(values == EMPTY).flatten()[: slots.shape[1]]  # waits: its length
        rank = (zero_empty.cumsum(dim=1) - 1).clamp(min=0)
        slots = torch.where(zero_empty, lowest_empty[rank], slots)
    key = descending_then_lower_index_key(similarities, slots, size, nan_first=True)
    order = torch.sort(key, dim=1, descending=True).indices
    return slots.gather(1, order), similarities.gather(1, order)


def _canonical_on_host(
    similarities: torch.Tensor, slots: torch.Tensor, values: torch.Tensor | None, size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """_canonical on CPU tensors, with the same result bit for bit: the sorts and the empty slots' lookups by
    numpy, the gathers by torch. A memory cleared every episode has a tie of empty slots in every row, which
    torch's per-operation cost made 0.44 ms of a step's [16, 256] rows (0.17 ms here; one thread)."""
    tied = False
    if values is not None:
        zero_empty = similarities.numpy() == 0
        if zero_empty.any():
            host_values, found = values.numpy(), slots.numpy()
            zero_empty &= host_values[found] == EMPTY
            lowest_empty = np.flatnonzero(host_values == EMPTY)[: found.shape[1]]
            rank = zero_empty.cumsum(axis=1)
            rank -= 1
            np.maximum(rank, 0, out=rank)
            slots = torch.from_numpy(np.where(zero_empty, lowest_empty[rank], found))
            tied = bool(rank.any())  # a row with two empty slots: a tie, ordered by slot below
    if not tied:  # one float sort; numpy's argsort takes half the time of torch.sort on these rows
        order = torch.from_numpy(np.argsort(similarities.numpy(), axis=1)[:, ::-1].copy())
        similarities, slots = similarities.gather(1, order), slots.gather(1, order)
        if bool((similarities[:, 1:] < similarities[:, :-1]).all()):
            return slots, similarities
    # Ties, a NaN, or -0.0 beside +0.0: descending_then_lower_index_key(nan_first=True) in numpy, whose
    # ascending sort of -key (no two alike) is the descending order; after the float sort it has little to move.
    scores = similarities.numpy()
    bits = (scores + np.float32(0.0)).view(np.int32)  # +0.0 stands in for -0.0
    bits ^= (bits >> 31) & np.int32(0x7FFFFFFF)
    bits[np.isnan(scores)] = MONOTONE_NAN
    key = bits.astype(np.int64)
    key <<= 32
    key -= slots.numpy()
    np.negative(key, out=key)
    order = torch.from_numpy(np.argsort(key, axis=1))
    return slots.gather(1, order), similarities.gather(1, order)


def _best(slots: torch.Tensor, similarities: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each of the masks [S, B, P] over a pool's [B, P] slots, per row the masked entry of highest
    similarity, the first of equals: (slot or -1, similarity or 0), each [S, B]."""
    best_similarity, best = torch.where(masks, similarities, -math.inf).max(dim=2, keepdim=True)
    found = masks.any(dim=2)
    slot = torch.where(found, slots.expand_as(masks).gather(2, best).squeeze(2), NO_SLOT)
    similarity = torch.where(found, best_similarity.squeeze(2), 0.0)
    return slot, similarity


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` on ``device``. A copy to a GPU from pageable host memory is staged at once, so it need not wait
    for the device (non_blocking; torch would otherwise synchronise after each, 7 of a fused call's 9 host
    synchronisations on an H200): the caller may change ``t`` right after. From pinned memory, which a
    non-blocking copy reads later, it waits, so that a caller reusing its pinned buffer cannot race the copy."""
    if t.device == device:
        return t
    return t.to(device, non_blocking=t.device.type == "cpu" and not t.is_pinned())


def _l2_normalize_(x: torch.Tensor) -> torch.Tensor:
    """TensorFlow's l2_normalize, in place: x * rsqrt(max(sum(x^2), 1e-12))."""
    return x.mul_((x * x).sum(dim=-1, keepdim=True).clamp_(min=1e-12).rsqrt_())
