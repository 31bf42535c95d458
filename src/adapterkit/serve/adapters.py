"""Adapter store (every registered adapter, host memory / disk) and the device slot cache.

Tiers, as in S-LoRA:
  * `AdapterStore`: all registered adapters by name. Registration reads and validates the file
    (method lora, rank <= max_lora_rank, targets and shapes fit the base, no NaN/Inf), keeps
    the tensors in host memory (LRU-bounded by `max_cpu_loras`; dropped ones are re-read from
    disk on their next use: a "cold load").
  * `SlotCache`: `max_loras` device slots (`LoraSlots`, vLLM-style stacked tensors the
    kernels read). LRU eviction that never evicts an adapter a running request holds
    (refcount), prefetch for queued requests, hit/miss/eviction counters. A loaded adapter is
    charged ceil(bytes / page bytes) pages of the unified pool (see `serve/pool.py`).
"""
from __future__ import annotations

import itertools
import math
import re
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from adapterkit.errors import (
    AdapterFileError,
    AdapterNotFoundError,
    ConfigError,
    DuplicateAdapterError,
    IncompatibleBaseError,
    UnsupportedModuleError,
    did_you_mean,
)
from adapterkit.serve.pool import UnifiedPool

# <prefix>.<layer index>.<path inside the layer>.lora_A|B: the first number in the key is the
# decoder layer ("model.layers.3.self_attn.q_proj", "transformer.h.3.attn.c_attn",
# "model.decoder.layers.3.fc1"); the path resolves to the module name that it ends with
_KEY = re.compile(r"^(?:.*?\.)?(\d+)\.(\w+(?:\.\w+)*)\.(lora_A|lora_B)$")


def _module_of(path: str, module_shapes: dict[str, tuple[int, int]]) -> str | None:
    """The longest module name in `module_shapes` that `path` (inside a layer) ends with."""
    hits = [m for m in module_shapes if path == m or path.endswith("." + m)]
    return max(hits, key=len) if hits else None


@dataclass
class HostAdapter:
    """A validated LoRA adapter. weights: (layer, module) -> A (r, in), B (out, r), fp32.

    reg_id: this registration's identity, set by `AdapterStore.register` and never reused. The
    prefix cache keys K/V by it, not by the name: an adapter unregistered and registered again
    under the same name (other weights) must never hit the old K/V.
    """

    name: str
    source: str
    rank: int
    alpha: float
    scaling: float
    targets: tuple[str, ...]
    nbytes: int
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] | None = field(repr=False, default=None)
    reg_id: int = 0


def parse_lora(name: str, source: str, method: str, config: dict[str, Any], tensors: dict[str, torch.Tensor],
               module_shapes: dict[str, tuple[int, int]], num_layers: int, max_rank: int,
               check_finite: bool = True) -> HostAdapter:
    """Validate a read adapter against the base; raise typed errors naming the offending thing.
    check_finite=False only for tensors `formats.read_adapter` already checked for NaN/Inf."""
    if method != "lora":
        raise UnsupportedModuleError(f"adapter {name!r} ({source}): the engine serves method 'lora', got {method!r}")
    if config.get("bias") or config.get("use_dora"):
        raise UnsupportedModuleError(f"adapter {name!r} ({source}): LoRA with bias / DoRA is not servable yet")
    r = config.get("r")
    if not isinstance(r, int) or r < 1:
        raise AdapterFileError(f"adapter {name!r} ({source}): config field 'r' must be a positive int, got {r!r}")
    if r > max_rank:
        raise ConfigError(f"adapter {name!r} ({source}): rank r={r} exceeds max_lora_rank={max_rank}")
    alpha = float(config.get("alpha", r))
    scaling = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    parts: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = _KEY.match(key)
        if m is None:
            raise IncompatibleBaseError(f"adapter {name!r} ({source}): tensor {key!r} is not a LoRA weight of a "
                                        f"decoder layer (expected '...layers.<i>.<module>.lora_A|B')")
        layer, path, which = int(m.group(1)), m.group(2), m.group(3)
        mod = _module_of(path, module_shapes)
        if mod is None:
            hint = did_you_mean(path.split(".")[-1], module_shapes)
            raise IncompatibleBaseError(f"adapter {name!r} ({source}): tensor {key!r} targets {path!r}, which the "
                                        f"serving engine cannot adapt.{hint}")
        if layer >= num_layers:
            raise IncompatibleBaseError(f"adapter {name!r} ({source}): tensor {key!r} is for layer {layer} but the "
                                        f"base has {num_layers} layers")
        if check_finite and not torch.isfinite(t).all():
            raise AdapterFileError(f"adapter {name!r} ({source}): tensor {key!r} holds NaN or Inf")
        parts.setdefault((layer, mod), {})[which] = t
    if not parts:
        raise AdapterFileError(f"adapter {name!r} ({source}) has no LoRA tensors")
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}
    nbytes = 0
    for (layer, mod), ab in parts.items():
        if set(ab) != {"lora_A", "lora_B"}:
            raise AdapterFileError(f"adapter {name!r} ({source}): layer {layer} {mod} has only {sorted(ab)}")
        A, B = ab["lora_A"].float(), ab["lora_B"].float()
        din, dout = module_shapes[mod]
        if tuple(A.shape) != (r, din) or tuple(B.shape) != (dout, r):
            raise IncompatibleBaseError(
                f"adapter {name!r} ({source}): layers.{layer}.{mod} has lora_A {tuple(A.shape)} and lora_B "
                f"{tuple(B.shape)}; this base needs ({r}, {din}) and ({dout}, {r})")
        weights[(layer, mod)] = (A.contiguous(), B.contiguous())
        nbytes += (A.numel() + B.numel()) * 4
    targets = tuple(sorted({m for _, m in weights}))
    return HostAdapter(name, source, r, alpha, scaling, targets, nbytes, weights)


class AdapterStore:
    """Registered adapters by name (thread-safe). Host tensors bounded by `max_cpu_loras` (LRU)."""

    def __init__(self, module_shapes: dict[str, tuple[int, int]], num_layers: int, max_rank: int,
                 max_cpu_loras: int | None = None) -> None:
        self.module_shapes, self.num_layers, self.max_rank = module_shapes, num_layers, max_rank
        self.max_cpu_loras = max_cpu_loras
        self._adapters: dict[str, HostAdapter] = {}
        self._resident: OrderedDict[str, None] = OrderedDict()  # names with host tensors, LRU order
        self._lock = threading.RLock()
        self.cold_loads: list[float] = []  # seconds per disk read after registration
        self._reg_ids = itertools.count(1)  # HostAdapter.reg_id of each registration

    def _read(self, name: str, source: str | Path | Any) -> HostAdapter:
        if isinstance(source, (str, Path)):
            from adapterkit.formats import read_adapter

            saved = read_adapter(source)
            return parse_lora(name, str(source), saved.method, saved.config, saved.tensors, self.module_shapes,
                              self.num_layers, self.max_rank, check_finite=False)  # read_adapter refuses NaN/Inf
        # an in-memory SavedAdapter-like object (method, config, tensors)
        return parse_lora(name, "<memory>", source.method, source.config, source.tensors, self.module_shapes,
                          self.num_layers, self.max_rank)

    def register(self, name: str, source: str | Path | Any) -> HostAdapter:
        if not isinstance(name, str) or not name:
            raise ConfigError(f"adapter name must be a non-empty string, got {name!r}")
        with self._lock:
            if name in self._adapters:
                raise DuplicateAdapterError(f"adapter {name!r} is already registered")
        ad = self._read(name, source)  # outside the lock: disk I/O
        with self._lock:
            if name in self._adapters:
                raise DuplicateAdapterError(f"adapter {name!r} is already registered")
            ad.reg_id = next(self._reg_ids)
            self._adapters[name] = ad
            self._touch(name)
        return ad

    def _touch(self, name: str) -> None:
        self._resident[name] = None
        self._resident.move_to_end(name)
        if self.max_cpu_loras is not None:
            while len(self._resident) > self.max_cpu_loras:
                old, _ = self._resident.popitem(last=False)
                if self._adapters[old].source != "<memory>":  # in-memory ones cannot be re-read
                    self._adapters[old].weights = None
                else:
                    self._resident[old] = None
                    self._resident.move_to_end(old, last=False)
                    break

    def unregister(self, name: str) -> HostAdapter:
        with self._lock:
            ad = self.get(name)
            del self._adapters[name]
            self._resident.pop(name, None)
            return ad

    def get(self, name: str) -> HostAdapter:
        with self._lock:
            ad = self._adapters.get(name)
            if ad is None:
                raise AdapterNotFoundError(f"adapter {name!r} is not registered.{did_you_mean(name, self._adapters)}")
            return ad

    def weights(self, name: str) -> dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]:
        """Host tensors of `name`, re-read from disk if they were dropped (cold load)."""
        ad = self.get(name)
        w = ad.weights
        if w is None:
            t0 = time.perf_counter()
            w = self._read(name, ad.source).weights
            self.cold_loads.append(time.perf_counter() - t0)
            ad.weights = w
        with self._lock:
            if name in self._adapters:
                self._touch(name)
        assert w is not None
        return w

    def names(self) -> list[str]:
        with self._lock:
            return list(self._adapters)

    def __contains__(self, name: object) -> bool:
        return name in self._adapters

    def __len__(self) -> int:
        return len(self._adapters)


class LoraSlots:
    """Stacked slot tensors the kernels read: weights[(layer, module)] = A (S, R, in), B (S, out, R)
    with B stored pre-multiplied by the adapter's scaling (so kernels are called with
    scale=None and skip that multiply); scale (S,) is 1 for a loaded slot, 0 for an empty one;
    ranks (S,) true rank per slot (0 if empty). Allocated per (layer, module) on
    first use; R grows to the largest rank loaded.

    Memory layout follows the device's kernels: on CPU the storage is A^T (S, in, R) and B^T
    (S, R, out) and `weights` holds transposed views (the CPU BGMV reads them as flat row
    tables, `ops.lora.add_lora_bgmv`); elsewhere A and B are stored as shown.
    """

    def __init__(self, num_slots: int, module_shapes: dict[str, tuple[int, int]], dtype: torch.dtype,
                 device: torch.device | str) -> None:
        self.num_slots, self.module_shapes, self.dtype, self.device = num_slots, module_shapes, dtype, device
        self.transposed = torch.device(device).type == "cpu"
        self.rank = 0
        self.weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}
        self.scale = torch.zeros(num_slots, dtype=dtype, device=device)
        self.ranks = torch.zeros(num_slots, dtype=torch.int64, device=device)
        self._filled: list[set[tuple[int, str]]] = [set() for _ in range(num_slots)]

    def _new(self, din: int, dout: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Zeroed (A, B) with logical shapes (S, rank, din), (S, dout, rank) in this device's layout."""
        z = lambda *shape: torch.zeros(*shape, dtype=self.dtype, device=self.device)  # noqa: E731
        if self.transposed:
            return z(self.num_slots, din, rank).transpose(1, 2), z(self.num_slots, rank, dout).transpose(1, 2)
        return z(self.num_slots, rank, din), z(self.num_slots, dout, rank)

    def _grow(self, rank: int) -> None:
        for key, (A, B) in self.weights.items():
            A2, B2 = self._new(A.shape[2], B.shape[1], rank)
            A2[:, :self.rank] = A
            B2[:, :, :self.rank] = B
            self.weights[key] = (A2, B2)
        self.rank = rank

    def set(self, slot: int, ad: HostAdapter, weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Copy an adapter into `slot` (zero padded to R; modules it does not adapt zeroed).
        Zeroes only what the previous occupant leaves behind: its modules this adapter lacks,
        and its rank rows past this adapter's rank."""
        if ad.rank > self.rank:
            self._grow(ad.rank)
        old_rank, old_keys = int(self.ranks[slot]), self._filled[slot]
        for key in old_keys - weights.keys():
            As, Bs = self.weights[key]
            As[slot].zero_()
            Bs[slot].zero_()
        r = ad.rank
        for key, (A, B) in weights.items():
            if key not in self.weights:
                din, dout = self.module_shapes[key[1]]
                self.weights[key] = self._new(din, dout, self.rank)
            As, Bs = self.weights[key]
            As[slot, :r] = A.to(self.dtype)
            Bs[slot, :, :r] = (B * ad.scaling).to(self.dtype)
            if key in old_keys and old_rank > r:
                As[slot, r:old_rank].zero_()
                Bs[slot, :, r:old_rank].zero_()
        self._filled[slot] = set(weights)
        self.scale[slot] = 1.0
        self.ranks[slot] = ad.rank

    def clear(self, slot: int) -> None:
        for key in self._filled[slot]:
            As, Bs = self.weights[key]
            As[slot].zero_()
            Bs[slot].zero_()
        self._filled[slot] = set()
        self.scale[slot] = 0
        self.ranks[slot] = 0


class SlotCache:
    """Which adapter sits in which device slot. Called from the engine loop thread only."""

    def __init__(self, store: AdapterStore, slots: LoraSlots, pool: UnifiedPool | None = None) -> None:
        self.store, self.slots, self.pool = store, slots, pool
        self.slot_of: OrderedDict[str, int] = OrderedDict()  # loaded adapters, LRU first
        self.refs: dict[str, int] = {}  # running requests holding each adapter
        self.pages: dict[str, list[int]] = {}
        self.free_slots = list(range(slots.num_slots - 1, -1, -1))
        self.hits = self.misses = self.evictions = 0
        self.load_times: list[float] = []  # seconds per load into a slot (host -> slot)
        self.cold_load_times: list[float] = []  # seconds per load that re-read the file (disk -> slot)
        if pool is not None:
            pool.reclaim = self.reclaim

    def _evict_one(self, protect: set[str] = frozenset()) -> bool:  # type: ignore[assignment]
        for name in self.slot_of:  # LRU first
            if self.refs.get(name, 0) == 0 and name not in protect:
                self.evict(name)
                self.evictions += 1
                return True
        return False

    def evict(self, name: str) -> None:
        slot = self.slot_of.pop(name)
        self.slots.clear(slot)
        self.free_slots.append(slot)
        if self.pool is not None and name in self.pages:
            self.pool.free(self.pages.pop(name), "adapter")

    def _load(self, name: str, protect: set[str]) -> int | None:
        if not self.free_slots and not self._evict_one(protect):
            return None
        ad = self.store.get(name)
        if self.pool is not None:
            pages = self.pool.alloc(self.pool.pages_for(ad.nbytes * self.slots.scale.element_size() // 4), "adapter",
                                    reclaim=False)
            while pages is None and self._evict_one(protect | {name}):
                pages = self.pool.alloc(self.pool.pages_for(ad.nbytes * self.slots.scale.element_size() // 4),
                                        "adapter", reclaim=False)
            if pages is None:
                return None  # KV holds the pool; retry when sequences finish
            self.pages[name] = pages
        t0 = time.perf_counter()
        cold = ad.weights is None
        slot = self.free_slots.pop()
        self.slots.set(slot, ad, self.store.weights(name))
        (self.cold_load_times if cold else self.load_times).append(time.perf_counter() - t0)
        self.slot_of[name] = slot
        return slot

    def acquire(self, name: str, protect: set[str] = frozenset()) -> int | None:  # type: ignore[assignment]
        """Slot for a request starting to run with `name` (refcount + 1), or None if every slot is
        held by running requests / the pool is full."""
        if name in self.slot_of:
            self.hits += 1
            self.slot_of.move_to_end(name)
        else:
            slot = self._load(name, protect)
            if slot is None:
                return None
            self.misses += 1
        self.refs[name] = self.refs.get(name, 0) + 1
        return self.slot_of[name]

    def release(self, name: str) -> None:
        self.refs[name] -= 1
        if self.refs[name] == 0:
            del self.refs[name]

    def prefetch(self, names: list[str]) -> None:
        """Load adapters queued requests will need into FREE slots (never evicts)."""
        for name in names:
            if not self.free_slots:
                return
            if name not in self.slot_of and name in self.store:
                if self._load(name, set()) is not None:
                    self.misses += 1
                    # a prefetched adapter is the LRU-most so it cannot push out one in use soon
                    self.slot_of.move_to_end(name, last=False)

    def reclaim(self, n_pages: int) -> int:
        """Pool hook: evict idle adapters (LRU first) until `n_pages` pages are free."""
        freed = 0
        for name in list(self.slot_of):
            if freed >= n_pages:
                break
            if self.refs.get(name, 0) == 0:
                freed += len(self.pages.get(name, ()))
                self.evict(name)
                self.evictions += 1
        return freed

    def remove(self, name: str) -> None:
        """Drop `name` from its slot (unregister). Caller ensures no running request holds it."""
        if name in self.slot_of:
            self.evict(name)
