"""Slots in the order of their last write, oldest first: how a write finds the oldest slots without a pass
over every slot (../shared/docs/scale-notes.md).

A slot's age is the number of commits since it was last written, merged into or cleared:
``commit_sequence - touched[slot]``, so ageing costs nothing and a write only stamps its own targets.
``AgeOrder`` keeps (slot, stamp) entries in stamp order as an append-only log: a write appends its
targets with the new commit, and the entry it supersedes stays where it was, recognised as stale because
its stamp is no longer the slot's. Leading stale entries are dropped as the walk meets them, and the log
is compacted to its live entries once it holds twice the memory size, so a write costs O(its rows)
amortised and a walk from the oldest costs O(the entries it passes).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

FIRST_CHUNK = 256  # entries the walk looks at first; each further chunk is 4 times larger


class AgeOrder:
    def __init__(self, touched: np.ndarray):
        """``touched``: int64 [M], the commit of each slot's last write (its stamp)."""
        self._size = len(touched)
        order = np.argsort(touched, kind="stable")
        capacity = 2 * self._size + 1
        self._slots = np.empty(capacity, dtype=np.int64)
        self._stamps = np.empty(capacity, dtype=np.int64)
        self._slots[: self._size] = order
        self._stamps[: self._size] = touched[order]
        self._start, self._end = 0, self._size

    def __len__(self) -> int:
        """Entries in the log, stale ones included."""
        return self._end - self._start

    def record(self, slots: np.ndarray, stamp: int, touched: np.ndarray) -> None:
        """Slots (distinct) that ``touched`` now stamps with ``stamp``, a commit after every earlier one."""
        if self._end + len(slots) > len(self._slots):
            self._compact(touched, room=len(slots))
        self._slots[self._end : self._end + len(slots)] = slots
        self._stamps[self._end : self._end + len(slots)] = stamp
        self._end += len(slots)

    def live_stamped_by_at_least(self, stamp: int) -> int:
        """A lower bound on the slots last stamped at or before ``stamp``, found without a walk: the entries
        stamped by then (the log is in stamp order) less every stale entry (each slot has one live entry)."""
        entries = int(np.searchsorted(self._stamps[self._start : self._end], stamp, side="right"))
        return entries - (len(self) - self._size)

    def oldest_first(self, touched: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(slots, stamps) of the live entries, oldest first, in chunks of growing size; within one stamp in
        no particular order. The log must not change while the walk is used."""
        position, chunk = self._start, FIRST_CHUNK
        while position < self._end:
            stop = min(self._end, position + chunk)
            slots, stamps = self._slots[position:stop], self._stamps[position:stop]
            live = touched[slots] == stamps
            if position == self._start:  # stale entries at the head are never live again: drop them
                leading = int(np.argmax(live)) if live.any() else len(live)
                self._start += leading
            yield slots[live], stamps[live]
            position, chunk = stop, chunk * 4

    def _compact(self, touched: np.ndarray, room: int) -> None:
        slots, stamps = self._slots[self._start : self._end], self._stamps[self._start : self._end]
        live = touched[slots] == stamps
        count = int(live.sum())  # at most one live entry per slot: count <= M
        capacity = max(len(self._slots), 2 * count + room + 1)
        kept_slots, kept_stamps = slots[live], stamps[live]
        if capacity != len(self._slots):
            self._slots = np.empty(capacity, dtype=np.int64)
            self._stamps = np.empty(capacity, dtype=np.int64)
        self._slots[:count] = kept_slots
        self._stamps[:count] = kept_stamps
        self._start, self._end = 0, count
