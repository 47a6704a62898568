"""Issue 12, part 3: a memory of 16,777,216 slots x 128 dimensions (8 GiB of float32 keys) through a server
on one 24 GiB machine: bulk-loaded, described, queried, updated, snapshotted, killed and recovered.

Run from the repository root (about 10 minutes at 16M on 2 cores; needs about 10 GiB of RAM and 35 GB of disk):

    .venv/bin/python benchmarks/bench_large_memory.py
    .venv/bin/python benchmarks/bench_large_memory.py --size 1048576 --out /tmp/large.json   # a quick check
    .venv/bin/python benchmarks/bench_large_memory.py --backend faiss-ivf --ivf-codes sq8 \
        --out benchmarks/results/large-memory-ivf.json                                      # approximate search

Each step is timed; after each, the server's resident memory and its peak since the step began are read from
/proc (the peak is reset through /proc/PID/clear_refs before the step), next to the footprint that `describe`
reports and the budget counts:
 1. `write_memory_file`: N random unit keys and labels, as if written 256 per commit (the memory a training
    of B = 256 steps leaves), streamed block by block to a file in the export format.
 2. `lmem serve --data-dir` in a subprocess (an empty server's start is the anchor for the restart below), and
    an import over gRPC: the file travels in chunks, the server spools it to disk, reads the arrays once
    (the keys straight into the buffer the memory keeps) and writes the memory's first snapshot.
 3. Query and fused query + update, B = 16 rows, exact float32 search: median of a few calls.
 4. SnapshotMemory: the keys stream to disk; no second copy of the memory.
 5. One more fused update (acknowledged: in the log, not in the snapshot), then SIGKILL; a new server recovers
    the snapshot and replays the log before it serves. The same queries then get the same answers bit for bit,
    and the acknowledged write is there.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_memory import machine_info  # noqa: E402

from lifelong_memory.client import connect, write_memory_file  # noqa: E402

GIB = 1 << 30
DIM, K, B, ROWS_PER_COMMIT = 128, 256, 16, 256


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=1 << 24, help="memory slots (default 16,777,216)")
    parser.add_argument("--calls", type=int, default=3, help="timed calls per operation")
    parser.add_argument("--work-dir", type=Path, help="where the file and the data directory go (default: a temp dir)")
    parser.add_argument("--budget-gb", type=float, default=20.0, help="the server's --memory-budget-gb")
    parser.add_argument(
        "--backend", default="torch", help="the imported memory's search: torch (exact), lsh, faiss-ivf (an override)"
    )
    parser.add_argument("--ivf-codes", default="flat", help="with --backend faiss-ivf: flat or sq8")
    parser.add_argument(
        "--classes", type=int, default=1 << 20, help="distinct labels (default 1,048,576: about 16 entries each)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "large-memory.json")
    return parser.parse_args()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`lmem serve` on a data directory; ``started_s``: from the process's start to its first line "serving on"
    (a server recovers its memories before it serves)."""

    def __init__(self, data_dir: Path, budget_gb: float, log: Path):
        self.port = free_port()
        cmd = [sys.executable, "-m", "lifelong_memory.client.cli", "serve", "--port", str(self.port)]
        cmd += ["--data-dir", str(data_dir), "--memory-budget-gb", str(budget_gb), "--max-batch", str(ROWS_PER_COMMIT)]
        cmd += ["--log-level", "INFO", "--max-message-mb", "64"]
        started = time.perf_counter()
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=open(log, "a"), text=True)
        ready = threading.Event()

        def wait_ready():
            for line in self.proc.stdout:
                if "serving on" in line:
                    ready.set()

        threading.Thread(target=wait_ready, daemon=True).start()
        while not ready.wait(0.05):
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}; see {log}")
        self.started_s = time.perf_counter() - started
        self.url = f"grpc://127.0.0.1:{self.port}"

    def reset_peak(self) -> None:
        Path(f"/proc/{self.proc.pid}/clear_refs").write_text("5")

    def memory(self) -> dict[str, float]:
        """Resident and peak resident GiB (VmRSS, VmHWM)."""
        fields = dict(line.split(":", 1) for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines())
        return {name: int(fields[key].split()[0]) * 1024 / GIB for name, key in (("rss", "VmRSS"), ("peak", "VmHWM"))}

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


def key_blocks(size: int, seed: int, rows: int = 1 << 20):
    generator = torch.Generator().manual_seed(seed)
    for start in range(0, size, rows):
        yield torch.nn.functional.normalize(torch.randn(min(rows, size - start), DIM, generator=generator), dim=1)


def unit_rows(n: int, seed: int) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.randn(n, DIM, generator=torch.Generator().manual_seed(seed)), dim=1)


def timed(call, calls: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(calls):
        started = time.perf_counter()
        result = call()
        times.append(time.perf_counter() - started)
    return statistics.median(times), result


def main() -> int:
    args = parse_args()
    size, steps = args.size, {}
    work = Path(tempfile.mkdtemp(prefix="lmem-large-", dir=args.work_dir))
    data_dir, path, log = work / "data", work / "seed.lmem", work / "server.log"
    server = None
    print(f"bench_large_memory: {size:,} slots x {DIM} (keys {size * DIM * 4 / GIB:.2f} GiB); work dir {work}")

    def step(name: str, seconds: float, **extra) -> None:
        steps[name] = {"seconds": round(seconds, 3), **extra}
        memory = ", ".join(f"{k} {v}" for k, v in extra.items())
        print(f"  {name:<34} {seconds:9.2f} s   {memory}", flush=True)

    try:
        labels = np.random.default_rng(args.seed).integers(0, args.classes, size)
        started = time.perf_counter()
        write_memory_file(
            path, key_blocks(size, args.seed), labels, rows_per_commit=ROWS_PER_COMMIT, key_dim=DIM,
            memory_size=size, choose_k=K,
        )  # fmt: skip
        step("write_memory_file", time.perf_counter() - started, file_gib=round(path.stat().st_size / GIB, 3))

        empty_dir = work / "empty"
        anchor = ServerProcess(empty_dir, args.budget_gb, log)
        anchor.kill()
        step("start an empty server (anchor)", anchor.started_s)

        server = ServerProcess(data_dir, args.budget_gb, log)
        with connect(server.url, timeout=None) as store:
            server.reset_peak()
            started = time.perf_counter()
            overrides = {"backend": args.backend}
            if args.backend == "faiss-ivf":
                overrides["ivf_codes"] = args.ivf_codes
            memory = store.import_memory("large", path, **overrides)
            seconds = time.perf_counter() - started
            used = server.memory()
            footprint = memory.info().footprint
            step(
                "import over gRPC (+ first snapshot)", seconds, rss_gib=round(used["rss"], 2),
                peak_gib=round(used["peak"], 2), footprint_cpu_gib=round(footprint["cpu"] / GIB, 2),
            )  # fmt: skip
            path.unlink()  # the disk it held goes to the snapshots

            queries, query_labels = unit_rows(B, seed=1), torch.from_numpy(labels[:B].copy())
            server.reset_peak()
            seconds, before = timed(lambda: memory.query(queries), args.calls)
            step(f"Query, B = {B}", seconds, peak_gib=round(server.memory()["peak"], 2))
            commits = memory.info().stats["commit_sequence"]
            seeds = iter(range(100, 100 + args.calls))
            seconds, _ = timed(lambda: memory.query(unit_rows(B, next(seeds)), query_labels, update=True), args.calls)
            step(f"fused query + update, B = {B}", seconds, peak_gib=round(server.memory()["peak"], 2))

            server.reset_peak()
            started = time.perf_counter()
            snapshot = memory.snapshot()
            used = server.memory()
            step(
                "SnapshotMemory", time.perf_counter() - started, file_gib=round(snapshot.bytes / GIB, 3),
                rss_gib=round(used["rss"], 2), peak_gib=round(used["peak"], 2),
            )  # fmt: skip
            new_labels = torch.arange(B) + args.classes  # labels no entry holds: every row writes
            acknowledged = memory.query(unit_rows(B, seed=2), new_labels, update=True)
            answer = memory.query(queries)
            assert commits + args.calls + 1 == memory.info().stats["commit_sequence"]
        server.kill()

        server = ServerProcess(data_dir, args.budget_gb, log)
        used = server.memory()
        step(
            "restart: recover and serve",
            server.started_s,
            rss_gib=round(used["rss"], 2),
            peak_gib=round(used["peak"], 2),
        )
        with connect(server.url, timeout=None) as store:
            memory = store.memory("large")
            recovered = memory.query(queries)
            same = all(
                torch.equal(getattr(answer, f), getattr(recovered, f))
                for f in ("neighbor_slots", "neighbor_similarities", "neighbor_values")
            )
            written = memory.read_slots(acknowledged.written_slots)
            kept = bool(torch.equal(written.values, new_labels))
            print(f"  same answers after the restart: {same}; the acknowledged write kept: {kept}")
            print(f"  (the first query of the run: {before.neighbor_slots[0, :3].tolist()}...)")
            info = memory.info()
    finally:
        if server is not None:
            server.kill()
        shutil.rmtree(work, ignore_errors=True)

    report = {
        "benchmark": "bench_large_memory",
        "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": machine_info("cpu"),
        "load_average": os.getloadavg(),
        "settings": {"memory_size": size, "key_dim": DIM, "k": K, "batch": B, "rows_per_commit": ROWS_PER_COMMIT},
        "config": info.config.__dict__,
        "footprint_bytes": info.footprint,
        "stats": info.stats,
        "steps": steps,
        "same_answers_after_restart": same,
        "acknowledged_write_kept": kept,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"wrote {args.out}")
    return 0 if same and kept else 1


if __name__ == "__main__":
    sys.exit(main())
