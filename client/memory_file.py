"""A memory file built from entries you already have: the bulk load.

A memory fills one write at a time, each choosing the oldest slots by the paper's rule; a new memory's
first writes score every slot (they all share one age), so filling millions of slots through the API
takes hours. ``write_memory_file`` writes the memory those entries make straight into the export format,
streaming the keys block by block, and ``store.import_memory(name, path)`` (or ``lmem import``) serves it.

    from lifelong_memory.client import connect, write_memory_file
    write_memory_file("seed.lmem", key_blocks, labels, memory_size=16_777_216, key_dim=128)
    memory = connect("grpc://localhost:50051").import_memory("seeded", "seed.lmem")

Entry ``i`` goes into slot ``i``, as if the entries had been written in order, ``rows_per_commit`` per
commit: its generation is that commit, its age the commits since, the recent-label table holds each label's
last entry, and the slots past the last entry are empty and the oldest (never written).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch

from lifelong_memory.server.errors import InvalidArgument
from lifelong_memory.server.memory import EMPTY, MAX_AGE, MemoryConfig, MemoryState, check_writer
from lifelong_memory.server.persistence import snapshot_chunks, write_atomically

# How far a key's norm may be from 1: the memory's own queries are normalised to float32 precision.
UNIT_NORM_TOLERANCE = 1e-3


class KeyBlocks:
    """The caller's keys, checked block by block as the file is written, then zero rows up to the memory's
    size: what a snapshot writer reads as a memory's keys (``shape`` and ``chunks``)."""

    def __init__(self, blocks: Iterable, entries: int, memory_size: int, key_dim: int):
        self._blocks, self._entries = blocks, entries
        self.dtype = torch.float32
        self.shape = (memory_size, key_dim)

    def chunks(self, rows: int) -> Iterator[torch.Tensor]:
        size, dim = self.shape
        seen = 0
        for block in self._blocks:
            block = torch.as_tensor(np.asarray(block, dtype=np.float32))
            if block.dim() != 2 or block.shape[1] != dim:
                raise InvalidArgument("keys", f"a block of shape {list(block.shape)}; each must be [rows, {dim}]")
            norms = torch.linalg.vector_norm(block, dim=1)
            bad = (~torch.isfinite(norms)) | ((norms - 1).abs() > UNIT_NORM_TOLERANCE)
            if bool(bad.any()):
                row = int(bad.nonzero()[0])
                norm = float(norms[row])
                raise InvalidArgument("keys", f"row {seen + row} has norm {norm}; keys must be unit vectors")
            if seen + len(block) > self._entries:
                raise InvalidArgument("keys", f"more rows than the {self._entries} values")
            seen += len(block)
            yield block
        if seen != self._entries:
            raise InvalidArgument("keys", f"{seen} rows for {self._entries} values")
        for start in range(seen, size, rows):
            yield torch.zeros(min(rows, size - start), dim)


def write_memory_file(
    path: str | Path,
    keys: Iterable,
    values,
    *,
    rows_per_commit: int = 256,
    writer: str = "",
    **config,
) -> MemoryConfig:
    """Write the memory holding ``values[i]`` under ``keys`` row ``i`` in slot ``i`` to ``path`` (the export
    format), whole or not at all; returns its config.

    ``keys``: an array [n, key_dim] of unit rows, or an iterable of such blocks (read once, in order, so a
    generator streams them from wherever they are). ``values``: n labels >= 0. ``config``: the memory's
    fields (``memory_size`` >= n and ``key_dim`` at least; the others default as in ``create_memory``).
    Bad input raises InvalidArgument naming the argument; the file is then not written."""
    values = torch.as_tensor(np.asarray(values)).reshape(-1)
    if values.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise InvalidArgument("values", f"integer labels, not {values.dtype}")
    values = values.to(torch.int64)
    entries = len(values)
    if entries and int(values.min()) < 0:
        raise InvalidArgument("values", "labels must be >= 0")
    check_writer(writer)
    if not isinstance(rows_per_commit, int) or rows_per_commit < 1:
        raise InvalidArgument("rows_per_commit", f"must be an integer >= 1, got {rows_per_commit!r}")
    cfg = MemoryConfig(**config).validated()
    size = cfg.memory_size
    if entries > size:
        raise InvalidArgument("values", f"{entries} entries do not fit memory_size {size}")
    if isinstance(keys, (np.ndarray, torch.Tensor)):
        keys = [keys]
    state = entries_state(cfg, KeyBlocks(keys, entries, size, cfg.key_dim), values, rows_per_commit, writer)
    write_atomically(Path(path), snapshot_chunks(state))
    return cfg


def entries_state(
    config: MemoryConfig,
    keys,
    values: torch.Tensor,
    rows_per_commit: int = 256,
    writer: str = "",
    padded_keys: torch.Tensor | None = None,
) -> MemoryState:
    """The state of a memory of the validated ``config`` holding entry ``i`` (``keys`` row ``i``, ``values[i]``,
    int64 >= 0) in slot ``i``, as if written in order, ``rows_per_commit`` per commit (what a memory filled by
    training steps of that many rows holds); the slots past the last entry empty. ``keys``: a tensor, or what a
    snapshot writer reads block by block (KeyBlocks); ``padded_keys``: the tensor's [n + 1, D] buffer, for a
    Memory to adopt (MemoryState.padded_keys)."""
    size, entries = config.memory_size, len(values)
    commits = math.ceil(entries / rows_per_commit)
    written_at = torch.zeros(size, dtype=torch.int64)  # never written: stamp 0, the oldest
    written_at[:entries] = torch.arange(entries) // rows_per_commit + 1
    memory_values = torch.full((size,), EMPTY, dtype=torch.int64)
    memory_values[:entries] = values
    # Each label's last entry, least recently written first: the recent-label table after these writes.
    reversed_labels = values.flip(0).numpy()
    labels, first_from_end = np.unique(reversed_labels, return_index=True)
    last = entries - 1 - first_from_end
    order = np.argsort(last, kind="stable")
    writer_names = [""] if not writer else ["", writer]
    return MemoryState(
        config=config,
        commit_sequence=commits,
        keys=keys,
        values=memory_values,
        ages=(commits - written_at).clamp_(max=MAX_AGE).to(torch.float32),
        generations=written_at,
        recent_labels=torch.from_numpy(labels[order].copy()),
        recent_slots=torch.from_numpy(last[order].copy()),
        counters={"queries": 0, "writes": entries, "merges": 0},
        writers=torch.full((size,), len(writer_names) - 1, dtype=torch.int32).masked_fill_(written_at == 0, 0),
        writer_names=writer_names,
        writer_counters=[(0, 0)] * (len(writer_names) - 1) + [(entries, 0)],
        padded_keys=padded_keys,
    )
