"""Discrete-event model of a fleet of serving replicas (the simulator core of `fleet_sim.py`).

Each `Replica` mirrors one `adapterkit.serve.engine.Engine` at the level that decides time:
the scheduler's step (admit FCFS while fewer than `max_num_seqs` run, skipping a request whose
adapter cannot get a slot; prefetch queued adapters into free slots; pack decodes first, then
prefill chunks, under `max_batched_tokens`), the slot cache (`slots` device slots, LRU, never
evicting an adapter a running request holds) and the host cache (`host_cache` adapters in host
memory, LRU; others are re-read from disk: a cold load). A step lasts
`CostModel.step_s(tokens, sampled rows, distinct adapters)` plus the load time of every adapter loaded in it,
because the engine loads adapters on its compute thread inside the step. KV-page pressure and
preemption are not modelled (the validation runs size the pool so they do not happen).

`Router` holds the four routing policies; `simulate` runs a trace through N replicas.
"""
from __future__ import annotations

import bisect
import heapq
import math
import random
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace

POLICIES = ("random", "least_loaded", "affinity", "chash_bounded")


@dataclass(frozen=True)
class CostModel:
    """Per-replica costs (seconds) and limits. `step_s` is linear in the tokens of the batch (every
    token runs through the decoder layers), the sampled rows (sequences whose chunk ends this
    step: each pays the LM head and sampling; a decode token is both) and distinct adapters."""

    step_base_s: float
    step_per_token_s: float
    step_per_row_s: float
    step_per_adapter_s: float
    load_disk_s: float  # disk -> slot (re-read and validate the file, copy into the slot)
    load_host_s: float  # host memory -> slot
    slots: int = 8  # EngineConfig.max_loras
    host_cache: int = 32  # EngineConfig.max_cpu_loras
    max_num_seqs: int = 16
    max_batched_tokens: int = 256

    def __post_init__(self) -> None:
        for name in ("step_base_s", "step_per_token_s", "step_per_row_s", "step_per_adapter_s", "load_disk_s",
                     "load_host_s"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"CostModel.{name}: must be >= 0, got {getattr(self, name)!r}")
        for name in ("slots", "host_cache", "max_num_seqs", "max_batched_tokens"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"CostModel.{name}: must be an int >= 1, got {v!r}")

    def step_s(self, tokens: int, rows: int, adapters: int) -> float:
        return (self.step_base_s + self.step_per_token_s * tokens + self.step_per_row_s * rows
                + self.step_per_adapter_s * adapters)

    def scaled(self, name: str, factor: float) -> CostModel:
        """A copy with field `name` multiplied by `factor` (ints rounded, at least 1)."""
        v = getattr(self, name)
        return replace(self, **{name: max(1, round(v * factor)) if isinstance(v, int) else v * factor})


@dataclass
class Request:
    rid: int
    t: float  # arrival time, s
    adapter: int
    prompt: int  # prompt tokens
    out: int  # tokens to generate
    replica: int = -1
    t_first: float | None = None
    t_done: float | None = None


@dataclass
class _Run:
    req: Request
    computed: int = 0
    generated: int = 0

    @property
    def pending(self) -> int:
        return self.req.prompt + self.generated - self.computed


class Replica:
    """One engine. `on_resident(adapter, present)` is called when the adapter becomes resident
    (in a slot or in host memory: usable without a disk read) or stops being so."""

    def __init__(self, cost: CostModel, preload: Iterable[int] = (),
                 on_resident: Callable[[int, bool], None] | None = None) -> None:
        self.cost = cost
        self.waiting: deque[_Run] = deque()
        self.running: list[_Run] = []
        self.slot_lru: OrderedDict[int, None] = OrderedDict()  # adapters in slots, LRU first
        self.host_lru: OrderedDict[int, None] = OrderedDict()  # adapters with host tensors, LRU first
        self.refs: dict[int, int] = {}
        self.on_resident = on_resident or (lambda a, p: None)
        self.disk_loads = self.host_loads = self.hits = self.steps = 0
        self.tokens = 0
        self.busy_s = 0.0  # summed step durations (loads included)
        self.token_log: list[tuple[float, int]] = []  # (step end time, tokens generated)
        self._batch: list[tuple[_Run, int]] = []
        for a in preload:  # registration reads every adapter; the last `host_cache` stay in memory
            self._touch_host(a)

    # ------------------------------------------------------------------ residency
    def resident(self, a: int) -> bool:
        return a in self.slot_lru or a in self.host_lru

    @property
    def outstanding(self) -> int:
        return len(self.waiting) + len(self.running)

    def _touch_host(self, a: int) -> None:
        was = self.resident(a)
        self.host_lru[a] = None
        self.host_lru.move_to_end(a)
        if not was:
            self.on_resident(a, True)
        while len(self.host_lru) > self.cost.host_cache:
            old, _ = self.host_lru.popitem(last=False)
            if old not in self.slot_lru:
                self.on_resident(old, False)

    def _load(self, a: int, protect: set[int]) -> float | None:
        """Load `a` into a slot (evicting the LRU idle one); its duration, or None if none is free."""
        if len(self.slot_lru) >= self.cost.slots:
            victim = next((b for b in self.slot_lru if self.refs.get(b, 0) == 0 and b not in protect), None)
            if victim is None:
                return None
            del self.slot_lru[victim]
            if victim not in self.host_lru:
                self.on_resident(victim, False)
        if a in self.host_lru:
            self.host_loads += 1
            dt = self.cost.load_host_s
        else:
            self.disk_loads += 1
            dt = self.cost.load_disk_s
        self._touch_host(a)  # first: it reports `a` becoming resident
        self.slot_lru[a] = None
        return dt

    # ------------------------------------------------------------------ the engine step
    def submit(self, req: Request) -> None:
        self.waiting.append(_Run(req))

    def begin_step(self) -> float:
        """Admit, prefetch and pack like `Scheduler.step`; the step's duration (0: nothing to run)."""
        c = self.cost
        load_s = 0.0
        skipped: list[_Run] = []
        while self.waiting and len(self.running) < c.max_num_seqs:
            r = self.waiting.popleft()
            a = r.req.adapter
            if a in self.slot_lru:
                self.hits += 1
                self.slot_lru.move_to_end(a)
            else:
                dt = self._load(a, {x.req.adapter for x in self.running})
                if dt is None:
                    skipped.append(r)
                    continue
                load_s += dt
            self.refs[a] = self.refs.get(a, 0) + 1
            self.running.append(r)
        self.waiting.extendleft(reversed(skipped))
        if self.waiting:  # prefetch into free slots only, LRU-most so it evicts nothing in use
            for a in list(dict.fromkeys(r.req.adapter for r in self.waiting))[:c.slots]:
                if len(self.slot_lru) >= c.slots:
                    break
                if a not in self.slot_lru:
                    load_s += self._load(a, set()) or 0.0
                    self.slot_lru.move_to_end(a, last=False)
        budget = c.max_batched_tokens
        self._batch = []
        for r in sorted(self.running, key=lambda x: x.pending != 1):  # decodes first, stable
            if budget == 0:
                break
            n = min(r.pending, budget)
            self._batch.append((r, n))
            budget -= n
        if not self._batch:
            self.busy_s += load_s
            return load_s
        tokens = c.max_batched_tokens - budget
        rows = sum(1 for r, n in self._batch if n == r.pending)
        self.steps += 1
        dt = load_s + c.step_s(tokens, rows, len({r.req.adapter for r, _ in self._batch}))
        self.busy_s += dt
        return dt

    def end_step(self, now: float) -> list[Request]:
        """Apply the packed step at its end time `now`; the requests that finished."""
        done = []
        before = self.tokens
        for r, n in self._batch:
            r.computed += n
            if r.computed == r.req.prompt + r.generated:  # the chunk reached the end: one token
                r.generated += 1
                self.tokens += 1
                if r.req.t_first is None:
                    r.req.t_first = now
                if r.generated == r.req.out:
                    r.req.t_done = now
                    self.running.remove(r)
                    a = r.req.adapter
                    self.refs[a] -= 1
                    if self.refs[a] == 0:
                        del self.refs[a]
                    done.append(r.req)
        self._batch = []
        if self.tokens > before:
            self.token_log.append((now, self.tokens - before))
        return done


def _mix64(x: int) -> int:
    """splitmix64 finaliser: a fixed hash (Python's str hash changes per process)."""
    x = (x + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return x ^ (x >> 31)


class Router:
    """Picks a replica for a request from the router's view: outstanding requests per replica
    (`loads`) and which replicas hold an adapter resident (`holders`).

    random: uniform. least_loaded: fewest outstanding, ties at random. affinity (Ray Serve's
    model multiplexing): the least-loaded replica that already holds the adapter, unless all
    of those have `max_ongoing` or more outstanding; then the least-loaded replica.
    chash_bounded: consistent hashing with bounded loads (Mirrokni, Thorup, Zadimoghaddam 2018):
    walk the ring from the adapter's hash to the first replica with fewer than
    ceil((1 + eps) * (total + 1) / N) outstanding.
    """

    def __init__(self, policy: str, n: int, seed: int = 0, max_ongoing: int = 16, eps: float = 0.25,
                 vnodes: int = 64) -> None:
        if policy not in POLICIES:
            raise ValueError(f"policy: {policy!r} is not one of {', '.join(POLICIES)}")
        if n < 1:
            raise ValueError(f"n: need at least one replica, got {n}")
        self.policy, self.n, self.max_ongoing, self.eps = policy, n, max_ongoing, eps
        self.rng = random.Random(seed)
        ring = sorted((_mix64(i * 1_000_003 + v), i) for i in range(n) for v in range(vnodes))
        self._ring_keys = [k for k, _ in ring]
        self._ring_ids = [i for _, i in ring]

    def bound(self, total: int) -> int:
        """chash_bounded: the most outstanding requests a replica may hold after this one joins."""
        return math.ceil((1 + self.eps) * (total + 1) / self.n)

    def _least(self, loads: Sequence[int], among: Iterable[int]) -> int:
        best, ties = None, []
        for i in among:
            if best is None or loads[i] < best:
                best, ties = loads[i], [i]
            elif loads[i] == best:
                ties.append(i)
        return ties[0] if len(ties) == 1 else self.rng.choice(ties)

    def choose(self, adapter: int, loads: Sequence[int], holders: Iterable[int]) -> int:
        p = self.policy
        if p == "random":
            return self.rng.randrange(self.n)
        if p == "least_loaded":
            return self._least(loads, range(self.n))
        if p == "affinity":
            cand = [i for i in holders if loads[i] < self.max_ongoing]
            return self._least(loads, cand) if cand else self._least(loads, range(self.n))
        cap = self.bound(sum(loads))
        k = bisect.bisect_left(self._ring_keys, _mix64(adapter)) % len(self._ring_keys)
        for j in range(len(self._ring_keys)):
            i = self._ring_ids[(k + j) % len(self._ring_ids)]
            if loads[i] + 1 <= cap:
                return i
        raise AssertionError("unreachable: the total load is below n * cap")


@dataclass
class SimResult:
    requests: list[Request]
    replicas: list[Replica] = field(repr=False)
    makespan: float = 0.0

    @property
    def tokens(self) -> int:
        return sum(r.tokens for r in self.replicas)

    @property
    def tok_s(self) -> float:
        return self.tokens / self.makespan if self.makespan > 0 else 0.0

    @property
    def disk_loads(self) -> int:
        return sum(r.disk_loads for r in self.replicas)

    @property
    def slot_loads(self) -> int:
        return sum(r.disk_loads + r.host_loads for r in self.replicas)

    def tok_s_while_arriving(self) -> float:
        """Tokens/s generated between the first and the last arrival: the steady rate, without the
        drain at the end (whose length is set by the slowest replica, an artefact of a finite trace)."""
        t0, t1 = self.requests[0].t, self.requests[-1].t
        n = sum(k for rep in self.replicas for t, k in rep.token_log if t <= t1)
        return n / (t1 - t0) if t1 > t0 else 0.0

    def ttft(self, q: float) -> float:
        xs = sorted(r.t_first - r.t for r in self.requests if r.t_first is not None)
        return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def simulate(trace: Sequence[Request], n: int, cost: CostModel, policy: str, seed: int = 0,
             preload: Sequence[int] = (), max_ongoing: int | None = None) -> SimResult:
    """Run `trace` (sorted by arrival) through `n` replicas behind `Router(policy)`.

    Args:
        trace: requests (copied; the originals are not modified).
        n: replicas.
        cost: per-replica cost model.
        policy: one of POLICIES.
        seed: seeds the router's random choices.
        preload: adapters registered on every replica, in order (the last `cost.host_cache` of
            them start in host memory, as after `Engine.register_adapter` calls).
        max_ongoing: affinity's per-replica cap (default `cost.max_num_seqs`).

    Returns:
        SimResult: the requests with replica, t_first and t_done set; the replicas; the makespan
        (last finish minus first arrival).

    Raises:
        ValueError: an unknown policy, n < 1, or a trace not sorted by arrival time.
    """
    reqs = [replace(r) for r in trace]
    if any(b.t < a.t for a, b in zip(reqs, reqs[1:])):
        raise ValueError("trace: requests must be sorted by arrival time")
    router = Router(policy, n, seed, max_ongoing or cost.max_num_seqs)
    where: dict[int, set[int]] = {}

    def hook(i: int) -> Callable[[int, bool], None]:
        def f(a: int, present: bool) -> None:
            (where.setdefault(a, set()).add if present else where.setdefault(a, set()).discard)(i)
        return f

    reps = [Replica(cost, preload, hook(i)) for i in range(n)]
    loads = [0] * n
    busy = [False] * n
    # (time, seq, replica, kind): kind 0 ends a step, kind 1 starts one on an idle replica; an
    # idle replica starts after every arrival at the same instant is queued (they batch together)
    events: list[tuple[float, int, int, int]] = []
    seq = 0

    def push(t: float, i: int, kind: int) -> None:
        nonlocal seq
        seq += 1
        heapq.heappush(events, (t, seq, i, kind))

    def start(i: int, now: float) -> None:
        dt = reps[i].begin_step()
        busy[i] = bool(reps[i]._batch or dt > 0)
        if busy[i]:
            push(now + dt, i, 0)

    k = 0
    t_end = reqs[0].t if reqs else 0.0
    while k < len(reqs) or events:
        if k < len(reqs) and (not events or reqs[k].t <= events[0][0]):
            r = reqs[k]
            k += 1
            i = router.choose(r.adapter, loads, where.get(r.adapter, ()))
            r.replica = i
            loads[i] += 1
            reps[i].submit(r)
            if not busy[i]:
                busy[i] = True
                push(r.t, i, 1)
            continue
        now, _, i, kind = heapq.heappop(events)
        if kind == 1:
            start(i, now)
            continue
        for r in reps[i].end_step(now):
            loads[i] -= 1
            t_end = max(t_end, now)
        if reps[i].outstanding:
            start(i, now)
        else:
            busy[i] = False
    return SimResult(reqs, reps, t_end - (reqs[0].t if reqs else 0.0))


def power_law_trace(n_req: int, n_adapters: int, rate: float, seed: int = 0, lo: int = 8, hi: int = 64,
                    alpha: float = 1.0) -> list[Request]:
    """Poisson arrivals at `rate`/s; adapter i with probability proportional to 1/(i+1)^alpha;
    prompt and output lengths uniform in [lo, hi] (the workload of `benchmarks/trace.py`)."""
    rng = random.Random(seed)
    cum, s = [], 0.0
    for i in range(n_adapters):
        s += 1.0 / (i + 1) ** alpha
        cum.append(s)
    t, out = 0.0, []
    for j in range(n_req):
        t += rng.expovariate(rate)
        a = min(bisect.bisect_left(cum, rng.random() * s), n_adapters - 1)
        out.append(Request(j, t, a, rng.randint(lo, hi), rng.randint(lo, hi)))
    return out
