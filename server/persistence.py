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
import errno
import fcntl
import json
import logging
import math
import os
import re
import shutil
import struct
import threading
import time
import uuid
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch
from prometheus_client import Counter, Histogram

from lifelong_memory.server.errors import (
    InvalidArgument,
    MemoryServiceError,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from lifelong_memory.server.memory import (
    DEFAULT_MAX_BATCH,
    MAX_AGE,
    Delta,
    KeysAtCommit,
    Memory,
    MemoryConfig,
    MemoryState,
    Retrain,
    new_incarnation,
)

log = logging.getLogger("lifelong_memory.server.persistence")

SYNC_POLICIES = ("always", "interval", "off")
SNAPSHOT_MAGIC = b"LMEMSNAP"
SNAPSHOT_END = b"LMEMEND!"
# 2: no age-noise generator state (the noise is a function of seed, commit and slot). Format 1 files,
# which end their arrays with that state, are still read; the state is skipped.
# 3: the writer tag of every slot, and the writer table with its counters in the header (older files restore
# with every slot and count untagged); the index's own state (a trained IVF quantizer) after the state arrays,
# listed as "index_arrays".
SNAPSHOT_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)
# Index state arrays: shard<i>.<name>, float32.
# The counters a snapshot keeps, and how far its commit sequence may go (int64 age stamps count from it).
COUNTERS = ("queries", "writes", "merges")
MAX_COMMIT_SEQUENCE = 2**62
INDEX_ARRAY_NAME = re.compile(r"shard\d+\.(centroids|ranges)")
WAL_MAGIC = b"LMEMWAL1"
# Record header: crc32 of everything after it, payload length, commit sequence, kind.
RECORD_HEADER = struct.Struct("<IIQB")
# A tagged write is a write record preceded by its writer tag (a length byte and UTF-8); untagged writes keep
# the plain kind, so a log of untagged writes reads on servers from before writer tags.
# A retrain record holds the new quantizer: a length-prefixed JSON list of [name, shape], then the float32 arrays.
WRITE, CLEAR, TAGGED_WRITE, RETRAIN = 1, 2, 3, 4
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
    "writers": torch.int32,
}
# Arrays a format does not have yet, and what a restore puts in their place.
ADDED_ARRAYS = {"writers": 3}
# Arrays of older formats that are read and dropped.
DROPPED_ARRAYS = {1: {"rng_state": torch.uint8}}
DTYPE_NAMES = {torch.float32: "float32", torch.int64: "int64", torch.int32: "int32", torch.uint8: "uint8"}

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
    """The snapshot file of ``state``, in chunks: header, raw little-endian arrays, checksummed trailer. Keys
    captured streamed (KeysAtCommit) are read from the memory chunk by chunk as the file is written."""
    arrays = {name: getattr(state, name) for name in STATE_ARRAYS}
    index_arrays = {name: t.contiguous() for name, t in sorted(state.index_state.items())}

    def specs(named: dict[str, torch.Tensor]) -> list[dict]:
        return [{"name": n, "dtype": DTYPE_NAMES[a.dtype], "shape": list(a.shape)} for n, a in named.items()]

    header = {
        "format": SNAPSHOT_VERSION,
        "config": dataclasses.asdict(state.config),
        "commit_sequence": state.commit_sequence,
        "counters": state.counters,
        "writers": [
            {"name": name, "writes": writes, "merges": merges}
            for name, (writes, merges) in zip(state.writer_names, state.writer_counters, strict=True)
        ],
        "arrays": specs(arrays),
        "index_arrays": specs(index_arrays),
    }
    if state.incarnation is not None:
        header["incarnation"] = state.incarnation
    header_bytes = json.dumps(header, sort_keys=True).encode()
    crc = 0
    for chunk in _array_chunks(header_bytes, [*arrays.values(), *index_arrays.values()]):
        crc = zlib.crc32(chunk, crc)
        yield chunk
    yield struct.pack("<I", crc) + SNAPSHOT_END


def _array_chunks(header: bytes, arrays: Iterable[torch.Tensor | KeysAtCommit]) -> Iterator[bytes]:
    yield SNAPSHOT_MAGIC + struct.pack("<IQ", SNAPSHOT_VERSION, len(header)) + header
    for array in arrays:
        if not isinstance(array, torch.Tensor):  # keys read block by block: KeysAtCommit, memory_file.KeyBlocks
            row_bytes = max(1, math.prod(array.shape[1:]) * 4)
            for block in array.chunks(max(1, CHUNK_BYTES // row_bytes)):
                yield _raw(block).tobytes()
            continue
        raw = _raw(array.contiguous())
        for start in range(0, len(raw), CHUNK_BYTES):
            yield bytes(raw[start : start + CHUNK_BYTES])


def _raw(array: torch.Tensor) -> memoryview:
    return memoryview(array.numpy()).cast("B") if array.numel() else memoryview(b"")


def read_snapshot(f: BinaryIO, check_config: Callable[[MemoryConfig], object] | None = None) -> MemoryState:
    """Parse and verify a snapshot file (SnapshotError says what is wrong with it). ``check_config`` is called
    with the header's config before any array is read (an import checks there that the memory has room)."""
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
        index_specs = header.get("index_arrays", []) if version >= 3 else []
        index_names = [a["name"] for a in index_specs]
    except (ValueError, KeyError, TypeError) as exc:
        raise SnapshotError(f"bad header: {exc}") from None
    if check_config is not None:
        check_config(config)
    present = {name: dtype for name, dtype in STATE_ARRAYS.items() if version >= ADDED_ARRAYS.get(name, 0)}
    expected = {**present, **DROPPED_ARRAYS.get(version, {})}
    if names != list(expected):
        raise SnapshotError(f"arrays {names} are not {list(expected)}")
    if not all(isinstance(n, str) and INDEX_ARRAY_NAME.fullmatch(n) for n in index_names):
        raise SnapshotError(f"index arrays {index_names} are not shard<i>.centroids or shard<i>.ranges")
    expected_index = dict.fromkeys(index_names, torch.float32)
    arrays = {}
    padded_keys = None
    specs = [*header["arrays"], *index_specs]
    for spec, (name, dtype) in zip(specs, [*expected.items(), *expected_index.items()], strict=True):
        shape = spec.get("shape") if isinstance(spec, dict) else None
        if (
            not isinstance(spec, dict)
            or spec.get("dtype") != DTYPE_NAMES[dtype]
            or not isinstance(shape, list)
            or not all(type(d) is int and d >= 0 for d in shape)
        ):
            raise SnapshotError(f"array {name}: bad dtype or shape {spec}")
        needed = _fixed_shape(config, name)
        if needed is not None and shape != needed:  # before anything is allocated for it
            kind = "index array" if name in expected_index else "array"
            raise SnapshotError(f"{kind} {name} has shape {shape}, the config needs {needed}")
        size = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
        # Allocate only what the file holds: a header may announce any shape.
        left = _bytes_left(f)
        if size > left:
            raise SnapshotError(f"truncated: array {name} needs {size} bytes, the file has {left}")
        if name == "keys" and len(shape) == 2:
            # One zero row more, as the memory keeps past its last slot: a restore on the CPU adopts this
            # buffer instead of copying 8 GiB of keys into a second one.
            padded_keys = torch.empty(shape[0] + 1, shape[1], dtype=dtype)
            padded_keys[-1].zero_()
            array = padded_keys[:-1]
        else:
            array = torch.empty(shape, dtype=dtype)
        raw = _raw(array)
        for start in range(0, size, CHUNK_BYTES):
            piece = raw[start : start + CHUNK_BYTES]
            got = 0
            while got < len(piece):
                n = f.readinto(piece[got:])
                if not n:
                    raise SnapshotError(f"truncated: array {name} needs {size} bytes, the file has {start + got}")
                got += n
            crc = zlib.crc32(piece, crc)
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
    index_state = {name: arrays.pop(name) for name in index_names}
    try:
        sequence, counters = int(header["commit_sequence"]), {k: int(v) for k, v in header["counters"].items()}
        if version >= ADDED_ARRAYS["writers"]:
            table = header["writers"]
            writer_names = [str(w["name"]) for w in table]
            writer_counters = [(int(w["writes"]), int(w["merges"])) for w in table]
        else:
            writer_names, writer_counters = [""], [(counters.get("writes", 0), counters.get("merges", 0))]
            arrays["writers"] = torch.zeros(config.memory_size, dtype=torch.int32)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise SnapshotError(f"bad header: {exc}") from None
    if not 0 <= sequence <= MAX_COMMIT_SEQUENCE:
        raise SnapshotError(f"commit_sequence {sequence} is not in [0, {MAX_COMMIT_SEQUENCE}]")
    if not set(counters) <= set(COUNTERS) or not all(0 <= v < 2**63 for v in counters.values()):
        raise SnapshotError(f"counters {counters} must be among {list(COUNTERS)}, each in [0, 2^63)")
    if not all(0 <= v < 2**63 for pair in writer_counters for v in pair):
        raise SnapshotError("the writer table's counts must be in [0, 2^63)")
    incarnation = header.get("incarnation")  # absent before incarnations: the memory starts a new one
    if incarnation is not None and not (type(incarnation) is int and 0 <= incarnation < 2**63):
        raise SnapshotError(f"incarnation {incarnation!r} is not an integer in [0, 2^63)")
    _check_state(config, arrays, writer_names, sequence)
    _check_index_state(config, index_state)
    return MemoryState(
        config=config,
        commit_sequence=sequence,
        counters=counters,
        writer_names=writer_names,
        writer_counters=writer_counters,
        index_state=index_state,
        padded_keys=padded_keys,
        incarnation=incarnation,
        **arrays,
    )


def _bytes_left(f: BinaryIO) -> int:
    here = f.tell()
    end = f.seek(0, os.SEEK_END)
    f.seek(here)
    return end - here


def _check_index_state(config: MemoryConfig, index_state: dict[str, torch.Tensor]) -> None:
    """Each shard's trained IVF state has the config's shape: centroids [ivf_lists, key_dim], sq8 ranges
    [2 * key_dim], both finite, and only for a faiss-ivf memory."""
    if index_state and config.backend != "faiss-ivf":
        raise SnapshotError(f"index arrays {sorted(index_state)} for backend {config.backend}")
    for name, array in index_state.items():
        if int(name.split(".")[0][len("shard") :]) >= config.shards or list(array.shape) != _fixed_shape(config, name):
            raise SnapshotError(f"index array {name} of shape {list(array.shape)} does not fit the config")
        if not bool(torch.isfinite(array).all()):
            raise SnapshotError(f"index array {name} must be finite")


def _fixed_shape(config: MemoryConfig, name: str) -> list[int] | None:
    """The shape the config gives an array, where it gives one (the recent-label table's length varies)."""
    size, dim = config.memory_size, config.key_dim
    shapes = {"keys": [size, dim], "values": [size], "ages": [size], "generations": [size], "writers": [size]}
    if "." in name:  # an IVF shard's trained state
        return {"centroids": [config.ivf_lists, dim], "ranges": [2 * dim]}[name.split(".")[1]]
    return shapes.get(name)


def _check_state(
    config: MemoryConfig, arrays: dict[str, torch.Tensor], writer_names: list[str], commit_sequence: int
) -> None:
    """The arrays fit the config and hold what a memory at ``commit_sequence`` can hold."""
    size = config.memory_size
    for name in ("keys", "values", "ages", "generations", "writers"):
        if list(arrays[name].shape) != (shape := _fixed_shape(config, name)):
            raise SnapshotError(f"array {name} has shape {list(arrays[name].shape)}, the config needs {shape}")
    labels, slots = arrays["recent_labels"], arrays["recent_slots"]
    if labels.dim() != 1 or labels.shape != slots.shape:
        raise SnapshotError("recent_labels and recent_slots must be one-dimensional and of one length")
    if len(slots) and (int(slots.min()) < 0 or int(slots.max()) >= size or int(labels.min()) < 0):
        raise SnapshotError("recent slots must be in [0, memory_size) and labels >= 0")
    if len(arrays["values"]) and int(arrays["values"].min()) < -1:
        raise SnapshotError("values must be >= -1")
    if not _all_finite(arrays["keys"]) or not _all_finite(arrays["ages"]):
        raise SnapshotError("keys and ages must be finite")
    ages, generations = arrays["ages"], arrays["generations"]
    if len(ages) and (float(ages.min()) < 0 or float(ages.max()) > MAX_AGE or not bool((ages == ages.floor()).all())):
        raise SnapshotError(f"ages must be whole numbers of commits in [0, {MAX_AGE}]")
    if len(generations) and (int(generations.min()) < 0 or int(generations.max()) > commit_sequence):
        raise SnapshotError(f"generations must be in [0, commit_sequence = {commit_sequence}]")
    if not writer_names or writer_names[0] != "" or len(set(writer_names)) != len(writer_names):
        raise SnapshotError("the writer table must start with the untagged writer and hold distinct tags")
    writers = arrays["writers"]
    if len(writers) and (int(writers.min()) < 0 or int(writers.max()) >= len(writer_names)):
        raise SnapshotError(f"writers must index the writer table of {len(writer_names)} tags")


def _all_finite(array: torch.Tensor) -> bool:
    """In blocks: torch.isfinite of a whole array holds temporaries of almost twice its size (8 GiB of keys
    would need 14 GiB more)."""
    flat = array.reshape(-1)
    return all(bool(torch.isfinite(flat[i : i + (1 << 20)]).all()) for i in range(0, len(flat), 1 << 20))


def read_snapshot_file(path: Path, check_config: Callable[[MemoryConfig], object] | None = None) -> MemoryState:
    with open(path, "rb") as f:
        return read_snapshot(f, check_config)


# ------------------------------------------------------- write-ahead log


def encode_record(sequence: int, delta: Delta | Retrain | None) -> bytes:
    if delta is None:
        kind, payload = CLEAR, b""
    elif isinstance(delta, Retrain):
        names = sorted(delta.index_state)
        specs = json.dumps([[name, list(delta.index_state[name].shape)] for name in names]).encode()
        arrays = [delta.index_state[name].to(torch.float32).contiguous().numpy().tobytes() for name in names]
        kind, payload = RETRAIN, b"".join([struct.pack("<I", len(specs)), specs, *arrays])
    else:
        tag = delta.writer.encode()
        kind = TAGGED_WRITE if tag else WRITE
        parts = [
            *((bytes([len(tag)]), tag) if tag else ()),
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
    records: list[
        tuple[int, int, Delta | Retrain | None]
    ]  # (commit sequence, byte offset, write, retrain or None: a clear)
    valid_bytes: int  # where the last good record ends
    problem: str | None  # why the scan stopped before the end of the file
    torn: bool = False  # the problem is an unfinished last record (a crash mid-append), not damage


def scan_segment(path: Path) -> SegmentScan:
    """The good records of one log segment, up to the first torn or corrupt one."""
    data = path.read_bytes()
    if data[: len(WAL_MAGIC)] != WAL_MAGIC:
        unfinished = len(data) < len(WAL_MAGIC) and WAL_MAGIC.startswith(data)  # created, never written
        return SegmentScan([], 0, "bad magic at byte 0", torn=unfinished)
    offset = len(WAL_MAGIC)
    records: list[tuple[int, int, Delta | Retrain | None]] = []
    previous = None
    while offset < len(data):
        if len(data) - offset < RECORD_HEADER.size:
            return SegmentScan(records, offset, f"torn record header at byte {offset}", torn=True)
        crc, length, sequence, kind = RECORD_HEADER.unpack_from(data, offset)
        end = offset + RECORD_HEADER.size + length
        if end > len(data):
            problem = f"torn record at byte {offset} ({length} payload bytes announced)"
            return SegmentScan(records, offset, problem, torn=True)
        if zlib.crc32(data[offset + 4 : end]) != crc:
            # The last record of the file, half on disk after a crash, or damage anywhere.
            return SegmentScan(
                records, offset, f"checksum mismatch in the record at byte {offset}", torn=end == len(data)
            )
        if previous is not None and sequence != previous + 1:
            return SegmentScan(records, offset, f"record {sequence} at byte {offset} does not follow {previous}")
        payload = data[offset + RECORD_HEADER.size : end]
        try:
            delta = decode_record(kind, payload)
        except (ValueError, struct.error) as exc:
            return SegmentScan(records, offset, f"malformed record at byte {offset}: {exc}")
        records.append((sequence, offset, delta))
        previous = sequence
        offset = end
    return SegmentScan(records, offset, None)


def decode_record(kind: int, payload: bytes) -> Delta | Retrain | None:
    if kind == CLEAR:
        return None
    if kind == RETRAIN:
        return decode_retrain(payload)
    if kind == WRITE:
        return decode_delta(payload)
    if kind == TAGGED_WRITE:
        end = 1 + payload[0] if payload else 1
        if len(payload) < end:
            raise ValueError(f"payload of {len(payload)} bytes is too short for its writer tag")
        return dataclasses.replace(decode_delta(payload[end:]), writer=payload[1:end].decode())
    raise ValueError(f"unknown record kind {kind}")


def decode_retrain(payload: bytes) -> Retrain:
    (length,) = struct.unpack_from("<I", payload)
    specs, offset, state = json.loads(payload[4 : 4 + length]), 4 + length, {}
    for name, shape in specs:
        if not (isinstance(name, str) and INDEX_ARRAY_NAME.fullmatch(name)) or not all(
            isinstance(d, int) and d >= 0 for d in shape
        ):
            raise ValueError(f"bad index array {name!r} of shape {shape!r}")
        size = 4 * math.prod(shape)
        if offset + size > len(payload):
            raise ValueError(f"index array {name} needs {size} bytes, the record has {len(payload) - offset}")
        state[name] = torch.frombuffer(bytearray(payload[offset : offset + size]), dtype=torch.float32).reshape(shape)
        offset += size
    if offset != len(payload):
        raise ValueError(f"{len(payload) - offset} bytes after the index arrays")
    return Retrain(state)


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

    ``append`` writes a record to the OS before its write is applied (it runs under the memory's lock):
    a write the disk cannot take (full, failing) is refused with the file cut back to its last whole
    record, so the memory never holds a write its log lacks. ``wait`` makes records durable under the
    sync policy: the first waiter becomes the leader and fsyncs everything written so far, covering
    every writer that queued meanwhile. A failed fsync or cut marks the log failed: the memory then
    answers nothing until recovery reads what the disk really holds.
    """

    def __init__(self, directory: Path, next_sequence: int, durability: Durability, *, existing: bool = False):
        """``existing``: the segment for ``next_sequence`` was already written (a create's staging folder)."""
        self.directory = directory
        self.durability = durability
        self.failure: Exception | None = None
        self.bytes_since_snapshot = 0
        self._cond = threading.Condition()
        self._written = next_sequence - 1
        self._synced = next_sequence - 1
        self._flushing = False
        self._rotate = False
        self._closed: str | None = None  # why the log takes nothing more: "closed", or "deleted"
        if existing:
            self._fd = os.open(segment_path(directory, next_sequence), os.O_WRONLY | os.O_APPEND)
            self._end = os.fstat(self._fd).st_size
        else:
            self._fd, self._end = create_segment(directory, next_sequence), len(WAL_MAGIC)
        self._syncer = None
        if durability.sync == "interval":
            self._syncer = threading.Thread(target=self._sync_periodically, daemon=True, name="wal-sync")
            self._syncer.start()

    def append(self, sequence: int, delta: Delta | Retrain | None) -> None:
        record = encode_record(sequence, delta)
        with self._cond:
            self._check_open()
            if self._rotate:
                self._start_segment(sequence)
            try:
                _write_all(self._fd, record)
            except OSError as exc:
                self._cut_back(exc)
                raise storage_error(exc, "the write-ahead log could not take this write; it was not applied") from None
            self._end += len(record)
            self._written = sequence
            self.bytes_since_snapshot += len(record)
        WAL_BYTES.labels(self.directory.name).inc(len(record))

    def wait(self, sequence: int) -> None:
        if self.durability.sync != "always":
            return  # written to the OS by append: what "interval" and "off" promise
        with self._cond:
            while True:
                self._check_open(sequence)
                if self._synced >= sequence:
                    return
                if self._flushing:
                    self._cond.wait()
                else:
                    self._fsync()

    def rotate(self) -> None:
        """Start a new segment at the next write, so the ones a snapshot covers can be deleted."""
        with self._cond:
            self._rotate = True

    def flush(self) -> None:
        """Fsync everything written so far (before a snapshot or at shutdown)."""
        with self._cond:
            while self._flushing:
                self._cond.wait()
            self._check_open()
            if self._synced < self._written:
                self._fsync()
            self._check_open()

    def close(self) -> None:
        """Fsync and close (a clean shutdown); Unavailable if the log failed."""
        try:
            self.flush()
        finally:
            self._shut("closed")

    def abandon(self) -> None:
        """Close without syncing: the memory is deleted. Writers still waiting get NotFound."""
        self._shut("deleted")

    def _shut(self, why: str) -> None:
        with self._cond:
            while self._flushing:
                self._cond.wait()
            if self._closed is None:
                self._closed = why
                os.close(self._fd)
            self._cond.notify_all()

    def _check_open(self, sequence: int | None = None) -> None:
        """Called holding the condition: raise if this log takes no more writes (or cannot make ``sequence``
        durable)."""
        if self._closed == "deleted" and (sequence is None or self._synced < sequence):
            raise NotFound("the memory was deleted before this write was made durable")
        if self.failure is not None:
            raise Unavailable(f"write-ahead log failed: {self.failure}; this write is not durable")
        if self._closed is not None and (sequence is None or self._synced < sequence):
            raise Unavailable("the write-ahead log is closed (the server is shutting down)")

    def _start_segment(self, first_sequence: int) -> None:
        """Called holding the condition, under the memory's lock: sync and close the current segment, open
        the next. If the new one cannot be made, the old one goes on (a snapshot's rotation is only a wish)."""
        while self._flushing:
            self._cond.wait()
        try:
            os.fsync(self._fd)
        except OSError as exc:
            self._fail(exc)
            raise storage_error(exc, "the write-ahead log could not be synced; this write was not applied") from None
        self._synced = self._written
        try:
            fd = create_segment(self.directory, first_sequence)
        except OSError as exc:
            # Recovery reads a segment's name as its first record: a half-made segment left behind would hide
            # the records that now go on into the current one. Removed, the rotation is only put off.
            try:
                remove_durably(segment_path(self.directory, first_sequence))
            except OSError as cleanup:
                self._fail(cleanup)
                raise storage_error(
                    cleanup,
                    "a log segment that could not be made could not be removed either; this write was not applied",
                ) from None
            log.warning("write-ahead log in %s: no new segment (%s); the current one goes on", self.directory, exc)
            return
        os.close(self._fd)
        self._fd, self._end = fd, len(WAL_MAGIC)
        self._rotate = False

    def _cut_back(self, error: OSError) -> None:
        """A record was written in part: cut the segment back to its last whole record, or fail the log."""
        try:
            os.ftruncate(self._fd, self._end)
        except OSError as exc:
            self._fail(exc)
            return
        log.error("write-ahead log in %s refused a write: %s", self.directory, error)

    def fail(self, error: Exception) -> None:
        """Take no more writes: the log no longer matches the memory (or its folder may not last)."""
        with self._cond:
            self._fail(error)

    def _fail(self, error: Exception) -> None:
        self.failure = error
        log.error("write-ahead log in %s failed: %s", self.directory, error)
        self._cond.notify_all()

    def _fsync(self) -> None:
        """Leader: fsync with the condition released; called and returns holding it."""
        self._flushing = True
        target = self._written
        self._cond.release()
        error = None
        try:
            started = time.perf_counter()
            os.fsync(self._fd)
            FSYNC_SECONDS.observe(time.perf_counter() - started)
        except OSError as exc:
            error = exc
        finally:
            self._cond.acquire()
        self._flushing = False
        if error is not None:
            self._fail(error)
        else:
            self._synced = max(self._synced, target)
        self._cond.notify_all()

    def _sync_periodically(self) -> None:
        with self._cond:
            while self._closed is None:
                self._cond.wait(self.durability.sync_interval)
                if (
                    self._closed is None
                    and not self._flushing
                    and self.failure is None
                    and self._synced < self._written
                ):
                    self._fsync()


def create_segment(directory: Path, first_sequence: int) -> int:
    """A new, empty log segment (just its magic, synced, as is its folder entry); returns its open fd."""
    fd = os.open(segment_path(directory, first_sequence), os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644)
    try:
        _write_all(fd, WAL_MAGIC)
        os.fsync(fd)
        fsync_directory(directory)
    except BaseException:
        os.close(fd)
        raise
    return fd


def remove_durably(path: Path) -> None:
    """Remove a file if it is there, and sync its folder so that it stays removed after a crash."""
    path.unlink(missing_ok=True)
    fsync_directory(path.parent)


def storage_error(error: OSError, what: str) -> MemoryServiceError:
    """The status for a failed file operation: a full disk is RESOURCE_EXHAUSTED, anything else UNAVAILABLE."""
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return ResourceExhausted(f"disk full: {what} ({error})")
    return Unavailable(f"{what} ({error})")


# ---------------------------------------------------------- data directory


@dataclass
class Recovered:
    """What recovery brought back of one memory, for the log and the server's report."""

    name: str
    memory: Memory | None
    snapshot_sequence: int = 0
    replayed: int = 0
    truncated: str | None = None  # an unfinished last record cut from the log's tail
    damaged: list[str] = dataclasses.field(default_factory=list)  # damaged files found, and where they were put
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
        """Give a new memory (empty, or imported with state) its folder and journal; on failure nothing is left."""
        folder = self.memories_dir / name
        staging = self.memories_dir / f".creating-{name}-{uuid.uuid4().hex}"
        renamed = False
        try:
            staging.mkdir()
            write_atomically(staging / "config.json", [json.dumps(dataclasses.asdict(memory.config)).encode()])
            if memory.commit_sequence:
                state = memory.capture(streamed=True)
                write_atomically(staging / _snapshot_name(state.commit_sequence), snapshot_chunks(state))
            os.close(create_segment(staging, memory.commit_sequence + 1))
            os.rename(staging, folder)
            renamed = True
            fsync_directory(self.memories_dir)
            memory.journal = WriteAheadLog(folder, memory.commit_sequence + 1, self.durability, existing=True)
        except OSError as exc:
            self._discard(folder if renamed else staging)
            raise storage_error(exc, f"memory {name!r} could not be created; nothing was") from None
        except BaseException:
            self._discard(folder if renamed else staging)
            raise
        self._snapshot_times[name] = time.monotonic()

    def delete(self, name: str, memory: Memory | None) -> None:
        """Delete a memory's folder; a live ``memory`` first finishes the calls in progress and then answers
        NotFound (Memory.retire). The synced rename is the delete: a failure before it changes nothing."""
        # Not during a snapshot of it: that would write the old memory's state into a new one of the same name.
        with self._snapshot_lock:
            if memory is None:
                self._remove_folder(name, None)
            else:
                memory.retire(lambda: self._remove_folder(name, memory))

    def _remove_folder(self, name: str, memory: Memory | None) -> None:
        folder = self.memories_dir / name
        trash = self.memories_dir / f".deleted-{name}-{uuid.uuid4().hex}"
        try:
            os.rename(folder, trash)
        except OSError as exc:
            raise storage_error(exc, f"memory {name!r} could not be deleted; it is unchanged") from None
        try:
            fsync_directory(self.memories_dir)
        except OSError as exc:
            os.rename(trash, folder)
            try:
                fsync_directory(self.memories_dir)  # or a crash could leave the folder where a start removes it
            except OSError as undo:
                if memory is not None and isinstance(memory.journal, WriteAheadLog):
                    memory.journal.fail(undo)  # nothing more is acknowledged that a start might remove
                raise storage_error(
                    undo, f"memory {name!r} could not be deleted, and undoing that could not be made durable"
                ) from None
            raise storage_error(exc, f"memory {name!r} could not be deleted; it is unchanged") from None
        if memory is not None and isinstance(memory.journal, WriteAheadLog):
            memory.journal.abandon()
        self._snapshot_times.pop(name, None)
        self._discard(trash)

    def _discard(self, path: Path) -> None:
        """Remove a folder that no longer counts; what cannot be removed now is removed at the next start."""
        try:
            if path.name.startswith("."):
                shutil.rmtree(path)
            elif path.exists():
                hidden = path.with_name(f".deleted-{path.name}-{uuid.uuid4().hex}")
                os.rename(path, hidden)
                shutil.rmtree(hidden)
        except OSError as exc:
            log.warning("could not remove %s now (%s); it is removed at the next start", path, exc)

    def recover(
        self, fallback_device: str | None = None, max_batch: int = DEFAULT_MAX_BATCH, index_builder=None
    ) -> list[Recovered]:
        """Bring back every memory in the directory: newest valid snapshot, then its log. A memory whose
        device this host does not have goes to ``fallback_device`` (``lmem serve --device``), if given. A
        memory that cannot be brought back, for whatever reason, is reported and the others still are.
        ``index_builder(name, config)``: how a memory builds its index (MemoryRegistry.index_builder)."""
        for leftover in self.memories_dir.glob(".*"):  # half-made creates, half-done deletes
            shutil.rmtree(leftover, ignore_errors=True)
        results = []
        for folder in sorted(p for p in self.memories_dir.iterdir() if p.is_dir()):
            try:
                results.append(self._recover(folder, fallback_device, max_batch, index_builder))
            except Exception as exc:  # noqa: BLE001 - one memory's failure, of any kind, must not stop the others
                error = str(exc) if isinstance(exc, RecoveryError) else f"{type(exc).__name__}: {exc}"
                log.error("memory %r could not be recovered from %s: %s", folder.name, folder, error)
                results.append(Recovered(folder.name, None, error=error))
        return results

    def _recover(self, folder: Path, fallback_device: str | None, max_batch: int, index_builder) -> Recovered:
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
        damaged: list[str] = []
        state = self._newest_usable_snapshot(folder, config, damaged)
        builder = index_builder(folder.name, config) if index_builder is not None else None
        memory = Memory(config, state, max_batch=max_batch, index_builder=builder)
        result = Recovered(folder.name, memory, snapshot_sequence=memory.commit_sequence, damaged=damaged)
        # A segment too short for a record holds none, so its name says nothing of what its predecessor holds
        # (left by a failed rotation, which earlier versions did not remove): set aside after replay.
        found, record_less = [], []
        for first, path in segments(folder):
            (record_less if path.stat().st_size <= len(WAL_MAGIC) else found).append((first, path))
        # Only the log after the state counts: a segment whose successor starts at or before the next write
        # holds nothing the state lacks, whatever its condition.
        needed = [
            (first, path)
            for i, (first, path) in enumerate(found)
            if i + 1 == len(found) or found[i + 1][0] > memory.commit_sequence + 1
        ]
        # Where the log starts; with no record after the state, the newest segment's name says where it would.
        start = needed[0][0] if needed else (record_less[-1][0] if record_less else None)
        if (start is not None and start > memory.commit_sequence + 1) or (damaged and start is None):
            raise RecoveryError(
                f"no usable snapshot reaches the log, which starts at write {start}; the newest usable state is "
                f"at {memory.commit_sequence}: writes in between are lost"
            )
        for i, (_, path) in enumerate(needed):
            scan = scan_segment(path)
            problem, offset = scan.problem, scan.valid_bytes
            for sequence, record_offset, delta in scan.records:
                if sequence <= memory.commit_sequence:
                    continue
                if sequence != memory.commit_sequence + 1:
                    problem, offset = f"record {sequence} does not follow write {memory.commit_sequence}", record_offset
                    break
                memory.replay(sequence, delta)
                result.replayed += 1
            if problem is None:
                continue
            later = [p for _, p in needed[i + 1 :]]
            if scan.torn and offset == scan.valid_bytes and not later:
                # An unfinished last append: a write that was never acknowledged (under --sync always).
                result.truncated = f"{path.name}: {problem}; cut {path.stat().st_size - offset} bytes"
                _truncate(path, offset)
                log.warning("memory %r: unfinished write-ahead log tail: %s", folder.name, result.truncated)
            else:
                where = self._keep_aside(folder, path, copy=True)
                found_before = len(damaged)
                damaged.append(
                    f"{path.name} at byte {offset}: {problem}; replay stopped at write "
                    f"{memory.commit_sequence}; the file is kept in {where}"
                )
                _truncate(path, offset)  # the good records before the damage stay where recovery reads them
                for later_path in later:
                    damaged.append(
                        f"{later_path.name} follows the damage; kept in {self._keep_aside(folder, later_path)}"
                    )
                log.error("memory %r: damaged write-ahead log: %s", folder.name, "; ".join(damaged[found_before:]))
            break
        for first, path in record_less:
            if first != memory.commit_sequence + 1 and path.exists():  # the next write's segment is made anew
                damaged.append(f"{path.name} holds no record; kept in {self._keep_aside(folder, path)}")
        if damaged:  # acknowledged writes after the damage are gone: the writes from here on are another history
            memory.incarnation = new_incarnation()
        memory.journal = WriteAheadLog(folder, memory.commit_sequence + 1, self.durability)
        memory.recovery_report = "; ".join(filter(None, [result.truncated, *damaged]))
        self._snapshot_times[folder.name] = time.monotonic()
        log.info(
            "memory %r recovered: snapshot at %d, %d writes replayed, now at %d",
            folder.name,
            result.snapshot_sequence,
            result.replayed,
            memory.commit_sequence,
        )
        return result

    def _newest_usable_snapshot(self, folder: Path, config: MemoryConfig, damaged: list[str]) -> MemoryState | None:
        """The newest snapshot that reads back whole and holds this memory; the others tried are kept aside."""
        for path in sorted(folder.glob("snapshot-*.lmem"), reverse=True):
            try:
                state = read_snapshot_file(path)
                if (state.config.key_dim, state.config.memory_size) != (config.key_dim, config.memory_size):
                    raise SnapshotError(
                        f"it holds a memory of key_dim {state.config.key_dim} and memory_size "
                        f"{state.config.memory_size}; config.json says {config.key_dim} and {config.memory_size}"
                    )
                return state
            except (SnapshotError, OSError) as exc:
                where = self._keep_aside(folder, path)
                damaged.append(f"{path.name}: {exc}; kept in {where}")
                log.error(
                    "memory %r: snapshot %s is unusable (%s); kept in %s, trying an older one",
                    folder.name,
                    path.name,
                    exc,
                    where,
                )
        return None

    @staticmethod
    def _keep_aside(folder: Path, path: Path, copy: bool = False) -> Path:
        """Move (or copy) a damaged file into the memory's damaged/ folder, where recovery no longer reads it."""
        aside = folder / "damaged"
        aside.mkdir(exist_ok=True)
        target = aside / f"{path.name}.{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}"
        if copy:
            shutil.copyfile(path, target)
            with open(target, "rb") as kept:  # whole on disk before recovery cuts the original
                os.fsync(kept.fileno())
        else:
            os.rename(path, target)
        fsync_directory(aside)
        fsync_directory(folder)
        return target.relative_to(folder)

    def snapshot(self, name: str, memory: Memory) -> tuple[int, Path, int]:
        """Write a snapshot now; drop the snapshots and log segments it makes redundant.
        Returns (commit sequence, path, bytes)."""
        with self._snapshot_lock:
            journal = memory.journal
            state = memory.capture(streamed=True)
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


def _truncate(path: Path, size: int) -> None:
    with open(path, "r+b") as f:
        f.truncate(size)
        os.fsync(f.fileno())


def _snapshot_name(sequence: int) -> str:
    return f"snapshot-{sequence:020d}.lmem"
