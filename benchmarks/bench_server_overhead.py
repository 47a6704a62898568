"""Per-call cost of the server against an earlier revision's, side by side in one run.

    .venv/bin/python benchmarks/bench_server_overhead.py --baseline main
    .venv/bin/python benchmarks/bench_server_overhead.py --baseline ba89c3b --seconds 3 --out /tmp/overhead.json

Starts two ``lmem serve`` subprocesses on free 127.0.0.1 ports: this tree's, and the ``--baseline``
revision's (its server/, client/ and proto/ exported with ``git archive`` into a temporary folder put first
on PYTHONPATH). Both get the same memory (d = 128, N = 8,192, k = 256, filled with N random keys) and
the same client, this tree's. Cases, each call timed alone:
  get     GetMemory: an RPC with almost no work, the server's own per-call cost
  unary   fused query + update, B = 16, ``mem.query(..., update=True)``
  stream  the same over one QueryStream, ``stream.query(..., update=True)``
The two servers run interleaved in rounds (a slice of --slice seconds each) until each case has
--seconds of calls, so that noise on a shared machine hits both alike. Reported: median ms per call and
its ratio, this tree / baseline (below 1: this tree is faster). Both servers are stopped by PID at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch

from lifelong_memory.client import connect

ROOT = Path(__file__).resolve().parent.parent
CONFIG = dict(key_dim=128, memory_size=8192, choose_k=256)
BATCH = 16


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def export_revision(revision: str, folder: Path) -> Path:
    """The package of ``revision`` as an importable ``lifelong_memory`` under ``folder``; returns the path."""
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", revision, "server", "client", "proto"], capture_output=True, check=True
    ).stdout
    source = folder / "source"
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(source, filter="data")
    package = folder / "path" / "lifelong_memory"
    package.mkdir(parents=True)
    for name, target in (("server", "server"), ("client", "client"), ("v1", "proto/lifelong_memory/v1")):
        (package / name).symlink_to(source / target)
    return folder / "path"


@contextlib.contextmanager
def lmem_serve(python_path: Path | None, log: Path):
    port = free_port()
    env = dict(os.environ)
    if python_path is not None:
        env["PYTHONPATH"] = str(python_path)
    command = [sys.executable, "-m", "lifelong_memory.client.cli", "serve", "--port", str(port)]
    with open(log, "w") as output:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=output, text=True, env=env)
    try:
        if "serving on" not in process.stdout.readline():
            raise RuntimeError(f"server did not start; see {log}")
        yield f"grpc://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(timeout=60)


def unit_rows(rows: int, generator: torch.Generator) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.randn(rows, CONFIG["key_dim"], generator=generator), dim=1)


def prepare(store, name: str):
    memory = store.create_memory(name, **CONFIG)
    generator = torch.Generator().manual_seed(0)
    for start in range(0, CONFIG["memory_size"], 512):
        memory.query(unit_rows(512, generator), torch.arange(start, start + 512), update=True)
    return memory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", default="main", help="git revision to compare with (default main)")
    parser.add_argument("--seconds", type=float, default=4.0, help="seconds of calls per case and server")
    parser.add_argument("--slice", type=float, default=0.2, help="seconds per case and server per round")
    parser.add_argument("--out", type=Path, help="also write the figures here as JSON")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="lmem-overhead-") as folder, contextlib.ExitStack() as stack:
        folder = Path(folder)
        servers = {
            "this tree": stack.enter_context(lmem_serve(None, folder / "this.log")),
            f"baseline {args.baseline}": stack.enter_context(
                lmem_serve(export_revision(args.baseline, folder), folder / "baseline.log")
            ),
        }
        generator = torch.Generator().manual_seed(1)
        queries = [unit_rows(BATCH, generator) for _ in range(64)]
        labels = [torch.randint(0, 10**6, (BATCH,), generator=generator) for _ in range(64)]
        cases = {}
        for server, url in servers.items():
            store = stack.enter_context(connect(url))
            memory = prepare(store, "overhead")
            stream = stack.enter_context(memory.stream())
            cases[(server, "get")] = lambda i, m=memory: m.info()
            cases[(server, "unary")] = lambda i, m=memory: m.query(queries[i % 64], labels[i % 64], update=True)
            cases[(server, "stream")] = lambda i, s=stream: s.query(queries[i % 64], labels[i % 64], update=True)
        times = {case: [] for case in cases}
        for call in cases.values():  # warm-up
            for i in range(20):
                call(i)
        while min(sum(t) for t in times.values()) < args.seconds:
            for case, call in cases.items():
                end = time.perf_counter() + args.slice
                while time.perf_counter() < end:
                    start = time.perf_counter()
                    call(len(times[case]))
                    times[case].append(time.perf_counter() - start)

    names = list(servers)
    rows = []
    print(f"{'case':8} {names[0] + ' ms':>16} {names[1] + ' ms':>24} {'ratio':>7} {'calls':>13}")
    for kind in ("get", "unary", "stream"):
        this, base = (statistics.median(times[(n, kind)]) * 1000 for n in names)
        calls = [len(times[(n, kind)]) for n in names]
        rows.append({"case": kind, "this_ms": this, "baseline_ms": base, "ratio": this / base, "calls": calls})
        print(f"{kind:8} {this:16.3f} {base:24.3f} {this / base:7.2f} {calls[0]:6d}/{calls[1]:<6d}")
    if args.out:
        args.out.write_text(json.dumps({"baseline": args.baseline, "batch": BATCH, **CONFIG, "cases": rows}, indent=2))


if __name__ == "__main__":
    main()
