"""The lmem inspection commands against a live `lmem serve` subprocess: output, --json, errors, exit codes.

Most commands run in this process through cli.main (the same code as the `lmem` entry point, without
a Python start-up per call); one test runs `lmem` itself as a subprocess.
"""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest
import torch
from test_cli import LMEM, free_port
from test_inspect import STEP_1, known_memory

from lifelong_memory.client import cli, connect

WRITER, READER = "writer-token-1", "reader-token-2"


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    tokens = tmp_path_factory.mktemp("auth") / "tokens"
    tokens.write_text(f"read-write {WRITER}\nread-only {READER}\n")
    port = free_port()
    process = subprocess.Popen(
        [*LMEM, "serve", "--port", str(port), "--tokens", str(tokens), "--log-level", "WARNING"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert "serving on 127.0.0.1:" in process.stdout.readline()
        yield f"grpc://127.0.0.1:{port}"
    finally:
        process.kill()
        process.wait()


@pytest.fixture
def name(url, request):
    """A memory in the known state of test_inspect, for this test alone (inspection queries count as queries)."""
    name = request.node.name.replace("[", "-").replace("]", "")
    with connect(url, token=WRITER) as store:
        known_memory(store, name)
        yield name
        store.delete_memory(name)


@pytest.fixture
def lmem(url, capsys):
    """Run one lmem command: (exit code, stdout, stderr)."""

    def run(*args: str, token: str = WRITER) -> tuple[int, str, str]:
        code = cli.main([*args, "--url", url, "--token", token])
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run


def all_slots(url: str, name: str):
    with connect(url, token=WRITER) as store:
        return store.memory(name).slots(range(8))


def test_stats(lmem, name):
    code, out, _ = lmem("stats", name, "--age-bins", "2", "--top-labels", "2", "--json")
    assert code == 0
    report = json.loads(out)
    assert (report["name"], report["filled_slots"], report["memory_size"], report["fill_ratio"]) == (name, 5, 8, 0.625)
    assert (report["writes"], report["merges"], report["queries"], report["commit_sequence"]) == (5, 1, 6, 2)
    assert (report["age_bin_edges"], report["age_counts"]) == ([0, 1, 2], [2, 3])
    assert (report["distinct_labels"], report["top_labels"], report["top_label_counts"]) == (3, [3, 5], [3, 1])
    assert (report["keys_off_unit"], report["keys_non_finite"]) == (0, 0)

    code, out, _ = lmem("stats", name, "--age-bins", "2")
    assert code == 0
    assert "5 of 8 slots (62.50%)" in out
    assert [line.split()[:3] for line in out.splitlines() if line.startswith("[")] == [
        ["[0,", "1)", "2"],
        ["[1,", "2)", "3"],
    ]

    code, _, err = lmem("stats", name, "--age-bins", "0")
    assert code == 2 and "--age-bins" in err
    code, _, err = lmem("stats", "no-such-memory")
    assert code == 3 and "NOT_FOUND" in err


def test_slots(lmem, name, url, monkeypatch):
    keys, _, _ = all_slots(url, name)
    monkeypatch.setattr(cli, "PAGE_BYTES", 1)  # one slot per ReadSlots call: the pages must join up
    code, out, _ = lmem("slots", name, "--range", "0:6", "--json")
    assert code == 0
    rows = json.loads(out)["slots"]
    assert [r["slot"] for r in rows] == [0, 1, 2, 3, 4, 5]
    assert [r["value"] for r in rows] == [3, 3, 5, 7, 3, -1]
    assert [r["age"] for r in rows] == [1, 1, 1, 0, 0, 2]
    assert [r["generation"] for r in rows] == [1, 1, 1, 2, 2, 0]
    assert rows[0]["key"] == pytest.approx(STEP_1[0][0])
    assert rows[3]["key"] == pytest.approx(keys[3].tolist())
    assert rows[3]["key_norm"] == pytest.approx(1, abs=1e-6) and rows[5]["key_norm"] == 0

    code, out, _ = lmem("slots", name, "--slots", "4,0", "--components", "2")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["slot", "value", "age", "generation", "writer", "key_norm", "key[:2]"]
    assert [line.split()[:5] for line in lines[1:]] == [["4", "3", "0", "2", "-"], ["0", "3", "1", "1", "-"]]
    assert len(lines[1].split()) == 6 + 2

    for args, option in (
        (("--range", "5:100"), "--range"),
        (("--range", "5"), "--range"),
        (("--slots", "1,x"), "--slots"),
        (("--slots", "8"), "--slots"),
        (("--slots", "1", "--components", "-1"), "--components"),
    ):
        code, _, err = lmem("slots", name, *args)
        assert code == 2 and f"INVALID_ARGUMENT: {option}:" in err, (args, err)
    with pytest.raises(SystemExit) as exited:  # neither --slots nor --range: argparse's usage error
        lmem("slots", name)
    assert exited.value.code == 2


def expected_neighbors(keys: torch.Tensor, values: torch.Tensor, query: torch.Tensor, k: int, exclude=None):
    """Brute force: every other slot by similarity, ties to the lower slot (empty slots score 0)."""
    similarities = (keys @ query).tolist()
    order = sorted((s for s in range(len(keys)) if s != exclude), key=lambda s: (-similarities[s], s))[:k]
    return order, [int(values[s]) for s in order], [similarities[s] for s in order]


def test_neighbors(lmem, name, url, tmp_path):
    keys, values, _ = all_slots(url, name)
    code, out, _ = lmem("neighbors", name, "--slot", "3", "-k", "3", "--json")
    assert code == 0
    found = json.loads(out)
    assert found["query"] == {"slot": 3}
    slots, labels, similarities = expected_neighbors(keys, values, keys[3], 3, exclude=3)
    assert [n["slot"] for n in found["neighbors"]] == slots
    assert [n["value"] for n in found["neighbors"]] == labels
    assert [n["similarity"] for n in found["neighbors"]] == pytest.approx(similarities, abs=1e-6)

    vector = np.array([0.8, 0.6, 0.0, 0.0])
    np.save(tmp_path / "q.npy", vector)
    code, out, _ = lmem("neighbors", name, "--vector", str(tmp_path / "q.npy"), "-k", "2")
    assert code == 0
    slots, labels, similarities = expected_neighbors(keys, values, torch.tensor(vector, dtype=torch.float32), 2)
    lines = out.splitlines()
    assert lines[0].split() == ["rank", "slot", "value", "similarity"]
    assert [line.split()[:3] for line in lines[1:]] == [
        ["1", str(slots[0]), str(labels[0])],
        ["2", str(slots[1]), str(labels[1])],
    ]

    np.save(tmp_path / "long.npy", 2 * vector)
    np.save(tmp_path / "short.npy", vector[:3] / np.linalg.norm(vector[:3]))
    (tmp_path / "junk.npy").write_text("not an array")
    for args, message in (
        (("--vector", str(tmp_path / "long.npy")), "--vector: " + str(tmp_path / "long.npy") + " has norm 2;"),
        (("--vector", str(tmp_path / "short.npy")), "has shape [3]; this memory's keys are [4]"),
        (("--vector", str(tmp_path / "junk.npy")), "--vector: cannot read"),
        (("--vector", str(tmp_path / "missing.npy")), "--vector: cannot read"),
        (("--slot", "6"), "--slot: slot 6 is empty"),
        (("--slot", "8"), "--slot: slot 8 is outside"),
        (("--slot", "0", "-k", "0"), "--k: must be >= 1"),
    ):
        code, _, err = lmem("neighbors", name, *args)
        assert code == 2 and message in err, (args, err)


def test_labels(lmem, name):
    code, out, _ = lmem("labels", name, "3", "--json")
    assert code == 0
    found = json.loads(out)
    assert (found["label"], found["recent_slot"], found["commit_sequence"]) == (3, 4, 2)
    assert found["slots"] == [{"slot": 0, "age": 1}, {"slot": 1, "age": 1}, {"slot": 4, "age": 0}]

    code, out, _ = lmem("labels", name, "7")
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == f"label 7 in memory {name}: 1 slots; last written or merged in slot 3"
    assert [line.split() for line in lines[1:]] == [["slot", "age"], ["3", "0"]]

    code, out, _ = lmem("labels", name, "11", "--json")
    assert code == 0 and json.loads(out)["slots"] == [] and json.loads(out)["recent_slot"] == -1
    code, _, err = lmem("labels", name, "-1")
    assert code == 2 and "INVALID_ARGUMENT: label:" in err


def test_watch(lmem, name):
    code, out, _ = lmem("watch", name, "--interval", "0", "--count", "3", "--json")
    assert code == 0
    refreshes = [json.loads(line) for line in out.splitlines()]
    assert [(r["name"], r["filled_slots"], r["writes"]) for r in refreshes] == [(name, 5, 5)] * 3

    code, out, _ = lmem("watch", name, "--interval", "0", "--count", "2")
    assert code == 0
    assert out.count(f"lmem watch {name}") == 2 and out.count("since the last refresh: +0 writes") == 1

    for args, option in ((("--interval", "-1"), "--interval"), (("--count", "-1"), "--count")):
        code, _, err = lmem("watch", name, *args)
        assert code == 2 and f"{option}:" in err


def test_plot(lmem, name, url, tmp_path):
    out_file = tmp_path / "memory.png"
    code, out, _ = lmem("plot", name, "--out", str(out_file), "--json")
    assert code == 0
    assert out_file.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads(out)
    assert (summary["filled_slots"], summary["sampled_slots"]) == (5, 8)

    keys, values, _ = all_slots(url, name)
    filled = keys[values != -1]
    similarities = filled @ filled.T
    similarities.fill_diagonal_(-2)
    nearest = similarities.max(dim=1).values
    shown = nearest[nearest > 0]
    # Slots 2 and 4 have no other filled slot of positive similarity: the search sees only that.
    assert summary["nearest_similarity"]["isolated"] == int((nearest <= 0).sum()) == 2
    assert summary["nearest_similarity"]["slots"] == len(shown) == 3
    assert summary["nearest_similarity"]["min"] == pytest.approx(float(shown.min()), abs=1e-6)
    assert summary["nearest_similarity"]["max"] == pytest.approx(float(shown.max()), abs=1e-6)

    code, out, _ = lmem("plot", name, "--out", str(tmp_path / "sampled.png"), "--sample", "3", "--json")
    assert code == 0 and json.loads(out)["sampled_slots"] == 3

    code, _, err = lmem("plot", name, "--out", str(tmp_path / "no-such-dir" / "x.png"))
    assert code == 2 and "--out: cannot write" in err
    code, _, err = lmem("plot", name, "--out", str(out_file), "--sample", "0")
    assert code == 2 and "--sample:" in err


def test_token_errors_have_their_own_exit_codes(lmem, name):
    code, _, err = lmem("stats", name, token="")
    assert code == 7 and "UNAUTHENTICATED" in err
    code, _, err = lmem("stats", name, token="not-a-token")
    assert code == 7 and "not-a-token" not in err
    assert lmem("stats", name, token=READER)[0] == 0  # inspection is a read
    code, _, err = lmem("rm", name, token=READER)
    assert code == 6 and "PERMISSION_DENIED" in err


def test_lmem_executable(url, name):
    ok = subprocess.run(
        [*LMEM, "labels", name, "5", "--url", url, "--token", WRITER, "--json"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["slots"] == [{"slot": 2, "age": 1}]
    refused = subprocess.run([*LMEM, "stats", name, "--url", url], capture_output=True, text=True, timeout=60)
    assert refused.returncode == 7 and "UNAUTHENTICATED" in refused.stderr


def test_a_failed_precondition_and_a_limit_reached_have_exit_codes_of_their_own(lmem, name):
    code, _, err = lmem("snapshot", name)  # this server keeps no data directory
    assert code == 9 and "FAILED_PRECONDITION" in err
    code, _, err = lmem("create", "too-large", "--key-dim", "1024", "--memory-size", str(1 << 30))
    assert code == 10 and "RESOURCE_EXHAUSTED: config.memory_size" in err
