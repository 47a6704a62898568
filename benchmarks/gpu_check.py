"""The GPU check: a memory on CUDA against the same memory on the CPU, then its speed against raw torch.

Run by benchmarks/gpu_check.sh on a machine with a GPU (it needs only torch and numpy):

    python benchmarks/gpu_check.py [--out FILE] [--steps 200] [--sizes 65536,1048576]

1. Same numbers: for each size, a CPU memory and a CUDA memory with the same config and seed take the
   same stream of fused query + update steps (clustered unit queries, B = 16, age noise 8). Every step's
   written slots, predictions and incorrect flags must be identical, and at the end values and ages
   identical and keys within 1e-5. The same for a CUDA memory in 4 shards, on every GPU of the machine
   (devices = all of them) when it has more than one. Similarities come from each device's own matrix
   product, so a near-tie could in principle rank differently; any divergence is reported with its step.
2. Host synchronisations per fused call, counted with torch.cuda.set_sync_debug_mode("warn").
3. Out of memory: a memory larger than the device's free memory is ResourceExhausted, not a crash.
4. Speed, N = 1M (or the largest size), B = 256: the fused step and a query with labels, against
   torch.topk(q @ K.T, k) on the same device, median of synchronised calls.

Writes a JSON report (default benchmarks/results/gpu-check-HOST.json) and exits 1 if a check failed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import socket
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

from lifelong_memory.client.memory_file import entries_state
from lifelong_memory.server.errors import ResourceExhausted
from lifelong_memory.server.memory import Memory, MemoryConfig

KEY_DIM, CHOOSE_K, BATCH, LABELS = 128, 256, 16, 200
BATCH_WRITTEN = 256  # slots per commit in the speed test's full memory


def stream(steps: int, batch: int, seed: int):
    """Clustered unit queries, so that the memory merges as well as writes."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.nn.functional.normalize(torch.randn(LABELS, KEY_DIM, generator=generator), dim=1)
    for _ in range(steps):
        labels = torch.randint(0, LABELS, (batch,), generator=generator)
        noise = 0.3 * torch.randn(batch, KEY_DIM, generator=generator)
        yield torch.nn.functional.normalize(centres[labels] + noise, dim=1), labels


def compare(size: int, steps: int, gpu_config: dict) -> dict:
    config = dict(key_dim=KEY_DIM, memory_size=size, choose_k=CHOOSE_K, age_noise=8.0, seed=17)
    cpu = Memory(MemoryConfig(**config), max_batch=BATCH)
    gpu = Memory(MemoryConfig(**config, **gpu_config), max_batch=BATCH)
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
    return {
        "size": size,
        "gpu_config": gpu_config,
        "steps": steps,
        "first_divergent_step": first_divergence,
        "values_equal": torch.equal(state_cpu.values, state_gpu.values),
        "ages_equal": torch.equal(state_cpu.ages, state_gpu.ages),
        "keys_max_difference": float((state_cpu.keys - state_gpu.keys).abs().max()),
        "writes": cpu.counters["writes"],
        "merges": cpu.counters["merges"],
        "pass": first_divergence is None
        and torch.equal(state_cpu.values, state_gpu.values)
        and torch.equal(state_cpu.ages, state_gpu.ages)
        and float((state_cpu.keys - state_gpu.keys).abs().max()) <= 1e-5,
    }


def host_synchronisations(size: int) -> int:
    memory = Memory(MemoryConfig(key_dim=KEY_DIM, memory_size=size, choose_k=CHOOSE_K, device="cuda:0"))
    steps = stream(size // BATCH + 2, BATCH, seed=1)
    for queries, labels in steps:  # fill it, so the empty-slot tie rule is out of the way
        memory.query(queries, labels, update=True, fields=frozenset())
        if memory.empty_slots == 0:
            break
    queries, labels = next(steps)
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            memory.query(queries, labels, update=True, fields=frozenset({"positive_negative_keys"}))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def out_of_memory_is_resource_exhausted() -> dict:
    """A memory whose keys alone exceed what the device has free: the real CUDA out-of-memory error must
    come back as ResourceExhausted."""
    free, _total = torch.cuda.mem_get_info(0)
    slots = min(int(free // (KEY_DIM * 4)) + 1, 2**31)
    try:
        Memory(MemoryConfig(key_dim=KEY_DIM, memory_size=slots, choose_k=CHOOSE_K, device="cuda:0"))
    except ResourceExhausted as exc:
        return {"pass": True, "slots": slots, "error": str(exc)}
    return {"pass": False, "slots": slots, "error": "allocated"}


def median_ms(call, device: str, repeats: int = 30) -> float:
    synchronize = torch.cuda.synchronize if device.startswith("cuda") else lambda: None
    for _ in range(3):
        call()
    synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def speed(size: int, batch: int = 256, device: str = "cuda:0") -> dict:
    generator = torch.Generator().manual_seed(0)
    keys = torch.nn.functional.normalize(torch.randn(size, KEY_DIM, generator=generator), dim=1)
    config = MemoryConfig(key_dim=KEY_DIM, memory_size=size, choose_k=CHOOSE_K, device=device)
    # every slot written, its own label, BATCH_WRITTEN per commit: ages as training leaves them
    state = entries_state(config, keys, torch.arange(size), rows_per_commit=BATCH_WRITTEN)
    memory = Memory(config, state=state, max_batch=batch)
    queries = torch.nn.functional.normalize(torch.randn(batch, KEY_DIM, generator=generator), dim=1)
    labels = torch.randint(0, size, (batch,), generator=generator)
    gpu_keys, gpu_queries = keys.to(device), queries.to(device)
    return {
        "size": size,
        "batch": batch,
        "raw_topk_ms": median_ms(lambda: torch.topk(gpu_queries @ gpu_keys.T, CHOOSE_K), device),
        "query_ms": median_ms(
            lambda: memory.query(queries, labels, fields=frozenset({"positive_negative_keys"})), device
        ),
        "fused_ms": median_ms(
            lambda: memory.query(queries, labels, update=True, fields=frozenset({"positive_negative_keys"})), device
        ),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--sizes", default="65536,1048576")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print(f"gpu_check: CUDA is not available (torch {torch.__version__})", file=sys.stderr)
        return 2
    sizes = [int(s) for s in args.sizes.split(",")]
    gpus = [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    report = {
        "check": "gpu_check",
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "gpus": [torch.cuda.get_device_name(i) for i in range(len(gpus))],
        "same_numbers": [],
    }
    out = args.out or Path(__file__).resolve().parent / "results" / f"gpu-check-{socket.gethostname()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        out.write_text(json.dumps(report, indent=2) + "\n")

    for size in sizes:
        for gpu_config in ({"device": "cuda:0"}, {"device": "cuda:0", "shards": 4, "devices": gpus}):
            result = compare(size, args.steps, gpu_config)
            print(json.dumps(result), flush=True)
            report["same_numbers"].append(result)
            save()
    report["host_synchronisations_per_fused_call"] = host_synchronisations(min(sizes))
    report["out_of_memory"] = out_of_memory_is_resource_exhausted()
    report["speed"] = speed(max(sizes))
    report["pass"] = all(r["pass"] for r in report["same_numbers"]) and report["out_of_memory"]["pass"]
    save()
    print(json.dumps({k: report[k] for k in ("host_synchronisations_per_fused_call", "out_of_memory", "speed")}))
    print(f"gpu_check: {'passed' if report['pass'] else 'FAILED'}; wrote {out}")
    return 0 if report["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
