"""Metrics and logs of a live `lmem serve`: /metrics moves by what the calls did; JSON logs carry request ids."""

from __future__ import annotations

import json
import re
import subprocess
import urllib.request

import grpc
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families
from test_cli import LMEM, free_port

from lifelong_memory.client import NotFound, connect
from lifelong_memory.v1 import memory_pb2 as pb
from lifelong_memory.v1 import memory_pb2_grpc as pb_grpc

TOKEN = "secret-token-that-must-not-be-logged"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """(gRPC url, metrics url, log file) of a durable server logging JSON at DEBUG, with a token required."""
    folder = tmp_path_factory.mktemp("observed")
    (folder / "tokens").write_text(f"read-write {TOKEN}\n")
    port, metrics_port = free_port(), free_port()
    log_file = folder / "server.log"
    with open(log_file, "w") as stderr:
        process = subprocess.Popen(
            [
                *LMEM,
                "serve",
                "--port",
                str(port),
                "--metrics-port",
                str(metrics_port),
                "--log-format",
                "json",
                "--log-level",
                "debug",
                "--tokens",
                str(folder / "tokens"),
                "--data-dir",
                str(folder / "data"),
            ],
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )
    try:
        assert "serving on 127.0.0.1:" in process.stdout.readline()
        assert f"metrics on http://127.0.0.1:{metrics_port}/metrics" in process.stdout.readline()
        yield f"grpc://127.0.0.1:{port}", f"http://127.0.0.1:{metrics_port}/metrics", log_file
    finally:
        process.kill()
        process.wait()


def scrape(metrics_url: str) -> dict:
    """Every sample: {(name, ((label, value), ...)): value}."""
    with urllib.request.urlopen(metrics_url, timeout=30) as response:
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def moved(before: dict, after: dict, name: str, **labels) -> float:
    key = (name, tuple(sorted(labels.items())))
    return after.get(key, 0.0) - before.get(key, 0.0)


def unit_rows(rows: int, generator: torch.Generator) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.randn(rows, 8, generator=generator), dim=1)


def test_metrics_move_by_what_the_calls_did(server):
    url, metrics_url, _ = server
    generator = torch.Generator().manual_seed(0)
    before = scrape(metrics_url)
    with connect(url, token=TOKEN) as store:
        memory = store.create_memory("metered", key_dim=8, memory_size=64, age_noise=0.0)
        label = 0
        for rows in (2, 3, 5):
            memory.query(unit_rows(rows, generator), torch.arange(label, label + rows), update=True)
            label += rows
        with memory.stream() as stream:
            for _ in range(2):
                stream.query(unit_rows(4, generator), torch.arange(label, label + 4), update=True)
                label += 4
        with pytest.raises(NotFound):
            store.memory("absent")
        report = memory.inspect()
    after = scrape(metrics_url)

    for method, code, calls in (("CreateMemory", "OK", 1), ("Query", "OK", 3), ("GetMemory", "NOT_FOUND", 1)):
        assert moved(before, after, "lmem_rpc_requests_total", method=method, code=code) == calls
        assert moved(before, after, "lmem_rpc_duration_seconds_count", method=method, code=code) == calls
        assert moved(before, after, "lmem_rpc_duration_seconds_bucket", method=method, code=code, le="+Inf") == calls
    # The client closes its stream by cancelling it, so the stream ends OK or CANCELLED: one call either way.
    streams = sum(
        moved(before, after, "lmem_rpc_requests_total", method="QueryStream", code=c) for c in ("OK", "CANCELLED")
    )
    assert streams == 1

    rows = {"method": "Query"}
    assert moved(before, after, "lmem_query_batch_rows_count", **rows) == 3
    assert moved(before, after, "lmem_query_batch_rows_sum", **rows) == 2 + 3 + 5
    for le, batches in (("1.0", 0), ("2.0", 1), ("4.0", 2), ("8.0", 3)):
        assert moved(before, after, "lmem_query_batch_rows_bucket", le=le, **rows) == batches
    assert moved(before, after, "lmem_query_batch_rows_count", method="QueryStream") == 2
    assert moved(before, after, "lmem_query_batch_rows_sum", method="QueryStream") == 8

    # Per memory: read at scrape time, equal to the memory's own counters. 18 labelled rows, all distinct
    # labels, so every row wrote a slot.
    memory_labels = (("memory", "metered"),)
    assert after[("lmem_memory_filled_slots", memory_labels)] == report.filled_slots == 18
    assert after[("lmem_memory_fill_ratio", memory_labels)] == 18 / 64
    assert after[("lmem_memory_writes_total", memory_labels)] == report.writes == 18
    assert after[("lmem_memory_merges_total", memory_labels)] == report.merges == 0
    assert after[("lmem_memory_query_rows_total", memory_labels)] == report.queries == 18
    # Durable writes: 5 updates logged (the create writes no record), each acknowledged after an fsync.
    fsyncs = moved(before, after, "lmem_wal_fsync_seconds_count")
    assert 1 <= fsyncs <= 5
    assert moved(before, after, "lmem_wal_written_bytes_total", memory="metered") > 18 * 8 * 4


def test_json_logs_carry_the_request_id(server):
    url, _, log_file = server
    authorization = ("authorization", f"Bearer {TOKEN}")
    with grpc.insecure_channel(url.removeprefix("grpc://")) as channel:
        stub = pb_grpc.MemoryServiceStub(channel)
        request = pb.CreateMemoryRequest(name="logged", config=pb.MemoryConfig(key_dim=4, memory_size=8))
        _, call = stub.CreateMemory.with_call(request, metadata=[authorization, ("x-request-id", "test-request-7")])
        assert dict(call.initial_metadata())["x-request-id"] == "test-request-7"

        with pytest.raises(grpc.RpcError) as failed:  # no id sent: the server makes one and returns it
            stub.GetMemory(pb.GetMemoryRequest(name="absent"), metadata=[authorization])
        generated = dict(failed.value.initial_metadata())["x-request-id"]
        assert re.fullmatch("[0-9a-f]{32}", generated)

        # An id that could break a log line is replaced, not logged.
        forged = 'x" "level": "ERROR'
        _, call = stub.GetMemory.with_call(
            pb.GetMemoryRequest(name="logged"), metadata=[authorization, ("x-request-id", forged)]
        )
        replaced = dict(call.initial_metadata())["x-request-id"]
        assert re.fullmatch("[0-9a-f]{32}", replaced)

    text = log_file.read_text()
    # gRPC's C core may write its own plain lines to stderr; every line of ours is one JSON object.
    entries = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    assert all(set(e) == {"timestamp", "level", "logger", "message", "request_id"} for e in entries)
    about = {}
    for entry in entries:
        about.setdefault(entry["request_id"], []).append(entry["message"])
    assert any(m.startswith("created memory 'logged'") for m in about["test-request-7"])
    assert any(m.startswith("CreateMemory OK in") for m in about["test-request-7"])
    assert any(m.startswith("GetMemory NOT_FOUND in") for m in about[generated])
    assert any(m.startswith("GetMemory OK in") for m in about[replaced])
    assert TOKEN not in text and forged not in about
