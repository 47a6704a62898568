"""kill -9 during writes, ten times over: nothing acknowledged is lost, nothing unacknowledged half-applied.

The harness (tests/crash_harness.py, which also runs the long version) checks
after every restart that the recovered memory is a serial replay of exactly the
acknowledged writes plus whole in-flight ones, and that a bystander is untouched.
"""

from __future__ import annotations

from crash_harness import run


def test_sigkill_during_writes_loses_nothing_acknowledged(tmp_path):
    figures = run(cycles=10, clients=4, sync="always", work=tmp_path)
    assert figures["acknowledged_writes"] >= 10 * 4  # every cycle wrote, so every kill landed among writes
    assert figures["final_commit_sequence"] == figures["acknowledged_writes"] + figures["in_flight_applied"]


def test_sigkill_under_sync_off_loses_nothing_acknowledged(tmp_path):
    # Without fsync a write is still handed to the OS before it is acknowledged: a process crash loses nothing.
    figures = run(cycles=3, clients=4, sync="off", work=tmp_path)
    assert figures["final_commit_sequence"] == figures["acknowledged_writes"] + figures["in_flight_applied"]
