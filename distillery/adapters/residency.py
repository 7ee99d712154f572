"""Which adapters are known, which are resident within a byte budget (LRU), which are in use.

Threads: the lock is held only for dict updates, never during file reads, so the event loop
(acquire, release, lookups, `entries`) never waits on disk or torch. An adapter leaving calls
`on_leave` (the registry's backends drop their cached plans then, on the torch thread).
"""

from __future__ import annotations

import threading
from collections import Counter, OrderedDict
from pathlib import Path
from typing import Callable, NamedTuple

from distillery.adapters.files import AdapterError
from distillery.adapters.loaded import AdapterSet, LoadedAdapter


class UnknownAdapter(KeyError):
    pass


class AdapterInUse(AdapterError):
    pass


class AdapterEntry(NamedTuple):
    """One registered adapter as listings show it."""

    name: str
    path: Path
    adapter: LoadedAdapter | None  # None: evicted (read back from `path` on its next use)
    in_use: int  # requests holding it


class Residency:
    def __init__(self, read: Callable[[str, Path], LoadedAdapter], budget_bytes: int | None = None,
                 on_leave: Callable[[], None] = lambda: None):
        """`read(name, folder)` makes an adapter resident-ready (disk and copies); `budget_bytes`: None = no limit."""
        self._read_adapter, self.budget_bytes, self._on_leave = read, budget_bytes, on_leave
        # least recently used first; an OrderedDict, not a cachetools.LRUCache: eviction skips adapters in use
        # and refuses (rather than drops) a newcomer that does not fit beside them
        self.resident: OrderedDict[str, LoadedAdapter] = OrderedDict()
        self.known: dict[str, Path] = {}  # every registered adapter, resident or evicted
        self.in_use: Counter[str] = Counter()
        self.loads = self.evictions = 0
        self._lock = threading.Lock()

    @property
    def resident_bytes(self) -> int:
        return sum(a.nbytes for a in self.resident.values())

    def figures(self) -> dict[str, int]:
        """Resident count and bytes, loads and evictions so far, read together (any thread)."""
        with self._lock:
            return {"resident": len(self.resident), "resident_bytes": self.resident_bytes, "loads": self.loads,
                    "evictions": self.evictions}

    def entries(self) -> list[AdapterEntry]:
        """Every registered adapter, by name, read together (any thread; marks nothing as used)."""
        with self._lock:
            return [AdapterEntry(name, path, self.resident.get(name), self.in_use[name])
                    for name, path in sorted(self.known.items())]

    def _read(self, name: str, folder: Path) -> LoadedAdapter:
        adapter = self._read_adapter(name, folder)
        self.loads += 1
        return adapter

    def load(self, name: str, folder: str | Path) -> LoadedAdapter:
        """Read, check and make resident; on any error nothing is loaded and nothing changes."""
        if name in self.known:
            raise AdapterError(f"an adapter named {name!r} is already registered")
        adapter = self._read(name, Path(folder))  # disk and copies: outside the lock
        with self._lock:
            if name in self.known:
                raise AdapterError(f"an adapter named {name!r} is already registered")
            self._make_resident(adapter)
            self.known[name] = adapter.path
            return adapter

    def _make_resident(self, adapter: LoadedAdapter) -> None:
        """Under the lock: evict least recently used adapters not in use until `adapter` fits the budget."""
        if self.budget_bytes is not None:
            for victim in [n for n in self.resident if not self.in_use[n]]:
                if self.resident_bytes + adapter.nbytes <= self.budget_bytes:
                    break
                del self.resident[victim]
                self.evictions += 1
                self._on_leave()
            if self.resident_bytes + adapter.nbytes > self.budget_bytes:
                raise AdapterError(f"adapter {adapter.name!r} ({adapter.nbytes} bytes) does not fit the resident budget "
                                   f"of {self.budget_bytes} bytes next to the adapters in use")
        self.resident[adapter.name] = adapter

    def _unknown(self, name: str) -> UnknownAdapter:
        return UnknownAdapter(f"unknown adapter {name!r}; available: {sorted(self.known)}")

    def resident_or_none(self, name: str) -> LoadedAdapter | None:
        """The adapter if it is resident (marked most recently used), None if evicted; never touches disk.
        UnknownAdapter if no adapter has that name."""
        with self._lock:
            if name not in self.known:
                raise self._unknown(name)
            adapter = self.resident.get(name)
            if adapter is not None:
                self.resident.move_to_end(name)
            return adapter

    def get(self, name: str) -> LoadedAdapter:
        """A resident adapter, read back from disk if it was evicted (so: not on the event loop)."""
        adapter = self.resident_or_none(name)
        if adapter is not None:
            return adapter
        adapter = self._read(name, self.known[name])
        with self._lock:
            if name not in self.known:
                raise self._unknown(name)
            if name not in self.resident:  # nobody else read it back meanwhile
                self._make_resident(adapter)
            self.resident.move_to_end(name)
            return self.resident[name]

    def unload(self, name: str) -> None:
        with self._lock:
            if name not in self.known:
                raise self._unknown(name)
            if self.in_use[name]:
                raise AdapterInUse(f"adapter {name!r} is in use by {self.in_use[name]} request(s); retry when they finish")
            self.resident.pop(name, None)
            del self.known[name]
            self._on_leave()

    def acquire(self, chosen: AdapterSet) -> None:
        """Mark a request's adapters in use: neither evicted nor unloaded until `release`."""
        with self._lock:
            self.in_use.update(a.name for a, _ in chosen)

    def release(self, chosen: AdapterSet) -> None:
        with self._lock:
            self.in_use.subtract(a.name for a, _ in chosen)
