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
