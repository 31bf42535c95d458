"""Iteration-level (continuous) batching. Not thread-safe: the engine calls it under its lock.

Every step: admit waiting requests (FCFS, skipping ones whose adapter cannot get a slot yet),
then pack tokens under `max_num_batched_tokens`: running sequences that are decoding first (1
token each), then prefill chunks. A sequence's pending tokens are always
`all_ids[num_computed:]`, so prefill, chunked prefill, decode and re-compute after preemption
are the same code path. When the KV pool is out of pages the most recently admitted sequence
is preempted (its pages freed, it goes back to the queue front and is recomputed later).

With automatic prefix caching, admission starts a sequence after the longest cached run of its
prompt's full blocks (`num_computed` > 0, the same chunked-prefill path), and every step
publishes the full prompt blocks it completed (`serve/kv.py`).
"""
from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from adapterkit.serve.adapters import SlotCache
from adapterkit.serve.kv import PagedKVCache, block_keys
from adapterkit.serve.runner import ModelRunner, StepInput
from adapterkit.serve.sampling import OutputState, raw_logprobs, sample_tokens, token_logprobs
from adapterkit.serve.types import EngineConfig, GenerationChunk, GenerationRequest, TokenLogprob, Usage


@dataclass(eq=False)
class Sequence:
    req: GenerationRequest
    prompt_ids: list[int]
    out: OutputState
    sink: Callable[[GenerationChunk], None]
    generator: torch.Generator | None
    num_computed: int = 0  # tokens whose K/V are in the cache
    slot: int = -1  # adapter slot while running
    t_submit: float = field(default_factory=time.perf_counter)
    t_first: float | None = None
    t_done: float | None = None
    finish_reason: str | None = None
    # prompt log-probs computed so far (entry i: prompt token i); kept across preemption, so a
    # recomputed prefill does not compute them again. None until the first prefill chunk.
    prompt_lps: list[TokenLogprob] | None = None
    prompt_lps_sent: bool = False
    # prefix caching: the keys of the prompt's full blocks and the adapter identity they are
    # under (None: the base), set at the first admission
    block_keys: list[bytes] | None = None
    adapter_id: int | None = None

    @property
    def rid(self) -> str:
        return self.req.request_id

    @property
    def adapter(self) -> str | None:
        return self.req.adapter

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.out.token_ids

    @property
    def pending(self) -> int:
        return len(self.prompt_ids) + len(self.out.token_ids) - self.num_computed

    def usage(self) -> Usage:
        return Usage(len(self.prompt_ids), len(self.out.token_ids))

    def take_prompt_lps(self) -> list[TokenLogprob] | None:
        """The prompt log-probs, once (for the first chunk after the prompt is computed)."""
        if self.prompt_lps is None or self.prompt_lps_sent:
            return None
        self.prompt_lps_sent = True
        return self.prompt_lps

    def prompt_lp_positions(self, a: int, b: int) -> range:
        """Positions in [a, b) whose logits give a not-yet-computed prompt log-prob (position p
        predicts prompt token p + 1), when the request wants prompt log-probs."""
        if self.out.params.prompt_logprobs is None:
            return range(0)
        if self.prompt_lps is None:
            self.prompt_lps = [TokenLogprob(self.prompt_ids[0], None)]
        return range(max(a, len(self.prompt_lps) - 1), min(b, len(self.prompt_ids) - 1))


class Scheduler:
    def __init__(self, config: EngineConfig, runner: ModelRunner, kv: PagedKVCache, cache: SlotCache) -> None:
        self.config, self.runner, self.kv, self.cache = config, runner, kv, cache
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.on_finish: Callable[[Sequence], None] = lambda s: None
        self.preemptions = 0
        self.prefix_queries = self.prefix_hits = 0  # prompt tokens looked up / found in the prefix cache

    # ------------------------------------------------------------------ membership
    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def find(self, rid: str) -> Sequence | None:
        for s in self.running:
            if s.rid == rid:
                return s
        for s in self.waiting:
            if s.rid == rid:
                return s
        return None

    def finish(self, seq: Sequence, reason: str, error: str | None = None, emit: bool = True) -> None:
        """Remove `seq` wherever it is, free its KV pages and adapter slot, send the last chunk."""
        if seq in self.running:
            self.running.remove(seq)
            if seq.adapter is not None and seq.slot >= 0:
                self.cache.release(seq.adapter)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.kv.free(seq.rid)
        seq.slot = -1
        seq.finish_reason = reason
        seq.t_done = time.perf_counter()
        if emit:
            self._emit(seq, GenerationChunk(seq.rid, [], "", reason, seq.usage(), error))  # type: ignore[arg-type]
        self.on_finish(seq)

    @staticmethod
    def _emit(seq: Sequence, chunk: GenerationChunk) -> bool:
        """Deliver a chunk; a failing consumer (e.g. its event loop closed) must not break the
        batch. False if delivery failed."""
        try:
            seq.sink(chunk)
            return True
        except Exception:  # noqa: BLE001
            return False

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        if seq.adapter is not None:
            self.cache.release(seq.adapter)
        self.kv.free(seq.rid)
        seq.num_computed, seq.slot = 0, -1
        self.waiting.appendleft(seq)
        self.preemptions += 1

    # ------------------------------------------------------------------ one iteration
    def _reuse_prefix(self, seq: Sequence) -> bool:
        """Share the cached pages of the longest cached run of `seq`'s full prompt blocks and
        start computing after them; True if the prefix cache was looked up.

        At most (prompt length - 1) // block_size blocks: at least one prompt token is computed,
        so the step has logits to sample from. A request that wants prompt log-probs skips the
        lookup (it needs the logits of every prompt position) but still publishes its blocks.
        """
        if not self.config.enable_prefix_caching:
            return False
        if seq.block_keys is None:
            seq.adapter_id = None if seq.adapter is None else self.cache.store.get(seq.adapter).reg_id
            seq.block_keys = block_keys(seq.prompt_ids, self.kv.block_size, seq.adapter_id)
        if seq.out.params.prompt_logprobs is not None:
            return False
        n = self.kv.share_prefix(seq.rid, seq.block_keys[:(len(seq.prompt_ids) - 1) // self.kv.block_size])
        seq.num_computed = n * self.kv.block_size
        return True

    def _unadmit(self, seq: Sequence) -> None:
        """Undo `_reuse_prefix` for a sequence that goes back to the queue."""
        self.kv.free(seq.rid)
        seq.num_computed = 0

    def _admit(self) -> None:
        cfg = self.config
        pool = self.kv.pool
        skipped: list[Sequence] = []
        while self.waiting and len(self.running) < cfg.max_num_seqs:
            seq = self.waiting.popleft()
            looked_up = self._reuse_prefix(seq)
            # the whole prompt must fit in the free and evictable cached pages (after reclaiming
            # idle adapters); the cached pages are evicted when the pages are allocated
            need = self.kv.pages_needed(seq.rid, len(seq.all_ids) + 1)
            if need > pool.num_free + pool.used("cached") and pool.reclaim is not None:
                pool.reclaim(need - pool.num_free - pool.used("cached"))
            if need > pool.num_free + pool.used("cached"):
                self._unadmit(seq)
                self.waiting.appendleft(seq)
                break
            if seq.adapter is not None:
                slot = self.cache.acquire(seq.adapter, protect={s.adapter for s in self.running if s.adapter})
                if slot is None:  # every slot is held by running requests: let others go first
                    self._unadmit(seq)
                    skipped.append(seq)
                    continue
                seq.slot = slot
            if looked_up:
                self.prefix_queries += len(seq.prompt_ids)
                self.prefix_hits += seq.num_computed
            self.running.append(seq)
        self.waiting.extendleft(reversed(skipped))
        if cfg.prefetch and self.waiting:
            wanted = list(dict.fromkeys(s.adapter for s in self.waiting if s.adapter is not None))
            self.cache.prefetch(wanted[: cfg.max_loras])

    def _pack(self) -> list[tuple[Sequence, int]]:
        """(seq, n_tokens) for this step under the token budget; allocates KV pages."""
        budget = self.config.max_num_batched_tokens
        batch: list[tuple[Sequence, int]] = []
        order = sorted(self.running, key=lambda s: s.pending != 1)  # decodes first, stable
        for seq in order:
            if budget == 0:
                break
            if seq not in self.running:  # preempted below by an earlier seq
                continue
            n = min(seq.pending, budget)
            while not self.kv.ensure(seq.rid, seq.num_computed + n):
                victims = [s for s in self.running if s is not seq and s not in (b for b, _ in batch)]
                if not victims:
                    break
                self._preempt(victims[-1])
            else:
                batch.append((seq, n))
                budget -= n
                continue
            self._preempt(seq)  # cannot grow even alone: retry later
        return batch

    def step(self) -> int:
        """One forward pass. Returns the number of tokens generated."""
        self._admit()
        batch = self._pack()
        if not batch:
            return 0
        ids, pos, rows, q_lens, ctx_lens, slots, sample_rows = [], [], [], [], [], [], []
        sample_seqs: list[Sequence] = []
        scored: list[Sequence] = []  # max_tokens 0: the prompt is scored, nothing is generated
        lp_rows: list[int] = []  # extra logits rows for prompt log-probs (only for requests that want them)
        lp_owner: list[tuple[Sequence, int]] = []  # (seq, position) of each extra row
        t = 0
        for seq, n in batch:
            a, b = seq.num_computed, seq.num_computed + n
            ids += seq.all_ids[a:b]
            pos += range(a, b)
            rows += self.kv.rows(seq.rid, a, b)
            q_lens.append(n)
            ctx_lens.append(b)
            slots += [seq.slot] * n
            if seq.out.params.prompt_logprobs is not None:  # tested here: the plain path makes no call
                for p in seq.prompt_lp_positions(a, b):
                    lp_rows.append(t + p - a)
                    lp_owner.append((seq, p))
            t += n
            if b == len(seq.prompt_ids) + len(seq.out.token_ids):  # chunk reaches the end: sample
                if seq.out.params.max_tokens == 0:
                    scored.append(seq)
                else:
                    sample_rows.append(t - 1)
                    sample_seqs.append(seq)
        tables = [self.kv.tables[seq.rid] for seq, _ in batch]
        P = max(len(t) for t in tables)
        ctx_pages = torch.tensor([t + [0] * (P - len(t)) for t in tables], dtype=torch.int64)
        step = StepInput(torch.tensor(ids), torch.tensor(pos), torch.tensor(rows), torch.tensor(q_lens), ctx_pages,
                         torch.tensor(ctx_lens), torch.tensor(slots, dtype=torch.int64),
                         torch.tensor(sample_rows + lp_rows, dtype=torch.int64))
        all_logits = self.runner.forward(step, self.kv.pool, self.cache.slots)
        bs = self.kv.block_size
        for seq, n in batch:
            # publish the full prompt blocks this step completed (generated tokens are not cached)
            if seq.block_keys is not None and seq.num_computed < len(seq.prompt_ids):
                self.kv.publish(seq.rid, seq.block_keys, seq.num_computed // bs,
                                min(seq.num_computed + n, len(seq.prompt_ids)) // bs, seq.adapter_id)
            seq.num_computed += n
        logits = all_logits[:len(sample_rows)]
        if lp_rows:
            self._prompt_logprobs(all_logits[len(sample_rows):], lp_owner)
        for seq in scored:
            self._emit(seq, GenerationChunk(seq.rid, [], "", "length", seq.usage(),  # type: ignore[arg-type]
                                            prompt_logprobs=seq.take_prompt_lps()))
            self.finish(seq, "length", emit=False)
        if not sample_seqs:
            return 0
        # log-probs of the raw distribution, before sample_tokens masks banned tokens in place;
        # only for the rows that asked, so plain decoding pays nothing
        want = [j for j, s in enumerate(sample_seqs) if s.out.params.logprobs is not None]
        lps = raw_logprobs(logits[want]) if want else None
        toks = sample_tokens(logits, [s.out.params for s in sample_seqs], [s.generator for s in sample_seqs],
                             [s.out.banned() for s in sample_seqs],
                             [(s.prompt_ids, s.out.token_ids) for s in sample_seqs])  # penalties read them
        chosen: dict[int, TokenLogprob] = {}
        if lps is not None:
            got = token_logprobs(lps, [toks[j] for j in want], [sample_seqs[j].out.params.logprobs for j in want])
            chosen = dict(zip(want, got))
        now = time.perf_counter()
        for j, (seq, tok) in enumerate(zip(sample_seqs, toks)):
            if seq.t_first is None:
                seq.t_first = now
            d_ids, d_text, finish = seq.out.step(tok)
            chunk = GenerationChunk(seq.rid, d_ids, d_text, finish, seq.usage(),  # type: ignore[arg-type]
                                    logprobs=[chosen[j]] if chosen and j in chosen else None,
                                    prompt_logprobs=None if seq.prompt_lps is None else seq.take_prompt_lps())
            if finish is not None:
                self._emit(seq, chunk)
                self.finish(seq, finish, emit=False)
            elif not self._emit(seq, chunk):
                self.finish(seq, "abort", emit=False)  # nobody listens any more: free its pages
        return len(toks)

    @staticmethod
    def _prompt_logprobs(logits: torch.Tensor, owners: list[tuple[Sequence, int]]) -> None:
        """Append the log-probs of prompt token p + 1 (from the logits at position p) to each owner."""
        got: list[TokenLogprob] = []
        for lo in range(0, len(owners), 256):  # in slices: the fp32 log-softmax copy stays small
            part = owners[lo:lo + 256]
            got += token_logprobs(raw_logprobs(logits[lo:lo + 256]), [s.prompt_ids[p + 1] for s, p in part],
                                  [s.out.params.prompt_logprobs or 0 for s, _ in part])
        for (seq, _), lp in zip(owners, got):
            assert seq.prompt_lps is not None
            seq.prompt_lps.append(lp)
