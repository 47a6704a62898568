"""Soak: several trainers stream fused query+updates into one durable server for minutes.

    .venv/bin/python benchmarks/soak.py                       # 4 trainers, 180 s, about 4 minutes
    .venv/bin/python benchmarks/soak.py --seconds 60 --trainers 2 --out /tmp/soak.json --plot /tmp/soak.png

The server (`lmem serve --data-dir`, sync always, snapshots every 30 s) runs in
a subprocess; three trainers share one lifelong memory and one more has its
own (a different key size). Every second the script samples the server's
resident memory and the size of its data directory; every trainer times each
step. Reported per tenth of the run: p50/p99 step latency and resident memory.
Targets: resident memory stops growing once the memories are full (growth
from the second tenth to the last, beyond the data directory's files: ~0),
and p99 stays flat (last tenth / second tenth close to 1).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from lifelong_memory.client import connect

SHARED = dict(key_dim=128, memory_size=65536, choose_k=256, seed=1)
OWN = dict(key_dim=64, memory_size=16384, choose_k=128, seed=2)
BATCH, LABELS = 16, 5000
RESULTS = Path(__file__).resolve().parent / "results"


def trainer(url: str, name: str, key_dim: int, index: int, seconds: float, results) -> None:
    """Omniglot-like traffic: queries near one of many class centres, a fused update per step."""
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(index)
    centres = torch.nn.functional.normalize(torch.randn(LABELS, key_dim, generator=generator), dim=1)
    timings = []
    with connect(url) as store, store.memory(name).stream() as stream:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            labels = torch.randint(0, LABELS, (BATCH,), generator=generator)
            queries = centres[labels] + 0.5 * torch.randn(BATCH, key_dim, generator=generator) / key_dim**0.5
            queries = torch.nn.functional.normalize(queries, dim=1)
            started = time.perf_counter()
            stream.query(queries, labels, update=True, fields={"positive_negative"})
            timings.append((time.monotonic(), time.perf_counter() - started))
    results.put(timings)


def resident_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def windows(samples: list[tuple[float, float]], start: float, seconds: float, count: int = 10) -> list[list[float]]:
    parts: list[list[float]] = [[] for _ in range(count)]
    for t, value in samples:
        i = int((t - start) / seconds * count)
        if 0 <= i < count:
            parts[i].append(value)
    return parts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=180.0)
    parser.add_argument("--trainers", type=int, default=4, help="the last one has its own memory")
    parser.add_argument("--out", default=str(RESULTS / "soak.json"))
    parser.add_argument("--plot", default=str(RESULTS / "soak.png"))
    args = parser.parse_args()

    data_dir = Path(tempfile.mkdtemp(prefix="lmem-soak-"))
    port = free_port()
    url = f"grpc://127.0.0.1:{port}"
    command = [sys.executable, "-m", "lifelong_memory.client.cli", "serve", "--port", str(port)]
    command += ["--data-dir", str(data_dir), "--snapshot-interval", "30", "--log-level", "WARNING"]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    assert "serving on" in server.stdout.readline()
    with connect(url) as store:
        store.create_memory("shared", **SHARED)
        store.create_memory("own", **OWN)

    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    plan = [("shared", SHARED["key_dim"])] * (args.trainers - 1) + [("own", OWN["key_dim"])]
    processes = [
        context.Process(target=trainer, args=(url, name, dim, i, args.seconds, results))
        for i, (name, dim) in enumerate(plan)
    ]
    start = time.monotonic()
    for p in processes:
        p.start()
    memory_samples = []
    while any(p.is_alive() for p in processes) and results.qsize() < len(processes):
        memory_samples.append((time.monotonic(), resident_bytes(server.pid), folder_bytes(data_dir)))
        time.sleep(1.0)
    timings = [t for _ in processes for t in results.get(timeout=120)]
    for p in processes:
        p.join()
    with connect(url) as store:
        stats = {info.name: info.stats for info in store.list_memories()}
    server.terminate()
    clean_exit = server.wait(timeout=120)

    latency = windows([(t, d * 1e3) for t, d in timings], start, args.seconds)
    resident = windows([(t, r / 2**20) for t, r, _ in memory_samples], start, args.seconds)
    on_disk = windows([(t, f / 2**20) for t, _, f in memory_samples], start, args.seconds)
    table = []
    for i in range(10):
        table.append(
            {
                "tenth": i + 1,
                "steps": len(latency[i]),
                "p50_ms": round(float(np.percentile(latency[i], 50)), 3) if latency[i] else None,
                "p99_ms": round(float(np.percentile(latency[i], 99)), 3) if latency[i] else None,
                "rss_mib": round(max(resident[i]), 1) if resident[i] else None,
                "data_dir_mib": round(max(on_disk[i]), 1) if on_disk[i] else None,
            }
        )
    second, last = table[1], table[-1]
    summary = {
        "seconds": args.seconds,
        "trainers": args.trainers,
        "steps": len(timings),
        "rss_growth_mib_2nd_to_last_tenth": round(last["rss_mib"] - second["rss_mib"], 1),
        "data_dir_growth_mib_2nd_to_last_tenth": round(last["data_dir_mib"] - second["data_dir_mib"], 1),
        "p99_last_over_2nd_tenth": round(last["p99_ms"] / second["p99_ms"], 3),
        "p50_ms": round(float(np.percentile([d * 1e3 for _, d in timings], 50)), 3),
        "p99_ms": round(float(np.percentile([d * 1e3 for _, d in timings], 99)), 3),
        "memories": stats,
        "server_exit_status_after_sigterm": clean_exit,
        "machine": f"{os.cpu_count()} CPUs, torch {torch.__version__}",
    }
    print(f"{'tenth':>5} {'steps':>7} {'p50 ms':>8} {'p99 ms':>8} {'RSS MiB':>8} {'data MiB':>9}")
    for row in table:
        print(
            f"{row['tenth']:>5} {row['steps']:>7} {row['p50_ms']:>8} {row['p99_ms']:>8} {row['rss_mib']:>8} "
            f"{row['data_dir_mib']:>9}"
        )
    print(json.dumps(summary, indent=2))
    Path(args.out).write_text(json.dumps({"summary": summary, "tenths": table}, indent=2) + "\n")
    plot(table, memory_samples, timings, start, args.plot)


def plot(table, memory_samples, timings, start, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    t = [s[0] - start for s in memory_samples]
    top.plot(t, [s[1] / 2**20 for s in memory_samples], label="server resident memory")
    top.plot(t, [s[2] / 2**20 for s in memory_samples], label="data directory (log + snapshots)")
    top.set_ylabel("MiB")
    top.legend()
    buckets = {}
    for when, duration in timings:
        buckets.setdefault(int(when - start), []).append(duration * 1e3)
    seconds = sorted(buckets)
    bottom.plot(seconds, [np.percentile(buckets[s], 50) for s in seconds], label="p50 per second")
    bottom.plot(seconds, [np.percentile(buckets[s], 99) for s in seconds], label="p99 per second")
    bottom.set_ylabel("fused step, ms")
    bottom.set_xlabel("seconds")
    bottom.legend()
    figure.suptitle("Soak: trainers streaming fused query+updates into a durable server")
    figure.tight_layout()
    figure.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
