"""One memory's shards as Ray actors on a cluster's nodes (``lmem serve --cluster ADDRESS``; docs/scale-out.md).

The front end (the lmem server) keeps the memory itself: keys, values, ages, generations, the recent slots,
its write-ahead log and snapshots, and all of the semantics. What it places on the cluster is the search:
``ClusterIndex`` is an index behind the memory's index seam (server/index.py) whose slot-range shards are
actors (``ShardServer``), each holding its own copy of its range's keys, searching it, and keeping it in a
data directory on its node (``ShardStore``: a snapshot and a log, both stamped with the front end's commit
sequence). Every call carries the commit the front end believes the shard is at, so a shard that restarted
and recovered less than that refuses to answer rather than answer from another point in time; the front end
then catches it up from its own keys (the slots whose generation is newer than the shard's) and asks again.
Until a shard answers, the memory answers UNAVAILABLE, before any write: never a partial or stale answer.

Ray is an optional dependency (``pip install 'lifelong-memory[cluster]'``): this module imports it when a
server is started with a cluster, never otherwise.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import struct
import time
import uuid
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lifelong_memory.server.errors import FailedPrecondition, ResourceExhausted, Unavailable
from lifelong_memory.server.index import SEARCH_DTYPES, TorchFlatIndex, score_rows, shard_bounds

log = logging.getLogger("lifelong_memory.server.cluster")
NAMESPACE = "lifelong-memory"
# A log record: commit sequence, row count, CRC-32 of the rows that follow (slot ids int64, then keys float32).
RECORD = struct.Struct("<qqI")
# A shard writes a fresh snapshot once its log outgrows the snapshot: replaying it then costs at most one copy.
LOG_TO_SNAPSHOT_RATIO = 1.0
NODE_ID_DIGITS = 12  # of a Ray node id (hex), in a shard's folder and in ShardHealth.node
DEFAULT_CALL_TIMEOUT = 30.0  # seconds a front end waits for a shard's answer before the memory is UNAVAILABLE
# Seconds a new shard may take to start (a process that imports torch) and take its keys; one that takes longer
# is caught up before the memory's first search, which answers UNAVAILABLE until it is.
STARTUP_TIMEOUT = 120.0


class StaleShard(Exception):
    """A shard is not at the commit the front end expects (it restarted and recovered less, or missed a write)."""


class ShardStore:
    """A shard's data directory: ``snapshot-<C>.pt`` (its keys at commit C) and ``log-<C>`` (each later write to
    the shard: commit, local slot ids, new keys). Only the newest snapshot and its own log count, so a snapshot
    written and a log not yet removed never mix. Appends are handed to the OS before the shard acknowledges them
    (they survive the shard's process dying); the front end's log, not this one, is what makes a write durable:
    a tail lost with the node is caught up from the front end."""

    def __init__(self, folder: Path, rows: int, dim: int):
        self.folder, self.rows, self.dim = folder, rows, dim
        self.folder.mkdir(parents=True, exist_ok=True)
        self._log = None
        self._log_bytes = 0
        self.sequence = 0  # the newest commit the directory holds

    def recover(self) -> tuple[int, torch.Tensor]:
        """(commit, keys) as the directory holds them: the newest snapshot, then its log up to the first torn
        record (cut off there). An empty directory is commit 0, every key zero (a memory no write reached)."""
        snapshots = sorted(self.folder.glob("snapshot-*.pt"), key=lambda p: int(p.stem.split("-")[1]))
        if snapshots:
            base = int(snapshots[-1].stem.split("-")[1])
            keys = torch.load(snapshots[-1], weights_only=True)
        else:
            base, keys = 0, torch.zeros(self.rows, self.dim, dtype=torch.float32)
        path = self.folder / f"log-{base}"
        sequence = base
        good = 0
        if path.exists():
            data = path.read_bytes()
            while good + RECORD.size <= len(data):
                record_sequence, n, crc = RECORD.unpack_from(data, good)
                body = good + RECORD.size
                end = body + n * (8 + 4 * self.dim)
                if n < 0 or end > len(data) or zlib.crc32(data[body:end]) != crc or record_sequence <= sequence:
                    break
                slots = np.frombuffer(data, np.int64, n, body)
                keys[torch.from_numpy(slots.copy())] = torch.from_numpy(
                    np.frombuffer(data, np.float32, n * self.dim, body + 8 * n).reshape(n, self.dim).copy()
                )
                sequence, good = record_sequence, end
            if good < len(data):
                log.warning("shard log %s: cut at byte %d of %d (a torn or damaged tail)", path, good, len(data))
                with open(path, "r+b") as f:
                    f.truncate(good)
        self._open_log(base, good)  # later writes go on in the snapshot's own log
        self.sequence = sequence
        return sequence, keys

    def append(self, sequence: int, slots: np.ndarray, keys: np.ndarray) -> None:
        """Log the write of commit ``sequence``, which must follow every commit logged (recovery reads the log
        while commits increase)."""
        if sequence <= self.sequence:
            raise ValueError(f"commit {sequence} does not follow commit {self.sequence}")
        body = slots.astype(np.int64).tobytes() + keys.astype(np.float32).tobytes()
        self._log.write(RECORD.pack(sequence, len(slots), zlib.crc32(body)) + body)
        self._log.flush()
        self._log_bytes += RECORD.size + len(body)
        self.sequence = sequence

    def wants_snapshot(self) -> bool:
        return self._log_bytes > LOG_TO_SNAPSHOT_RATIO * self.rows * self.dim * 4

    def snapshot(self, sequence: int, keys: torch.Tensor) -> None:
        """Write the keys at ``sequence`` (fsynced, then renamed into place), start its empty log, and remove
        the older snapshot and logs."""
        tmp = self.folder / f".snapshot-{sequence}.tmp"
        with open(tmp, "wb") as f:
            torch.save(keys.cpu(), f)
            f.flush()
            os.fsync(f.fileno())
        (self.folder / f"log-{sequence}").unlink(missing_ok=True)
        os.replace(tmp, self.folder / f"snapshot-{sequence}.pt")
        directory = os.open(self.folder, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
        self._open_log(sequence, 0)
        self.sequence = sequence
        for old in [*self.folder.glob("snapshot-*.pt"), *self.folder.glob("log-*")]:
            if int(old.name.split("-")[1].split(".")[0]) != sequence:
                old.unlink()

    def _open_log(self, sequence: int, size: int) -> None:
        if self._log is not None:
            self._log.close()
        self._log = open(self.folder / f"log-{sequence}", "ab")
        self._log_bytes = size


class ShardServer:
    """One shard of one memory, run as a Ray actor: slots [start, stop) of the memory, their keys, a torch
    index over them on the actor's device, and their ShardStore. Ray reruns the constructor after a crash
    (max_restarts): the shard then recovers its keys from its data directory."""

    def __init__(self, folder: str, start: int, stop: int, dim: int, search_dtype: str, max_batch: int):
        import ray

        self.start, self.stop = start, stop
        self.device = "cuda" if ray.get_gpu_ids() else "cpu"  # Ray makes the actor's one GPU its cuda:0
        # One folder per node: a shard placed on another node starts there from nothing (the front end rebuilds
        # it), even where nodes share the storage, so a process of it left on a node cut off from the cluster
        # never writes into the log of its successor.
        self.store = ShardStore(
            Path(folder) / ray.get_runtime_context().get_node_id()[:NODE_ID_DIGITS], stop - start, dim
        )
        self.sequence, keys = self.store.recover()
        self.recovered_sequence = self.sequence  # what the data directory gave at this start
        dtype = SEARCH_DTYPES[search_dtype]
        rows = score_rows(stop - start, torch.empty(0, dtype=dtype).element_size(), self.device, max_batch)
        self.index = TorchFlatIndex(keys.to(self.device), start, dtype, rows, owns_keys=True)

    def describe(self) -> dict:
        import ray

        context = ray.get_runtime_context()
        return {
            "node_id": context.get_node_id(),
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "device": self.device,
            "sequence": self.sequence,
            "recovered_sequence": self.recovered_sequence,
            "restarted": context.was_current_actor_reconstructed,
        }

    def search(self, expected: int, queries: np.ndarray, k: int, empty_slots: int) -> tuple[np.ndarray, np.ndarray]:
        self._check(expected)
        similarities, slots = self.index.search(torch.tensor(queries), k, empty_slots)  # Ray's arrays: read-only
        return similarities.cpu().numpy(), slots.cpu().numpy()

    def apply(self, previous: int, sequence: int, slots: np.ndarray, keys: np.ndarray) -> None:
        """Take the keys of ``slots`` (global ids) as of commit ``sequence``, if this shard is at ``previous``:
        a write routed here, or a catch-up. Logged before it is applied."""
        self._check(previous)
        self.store.append(sequence, slots - self.start, keys)
        self.index.update(torch.tensor(slots), torch.tensor(keys))
        self.sequence = sequence
        if self.store.wants_snapshot():
            self.store.snapshot(sequence, self.index.keys)

    def reset(self, sequence: int, keys: np.ndarray) -> None:
        """Become the front end's range at ``sequence`` whatever this shard held (a front end that starts)."""
        local = torch.arange(self.stop - self.start)
        self.index.update(local + self.start, torch.tensor(keys))
        self.store.snapshot(sequence, self.index.keys)
        self.sequence = sequence

    def keys(self) -> np.ndarray:
        """This shard's copy of its keys (what tests compare with the front end's)."""
        return self.index.keys.cpu().numpy()

    def drop(self) -> None:
        """Remove this shard's data directory (its memory was deleted)."""
        shutil.rmtree(self.store.folder, ignore_errors=True)
        for parent in list(self.store.folder.parents)[:3]:  # the shard's, the build's, the memory's
            try:
                parent.rmdir()
            except OSError:  # another shard's folder is still there
                break

    def _check(self, expected: int) -> None:
        if self.sequence != expected:
            raise StaleShard(f"shard at commit {self.sequence}, the front end expects {expected}")


@dataclass
class ShardHealth:
    """Where one shard lives and whether it answers (``lmem ls/describe/stats``)."""

    shard: int
    slot_start: int
    slot_stop: int
    node: str  # the Ray node id (first 12 hex digits) and host name; "" if it did not answer
    pid: int
    state: str  # "serving", "catching up" (answers, but behind the front end) or "unavailable"
    commit_sequence: int  # the commit the shard is at; -1 if it did not answer
    detail: str = ""  # why it is not serving


def shard_health(memory) -> list[ShardHealth]:
    """Where each shard of ``memory`` lives and whether it answers; empty for a memory searched in-process."""
    return memory.index.health() if memory.config.placement != "local" else []


class ClusterIndex:
    """The memory's index, its shards actors on a Ray cluster (see the module's docstring). ``keys`` and
    ``generations`` are the memory's own live tensors; the shards' copies follow them."""

    def __init__(
        self,
        actors: list,
        bounds: list[int],
        keys: torch.Tensor,
        generations: torch.Tensor,
        call_timeout: float,
    ):
        import ray

        self._ray = ray
        self.actors, self.bounds = actors, bounds
        self.keys, self.generations = keys, generations
        self.device = keys.device
        self.call_timeout = call_timeout
        sequence = int(generations.max()) if len(generations) else 0  # every commit stamps the slots it writes
        self.delivered = [sequence] * len(actors)  # the commit each shard is at, as far as the front end knows
        self.synced = [False] * len(actors)
        refs = [
            actor.reset.remote(sequence, keys[start:stop].cpu().numpy())
            for actor, start, stop in zip(actors, bounds[:-1], bounds[1:], strict=True)
        ]
        failed = self._gather(refs, max(call_timeout, STARTUP_TIMEOUT))[1]
        for i in range(len(actors)):
            self.synced[i] = i not in failed

    def search(self, queries: torch.Tensor, k: int, empty_slots: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Every shard's top k, merged; Unavailable (nothing read) unless every shard answers at the front
        end's commit. A shard that restarted is caught up and asked again once within the call."""
        host_queries = queries.cpu().numpy()
        for attempt in range(2):
            self._catch_up()
            refs = [
                actor.search.remote(self.delivered[i], host_queries, k, empty_slots)
                for i, actor in enumerate(self.actors)
            ]
            parts, failed = self._gather(refs)
            if not failed:
                break
            for i in failed:
                self.synced[i] = False
            if attempt == 1:
                raise Unavailable(self._unavailable_message(failed))
        # Concatenated into new arrays: what Ray returns is read-only, a view of its object store.
        similarities = torch.from_numpy(np.concatenate([p[0] for p in parts], axis=1)).to(self.device)
        slots = torch.from_numpy(np.concatenate([p[1] for p in parts], axis=1)).to(self.device)
        similarities, best = torch.topk(similarities, k, dim=1, sorted=False)
        return similarities, torch.gather(slots, 1, best)

    def update(self, slots: torch.Tensor, keys: torch.Tensor) -> None:
        """Route one commit's new keys to the shards that own them. Never raises: the write is already the
        front end's (logged, applied there); a shard that does not take it is caught up before it answers again."""
        sequence = int(self.generations[slots[0]])  # the commit being applied: it just stamped every target
        owner = torch.searchsorted(torch.tensor(self.bounds[1:-1]), slots, right=True)
        refs, routed = [], []
        for i, actor in enumerate(self.actors):
            rows = torch.nonzero(owner == i).flatten()
            if not len(rows) or not self.synced[i]:
                continue
            shard_keys = keys[rows.to(keys.device)].cpu().numpy()
            refs.append(actor.apply.remote(self.delivered[i], sequence, slots[rows].numpy(), shard_keys))
            routed.append(i)
        _, failed = self._gather(refs)
        for position, i in enumerate(routed):
            if position in failed:
                self.synced[i] = False
            else:
                self.delivered[i] = sequence

    def state(self) -> dict[str, torch.Tensor]:
        return {}

    def health(self) -> list[ShardHealth]:
        refs = [actor.describe.remote() for actor in self.actors]
        answers, failed = self._gather(refs)
        report = []
        for i, (start, stop) in enumerate(zip(self.bounds[:-1], self.bounds[1:], strict=True)):
            if i in failed:
                report.append(ShardHealth(i, start, stop, "", 0, "unavailable", -1, failed[i]))
                continue
            d = answers[i]
            serving = self.synced[i] and d["sequence"] == self.delivered[i]
            report.append(
                ShardHealth(
                    i,
                    start,
                    stop,
                    f"{d['node_id'][:NODE_ID_DIGITS]} ({d['host']}, {d['device']})",
                    d["pid"],
                    "serving" if serving else "catching up",
                    d["sequence"],
                    "" if serving else f"the front end is at {self.delivered[i]} for it",
                )
            )
        return report

    def _catch_up(self) -> None:
        """Bring every shard marked behind to the front end's keys: ask where it is, send the slots of its
        range written since, stamped with the newest commit. Unavailable if one does not answer."""
        behind = [i for i, synced in enumerate(self.synced) if not synced]
        if not behind:
            return
        answers, failed = self._gather([self.actors[i].describe.remote() for i in behind])
        if failed:
            raise Unavailable(self._unavailable_message({behind[p]: why for p, why in failed.items()}))
        sequence = int(self.generations.max())
        refs = []
        for position, i in enumerate(behind):
            at = answers[position]["sequence"]
            if at == sequence:  # it recovered every commit (its data directory had them all)
                refs.append(None)
                continue
            start, stop = self.bounds[i], self.bounds[i + 1]
            changed = torch.nonzero(self.generations[start:stop] > at).flatten().cpu() + start
            keys = self.keys[changed.to(self.device)].cpu().numpy()
            refs.append(self.actors[i].apply.remote(at, sequence, changed.numpy(), keys))
            log.info("shard %d: caught up from commit %d to %d (%d slots)", i, at, sequence, len(changed))
        _, failed = self._gather([ref for ref in refs if ref is not None])
        if failed:
            raised = [i for i, ref in zip(behind, refs, strict=True) if ref is not None]
            raise Unavailable(self._unavailable_message({raised[p]: why for p, why in failed.items()}))
        for i in behind:
            self.synced[i], self.delivered[i] = True, sequence

    def _gather(self, refs: list, timeout: float | None = None) -> tuple[list, dict[int, str]]:
        """Each call's answer (None where it failed) and, by position, why the failed ones failed; ``timeout``
        for all of them together (default: the call timeout)."""
        ray = self._ray
        deadline = time.monotonic() + (timeout or self.call_timeout)
        answers, failed = [], {}
        for position, ref in enumerate(refs):
            try:
                answers.append(ray.get(ref, timeout=max(0.0, deadline - time.monotonic())))
            except ray.exceptions.RayError as exc:  # the actor died, restarts, refused (StaleShard) or timed out
                answers.append(None)
                failed[position] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        return answers, failed

    def _unavailable_message(self, failed: dict[int, str]) -> str:
        shards = ", ".join(f"shard {i} ({why})" for i, why in sorted(failed.items()))
        return f"the memory's shards on the cluster do not all answer: {shards}; retry once they are back"


class RayCluster:
    """A connection to a Ray cluster (``ray.init(address=...)``) that places memories' shards on it.

    ``shard_data_dir``: the folder on every node under which each shard keeps its data directory
    (``<shard_data_dir>/<memory>/<build>/shard-<i>/<node id>``: a fresh build id each time the front end builds
    the memory's index, so a shard never reads what an earlier build of the memory left on a node)."""

    def __init__(
        self, address: str, shard_data_dir: str, call_timeout: float = DEFAULT_CALL_TIMEOUT, max_restarts: int = -1
    ):
        try:
            import ray
        except ImportError:
            raise FailedPrecondition("--cluster needs Ray: pip install 'lifelong-memory[cluster]'") from None
        self._ray = ray
        self.shard_data_dir = shard_data_dir
        self.call_timeout = call_timeout
        self.max_restarts = max_restarts
        if not ray.is_initialized():
            ray.init(address=address, namespace=NAMESPACE, log_to_driver=False, configure_logging=False)
        self.address = address
        self._groups: dict[str, object] = {}  # memory name -> its placement group
        self._actors: dict[str, list] = {}

    def index_builder(self, name: str):
        """What Memory calls to build the index of memory ``name`` on this cluster."""

        def build(keys: torch.Tensor, generations: torch.Tensor, config, max_batch: int) -> ClusterIndex:
            self.drop(name)  # a memory built again (an import over nothing, a recovery): its old actors go
            actors = self._place(name, config, max_batch)
            bounds = shard_bounds(config.memory_size, config.shards)
            return ClusterIndex(actors, bounds, keys, generations, self.call_timeout)

        return build

    def _place(self, name: str, config, max_batch: int) -> list:
        from ray.util.placement_group import placement_group, remove_placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        ray = self._ray
        bundle = {"CPU": 1} if config.placement == "node" else {"CPU": 1, "GPU": 1}
        group = placement_group([bundle] * config.shards, strategy="SPREAD", name=f"lmem-{name}")
        try:
            ray.get(group.ready(), timeout=self.call_timeout)
        except ray.exceptions.GetTimeoutError:
            remove_placement_group(group)
            raise ResourceExhausted(
                f"config.shards: the cluster found no room for {config.shards} shards of {bundle} within "
                f"{self.call_timeout:g} s (placement {config.placement}); add nodes or use fewer shards"
            ) from None
        build = uuid.uuid4().hex[:12]
        bounds = shard_bounds(config.memory_size, config.shards)
        shard_class = ray.remote(ShardServer)
        actors = [
            shard_class.options(
                max_restarts=self.max_restarts,
                max_task_retries=0,  # at most once: a call that meets a dead shard fails (UNAVAILABLE), never repeats
                num_cpus=bundle["CPU"],
                num_gpus=bundle.get("GPU", 0),
                scheduling_strategy=PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=i),
            ).remote(
                f"{self.shard_data_dir}/{name}/{build}/shard-{i}",
                bounds[i],
                bounds[i + 1],
                config.key_dim,
                config.search_dtype,
                max_batch,
            )
            for i in range(config.shards)
        ]
        self._groups[name], self._actors[name] = group, actors
        return actors

    def drop(self, name: str) -> None:
        """End memory ``name``'s shards and remove their data directories (those whose shard answers; what an
        unreachable shard leaves on its node is never read again: every build has its own folder)."""
        from ray.util.placement_group import remove_placement_group

        ray = self._ray
        actors = self._actors.pop(name, [])
        for actor in actors:
            try:
                ray.get(actor.drop.remote(), timeout=self.call_timeout)
            except ray.exceptions.RayError as exc:
                log.warning("memory %r: a shard's data directory was not removed: %s", name, exc)
            ray.kill(actor, no_restart=True)
        group = self._groups.pop(name, None)
        if group is not None:
            remove_placement_group(group)

    def close(self) -> None:
        """Leave the cluster: the shards (owned by this process) end with it, their data directories stay."""
        self._ray.shutdown()
