"""lmem against a live server in a subprocess: serve, create, ls, describe, rm, exit codes, SIGTERM."""

from __future__ import annotations

import contextlib
import json
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
import torch

from lifelong_memory.client import connect

LMEM = [sys.executable, "-m", "lifelong_memory.client.cli"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served():
    port = free_port()
    process = subprocess.Popen(
        [*LMEM, "serve", "--port", str(port), "--shards", "2", "--backend", "faiss", "--log-level", "WARNING"],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert "serving on 127.0.0.1:" in process.stdout.readline()
    yield process, f"grpc://127.0.0.1:{port}"
    if process.poll() is None:
        process.kill()
        process.wait()


def lmem(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*LMEM, *args], capture_output=True, text=True, timeout=60)


def test_create_list_describe_remove(served):
    _, url = served
    created = lmem("create", "cli-mem", "--key-dim", "32", "--memory-size", "100", "--url", url, "--json")
    assert created.returncode == 0, created.stderr
    config = json.loads(created.stdout)["config"]
    # Server defaults from `lmem serve --shards 2 --backend faiss` fill what create left unset.
    assert (config["key_dim"], config["memory_size"], config["shards"], config["backend"]) == (32, 100, 2, "faiss")

    listed = lmem("ls", "--url", url, "--json")
    assert [m["name"] for m in json.loads(listed.stdout)] == ["cli-mem"]
    table = lmem("ls", "--url", url)
    assert table.stdout.splitlines()[0].split()[:3] == ["name", "key_dim", "memory_size"]
    assert "cli-mem" in table.stdout

    described = lmem("describe", "cli-mem", "--url", url)
    assert described.returncode == 0 and "filled_slots" in described.stdout and "footprint" in described.stdout
    footprint = json.loads(lmem("describe", "cli-mem", "--url", url, "--json").stdout)["footprint_bytes"]
    assert list(footprint) == ["cpu"] and footprint["cpu"] > 100 * 32 * 4  # the keys and more

    assert lmem("create", "cli-mem", "--url", url).returncode == 4  # ALREADY_EXISTS
    bad = lmem("create", "other", "--key-dim", "0", "--url", url)
    assert bad.returncode == 2 and "config.key_dim" in bad.stderr
    assert lmem("rm", "cli-mem", "--url", url).returncode == 0
    missing = lmem("describe", "cli-mem", "--url", url)
    assert missing.returncode == 3 and "NOT_FOUND" in missing.stderr


def test_unreachable_server_is_reported():
    result = lmem("ls", "--url", f"grpc://127.0.0.1:{free_port()}")
    assert result.returncode == 5 and "UNAVAILABLE" in result.stderr


def test_sigterm_stops_cleanly(served):
    process, _ = served
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=30) == 0


def test_sigusr1_prints_every_thread_s_stack_and_the_server_serves_on(tmp_path):
    port, stderr = free_port(), tmp_path / "stderr.txt"
    with open(stderr, "w") as err:
        process = subprocess.Popen([*LMEM, "serve", "--port", str(port), "--log-level", "WARNING"],
                                   stdout=subprocess.PIPE, stderr=err, text=True)  # fmt: skip
    try:
        assert "serving on" in process.stdout.readline()
        process.send_signal(signal.SIGUSR1)
        # Until the dump, written a thread at a time, reaches the main thread, waiting for a signal in serve()
        # (which thread faulthandler calls current depends on where the signal lands).
        deadline = time.monotonic() + 30
        while not re.search(r"most recent call first(.|\n)*line \d+ in serve\n", stderr.read_text()):
            assert process.poll() is None, f"the signal ended the server (exit status {process.returncode})"
            assert time.monotonic() < deadline, stderr.read_text()
            time.sleep(0.1)
        assert lmem("ls", "--url", f"grpc://127.0.0.1:{port}").returncode == 0
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    finally:
        process.kill()
        process.wait()


def test_durable_server_snapshot_export_import_and_restart(tmp_path):
    data, port = tmp_path / "data", free_port()
    url = f"grpc://127.0.0.1:{port}"
    serve = [*LMEM, "serve", "--port", str(port), "--data-dir", str(data), "--log-level", "WARNING"]

    def start():
        process = subprocess.Popen(serve, stdout=subprocess.PIPE, text=True)
        assert "serving on" in process.stdout.readline()
        return process

    process = start()
    try:
        assert lmem("create", "kept", "--key-dim", "8", "--memory-size", "32", "--url", url).returncode == 0
        with connect(url) as store:
            queries = torch.nn.functional.normalize(torch.randn(5, 8), dim=1)
            store.memory("kept").query(queries, torch.arange(5), update=True)
        snapshot = json.loads(lmem("snapshot", "kept", "--url", url, "--json").stdout)
        assert snapshot["commit_sequence"] == 1 and snapshot["path"].startswith(str(data))
        exported = lmem("export", "kept", str(tmp_path / "kept.lmem"), "--url", url, "--json")
        assert json.loads(exported.stdout)["bytes"] == (tmp_path / "kept.lmem").stat().st_size
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
    finally:
        process.kill()
    process = start()
    try:
        described = json.loads(lmem("describe", "kept", "--url", url, "--json").stdout)
        assert described["stats"]["commit_sequence"] == 1 and described["stats"]["filled_slots"] == 5
        imported = lmem("import", "copy", str(tmp_path / "kept.lmem"), "--backend", "faiss", "--url", url, "--json")
        assert imported.returncode == 0, imported.stderr
        copy = json.loads(imported.stdout)
        assert copy["config"]["backend"] == "faiss" and copy["stats"]["filled_slots"] == 5
        missing = lmem("import", "other", str(tmp_path / "absent.lmem"), "--url", url)
        assert missing.returncode == 2 and "file:" in missing.stderr
        assert lmem("rm", "kept", "--url", url).returncode == 0
        assert sorted(p.name for p in (data / "memories").iterdir()) == ["copy"]
    finally:
        process.kill()
        process.wait()


def test_a_second_server_cannot_take_the_port_or_the_data_directory(tmp_path):
    port = str(free_port())
    first = subprocess.Popen([*LMEM, "serve", "--port", port, "--data-dir", str(tmp_path)], stdout=subprocess.PIPE)
    try:
        assert b"serving on" in first.stdout.readline()
        same_port = subprocess.run([*LMEM, "serve", "--port", port], capture_output=True, text=True, timeout=60)
        assert same_port.returncode == 2 and f"could not bind 127.0.0.1:{port}" in same_port.stderr
        same_dir = subprocess.run(
            [*LMEM, "serve", "--port", "0", "--data-dir", str(tmp_path)], capture_output=True, text=True, timeout=60
        )
        assert same_dir.returncode == 2
        assert f"data directory {tmp_path} is in use by process {first.pid}" in same_dir.stderr
    finally:
        first.kill()
        first.wait()


@contextlib.contextmanager
def serving(*args: str):
    """``lmem serve ARGS`` until the block ends; yields the lines it printed on starting."""
    process = subprocess.Popen([*LMEM, "serve", "--log-level", "WARNING", *args], stdout=subprocess.PIPE, text=True)
    try:
        lines = [process.stdout.readline()]
        if "--metrics-port" in args:
            lines.append(process.stdout.readline())
        yield lines
    finally:
        process.kill()
        process.wait()


def test_ipv6_any_address(tmp_path):
    port = free_port()
    with serving("--host", "::", "--port", str(port)) as lines:
        assert lines[0].strip() == f"lmem: serving on [::]:{port}"
        with connect(f"grpc://[::1]:{port}") as store:
            assert store.list_memories() == []


def metrics_answer(host: str, port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=30) as response:
            return b"lmem_rpc_requests" in response.read()
    except urllib.error.URLError as exc:
        assert isinstance(exc.reason, ConnectionRefusedError), exc
        return False


def test_metrics_stay_on_the_loopback_address_unless_asked(tmp_path):
    (tmp_path / "tokens").write_text("read-write some-token\n")
    for metrics_host, reachable_from_elsewhere in ((None, False), ("0.0.0.0", True)):
        metrics_port = free_port()
        options = ["--host", "0.0.0.0", "--port", "0", "--tokens", str(tmp_path / "tokens")]
        options += ["--metrics-port", str(metrics_port)] + (["--metrics-host", metrics_host] if metrics_host else [])
        with serving(*options) as lines:
            assert lines[1].strip() == f"lmem: metrics on http://{metrics_host or '127.0.0.1'}:{metrics_port}/metrics"
            assert metrics_answer("127.0.0.1", metrics_port)
            # 127.0.0.2 is this machine too, but not the address 127.0.0.1: it reaches only a wider binding.
            assert metrics_answer("127.0.0.2", metrics_port) == reachable_from_elsewhere


def test_serve_on_a_unix_socket(tmp_path):
    """lmem serve --listen unix:///path serves lmem and connect() on this host; a TCP address there is refused."""
    url = f"unix://{tmp_path / 'lmem.sock'}"
    process = subprocess.Popen(
        [*LMEM, "serve", "--listen", url, "--log-level", "WARNING"], stdout=subprocess.PIPE, text=True
    )
    try:
        assert process.stdout.readline().strip() == f"lmem: serving on {url}"
        assert lmem("create", "over-unix", "--key-dim", "8", "--memory-size", "16", "--url", url).returncode == 0
        with connect(url) as store:
            memory = store.memory("over-unix")
            memory.query(torch.eye(8)[:2], torch.tensor([3, 4]), update=True)
            assert memory.info().stats["filled_slots"] == 2
        assert [m["name"] for m in json.loads(lmem("ls", "--url", url, "--json").stdout)] == ["over-unix"]
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    refused = lmem("serve", "--listen", "127.0.0.1:50051")
    assert refused.returncode == 2 and "is not unix:///path" in refused.stderr


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("--port", "-1", r"--port: -1 is not in \[0, 65535\]"),
        ("--port", "70000", r"--port: 70000 is not in \[0, 65535\]"),
        ("--max-batch", "0", "--max-batch: 0 is not >= 1"),
        ("--max-message-mb", "0", r"--max-message-mb: 0 is not in \[1, 2047\]"),
        ("--max-message-mb", "4096", r"--max-message-mb: 4096 is not in \[1, 2047\]"),
        ("--max-memories", "0", "--max-memories: 0 is not >= 1"),
        ("--memory-budget-gb", "0", "--memory-budget-gb: 0 is not a finite number of GiB > 0"),
        ("--memory-budget-gb", "-1", "--memory-budget-gb: -1 is not a finite number of GiB > 0"),
        ("--memory-budget-gb", "inf", "--memory-budget-gb: inf is not a finite number of GiB > 0"),
    ],
)
def test_serve_refuses_limits_it_could_not_serve_with_naming_the_flag(flag, value, message):
    """Before, each started a server that refused ordinary calls, crashed, or served on another port."""
    done = lmem("serve", flag, value)
    assert done.returncode == 2 and re.search(message, done.stderr), done.stderr


def test_a_url_with_a_port_out_of_range_is_refused_not_wrapped():
    done = lmem("ls", "--url", "grpc://127.0.0.1:99999")  # gRPC would dial 34463
    assert done.returncode == 2 and r"give host:port, the port in [1, 65535]" in done.stderr, done.stderr
    with pytest.raises(ValueError, match="the port in"):
        connect("grpc://127.0.0.1:0")


@pytest.mark.parametrize("value", ["nan", "inf", "-1"])
def test_watch_refuses_an_interval_that_is_no_number_of_seconds(value):
    done = lmem("watch", "any", "--interval", value)
    assert done.returncode == 2 and "--interval" in done.stderr and "Traceback" not in done.stderr, done.stderr
