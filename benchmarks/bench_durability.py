"""What durability costs: fused query+update throughput per sync policy, and how group commit shares fsyncs.

    .venv/bin/python benchmarks/bench_durability.py                 # about 1 minute
    .venv/bin/python benchmarks/bench_durability.py --writers 1 4 8 --seconds 3 --data-dir /mnt/disk/tmp

W writer threads each send fused query+updates (B=16, D=128, N=8,192) to one embedded memory for a
fixed time, under each policy in turn, interleaved in rounds: no data directory (in memory only),
then --sync off, interval and always. Reported per case: writes/s (median of rounds), the ratio to
the in-memory memory in the same round, and under "always" the writes per fsync (group commit: more
than 1 once writers overlap). The data directory's disk decides the fsync cost: pass one on the disk
you will serve from.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

import torch

from lifelong_memory.server import persistence
from lifelong_memory.server.persistence import Durability
from lifelong_memory.server.registry import MemoryRegistry

CONFIG = dict(key_dim=128, memory_size=8192, choose_k=256)
BATCH = 16
POLICIES = ("memory", "off", "interval", "always")
RESULTS = Path(__file__).resolve().parent / "results"


def batches(seed: int, count: int = 64):
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        labels = torch.randint(0, 2000, (BATCH,), generator=generator)
        queries = torch.nn.functional.normalize(torch.randn(BATCH, CONFIG["key_dim"], generator=generator), dim=1)
        out.append((queries, labels))
    return out


def measure(policy: str, writers: int, seconds: float, root: str) -> tuple[float, int, int, float]:
    """(writes per second, writes, fsyncs, seconds in fsync) for one policy."""
    data_dir = None if policy == "memory" else tempfile.mkdtemp(dir=root)
    registry = MemoryRegistry(data_dir=data_dir, durability=Durability(sync=policy if data_dir else "always"))
    memory = registry.create("bench", **CONFIG)
    memory.query(*batches(0)[0], update=True)
    counts = [0] * writers
    fsyncs_before, fsync_seconds_before = _fsyncs()
    stop = threading.Event()

    def writer(index: int) -> None:
        work = batches(index + 1)
        while not stop.is_set():
            memory.query(*work[counts[index] % len(work)], update=True, fields=())
            counts[index] += 1

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(writers)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    fsyncs, fsync_seconds = (a - b for a, b in zip(_fsyncs(), (fsyncs_before, fsync_seconds_before), strict=True))
    registry.close()
    return sum(counts) / elapsed, sum(counts), int(fsyncs), fsync_seconds


def _fsyncs() -> tuple[float, float]:
    """(log fsyncs, seconds spent in them) so far in this process, from the server's own metric."""
    samples = {s.name: s.value for metric in persistence.FSYNC_SECONDS.collect() for s in metric.samples}
    return samples["lmem_wal_fsync_seconds_count"], samples["lmem_wal_fsync_seconds_sum"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--writers", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--data-dir", default=tempfile.gettempdir(), help="where the data directories go")
    parser.add_argument("--out", default=str(RESULTS / "durability.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)

    rows = []
    for writers in args.writers:
        rates = {p: [] for p in POLICIES}
        per_fsync, fsync_ms = [], []
        for _ in range(args.rounds):
            for policy in POLICIES:
                rate, writes, fsyncs, fsync_seconds = measure(policy, writers, args.seconds, args.data_dir)
                rates[policy].append(rate)
                if policy == "always":
                    per_fsync.append(writes / max(fsyncs, 1))
                    fsync_ms.append(1e3 * fsync_seconds / max(fsyncs, 1))
        baseline = statistics.median(rates["memory"])
        for policy in POLICIES:
            rate = statistics.median(rates[policy])
            rows.append(
                {
                    "writers": writers,
                    "policy": policy,
                    "writes_per_s": round(rate, 1),
                    "vs_in_memory": round(rate / baseline, 3),
                    "writes_per_fsync": round(statistics.median(per_fsync), 2) if policy == "always" else None,
                    "fsync_ms_mean": round(statistics.median(fsync_ms), 3) if policy == "always" else None,
                }
            )
    print(f"{'writers':>7} {'policy':>8} {'writes/s':>9} {'vs memory':>9} {'writes/fsync':>12} {'fsync ms':>8}")
    for r in rows:
        per = "" if r["writes_per_fsync"] is None else r["writes_per_fsync"]
        ms = "" if r["fsync_ms_mean"] is None else r["fsync_ms_mean"]
        print(f"{r['writers']:>7} {r['policy']:>8} {r['writes_per_s']:>9} {r['vs_in_memory']:>9} {per:>12} {ms:>8}")
    machine = {"cpus": os.cpu_count(), "torch": torch.__version__, "data_dir": args.data_dir}
    Path(args.out).write_text(json.dumps({"machine": machine, "config": CONFIG, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
