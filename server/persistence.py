"""Durability: a data directory of snapshots and write-ahead logs, one folder per memory.

    DATA_DIR/memories/NAME/config.json         the memory's configuration, written once at create
    DATA_DIR/memories/NAME/snapshot-SEQ.lmem   the whole memory at commit sequence SEQ (the newest two kept)
    DATA_DIR/memories/NAME/wal-SEQ.log         a write-ahead log segment whose first record is write SEQ

A write is recorded in the log under the memory's lock, in commit order, and
acknowledged once the log is durable under the sync policy: ``always`` (fsync
before the reply; concurrent writers share one fsync, group commit),
``interval`` (written to the OS before the reply, fsynced every interval: a
process crash loses nothing, an OS crash at most the interval) or ``off``
(written to the OS before the reply, fsynced only at snapshots and shutdown).
Recovery loads the newest valid snapshot and replays the log after it; a torn
or corrupt tail is truncated and reported, never fatal.

Files are replaced atomically: temp file, fsync, rename, fsync of the folder.
Snapshot files double as the portable export format (``lmem export``/``import``).
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import logging
import os
import shutil
import struct
import threading
import time
import uuid
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch
from prometheus_client import Counter, Histogram

from lifelong_memory.server.errors import InvalidArgument, Unavailable
from lifelong_memory.server.memory import DEFAULT_MAX_BATCH, Delta, Memory, MemoryConfig, MemoryState

log = logging.getLogger("lifelong_memory.server.persistence")

SYNC_POLICIES = ("always", "interval", "off")
SNAPSHOT_MAGIC = b"LMEMSNAP"
SNAPSHOT_END = b"LMEMEND!"
# 2: no age-noise generator state (the noise is a function of seed, commit and slot). Format 1 files,
# which end their arrays with that state, are still read; the state is skipped.
SNAPSHOT_VERSION = 2
READABLE_VERSIONS = (1, 2)
WAL_MAGIC = b"LMEMWAL1"
# Record header: crc32 of everything after it, payload length, commit sequence, kind.
RECORD_HEADER = struct.Struct("<IIQB")
WRITE, CLEAR = 1, 2
WRITE_HEADER = struct.Struct("<IIII")  # distinct targets, batch rows, rows that wrote, key dim
CHUNK_BYTES = 1 << 20
# The state arrays of a snapshot, in file order, with their element types.
STATE_ARRAYS = {
    "keys": torch.float32,
    "values": torch.int64,
    "ages": torch.float32,
    "generations": torch.int64,
    "recent_labels": torch.int64,
    "recent_slots": torch.int64,
}
# Arrays of older formats that are read and dropped.
DROPPED_ARRAYS = {1: {"rng_state": torch.uint8}}
DTYPE_NAMES = {torch.float32: "float32", torch.int64: "int64", torch.uint8: "uint8"}

WAL_BYTES = Counter("lmem_wal_written_bytes", "Bytes appended to a memory's write-ahead log", ["memory"])
FSYNC_SECONDS = Histogram(
    "lmem_wal_fsync_seconds",
    "Duration of write-ahead log fsyncs (one per group commit)",
    buckets=(1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
)


@dataclass(frozen=True)
class Durability:
    """How a data directory keeps what it acknowledged (``lmem serve`` flags of the same names)."""

    sync: str = "always"
    sync_interval: float = 0.05  # seconds between fsyncs under "interval": the loss window on an OS crash
    snapshot_interval: float = 600.0  # seconds between snapshots of a memory that was written to
    snapshot_wal_bytes: int = 256 << 20  # ... or once its log grew this much since the last snapshot

    def __post_init__(self):
        if self.sync not in SYNC_POLICIES:
            raise ValueError(f"sync must be one of {SYNC_POLICIES}, got {self.sync!r}")
        if not self.sync_interval > 0 or not self.snapshot_interval > 0 or self.snapshot_wal_bytes <= 0:
            raise ValueError("sync_interval, snapshot_interval and snapshot_wal_bytes must be positive")


class SnapshotError(ValueError):
    """A snapshot or export file that is not one, or is damaged."""


class RecoveryError(RuntimeError):
    """A memory whose files cannot be brought back; the server runs on without it."""


# ------------------------------------------------------------------ files


def fsync_directory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(path: Path, chunks: Iterable[bytes]) -> int:
    """Write a file so that it is either whole or absent after a crash; returns its size."""
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    size = 0
    try:
        with open(temporary, "xb") as f:
            for chunk in chunks:
                f.write(chunk)
                size += len(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.rename(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)
    return size


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


# -------------------------------------------------------------- snapshots


def snapshot_chunks(state: MemoryState) -> Iterator[bytes]:
    """The snapshot file of ``state``, in chunks: header, raw little-endian arrays, checksummed trailer."""
    arrays = {name: getattr(state, name).contiguous() for name in STATE_ARRAYS}
    header = {
        "format": SNAPSHOT_VERSION,
        "config": dataclasses.asdict(state.config),
        "commit_sequence": state.commit_sequence,
        "counters": state.counters,
        "arrays": [{"name": n, "dtype": DTYPE_NAMES[a.dtype], "shape": list(a.shape)} for n, a in arrays.items()],
    }
    header_bytes = json.dumps(header, sort_keys=True).encode()
    crc = 0
    for chunk in _array_chunks(header_bytes, arrays.values()):
        crc = zlib.crc32(chunk, crc)
        yield chunk
    yield struct.pack("<I", crc) + SNAPSHOT_END


def _array_chunks(header: bytes, arrays: Iterable[torch.Tensor]) -> Iterator[bytes]:
    yield SNAPSHOT_MAGIC + struct.pack("<IQ", SNAPSHOT_VERSION, len(header)) + header
    for array in arrays:
        raw = memoryview(array.numpy()).cast("B") if array.numel() else memoryview(b"")
        for start in range(0, len(raw), CHUNK_BYTES):
            yield bytes(raw[start : start + CHUNK_BYTES])


def read_snapshot(f: BinaryIO) -> MemoryState:
    """Parse and verify a snapshot file (SnapshotError says what is wrong with it)."""
    crc = 0

    def take(n: int, what: str) -> bytes:
        nonlocal crc
        data = f.read(n)
        if len(data) != n:
            raise SnapshotError(f"truncated: {what} needs {n} bytes, the file has {len(data)} left")
        crc = zlib.crc32(data, crc)
        return data

    if take(len(SNAPSHOT_MAGIC), "the magic") != SNAPSHOT_MAGIC:
        raise SnapshotError("not a lifelong-memory snapshot (bad magic)")
    version, header_length = struct.unpack("<IQ", take(12, "the header length"))
    if version not in READABLE_VERSIONS:
        raise SnapshotError(f"snapshot format {version} is not supported (this server reads {list(READABLE_VERSIONS)})")
    if header_length > 1 << 20:
        raise SnapshotError(f"header of {header_length} bytes is implausible")
    try:
        header = json.loads(take(header_length, "the header"))
        # Only parsed and checked in itself: whether this host has its device is asked where the memory is
        # placed, after an import's overrides (a snapshot from a GPU server restores on a CPU host).
        config = MemoryConfig(**header["config"]).validated()
        names = [a["name"] for a in header["arrays"]]
    except (ValueError, KeyError, TypeError) as exc:
        raise SnapshotError(f"bad header: {exc}") from None
    expected = {**STATE_ARRAYS, **DROPPED_ARRAYS.get(version, {})}
    if names != list(expected):
        raise SnapshotError(f"arrays {names} are not {list(expected)}")
    arrays = {}
    for spec, (name, dtype) in zip(header["arrays"], expected.items(), strict=True):
        shape = spec["shape"]
        if spec["dtype"] != DTYPE_NAMES[dtype] or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise SnapshotError(f"array {name}: bad dtype or shape {spec}")
        array = torch.empty(shape, dtype=dtype)
        raw = memoryview(array.numpy()).cast("B") if array.numel() else memoryview(bytearray())
        got = f.readinto(raw)
        if got != len(raw):
            raise SnapshotError(f"truncated: array {name} needs {len(raw)} bytes, the file has {got}")
        crc = zlib.crc32(raw, crc)
        arrays[name] = array
    trailer = f.read(4 + len(SNAPSHOT_END))
    if len(trailer) != 4 + len(SNAPSHOT_END) or trailer[4:] != SNAPSHOT_END:
        raise SnapshotError("truncated: the trailer is missing")
    if struct.unpack("<I", trailer[:4])[0] != crc:
        raise SnapshotError("checksum mismatch: the file is damaged")
    if f.read(1):
        raise SnapshotError("trailing bytes after the end marker")
    for name in DROPPED_ARRAYS.get(version, {}):
        del arrays[name]
    _check_state(config, arrays)
    try:
        sequence, counters = int(header["commit_sequence"]), {k: int(v) for k, v in header["counters"].items()}
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise SnapshotError(f"bad header: {exc}") from None
    return MemoryState(config=config, commit_sequence=sequence, counters=counters, **arrays)


def _check_state(config: MemoryConfig, arrays: dict[str, torch.Tensor]) -> None:
    """The arrays fit the config and hold what a memory can hold."""
    size, dim = config.memory_size, config.key_dim
    shapes = {"keys": [size, dim], "values": [size], "ages": [size], "generations": [size]}
    for name, shape in shapes.items():
        if list(arrays[name].shape) != shape:
            raise SnapshotError(f"array {name} has shape {list(arrays[name].shape)}, the config needs {shape}")
    labels, slots = arrays["recent_labels"], arrays["recent_slots"]
    if labels.dim() != 1 or labels.shape != slots.shape:
        raise SnapshotError("recent_labels and recent_slots must be one-dimensional and of one length")
    if len(slots) and (int(slots.min()) < 0 or int(slots.max()) >= size or int(labels.min()) < 0):
        raise SnapshotError("recent slots must be in [0, memory_size) and labels >= 0")
    if len(arrays["values"]) and int(arrays["values"].min()) < -1:
        raise SnapshotError("values must be >= -1")
    if not bool(torch.isfinite(arrays["keys"]).all()) or not bool(torch.isfinite(arrays["ages"]).all()):
        raise SnapshotError("keys and ages must be finite")


def read_snapshot_file(path: Path) -> MemoryState:
    with open(path, "rb") as f:
        return read_snapshot(f)


# ------------------------------------------------------- write-ahead log


def encode_record(sequence: int, delta: Delta | None) -> bytes:
    if delta is None:
        kind, payload = CLEAR, b""
    else:
        kind = WRITE
        parts = [
            WRITE_HEADER.pack(len(delta.targets), len(delta.labels), delta.writes, delta.keys.shape[1]),
            *(
                t.to("cpu").contiguous().numpy().tobytes()
                for t in (delta.targets, delta.keys, delta.values, delta.labels, delta.slots)
            ),
        ]
        payload = b"".join(parts)
    body = struct.pack("<IQB", len(payload), sequence, kind) + payload  # RECORD_HEADER without its crc
    return struct.pack("<I", zlib.crc32(body)) + body


def decode_delta(payload: bytes) -> Delta:
    n, batch, writes, dim = WRITE_HEADER.unpack_from(payload)
    offset = WRITE_HEADER.size
    tensors = []
    for count, dtype, shape in (
        (n, torch.int64, (n,)),
        (n * dim, torch.float32, (n, dim)),
        (n, torch.int64, (n,)),
        (batch, torch.int64, (batch,)),
        (batch, torch.int64, (batch,)),
    ):
        size = count * (4 if dtype == torch.float32 else 8)
        if offset + size > len(payload):
            raise ValueError(f"payload of {len(payload)} bytes is too short for its {n} targets and {batch} rows")
        array = torch.empty(shape, dtype=dtype)
        memoryview(array.numpy()).cast("B")[:] = payload[offset : offset + size]
        tensors.append(array)
        offset += size
    if offset != len(payload):
        raise ValueError(f"payload of {len(payload)} bytes, the record needs {offset}")
    return Delta(*tensors, writes=writes)


@dataclass
class SegmentScan:
    records: list[tuple[int, Delta | None]]
    valid_bytes: int  # where the last good record ends
    problem: str | None  # why the scan stopped before the end of the file


def scan_segment(path: Path) -> SegmentScan:
    """The good records of one log segment, up to the first torn or corrupt one."""
    data = path.read_bytes()
    if data[: len(WAL_MAGIC)] != WAL_MAGIC:
        return SegmentScan([], 0, "bad magic")
    offset = len(WAL_MAGIC)
    records: list[tuple[int, Delta | None]] = []
    previous = None
    while offset < len(data):
        if len(data) - offset < RECORD_HEADER.size:
            return SegmentScan(records, offset, f"torn record header at byte {offset}")
        crc, length, sequence, kind = RECORD_HEADER.unpack_from(data, offset)
        end = offset + RECORD_HEADER.size + length
        if end > len(data):
            return SegmentScan(records, offset, f"torn record at byte {offset} ({length} payload bytes announced)")
        if zlib.crc32(data[offset + 4 : end]) != crc:
            return SegmentScan(records, offset, f"checksum mismatch in the record at byte {offset}")
        if previous is not None and sequence != previous + 1:
            return SegmentScan(records, offset, f"record {sequence} at byte {offset} does not follow {previous}")
        payload = data[offset + RECORD_HEADER.size : end]
        try:
            delta = decode_record(kind, payload)
        except (ValueError, struct.error) as exc:
            return SegmentScan(records, offset, f"malformed record at byte {offset}: {exc}")
        records.append((sequence, delta))
        previous = sequence
        offset = end
    return SegmentScan(records, offset, None)


def decode_record(kind: int, payload: bytes) -> Delta | None:
    if kind == CLEAR:
        return None
    if kind == WRITE:
        return decode_delta(payload)
    raise ValueError(f"unknown record kind {kind}")


def segment_path(directory: Path, first_sequence: int) -> Path:
    return directory / f"wal-{first_sequence:020d}.log"


def segments(directory: Path) -> list[tuple[int, Path]]:
    found = []
    for path in directory.glob("wal-*.log"):
        try:
            found.append((int(path.stem.removeprefix("wal-")), path))
        except ValueError:
            continue
    return sorted(found)


class WriteAheadLog:
    """The journal of one memory: checksummed records in segment files, made durable with group commit.

    ``append`` only buffers (it runs under the memory's lock). ``wait`` makes the
    buffer durable: the first waiter becomes the leader and writes and fsyncs
    everything buffered so far, covering every writer that queued meanwhile.
    """

    def __init__(self, directory: Path, next_sequence: int, durability: Durability):
        self.directory = directory
        self.durability = durability
        self.failure: Exception | None = None
        self.bytes_since_snapshot = 0
        self._cond = threading.Condition()
        self._buffer = bytearray()
        self._buffer_first = next_sequence
        self._appended = next_sequence - 1
        self._written = next_sequence - 1
        self._synced = next_sequence - 1
        self._flushing = False
        self._rotate = False
        self._closed = False
        self._fd = self._open_segment(next_sequence)
        self._syncer = None
        if durability.sync == "interval":
            self._syncer = threading.Thread(target=self._sync_periodically, daemon=True, name="wal-sync")
            self._syncer.start()

    def _open_segment(self, first_sequence: int) -> int:
        path = segment_path(self.directory, first_sequence)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644)
        _write_all(fd, WAL_MAGIC)
        os.fsync(fd)
        fsync_directory(self.directory)
        return fd

    def append(self, sequence: int, delta: Delta | None) -> None:
        record = encode_record(sequence, delta)
        with self._cond:
            if not self._buffer:
                self._buffer_first = sequence
            self._buffer += record
            self._appended = sequence

    def wait(self, sequence: int) -> None:
        fsync = self.durability.sync == "always"
        with self._cond:
            while True:
                if self.failure is not None:
                    raise Unavailable(f"write-ahead log failed: {self.failure}; this write is not durable")
                if (self._synced if fsync else self._written) >= sequence:
                    return
                if self._flushing:
                    self._cond.wait()
                else:
                    self._flush(fsync)

    def rotate(self) -> None:
        """Start a new segment at the next write, so the ones a snapshot covers can be deleted."""
        with self._cond:
            self._rotate = True

    def flush(self) -> None:
        """Write and fsync everything appended so far (before a snapshot or at shutdown)."""
        with self._cond:
            while self._flushing:
                self._cond.wait()
            if self.failure is None and (self._synced < self._appended or self._rotate):
                self._flush(fsync=True)
            if self.failure is not None:
                raise Unavailable(f"write-ahead log failed: {self.failure}")

    def close(self) -> None:
        try:
            self.flush()
        finally:
            with self._cond:
                self._closed = True
                self._cond.notify_all()
                os.close(self._fd)

    def _flush(self, fsync: bool) -> None:
        """Leader: write (and fsync) the buffer with the lock released; called and returns holding it."""
        self._flushing = True
        data, last = bytes(self._buffer), self._appended
        first = self._buffer_first if data else last + 1
        self._buffer.clear()
        rotate = self._rotate
        self._cond.release()
        error = None
        try:
            if rotate:
                os.fsync(self._fd)
                os.close(self._fd)
                self._fd = self._open_segment(first)
            if data:
                _write_all(self._fd, data)
            if fsync:
                started = time.perf_counter()
                os.fsync(self._fd)
                FSYNC_SECONDS.observe(time.perf_counter() - started)
        except OSError as exc:
            error = exc
        finally:
            self._cond.acquire()
        self._flushing = False
        if rotate:
            self._rotate = False
        if error is not None:
            self.failure = error
            log.error("write-ahead log in %s failed: %s", self.directory, error)
        else:
            self._written = last
            if fsync:
                self._synced = last
            self.bytes_since_snapshot += len(data)
            WAL_BYTES.labels(self.directory.name).inc(len(data))
        self._cond.notify_all()

    def _sync_periodically(self) -> None:
        with self._cond:
            while not self._closed:
                self._cond.wait(self.durability.sync_interval)
                if not self._closed and not self._flushing and self.failure is None and self._synced < self._appended:
                    self._flush(fsync=True)


# ---------------------------------------------------------- data directory


@dataclass
class Recovered:
    """What recovery brought back of one memory, for the log and the server's report."""

    name: str
    memory: Memory | None
    snapshot_sequence: int = 0
    replayed: int = 0
    truncated: str | None = None  # what was cut from the log's tail, and why
    error: str | None = None  # why the memory could not be brought back


class DataDirectory:
    """The files of every memory a server owns, and their snapshots."""

    def __init__(self, root: Path | str, durability: Durability = Durability()):
        self.root = Path(root)
        self.memories_dir = self.root / "memories"
        self.memories_dir.mkdir(parents=True, exist_ok=True)
        # One owner at a time: two servers writing one directory would interleave their logs.
        self._lock_file = open(self.root / "lock", "a+")
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_file.seek(0)
            owner = self._lock_file.read().strip() or "another process"
            self._lock_file.close()
            raise OSError(f"data directory {self.root} is in use by {owner}") from None
        self._lock_file.truncate(0)
        self._lock_file.write(f"process {os.getpid()}\n")
        self._lock_file.flush()
        self.durability = durability
        self._snapshot_times: dict[str, float] = {}
        self._snapshot_lock = threading.Lock()

    def close(self) -> None:
        """Let another server have the directory (closing the lock file releases the lock)."""
        self._lock_file.close()

    # Creation and deletion are made atomic by building in a hidden folder and renaming.
    def create(self, name: str, memory: Memory) -> None:
        """Give a new memory (empty, or imported with state) its folder and journal."""
        staging = self.memories_dir / f".creating-{name}-{uuid.uuid4().hex}"
        staging.mkdir()
        try:
            write_atomically(staging / "config.json", [json.dumps(dataclasses.asdict(memory.config)).encode()])
            if memory.commit_sequence:
                state = memory.capture()
                write_atomically(staging / _snapshot_name(state.commit_sequence), snapshot_chunks(state))
            os.rename(staging, self.memories_dir / name)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        fsync_directory(self.memories_dir)
        memory.journal = WriteAheadLog(self.memories_dir / name, memory.commit_sequence + 1, self.durability)
        self._snapshot_times[name] = time.monotonic()

    def delete(self, name: str, memory: Memory | None) -> None:
        if memory is not None and isinstance(memory.journal, WriteAheadLog):
            memory.journal.close()
        trash = self.memories_dir / f".deleted-{name}-{uuid.uuid4().hex}"
        os.rename(self.memories_dir / name, trash)
        fsync_directory(self.memories_dir)
        shutil.rmtree(trash)

    def recover(self, fallback_device: str | None = None, max_batch: int = DEFAULT_MAX_BATCH) -> list[Recovered]:
        """Bring back every memory in the directory: newest valid snapshot, then its log. A memory whose
        device this host does not have goes to ``fallback_device`` (``lmem serve --device``), if given."""
        for leftover in self.memories_dir.glob(".*"):  # half-made creates, half-done deletes
            shutil.rmtree(leftover, ignore_errors=True)
        results = []
        for folder in sorted(p for p in self.memories_dir.iterdir() if p.is_dir()):
            try:
                results.append(self._recover(folder, fallback_device, max_batch))
            except (RecoveryError, OSError, ValueError) as exc:
                log.error("memory %r could not be recovered from %s: %s", folder.name, folder, exc)
                results.append(Recovered(folder.name, None, error=str(exc)))
        return results

    def _recover(self, folder: Path, fallback_device: str | None, max_batch: int) -> Recovered:
        for stale in folder.glob(".*.tmp"):
            stale.unlink()
        try:
            config = MemoryConfig(**json.loads((folder / "config.json").read_text())).validated()
        except (OSError, ValueError, TypeError) as exc:
            raise RecoveryError(f"config.json: {exc}") from None
        try:
            config.check_usable()
        except InvalidArgument as exc:
            if fallback_device is None:
                raise RecoveryError(f"{exc}; start the server with --device to place it on another device") from None
            log.warning("memory %r: %s; placing it on %s (--device)", folder.name, exc, fallback_device)
            config = dataclasses.replace(config, device=fallback_device, devices=()).validated()
        state = None
        snapshots = sorted(folder.glob("snapshot-*.lmem"), reverse=True)
        for path in snapshots:
            try:
                state = read_snapshot_file(path)
                break
            except (SnapshotError, OSError) as exc:
                log.error("memory %r: snapshot %s is unusable (%s); trying an older one", folder.name, path.name, exc)
        memory = Memory(config, state, max_batch=max_batch)
        result = Recovered(folder.name, memory, snapshot_sequence=memory.commit_sequence)
        found = segments(folder)
        log_start = found[0][0] if found else None
        if (log_start or 1) > memory.commit_sequence + 1 or (snapshots and state is None and log_start is None):
            raise RecoveryError(
                f"no usable snapshot reaches the log, which starts at write {log_start}; the newest usable state is "
                f"at {memory.commit_sequence}: writes in between are lost"
            )
        for i, (_, path) in enumerate(found):
            scan = scan_segment(path)
            if scan.records and scan.records[0][0] > memory.commit_sequence + 1:
                raise RecoveryError(
                    f"{path.name} starts at write {scan.records[0][0]} but the newest usable state is at "
                    f"{memory.commit_sequence}: writes in between are lost"
                )
            for sequence, delta in scan.records:
                if sequence > memory.commit_sequence:
                    memory.replay(sequence, delta)
                    result.replayed += 1
            if scan.problem is not None:
                later = [p.name for _, p in found[i + 1 :]]
                result.truncated = f"{path.name}: {scan.problem}; cut {path.stat().st_size - scan.valid_bytes} bytes"
                if later:
                    result.truncated += f" and dropped the later segments {later}"
                if scan.records:
                    with open(path, "r+b") as f:
                        f.truncate(scan.valid_bytes)
                        os.fsync(f.fileno())
                else:
                    path.unlink()
                for _, later_path in found[i + 1 :]:
                    later_path.unlink()
                fsync_directory(folder)
                log.warning("memory %r: torn or corrupt write-ahead log tail: %s", folder.name, result.truncated)
                break
        memory.journal = WriteAheadLog(folder, memory.commit_sequence + 1, self.durability)
        self._snapshot_times[folder.name] = time.monotonic()
        log.info(
            "memory %r recovered: snapshot at %d, %d writes replayed, now at %d",
            folder.name,
            result.snapshot_sequence,
            result.replayed,
            memory.commit_sequence,
        )
        return result

    def snapshot(self, name: str, memory: Memory) -> tuple[int, Path, int]:
        """Write a snapshot now; drop the snapshots and log segments it makes redundant.
        Returns (commit sequence, path, bytes)."""
        with self._snapshot_lock:
            journal = memory.journal
            state = memory.capture()
            if isinstance(journal, WriteAheadLog):
                journal.rotate()
                journal.flush()  # what the snapshot holds is on disk in the log too, whatever happens next
            folder = self.memories_dir / name
            path = folder / _snapshot_name(state.commit_sequence)
            size = write_atomically(path, snapshot_chunks(state))
            if isinstance(journal, WriteAheadLog):
                journal.bytes_since_snapshot = 0
            self._snapshot_times[name] = time.monotonic()
            self._drop_redundant(folder)
            return state.commit_sequence, path, size

    def _drop_redundant(self, folder: Path) -> None:
        """Keep the newest two snapshots, and the log from the older of them on."""
        snapshots = sorted(folder.glob("snapshot-*.lmem"))
        for old in snapshots[:-2]:
            old.unlink()
        kept_from = int(snapshots[-2 if len(snapshots) >= 2 else -1].stem.removeprefix("snapshot-"))
        found = segments(folder)
        for (_, path), (next_first, _) in zip(found[:-1], found[1:], strict=True):
            if next_first <= kept_from + 1:  # every record in this segment is in the kept snapshots
                path.unlink()
        fsync_directory(folder)

    def due_for_snapshot(self, name: str, memory: Memory) -> bool:
        journal = memory.journal
        if not isinstance(journal, WriteAheadLog) or journal.bytes_since_snapshot == 0:
            return False
        age = time.monotonic() - self._snapshot_times.get(name, 0.0)
        return (
            journal.bytes_since_snapshot >= self.durability.snapshot_wal_bytes
            or age >= self.durability.snapshot_interval
        )


def _snapshot_name(sequence: int) -> str:
    return f"snapshot-{sequence:020d}.lmem"
