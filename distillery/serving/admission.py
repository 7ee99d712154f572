"""The engine's queue and admission: requests wait in a bounded queue and enter the running batch
between steps while their cost fits the step budget (`max_rows`, in UNet rows at the native size;
a request alone always runs, whatever its size). Event-loop only: no torch here.

No head-of-line blocking: a waiting request that does not fit yet lets later ones that fit go ahead,
but only `MAX_OVERTAKES` times; then it is next, whatever waits behind it, so no request starves.
"""

from __future__ import annotations

import time
from collections import deque

from distillery.serving.jobs import InFlight, QueueFull

MAX_OVERTAKES = 8  # admissions past a waiting request before it goes next


class Admission:
    def __init__(self, queue_size: int, max_rows: float):
        self.queue_size, self.max_rows = queue_size, max_rows
        self.pending: deque[InFlight] = deque()

    def __len__(self) -> int:
        return len(self.pending)

    def enqueue(self, item: InFlight) -> None:
        """Wait in line, or QueueFull when `queue_size` requests wait already."""
        if len(self.pending) >= self.queue_size:
            raise QueueFull(f"queue is full ({self.queue_size} waiting); retry later")
        self.pending.append(item)

    def withdraw(self, item: InFlight) -> bool:
        """Take a waiting request out of the line (its client left or it timed out); False if it is not waiting."""
        try:
            self.pending.remove(item)
        except ValueError:
            return False
        return True

    def admit(self, active: list[InFlight]) -> tuple[list[InFlight], list[InFlight]]:
        """(admitted, cancelled): waiting requests moved into `active`, in order among those that fit `max_rows`
        next to what runs (one always fits); those cancelled while waiting leave the line."""
        used = sum(a.cost for a in active)
        admitted, cancelled, passed = [], [], []
        for item in list(self.pending):
            if item.future.cancelled():
                self.pending.remove(item)
                cancelled.append(item)
                continue
            if active and used + item.cost > self.max_rows:
                passed.append(item)
                if item.overtaken >= MAX_OVERTAKES:
                    break  # its turn: nothing behind it goes ahead again
                continue
            self.pending.remove(item)
            item.started = time.perf_counter()
            active.append(item)
            admitted.append(item)
            used += item.cost
            for waiting in passed:
                waiting.overtaken += 1
        return admitted, cancelled

    def drain(self) -> list[InFlight]:
        """Everything waiting, removed (the worker died)."""
        items = list(self.pending)
        self.pending.clear()
        return items
