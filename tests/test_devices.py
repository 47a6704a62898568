"""The GPU path, checked on a CPU host: device names, placement of shards on several devices, per-device
budgets, out-of-memory, a GPU server's files restored here, and the age noise every device draws alike.

A host with CUDA is faked where only the question "has this host that device?" matters (torch.cuda's
is_available, device_count and mem_get_info); nothing here allocates on a GPU.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from reference_memory import age_noise as reference_age_noise

from lifelong_memory.server import index as index_module
from lifelong_memory.server import memory as memory_module
from lifelong_memory.server import registry as registry_module
from lifelong_memory.server.devices import check_usable, score_buffer_bytes
from lifelong_memory.server.errors import FailedPrecondition, InvalidArgument, ResourceExhausted
from lifelong_memory.server.index import TorchFlatIndex, build_index, score_rows
from lifelong_memory.server.memory import Memory, MemoryConfig, age_noise
from lifelong_memory.server.persistence import DataDirectory, read_snapshot_file, snapshot_chunks, write_atomically
from lifelong_memory.server.registry import MemoryRegistry

GIB = 1 << 30
LMEM = [sys.executable, "-m", "lifelong_memory.client.cli"]
SMALL = dict(key_dim=8, memory_size=48, choose_k=4, age_noise=2.0, seed=3)


def unit_rows(n: int, dim: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.randn(n, dim, generator=torch.Generator().manual_seed(seed)), dim=1)


def fill(memory, steps: int = 6, batch: int = 8) -> None:
    for step in range(steps):
        memory.query(unit_rows(batch, seed=step), torch.arange(batch) % 5 + step, update=True)


def everything(memory: Memory) -> dict:
    state = memory.capture()
    return {
        **{name: getattr(state, name).clone() for name in ("keys", "values", "ages", "generations")},
        "recent": dict(memory.recent),
        "commit_sequence": memory.commit_sequence,
        "counters": dict(memory.counters),
        "empty_slots": memory.empty_slots,
    }


def assert_unchanged(before: dict, after: dict) -> None:
    assert before.keys() == after.keys()
    for name, value in before.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, after[name]), name
        else:
            assert value == after[name], name


@pytest.fixture
def cuda_host(monkeypatch):
    """torch.cuda as a host with ``gpus`` GPUs of ``total`` bytes, ``free`` of them free, would answer."""

    def fake(gpus: int = 1, free: int = 8 * GIB, total: int = 16 * GIB):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, total))

    return fake


# ------------------------------------------------------------------ device names


@pytest.mark.parametrize(
    "given, canonical", [("cuda", "cuda:0"), ("cuda:2", "cuda:2"), ("cpu:0", "cpu"), ("cpu", "cpu")]
)
def test_device_names_are_canonical(given, canonical):
    config = MemoryConfig(device=given, devices=(given,)).validated()
    assert config.device == canonical and config.devices == (canonical,)


@pytest.mark.parametrize(
    "config, field",
    [
        ({"device": "cpu:99"}, "config.device"),
        ({"device": "tpu:0"}, "config.device"),
        ({"device": "cuda:x"}, "config.device"),
        ({"device": 0}, "config.device"),
        ({"shards": 2, "devices": ("cpu", "cuda:-1")}, "config.devices[1]"),
        ({"shards": 2, "devices": "cpu"}, "config.devices"),
        ({"shards": 1, "devices": ("cpu", "cpu")}, "config.devices"),
        ({"backend": "faiss", "shards": 2, "devices": ("cpu", "cuda:1")}, "config.backend"),
        ({"backend": "lsh", "shards": 2, "devices": ("cpu", "cuda:1")}, "config.backend"),
        ({"backend": "faiss-ivf", "device": "cuda:0"}, "config.backend"),
    ],
)
def test_bad_device_names_are_refused_naming_the_field(config, field):
    with pytest.raises(InvalidArgument) as caught:
        MemoryConfig(**config).validated()
    assert caught.value.field == field


def test_a_device_this_host_lacks_is_refused_where_the_memory_is_placed(store):
    # Parsing a cuda config works anywhere (a GPU server's file on this host); placing it does not.
    assert MemoryConfig(device="cuda:0").validated().device == "cuda:0"
    with pytest.raises(InvalidArgument) as caught:
        store.create_memory("on-gpu", **SMALL, device="cuda:0")
    assert caught.value.field == "config.device" and "CUDA is not available" in str(caught.value)
    with pytest.raises(InvalidArgument) as caught:
        store.create_memory("on-gpus", **SMALL, shards=2, devices=["cpu", "cuda:1"])
    assert caught.value.field == "config.devices[1]"
    assert "on-gpu" not in {info.name for info in store.list_memories()}


def test_a_gpu_index_beyond_the_host_s_count_is_refused(cuda_host):
    cuda_host(gpus=1)
    check_usable("cuda:0")
    with pytest.raises(InvalidArgument, match=r"config.device: cuda:3 requested but this host has 1 CUDA device"):
        MemoryConfig(device="cuda:3").validated().check_usable()


# ------------------------------------------------------------------ shards on several devices


@pytest.mark.parametrize(
    "shards, devices, placed",
    [
        (4, ("cuda:0", "cuda:1"), ["cuda:0", "cuda:0", "cuda:1", "cuda:1"]),
        (3, ("cuda:0", "cuda:1"), ["cuda:0", "cuda:0", "cuda:1"]),
        (3, ("cuda:1", "cpu", "cuda:0"), ["cuda:1", "cpu", "cuda:0"]),
        (2, (), ["cpu", "cpu"]),
    ],
)
def test_shards_go_to_their_devices_in_consecutive_blocks(shards, devices, placed):
    assert MemoryConfig(memory_size=48, shards=shards, devices=devices).validated().shard_devices() == placed


def test_a_memory_over_two_devices_is_the_memory_on_one():
    """The same writes into one shard and into four shards on two (CPU) devices: the same memory."""
    one = Memory(MemoryConfig(**SMALL))
    two = Memory(MemoryConfig(**SMALL, shards=4, devices=("cpu", "cpu")))
    fill(one)
    fill(two)
    queries = unit_rows(5, seed=99)
    a, b = one.query(queries, torch.arange(5)), two.query(queries, torch.arange(5))
    assert torch.equal(a.neighbor_slots, b.neighbor_slots) and torch.equal(a.predictions, b.predictions)
    for name in ("keys", "values", "ages", "generations"):
        assert torch.equal(getattr(one.capture(), name), getattr(two.capture(), name)), name


def test_a_shard_with_its_own_copy_of_the_keys_follows_every_write():
    """Stand-ins for shards on other devices: each holds its own copy of its slot range (as a shard on
    another GPU does), is updated on every write and searches like views of the memory's keys."""
    keys = torch.zeros(48, 8)
    views = build_index(
        keys, MemoryConfig(memory_size=len(keys), key_dim=keys.shape[1], shards=3).validated(), max_batch=16
    )
    bounds = views.bounds
    copies = index_module.ShardedIndex(
        [
            TorchFlatIndex(keys[a:b].clone(), a, torch.float32, rows=4, owns_keys=True)
            for a, b in zip(bounds[:-1], bounds[1:], strict=True)
        ],
        bounds,
        keys.device,
    )
    assert not any(shard.owns_keys for shard in views.shards)
    for step in range(5):
        slots = torch.randperm(48, generator=torch.Generator().manual_seed(step))[:10]
        rows = unit_rows(10, seed=step)
        keys[slots] = rows
        views.update(slots, rows)
        copies.update(slots, rows)
    queries = unit_rows(9, seed=7)  # more rows than the copies' 4-row score buffers: searched in chunks
    assert torch.equal(views.search(queries, 6)[1], copies.search(queries, 6)[1])
    for shard, a, b in zip(copies.shards, bounds[:-1], bounds[1:], strict=True):
        assert torch.equal(shard.keys, keys[a:b])


# ------------------------------------------------------------------ budgets per device


def test_score_buffers_are_sized_per_device(cuda_host):
    cuda_host(total=141 * GIB)
    ten_million = 10 * 1024 * 1024
    assert score_rows(ten_million, 4, "cpu", 4096) == 25  # the CPU's 1 GiB, tuned for its caches
    assert score_rows(ten_million, 4, "cuda:0", 4096) == 112  # 1/32 of an H200
    assert score_rows(1000, 4, "cuda:0", 4096) == 4096  # a whole batch where it fits
    assert score_buffer_bytes("cuda:0") == 141 * GIB // 32


def test_each_device_has_its_own_budget(cuda_host):
    cuda_host(gpus=2, free=2 * GIB, total=16 * GIB)
    registry = MemoryRegistry(memory_budget_bytes=64 * GIB, max_batch=16)
    with pytest.raises(ResourceExhausted) as caught:  # 3 GiB of keys on a GPU with 2 GiB free
        registry.create("big", key_dim=256, memory_size=3 * GIB // 1024, device="cuda:1")
    assert "config.memory_size" in str(caught.value) and "on cuda:1" in str(caught.value)
    assert f"({int(0.9 * 2 * GIB):,} bytes) memory budget" in str(caught.value)  # 90% of what the device had free
    footprint = MemoryConfig(memory_size=4096, shards=4, devices=("cuda:0", "cuda:1")).validated().footprint(16)
    assert sorted(footprint) == ["cpu", "cuda:0", "cuda:1"]  # the slots at home, a copy and scores per GPU
    assert footprint["cuda:0"] == footprint["cuda:1"] == 2 * 1024 * 128 * 4 + 2 * 16 * 1024 * 4
    assert registry.list() == []


def test_a_gpu_memory_counts_what_its_cuda_graphs_keep(cuda_host):
    cuda_host(gpus=1, free=8 * GIB, total=16 * GIB)
    config = MemoryConfig(memory_size=4096, choose_k=64, device="cuda:0").validated()
    slots = 4096 * (128 * 4 + memory_module.DEVICE_SLOT_BYTES)
    scores = 16 * 4096 * 4
    graphs = memory_module.MAX_GRAPHED_READS * 16 * 64 * memory_module.QUERY_BYTES_PER_NEIGHBOR
    assert config.footprint(16)["cuda:0"] == slots + scores + graphs
    elsewhere = MemoryConfig(memory_size=4096, choose_k=64, device="cuda:0", shards=2, devices=("cuda:0", "cpu"))
    # reads eagerly (a shard is on another device): the slots and its shard's scores only
    assert elsewhere.validated().footprint(16)["cuda:0"] == slots + 16 * 2048 * 4


def test_a_shape_is_captured_as_a_cuda_graph_only_once_it_recurs():
    cache, captured = memory_module._GraphCache(), []

    def read(shape):
        return cache.get(shape, lambda: captured.append(shape) or f"graph {shape}")

    after = memory_module.GRAPH_AFTER_READS
    assert [read(16) for _ in range(after + 2)] == [None] * (after - 1) + ["graph 16"] * 3  # a trainer's fixed batch
    assert captured == [16]
    assert all(read(shape) is None for shape in range(1000, 1000 + 1000))  # a new row count at every call
    assert captured == [16] and read(16) == "graph 16"  # unseen shapes neither capture nor drop a graph
    for shape in (1, 2, 3, 4):  # four more recurring shapes: the least recently used graph, 16's, is dropped
        for _ in range(after):
            read(shape)
    assert captured == [16, 1, 2, 3, 4]
    assert [read(16) for _ in range(after)] == [None] * (after - 1) + ["graph 16"]  # counted again from its drop
    assert captured == [16, 1, 2, 3, 4, 16]
    read(5), read(5)  # two reads, then as many other shapes as are counted: the count is forgotten
    for shape in range(3000, 3000 + memory_module.SHAPES_COUNTED):
        read(shape)
    assert read(5) is None and captured[-1] == 16


def test_score_buffers_are_allocated_up_front():
    memory = Memory(MemoryConfig(**SMALL, shards=2), max_batch=32)
    assert [len(shard._scores) for shard in memory.index.shards] == [32, 32]


# ------------------------------------------------------------------ out of memory


# What torch raises when an allocation fails: its caching allocator's error, and a CUDA call's
# cudaErrorMemoryAllocation (an H200 whose memory another process held raised this one at a server's first use).
OUT_OF_MEMORY = {
    "allocator": lambda: torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"),
    "cuda-call": lambda: torch.AcceleratorError("CUDA error: out of memory\nSearch for `cudaErrorMemoryAllocation'"),
}


def raising(kind: str):
    def fail(*args, **kwargs):
        raise OUT_OF_MEMORY[kind]()

    return fail


out_of_memory = raising("allocator")


@pytest.mark.parametrize("kind", sorted(OUT_OF_MEMORY))
@pytest.mark.parametrize("where", ["search", "oldest", "noise"])
def test_out_of_memory_in_a_step_is_resource_exhausted_and_changes_nothing(monkeypatch, where, kind):
    memory = Memory(MemoryConfig(**SMALL, shards=2))
    fill(memory)
    before = everything(memory)
    targets = {
        "search": (torch, "mm"),
        "oldest": (memory_module, "_descending_then_lower_slot"),
        "noise": (memory_module, "age_noise"),
    }
    monkeypatch.setattr(*targets[where], raising(kind))
    with pytest.raises(ResourceExhausted, match="out of memory on cpu in query"):
        memory.query(unit_rows(4, seed=50), torch.arange(4), update=True)
    assert_unchanged(before, everything(memory))
    monkeypatch.undo()
    memory.query(unit_rows(4, seed=50), torch.arange(4), update=True)  # and it goes on
    assert memory.commit_sequence == before["commit_sequence"] + 1


def test_out_of_memory_over_grpc_is_resource_exhausted(monkeypatch, server_url):
    from lifelong_memory.client import connect

    with connect(server_url) as store:
        memory = store.create_memory("oom", **SMALL)
        try:
            fill(memory)
            keys, values, ages = memory.slots(range(48))
            monkeypatch.setattr(torch, "mm", out_of_memory)
            with pytest.raises(ResourceExhausted, match="out of memory"):
                memory.query(unit_rows(4, seed=50), torch.arange(4), update=True)
            monkeypatch.undo()
            after = memory.slots(range(48))
            assert all(torch.equal(x, y) for x, y in zip((keys, values, ages), after, strict=True))
        finally:
            store.delete_memory("oom")


def test_another_cuda_error_is_not_taken_for_out_of_memory(monkeypatch):
    memory = Memory(MemoryConfig(**SMALL))
    fill(memory)

    def illegal_access(*args, **kwargs):
        raise torch.AcceleratorError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(torch, "mm", illegal_access)
    with pytest.raises(torch.AcceleratorError):
        memory.query(unit_rows(4, seed=50), torch.arange(4), update=True)


@pytest.mark.parametrize("kind", sorted(OUT_OF_MEMORY))
def test_out_of_memory_placing_a_memory_is_resource_exhausted_and_creates_nothing(monkeypatch, cuda_host, kind):
    # A GPU's first use (its budget asks the driver what is free) or the memory's own allocations.
    registry = MemoryRegistry()
    cuda_host(gpus=1)
    monkeypatch.setattr(registry_module, "memory_available", raising(kind))
    with pytest.raises(ResourceExhausted, match=r"config.device: out of memory placing 'first' on \['cuda:0'\]"):
        registry.create("first", **SMALL, device="cuda:0")
    monkeypatch.undo()
    monkeypatch.setattr(index_module.torch, "empty", raising(kind))
    with pytest.raises(ResourceExhausted, match=r"config.memory_size: cannot allocate"):
        registry.create("second", **SMALL)
    monkeypatch.undo()
    assert registry.list() == []
    registry.create("first", **SMALL)  # and the name is free


def test_a_failed_allocation_at_create_is_resource_exhausted(monkeypatch):
    monkeypatch.setattr(index_module.torch, "empty", out_of_memory)  # the score buffers
    with pytest.raises(ResourceExhausted) as caught:
        Memory(MemoryConfig(**SMALL))
    assert "config.memory_size" in str(caught.value)


# ------------------------------------------------------------------ a GPU server's files on this host


def as_if_written_on_a_gpu(state, path):
    """The snapshot a server with this memory on cuda:0 would have written."""
    state = dataclasses.replace(state, config=dataclasses.replace(state.config, device="cuda:0"))
    write_atomically(path, snapshot_chunks(state))
    return path


def test_a_gpu_snapshot_imports_here_with_a_device_override(store, tmp_path):
    source = Memory(MemoryConfig(**SMALL))
    fill(source)
    path = as_if_written_on_a_gpu(source.capture(), tmp_path / "gpu.lmem")
    assert read_snapshot_file(path).config.device == "cuda:0"  # parsed, not placed
    with pytest.raises(InvalidArgument) as caught:
        store.import_memory("as-written", path)
    assert caught.value.field == "config.device"
    imported = store.import_memory("on-cpu", path, device="cpu")
    assert imported.config.device == "cpu"
    keys, values, ages = imported.slots(range(48))
    assert torch.equal(keys, source.keys) and torch.equal(values, source.values) and torch.equal(ages, source.ages)
    # And it goes on exactly as the source does: the noise needs no generator state.
    queries = unit_rows(8, seed=77)
    assert torch.equal(
        imported.query(queries, torch.arange(8), update=True).written_slots,
        source.query(queries, torch.arange(8), update=True).written_slots,
    )


def gpu_data_directory(root):
    """A data directory as a GPU server leaves it: a memory on cuda:0 with a snapshot and a log."""
    registry = MemoryRegistry(data_dir=root)
    memory = registry.create("m", **SMALL)
    fill(memory, steps=3)
    registry.snapshot("m")
    fill(memory, steps=2)  # in the log only
    expected = everything(memory)
    memory.journal.close()
    registry.storage.close()
    folder = root / "memories" / "m"
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "device": "cuda:0"}))
    for snapshot in folder.glob("snapshot-*.lmem"):
        as_if_written_on_a_gpu(read_snapshot_file(snapshot), snapshot)
    return expected


def test_a_gpu_data_directory_recovers_here_on_the_server_s_device(tmp_path):
    expected = gpu_data_directory(tmp_path)
    registry = MemoryRegistry(data_dir=tmp_path)  # no --device: not recovered, and says why
    with pytest.raises(FailedPrecondition, match=r"cuda:0 requested but CUDA is not available.*--device"):
        registry.get("m")
    registry.storage.close()
    registry = MemoryRegistry({"device": "cpu"}, data_dir=tmp_path)  # lmem serve --device cpu
    recovered = registry.get("m")
    assert recovered.config.device == "cpu"
    got = everything(recovered)
    got["counters"]["queries"] = expected["counters"]["queries"]  # query counts live in snapshots only
    assert_unchanged(expected, got)
    registry.close()


def test_recovery_places_nothing_elsewhere_that_this_host_can_hold(tmp_path):
    registry = MemoryRegistry(data_dir=tmp_path)
    registry.create("m", **SMALL)
    registry.close()
    directory = DataDirectory(tmp_path)
    (recovered,) = directory.recover(fallback_device="cuda:0")
    assert recovered.memory.config.device == "cpu"
    directory.close()


# ------------------------------------------------------------------ lmem serve checks its devices at start


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--device", "cuda:0"], "--device: cuda:0 requested but CUDA is not available"),
        (["--device", "cpu:99"], "--device: 'cpu:99': the CPU is one device"),
        (["--shards", "2", "--devices", "cpu,cuda:1"], "--devices: cuda:1 requested but CUDA is not available"),
    ],
)
def test_serve_refuses_a_device_it_cannot_use(flags, message):
    result = subprocess.run([*LMEM, "serve", "--port", "0", *flags], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "serving on" not in result.stdout
    assert f"lmem serve: cannot serve: {message}" in result.stderr


# ------------------------------------------------------------------ one faiss


def test_two_faiss_distributions_are_refused(monkeypatch, store):
    monkeypatch.setattr(index_module, "installed_faiss_distributions", lambda: ["faiss-cpu", "faiss-gpu-cu12"])
    with pytest.raises(FailedPrecondition, match="faiss-cpu and faiss-gpu-cu12 are both installed"):
        Memory(MemoryConfig(**SMALL, backend="faiss"))
    from lifelong_memory.client.cli import check_serving_devices

    with pytest.raises(FailedPrecondition, match="never both"):
        check_serving_devices({})


def test_this_environment_has_exactly_one_faiss():
    assert index_module.installed_faiss_distributions() == ["faiss-cpu"]


# ------------------------------------------------------------------ the noise every device draws alike


@pytest.mark.parametrize("seed, commit", [(0, 1), (3, 17), (2**63 - 1, 2**40 + 5), (123456789, 1)])
def test_the_noise_is_the_spec_s_hash(seed, commit):
    slots = np.arange(5000)
    got = age_noise(seed, commit, slots, 8.0)
    want = reference_age_noise(seed, commit, 5000, 8.0)
    np.testing.assert_array_equal(got, want)
    assert got.dtype == np.float32 and -8.0 <= got.min() and got.max() <= 8.0 and len(np.unique(got)) > 4900


def test_the_noise_of_a_slot_does_not_depend_on_which_slots_are_asked():
    everywhere = age_noise(5, 9, np.arange(1000), 2.0)
    some = np.array([999, 3, 512])
    np.testing.assert_array_equal(age_noise(5, 9, some, 2.0), everywhere[some])


# ------------------------------------------------------------------ the image's torch build, the extras


@pytest.mark.parametrize(
    "index, ok",
    [
        ("https://download.pytorch.org/whl/cpu", True),
        ("https://pypi.org/simple", True),  # names no build: not checked
        ("https://download.pytorch.org/whl/cu126", False),  # this CPU torch is not the CUDA 12.6 build
    ],
)
def test_the_image_build_refuses_a_torch_of_another_build(index, ok):
    if torch.version.cuda is not None:
        pytest.skip("written for this project's CPU torch")
    result = subprocess.run(
        ["sh", "docker/check-torch-build.sh", index],
        capture_output=True,
        text=True,
        env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin"},
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert (result.returncode == 0) == ok, result.stderr
    if not ok:
        assert "is the cpu build, but TORCH_INDEX_URL asks for cu126" in result.stderr


def test_faiss_comes_from_exactly_one_extra():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    project = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())["project"]

    def faiss_in(requirements):
        return [r for r in requirements if r.split(">")[0].split("=")[0] in index_module.FAISS_DISTRIBUTIONS]

    assert faiss_in(project["dependencies"]) == []
    extras = project["optional-dependencies"]
    assert len(faiss_in(extras["cpu"])) == 1 and len(faiss_in(extras["gpu"])) == 1
    assert faiss_in(extras["cpu"]) != faiss_in(extras["gpu"])
