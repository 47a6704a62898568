"""What a snapshot costs in memory: the process's peak resident size while one memory is written to a file,
with its keys copied first (``capture()``) or streamed (``capture(streamed=True)``, what snapshots and exports
do). Linux only (/proc/self/status, clear_refs). One mode per process, so the peaks do not mix:

    .venv/bin/python benchmarks/bench_snapshot_memory.py 2097152 copied
    .venv/bin/python benchmarks/bench_snapshot_memory.py 2097152 streamed
"""

from __future__ import annotations

import pathlib
import sys
import tempfile
import time

import torch

from lifelong_memory.server.memory import Memory, MemoryConfig
from lifelong_memory.server.persistence import snapshot_chunks, write_atomically


def status_mib(field: str) -> int:
    return int(pathlib.Path("/proc/self/status").read_text().split(f"{field}:")[1].split()[0]) // 1024


def main() -> int:
    n, mode = int(sys.argv[1]), sys.argv[2]
    memory = Memory(MemoryConfig(key_dim=128, memory_size=n, choose_k=256))
    memory.keys.copy_(torch.nn.functional.normalize(torch.randn(n, 128), dim=1))  # every page touched
    before = status_mib("VmRSS")
    pathlib.Path("/proc/self/clear_refs").write_text("5")  # the peak (VmHWM) starts again from here
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        state = memory.capture(streamed=mode == "streamed")
        size = write_atomically(pathlib.Path(folder) / "snapshot.lmem", snapshot_chunks(state))
    peak = status_mib("VmHWM")
    print(
        f"N={n:,} keys {mode}: resident {before} MiB before, {peak} MiB at the peak (+{peak - before}); "
        f"{size / 2**20:.0f} MiB written in {time.perf_counter() - started:.1f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
