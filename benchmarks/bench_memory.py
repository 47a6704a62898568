"""Side-by-side throughput of the memory: raw torch, embedded, and the gRPC server (unary, streamed).

Run from the repository root (the project installed in .venv):

    .venv/bin/python benchmarks/bench_memory.py          # full: N in {8192, 65536, 1048576}, ~11 min on 2 cores
    .venv/bin/python benchmarks/bench_memory.py --quick  # N in {8192, 65536}, 0.5 s per case: ~1.5 min
    .venv/bin/python benchmarks/bench_memory.py --sizes 8192,1048576 --batches 16,256 --out /tmp/r.json
    .venv/bin/python benchmarks/bench_memory.py --device cuda --max-n 10485760   # on a GPU machine

Before each N the memory it needs is checked against what the device has free (an N that does not fit is
skipped and recorded, not half run: N = 10,485,760 with B up to 256 needs about 82 GiB of GPU memory), and the
JSON is rewritten after every (N, B) group ("complete": false until the end), so a run that dies half-way
keeps what it measured.

Everything is measured in one process run, side by side, d=128, k=256. For each N one memory per search
dtype (float32, bfloat16) is created in an embedded store (``connect("local")``) and, identically, on a
server this script starts as a subprocess (``lmem serve`` on a free 127.0.0.1 port; stopped by PID at the
end, also on error). Each memory is pre-filled with N random unit keys with distinct labels; the fill is not
timed. It goes through the public two-phase ``MemoryClient.update`` with a ticket that relies on no slot
(every row then counts as "incorrect" and writes the oldest slot), which skips the search a fused fill
would pay: filling 1M slots through fused queries would take over an hour on 2 cores.

Compared per (N, B):
  raw      ``torch.topk(q @ K.T, k)`` in this process, K [N, 128] in the search dtype (raw bf16 too)
  raw-out  the same with ``torch.mm(q, K.T, out=buffer)`` into a [B, N] buffer kept across calls, as the
           memory's index does (at N=1M, B=256 ``q @ K.T`` allocates and page-faults 1 GiB per call)
  search   ``mem.query(q, fields={"neighbors"})``: query only, no labels (neighbour slots/sims/values)
  query    ``mem.query(q, labels, fields={"positive_negative_keys"})``: what a training step reads
  fused    the same with ``update=True``: query + memory update in one call (a training step)
each through: embedded (in-process), grpc-unary (``mem.query``), grpc-stream (``mem.stream().query``).

Timing: every case of one (N, B) group runs interleaved in rounds (a ~0.05 s slice each per round) so that
noise from a shared machine hits all of them alike; after a warm-up, a case stops once it has >= --min-time
seconds (default 1.5) and >= --min-reps calls (default 3). Reported: the median ms per call and calls/s
(1000 / median ms). Ratios, not absolute numbers, are what to compare across machines.

Anchors, measured in the same rounds as everything else:
  raw       the search alone in torch (above): what the memory's step is compared with
  bare      a bare grpc-python server in its own process (benchmarks/bare_grpc.py: a generic handler that
            moves opaque bytes, no protobuf, no memory), unary and over a bidirectional stream, with requests
            and responses of exactly the bytes of the fused float32 call; once with grpc-python's thread-pool
            server (bare-sync) and once with a grpc.aio server (bare-aio). The time gRPC adds to our call is
            compared with the faster of the two.
  bare-step at N=8192, B=16: bare-aio whose handler runs the same fused step on its own embedded memory
            before answering (``bare_grpc.py --memory-step``). What gRPC adds to it over the embedded call is
            what any grpc-python server doing the memory's work in its process pays; ours is printed against it.

The targets (issue 10; printed at the end and stored in the JSON), all ratios within this one run:
  embedded fused / raw fp32 top-k            <= 1.5 at N=8192, B=16; <= 1.1 at N=1M, B=256
  gRPC's added time, stream / bare stream    <= 1.5 at N=8192, B=16 (fused fp32; added = grpc - embedded)
  gRPC's added time, unary / bare unary      <= 2   at N=8192, B=16
  server Query bf16 vs fp32 speed-up / raw torch's bf16 vs fp32 speed-up   >= 0.85 at N=1M, B=256
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from bare_grpc import BareClient, request_bytes

from lifelong_memory.client import QueryResult, connect
from lifelong_memory.client.store import LocalTransport, Store, query_request
from lifelong_memory.server import wire
from lifelong_memory.server.devices import canonical_device, check_usable
from lifelong_memory.server.memory import MemoryConfig, QueryTicket
from lifelong_memory.server.registry import MemoryRegistry, available_memory_bytes

KEY_DIM = 128
CHOOSE_K = 256
DTYPES = ("float32", "bfloat16")
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
MODES = ("embedded", "grpc-unary", "grpc-stream")
OPS = {
    # name: (labels?, update?, fields)
    "search": (False, False, frozenset({"neighbors"})),
    "query": (True, False, frozenset({"positive_negative_keys"})),
    "fused": (True, True, frozenset({"positive_negative_keys"})),
}
DEFAULT_SIZES = (8_192, 65_536, 1_048_576)
QUICK_SIZES = (8_192, 65_536)
BARE_FLAVOURS = ("bare-sync", "bare-aio")
UNIX_FLAVOURS = ("bare-sync-unix", "bare-aio-unix")
STEP_FLAVOURS = ("bare-aio-step",)  # bare-aio running the fused step itself before answering, at N=8192 B=16
UNIX_MODES = ("unix-unary", "unix-stream")  # the fused float32 call on a server on a Unix socket, at N=8192 B=16
BIG_N, BIG_B = 1_048_576, 256
SMALL_N, SMALL_B = 8_192, 16
FILL_BATCH = 4096
FILL_ROUNDS = 5
N_BATCHES = 8  # distinct query batches cycled through per B


# --------------------------------------------------------------------------- machine


def machine_info(device: str) -> dict:
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    info = {
        "hostname": socket.gethostname(),
        "cpu_model": model,
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "device": device,
    }
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        repo = Path(__file__).resolve().parent.parent
        git = ["git", "-C", str(repo)]
        commit = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10).stdout
        dirty = subprocess.run(
            [*git, "status", "--porcelain", "--", "server", "client"], capture_output=True, text=True
        )
        info["commit"] = commit.strip() + ("+dirty" if dirty.stdout.strip() else "")
    return info


def default_out_path() -> Path:
    host = re.sub(r"[^A-Za-z0-9_.-]+", "-", socket.gethostname()).strip("-") or "cpu"
    return Path(__file__).resolve().parent / "results" / f"memory-{host}.json"


# ---------------------------------------------------------------------------- server


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A server in a subprocess on a free 127.0.0.1 port, or on the Unix socket ``listen`` (unix:///path), ready
    once it prints ``ready_line``; stopped by its PID. By default ``lmem serve``; ``cmd`` may name the address
    as {listen}; ``extra``: more ``lmem serve`` options."""

    def __init__(
        self,
        max_batch: int,
        cmd: list[str] | None = None,
        ready_line: str = "lmem: serving on",
        listen: str | None = None,
        extra: list[str] | tuple[str, ...] = (),
    ):
        self.port = free_port()
        self.target = listen or f"127.0.0.1:{self.port}"  # as gRPC channels take it
        self.url = listen or f"grpc://127.0.0.1:{self.port}"  # as connect() takes it
        self.log = tempfile.NamedTemporaryFile(prefix="bench-lmem-", suffix=".log", delete=False)
        if cmd is None:
            address = ["--listen", listen] if listen else ["--port", str(self.port)]
            cmd = [sys.executable, "-m", "lifelong_memory.client.cli", "serve", *address]
            # Score buffers are allocated up front for batches of --max-batch rows: no more than measured.
            cmd += ["--log-level", "WARNING", "--max-batch", str(max_batch), *extra]
        else:
            cmd = [part.replace("{listen}", self.target) for part in cmd]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self.log, text=True)
        deadline = time.monotonic() + 120
        ready = threading.Event()

        def wait_ready():
            for line in self.proc.stdout:
                if ready_line in line:
                    ready.set()
                    break

        threading.Thread(target=wait_ready, daemon=True).start()
        while not ready.wait(0.1):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"server did not start; see {self.log.name}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def bare_server(flavour: str, listen: str | None = None) -> Server:
    """benchmarks/bare_grpc.py in a subprocess: bare-sync (thread pool) or bare-aio, on TCP or ``listen``;
    bare-aio-step runs the fused step of an embedded memory of N=8192 slots, B=16 rows, in its handler."""
    script = str(Path(__file__).resolve().parent / "bare_grpc.py")
    cmd = [sys.executable, script, "--listen", "{listen}"] + (["--aio"] if flavour.startswith("bare-aio") else [])
    if flavour in STEP_FLAVOURS:
        cmd += ["--memory-step", f"{SMALL_N},{SMALL_B}"]
    return Server(0, cmd, ready_line="bare: serving on", listen=listen)


# ------------------------------------------------------------------------------ data


def unit_rows(n: int, generator: torch.Generator) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.randn(n, KEY_DIM, generator=generator), dim=1)


def fill_batch(n: int) -> int:
    return max(1, min(FILL_BATCH, n // 256))


def fill(mem, n: int, seed: int) -> int:
    """Write ``n`` random unit keys with distinct labels; returns the filled slot count."""
    generator = torch.Generator().manual_seed(seed)
    batch = fill_batch(n)
    label = 0

    def write(rows: int) -> None:
        nonlocal label
        for start in range(0, rows, batch):
            b = min(batch, rows - start)
            q = unit_rows(b, generator)
            y = torch.arange(label, label + b)
            label += b
            none = torch.full((b, 2), -1, dtype=torch.int64)  # relied on no slot: every row writes
            ticket = QueryTicket(none, none.clone(), CHOOSE_K, True)
            mem.update(q, y, QueryResult(0, y, y, ticket=ticket))

    write(n)
    # With age noise (default 8) the last ~16 batches land partly on just-written slots instead of empty
    # ones; a few more rounds fill most of those. Empty keys are zero vectors, which a random query's
    # top 256 never reaches here.
    for _ in range(FILL_ROUNDS):
        filled = mem.info().stats["filled_slots"]
        if filled >= n:
            break
        write(n - filled)
    return mem.info().stats["filled_slots"]


@dataclass
class Case:
    dtype: str
    mode: str  # raw or one of MODES
    op: str  # raw or one of OPS
    fn: object
    times: list[float] = field(default_factory=list)
    spent: float = 0.0

    def done(self, min_time: float, min_reps: int) -> bool:
        return self.spent >= min_time and len(self.times) >= min_reps


def measure(cases: list[Case], sync, min_time: float, min_reps: int, slice_s: float = 0.05) -> None:
    """Interleaved rounds until every case has ``min_time`` seconds and ``min_reps`` calls."""
    for case in cases:  # warm-up: at least 2 calls or ~0.2 s
        start, calls = time.perf_counter(), 0
        while calls < 2 or time.perf_counter() - start < 0.2:
            case.fn(calls)
            sync()
            calls += 1
            if time.perf_counter() - start > 2.0:
                break
    gc.collect()
    i = 0
    while True:
        pending = [c for c in cases if not c.done(min_time, min_reps)]
        if not pending:
            return
        for case in pending:
            round_start = time.perf_counter()
            while True:
                t0 = time.perf_counter()
                case.fn(i)
                sync()
                t1 = time.perf_counter()
                i += 1
                case.times.append(t1 - t0)
                case.spent += t1 - t0
                if t1 - round_start >= slice_s or case.done(min_time, min_reps):
                    break


# ----------------------------------------------------------------------------- bench


def synchronize_every_device() -> None:
    """Wait for every CUDA device, not only the current one: a memory's shards may be on several."""
    for index in range(torch.cuda.device_count()):
        torch.cuda.synchronize(index)


def bytes_needed(n: int, batches: list[int], device: str) -> int:
    """What one N takes on ``device`` at most: a memory per dtype, embedded and on the server (one device),
    the raw baseline's keys in both dtypes and its two score matrices of the largest B."""
    memories = sum(
        MemoryConfig(key_dim=KEY_DIM, memory_size=n, choose_k=CHOOSE_K, search_dtype=dtype, device=device)
        .validated()
        .footprint(max(batches))[device]
        for dtype in DTYPES
    )
    raw = n * KEY_DIM * (4 + 2) + max(batches) * n * (4 + 2) * 2
    return 2 * memories + raw


def bytes_free(device: str) -> int:
    if device == "cpu":
        return available_memory_bytes()
    return torch.cuda.mem_get_info(torch.device(device))[0]


def bench_size(n, batches, device, stores, bare, args, generator, write) -> list[dict]:
    """All cases for one N: memories per dtype, embedded and on the server, then each B, with the bare gRPC
    clients ``bare`` (by flavour) as anchors. ``write(rows)`` saves what is measured so far, after every B."""
    local, remote, unix = stores
    sync = synchronize_every_device if device.startswith("cuda") else (lambda: None)
    mems = {}
    print(f"\n[N={n:,}] creating and filling memories (not timed) ...", flush=True)
    t0 = time.perf_counter()
    for dtype in DTYPES:
        cfg = dict(key_dim=KEY_DIM, memory_size=n, choose_k=CHOOSE_K, search_dtype=dtype, backend="torch")
        cfg.update(device=device, age_noise=args.age_noise)
        name = f"bench-{n}-{dtype}"
        mems[("embedded", dtype)] = local.create_memory(name, **cfg)
        mems[("grpc", dtype)] = remote.create_memory(name, **cfg)
    # Fill the server's memories from a thread while this process fills its own (same seed: same keys).
    filled = {}

    def fill_remote():
        for dtype in DTYPES:
            filled[("grpc", dtype)] = fill(mems[("grpc", dtype)], n, seed=n)

    worker = threading.Thread(target=fill_remote)
    worker.start()
    for dtype in DTYPES:
        filled[("embedded", dtype)] = fill(mems[("embedded", dtype)], n, seed=n)
    worker.join()
    print(f"[N={n:,}] filled in {time.perf_counter() - t0:.1f} s: {filled}", flush=True)

    if unix is not None and n == SMALL_N:
        cfg = dict(key_dim=KEY_DIM, memory_size=n, choose_k=CHOOSE_K, device=device, age_noise=args.age_noise)
        mems[("unix", "float32")] = unix.create_memory(f"bench-{n}-float32", **cfg)
        filled[("unix", "float32")] = fill(mems[("unix", "float32")], n, seed=n)

    # The raw baseline's keys, same size, in each dtype, on the device.
    keys32 = unit_rows(n, torch.Generator().manual_seed(n + 1)).to(device)
    raw_keys = {"float32": keys32, "bfloat16": keys32.to(torch.bfloat16)}

    rows = []
    with contextlib.ExitStack() as stack:
        streams = {dtype: stack.enter_context(mems[("grpc", dtype)].stream()) for dtype in DTYPES}
        if ("unix", "float32") in mems:
            unix_stream = stack.enter_context(mems[("unix", "float32")].stream())
        for b in batches:
            qs = [unit_rows(b, generator) for _ in range(N_BATCHES)]
            ys = [torch.randint(0, n, (b,), generator=generator) for _ in range(N_BATCHES)]
            raw_qs = {dt: [q.to(device=device, dtype=TORCH_DTYPES[dt]) for q in qs] for dt in DTYPES}
            cases = []
            for dtype in DTYPES:

                def raw(i, qs=raw_qs[dtype], keys=raw_keys[dtype]):
                    return torch.topk(qs[i % N_BATCHES] @ keys.T, CHOOSE_K)

                cases.append(Case(dtype, "raw", "raw", raw))
                buffer = torch.empty(b, n, dtype=TORCH_DTYPES[dtype], device=device)

                def raw_out(i, qs=raw_qs[dtype], keys=raw_keys[dtype], buffer=buffer):
                    return torch.topk(torch.mm(qs[i % N_BATCHES], keys.T, out=buffer), CHOOSE_K)

                cases.append(Case(dtype, "raw", "raw-out", raw_out))
            for dtype in DTYPES:
                callers = {
                    "embedded": mems[("embedded", dtype)].query,
                    "grpc-unary": mems[("grpc", dtype)].query,
                    "grpc-stream": streams[dtype].query,
                }
                for op, (labelled, update, fields) in OPS.items():
                    for mode in MODES:

                        def call(i, call=callers[mode], qs=qs, ys=ys if labelled else None, update=update, f=fields):
                            j = i % N_BATCHES
                            return call(qs[j], None if ys is None else ys[j], update=update, fields=f)

                        cases.append(Case(dtype, mode, op, call))
            if ("unix", "float32") in mems and b == SMALL_B:
                labelled, update, fields = OPS["fused"]
                for mode, call in (("unix-unary", mems[("unix", "float32")].query), ("unix-stream", unix_stream.query)):

                    def over_unix(i, call=call, qs=qs, ys=ys, update=update, f=fields):
                        return call(qs[i % N_BATCHES], ys[i % N_BATCHES], update=update, fields=f)

                    cases.append(Case("float32", mode, "fused", over_unix))
            # The bare anchors carry exactly the bytes of the fused float32 call, request and response.
            labelled, update, fields = OPS["fused"]
            sent = query_request(f"bench-{n}-float32", qs[0], ys[0], 0, True, update, fields, "").ByteSize()
            answer = mems[("embedded", "float32")].query(qs[0], ys[0], update=update, fields=fields)
            received = wire.result_to_proto(answer).ByteSize()
            for flavour, client in bare.items():
                if flavour in STEP_FLAVOURS and (n, b) != (SMALL_N, SMALL_B):
                    continue
                message = request_bytes(sent, received)
                for op, call in (("unary", client.unary), ("stream", client.stream)):
                    cases.append(Case("float32", flavour, op, lambda i, call=call, message=message: call(message)))
            t0 = time.perf_counter()
            measure(cases, sync, args.min_time, args.min_reps)
            print(f"[N={n:,} B={b}] measured {len(cases)} cases in {time.perf_counter() - t0:.1f} s", flush=True)
            for case in cases:
                ms = sorted(t * 1e3 for t in case.times)
                sizes = {"request_bytes": sent, "response_bytes": received} if case.mode in bare else {}
                median = statistics.median(ms)
                rows.append(
                    {
                        "N": n,
                        "B": b,
                        "dtype": case.dtype,
                        "mode": case.mode,
                        "op": case.op,
                        "median_ms": median,
                        "calls_per_s": 1e3 / median,
                        "mean_ms": statistics.fmean(ms),
                        "p10_ms": ms[len(ms) // 10],
                        "p90_ms": ms[(len(ms) * 9) // 10],
                        "reps": len(ms),
                        **sizes,
                    }
                )
            print_group(rows, n, b)
            write(rows)
    for dtype in DTYPES:
        local.delete_memory(f"bench-{n}-{dtype}")
        remote.delete_memory(f"bench-{n}-{dtype}")
    if ("unix", "float32") in mems:
        unix.delete_memory(f"bench-{n}-float32")
    return rows


def find(rows, n, b, dtype, mode, op):
    for r in rows:
        if (r["N"], r["B"], r["dtype"], r["mode"], r["op"]) == (n, b, dtype, mode, op):
            return r
    return None


def fmt_ms(ms: float) -> str:
    return f"{ms:.3f}" if ms < 10 else f"{ms:.1f}" if ms < 1000 else f"{ms:.0f}"


def fmt_rate(r: float) -> str:
    return f"{r:.1f}" if r < 10 else f"{r:,.0f}"


def print_group(rows, n, b) -> None:
    """One (N, B) block: per dtype and op, ms/call (calls/s) per mode, gRPC overhead and embedded / raw fp32;
    then the bare gRPC anchors and the time gRPC adds to the fused float32 call against them."""
    raw32 = find(rows, n, b, "float32", "raw", "raw")
    header = (
        f"{'N':>9} {'B':>4} {'dtype':<8} {'op':<6} "
        f"{'embedded ms (c/s)':>19} {'grpc-unary ms (c/s)':>21} {'grpc-stream ms (c/s)':>22} "
        f"{'+unary ms':>9} {'+stream ms':>10} {'emb/raw32':>9}"
    )
    print(header)
    print("-" * len(header))
    for dtype in DTYPES:
        for op, what in (("raw", "torch.topk(q @ K.T, k) in-process"), ("raw-out", "the same, mm into a kept buffer")):
            raw = find(rows, n, b, dtype, "raw", op)
            cell = f"{fmt_ms(raw['median_ms'])} ({fmt_rate(raw['calls_per_s'])})"
            print(f"{n:>9,} {b:>4} {dtype:<8} {op:<7}{cell:>18}   ({what})")
    for dtype in DTYPES:
        for op in OPS:
            cells = []
            for mode in MODES:
                r = find(rows, n, b, dtype, mode, op)
                cells.append(f"{fmt_ms(r['median_ms'])} ({fmt_rate(r['calls_per_s'])})")
            emb, una, stm = (find(rows, n, b, dtype, m, op)["median_ms"] for m in MODES)
            print(
                f"{n:>9,} {b:>4} {dtype:<8} {op:<6} {cells[0]:>19} {cells[1]:>21} {cells[2]:>22} "
                f"{una - emb:>+9.3f} {stm - emb:>+10.3f} {emb / raw32['median_ms']:>8.2f}x"
            )
    unix_unary, unix_stream = (find(rows, n, b, "float32", mode, "fused") for mode in UNIX_MODES)
    if unix_unary is not None:
        emb = find(rows, n, b, "float32", "embedded", "fused")["median_ms"]
        print(
            f"{n:>9,} {b:>4} float32  fused over a Unix socket: unary {fmt_ms(unix_unary['median_ms'])} ms "
            f"({unix_unary['median_ms'] - emb:+.3f}), stream {fmt_ms(unix_stream['median_ms'])} ms "
            f"({unix_stream['median_ms'] - emb:+.3f})"
        )
    for flavour in BARE_FLAVOURS + UNIX_FLAVOURS:
        unary, stream = (find(rows, n, b, "float32", flavour, op) for op in ("unary", "stream"))
        if unary is not None:
            print(
                f"{n:>9,} {b:>4} {flavour:<15} unary {fmt_ms(unary['median_ms'])} ms, stream "
                f"{fmt_ms(stream['median_ms'])} ms (requests of {unary['request_bytes']:,} bytes, responses of "
                f"{unary['response_bytes']:,}: the fused float32 call's)"
            )
    step = step_anchor(rows, n, b)
    if step is not None:
        for op in ("unary", "stream"):
            print(
                f"{n:>9,} {b:>4} bare-aio-step   {op}: {fmt_ms(step[f'{op}_ms'])} ms, "
                f"{step[f'{op}_added_ms']:+.3f} ms over the embedded fused call; "
                f"ours adds {step[f'{op}_ours_ms']:+.3f} ms = {step[f'{op}_ratio']:.2f}x that"
            )
    for transport, modes, flavours in (("TCP", MODES[1:], BARE_FLAVOURS), ("a Unix socket", UNIX_MODES, UNIX_FLAVOURS)):
        added = grpc_added(rows, n, b, modes, flavours)
        if added is not None:
            print(
                f"{n:>9,} {b:>4} over {transport}, gRPC adds to the fused float32 call: stream "
                f"{added['stream_ms']:+.3f} ms = {added['stream_ratio']:.2f}x the bare stream "
                f"({added['bare_stream']}), "
                f"unary {added['unary_ms']:+.3f} ms = {added['unary_ratio']:.2f}x the bare unary call "
                f"({added['bare_unary']})"
            )
    print(flush=True)


def grpc_added(rows, n, b, modes=MODES[1:], flavours=BARE_FLAVOURS) -> dict | None:
    """What gRPC adds to the fused float32 call (over the embedded call) in ``modes`` (unary, stream), against
    the faster of the bare ``flavours``."""
    emb = find(rows, n, b, "float32", "embedded", "fused")
    bare = {
        op: min(
            (r for r in (find(rows, n, b, "float32", f, op) for f in flavours) if r is not None),
            key=lambda r: r["median_ms"],
            default=None,
        )
        for op in ("unary", "stream")
    }
    ours = [find(rows, n, b, "float32", mode, "fused") for mode in modes]
    if emb is None or bare["stream"] is None or None in ours:
        return None
    out = {}
    for op, mine in zip(("unary", "stream"), ours, strict=True):
        added = mine["median_ms"] - emb["median_ms"]
        out[f"{op}_ms"] = added
        out[f"bare_{op}_ms"] = bare[op]["median_ms"]
        out[f"{op}_ratio"] = added / bare[op]["median_ms"]
        out[f"bare_{op}"] = f"{bare[op]['mode']}, {fmt_ms(bare[op]['median_ms'])} ms"
    return out


def step_anchor(rows, n, b) -> dict | None:
    """What gRPC adds to the fused float32 call when a bare aio server runs the same step in its handler
    (bare-aio-step), next to what it adds to ours (both over the embedded call): the part of our added time
    that a server doing the memory's work in Python pays however lean its protocol and servicer."""
    emb = find(rows, n, b, "float32", "embedded", "fused")
    out = {}
    for op, mode in (("unary", "grpc-unary"), ("stream", "grpc-stream")):
        step, ours = find(rows, n, b, "float32", STEP_FLAVOURS[0], op), find(rows, n, b, "float32", mode, "fused")
        if emb is None or step is None or ours is None:
            return None
        out[f"{op}_ms"] = step["median_ms"]
        out[f"{op}_added_ms"] = step["median_ms"] - emb["median_ms"]
        out[f"{op}_ours_ms"] = ours["median_ms"] - emb["median_ms"]
        out[f"{op}_ratio"] = out[f"{op}_ours_ms"] / out[f"{op}_added_ms"]
    return out


def targets(rows) -> list[dict]:
    out = []

    def add(name, measured, goal, passed, detail):
        out.append({"target": name, "measured": measured, "goal": goal, "pass": passed, "detail": detail})

    for (n, b), goal in (((SMALL_N, SMALL_B), 1.5), ((BIG_N, BIG_B), 1.1)):
        name = f"embedded fused / raw fp32 top-k, N={n:,} B={b}"
        emb, raw = find(rows, n, b, "float32", "embedded", "fused"), find(rows, n, b, "float32", "raw", "raw")
        if emb is None:
            add(name, None, f"<= {goal}x", None, f"N={n:,} B={b} not run")
            continue
        ratio = emb["median_ms"] / raw["median_ms"]
        raw_out = find(rows, n, b, "float32", "raw", "raw-out")
        add(
            name,
            round(ratio, 3),
            f"<= {goal}x",
            ratio <= goal,
            f"{fmt_ms(emb['median_ms'])} ms vs raw {fmt_ms(raw['median_ms'])} ms "
            f"(raw into a kept buffer: {fmt_ms(raw_out['median_ms'])} ms)",
        )

    n, b = SMALL_N, SMALL_B
    added = grpc_added(rows, n, b)
    for op, goal in (("stream", 1.5), ("unary", 2.0)):
        name = f"time gRPC adds to a fused call ({op}) / bare grpc-python {op}, N={n:,} B={b}"
        if added is None:
            add(name, None, f"<= {goal}x", None, f"N={n:,} B={b} not run")
            continue
        add(
            name,
            round(added[f"{op}_ratio"], 3),
            f"<= {goal}x",
            added[f"{op}_ratio"] <= goal,
            f"adds {added[f'{op}_ms']:.3f} ms; bare {added[f'bare_{op}']}",
        )

    step = step_anchor(rows, n, b)
    if step is not None:
        for op in ("stream", "unary"):
            add(
                f"(info) the same / what gRPC adds to a bare aio server doing the step ({op}), N={n:,} B={b}",
                round(step[f"{op}_ratio"], 3),
                "info",
                None,
                f"adds {step[f'{op}_ours_ms']:.3f} ms; bare-aio-step adds {step[f'{op}_added_ms']:.3f} ms",
            )

    added = grpc_added(rows, n, b, UNIX_MODES, UNIX_FLAVOURS)
    if added is not None:
        for op in ("stream", "unary"):
            add(
                f"(info) the same over a Unix socket ({op}) / bare {op} over it, N={n:,} B={b}",
                round(added[f"{op}_ratio"], 3),
                "info",
                None,
                f"adds {added[f'{op}_ms']:.3f} ms; bare {added[f'bare_{op}']}",
            )

    n, b = BIG_N, BIG_B
    name = f"server Query bf16/fp32 speed-up vs raw torch's, N={n:,} B={b}"
    raw32, raw16 = find(rows, n, b, "float32", "raw", "raw"), find(rows, n, b, "bfloat16", "raw", "raw")
    if raw32 is None:
        add(name, None, ">= 0.85x", None, f"N={n:,} not run")
    else:
        r32, r16 = (find(rows, n, b, dtype, "grpc-unary", "query") for dtype in DTYPES)
        server_speedup = r32["median_ms"] / r16["median_ms"]
        raw_speedup = raw32["median_ms"] / raw16["median_ms"]
        add(
            name,
            round(server_speedup / raw_speedup, 3),
            ">= 0.85x",
            server_speedup / raw_speedup >= 0.85,
            f"server {server_speedup:.2f}x ({fmt_ms(r16['median_ms'])} vs {fmt_ms(r32['median_ms'])} ms), "
            f"raw torch {raw_speedup:.2f}x",
        )
        add(
            f"(info) server Query fp32 vs raw torch fp32, N={n:,} B={b}",
            round(raw32["median_ms"] / r32["median_ms"], 3),
            "info",
            None,
            f"{fmt_ms(r32['median_ms'])} ms vs raw {fmt_ms(raw32['median_ms'])} ms per call",
        )
    return out


def print_targets(results) -> None:
    print("TARGETS")
    width = max(len(t["target"]) for t in results)
    for t in results:
        verdict = {True: "PASS", False: "FAIL", None: "-"}[t["pass"]]
        measured = "n/a" if t["measured"] is None else t["measured"]
        print(f"  {t['target']:<{width}}  measured {measured!s:>8}  goal {t['goal']:<9} {verdict:<4}  {t['detail']}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="only N=8192 and 65536, --min-time 0.5 (~1.5 min)")
    parser.add_argument("--sizes", help="comma-separated memory sizes N (default 8192,65536,1048576)")
    parser.add_argument("--max-n", type=int, help="largest N: drops larger sizes and adds this one (e.g. 10485760)")
    parser.add_argument("--batches", default="16,256", help="comma-separated batch sizes B (default 16,256)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]: memories and raw baseline")
    parser.add_argument("--min-time", type=float, help="seconds measured per case (default 1.5; 0.5 with --quick)")
    parser.add_argument("--min-reps", type=int, default=3, help="calls measured per case at least (default 3)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--age-noise", type=float, default=8.0, help="memories' age_noise (library default 8)")
    parser.add_argument("--out", type=Path, help="JSON path (default benchmarks/results/memory-HOSTNAME.json)")
    args = parser.parse_args(argv)

    if args.sizes:
        sizes = [int(s) for s in args.sizes.split(",")]
    else:
        sizes = list(QUICK_SIZES if args.quick else DEFAULT_SIZES)
    if args.max_n:
        sizes = sorted({s for s in sizes if s <= args.max_n} | {args.max_n})
    batches = [int(b) for b in args.batches.split(",")]
    if args.min_time is None:
        args.min_time = 0.5 if args.quick else 1.5
    try:
        args.device = canonical_device(args.device, "--device")
        check_usable(args.device, "--device")
    except ValueError as exc:
        parser.error(str(exc))
    out_path = args.out or default_out_path()

    info = machine_info(args.device)
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    print(
        f"bench_memory: {info['cpu_model']}, {info['cpu_count']} CPUs, torch {info['torch']} "
        f"({info['torch_threads']} threads), device {args.device}{' ' + info['gpu'] if 'gpu' in info else ''}"
    )
    print(f"d={KEY_DIM} k={CHOOSE_K} N={sizes} B={batches} dtypes={list(DTYPES)}; median ms/call (calls/s)")
    print("  raw    torch.topk(q @ K.T, k), K in the search dtype, in this process; raw-out: mm into a kept buffer")
    print('  search mem.query(q, fields={"neighbors"}): query only, no labels')
    print('  query  mem.query(q, labels, fields={"positive_negative_keys"}): a training step\'s read')
    print("  fused  the same with update=True: query + memory update in one call")
    print("  +unary/+stream: ms gRPC adds per call over embedded; emb/raw32: embedded ms / raw fp32 top-k ms")

    generator = torch.Generator().manual_seed(args.seed)
    # SIGTERM unwinds like Ctrl-C, so the server subprocess is stopped in the finally below.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    rows: list[dict] = []
    skipped: list[dict] = []

    def write(measured: list[dict], result_targets: list[dict] | None = None) -> None:
        """The report so far, replacing the file atomically: a run that dies keeps every finished group."""
        out_path.parent.mkdir(parents=True, exist_ok=True)
        report = report_header | {"results": measured, "skipped": skipped, "complete": result_targets is not None}
        if result_targets is not None:
            report["targets"] = result_targets
        partial = out_path.with_suffix(".json.tmp")
        partial.write_text(json.dumps(report, indent=2) + "\n")
        os.replace(partial, out_path)

    report_header = {
        "benchmark": "bench_memory",
        "started": started,
        "machine": info,
        "settings": {
            "key_dim": KEY_DIM,
            "choose_k": CHOOSE_K,
            "sizes": sizes,
            "batches": batches,
            "dtypes": list(DTYPES),
            "ops": {op: {"labels": lab, "update": upd, "fields": sorted(f)} for op, (lab, upd, f) in OPS.items()},
            "min_time_s": args.min_time,
            "min_reps": args.min_reps,
            "age_noise": args.age_noise,
            "seed": args.seed,
            "fill": "two-phase update with a ticket relying on no slot, batches of 4096, distinct labels",
        },
    }
    # The fill writes batches of up to FILL_BATCH rows: the memories must take those as well as the measured ones.
    max_batch = max(*batches, *(fill_batch(n) for n in sizes))
    sockets = tempfile.mkdtemp(prefix="bench-lmem-")  # the Unix sockets' folder
    servers = [Server(max_batch)]
    try:
        bare = {}
        for flavour in BARE_FLAVOURS:
            servers.append(bare_server(flavour))
            bare[flavour] = BareClient(servers[-1].target)
        unix = None
        if SMALL_N in sizes and SMALL_B in batches:  # at the target shape: the step anchor, and Unix sockets
            for flavour in STEP_FLAVOURS:
                servers.append(bare_server(flavour))
                bare[flavour] = BareClient(servers[-1].target)
            servers.append(Server(max_batch, listen=f"unix://{sockets}/lmem.sock"))
            unix = connect(servers[-1].url)
            for flavour in UNIX_FLAVOURS:
                servers.append(bare_server(flavour, listen=f"unix://{sockets}/{flavour}.sock"))
                bare[flavour] = BareClient(servers[-1].target)
        local_store = Store(LocalTransport(MemoryRegistry(max_batch=max_batch, max_memories=len(DTYPES))))
        with local_store as local, connect(servers[0].url) as remote:
            for n in sizes:
                needed, free = bytes_needed(n, batches, args.device), bytes_free(args.device)
                if needed > free:
                    reason = f"needs about {needed / 2**30:.1f} GiB on {args.device}, {free / 2**30:.1f} GiB are free"
                    print(f"\n[N={n:,}] skipped: {reason}", flush=True)
                    skipped.append({"N": n, "reason": reason})
                    continue
                rows += bench_size(n, batches, args.device, (local, remote, unix), bare, args, generator, write)
                gc.collect()  # this N's memories and baseline, before the next N's free-memory check
                if args.device != "cpu":
                    torch.cuda.empty_cache()
        for client in bare.values():
            client.close()
        if unix is not None:
            unix.close()
    finally:
        for server in servers:
            server.stop()
        shutil.rmtree(sockets, ignore_errors=True)
        write(rows)

    result_targets = targets(rows)
    print_targets(result_targets)
    write(rows, result_targets)
    print(f"\nwrote {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
