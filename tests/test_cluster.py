"""One memory sharded over the nodes of a Ray cluster (server/cluster.py, docs/scale-out.md).

A cluster of three nodes on this machine (ray.cluster_utils.Cluster: a head and two workers; placement
node spreads a memory's shards over them), started once for the module, and a gRPC server in this process
whose registry places memories with placement "node" on it. The same checks as on a single server: the
equivalence tests against the independent numpy reference, bad input and tokens. Then faults: shard
processes stopped and killed (SIGSTOP, SIGKILL, by PID) mid-stream; the memory answers UNAVAILABLE until
Ray has restarted the shard and it has recovered from its data directory, and every acknowledged write is
there, the state a serial replay of them.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import threading
import time
import warnings

import pytest
import torch
from cluster_harness import check_shards_hold_the_memory, stream_through_shard_faults
from crash_harness import CONFIG as CRASH_CONFIG
from crash_harness import Verifier, client_batch, free_port
from test_bad_input import BAD_QUERIES, Q, Y, fill, raises_invalid, unchanged
from test_bad_input import CONFIG as BAD_INPUT_CONFIG
from test_equivalence import ClientDriver, config, reference_for, run_fill_in_order, run_stream, run_unlabelled

from lifelong_memory.client import AlreadyExists, Unavailable, connect
from lifelong_memory.server.auth import TokenAuth
from lifelong_memory.server.cluster import NAMESPACE, RayCluster
from lifelong_memory.server.errors import FailedPrecondition, PermissionDenied, ResourceExhausted, Unauthenticated
from lifelong_memory.server.memory import Memory, MemoryConfig
from lifelong_memory.server.registry import MemoryRegistry
from lifelong_memory.server.service import ServerLimits, build_server

ray = pytest.importorskip("ray", reason="the cluster tests need Ray: pip install -e '.[cluster]'")

NODES = 3
LMEM = [sys.executable, "-m", "lifelong_memory.client.cli"]
# Logical CPUs per node: each shard's actor reserves one, and a few memories live at once (module fixtures).
NODE_CPUS = 4


# What Ray raises when a node's raylet does not register in its fixed 30 s, and when the GCS server does not publish
# its port within RAY_gcs_server_port_wait_time_s.
START_TIMEOUTS = ("timed out during startup", "Timed out waiting for file")


def started_node(start, attempts: int = 3):
    """``start()`` (a Ray node's start), again if it times out. Ray's raylet wait has run out on 2 cores busy with
    other work; in two CI runs the head's GCS server ended before it wrote even its log (left unreaped: Ray waits
    for its port file regardless), and the first time every test here errored; the second start worked. What a
    failed start left (this process's new descendants) is reported, as what each was running and where it waited
    or how it ended, and ended."""
    for attempt in range(attempts):
        before = descendants()
        try:
            return start()
        except Exception as exc:
            if not any(message in str(exc) for message in START_TIMEOUTS) or attempt == attempts - 1:
                raise
            left = descendants() - before
            report = f"Ray node start {attempt + 1} timed out ({exc}); it left {process_states(left)}"
            warnings.warn(report, stacklevel=2)
            for pid in left:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


def stat_fields(pid) -> list[str]:
    """/proc/PID/stat's fields from the state on (proc(5)'s third): the command name before them may hold spaces."""
    return pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def descendants() -> set[int]:
    """This process's children, theirs, and so on (from /proc)."""
    parents = {}
    for stat in pathlib.Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):  # a process that ended meanwhile
            parents[int(stat.parent.name)] = int(stat_fields(stat.parent.name)[1])
    found, frontier = set(), {os.getpid()}
    while frontier:
        frontier = {pid for pid, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def process_states(pids) -> str:
    """Each process's command line and the kernel function it sleeps in (a python child of this process that never
    reached its exec shows this test's own command line), or, for one that ended unreaped (two CI runs: the GCS
    server, before it wrote a log), its exit: the signal that ended it or its status."""
    states = []
    for pid in sorted(pids):
        with contextlib.suppress(OSError):
            proc = pathlib.Path(f"/proc/{pid}")
            stat = stat_fields(pid)
            if stat[0] == "Z":  # the exit code is proc(5)'s 52nd field
                wait_status = int(stat[49])
                ended = f"signal {wait_status & 0x7F}" if wait_status & 0x7F else f"status {wait_status >> 8}"
                states.append(f"{pid} ended unreaped ({proc.joinpath('comm').read_text().strip()}, {ended})")
                continue
            command = proc.joinpath("cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")[:120]
            states.append(f"{pid} [{proc.joinpath('wchan').read_text()}] {command}")
    return "; ".join(states) or "nothing"


def test_a_node_start_that_times_out_is_retried_after_ending_what_it_started():
    started = []

    def until(condition):
        deadline = time.monotonic() + 10
        while not condition():
            assert time.monotonic() < deadline
            time.sleep(0.01)

    def start():  # the first start leaves a process asleep, the second one that crashed unreaped, the third works
        if len(started) == 0:
            started.append(subprocess.Popen(["sleep", "600"]))
            until(lambda: pathlib.Path(f"/proc/{started[-1].pid}/cmdline").read_bytes()[:5] == b"sleep")  # exec'd
        elif len(started) == 1:
            started.append(subprocess.Popen(["sh", "-c", "kill -SEGV $$"]))
            until(lambda: stat_fields(started[-1].pid)[0] == "Z")
        else:
            return "node"
        raise Exception(START_TIMEOUTS[len(started) - 1] + ": Ray's words, as it raises them")

    with pytest.warns(UserWarning, match=r"start [12] timed out") as reports:
        assert started_node(start) == "node"
    assert [str(report.message).split(" timed out")[0] for report in reports] == [
        "Ray node start 1",
        "Ray node start 2",
    ]
    assert re.search(r"left \d+ \[\w+\] sleep 600", str(reports[0].message))
    assert re.search(r"left \d+ ended unreaped \(sh, signal 11\)", str(reports[1].message))
    assert [p.wait(timeout=10) for p in started] == [-signal.SIGKILL, -signal.SIGSEGV]

    def fails_otherwise():
        raise ValueError("another failure")

    with pytest.raises(ValueError, match="another failure"):  # not a timeout: not retried
        started_node(fails_otherwise)


@pytest.fixture(scope="module")
def ray_cluster():
    from ray.cluster_utils import Cluster

    # Ray waits 30 s for its GCS server's port; twice that for 2 busy cores. In two CI runs the server had ended
    # (started_node), where no wait helps and a second start did.
    os.environ.setdefault("RAY_gcs_server_port_wait_time_s", "60")

    head = {"num_cpus": NODE_CPUS, "include_dashboard": False}
    cluster = started_node(lambda: Cluster(initialize_head=True, head_node_args=head))
    for _ in range(NODES - 1):
        started_node(lambda: cluster.add_node(num_cpus=NODE_CPUS))
    ray.init(address=cluster.address, namespace=NAMESPACE, log_to_driver=False)
    cluster.wait_for_nodes()
    yield cluster
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture(scope="module")
def registry(ray_cluster, tmp_path_factory):
    shards = tmp_path_factory.mktemp("shards")
    return MemoryRegistry(max_memories=100, cluster=RayCluster(ray_cluster.address, str(shards), call_timeout=20.0))


@pytest.fixture(scope="module")
def server_url(registry):
    server, port = build_server("127.0.0.1:0", registry, ServerLimits(max_batch=512))
    server.start()
    yield f"grpc://127.0.0.1:{port}"
    server.stop(grace=None)


@pytest.fixture
def store(server_url):
    """A client of the cluster's front end; memories it creates are deleted afterwards (with their shards)."""
    with connect(server_url, timeout=CLIENT_TIMEOUT) as store:
        before = {info.name for info in store.list_memories()}
        yield store
        for info in store.list_memories():
            if info.name not in before:
                store.delete_memory(info.name)


def on_cluster(cfg: dict) -> dict:
    return {**cfg, "placement": "node"}


# ----------------------------------------------------------------------------- the same answers
@pytest.mark.parametrize("shards", [2, 3])
@pytest.mark.parametrize(
    "correct_in_top, use_recent, noise",
    [
        pytest.param(1, True, (0.0, 0, ()), id="top1-recent"),
        pytest.param(2, False, (0.0, 0, ()), id="top2-no-recent"),
        pytest.param(1, True, (4.0, 123, ()), id="top1-recent-noise"),
    ],
)
def test_stream_matches_reference_on_the_cluster(store, shards, correct_in_top, use_recent, noise):
    cfg = config("torch", shards, correct_in_top, noise=noise)
    run_stream(
        ClientDriver(store, **on_cluster(cfg)),
        reference_for(cfg),
        use_recent=use_recent,
        seed=shards * 10 + correct_in_top,
    )


@pytest.mark.parametrize("shards", [2, 3])
def test_empty_memory_fills_in_order_on_the_cluster(store, shards):
    cfg = config("torch", shards, 1, memory_size=32)
    driver = ClientDriver(store, **on_cluster(cfg))
    assert len(driver.memory.info().shards) == shards
    run_fill_in_order(driver, reference_for(cfg))


def test_query_without_labels_on_the_cluster(store):
    cfg = config("torch", 3, 1)
    driver = ClientDriver(store, **on_cluster(cfg))
    assert len(driver.memory.info().shards) == 3
    run_unlabelled(driver, reference_for(cfg))


def test_shards_are_actors_on_different_nodes(store):
    memory = store.create_memory("spread", **on_cluster(config("torch", 3, 1)))
    shards = memory.info().shards
    assert [(s.shard, s.slot_start, s.slot_stop) for s in shards] == [(0, 0, 21), (1, 21, 42), (2, 42, 64)]
    assert all(s.state == "serving" and s.commit_sequence == 0 for s in shards)
    assert len({s.node.split()[0] for s in shards}) == NODES
    assert len({s.pid for s in shards}) == NODES and os.getpid() not in {s.pid for s in shards}


def test_a_local_memory_beside_has_no_shard_actors(store):
    assert store.create_memory("local-beside", **config("torch", 2, 1)).info().shards == []


def test_a_memory_being_deleted_keeps_its_name_until_its_shards_are_gone(registry, monkeypatch):
    """The shards are dropped by the memory's name: a create of that name before they are gone would have its
    new shards dropped by the delete (they answered UNAVAILABLE until a restart)."""
    cfg = on_cluster(config("torch", 2, 1))
    registry.create("renamed", **cfg)
    dropping, release = threading.Event(), threading.Event()
    drop = registry.cluster.drop

    def slow_drop(name):
        dropping.set()
        assert release.wait(60)
        drop(name)

    monkeypatch.setattr(registry.cluster, "drop", slow_drop)
    deleter = threading.Thread(target=registry.delete, args=("renamed",))
    deleter.start()
    try:
        assert dropping.wait(60)
        with pytest.raises(AlreadyExists):  # the old shards are still being dropped
            registry.create("renamed", **cfg)
    finally:
        release.set()
        deleter.join(60)
    monkeypatch.undo()
    again = registry.create("renamed", **cfg)
    try:
        queries = torch.nn.functional.normalize(torch.randn(3, cfg["key_dim"]), dim=1)
        assert again.query(queries, torch.arange(3), update=True).commit_sequence == 1
        assert again.query(queries).commit_sequence == 1  # its shards answer
    finally:
        registry.delete("renamed")


def test_cluster_placement_without_a_cluster_is_refused():
    with connect("local") as store, pytest.raises(FailedPrecondition, match="config.placement"):
        store.create_memory("no-cluster", **on_cluster(config("torch", 2, 1)))


# ----------------------------------------------------------------------------- bad input, tokens
@pytest.fixture(scope="module")
def mem(server_url):
    """One filled memory for every bad request (each leaves it unchanged, which is what they check)."""
    with connect(server_url, timeout=CLIENT_TIMEOUT) as store:
        handle = store.create_memory("bad-input", **on_cluster({**BAD_INPUT_CONFIG, "shards": 3}))
        fill(handle)
        yield handle
        store.delete_memory("bad-input")


@pytest.mark.parametrize("update", [False, True], ids=["query", "fused-update"])
@pytest.mark.parametrize("queries, labels, kwargs, field", BAD_QUERIES)
def test_bad_query_is_rejected_on_the_cluster(mem, update, queries, labels, kwargs, field):
    with unchanged(mem), raises_invalid(field):
        mem.query(queries, labels, update=update, **kwargs)


@pytest.mark.parametrize(
    "cfg, field", [({"placement": "rack"}, "config.placement"), ({"backend": "faiss"}, "config.backend")]
)
def test_bad_cluster_config_is_rejected(store, cfg, field):
    with raises_invalid(field):
        store.create_memory("bad-config", **{**on_cluster(config("torch", 2, 1)), **cfg})
    assert "bad-config" not in {info.name for info in store.list_memories()}


def test_tokens_guard_a_memory_on_the_cluster(registry):
    auth = TokenAuth({"writer-token": "read-write", "reader-token": "read-only"})
    server, port = build_server("127.0.0.1:0", registry, ServerLimits(max_batch=512), auth=auth)
    server.start()
    url = f"grpc://127.0.0.1:{port}"
    queries, labels = Q, Y
    try:
        with connect(url, token="writer-token", timeout=CLIENT_TIMEOUT) as writer:
            memory = writer.create_memory("guarded", **on_cluster({**BAD_INPUT_CONFIG, "shards": 2}))
            fill(memory)
            with connect(url, token="reader-token", timeout=CLIENT_TIMEOUT) as reader:
                guarded = reader.memory("guarded")
                assert guarded.query(queries, labels).predictions.shape == (len(queries),)  # reading is allowed
            with connect(url, token="reader-token", timeout=CLIENT_TIMEOUT) as reader, unchanged(memory):
                guarded = reader.memory("guarded")
                for attempt in (lambda: guarded.query(queries, labels, update=True), guarded.clear):
                    with pytest.raises(PermissionDenied, match="read-only"):
                        attempt()
            with connect(url, timeout=CLIENT_TIMEOUT) as anonymous, unchanged(memory), pytest.raises(Unauthenticated):
                anonymous.memory("guarded").query(queries, labels, update=True)
            writer.delete_memory("guarded")
    finally:
        server.stop(grace=None)


# ----------------------------------------------------------------------------- faults
# How long the fault test's front end waits for a shard: a frozen shard then costs a call this long.
FAULT_CALL_TIMEOUT = 5.0
# A create waits for its shards' actors to start (up to the server's STARTUP_TIMEOUT, 120 s): on a loaded 2-core
# machine that took more than the client's default deadline of 30 s.
CLIENT_TIMEOUT = 180.0


@pytest.fixture
def fault_server(ray_cluster, tmp_path):
    """A front end of its own, with a short wait for shards, and its registry."""
    cluster = RayCluster(ray_cluster.address, str(tmp_path / "shards"), call_timeout=FAULT_CALL_TIMEOUT)
    registry = MemoryRegistry(cluster=cluster)
    server, port = build_server("127.0.0.1:0", registry, ServerLimits(max_batch=512))
    server.start()
    yield f"grpc://127.0.0.1:{port}", registry
    for name, _ in registry.list():
        registry.delete(name)
    server.stop(grace=None)


def test_shards_the_cluster_has_no_room_for_are_resource_exhausted(fault_server):
    """More shards than the cluster has CPUs: the create waits --shard-timeout, answers RESOURCE_EXHAUSTED
    naming config.shards, and leaves nothing behind (a memory that fits is placed right after)."""
    url, registry = fault_server
    with connect(url, retries=0, timeout=CLIENT_TIMEOUT) as store:
        with pytest.raises(ResourceExhausted, match="config.shards: the cluster found no room for 64 shards"):
            store.create_memory("too-many", **on_cluster({**config("torch", 64, 1), "memory_size": 64}))
        assert store.list_memories() == []
        fits = store.create_memory("fits", **on_cluster(config("torch", NODES, 1)))
        assert [s.state for s in fits.info().shards] == ["serving"] * NODES


def test_a_killed_shard_answers_unavailable_then_recovers_from_its_data_directory(fault_server, tmp_path):
    """A writer streams fused updates while, from another thread, one shard after another is stopped mid-stream
    (SIGSTOP: the memory must answer UNAVAILABLE, never wait forever or answer without it) and then SIGKILLed,
    or SIGKILLed at once; every call is either acknowledged or UNAVAILABLE (the writer goes on with its next
    batch). After each restart: the shard read its keys back from its own data directory, every acknowledged
    write is there, the memory is a serial replay of exactly them (the crash harness's check; no write answered
    UNAVAILABLE was applied), its shards hold the front end's keys and it searches as a replay in one process
    (tests/cluster_harness.py, which also runs the long version)."""
    url, registry = fault_server
    with connect(url, retries=0, timeout=CLIENT_TIMEOUT) as store:
        memory = store.create_memory("faults", **on_cluster({**CRASH_CONFIG, "shards": 3}))
        cycles = [(1, "stop"), (0, "kill"), (2, "stop"), (1, "kill")]
        figures = stream_through_shard_faults(memory, registry.get("faults").index.actors, cycles, tmp_path / "log")
    assert figures["unavailable_answers"] >= 2 and figures["unavailable_applied"] == 0
    assert figures["final_commit_sequence"] == figures["acknowledged_writes"] >= 100 + 4


# ----------------------------------------------------------------------------- lmem serve --cluster
def lmem(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*LMEM, *args], capture_output=True, text=True, timeout=2 * CLIENT_TIMEOUT)


def start_front_end(address: str, port: int, tmp_path) -> subprocess.Popen:
    serve = [*LMEM, "serve", "--port", str(port), "--log-level", "WARNING", "--cluster", address]
    # Long enough for a shard on a loaded 2-core machine; the stopped shard below costs one such wait.
    serve += ["--placement", "node", "--shards", "2", "--shard-timeout", "10"]
    serve += ["--data-dir", str(tmp_path / "front-end"), "--shard-data-dir", str(tmp_path / "shards")]
    with open(tmp_path / "front-end.stderr", "a") as stderr:
        process = subprocess.Popen(serve, stdout=subprocess.PIPE, stderr=stderr, text=True)
    assert "serving on 127.0.0.1:" in process.stdout.readline()
    return process


def stops_cleanly(process: subprocess.Popen, tmp_path, timeout: float = 120) -> bool:
    """SIGTERM, then whether the front end exited 0 within ``timeout``; if it is still running, it fails the test
    with every thread's stack (the server prints them on SIGUSR1), since where it waits is the finding."""
    process.send_signal(signal.SIGTERM)
    try:
        return process.wait(timeout=timeout) == 0
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGUSR1)
        time.sleep(2)
        pytest.fail(f"no exit {timeout} s after SIGTERM; its threads:\n{(tmp_path / 'front-end.stderr').read_text()}")


def test_lmem_serve_cluster_shows_shards_and_restarts_without_loss(ray_cluster, tmp_path):
    """`lmem serve --cluster`: lmem create places the shards (the server's --placement node default), ls, describe
    and stats show each shard's node and health, a stopped shard shows as unavailable; the front end killed
    (SIGKILL) and started again comes back with every acknowledged write, its shards placed anew."""
    port = free_port()
    url = f"grpc://127.0.0.1:{port}"
    process = start_front_end(ray_cluster.address, port, tmp_path)
    try:
        created = lmem("create", "cli-cluster", "--key-dim", "16", "--memory-size", "64", "--url", url, "--json",
                       "--timeout", str(CLIENT_TIMEOUT))  # fmt: skip
        assert created.returncode == 0, created.stderr
        shards = json.loads(created.stdout)["shards"]
        assert [s["state"] for s in shards] == ["serving", "serving"] and shards[0]["node"] != shards[1]["node"]
        with connect(url, timeout=CLIENT_TIMEOUT) as store:
            memory = store.memory("cli-cluster")
            for step in range(1, 31):
                memory.query(*client_batch(0, step), update=True)
            before = memory.read_slots(range(64))
        listed = lmem("ls", "--url", url)
        assert "shard health" in listed.stdout and "2/2 serving" in listed.stdout, listed.stdout
        stats = json.loads(lmem("stats", "cli-cluster", "--url", url, "--json").stdout)
        assert stats["commit_sequence"] == 30
        assert [(s["shard"], s["state"]) for s in stats["shards"]] == [(0, "serving"), (1, "serving")]
        stopped = shards[1]["pid"]
        os.kill(stopped, signal.SIGSTOP)
        described = lmem("describe", "cli-cluster", "--url", url)
        assert described.returncode == 0, described.stderr
        assert "unavailable" in described.stdout and "shards:" in described.stdout, described.stdout
        os.kill(stopped, signal.SIGKILL)
        process.kill()  # the front end, mid-life: its shards (its actors) end with it
        process.wait()
        process = start_front_end(ray_cluster.address, port, tmp_path)
        with connect(url, timeout=CLIENT_TIMEOUT) as store:
            memory = store.memory("cli-cluster")
            after = memory.read_slots(range(64))
            assert after.commit_sequence == before.commit_sequence == 30
            for name in ("keys", "values", "ages", "generations"):
                assert torch.equal(getattr(after, name), getattr(before, name)), name
            shards = memory.info().shards
            assert [s.state for s in shards] == ["serving", "serving"] and stopped not in {s.pid for s in shards}
            replay = Memory(MemoryConfig(key_dim=16, memory_size=64))
            for step in range(1, 31):
                replay.query(*client_batch(0, step), update=True)
            probe = torch.nn.functional.normalize(torch.randn(8, 16), dim=1)
            got, want = memory.query(probe, fields={"neighbors"}), replay.query(probe, fields={"neighbors"})
            assert torch.equal(got.neighbor_slots, want.neighbor_slots)
            assert torch.equal(got.neighbor_similarities, want.neighbor_similarities)
        assert stops_cleanly(process, tmp_path)  # snapshots, then leaves the cluster
    finally:
        process.kill()
        process.wait()


def test_a_shard_s_node_killed_moves_it_to_another_node_which_rebuilds_it(ray_cluster, fault_server, tmp_path):
    """The node of one shard dies mid-stream (its raylet and the shard's worker SIGKILLed by PID): the memory
    answers UNAVAILABLE until Ray has placed the shard on another node, where its data directory is empty; the
    front end rebuilds it there from its own keys, and every acknowledged write is in the memory. Runs last in
    this module: a fresh node replaces the dead one at the end."""
    from ray._private import ray_constants

    url, registry = fault_server
    store = connect(url, retries=0, timeout=CLIENT_TIMEOUT)
    memory = store.create_memory("node-fault", **on_cluster({**CRASH_CONFIG, "shards": 3}))
    actors = registry.get("node-fault").index.actors
    log_path = tmp_path / "client-0.jsonl"
    verifier = Verifier()
    with open(log_path, "w") as log:
        for step in range(1, 101):
            result = memory.query(*client_batch(0, step), update=True, fields=())
            log.write(json.dumps({"step": step, "acked": result.commit_sequence}) + "\n")
        shards = memory.info().shards
        workers = {node.node_id[:12]: node for node in ray_cluster.worker_nodes}
        victim = next(s for s in shards if s.node.split()[0] in workers)
        node = workers[victim.node.split()[0]]
        raylet = node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid
        os.kill(victim.pid, signal.SIGKILL)
        os.kill(raylet, signal.SIGKILL)
        unavailable, deadline = 0, time.monotonic() + 180
        while True:
            assert time.monotonic() < deadline, "the shard was not placed again"
            step += 1
            try:
                result = memory.query(*client_batch(0, step), update=True, fields=())
            except Unavailable:
                unavailable += 1
                log.write(json.dumps({"step": step, "acked": None}) + "\n")
                continue
            log.write(json.dumps({"step": step, "acked": result.commit_sequence}) + "\n")
            health = memory.info().shards[victim.shard]
            if health.state == "serving" and health.node.split()[0] != victim.node.split()[0]:
                break
    assert unavailable > 0, "no call saw the outage"
    verifier.check([log_path], memory.read_slots(range(CRASH_CONFIG["memory_size"]))._asdict())
    assert verifier.in_flight_applied == 0, "a write answered UNAVAILABLE was applied"
    moved = ray.get(actors[victim.shard].describe.remote())
    assert moved["restarted"] and moved["recovered_sequence"] == 0  # nothing of it on its new node: rebuilt
    check_shards_hold_the_memory(memory, actors, verifier.replay)
    store.close()
    ray_cluster.remove_node(node, allow_graceful=False)
    started_node(lambda: ray_cluster.add_node(num_cpus=NODE_CPUS))
    ray_cluster.wait_for_nodes()
