"""RAM tier: LRU by byte budget, stats, thread safety, single-flight loads."""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from adapters_store.cache import AdapterCache, tensors_nbytes


def item(n_floats: int) -> dict[str, torch.Tensor]:
    return {"w": torch.zeros(n_floats)}                     # 4 bytes per float


def test_lru_eviction_by_bytes():
    cache = AdapterCache(budget_bytes=1000)
    cache.put("a", item(100))                               # 400 B
    cache.put("b", item(100))                               # 800 B
    assert cache.get("a") is not None                       # a is now most recent
    cache.put("c", item(100))                               # 1200 > 1000: evict b (LRU)
    assert "b" not in cache and "a" in cache and "c" in cache
    s = cache.stats()
    assert (s.entries, s.bytes, s.evictions, s.hits) == (2, 800, 1, 1)
    assert cache.get("b") is None and cache.stats().misses == 1
    cache.put("d", item(240))                               # 960 B: evicts both others
    assert list(cache._items) == ["d"] and cache.stats().evictions == 3


def test_oversize_not_cached_and_refresh_replaces_size():
    cache = AdapterCache(budget_bytes=100)
    assert cache.put("big", item(26)) is False and "big" not in cache
    cache.put("k", item(10))
    cache.put("k", item(20))
    assert cache.stats().bytes == 80 and len(cache) == 1
    assert AdapterCache(0).put("any", item(1)) is False
    with pytest.raises(ValueError):
        AdapterCache(-1)


def test_get_or_load_counts_and_propagates_errors():
    cache = AdapterCache(1 << 20)
    calls = []

    def loader():
        calls.append(1)
        return item(10)

    a = cache.get_or_load("k", loader)
    b = cache.get_or_load("k", loader)
    assert a is b and len(calls) == 1
    s = cache.stats()
    assert (s.hits, s.misses) == (1, 1)

    def failing():
        raise RuntimeError("corrupt")

    with pytest.raises(RuntimeError):
        cache.get_or_load("bad", failing)
    assert "bad" not in cache                               # a failed load caches nothing
    assert cache.get_or_load("bad", loader) is not None     # and a later load retries


def test_concurrent_misses_load_once():
    cache = AdapterCache(1 << 20)
    calls, barrier = [], threading.Barrier(8)

    def slow_loader():
        calls.append(1)
        time.sleep(0.05)
        return item(10)

    def worker(_):
        barrier.wait()
        return cache.get_or_load("k", slow_loader)

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(worker, range(8)))
    assert len(calls) == 1 and all(r is results[0] for r in results)


def test_budget_holds_under_concurrent_puts():
    cache = AdapterCache(budget_bytes=4000)

    def worker(t):
        for i in range(200):
            key = f"{t}-{i % 30}"
            cache.get_or_load(key, lambda: item(50 + (i % 7) * 10))
            cache.get(f"{(t + 1) % 8}-{i % 30}")

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(worker, range(8)))
    s = cache.stats()
    assert s.bytes <= s.budget
    assert s.bytes == sum(tensors_nbytes(v) for v, _ in cache._items.values())
    assert s.evictions > 0 and s.hits + s.misses >= 8 * 400
