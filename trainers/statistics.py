"""What the sequence trainers record at each validation, and the intervals they report accuracies with."""

from __future__ import annotations

import json
import math
import pathlib
import time

import numpy as np


def wilson_interval(successes: float, n: int) -> tuple[float, float]:
    """95% Wilson score interval of a proportion (sound near 0 and 1, where the normal one is not)."""
    if n == 0:
        return (math.nan, math.nan)
    z, p = 1.96, successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


# Student's t, two-sided 95% (the 0.975 quantile), for 1 to 30 degrees of freedom; beyond, Cornish-Fisher below.
T_975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045,
         2.042)  # fmt: skip


def t_quantile_975(degrees_of_freedom: int) -> float:
    """Student's t quantile for a two-sided 95% interval: tabled to 30 degrees of freedom, then the Cornish-Fisher
    expansion around the normal's 1.96 (within 1e-4 of the exact value there)."""
    if degrees_of_freedom < 1:
        raise ValueError(f"degrees_of_freedom must be at least 1, got {degrees_of_freedom}")
    if degrees_of_freedom <= len(T_975):
        return T_975[degrees_of_freedom - 1]
    z, v = 1.959964, degrees_of_freedom
    return z + (z**3 + z) / (4 * v) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * v * v)


def mean_interval(values) -> tuple[float, float, tuple[float, float]]:
    """Mean, sample standard deviation and 95% t interval of the mean of ``values`` (at least two), as for
    paired differences taken as independent draws."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) < 2:
        raise ValueError(f"an interval needs at least two values, got {len(values)}")
    mean, sd = float(values.mean()), float(values.std(ddof=1))
    half = t_quantile_975(len(values) - 1) * sd / math.sqrt(len(values))
    return mean, sd, (mean - half, mean + half)


def record_validation(
    metrics: list[dict], path: pathlib.Path, config: dict, step: int, steps_per_epoch: int, losses: list[float],
    memory_losses: list[float], cpu_started: float, trained_until: float, **measured,
) -> dict:  # fmt: skip
    """One validation's entry: the mean training and memory losses since the last one, the ``measured``
    validation figures, the CPU time per training step (``cpu_started`` to ``trained_until``, the validation
    left out) and the CPU time in all (validations in); appended to ``metrics`` and, as a JSON line, to
    ``path``."""
    cpu_s = time.process_time() - cpu_started
    entry = {
        "model": config["model"],
        "step": step,
        "epoch": step / steps_per_epoch,
        "train_loss": float(np.mean(losses)),
        "memory_loss": float(np.mean(memory_losses)),
        **measured,
        "step_cpu_ms": 1000 * (trained_until - cpu_started) / len(losses),
        "cpu_s": (metrics[-1]["cpu_s"] if metrics else 0.0) + cpu_s,
    }
    metrics.append(entry)
    with open(path, "a") as f:
        f.write(json.dumps(entry) + "\n")
    return entry
