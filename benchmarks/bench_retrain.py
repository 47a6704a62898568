"""What a faiss-ivf retrain costs the calls that go on meanwhile (Memory.retrain_index).

    .venv/bin/python benchmarks/bench_retrain.py                         # N = 1,048,576, d = 128, ~3 min
    .venv/bin/python benchmarks/bench_retrain.py --n 65536 --seconds 2 --out /tmp/retrain.json

An embedded memory of N clustered keys (N / 32 centres, noise of norm 0.5; its default nlist and nprobe) is
trained on its first fill. A client thread then sends fused query + update calls of B rows back to back, first
alone (the anchor), then while another thread retrains the quantizer. Reported: the calls' latency (median, 99th
percentile, longest) in both phases and the calls completed per second; the retrain's own time; and, as the
other anchor, how long a retrain under the memory's lock would have stopped every call: building the index
(k-means and every key assigned to its new list), timed alone.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_ann import CLUSTER_SIZE, CLUSTER_SPREAD, D, K  # noqa: E402
from bench_memory import machine_info  # noqa: E402

from lifelong_memory.client.memory_file import entries_state  # noqa: E402
from lifelong_memory.server.index import build_index  # noqa: E402
from lifelong_memory.server.memory import Memory, MemoryConfig  # noqa: E402


def clustered(n: int, centres: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    labels = torch.randint(0, len(centres), (n,), generator=generator)
    noise = torch.randn(n, D, generator=generator) * (CLUSTER_SPREAD / D**0.5)
    return torch.nn.functional.normalize(centres[labels] + noise, dim=1), labels


def filled_memory(n: int, centres: torch.Tensor, generator: torch.Generator) -> Memory:
    keys, labels = clustered(n, centres, generator)
    config = MemoryConfig(key_dim=D, memory_size=n, choose_k=K, backend="faiss-ivf").validated()
    state = entries_state(config, keys, labels)
    return Memory(config, state, max_batch=256)


def calls_for(memory: Memory, batch: int, seconds: float, centres, generator, stop: threading.Event | None = None):
    """Fused calls back to back for ``seconds`` (or until ``stop``, one call at least); their latencies in ms."""
    latencies, deadline = [], time.perf_counter() + seconds
    while not latencies or (time.perf_counter() < deadline and not (stop is not None and stop.is_set())):
        queries, labels = clustered(batch, centres, generator)
        started = time.perf_counter()
        memory.query(queries, labels, update=True)
        latencies.append((time.perf_counter() - started) * 1e3)
    return latencies


def summary(latencies: list[float], seconds: float) -> dict:
    ordered = sorted(latencies)
    return {
        "calls": len(ordered),
        "calls_per_s": round(len(ordered) / seconds, 1),
        "p50_ms": round(statistics.median(ordered), 2),
        "p99_ms": round(ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))], 2),
        "max_ms": round(ordered[-1], 2),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1 << 20)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=20.0, help="the anchor phase's length")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "retrain.json")
    args = parser.parse_args(argv)
    generator = torch.Generator().manual_seed(0)
    centres = torch.nn.functional.normalize(torch.randn(args.n // CLUSTER_SIZE, D, generator=generator), dim=1)
    started = time.perf_counter()
    memory = filled_memory(args.n, centres, generator)
    cfg = memory.config
    print(f"N = {args.n:,}, d = {D}, lists {cfg.ivf_lists}, probes {cfg.ivf_probes}, B = {args.batch}")
    print(f"  memory filled and its index trained in {time.perf_counter() - started:.1f} s")

    started = time.perf_counter()
    build_index(memory.keys, memory.config, 256, memory.index.retrained_state(memory.index.training_samples()))
    blocking_s = time.perf_counter() - started
    print(f"  a retrain under the lock would stop every call for {blocking_s:.1f} s (k-means + new lists, alone)")

    calls_for(memory, args.batch, 1.0, centres, generator)  # warm up
    anchor = summary(calls_for(memory, args.batch, args.seconds, centres, generator), args.seconds)
    print(f"  calls alone:             {anchor}")

    done, results = threading.Event(), []

    def retrain():
        results.append(memory.retrain_index())
        done.set()

    thread = threading.Thread(target=retrain)
    started = time.perf_counter()
    thread.start()
    during = calls_for(memory, args.batch, 3600.0, centres, generator, stop=done)
    thread.join()
    retrain_s = time.perf_counter() - started
    (result,) = results
    beside = summary(during, retrain_s)
    print(f"  calls during the retrain: {beside}")
    print(f"  retrain: {result.seconds:.1f} s, {result.rewritten_slots:,} slots written meanwhile and caught up")

    report = {
        "benchmark": "bench_retrain",
        "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": machine_info("cpu"),
        "load_average": os.getloadavg(),
        "torch_threads": torch.get_num_threads(),
        "settings": {
            "n": args.n,
            "key_dim": D,
            "k": K,
            "batch": args.batch,
            "lists": cfg.ivf_lists,
            "probes": cfg.ivf_probes,
        },  # fmt: skip
        "blocking_retrain_s": round(blocking_s, 2),
        "calls_alone": anchor,
        "calls_during_retrain": beside,
        "retrain_s": round(result.seconds, 2),
        "rewritten_slots": result.rewritten_slots,
        "longest_call_over_blocking_retrain": round(beside["max_ms"] / 1e3 / blocking_s, 4),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
