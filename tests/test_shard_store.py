"""A cluster shard's data directory (server/cluster.py, ShardStore): a snapshot and its log, stamped with the
front end's commit sequence. No Ray needed: the store is plain files."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lifelong_memory.server.cluster import RECORD, ShardStore

ROWS, DIM = 40, 8


def write(store: ShardStore, keys: torch.Tensor, sequence: int, rng) -> None:
    """One write of a few slots at ``sequence``, to the store and to ``keys`` (what the shard holds)."""
    slots = rng.choice(ROWS, 3, replace=False)
    new = rng.standard_normal((3, DIM)).astype(np.float32)
    store.append(sequence, slots, new)
    keys[torch.from_numpy(slots)] = torch.from_numpy(new)
    if store.wants_snapshot():
        store.snapshot(sequence, keys)


def test_every_restart_recovers_every_write_so_far(tmp_path):
    """Restarts between writes, before and after snapshots: each recovery gives the last write's commit and its
    keys (a restarted store once wrote on into a log that the next recovery did not read)."""
    rng = np.random.default_rng(0)
    store = ShardStore(tmp_path, ROWS, DIM)
    sequence, keys = store.recover()
    assert sequence == 0 and not keys.any()
    snapshots = 0
    for restart in range(12):
        for _ in range(restart % 3 + 1):
            sequence += 1
            write(store, keys, sequence, rng)
        snapshots += len(list(tmp_path.glob("snapshot-*.pt")))
        store = ShardStore(tmp_path, ROWS, DIM)
        recovered, recovered_keys = store.recover()
        assert recovered == sequence, f"restart {restart}"
        assert torch.equal(recovered_keys, keys), f"restart {restart}"
    assert snapshots > 0  # the log outgrew its snapshot at least once
    assert len(list(tmp_path.glob("snapshot-*.pt"))) == 1 and len(list(tmp_path.glob("log-*"))) == 1


def test_a_torn_tail_is_cut_and_the_log_goes_on(tmp_path):
    rng = np.random.default_rng(1)
    store = ShardStore(tmp_path, ROWS, DIM)
    _, keys = store.recover()
    for sequence in (1, 2):
        write(store, keys, sequence, rng)
    whole = keys.clone()
    log = tmp_path / "log-0"
    size = log.stat().st_size
    write(store, keys, 3, rng)
    with open(log, "r+b") as f:  # the last record half written: the process died in the middle of it
        f.truncate(size + RECORD.size + 5)
    store = ShardStore(tmp_path, ROWS, DIM)
    sequence, recovered = store.recover()
    assert sequence == 2 and torch.equal(recovered, whole)
    assert log.stat().st_size == size
    write(store, recovered, 3, rng)
    assert ShardStore(tmp_path, ROWS, DIM).recover()[0] == 3


def test_a_commit_that_does_not_follow_the_log_is_refused(tmp_path):
    """Recovery reads the log while commits increase: a record that repeated the last commit (a catch-up that
    had nothing to send) once hid every write after it."""
    store = ShardStore(tmp_path, ROWS, DIM)
    _, keys = store.recover()
    write(store, keys, 4, np.random.default_rng(2))
    for sequence in (4, 3):
        with pytest.raises(ValueError, match=f"commit {sequence} does not follow commit 4"):
            store.append(sequence, np.zeros(0, np.int64), np.zeros((0, DIM), np.float32))
    assert ShardStore(tmp_path, ROWS, DIM).recover()[0] == 4
