"""RAM tier: decoded adapter tensors, LRU by a byte budget, keyed by blob sha256.

Thread-safe. Concurrent misses for one key load once (the others wait for that load). Values are
shared between callers: treat them as read-only (``Registry.load`` hands out copies).
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Mapping

import torch

Tensors = Mapping[str, torch.Tensor]


def tensors_nbytes(tensors: Tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


@dataclass(frozen=True)
class CacheStats:
    hits: int
    misses: int
    evictions: int
    entries: int
    bytes: int
    budget: int


class AdapterCache:
    def __init__(self, budget_bytes: int = 512 << 20):
        if budget_bytes < 0:
            raise ValueError("budget_bytes must be >= 0")
        self.budget = int(budget_bytes)
        self._items: OrderedDict[str, tuple[Tensors, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self._loading: dict[str, threading.Lock] = {}
        self._hits = self._misses = self._evictions = 0

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    def __contains__(self, key: str) -> bool:
        with self._lock:
            return key in self._items

    def get(self, key: str) -> Tensors | None:
        """Cached value or None; counts a hit or a miss."""
        with self._lock:
            return self._lookup(key)

    def _lookup(self, key: str) -> Tensors | None:
        item = self._items.get(key)
        if item is None:
            self._misses += 1
            return None
        self._items.move_to_end(key)
        self._hits += 1
        return item[0]

    def put(self, key: str, tensors: Tensors) -> bool:
        """Insert (or refresh) ``key``; evicts least-recently used entries to fit the budget.
        Returns False (and caches nothing) if the value alone is larger than the budget."""
        size = tensors_nbytes(tensors)
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= old[1]
            if size > self.budget:
                return False
            while self._items and self._bytes + size > self.budget:
                _, (_, evicted) = self._items.popitem(last=False)
                self._bytes -= evicted
                self._evictions += 1
            self._items[key] = (tensors, size)
            self._bytes += size
            return True

    def get_or_load(self, key: str, loader: Callable[[], Tensors]) -> Tensors:
        """Cached value, else ``loader()`` (called once per key even under concurrent misses).
        If the loader raises, nothing is cached and the error propagates to every waiter's retry."""
        with self._lock:
            value = self._lookup(key)
            if value is not None:
                return value
            key_lock = self._loading.setdefault(key, threading.Lock())
        with key_lock:
            with self._lock:
                item = self._items.get(key)
                if item is not None:  # another thread loaded it while we waited
                    self._items.move_to_end(key)
                    return item[0]
            try:
                value = loader()
                self.put(key, value)
                return value
            finally:
                with self._lock:
                    if self._loading.get(key) is key_lock:
                        del self._loading[key]

    def discard(self, key: str) -> None:
        with self._lock:
            item = self._items.pop(key, None)
            if item is not None:
                self._bytes -= item[1]

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._bytes = 0

    def stats(self) -> CacheStats:
        with self._lock:
            return CacheStats(self._hits, self._misses, self._evictions, len(self._items),
                              self._bytes, self.budget)
