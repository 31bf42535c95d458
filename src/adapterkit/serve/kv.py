"""Paged KV cache: per-sequence block tables over the unified pool's KV pages (vLLM / S-LoRA).

A sequence's token at position p lives in pool row `table[p // block_size] * block_size +
p % block_size` of every layer's K and V (see `UnifiedPool.kv`). Pages are allocated on
demand as sequences grow and returned the moment a sequence finishes or is aborted.
"""
from __future__ import annotations

import math

from adapterkit.serve.pool import UnifiedPool


class PagedKVCache:
    def __init__(self, pool: UnifiedPool) -> None:
        self.pool = pool
        self.block_size = pool.block_size
        self.tables: dict[str, list[int]] = {}

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
        self.tables.setdefault(seq_id, []).extend(pages)
        return True

    def free(self, seq_id: str) -> int:
        """Return all of `seq_id`'s pages to the pool; the number freed (0 if unknown)."""
        pages = self.tables.pop(seq_id, [])
        if pages:
            self.pool.free(pages, "kv")
        return len(pages)

    def rows(self, seq_id: str, start: int, end: int) -> list[int]:
        """Pool rows of positions [start, end) of `seq_id` (a list: the scheduler builds one step's
        rows from these with plain Python, cheaper than tensor ops for one-token decodes)."""
        table, bs = self.tables[seq_id], self.block_size
        return [table[p // bs] * bs + p % bs for p in range(start, end)]

    def num_pages(self, seq_id: str) -> int:
        return len(self.tables.get(seq_id, ()))
