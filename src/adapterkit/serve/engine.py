"""The serving engine (S-LoRA style): one base model, many registered LoRA adapters, the ones in
use batched together in every forward pass. Implements `types.EngineProtocol`.

    engine = Engine(hf_model, tokenizer, EngineConfig(max_loras=8))
    engine.register_adapter("math", "out/math")
    outs = engine.generate_sync(["2+2=", "Hi"], adapters=["math", None], params=SamplingParams(temperature=0))
    engine.shutdown()

A background thread runs `Scheduler.step()` while there is work; every public method is
thread-safe (one lock; the loop holds it for one step at a time, so `abort` frees the KV
pages of a request within one step and before it returns).

One compute thread. With PyTorch's OpenMP runtime (libgomp on Linux), every thread that runs
parallel ops keeps its own pool of worker threads, and once there are more of those than CPUs
libgomp stops spin-waiting: each parallel op then pays a thread wake-up, which made every step
~2x slower when the engine thread ran beside the pool the loading thread had left behind. So
`start()` releases the calling thread's pool (`omp_pause_resource_all`) and adapter
registration runs on the engine thread too: after start, only the engine thread computes.
"""
from __future__ import annotations

import asyncio
import ctypes
import threading
import time
from collections import deque
from concurrent.futures import Future
from collections.abc import AsyncIterator, Sequence as Seq
from typing import Any

import torch
from torch import nn

from adapterkit.errors import AdapterNotFoundError, ConfigError, QueueFullError, did_you_mean
from adapterkit.serve.adapters import AdapterStore, HostAdapter, LoraSlots, SlotCache
from adapterkit.serve.kv import PagedKVCache
from adapterkit.serve.pool import UnifiedPool
from adapterkit.serve.runner import make_runner
from adapterkit.serve.sampling import OutputState
from adapterkit.serve.scheduler import Scheduler, Sequence
from adapterkit.serve.types import (
    AdapterInfo,
    ContextLengthError,
    EngineConfig,
    EngineStats,
    GenerationChunk,
    GenerationOutput,
    GenerationRequest,
    SamplingParams,
)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _release_openmp_pool() -> bool:
    """Free the calling thread's OpenMP worker pool (libgomp's `omp_pause_resource_all`), so the
    engine thread is the only one holding workers. False where the runtime is not libgomp."""
    try:
        with open("/proc/self/maps") as f:
            path = next((line.split()[-1] for line in f if "libgomp" in line and line.rstrip().endswith(".so.1")), None)
        if path is None:
            return False
        return ctypes.CDLL(path).omp_pause_resource_all(1) == 0  # 1 = omp_pause_soft
    except (OSError, AttributeError):
        return False


def _pct(xs: list[float], q: float) -> float:
    if not xs:
        return 0.0
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


class Engine:
    def __init__(self, model: nn.Module, tokenizer: Any | None = None, config: EngineConfig | None = None,
                 model_name: str | None = None, start: bool = True) -> None:
        self.config = cfg = config or EngineConfig()
        self.tokenizer = tokenizer
        self.model_name = model_name or getattr(model.config, "_name_or_path", "") or type(model).__name__
        dtype = _DTYPES[cfg.dtype]
        self.hf_model = model  # the served base (co-serving trains its adapters in place)
        self.runner = make_runner(model, dtype=dtype, device=cfg.device, max_model_len=cfg.max_model_len,
                                  prepack=cfg.cpu_prepack)
        r = self.runner
        num_pages = cfg.num_pages or UnifiedPool.pages_for_bytes(r.num_layers, r.num_kv_heads, r.head_dim,
                                                                 cfg.block_size, dtype, cfg.pool_bytes)
        self.pool = UnifiedPool(r.num_layers, r.num_kv_heads, r.head_dim, cfg.block_size, num_pages, dtype, cfg.device)
        self.kv = PagedKVCache(self.pool)
        shapes = r.module_shapes()
        self.store = AdapterStore(shapes, r.num_layers, cfg.max_lora_rank, cfg.max_cpu_loras)
        self.slots = LoraSlots(cfg.max_loras, shapes, dtype, cfg.device)
        self.cache = SlotCache(self.store, self.slots, self.pool)
        self.scheduler = Scheduler(cfg, r, self.kv, self.cache)
        self.scheduler.on_finish = self._record
        eos = model.generation_config.eos_token_id if getattr(model, "generation_config", None) else None
        if eos is None and tokenizer is not None:
            eos = getattr(tokenizer, "eos_token_id", None)
        self.eos_ids: set[int] = set(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])
        self._closing: set[str] = set()  # adapters being unregistered: refuse new requests
        self._lock = threading.RLock()
        self._cv = threading.Condition(self._lock)
        self._stop = False
        self._done: deque[tuple[float, float | None, float, int]] = deque(maxlen=2000)  # (t_done, ttft, tpot, n)
        self._steps: deque[tuple[float, int]] = deque(maxlen=4000)  # (time, tokens generated)
        self.finished = self.aborted = self.generated = 0
        self._thread: threading.Thread | None = None
        self._jobs: deque[tuple[Any, tuple, Future]] = deque()  # work for the engine thread (registration)
        self.fine_tuning = None  # CoServe when cfg.fine_tuning (fine-tuning jobs run in this loop)
        if cfg.fine_tuning:
            from adapterkit.serve.coserve import CoServe  # lazy: pulls in the trainer

            self.fine_tuning = CoServe(self)
        if start:
            self.start()

    # ------------------------------------------------------------------ loop
    def start(self) -> None:
        if self._thread is None:
            _release_openmp_pool()  # see the module doc: the engine thread is the one that computes
            self._thread = threading.Thread(target=self._loop, name="adapterkit-engine", daemon=True)
            self._thread.start()

    def _on_loop(self, fn, *args):
        """Run `fn(*args)` on the engine thread (between steps) and return its result; directly
        when there is no engine thread or we are on it."""
        if self._thread is None or threading.current_thread() is self._thread:
            return fn(*args)
        fut: Future = Future()
        with self._cv:
            if self._stop:
                raise RuntimeError("the engine is shut down")
            self._jobs.append((fn, args, fut))
            self._cv.notify_all()
        return fut.result()

    def _run_jobs(self) -> None:
        while self._jobs:
            fn, args, fut = self._jobs.popleft()
            try:
                fut.set_result(fn(*args))
            except BaseException as e:  # noqa: BLE001 - delivered to the caller
                fut.set_exception(e)

    def _loop(self) -> None:
        ft = self.fine_tuning
        while True:
            self._run_jobs()  # outside the lock: adapter file I/O must not block submit/abort
            with self._cv:
                while (not self._stop and not self.scheduler.has_work() and not self._jobs
                       and not (ft is not None and ft.has_work())):
                    self._cv.wait()
                if self._stop:
                    for _, _, fut in self._jobs:
                        fut.set_exception(RuntimeError("the engine is shut down"))
                    self._jobs.clear()
                    return
                busy = self.scheduler.has_work()
                t0 = time.perf_counter()
                if busy:
                    try:
                        n = self.scheduler.step()
                    except Exception as e:  # noqa: BLE001 - a failed step fails its requests, not the engine
                        for seq in list(self.scheduler.running):
                            self.scheduler.finish(seq, "error", error=f"{type(e).__name__}: {e}")
                        n = 0
                    self.generated += n
                    self._steps.append((time.perf_counter(), n))
                    self._cv.notify_all()
                step_s = time.perf_counter() - t0
            if ft is not None:
                # a fine-tuning slice after the step's inference batch, outside the lock so
                # submit/abort are not held up; it never raises (a failure fails the job)
                ft.work(busy, step_s)
            time.sleep(0)  # let submit/abort threads take the lock between steps

    def step(self) -> int:
        """Run one scheduler step on the caller's thread (engines built with start=False), then
        a fine-tuning slice when a job has work."""
        with self._cv:
            busy = self.scheduler.has_work()
            t0 = time.perf_counter()
            n = self.scheduler.step() if busy else 0
            self.generated += n
            self._cv.notify_all()
        if self.fine_tuning is not None:
            self.fine_tuning.work(busy, time.perf_counter() - t0)
        return n

    def shutdown(self) -> None:
        with self._cv:
            for seq in list(self.scheduler.running) + list(self.scheduler.waiting):
                self.scheduler.finish(seq, "abort")
            self._stop = True
            self._cv.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=10)
        if self.fine_tuning is not None:
            self.fine_tuning.close()  # the job resumes from its last checkpoint on a new engine

    def _record(self, seq: Sequence) -> None:
        if seq.finish_reason == "abort":
            self.aborted += 1
            return
        self.finished += 1
        n = len(seq.out.token_ids)
        ttft = seq.t_first - seq.t_submit if seq.t_first is not None else None
        tpot = (seq.t_done - seq.t_first) / (n - 1) if seq.t_first is not None and n > 1 and seq.t_done else 0.0
        self._done.append((seq.t_done or 0.0, ttft, tpot, n))

    # ------------------------------------------------------------------ requests
    def _make_seq(self, req: GenerationRequest, sink) -> Sequence:
        cfg = self.config
        if req.prompt_token_ids is not None:
            ids = list(req.prompt_token_ids)
        elif self.tokenizer is None:
            raise ConfigError("prompt: this engine has no tokenizer; send prompt_token_ids")
        else:
            try:
                ids = list(self.tokenizer.encode(req.prompt))
            except (TypeError, ValueError) as exc:  # e.g. a lone surrogate: the fast tokenizer raises TypeError
                raise ConfigError(f"prompt: the tokenizer cannot encode it ({type(exc).__name__}: {exc})") from None
            if not ids:
                raise ConfigError("prompt: encodes to zero tokens")
        bad = [t for t in ids if not 0 <= t < self.runner.vocab_size]
        if bad:
            raise ConfigError(f"prompt_token_ids: id {bad[0]} is outside the vocabulary [0, {self.runner.vocab_size})")
        if len(ids) + 1 > cfg.max_model_len:
            raise ContextLengthError(f"prompt: {len(ids)} tokens leave no room for output in "
                                     f"max_model_len={cfg.max_model_len}")
        p = req.params
        if req.strict_max_tokens and len(ids) + p.max_tokens > cfg.max_model_len:
            raise ContextLengthError(
                f"max_tokens: the prompt is {len(ids)} tokens and max_tokens={p.max_tokens}, together more than "
                f"max_model_len={cfg.max_model_len}; at most {cfg.max_model_len - len(ids)} new tokens fit")
        if self.kv.pages_needed("", len(ids) + 1) > self.pool.num_pages:
            raise ConfigError(f"prompt: {len(ids)} tokens need more KV pages than the pool has ({self.pool.num_pages})")
        self._check_adapter(req.adapter)  # again under the lock in submit: an unload may start meanwhile
        gen = None
        if not p.greedy:
            gen = torch.Generator().manual_seed(p.seed if p.seed is not None else cfg.seed + hash(req.request_id) % 2**31)
        out = OutputState(p, self.tokenizer, self.eos_ids, len(ids), cfg.max_model_len)
        return Sequence(req=req, prompt_ids=ids, out=out, sink=sink, generator=gen)

    def _check_adapter(self, name: str | None) -> None:
        """AdapterNotFoundError unless `name` is None or registered and not being unregistered."""
        if name is not None and (name not in self.store or name in self._closing):
            live = [n for n in self.store.names() if n not in self._closing]
            raise AdapterNotFoundError(f"adapter {name!r} is not registered.{did_you_mean(name, live)}")

    def submit(self, req: GenerationRequest, sink) -> Sequence:
        """Queue a request; `sink(chunk)` is called from the engine thread for every chunk."""
        seq = self._make_seq(req, sink)
        with self._cv:
            if len(self.scheduler.waiting) >= self.config.max_queue:
                raise QueueFullError(f"request queue is full ({self.config.max_queue} waiting); retry later")
            if self.scheduler.find(req.request_id) is not None:
                raise ConfigError(f"request_id: {req.request_id!r} is already in flight")
            # Under the lock, the check that decides. The one in _make_seq runs unlocked (it
            # tokenizes first): an unload that marks the adapter closing between the two must
            # still refuse this request, or the unload would wait for it too.
            self._check_adapter(req.adapter)
            self.scheduler.add(seq)
            self._cv.notify_all()
        return seq

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        loop = asyncio.get_running_loop()
        q: asyncio.Queue[GenerationChunk] = asyncio.Queue()
        # submit takes the engine lock, which a running step holds: wait for it off the event
        # loop so other streams keep flowing (errors such as a full queue still propagate)
        await loop.run_in_executor(None, self.submit, request, lambda c: loop.call_soon_threadsafe(q.put_nowait, c))
        done = False
        try:
            while not done:
                chunk = await q.get()
                done = chunk.finished
                yield chunk
        finally:
            if not done:  # consumer went away (client disconnect): free the pages now
                self.abort(request.request_id)

    def generate_sync(self, prompts: Seq[str | list[int]], adapters: Seq[str | None] | None = None,
                      params: SamplingParams | Seq[SamplingParams] | None = None,
                      timeout: float | None = None) -> list[GenerationOutput]:
        n = len(prompts)
        adapters = list(adapters) if adapters is not None else [None] * n
        plist = list(params) if isinstance(params, (list, tuple)) else [params or SamplingParams()] * n
        if len(adapters) != n or len(plist) != n:
            raise ConfigError(f"adapters/params: need {n} entries (one per prompt), got {len(adapters)}/{len(plist)}")
        reqs = [GenerationRequest(prompt=p if isinstance(p, str) else None,
                                  prompt_token_ids=None if isinstance(p, str) else list(p), adapter=a, params=sp)
                for p, a, sp in zip(prompts, adapters, plist)]
        chunks: dict[str, list[GenerationChunk]] = {r.request_id: [] for r in reqs}
        left = [n]
        ev = threading.Event()

        def sink(c: GenerationChunk) -> None:
            chunks[c.request_id].append(c)
            if c.finished:
                left[0] -= 1
                if left[0] == 0:
                    ev.set()

        seqs = []
        try:
            for r in reqs:
                seqs.append(self.submit(r, sink))
        except Exception:
            for s in seqs:
                self.abort(s.rid)
            raise
        if self._thread is None:  # no background loop: drive it here
            while not ev.is_set():
                self.step()
        elif not ev.wait(timeout):
            for s in seqs:
                self.abort(s.rid)
            raise TimeoutError(f"generate_sync: not finished after {timeout} s")
        outs = []
        for r, s in zip(reqs, seqs):
            cs = chunks[r.request_id]
            last = cs[-1]
            outs.append(GenerationOutput(
                request_id=r.request_id, adapter=r.adapter, prompt_token_ids=s.prompt_ids,
                token_ids=[t for c in cs for t in c.token_ids], text="".join(c.text for c in cs),
                finish_reason=last.finish_reason, usage=last.usage,  # type: ignore[arg-type]
                ttft_s=(s.t_first or s.t_done or 0) - s.t_submit, latency_s=(s.t_done or 0) - s.t_submit,
                error=last.error,
                logprobs=[lp for c in cs for lp in c.logprobs or ()] if r.params.logprobs is not None else None,
                prompt_logprobs=next((c.prompt_logprobs for c in cs if c.prompt_logprobs is not None), None)))
        return outs

    def abort(self, request_id: str) -> bool:
        with self._cv:
            seq = self.scheduler.find(request_id)
            if seq is None:
                return False
            self.scheduler.finish(seq, "abort")
            self._cv.notify_all()
            return True

    # ------------------------------------------------------------------ adapters
    def register_adapter(self, name: str, path: Any) -> AdapterInfo:
        """`path`: an adapter directory (native or PEFT) or an in-memory object with
        .method/.config/.tensors (e.g. `adapterkit.formats.SavedAdapter`)."""
        self._on_loop(self.store.register, name, path)  # reads and validates on the compute thread
        return self._info(self.store.get(name))

    def unregister_adapter(self, name: str, wait: bool = True, timeout: float | None = None) -> None:
        with self._cv:
            self.store.get(name)  # AdapterNotFoundError
            self._closing.add(name)
            try:
                users = lambda: [s for s in list(self.scheduler.running) + list(self.scheduler.waiting)  # noqa: E731
                                 if s.adapter == name]
                if not wait:
                    for s in users():
                        self.scheduler.finish(s, "abort")
                elif not self._cv.wait_for(lambda: not users(), timeout=timeout):
                    raise TimeoutError(f"adapter {name!r} still has {len(users())} requests after {timeout} s")
                self.cache.remove(name)
                # its cached K/V can never be hit again (a new registration gets a new reg_id):
                # give the pages back now rather than when they age out
                self.kv.forget(self.store.unregister(name).reg_id)
            finally:
                self._closing.discard(name)

    def _info(self, ad: HostAdapter) -> AdapterInfo:
        slot = self.cache.slot_of.get(ad.name)
        return AdapterInfo(name=ad.name, source=ad.source, method="lora", rank=ad.rank, alpha=ad.alpha,
                           targets=ad.targets, loaded=slot is not None, slot=slot,
                           running_requests=self.cache.refs.get(ad.name, 0), host_bytes=ad.nbytes)

    def list_adapters(self) -> list[AdapterInfo]:
        with self._lock:
            return [self._info(self.store.get(n)) for n in self.store.names()]

    def stats(self) -> EngineStats:
        with self._lock:
            now = time.perf_counter()
            recent = [(t, n) for t, n in self._steps if now - t <= 10.0]
            span = (now - recent[0][0]) if len(recent) > 1 else 0.0
            tps = sum(n for _, n in recent[1:]) / span if span > 0 else 0.0
            ttfts = [d[1] for d in self._done if d[1] is not None]
            tpots = [d[2] for d in self._done if d[3] > 1]
            c = self.cache
            return EngineStats(
                queue_len=len(self.scheduler.waiting), running=len(self.scheduler.running), finished=self.finished,
                aborted=self.aborted, generated_tokens=self.generated, tokens_per_s=tps,
                ttft_p50_s=_pct(ttfts, 0.5), ttft_p99_s=_pct(ttfts, 0.99), tpot_p50_s=_pct(tpots, 0.5),
                tpot_p99_s=_pct(tpots, 0.99), adapters_registered=len(self.store), adapter_slots=self.config.max_loras,
                adapter_slots_used=len(c.slot_of), cache_hits=c.hits, cache_misses=c.misses,
                cache_evictions=c.evictions, pool_pages_total=self.pool.num_pages, pool_pages_kv=self.pool.used("kv"),
                pool_pages_adapter=self.pool.used("adapter"), pool_pages_cached=self.pool.used("cached"),
                pool_pages_free=self.pool.num_free, prefix_cache_queries=self.scheduler.prefix_queries,
                prefix_cache_hits=self.scheduler.prefix_hits)
