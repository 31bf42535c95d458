"""Paged KV cache: per-sequence block tables over the unified pool's KV pages (vLLM / S-LoRA).

A sequence's token at position p lives in pool row `table[p // block_size] * block_size +
p % block_size` of every layer's K and V (see `UnifiedPool.kv`). Pages are allocated on
demand as sequences grow and released the moment a sequence finishes or is aborted.

Automatic prefix caching (vLLM's APC): a full block of a prompt, once computed, can be cached
under a key naming everything its K/V depend on (`block_keys`): the tokens from position 0
through the block, and the adapter registration that computed them. A later sequence whose
prompt starts with the same keys shares those pages instead of recomputing them, so pages are
reference counted. A cached page whose last table lets go stays allocated (charged "cached" in
the pool) and is evictable, least recently released first; every allocation that falls short
evicts such pages before anything else (`evict`, the pool's hook). Only full blocks are
shared and a sharer computes at least the block after them, so no shared page is written.
"""
from __future__ import annotations

import hashlib
import math
from collections import OrderedDict

from adapterkit.serve.pool import UnifiedPool


def block_keys(token_ids: list[int], block_size: int, adapter_id: int | None) -> list[bytes]:
    """Prefix-cache keys of the full blocks of `token_ids`, under `adapter_id` (None: the base
    model; else the adapter's registration id, `HostAdapter.reg_id`).

    Key i hashes key i - 1, block i's tokens and the adapter identity, so two equal keys mean
    the same tokens from position 0 under the same weights. SHA-256, not Python's `hash()`:
    hash() of ints and tuples is unseeded and easy to collide on purpose, and a collision would
    hand one client the K/V (and so the completions) of another's prompt.
    """
    keys: list[bytes] = []
    parent = b""
    for lo in range(0, len(token_ids) - block_size + 1, block_size):
        parent = hashlib.sha256(parent + repr((adapter_id, token_ids[lo:lo + block_size])).encode()).digest()
        keys.append(parent)
    return keys


class PagedKVCache:
    def __init__(self, pool: UnifiedPool) -> None:
        self.pool = pool
        self.block_size = pool.block_size
        self.tables: dict[str, list[int]] = {}
        self.refs: dict[int, int] = {}  # page -> tables holding it (more than one: a shared prefix page)
        self.cached: dict[bytes, int] = {}  # block key -> the page holding its K/V
        self.key_of: dict[int, tuple[bytes, int | None]] = {}  # cached page -> (its key, adapter identity)
        self.evictable: OrderedDict[int, None] = OrderedDict()  # cached pages no table holds, LRU first
        pool.evict = self.evict

    def pages_needed(self, seq_id: str, num_tokens: int) -> int:
        """Extra pages `seq_id` needs to hold `num_tokens` tokens."""
        have = len(self.tables.get(seq_id, ()))
        return max(0, math.ceil(num_tokens / self.block_size) - have)

    def ensure(self, seq_id: str, num_tokens: int) -> bool:
        """Grow `seq_id`'s table to hold `num_tokens` tokens. False (and no change) if the pool
        is out of pages."""
        need = self.pages_needed(seq_id, num_tokens)
        if need == 0:
            self.tables.setdefault(seq_id, [])
            return True
        pages = self.pool.alloc(need, "kv")
        if pages is None:
            return False
        for p in pages:
            self.refs[p] = 1
        self.tables.setdefault(seq_id, []).extend(pages)
        return True

    def free(self, seq_id: str) -> int:
        """Release all of `seq_id`'s pages; the number its table held (0 if unknown). A page
        another table still holds stays; a cached one becomes evictable, the sequence's last
        block first in line (a block is worthless without the blocks before it); the rest go
        back to the pool."""
        pages = self.tables.pop(seq_id, [])
        gone, idle = [], []
        for p in pages:
            self.refs[p] -= 1
            if self.refs[p] == 0:
                del self.refs[p]
                (idle if p in self.key_of else gone).append(p)
        if gone:
            self.pool.free(gone, "kv")
        if idle:
            self.evictable.update(dict.fromkeys(reversed(idle)))
            self.pool.recharge(len(idle), "kv", "cached")
        return len(pages)

    def share_prefix(self, seq_id: str, keys: list[bytes]) -> int:
        """Start `seq_id`'s (empty) table with the pages of the leading `keys` that are cached
        (its longest cached prefix); returns the number of blocks shared."""
        assert not self.tables.get(seq_id), "share_prefix on a sequence that holds pages"
        pages = []
        for key in keys:
            page = self.cached.get(key)
            if page is None:
                break
            pages.append(page)
        revived = 0
        for p in pages:
            if p in self.evictable:
                del self.evictable[p]
                revived += 1
            self.refs[p] = self.refs.get(p, 0) + 1
        if revived:
            self.pool.recharge(revived, "cached", "kv")
        self.tables[seq_id] = pages
        return len(pages)

    def publish(self, seq_id: str, keys: list[bytes], first: int, last: int, adapter_id: int | None) -> None:
        """Cache blocks [first, last) of `seq_id`'s table (full, computed) under `keys[first:last]`.
        A key cached already keeps its page: this table's copy stays private to the sequence."""
        table = self.tables[seq_id]
        for i in range(first, last):
            if keys[i] not in self.cached:
                self.cached[keys[i]] = table[i]
                self.key_of[table[i]] = (keys[i], adapter_id)

    def evict(self, n: int) -> int:
        """Pool hook: free up to `n` evictable cached pages, least recently released first, with
        their cache entries. Pages a table holds are never evicted. Returns the pages freed."""
        pages = []
        while self.evictable and len(pages) < n:
            p, _ = self.evictable.popitem(last=False)
            del self.cached[self.key_of.pop(p)[0]]
            pages.append(p)
        if pages:
            self.pool.free(pages, "cached")
        return len(pages)

    def forget(self, adapter_id: int) -> None:
        """Drop every cache entry of one adapter registration (it is unregistered), so nothing
        reaches its K/V again; its evictable pages go back to the pool (a page a table still
        holds goes with its last table)."""
        gone = []
        for p, (key, aid) in list(self.key_of.items()):
            if aid == adapter_id:
                del self.key_of[p], self.cached[key]
                if p in self.evictable:
                    del self.evictable[p]
                    gone.append(p)
        if gone:
            self.pool.free(gone, "cached")

    def rows(self, seq_id: str, start: int, end: int) -> list[int]:
        """Pool rows of positions [start, end) of `seq_id` (a list: the scheduler builds one step's
        rows from these with plain Python, cheaper than tensor ops for one-token decodes)."""
        table, bs = self.tables[seq_id], self.block_size
        return [table[p // bs] * bs + p % bs for p in range(start, end)]

    def num_pages(self, seq_id: str) -> int:
        return len(self.tables.get(seq_id, ()))
