"""The benchmark scripts still run against the current API (a change of a client signature once stopped
bench_memory.py at its first gRPC case, unnoticed). A few calls per case: what is checked is that every
case and anchor ran and every target at the measured shape got a figure, not the figures."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def test_bench_memory_runs_every_case_and_anchor(tmp_path):
    out = tmp_path / "memory.json"
    command = [sys.executable, str(BENCHMARKS / "bench_memory.py"), "--sizes", "8192", "--batches", "16"]
    command += ["--min-time", "0.02", "--min-reps", "3", "--out", str(out)]
    subprocess.run(command, check=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True)
    result = json.loads(out.read_text())
    assert result["complete"]
    ran = {(row["mode"], row["op"]) for row in result["results"]}
    memory_cases = {(m, op) for m in ("embedded", "grpc-unary", "grpc-stream") for op in ("search", "query", "fused")}
    anchors = {(f, op) for f in ("bare-sync", "bare-aio", "bare-aio-step") for op in ("unary", "stream")}
    assert memory_cases | anchors | {("raw", "raw"), ("unix-stream", "fused")} <= ran
    measured = {t["target"]: t["measured"] for t in result["targets"] if "N=8,192" in t["target"]}
    assert len(measured) == 7 and None not in measured.values(), measured


def test_bench_cluster_runs_and_finds_the_same_answers(tmp_path):
    out = tmp_path / "cluster.json"
    command = [sys.executable, str(BENCHMARKS / "bench_cluster.py"), "--size", "4096", "--batch", "16"]
    command += ["--shards", "2", "--min-time", "0.05", "--out", str(out)]
    subprocess.run(command, check=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True)
    result = json.loads(out.read_text())
    assert result["identical_answers_every_step"] and result["nodes"] == 2
    assert result["fused_calls"]["cluster"] >= 2 and result["cluster_over_local"] > 0


def test_bench_compare_runs_our_cases(tmp_path):
    out = tmp_path / "compare.json"
    command = [sys.executable, str(BENCHMARKS / "bench_compare.py"), "--n", "4096", "--min-time", "0.02"]
    command += ["--min-reps", "2", "--out", str(out)]
    subprocess.run(command, check=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True)
    result = json.loads(out.read_text())
    ran = {row["system"] for row in result["results"]}
    assert {"ours-embedded", "ours-embedded-bf16", "ours-grpc-unary", "ours-grpc-stream"} <= ran, ran
    assert all(row["steps_per_s"] > 0 for row in result["results"])


@pytest.mark.parametrize("backend", ["torch", "faiss-ivf"])
def test_bench_large_memory_recovers_the_same_answers(tmp_path, backend):
    out = tmp_path / "large.json"
    command = [sys.executable, str(BENCHMARKS / "bench_large_memory.py"), "--size", "65536", "--classes", "4096"]
    command += ["--calls", "1", "--work-dir", str(tmp_path), "--backend", backend, "--out", str(out)]
    subprocess.run(command, check=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True)
    result = json.loads(out.read_text())
    assert result["same_answers_after_restart"] and result["acknowledged_write_kept"]
    assert result["stats"]["filled_slots"] == 65536 and result["footprint_bytes"]["cpu"] > 65536 * 128 * 4
    assert result["config"]["backend"] == backend
    steps = {"import over gRPC (+ first snapshot)", "SnapshotMemory", "restart: recover and serve"}
    assert steps <= set(result["steps"])


def test_bench_retrain_measures_calls_during_a_retrain(tmp_path):
    out = tmp_path / "retrain.json"
    command = [sys.executable, str(BENCHMARKS / "bench_retrain.py"), "--n", "16384", "--seconds", "0.5"]
    command += ["--out", str(out)]
    subprocess.run(command, check=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True)
    result = json.loads(out.read_text())
    assert result["calls_alone"]["calls"] > 0 and result["calls_during_retrain"]["calls"] > 0
    assert result["retrain_s"] > 0


def test_bench_ann_runs_every_backend_on_a_memory_aged_as_training_leaves_it(tmp_path):
    out = tmp_path / "ann.json"
    command = [sys.executable, str(BENCHMARKS / "bench_ann.py"), "--sizes", "8192", "--keys", "clustered"]
    command += ["--batches", "16", "--min-time", "0.01", "--min-reps", "1", "--no-anchors", "--out", str(out)]
    command += ["--backends", "lsh,lsh-p16,ivf-flat,ivf-sq8,ivf-fine,ivf-fine-hnsw"]
    subprocess.run(command, check=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True)
    result = json.loads(out.read_text())
    assert result["complete"] and {r["backend"] for r in result["rows"]} == {
        "torch", "lsh", "lsh-p16", "ivf-flat", "ivf-sq8", "ivf-fine", "ivf-fine-hnsw"
    }  # fmt: skip
    rows = {r["backend"]: r for r in result["rows"]}
    exact = rows["torch"]["per_batch"]["16"]
    assert exact["recall_at_1"] == exact["sides_equal"] == 1.0 and exact["fused_ms"] > 0
    fine, hnsw = rows["ivf-fine"]["config"], rows["ivf-fine-hnsw"]["config"]
    assert (fine["nlist"], fine["nprobe"], fine["quantizer"]) == (8192 // 32, 8192 // 32 // 64, "flat")
    assert hnsw == {**fine, "quantizer": "hnsw", "centroids_of": "ivf-fine"}


def test_bench_ivf_lists_probing_probes_at_95_keeps_the_exact_sides_in_95_percent_of_rows(tmp_path):
    """With float32 lists and an exact quantizer, a slot in a probed list is found: probing probes@95 lists must
    give the exact positive and negative in at least 95% of rows, whichever way the lists were made (the cheap ways
    add each key, with its id, to a list they chose: this checks the index searches what they built)."""
    out = tmp_path / "lists.json"
    command = [sys.executable, str(BENCHMARKS / "bench_ivf_lists.py"), "--n", "8192", "--lists", "32,256"]
    command += ["--centroids", "kmeans,sample,two-level", "--batch", "64", "--reps", "1", "--out", str(out)]
    subprocess.run(command, check=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True)
    rows = json.loads(out.read_text())["rows"]
    assert [(r["nlist"], r["centroids"]) for r in rows] == [
        (nlist, way) for nlist in (32, 256) for way in ("kmeans", "sample", "two-level")
    ]
    for row in rows:
        assert 1 <= row["probes_95"] <= row["nlist"] and row["sides_equal"] >= 0.95


def test_bench_ivf_lists_quantizer_option_chooses_the_coarse_quantizer(tmp_path):
    """--quantizer overrides the choice by list count (auto: HNSW only from 8,192 lists), both ways."""
    rows = {}
    for quantizer, lists in (("hnsw", "64"), ("flat", "8192")):
        out = tmp_path / f"{quantizer}.json"
        command = [sys.executable, str(BENCHMARKS / "bench_ivf_lists.py"), "--n", "8192", "--lists", lists]
        command += ["--quantizer", quantizer, "--batch", "32", "--reps", "1", "--out", str(out)]
        one_thread = {**os.environ, "OMP_NUM_THREADS": "1"}
        subprocess.run(command, check=True, timeout=300, env=one_thread, capture_output=True)
        (rows[quantizer],) = json.loads(out.read_text())["rows"]
    assert rows["hnsw"]["quantizer"] == "hnsw" and rows["flat"]["quantizer"] == "flat"
    assert rows["flat"]["sides_equal"] >= 0.95  # an exact quantizer finds every slot of a probed list


@pytest.mark.parametrize("fresh", [False, True])
def test_bench_fused_step_runs_a_revision_beside_the_current_memory(tmp_path, fresh):
    out = tmp_path / "fused.json"
    command = [sys.executable, str(BENCHMARKS / "bench_fused_step.py"), "--baseline", "HEAD", "--shapes", "2048x8"]
    command += ["--seconds", "0.2", "--out", str(out)] + (["--fresh"] if fresh else [])
    subprocess.run(command, check=True, timeout=300, cwd=BENCHMARKS.parent, capture_output=True)
    (row,) = json.loads(out.read_text())["results"]
    assert row["same"] and row["fresh"] == fresh and row["calls"] >= 10
    assert {"raw", "raw-out", "baseline", "current"} <= row["median_ms"].keys()


def test_gpu_check_compares_serves_and_tabulates_on_the_cpu():
    """gpu_check.py runs once, on a lent GPU machine with minutes to spare, so its code must work before then:
    here its comparison (a 4-shard memory against one, same seed), its served check (a server stopped and
    started again, an export imported) and its table run on the CPU. Its speed test once set a full memory's
    fields by hand and left it counting negative empty slots."""
    spec = importlib.util.spec_from_file_location("gpu_check", BENCHMARKS / "gpu_check.py")
    sys.path.insert(0, str(BENCHMARKS))  # gpu_check imports bench_memory's Server
    try:
        gpu_check = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(gpu_check)
    finally:
        sys.path.remove(str(BENCHMARKS))
    for full in (False, True):
        same = gpu_check.compare(4096, 30, {"shards": 4}, full)
        assert same["pass"] and same["writes"] > 0 and same["first_divergent_step"] is None

    config = gpu_check.MemoryConfig(key_dim=gpu_check.KEY_DIM, memory_size=4096, choose_k=256, age_noise=0.0)
    keys = torch.nn.functional.normalize(torch.randn(4096, gpu_check.KEY_DIM), dim=1)
    state = gpu_check.entries_state(config, keys, torch.arange(4096), rows_per_commit=gpu_check.BATCH_WRITTEN)
    memory = gpu_check.Memory(config, state=state)
    assert memory.empty_slots == 0 and memory.ages.max() == 4096 // gpu_check.BATCH_WRITTEN - 1
    result = memory.query(keys[:16], torch.arange(10_000, 10_016), update=True)  # new labels: 16 writes
    assert memory.empty_slots == 0 and torch.equal(result.written_slots, torch.arange(16))  # the oldest slots

    served = gpu_check.served(size=512, steps=8, device="cpu")
    assert served["pass"] and served["device_after_restart"] == "cpu", served

    (row,) = gpu_check.table(4096, [16], faiss=None, device="cpu", min_seconds=0.01)
    cases = {"raw topk float32", "raw topk bfloat16", "query torch float32", "fused torch float32"}
    assert cases | {"fused torch bfloat16"} <= row["ms"].keys() and min(row["ms"].values()) > 0
    assert row["recall_at_1"]["torch float32"] == 1.0 and row["positive_negative_equal"]["torch float32"] == 1.0
    assert row["recall_at_1"]["torch bfloat16"] > 0.5  # queries are near copies of stored keys


def test_profile_step_times_and_profiles_a_fused_call_on_the_cpu():
    command = [sys.executable, str(BENCHMARKS / "profile_step.py"), "--size", "4096", "--batch", "16"]
    command += ["--steps", "3", "--rows", "5"]
    out = subprocess.run(
        command, check=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True
    ).stdout
    assert "N=4,096 B=16 cpu float32: fused" in out and "raw top-k" in out
    assert "aten ops per call (top level):" in out and "aten::mm" in out  # the op table
    assert "function calls in" in out and "server/memory.py:" in out  # cProfile's functions, the memory's among them
