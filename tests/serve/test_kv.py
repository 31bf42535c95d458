"""Unified pool and paged KV bookkeeping."""
from __future__ import annotations

import pytest
import torch

from adapterkit.errors import ConfigError
from adapterkit.serve.kv import PagedKVCache
from adapterkit.serve.pool import UnifiedPool
from adapterkit.serve.types import EngineConfig


def test_pool_alloc_free_and_kinds():
    pool = UnifiedPool(num_layers=2, num_kv_heads=2, head_dim=4, block_size=4, num_pages=6)
    assert pool.page_elems == 2 * 2 * 4 * 2 * 4 and pool.page_bytes == pool.page_elems * 4
    a = pool.alloc(4, "kv")
    b = pool.alloc(2, "adapter")
    assert len(set(a) | set(b)) == 6 and pool.num_free == 0
    assert pool.alloc(1, "kv") is None  # nothing allocated on failure
    assert pool.used("kv") == 4 and pool.used("adapter") == 2
    freed = []
    pool.reclaim = lambda n: (pool.free(b, "adapter"), freed.append(n))[0] or len(b)
    c = pool.alloc(2, "kv")
    assert freed == [2] and len(c) == 2 and pool.used("adapter") == 0 and pool.used("kv") == 6
    with pytest.raises(ValueError):
        pool.alloc(1, "other")
    assert pool.pages_for(1) == 1 and pool.pages_for(pool.page_bytes + 1) == 2


def test_pool_evicts_cached_pages_before_reclaiming_adapters():
    """Cached KV pages (prefix cache, no sequence holds them) are taken back first, on every
    allocation; the adapter reclaim hook runs only for what is still missing."""
    pool = UnifiedPool(1, 1, 2, block_size=2, num_pages=4)
    pages = pool.alloc(4, "kv")
    pool.recharge(2, "kv", "cached")
    assert pool.used("kv") == 2 and pool.used("cached") == 2 and pool.num_free == 0
    cached, calls = pages[2:], []

    def evict(n):
        calls.append(("evict", n))
        out = [cached.pop() for _ in range(min(n, len(cached)))]
        pool.free(out, "cached")
        return len(out)

    pool.evict, pool.reclaim = evict, lambda n: calls.append(("reclaim", n)) or 0
    assert pool.alloc(1, "adapter", reclaim=False) is not None and calls == [("evict", 1)]
    assert pool.alloc(3, "kv") is None and calls[1:] == [("evict", 3), ("reclaim", 2)]
    assert pool.used("cached") == 0 and pool.num_free == 1 and pool.used("adapter") == 1


def test_kv_rows_map_positions_to_pages():
    pool = UnifiedPool(1, 1, 2, block_size=4, num_pages=8)
    kv = PagedKVCache(pool)
    assert kv.ensure("a", 5) and kv.num_pages("a") == 2
    assert kv.ensure("b", 1)
    assert kv.ensure("a", 8) and kv.num_pages("a") == 2  # still fits
    assert kv.ensure("a", 9) and kv.num_pages("a") == 3
    t = kv.tables["a"]
    rows = torch.tensor(kv.rows("a", 0, 9))
    want = [t[p // 4] * 4 + p % 4 for p in range(9)]
    assert rows.tolist() == want
    assert len(set(rows.tolist()) & set(kv.rows("b", 0, 1))) == 0
    assert not kv.ensure("c", 100)
    assert kv.num_pages("c") == 0
    assert kv.free("a") == 3 and pool.used("kv") == 1 and kv.free("a") == 0
    # writes through the rows land in the layer's K storage
    k, _ = pool.layer_kv(0)
    k[kv.rows("b", 0, 1)] = torch.ones(1, 1, 2)
    assert pool.kv[0, 0].sum() == 2


def test_engine_config_validation():
    with pytest.raises(ConfigError, match="max_loras"):
        EngineConfig(max_loras=0)
    with pytest.raises(ConfigError, match="dtype"):
        EngineConfig(dtype="int8")
    with pytest.raises(ConfigError, match="num_pages"):
        EngineConfig(num_pages=0)
