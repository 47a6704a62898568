"""The GPU check: a memory on CUDA against the same memory on the CPU, served and restored, then the GPU table.

Run by benchmarks/gpu_check.sh on a machine with a GPU (it needs torch, numpy and the project's own
dependencies; faiss-gpu for the faiss rows):

    python benchmarks/gpu_check.py [--out FILE] [--steps 100] [--sizes 65536,1048576]
                                   [--table-sizes 1048576,10485760] [--table-batches 16,256]

1. Same numbers: for each of --sizes, a CPU memory and a CUDA memory with the same config and seed take the
   same stream of fused query + update steps (clustered unit queries, B = 16, age noise 8), starting empty and
   starting full (where a GPU memory reads through CUDA graphs). Every step's
   written slots, predictions and incorrect flags must be identical, and at the end values and ages
   identical and keys within 1e-5. Configs: torch on cuda:0; torch in 4 shards over every GPU of the machine.
   Similarities come from each device's own kernels, so a near-tie could in principle rank differently; any
   divergence is reported with its step.
2. Host synchronisations per fused call (torch.cuda.set_sync_debug_mode("warn")), memory half full and full.
3. Out of memory: a memory larger than the device's free memory is ResourceExhausted, not a crash.
   Varying batches: a full memory shaped as the translation trainer's (N = 16,384, d = 64, k = 16) takes fused
   calls of a new row count each time (500-1,200 rows, as a batch's target subwords): median ms per call with
   the capture of a shape on its GRAPH_AFTER_READS-th read, on its first (as before that rule), and never.
4. Served: `lmem serve --data-dir` in a subprocess with a memory on cuda:0: fused calls over the stream equal
   the embedded CPU memory's; the server is stopped and started again and the memory comes back from its
   snapshot and log, on cuda:0, holding the same slots; an export imported with device="cpu" holds them too.
5. The GPU table, per N in --table-sizes and B in --table-batches, keys N random unit vectors with distinct
   labels, queries noisy copies of stored keys (so the nearest key and the positive are well defined):
   median ms of synchronised calls of raw torch.topk(q @ K.T, 256) in float32 and bfloat16 (the anchors), the
   fused query + update of a torch float32 memory and a torch bfloat16 memory, a query of the float32 memory,
   with, against the float32 memory's answers to the same queries, recall@1 and the share of rows whose
   positive and negative slots are the same. Where faiss searches on this GPU (a small knn_gpu, run first in
   a child process, must equal torch.topk; else the report says why not): FAISS's GpuIndexIVFFlat searched as
   a library, with recall@1 against exact search, and what its remove_ids says (GPU IVF indexes cannot remove
   ids, which is why the faiss-ivf backend stays on the CPU).

Writes a JSON report (default benchmarks/results/gpu-check-HOST.json) after every section and exits 1 if a
check failed, 2 without CUDA.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import math
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from bench_memory import Server

from lifelong_memory.client import connect
from lifelong_memory.client.memory_file import entries_state
from lifelong_memory.server.errors import ResourceExhausted
from lifelong_memory.server.memory import GRAPH_AFTER_READS, Memory, MemoryConfig

KEY_DIM, CHOOSE_K, BATCH, LABELS = 128, 256, 16, 200
BATCH_WRITTEN = 256  # slots per commit in the table's full memories
IVF_PROBE_SHARE = 32  # nprobe = nlist / 32, the faiss-ivf backend's default


FAISS_PROBE = """
import faiss, faiss.contrib.torch_utils, torch
keys = torch.nn.functional.normalize(torch.randn(4096, 64, device="cuda:0"), dim=1)
queries = keys[:8] + 0.01
found = faiss.knn_gpu(faiss.StandardGpuResources(), queries, keys, 4, metric=faiss.METRIC_INNER_PRODUCT)[1]
assert torch.equal(found.cpu(), torch.topk(queries @ keys.T, 4).indices.cpu()), "knn_gpu differs from torch.topk"
"""


def faiss_gpus() -> tuple[object | None, str]:
    """(faiss, "") when faiss searches on the GPU here, else (None, why not). A small search runs in a child
    process first: a faiss whose CUDA libraries do not fit this machine can abort the process that loads it."""
    probe = subprocess.run([sys.executable, "-c", FAISS_PROBE], capture_output=True, text=True, timeout=300)
    if probe.returncode != 0:
        return None, f"faiss GPU search failed here (exit {probe.returncode}): {probe.stderr.strip()[-600:]}"
    import faiss
    import faiss.contrib.torch_utils  # noqa: F401 (faiss then takes torch tensors)

    return faiss, ""


def stream(steps: int, batch: int, seed: int):
    """Clustered unit queries, so that the memory merges as well as writes."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.nn.functional.normalize(torch.randn(LABELS, KEY_DIM, generator=generator), dim=1)
    for _ in range(steps):
        labels = torch.randint(0, LABELS, (batch,), generator=generator)
        noise = 0.3 * torch.randn(batch, KEY_DIM, generator=generator)
        yield torch.nn.functional.normalize(centres[labels] + noise, dim=1), labels


def compare(size: int, steps: int, gpu_config: dict, full: bool = False) -> dict:
    """``full``: both memories start full (each slot a clustered key of its own label, aged as 256-row commits
    leave them), where a GPU memory reads through its CUDA graphs; else empty."""
    config = dict(key_dim=KEY_DIM, memory_size=size, choose_k=CHOOSE_K, age_noise=8.0, seed=17)
    states = [None, None]
    if full:
        keys, labels = next(stream(1, size, seed=size + 1))
        states = [
            entries_state(MemoryConfig(**c).validated(), keys, labels, rows_per_commit=BATCH_WRITTEN)
            for c in (config, {**config, **gpu_config})
        ]
    cpu = Memory(MemoryConfig(**config), state=states[0], max_batch=BATCH)
    gpu = Memory(MemoryConfig(**config, **gpu_config), state=states[1], max_batch=BATCH)
    first_divergence = None
    for step, (queries, labels) in enumerate(stream(steps, BATCH, seed=size)):
        a = cpu.query(queries, labels, update=True, fields=frozenset())
        b = gpu.query(queries, labels, update=True, fields=frozenset())
        same = all(
            torch.equal(getattr(a, name).cpu(), getattr(b, name).cpu())
            for name in ("written_slots", "predictions", "incorrect")
        )
        if not same and first_divergence is None:
            first_divergence = step
    state_cpu, state_gpu = cpu.capture(), gpu.capture()
    keys_difference = float((state_cpu.keys - state_gpu.keys.cpu()).abs().max())
    values_equal = torch.equal(state_cpu.values, state_gpu.values.cpu())
    ages_equal = torch.equal(state_cpu.ages, state_gpu.ages.cpu())
    return {
        "size": size,
        "full": full,
        "gpu_config": gpu_config,
        "steps": steps,
        "first_divergent_step": first_divergence,
        "values_equal": values_equal,
        "ages_equal": ages_equal,
        "keys_max_difference": keys_difference,
        "writes": cpu.counters["writes"],
        "merges": cpu.counters["merges"],
        "pass": first_divergence is None and values_equal and ages_equal and keys_difference <= 1e-5,
    }


def host_synchronisations(size: int) -> dict:
    """Host synchronisations of one fused call, on a memory with empty slots and on a full one."""
    config = MemoryConfig(key_dim=KEY_DIM, memory_size=size, choose_k=CHOOSE_K, device="cuda:0").validated()
    keys = torch.nn.functional.normalize(torch.randn(size, KEY_DIM), dim=1)
    counts = {}
    for fill, entries in (("half_full", size // 2), ("full", size)):
        filled = torch.zeros_like(keys)
        filled[:entries] = keys[:entries]
        state = entries_state(config, filled, torch.arange(entries), rows_per_commit=BATCH_WRITTEN)
        memory = Memory(config, state=state)
        queries, labels = next(stream(1, BATCH, seed=1))
        for _ in range(GRAPH_AFTER_READS):  # warm: a full memory then replays its capture of this shape
            memory.query(queries, labels, update=True, fields=frozenset({"positive_negative_keys"}))
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                memory.query(queries, labels, update=True, fields=frozenset({"positive_negative_keys"}))
        finally:
            torch.cuda.set_sync_debug_mode("default")
        counts[fill] = sum("synchroniz" in str(w.message) for w in caught)
    return counts


def varying_batches(calls: int = 60) -> dict:
    """Median ms of a fused call whose row count changes every call, by when a shape is captured."""
    import lifelong_memory.server.memory as memory_module

    size, dim, k = 16384, 64, 16
    config = MemoryConfig(key_dim=dim, memory_size=size, choose_k=k, device="cuda:0").validated()
    generator = torch.Generator().manual_seed(3)
    keys = torch.nn.functional.normalize(torch.randn(size, dim, generator=generator), dim=1)
    batches = [int(b) for b in torch.randint(500, 1201, (calls,), generator=generator)]
    medians = {}
    for policy, after in (("third read", GRAPH_AFTER_READS), ("first read", 1), ("never", None)):
        memory_module.GRAPH_AFTER_READS = after or GRAPH_AFTER_READS
        memory = Memory(config, state=entries_state(config, keys, torch.arange(size), rows_per_commit=BATCH_WRITTEN))
        if after is None:
            memory._graphs = None
        times = []
        try:
            for batch in batches:
                picked = torch.randint(0, size, (batch,), generator=generator)
                queries = torch.nn.functional.normalize(keys[picked] + 0.1 * torch.randn(batch, dim), dim=1)
                torch.cuda.synchronize()
                start = time.perf_counter()
                memory.query(queries, picked, update=True, fields=frozenset({"positive_negative_keys"}))
                torch.cuda.synchronize()
                times.append((time.perf_counter() - start) * 1e3)
        finally:
            memory_module.GRAPH_AFTER_READS = GRAPH_AFTER_READS
        medians[policy] = round(statistics.median(times), 3)
    return {"calls": calls, "distinct_batches": len(set(batches)), "median_ms": medians}


def out_of_memory_is_resource_exhausted() -> dict:
    """A memory whose keys alone exceed what the device has free: the real CUDA out-of-memory error must
    come back as ResourceExhausted."""
    free, _total = torch.cuda.mem_get_info(0)
    slots = min(int(free // (KEY_DIM * 4)) + 1, 2**31)
    try:
        Memory(MemoryConfig(key_dim=KEY_DIM, memory_size=slots, choose_k=CHOOSE_K, device="cuda:0"))
    except ResourceExhausted as exc:
        return {"pass": True, "slots": slots, "error": str(exc)}
    finally:  # what the failed memory took stays in torch's cache, out of reach of the served check's server
        torch.cuda.empty_cache()
    return {"pass": False, "slots": slots, "error": "allocated"}


def served(size: int = 4096, steps: int = 40, device: str = "cuda:0") -> dict:
    """A memory on ``device`` behind `lmem serve --data-dir`: the same answers as an embedded CPU memory, and the
    same slots after a restart (snapshot + log) and after an export imported on the CPU."""
    config = dict(key_dim=KEY_DIM, memory_size=size, choose_k=CHOOSE_K, age_noise=8.0, seed=5)
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as data:
        return _served(size, steps, device, config, data)


def _served(size: int, steps: int, device: str, config: dict, data: str) -> dict:
    local = connect("local").create_memory("reference", **config)
    options = ["--data-dir", data]
    server = Server(max_batch=64, extra=options)
    try:
        store = connect(server.url)
        remote = store.create_memory("on-gpu", **config, device=device)
        divergent = None
        with remote.stream() as s:
            for step, (queries, labels) in enumerate(stream(steps, BATCH, seed=3)):
                a = local.query(queries, labels, update=True, fields={"positive_negative"})
                b = s.query(queries, labels, update=True, fields={"positive_negative"})
                same = all(
                    torch.equal(getattr(a, n), getattr(b, n))
                    for n in ("written_slots", "predictions", "positive_slots", "negative_slots")
                )
                if not same and divergent is None:
                    divergent = step
        remote.snapshot()
        for queries, labels in stream(5, BATCH, seed=4):  # after the snapshot: only in the log
            local.query(queries, labels, update=True)
            remote.query(queries, labels, update=True)
        before = remote.read_slots(range(size))
        exported = Path(data) / "on-gpu.lmem"
        store.export_memory("on-gpu", exported)
        store.close()
    finally:
        server.stop()
    expected = local.read_slots(range(size))
    server = Server(max_batch=64, extra=options)
    try:
        store = connect(server.url)
        restored = store.memory("on-gpu")
        after = restored.read_slots(range(size))
        device_after = restored.info().config.device
        on_cpu = store.import_memory("on-cpu", exported, device="cpu").read_slots(range(size))
        store.close()
    finally:
        server.stop()

    def same_slots(x, y) -> bool:
        return torch.equal(x.values, y.values) and torch.equal(x.ages, y.ages) and torch.allclose(x.keys, y.keys)

    result = {
        "first_divergent_step": divergent,
        "served_equals_embedded": same_slots(before, expected),
        "restart_restores": same_slots(after, before) and device_after == device,
        "device_after_restart": device_after,
        "export_imported_on_cpu": same_slots(on_cpu, before),
    }
    result["pass"] = divergent is None and all(
        result[k] for k in ("served_equals_embedded", "restart_restores", "export_imported_on_cpu")
    )
    return result


def median_ms(call, device: str, min_seconds: float = 1.0, min_reps: int = 10) -> float:
    synchronize = torch.cuda.synchronize if device.startswith("cuda") else lambda: None
    for _ in range(3):
        call()
    synchronize()
    times: list[float] = []
    while len(times) < min_reps or sum(times) < min_seconds * 1e3:
        start = time.perf_counter()
        call()
        synchronize()
        times.append((time.perf_counter() - start) * 1e3)
        if len(times) >= 1000:
            break
    return statistics.median(times)


def table(size: int, batches: list[int], faiss, device: str = "cuda:0", min_seconds: float = 1.0) -> list[dict]:
    """The rows of the GPU table at one N (module docstring, 5)."""
    generator = torch.Generator().manual_seed(size)
    keys = torch.nn.functional.normalize(torch.randn(size, KEY_DIM, generator=generator), dim=1)
    values = torch.arange(size)
    gpu_keys = keys.to(device)
    timed = functools.partial(median_ms, device=device, min_seconds=min_seconds)
    rows = []
    for batch in batches:
        picked = torch.randint(0, size, (batch,), generator=generator)
        queries = torch.nn.functional.normalize(keys[picked] + 0.05 * torch.randn(batch, KEY_DIM), dim=1)
        gpu_queries = queries.to(device)
        row = {"size": size, "batch": batch, "ms": {}, "recall_at_1": {}, "positive_negative_equal": {}}
        for dtype in (torch.float32, torch.bfloat16):
            q, k = gpu_queries.to(dtype), gpu_keys.to(dtype)
            row["ms"][f"raw topk {str(dtype)[6:]}"] = timed(lambda q=q, k=k: torch.topk(q @ k.T, CHOOSE_K))
            del k
        rows.append((row, picked, queries, gpu_queries))
    del gpu_keys
    fields = frozenset({"neighbors", "positive_negative"})
    exact: dict[int, object] = {}
    for name, extra in (("torch float32", {}), ("torch bfloat16", {"search_dtype": "bfloat16"})):
        config = MemoryConfig(key_dim=KEY_DIM, memory_size=size, choose_k=CHOOSE_K, device=device, **extra).validated()
        started = time.perf_counter()
        memory = Memory(
            config, state=entries_state(config, keys, values, rows_per_commit=BATCH_WRITTEN), max_batch=max(batches)
        )
        fill_seconds = time.perf_counter() - started
        for row, picked, queries, _ in rows:
            labels = values[picked]
            answer = memory.query(queries, labels, fields=fields)
            if name == "torch float32":
                exact[row["batch"]] = answer
                row["ms"]["query torch float32"] = timed(
                    lambda m=memory, q=queries, y=labels: m.query(q, y, fields=frozenset({"positive_negative_keys"}))
                )
            reference = exact[row["batch"]]
            row["recall_at_1"][name] = float(
                (answer.neighbor_slots[:, 0] == reference.neighbor_slots[:, 0]).float().mean()
            )
            row["positive_negative_equal"][name] = float(
                (
                    (answer.positive_slots == reference.positive_slots)
                    & (answer.negative_slots == reference.negative_slots)
                )
                .float()
                .mean()
            )
            row["ms"][f"fused {name}"] = timed(
                lambda m=memory, q=queries, y=labels: m.query(
                    q, y, update=True, fields=frozenset({"positive_negative_keys"})
                )
            )
            row.setdefault("fill_seconds", {})[name] = round(fill_seconds, 2)
        del memory
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    if faiss is not None:
        ivf_rows(size, keys, rows, faiss)
    return [row for row, *_ in rows]


def ivf_rows(size: int, keys: torch.Tensor, rows: list, faiss) -> None:
    """FAISS's GpuIndexIVFFlat as a library: nlist the power of two nearest sqrt(N), nprobe nlist / 32, trained
    on 64 keys per list; search time and recall@1 against exact search; what remove_ids says."""
    lists = 1 << round(math.log2(math.sqrt(size)))
    resources = faiss.StandardGpuResources()
    index = faiss.GpuIndexIVFFlat(resources, KEY_DIM, lists, faiss.METRIC_INNER_PRODUCT)
    index.nprobe = max(1, lists // IVF_PROBE_SHARE)
    gpu_keys = keys.to("cuda:0")
    sample = gpu_keys[torch.randperm(size, device="cuda:0")[: 64 * lists]]
    started = time.perf_counter()
    index.train(sample)
    index.add(gpu_keys)
    torch.cuda.synchronize()
    build_seconds = time.perf_counter() - started
    try:
        index.remove_ids(torch.arange(4, dtype=torch.int64))
        removal = "removed"
    except Exception as exc:  # faiss raises RuntimeError from C++
        removal = str(exc).strip().splitlines()[-1][:300]
    for row, _picked, _queries, gpu_queries in rows:
        exact_top1 = torch.topk(gpu_queries @ gpu_keys.T, 1).indices[:, 0]
        _, found = index.search(gpu_queries, CHOOSE_K)
        name = f"faiss GpuIndexIVFFlat (library; {lists} lists, {index.nprobe} probed)"
        row["recall_at_1"][name] = float((found[:, 0] == exact_top1).float().mean())
        row["ms"][f"search {name}"] = median_ms(lambda q=gpu_queries: index.search(q, CHOOSE_K), "cuda:0")
        row["ivf"] = {"lists": lists, "probes": index.nprobe, "build_seconds": round(build_seconds, 2)}
        row["ivf_remove_ids"] = removal


def print_table(rows: list[dict]) -> None:
    """Markdown, as docs/benchmarks.md has it: one line per (N, B) and case."""
    print("\n| N | B | case | p50 ms | x raw fp32 top-k | recall@1 | pos/neg = exact |")
    print("|---:|---:|---|---:|---:|---:|---:|")
    for row in rows:
        raw = row["ms"]["raw topk float32"]
        for case, ms in row["ms"].items():
            name = case.split(" ", 1)[1]
            recall = row["recall_at_1"].get(name)
            agree = row["positive_negative_equal"].get(name)
            print(
                f"| {row['size']:,} | {row['batch']} | {case} | {ms:.3f} | {ms / raw:.2f} | "
                f"{'' if recall is None else f'{recall:.3f}'} | {'' if agree is None else f'{agree:.3f}'} |"
            )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--sizes", default="65536,1048576")
    parser.add_argument("--table-sizes", default="1048576,10485760")
    parser.add_argument("--table-batches", default="16,256")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print(f"gpu_check: CUDA is not available (torch {torch.__version__})", file=sys.stderr)
        return 2
    sizes = [int(s) for s in args.sizes.split(",")]
    gpus = [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    faiss, no_faiss = faiss_gpus()
    report = {
        "check": "gpu_check",
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "gpus": [torch.cuda.get_device_name(i) for i in range(len(gpus))],
        "faiss": faiss.__version__ if faiss else no_faiss,
        "same_numbers": [],
        "failures": [],
    }
    out = args.out or Path(__file__).resolve().parent / "results" / f"gpu-check-{socket.gethostname()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        out.write_text(json.dumps(report, indent=2) + "\n")

    def section(name: str, run) -> None:
        """One section; an exception is a failed check, reported, and the next section still runs."""
        started = time.perf_counter()
        try:
            report[name] = run()
        except Exception as exc:
            report["failures"].append(f"{name}: {type(exc).__name__}: {exc}")
            print(f"gpu_check: {name} FAILED: {type(exc).__name__}: {exc}", flush=True)
        report.setdefault("seconds", {})[name] = round(time.perf_counter() - started, 1)
        print(json.dumps({name: report.get(name)}), flush=True)
        save()

    configs = [{"device": "cuda:0"}, {"device": "cuda:0", "shards": 4, "devices": gpus}]
    section(
        "same_numbers",
        lambda: [compare(size, args.steps, c, full) for size in sizes for c in configs for full in (False, True)],
    )
    section("host_synchronisations_per_fused_call", lambda: host_synchronisations(min(sizes)))
    section("out_of_memory", out_of_memory_is_resource_exhausted)
    section("varying_batches", varying_batches)
    section("served", served)
    batches = [int(b) for b in args.table_batches.split(",")]
    section(
        "table", lambda: [row for size in map(int, args.table_sizes.split(",")) for row in table(size, batches, faiss)]
    )
    if report.get("table"):
        print_table(report["table"])
    report["pass"] = (
        not report["failures"]
        and all(r["pass"] for r in report["same_numbers"])
        and report["out_of_memory"]["pass"]
        and report["served"]["pass"]
    )
    save()
    print(f"gpu_check: {'passed' if report['pass'] else 'FAILED'}; wrote {out}")
    return 0 if report["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
