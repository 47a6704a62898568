"""The trainers' intervals."""

from __future__ import annotations

import pytest

from lifelong_memory.trainers.statistics import wilson_interval


def test_wilson_interval():
    assert wilson_interval(0, 100) == pytest.approx((0.0, 0.0370), abs=1e-4)
    assert wilson_interval(50, 100) == pytest.approx((0.4038, 0.5962), abs=1e-4)
    assert wilson_interval(3, 3) == pytest.approx((0.4385, 1.0), abs=1e-4)
