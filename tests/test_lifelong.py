"""The lifelong trainer: a memory never cleared, resumed across runs, shared by two different models."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest
import torch

from lifelong_memory.client import connect
from lifelong_memory.trainers import lifelong, omniglot_data

DATA = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "omniglot"
TINY = ["--data", str(DATA), "--classes", "20", "--batch", "8", "--rep-dim", "32", "--memory-size", "256",
        "--choose-k", "16", "--eval-every", "3", "--eval-classes", "20", "--checkpoint-every", "1"]  # fmt: skip


@pytest.fixture(autouse=True)
def cache(tmp_path_factory, monkeypatch):
    if not (DATA / omniglot_data.ARCHIVES[0]).exists():
        pytest.skip(f"no Omniglot archives in {DATA}")
    monkeypatch.setenv("LMEM_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "omniglot-cache"))


def run(out: pathlib.Path, memory_dir: pathlib.Path, *flags: str) -> list[dict]:
    lifelong.main([*TINY, "--out-dir", str(out), "--data-dir", str(memory_dir), *flags])
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def memory_state(memory_dir: pathlib.Path):
    with connect("local", data_dir=memory_dir) as store:
        return store.memory("lifelong").read_slots(range(256)), store.memory("lifelong").inspect()


def test_a_resumed_run_goes_on_exactly_and_the_memory_is_never_reset(tmp_path):
    straight = run(tmp_path / "straight", tmp_path / "straight-memory", "--steps", "6")
    run(tmp_path / "resumed", tmp_path / "resumed-memory", "--steps", "3")
    resumed = run(tmp_path / "resumed", tmp_path / "resumed-memory", "--steps", "6", "--resume")
    assert [m["step"] for m in straight] == [m["step"] for m in resumed] == [3, 6]
    for a, b in zip(straight, resumed, strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-6)
        assert a["evaluation"] == b["evaluation"]
    (slots_a, report_a), (slots_b, report_b) = (
        memory_state(tmp_path / "straight-memory"),
        memory_state(tmp_path / "resumed-memory"),
    )
    assert report_a.commit_sequence == report_b.commit_sequence == 6  # one update per step, never a clear
    assert torch.equal(slots_a.keys, slots_b.keys) and torch.equal(slots_a.values, slots_b.values)
    assert straight[-1]["commit_sequence"] == 6 and straight[-1]["filled_slots"] == report_a.filled_slots


def test_two_models_share_one_memory_and_see_each_other_s_entries(tmp_path):
    memory_dir = tmp_path / "memory"
    run(tmp_path / "convnet", memory_dir, "--steps", "6", "--writer", "convnet")
    mlp = run(tmp_path / "mlp", memory_dir, "--steps", "3", "--encoder", "mlp", "--writer", "mlp", "--seed", "1")
    _, report = memory_state(memory_dir)
    assert report.commit_sequence == 9  # the second model went on with the first one's memory
    assert {w.name for w in report.writers} == {"convnet", "mlp"}
    evaluation = mlp[-1]["evaluation"]
    assert evaluation["by_writer"]["convnet"]["n"] > 0  # entries only the other model wrote answered
    assert evaluation["by_seen"][0]["n"] > 0  # classes this model never showed, held by the memory
    assert sum(cell["n"] for cell in evaluation["by_age"]["other"]) > 0
    assert (tmp_path / "mlp" / "accuracy-by-age.png").stat().st_size > 0


def test_class_frequencies_follow_zipf():
    rng = np.random.default_rng(0)
    p = lifelong.class_frequencies(1000, 1.0, rng)
    ranked = np.sort(p)[::-1]
    assert p.sum() == pytest.approx(1) and ranked[0] / ranked[9] == pytest.approx(10) and ranked[0] / ranked[-1] == 1000
