"""The trainers' intervals."""

from __future__ import annotations

import json
import time

import pytest

from lifelong_memory.trainers.statistics import mean_interval, record_validation, t_quantile_975, wilson_interval


def test_wilson_interval():
    assert wilson_interval(0, 100) == pytest.approx((0.0, 0.0370), abs=1e-4)
    assert wilson_interval(50, 100) == pytest.approx((0.4038, 0.5962), abs=1e-4)
    assert wilson_interval(3, 3) == pytest.approx((0.4385, 1.0), abs=1e-4)


def test_record_validation_appends_the_entry_to_the_metrics_and_their_file(tmp_path):
    path, metrics = tmp_path / "metrics.jsonl", [{"cpu_s": 2.0}]
    started = time.process_time()
    entry = record_validation(metrics, path, {"model": "memory"}, 30, 20, [1.0, 3.0], [0.5, 0.0], started, started,
                              validation={"all": 0.25})  # fmt: skip
    assert metrics[-1] is entry and json.loads(path.read_text()) == entry
    assert (entry["model"], entry["step"], entry["epoch"]) == ("memory", 30, 1.5)
    assert (entry["train_loss"], entry["memory_loss"], entry["validation"]) == (2.0, 0.25, {"all": 0.25})
    assert entry["step_cpu_ms"] == 0.0, "the CPU time after trained_until (the validation) is no step's"
    assert entry["cpu_s"] >= 2.0, "the CPU time in all adds to the last entry's"


def test_t_quantile_is_tabled_then_expanded_and_continuous():
    assert t_quantile_975(1) == 12.706 and t_quantile_975(7) == 2.365 and t_quantile_975(30) == 2.042
    # exact values (R's qt(0.975, df)): 31 -> 2.0395, 60 -> 2.0003, 120 -> 1.9799, 1000 -> 1.9623
    for df, exact in ((31, 2.0395), (60, 2.0003), (120, 1.9799), (1000, 1.9623)):
        assert t_quantile_975(df) == pytest.approx(exact, abs=2e-4)
    with pytest.raises(ValueError, match="degrees_of_freedom"):
        t_quantile_975(0)


def test_mean_interval():
    mean, sd, (low, high) = mean_interval([1.0, 2.0, 3.0, 4.0])
    assert (mean, sd) == pytest.approx((2.5, 1.2910), abs=1e-4)
    assert (low, high) == pytest.approx((2.5 - 3.182 * 1.2910 / 2, 2.5 + 3.182 * 1.2910 / 2), abs=1e-4)
    with pytest.raises(ValueError, match="at least two"):
        mean_interval([1.0])
