"""Crash test: trainers stream fused query+updates while the server is killed with SIGKILL and restarted.

    python tests/crash_harness.py --cycles 100 [--clients 4] [--sync always] [--json out.json]

Each cycle lets the clients write for a random while, kills the server
(SIGKILL, mid-write), waits until every client has seen the failure, restarts
the server on the same data directory, and checks that the recovered memory
equals a serial replay, in commit order, of exactly the acknowledged writes,
plus whichever writes in flight at the kill made it to the log whole (a client
never learns their fate): nothing acknowledged is lost, nothing half-applied.
A bystander memory, written once, must come back unchanged every time.
Snapshots run every half second, so kills also land in the middle of them.
An administrator process meanwhile creates, writes, snapshots and deletes
memories of its own without pause, so kills also land in creates, deletes and
explicit snapshots: an acknowledged create must come back (with at least its
acknowledged writes), an acknowledged delete must stay deleted, and every
memory that comes back must be whole.
tests/test_crash.py runs a short version; this script runs the long one.
"""

from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing
import random
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lifelong_memory.client import MemoryServiceError, connect
from lifelong_memory.server.memory import Memory, MemoryConfig

CONFIG = dict(key_dim=16, memory_size=256, choose_k=16, age_noise=2.0, seed=11)
BATCH, LABELS = 4, 40
MEMORY, BYSTANDER = "crash", "bystander"
SERVE = [sys.executable, "-m", "lifelong_memory.client.cli", "serve", "--log-level", "WARNING"]


def client_batch(client: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic per (client, step), so the replay can regenerate every request."""
    generator = torch.Generator().manual_seed(100_000 * client + step)
    labels = torch.randint(0, LABELS, (BATCH,), generator=generator)
    centres = torch.nn.functional.normalize(
        torch.randn(LABELS, CONFIG["key_dim"], generator=torch.Generator().manual_seed(0)), dim=1
    )
    queries = centres[labels] + 0.4 * torch.randn(BATCH, CONFIG["key_dim"], generator=generator)
    return torch.nn.functional.normalize(queries, dim=1), labels


def each_cycle(who, log_path: str, cycle, stop, paused, work) -> None:
    """Run ``work(log)`` in every cycle until it fails (the server was killed), report the pause, wait for
    the next cycle; ``work`` logs every outcome as JSON lines."""
    seen = 0
    with open(log_path, "a") as log:
        while True:
            while cycle.value == seen and not stop.is_set():
                time.sleep(0.005)
            if stop.is_set():
                return
            seen = cycle.value
            try:
                work(log)
            except MemoryServiceError:
                pass
            log.flush()
            paused.put((who, seen))


def run_client(url: str, client: int, log_path: str, cycle, stop, paused) -> None:
    """Stream fused query + updates into the crash memory."""
    step = 0

    def write(log) -> None:
        nonlocal step
        with connect(url, retries=0) as store, store.memory(MEMORY).stream() as stream:
            while not stop.is_set():
                step += 1
                queries, labels = client_batch(client, step)
                try:
                    result = stream.query(queries, labels, update=True, fields=())
                except MemoryServiceError:
                    log.write(json.dumps({"step": step, "acked": None}) + "\n")
                    raise
                log.write(json.dumps({"step": step, "acked": result.commit_sequence}) + "\n")

    each_cycle(client, log_path, cycle, stop, paused, write)


def admin_round(store, number: int):
    """One round of administration: (operation, memory name, call). Make a memory, write it, snapshot it and
    the crash memory, delete the previous round's memory."""
    name, previous = f"churn-{number}", f"churn-{number - 1}"
    yield "create", name, lambda: store.create_memory(name, **CONFIG)
    yield "write", name, lambda: store.memory(name).query(*client_batch(50, number), update=True)
    yield "snapshot", name, lambda: store.memory(name).snapshot()
    yield "snapshot", MEMORY, lambda: store.memory(MEMORY).snapshot()
    if number > 1:
        yield "delete", previous, lambda: store.delete_memory(previous)


def run_admin(url: str, log_path: str, cycle, stop, paused) -> None:
    """Create, write, snapshot and delete memories, round after round."""
    number = 0

    def administer(log) -> None:
        nonlocal number
        with connect(url, retries=0) as store:
            while not stop.is_set():
                number += 1
                for op, name, call in admin_round(store, number):
                    try:
                        call()
                    except MemoryServiceError:
                        log.write(json.dumps({"op": op, "name": name, "acked": None}) + "\n")
                        raise
                    log.write(json.dumps({"op": op, "name": name, "acked": True}) + "\n")

    each_cycle("admin", log_path, cycle, stop, paused, administer)


def check_admin(url: str, log_path: Path) -> None:
    """Every acknowledged create is there with its acknowledged writes, every acknowledged delete is not,
    and whatever is there is whole (recovered, readable)."""
    expected: dict[str, str] = {}  # name -> "present", "absent" or "either" (the last action's fate unknown)
    writes: dict[str, int] = {}
    for line in log_path.read_text().splitlines():
        entry = json.loads(line)
        op, name, acked = entry["op"], entry["name"], entry["acked"]
        if op == "create":
            expected[name] = "present" if acked else "either"
        elif op == "delete":
            expected[name] = "absent" if acked else "either"
        elif op == "write" and acked:
            writes[name] = writes.get(name, 0) + 1
    with connect(url) as store:
        present = {info.name: info for info in store.list_memories() if info.name.startswith("churn-")}
        for name, fate in expected.items():
            if fate == "present":
                assert name in present, f"acknowledged create of {name} lost"
            if fate == "absent":
                assert name not in present, f"acknowledged delete of {name} undone"
        for name, info in present.items():
            assert name in expected, f"{name} exists but was never created"
            assert info.stats["commit_sequence"] >= writes.get(name, 0), f"acknowledged writes to {name} lost"
            store.memory(name).read_slots(range(CONFIG["memory_size"]))  # whole and readable


def admin_figures(log_path: Path) -> dict:
    """Acknowledged administrator actions, and the kills that hit one in flight, by operation."""
    entries = [json.loads(line) for line in log_path.read_text().splitlines()]
    figures = {"admin_acknowledged": sum(e["acked"] is not None for e in entries)}
    for op in ("create", "write", "snapshot", "delete"):
        figures[f"kills_during_{op}"] = sum(e["acked"] is None and e["op"] == op for e in entries)
    return figures


@dataclass
class Verifier:
    """The replay of what the server acknowledged, verified against each recovered state."""

    replay: Memory = field(default_factory=lambda: Memory(MemoryConfig(**CONFIG)))
    acked: dict[int, tuple[int, int]] = field(default_factory=dict)  # commit sequence -> (client, step)
    read_lines: dict[int, int] = field(default_factory=dict)  # client -> lines of its log consumed
    in_flight_applied: int = 0  # writes whose client saw a failure but which the log kept whole
    in_flight_lost: int = 0  # ... and which it did not (never acknowledged, so nothing lost)

    def check(self, logs: list[Path], recovered: dict) -> None:
        unknown = []
        for client, path in enumerate(logs):
            lines = path.read_text().splitlines()
            for line in lines[self.read_lines.get(client, 0) :]:
                entry = json.loads(line)
                if entry["acked"] is None:
                    unknown.append((client, entry["step"]))
                else:
                    self.acked[entry["acked"]] = (client, entry["step"])
            self.read_lines[client] = len(lines)
        sequence = recovered["commit_sequence"]
        lost = sorted(s for s in self.acked if s > sequence)
        assert not lost, f"acknowledged writes {lost} lost: the server recovered only up to {sequence}"
        start = self.replay.commit_sequence + 1
        missing = [s for s in range(start, sequence + 1) if s not in self.acked]
        assert len(missing) <= len(unknown), f"writes {missing} committed but no client had one in flight"
        # Writes before the first unacknowledged one are certain; replay them once.
        first_missing = missing[0] if missing else sequence + 1
        for s in range(start, first_missing):
            self._apply(self.replay, *self.acked[s])
        for guess in itertools.permutations(unknown, len(missing)):
            trial = Memory(self.replay.config, self.replay.capture())
            chosen = dict(zip(missing, guess, strict=True))
            for s in range(first_missing, sequence + 1):
                self._apply(trial, *(chosen.get(s) or self.acked[s]))
            if _same_state(trial, recovered):
                self.replay = trial
                self.in_flight_applied += len(missing)
                self.in_flight_lost += len(unknown) - len(missing)
                return
        raise AssertionError(f"recovered state at {sequence} is no replay of the acknowledged writes")

    @staticmethod
    def _apply(memory: Memory, client: int, step: int) -> None:
        queries, labels = client_batch(client, step)
        memory.query(queries, labels, update=True, fields=())


def _same_state(memory: Memory, recovered: dict) -> bool:
    read = memory.read_slots(torch.arange(CONFIG["memory_size"]))
    return (
        read.commit_sequence == recovered["commit_sequence"]
        and all(torch.equal(getattr(read, name), recovered[name]) for name in ("keys", "values", "ages", "generations"))
        and read.writers == recovered["writers"]
    )


def read_state(url: str, name: str) -> dict:
    with connect(url) as store:
        memory = store.memory(name)
        return memory.read_slots(range(memory.config.memory_size))._asdict()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`lmem serve` on a data directory, in a subprocess."""

    def __init__(self, data_dir: Path, port: int, sync: str, log_path: Path):
        self.args = [*SERVE, "--port", str(port), "--data-dir", str(data_dir), "--sync", sync]
        self.args += ["--snapshot-interval", "0.5"]
        self.log_path = log_path
        self.process: subprocess.Popen | None = None

    def start(self) -> float:
        started = time.perf_counter()
        with open(self.log_path, "a") as log:
            self.process = subprocess.Popen(self.args, stdout=subprocess.PIPE, stderr=log, text=True)
        line = self.process.stdout.readline()
        if "serving on" not in line:
            raise RuntimeError(f"server did not start: {line!r}; see {self.log_path}")
        return time.perf_counter() - started

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()

    def stop(self) -> int:
        self.process.terminate()
        return self.process.wait(timeout=60)


def run(
    cycles: int, clients: int = 4, sync: str = "always", seed: int = 0, work: Path | None = None, admin: bool = True
) -> dict:
    """Run the crash test; returns its figures. Raises AssertionError on the first wrong recovery."""
    rng = random.Random(seed)
    work = Path(work or tempfile.mkdtemp(prefix="lmem-crash-"))
    port = free_port()
    url = f"grpc://127.0.0.1:{port}"
    server = Server(work / "data", port, sync, work / "server.log")
    server.start()
    with connect(url) as store:
        store.create_memory(MEMORY, **CONFIG)
        bystander = store.create_memory(BYSTANDER, **CONFIG)
        bystander.query(*client_batch(99, 0), update=True)
    bystander_state = read_state(url, BYSTANDER)

    context = multiprocessing.get_context("spawn")
    cycle, stop, paused = context.Value("i", 0), context.Event(), context.Queue()
    logs = [work / f"client-{c}.jsonl" for c in range(clients)]
    processes = [
        context.Process(target=run_client, args=(url, c, str(logs[c]), cycle, stop, paused)) for c in range(clients)
    ]
    admin_log = work / "admin.jsonl"
    if admin:
        processes.append(context.Process(target=run_admin, args=(url, str(admin_log), cycle, stop, paused)))
    for p in processes:
        p.start()
    verifier = Verifier()
    restart_seconds = []
    try:
        for number in range(1, cycles + 1):
            cycle.value = number
            time.sleep(rng.uniform(0.1, 1.0))
            server.kill()
            for _ in processes:
                paused.get(timeout=60)
            restart_seconds.append(server.start())
            verifier.check(logs, read_state(url, MEMORY))
            if admin:
                check_admin(url, admin_log)
            after = read_state(url, BYSTANDER)
            assert all(
                torch.equal(after[k], v) if isinstance(v, torch.Tensor) else after[k] == v
                for k, v in bystander_state.items()
            ), "the bystander memory changed"
    except BaseException:
        server.kill()  # a failed check: the server must not outlive the run
        raise
    finally:
        stop.set()
        for p in processes:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    clean_exit = server.stop()
    assert clean_exit == 0, f"SIGTERM exit status {clean_exit}"
    return {
        "cycles": cycles,
        "clients": clients,
        "sync": sync,
        "acknowledged_writes": len(verifier.acked),
        "final_commit_sequence": verifier.replay.commit_sequence,
        "in_flight_applied": verifier.in_flight_applied,
        "in_flight_lost": verifier.in_flight_lost,
        "lost_acknowledged": 0,
        **(admin_figures(admin_log) if admin else {}),
        "restart_seconds_median": sorted(restart_seconds)[len(restart_seconds) // 2],
        "work_dir": str(work),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cycles", type=int, default=100)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--sync", default="always", choices=("always", "interval", "off"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write the figures here too")
    args = parser.parse_args()
    started = time.perf_counter()
    figures = run(args.cycles, args.clients, args.sync, args.seed)
    figures["seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(figures, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
