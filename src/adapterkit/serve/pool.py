"""Unified Paging (S-LoRA): one preallocated pool of fixed-size pages shared by the KV cache and
the adapter weights on the device, so memory is not split statically between the two.

What is paged, exactly:
  * A page is `page_elems = num_layers * 2 * block_size * num_kv_heads * head_dim` elements:
    the K and V of `block_size` tokens for every layer. KV pages are REAL storage: `self.kv`
    (num_layers, 2, num_pages * block_size, num_kv_heads, head_dim) and a sequence's block table
    lists its page ids (see `serve/kv.py`); token row = page * block_size + offset.
  * Adapter weights loaded into device slots are CHARGED to the same pool:
    ceil(adapter bytes at pool dtype / page bytes) pages per loaded adapter, allocated and freed
    with the adapter. The numbers live in the slot tensors the LoRA kernels read
    (`serve/adapters.py`, vLLM-style `[max_loras, R, d]`), not inside the page storage; this
    keeps the kernels simple while KV and adapters still compete for one memory budget:
    a sequence that needs KV pages can evict idle adapters (`reclaim` hook), and an adapter
    load waits when KV holds every page.
  * With automatic prefix caching (`serve/kv.py`) a KV page that no sequence uses any more but
    whose tokens are cached stays allocated, charged as "cached" rather than "kv". Cached
    pages are the first thing any allocation takes back (`evict` hook, before `reclaim`), so
    they are free memory that may still save a prefill.
"""
from __future__ import annotations

import math
import threading
from collections.abc import Callable

import torch

KINDS = ("kv", "adapter")  # what alloc() hands out; "cached" pages are KV pages moved with recharge()


class UnifiedPool:
    """Fixed-size page allocator + the KV page storage.

    kv: (num_layers, 2, num_pages * block_size, num_kv_heads, head_dim); [l, 0] is layer l's K.
    """

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, block_size: int, num_pages: int,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> None:
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        self.block_size, self.num_pages, self.dtype = block_size, num_pages, dtype
        self.kv = torch.zeros(num_layers, 2, num_pages * block_size, num_kv_heads, head_dim, dtype=dtype,
                              device=device)
        self._free: list[int] = list(range(num_pages - 1, -1, -1))  # a stack: low ids first
        self._used = {k: 0 for k in (*KINDS, "cached")}
        self._lock = threading.Lock()
        # called with the number of missing pages when an allocation falls short; each returns
        # the pages it freed. `evict` runs first, on every allocation (the KV cache drops cached
        # pages no sequence uses); `reclaim` then, unless the caller opts out (the adapter
        # cache evicts idle adapters)
        self.evict: Callable[[int], int] | None = None
        self.reclaim: Callable[[int], int] | None = None

    @staticmethod
    def pages_for_bytes(num_layers: int, num_kv_heads: int, head_dim: int, block_size: int, dtype: torch.dtype,
                        nbytes: int) -> int:
        elem = torch.tensor([], dtype=dtype).element_size()
        return max(1, nbytes // (num_layers * 2 * block_size * num_kv_heads * head_dim * elem))

    @property
    def page_elems(self) -> int:
        return self.num_layers * 2 * self.block_size * self.num_kv_heads * self.head_dim

    @property
    def page_bytes(self) -> int:
        return self.page_elems * self.kv.element_size()

    def pages_for(self, nbytes: int) -> int:
        """Pages charged for `nbytes` of adapter weights."""
        return max(1, math.ceil(nbytes / self.page_bytes))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def used(self, kind: str) -> int:
        return self._used[kind]

    def alloc(self, n: int, kind: str, reclaim: bool = True) -> list[int] | None:
        """`n` page ids for `kind` ("kv" or "adapter"), or None if the pool cannot supply them even
        after the evict and reclaim hooks ran (nothing is allocated then)."""
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        if n > len(self._free) and self.evict is not None:
            self.evict(n - len(self._free))  # outside the lock: it calls free()
        if n > len(self._free) and reclaim and self.reclaim is not None:
            self.reclaim(n - len(self._free))  # runs outside the lock: it calls free()
        with self._lock:
            if n > len(self._free):
                return None
            pages = [self._free.pop() for _ in range(n)]
            self._used[kind] += n
            return pages

    def free(self, pages: list[int], kind: str) -> None:
        with self._lock:
            self._free.extend(reversed(pages))
            self._used[kind] -= len(pages)
            assert self._used[kind] >= 0, "double free"

    def recharge(self, n: int, src: str, dst: str) -> None:
        """Move the charge of `n` allocated pages from kind `src` to `dst` (a KV page becoming
        cached when its last sequence lets go, or used again by a prefix-cache hit)."""
        with self._lock:
            self._used[src] -= n
            self._used[dst] += n
            assert self._used[src] >= 0, f"more {src} pages moved than held"

    def layer_kv(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V rows of one layer: each (num_pages * block_size, num_kv_heads, head_dim)."""
        return self.kv[layer, 0], self.kv[layer, 1]
