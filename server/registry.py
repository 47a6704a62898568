"""Named memories: what the server owns, and what the embedded store owns in-process.

With a data directory the registry is durable: memories come back after a
restart (see server/persistence.py) and are snapshotted in the background.
Every memory's footprint counts against a memory budget, so a memory larger
than the machine can hold is refused (RESOURCE_EXHAUSTED) instead of being
killed by the kernel later.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from lifelong_memory.server.devices import BUDGET_SHARE, is_out_of_memory, memory_available
from lifelong_memory.server.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
)
from lifelong_memory.server.memory import Memory, MemoryConfig, MemoryState
from lifelong_memory.server.persistence import DataDirectory, Durability

if TYPE_CHECKING:
    from lifelong_memory.server.cluster import RayCluster

log = logging.getLogger("lifelong_memory.server.registry")
# A name is a folder name in the data directory: no "." or "..", no hidden files.
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
CONFIG_FIELDS = frozenset(f.name for f in dataclasses.fields(MemoryConfig))
# What an import may change: where and how the memory is searched, never what it holds.
IMPORT_OVERRIDES = frozenset(
    {"device", "devices", "backend", "search_dtype", "shards", "placement"}
    | {"lsh_tables", "lsh_bits", "lsh_probes", "ivf_lists", "ivf_probes", "ivf_codes", "ivf_quantizer"}
)
GIB = 1 << 30


class MemoryRegistry:
    """Creates, finds, lists and deletes memories by name.

    ``defaults`` override MemoryConfig's defaults for fields a create request
    leaves unset (how ``lmem serve --backend faiss --shards 4`` applies).
    ``memory_budget_bytes`` (default: 90% of the memory available at start)
    bounds the sum of the memories' footprints on the CPU for batches of
    ``max_batch`` rows; each CUDA device has its own budget, 90% of what it has
    free when the first memory is placed on it.
    ``max_query_bytes`` (default: an eighth of the CPU budget, at most 1 GiB) bounds the working memory
    of one query, checked before any work.
    ``cluster`` (server/cluster.py, ``lmem serve --cluster``) places the shards of memories whose placement is
    not "local" on a Ray cluster; without it such a memory is refused.
    """

    def __init__(
        self,
        defaults: dict | None = None,
        max_memories: int = 64,
        *,
        data_dir: Path | str | None = None,
        durability: Durability | None = None,
        memory_budget_bytes: int | None = None,
        max_batch: int = 4096,
        max_query_bytes: int | None = None,
        cluster: RayCluster | None = None,
    ):
        defaults = dict(defaults or {})
        unknown = set(defaults) - CONFIG_FIELDS
        if unknown:
            raise ValueError(f"unknown memory config fields: {sorted(unknown)}")
        self.defaults = defaults
        self.max_memories = max_memories
        self.max_batch = max_batch
        self.memory_budget_bytes = memory_budget_bytes or int(BUDGET_SHARE * available_memory_bytes())
        self.max_query_bytes = max_query_bytes or min(GIB, self.memory_budget_bytes // 8)
        self._device_budgets = {"cpu": self.memory_budget_bytes}
        self._memories: dict[str, Memory] = {}
        self._unrecovered: dict[str, str] = {}
        self._deleting: set[str] = set()
        self._creating: dict[str, MemoryConfig] = {}  # names being built: taken, and their room counted
        self._lock = threading.Lock()
        self.storage = DataDirectory(data_dir, durability or Durability()) if data_dir is not None else None
        self._stopping = threading.Event()
        self._snapshotter = None
        self.cluster = cluster
        if self.storage is not None:
            for recovered in self.storage.recover(self.defaults.get("device"), max_batch, self.index_builder):
                if recovered.memory is not None:
                    recovered.memory.max_query_bytes = self.max_query_bytes
                    self._memories[recovered.name] = recovered.memory
                else:
                    self._unrecovered[recovered.name] = recovered.error
            self._snapshotter = threading.Thread(target=self._snapshot_periodically, daemon=True, name="snapshots")
            self._snapshotter.start()

    def create(self, name: str, **config) -> Memory:
        check_name(name)
        unknown = set(config) - CONFIG_FIELDS
        if unknown:
            raise InvalidArgument("config", f"unknown fields {sorted(unknown)}")
        full = MemoryConfig(**{**self.defaults, **config}).validated()
        return self._add(name, full, None)

    def import_state(self, name: str, state: MemoryState, **overrides) -> Memory:
        """A new memory holding ``state`` (an export or snapshot), optionally searched differently."""
        state.incarnation = None  # a new history from here: the exported memory may go on writing its own
        return self._add(name, self.import_config(name, state.config, overrides), state)

    def import_config(self, name: str, config: MemoryConfig, overrides: dict) -> MemoryConfig:
        """The config an import of a memory of ``config`` with ``overrides`` gets, once its name, the overrides
        and the room it needs are checked: called with a file's header, before its arrays are read."""
        check_name(name)
        unknown = set(overrides) - IMPORT_OVERRIDES
        if unknown:
            raise InvalidArgument("config", f"an import may only set {sorted(IMPORT_OVERRIDES)}, not {sorted(unknown)}")
        imported = dataclasses.replace(config, **overrides).validated()
        imported.check_usable()
        with self._lock:
            self._check_room(name, imported)
        return imported

    def _add(self, name: str, config: MemoryConfig, state: MemoryState | None) -> Memory:
        try:
            return self._place(name, config, state)
        except (RuntimeError, MemoryError) as exc:  # placing it: a device's first use, its budget, the memory
            if not is_out_of_memory(exc):
                raise
            raise ResourceExhausted(
                f"config.device: out of memory placing {name!r} on {sorted(set(config.shard_devices()))} "
                f"(no memory was created): {exc}"
            ) from None

    def _place(self, name: str, config: MemoryConfig, state: MemoryState | None) -> Memory:
        config.check_usable()
        with self._lock:
            self._check_room(name, config)
            self._creating[name] = config  # so two creates of one name cannot both succeed
        # Built and written outside the lock: a large import takes seconds, and every call on every memory
        # looks its memory up under this lock.
        try:
            memory = Memory(
                config,
                state,
                max_batch=self.max_batch,
                max_query_bytes=self.max_query_bytes,
                index_builder=self.index_builder(name, config),
            )
            if self.storage is not None:
                self.storage.create(name, memory)
        except BaseException:
            with self._lock:
                del self._creating[name]
            raise
        with self._lock:
            del self._creating[name]
            self._memories[name] = memory
        return memory

    def retrain_index(self, name: str):
        """Retrain memory ``name``'s IVF quantizer, if the second index it builds fits the CPU budget."""
        memory = self.get(name)
        if memory.config.backend == "faiss-ivf" and memory.config.placement == "local":
            with self._lock:
                budget, used = self._budget_and_use("cpu")
                needed = memory.config.retrain_bytes()
                if used + needed > budget:
                    raise ResourceExhausted(
                        f"name: retraining {name!r} builds a second index of {_mib(needed)} beside the live one; "
                        f"{_mib(max(0, budget - used))} of this server's {_mib(budget)} memory budget are left"
                    )
        return memory.retrain_index()

    def _check_room(self, name: str, config: MemoryConfig) -> None:
        """Under the lock: a new memory ``name`` of ``config`` fits beside the others."""
        if name in self._memories or name in self._unrecovered or name in self._creating:
            raise AlreadyExists(f"memory {name!r} already exists")
        if len(self._memories) + len(self._creating) >= self.max_memories:
            raise ResourceExhausted(f"this server holds at most {self.max_memories} memories")
        for device, bytes_needed in sorted(config.footprint(self.max_batch).items()):
            budget, used = self._budget_and_use(device)
            if used + bytes_needed > budget:
                raise ResourceExhausted(
                    f"config.memory_size: {config.memory_size} slots of dimension {config.key_dim} need "
                    f"{_mib(bytes_needed)} on {device}; {_mib(max(0, budget - used))} of this server's "
                    f"{_mib(budget)} memory budget there are left"
                )

    def _budget_and_use(self, device: str) -> tuple[int, int]:
        """Under the lock: ``device``'s budget, and what the memories and those being created count there."""
        used = sum(m.footprint().get(device, 0) for m in self._memories.values())
        used += sum(c.footprint(self.max_batch).get(device, 0) for c in self._creating.values())
        return self._device_budget(device), used

    def index_builder(self, name: str, config: MemoryConfig):
        """How memory ``name`` builds its index: None (in this process) unless its shards go to the cluster."""
        if config.placement == "local":
            return None
        if self.cluster is None:
            raise FailedPrecondition(
                f"config.placement: {config.placement!r} places shards on a cluster, and this server has none "
                "(start it with lmem serve --cluster ADDRESS)"
            )
        return self.cluster.index_builder(name)

    def _device_budget(self, device: str) -> int:
        """The budget of ``device`` (canonical, usable): the CPU's is memory_budget_bytes; a GPU's is set
        when the first memory goes there, while none of this server's memories hold any of it."""
        if device not in self._device_budgets:
            self._device_budgets[device] = int(BUDGET_SHARE * memory_available(device))
        return self._device_budgets[device]

    def get(self, name: str, field: str = "name") -> Memory:
        """The memory called ``name``; ``field`` is the request field that named it, for errors."""
        check_name(name, field)
        with self._lock:
            memory = self._memories.get(name)
            error = self._unrecovered.get(name)
        if error is not None:
            raise FailedPrecondition(
                f"memory {name!r} could not be recovered from the data directory ({error}); delete it or repair "
                "its files and restart"
            )
        if memory is None:
            raise NotFound(f"memory {name!r} not found")
        return memory

    def list(self) -> list[tuple[str, Memory]]:
        with self._lock:
            return sorted(self._memories.items())

    def delete(self, name: str) -> None:
        """Delete a memory: calls in progress on it finish first, later ones answer NOT_FOUND. Either the
        memory and its files are gone, or (an error) it is unchanged."""
        check_name(name)
        with self._lock:
            memory = self._memories.get(name)
            if name in self._deleting or (memory is None and name not in self._unrecovered):
                raise NotFound(f"memory {name!r} not found")
            self._deleting.add(name)
        try:  # outside the registry's lock: the memory's own calls in progress may take a while
            if self.storage is not None:
                self.storage.delete(name, memory)
            elif memory is not None:
                memory.retire(lambda: None)
            try:  # the shards go while the name is still taken: a create of it places shards under the same name
                if self.cluster is not None and memory is not None and memory.config.placement != "local":
                    self.cluster.drop(name)
            finally:
                with self._lock:
                    self._memories.pop(name, None)
                    self._unrecovered.pop(name, None)
        finally:
            with self._lock:
                self._deleting.discard(name)
        if memory is not None and memory.device.type == "cuda":
            del memory
            torch.cuda.empty_cache()  # give the device back what the deleted memory held (nvidia-smi, others)

    def snapshot(self, name: str, field: str = "name") -> tuple[int, Path, int]:
        """Snapshot a memory now: (commit sequence, file, bytes)."""
        memory = self.get(name, field)
        if self.storage is None:
            raise FailedPrecondition("this server keeps no data directory (lmem serve --data-dir) to snapshot into")
        return self.storage.snapshot(name, memory)

    def close(self) -> list[str]:
        """Snapshot every memory and close the logs (a clean shutdown: recovery then replays nothing), then
        leave the cluster, if any (the memories' shards end with this process). Returns the names of the
        memories that could not be snapshotted (their logs are replayed instead)."""
        self._stopping.set()
        if self._snapshotter is not None:
            self._snapshotter.join()
        not_snapshotted = self._snapshot_all() if self.storage is not None else []
        if self.cluster is not None:
            self.cluster.close()
        return not_snapshotted

    def _snapshot_all(self) -> list[str]:
        not_snapshotted = []
        for name, memory in self.list():
            try:
                self.storage.snapshot(name, memory)
                memory.journal.close()
            except Exception as exc:  # its log holds every acknowledged write still: recovery replays it
                log.error("memory %r: no snapshot at shutdown (its log is replayed at the next start): %s", name, exc)
                not_snapshotted.append(name)
        self.storage.close()
        return not_snapshotted

    def _snapshot_periodically(self) -> None:
        period = min(5.0, self.storage.durability.snapshot_interval)
        while not self._stopping.wait(period):
            for name, memory in self.list():
                if self.storage.due_for_snapshot(name, memory):
                    try:
                        sequence, path, size = self.storage.snapshot(name, memory)
                        log.info("memory %r: snapshot at %d, %d bytes", name, sequence, size)
                    except Exception as exc:  # a memory deleted meanwhile, or a full disk: retried next round
                        log.warning("memory %r: snapshot failed: %s", name, exc)


def _mib(size: int) -> str:
    return f"{size / (1 << 20):,.1f} MiB ({size:,} bytes)"


def check_name(name: str, field: str = "name") -> None:
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise InvalidArgument(field, f"must match {NAME_PATTERN.pattern}, got {name!r}")


def available_memory_bytes() -> int:
    """Memory this process can still use: MemAvailable, or less where a cgroup limit says so."""
    available = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            used = int(Path("/sys/fs/cgroup/memory.current").read_text())
            available = min(available or 1 << 62, int(limit) - used)
    except (OSError, ValueError):
        pass
    return available if available is not None else 1 << 62
