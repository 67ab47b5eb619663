"""`Admission`: the sequences not yet in the scheduler, let in one at a time, taking turns by source.

A user request with `n` children, or a prompt list (its prompts share a source), would otherwise enter the
scheduler's first-come-first-served queue all at once, and a request that arrives a moment later would wait
for all of them. Here each source has its turn: the engine lets in one sequence of the source whose turn it
is, whenever the scheduler has a free seat (`Scheduler.num_free_seats`), and that source goes to the back of
the line. A lone request therefore waits behind at most one sequence of each fan-out ahead of it, never behind
a whole fan-out; a fan-out alone still fills every seat.

No jax here; the items are the engine's groups, opaque to this module.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Generic, TypeVar

Group = TypeVar("Group")


@dataclass(slots=True)
class _Pending(Generic[Group]):
    group: Group
    next_index: int  # of its next sequence to let in
    count: int  # its sequences in all


class Admission(Generic[Group]):
    def __init__(self) -> None:
        # source -> its groups with sequences still out, in arrival order; the dict's order is the line
        self._sources: dict[str, deque[_Pending[Group]]] = {}
        self.num_pending = 0  # sequences not let in yet

    def add(self, source: str, group: Group, count: int) -> None:
        """Queue a group's `count` sequences (indices 0..count-1) under `source`, at the back of the line."""
        self._sources.setdefault(source, deque()).append(_Pending(group, 0, count))
        self.num_pending += count

    def take(self) -> tuple[Group, int] | None:
        """The next sequence to let in, as (its group, its index); its source goes to the back of the line."""
        if not self._sources:
            return None
        source, pending = next(iter(self._sources.items()))
        entry = pending[0]
        index = entry.next_index
        entry.next_index += 1
        self.num_pending -= 1
        if entry.next_index == entry.count:
            pending.popleft()
        del self._sources[source]
        if pending:
            self._sources[source] = pending
        return entry.group, index

    def remove(self, source: str, group: Group) -> range:
        """Drop a group queued under `source` (aborted or failed); returns the indices of its sequences that were
        never let in."""
        pending = self._sources.get(source, ())
        for entry in pending:
            if entry.group is group:
                pending.remove(entry)
                if not pending:
                    del self._sources[source]
                self.num_pending -= entry.count - entry.next_index
                return range(entry.next_index, entry.count)
        return range(0)
