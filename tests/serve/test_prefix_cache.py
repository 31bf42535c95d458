"""Automatic prefix caching: cached prompt blocks keyed by tokens AND adapter registration.

Every correctness check compares with HF generate on the (merged) model, and each hit count
is checked exactly, so a cache that serves the wrong K/V, or none, fails."""
from __future__ import annotations

import argparse
import random

import pytest
from _engine_utils import hf_greedy, make_lora, merged_copy
from conftest import tiny_llama

from adapterkit.errors import ConfigError
from adapterkit.serve.engine import Engine
from adapterkit.serve.kv import PagedKVCache, block_keys
from adapterkit.serve.pool import UnifiedPool
from adapterkit.serve.types import EngineConfig, GenerationRequest, SamplingParams

BS = 4
GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")  # k/v: the adapter changes the cached K/V themselves
PREFIX = [(7 * i + 3) % 128 for i in range(4 * BS)]  # four full blocks, a "system prompt"


@pytest.fixture(scope="module")
def model():
    m = tiny_llama(seed=3)
    m.generation_config.eos_token_id = None
    return m


def check_pages(eng: Engine) -> None:
    """The page accounting: every page is free, held by tables (refcount = tables holding it),
    cached and evictable, or an adapter's; nothing held is evictable."""
    kv, pool = eng.kv, eng.pool
    held = [p for t in kv.tables.values() for p in t]
    assert kv.refs == {p: held.count(p) for p in set(held)}
    assert pool.used("kv") == len(set(held)) and pool.used("cached") == len(kv.evictable)
    assert not set(held) & set(kv.evictable) and set(kv.evictable) <= set(kv.key_of)
    assert {p: k for k, p in kv.cached.items()} == {p: k for p, (k, _) in kv.key_of.items()}
    assert pool.num_free + pool.used("kv") + pool.used("cached") + pool.used("adapter") == pool.num_pages


def run(eng: Engine, prompts, adapters=None, params=GREEDY) -> list[list[int]]:
    """generate_sync on a start=False engine, checking the page accounting after every step."""
    reqs = [GenerationRequest(prompt_token_ids=list(p), adapter=a, params=params)
            for p, a in zip(prompts, adapters or [None] * len(prompts))]
    got: dict[str, list[int]] = {r.request_id: [] for r in reqs}
    for r in reqs:
        eng.submit(r, lambda c: got[c.request_id].extend(c.token_ids))
    for _ in range(2000):  # a bounded loop: an engine that stops making progress fails, not hangs
        if not eng.scheduler.has_work():
            return [got[r.request_id] for r in reqs]
        eng.step()
        check_pages(eng)
    raise AssertionError("the engine made no progress")


def hits(eng: Engine) -> int:
    return eng.stats().prefix_cache_hits


@pytest.mark.parametrize("with_adapter", [False, True])
def test_shared_prefix_matches_no_cache_and_hf(model, with_adapter):
    ad = make_lora(model, 4, ATTN, seed=21) if with_adapter else None
    name = "a" if with_adapter else None
    ref = merged_copy(model, ad)
    first = PREFIX + [90, 91, 92]  # 19 tokens: blocks 0-3 published
    later = [PREFIX + [50 + i] * (2 + i) for i in range(3)]
    outs = {}
    for caching in (True, False):
        eng = Engine(model, config=EngineConfig(block_size=BS, num_pages=64, enable_prefix_caching=caching),
                     start=False)
        if ad is not None:
            eng.register_adapter("a", ad)
        outs[caching] = run(eng, [first], [name])
        assert hits(eng) == 0
        outs[caching] += run(eng, later[:1], [name])  # alone: only the cache can give it the prefix
        assert hits(eng) == (len(PREFIX) if caching else 0)
        outs[caching] += run(eng, later[1:], [name] * 2)  # together: both share the same pages
        st = eng.stats()
        assert st.prefix_cache_hits == (3 * len(PREFIX) if caching else 0)
        assert st.prefix_cache_queries == (len(first) + sum(map(len, later)) if caching else 0)
        assert st.pool_pages_kv == 0 and st.pool_pages_cached == (5 if caching else 0)  # 4 prefix + later[2]'s 5th
    assert outs[True] == outs[False] == [hf_greedy(ref, p, GREEDY.max_tokens) for p in [first, *later]]


def test_the_last_prompt_token_is_always_computed(model):
    """A prompt that is the cached prefix exactly (whole blocks) recomputes its last block:
    the step needs logits of the last prompt position to sample."""
    eng = Engine(model, config=EngineConfig(block_size=BS, num_pages=64), start=False)
    run(eng, [PREFIX + [9]])
    assert run(eng, [PREFIX]) == [hf_greedy(model, PREFIX, GREEDY.max_tokens)]
    assert hits(eng) == len(PREFIX) - BS


def test_no_hits_across_adapters_or_the_base(model):
    ads = {"A": make_lora(model, 4, ATTN, seed=31), "B": make_lora(model, 4, ATTN, seed=32)}
    eng = Engine(model, config=EngineConfig(block_size=BS, num_pages=64), start=False)
    for n, ad in ads.items():
        eng.register_adapter(n, ad)
    prompt = PREFIX + [1, 2, 3]
    want = {n: [hf_greedy(merged_copy(model, ads.get(n)), prompt, GREEDY.max_tokens)] for n in ("A", "B", None)}
    for name in ("A", "B", None):
        assert run(eng, [prompt], [name]) == want[name]
        assert hits(eng) == 0, name
    for i, name in enumerate(("A", "B", None)):  # each one's own entries do hit
        assert run(eng, [prompt], [name]) == want[name]
        assert hits(eng) == (i + 1) * len(PREFIX), name


def test_reloaded_adapter_never_hits_the_old_entries(model):
    """vLLM issue 30931: unregister X, register other weights as X: the old K/V must not be used."""
    old, new = make_lora(model, 4, ATTN, seed=41), make_lora(model, 4, ATTN, seed=42)
    prompt = PREFIX + [5, 6]
    eng = Engine(model, config=EngineConfig(block_size=BS, num_pages=64), start=False)
    eng.register_adapter("X", old)
    first_id = eng.store.get("X").reg_id
    out_old = run(eng, [prompt], ["X"])
    assert eng.pool.used("cached") == len(PREFIX) // BS
    eng.unregister_adapter("X")
    assert eng.pool.used("cached") == 0 and eng.kv.cached == {}  # its entries went with it
    eng.register_adapter("X", new)
    assert eng.store.get("X").reg_id != first_id
    out_new = run(eng, [prompt], ["X"])
    assert hits(eng) == 0
    fresh = Engine(model, config=EngineConfig(block_size=BS, num_pages=64), start=False)
    fresh.register_adapter("X", new)
    assert out_new == run(fresh, [prompt], ["X"]) == [hf_greedy(merged_copy(model, new), prompt, GREEDY.max_tokens)]
    assert out_new != out_old  # the weights differ enough that stale K/V would show


def test_old_registration_keys_miss_even_if_entries_remain(model):
    """The identity in the key, not `forget`, is what keeps a re-loaded name from hitting: a
    key under another registration id is another key."""
    eng = Engine(model, config=EngineConfig(block_size=BS, num_pages=64), start=False)
    eng.register_adapter("X", make_lora(model, 2, ATTN, seed=43))
    run(eng, [PREFIX + [1]], ["X"])
    rid = eng.store.get("X").reg_id
    assert block_keys(PREFIX, BS, rid) != block_keys(PREFIX, BS, rid + 1) != block_keys(PREFIX, BS, None)
    assert eng.kv.share_prefix("probe", block_keys(PREFIX, BS, rid + 1)) == 0
    assert eng.kv.share_prefix("probe2", block_keys(PREFIX, BS, rid)) == len(PREFIX) // BS
    eng.kv.free("probe")
    eng.kv.free("probe2")
    check_pages(eng)


def test_eviction_under_a_small_pool(model):
    """Far more distinct prompt blocks than pages: cached pages are evicted (LRU) for KV growth,
    admission and an adapter's slot pages; every answer stays exact and no page leaks."""
    ad = make_lora(model, 2, ATTN, seed=51)
    eng = Engine(model, config=EngineConfig(block_size=BS, num_pages=16, max_num_seqs=2), start=False)
    eng.register_adapter("x", ad)
    ad_pages = eng.pool.pages_for(eng.store.get("x").nbytes)
    rng = random.Random(5)
    prompts = [[rng.randrange(128) for _ in range(rng.randint(12, 21))] for _ in range(12)]
    assert sum(len(p) // BS for p in prompts) > 2 * eng.pool.num_pages  # the cache cannot keep them all
    for p in prompts[:8]:
        assert run(eng, [p]) == [hf_greedy(model, p, GREEDY.max_tokens)]
    assert eng.pool.num_free < ad_pages  # loading the adapter must evict cached pages
    assert run(eng, [prompts[8]], ["x"]) == [hf_greedy(merged_copy(model, ad), prompts[8], GREEDY.max_tokens)]
    assert eng.pool.used("adapter") == ad_pages
    assert run(eng, prompts[9:]) == [hf_greedy(model, p, GREEDY.max_tokens) for p in prompts[9:]]
    # the most recent prompt's blocks survived, so it hits; every page is accounted for
    before = hits(eng)
    assert run(eng, [prompts[-1]]) == [hf_greedy(model, prompts[-1], GREEDY.max_tokens)]
    assert hits(eng) == before + (len(prompts[-1]) - 1) // BS * BS
    assert eng.pool.used("kv") == 0
    assert eng.pool.num_free + eng.pool.used("cached") == eng.pool.num_pages - eng.pool.used("adapter")
    eng.kv.evict(eng.pool.num_pages)
    assert eng.kv.cached == {} and eng.pool.num_free == eng.pool.num_pages - ad_pages


def test_held_pages_are_never_evicted():
    pool = UnifiedPool(1, 1, 2, block_size=2, num_pages=4)
    kv = PagedKVCache(pool)
    keys = block_keys([1, 2, 3, 4, 5], 2, None)
    assert kv.ensure("a", 5) and pool.num_free == 1
    kv.publish("a", keys, 0, 2, None)
    assert kv.share_prefix("b", keys) == 2 and kv.tables["b"] == kv.tables["a"][:2]
    kv.free("a")  # its last page goes to the pool, the shared two stay with b
    assert pool.num_free == 2 and pool.used("kv") == 2 and pool.used("cached") == 0
    assert pool.alloc(3, "kv") is None and len(kv.cached) == 2  # b's pages are not for the taking
    kv.free("b")
    assert pool.used("cached") == 2 and list(kv.evictable) == [kv.cached[keys[1]], kv.cached[keys[0]]]
    first, second = kv.cached[keys[0]], kv.cached[keys[1]]
    got = pool.alloc(3, "kv")  # evicts the tail block first: a prefix without its start is useless
    assert got is not None and second in got and kv.cached == {keys[0]: first} and pool.used("cached") == 1
    assert kv.share_prefix("c", keys) == 1 and pool.used("cached") == 0 and pool.used("kv") == 4


def test_prompt_logprobs_bypass_the_lookup_and_still_publish(model):
    lp = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True, prompt_logprobs=3, logprobs=2)
    score = SamplingParams(max_tokens=0, prompt_logprobs=1)
    prompt = PREFIX + [11, 12, 13]

    def outputs(caching: bool):
        eng = Engine(model, config=EngineConfig(block_size=BS, num_pages=64, enable_prefix_caching=caching),
                     start=False)
        eng.generate_sync([prompt], None, GREEDY)  # warms the cache (when on)
        q = eng.stats().prefix_cache_queries
        outs = eng.generate_sync([prompt, PREFIX[:8] + [99] * 9], None, [lp, score])
        assert eng.stats().prefix_cache_queries == q and hits(eng) == 0  # not looked up
        return eng, outs

    (eng, on), (_, off) = outputs(True), outputs(False)
    for a, b in zip(on, off):
        assert a.token_ids == b.token_ids and len(a.prompt_logprobs) == len(b.prompt_logprobs)
        for x, y in zip(a.prompt_logprobs + (a.logprobs or []), b.prompt_logprobs + (b.logprobs or [])):
            assert x.token_id == y.token_id and [t for t, _ in x.top] == [t for t, _ in y.top]
            assert x.logprob == pytest.approx(y.logprob, abs=1e-5)
    # the scoring request published its blocks: a plain request with that prompt hits them
    eng.generate_sync([PREFIX[:8] + [99] * 9 + [1]], None, GREEDY)
    assert hits(eng) == 16


def test_a_shared_page_survives_preempting_one_holder(model):
    eng = Engine(model, config=EngineConfig(block_size=BS, num_pages=64), start=False)
    run(eng, [PREFIX + [1]])
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    pb, pc = PREFIX + [60, 61], PREFIX + [70, 71, 72]
    got: dict[str, list[int]] = {}
    seqs = []
    for p in (pb, pc):
        r = GenerationRequest(prompt_token_ids=p, params=params)
        got[r.request_id] = []
        seqs.append(eng.submit(r, lambda c: got[c.request_id].extend(c.token_ids)))
    eng.step()
    b, c = seqs
    shared = eng.kv.tables[b.rid][:4]
    assert eng.kv.tables[c.rid][:4] == shared and all(eng.kv.refs[p] == 2 for p in shared)
    eng.scheduler._preempt(c)
    assert eng.kv.tables[b.rid][:4] == shared and all(eng.kv.refs[p] == 1 for p in shared)
    assert not set(shared) & set(eng.kv.evictable)
    check_pages(eng)
    run(eng, [])  # steps b and c to the end, checking the pages
    assert [got[s.rid] for s in seqs] == [hf_greedy(model, p, 8) for p in (pb, pc)]
    assert hits(eng) == 3 * len(PREFIX)  # b, c, and c again after its preemption


def test_chunked_prefill_and_preemption_with_shared_prefixes_stay_exact(model):
    """A token budget below the prompts and a pool too small for everyone: preemptions happen
    while prefix pages are shared, and no token changes."""
    ads = {"a0": make_lora(model, 2, ATTN, seed=61), "a1": make_lora(model, 4, ("v_proj", "down_proj"), seed=62)}
    eng = Engine(model, config=EngineConfig(block_size=BS, num_pages=20, max_num_batched_tokens=7), start=False)
    for n, ad in ads.items():
        eng.register_adapter(n, ad)
    rng = random.Random(13)
    reqs = [(PREFIX[:rng.choice([8, 12, 16])] + [rng.randrange(128) for _ in range(rng.randint(1, 6))],
             rng.choice([None, "a0", "a1"])) for _ in range(8)]
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    outs = run(eng, [p for p, _ in reqs], [a for _, a in reqs], params)
    assert outs == [hf_greedy(merged_copy(model, ads.get(a)), p, 10) for p, a in reqs]
    assert eng.scheduler.preemptions > 0 and hits(eng) > 0


def test_config_and_cli_flag():
    from adapterkit.serve.cli import add_serve_parser, engine_config

    p = argparse.ArgumentParser()
    add_serve_parser(p.add_subparsers())
    assert engine_config(p.parse_args(["serve"])).enable_prefix_caching is True
    assert engine_config(p.parse_args(["serve", "--enable-prefix-caching"])).enable_prefix_caching is True
    assert engine_config(p.parse_args(["serve", "--no-enable-prefix-caching"])).enable_prefix_caching is False
    assert EngineConfig().enable_prefix_caching is True
    with pytest.raises(ConfigError, match="enable_prefix_caching"):
        EngineConfig(enable_prefix_caching="no")


def test_metrics_export_the_counters(model):
    pytest.importorskip("prometheus_client")
    from prometheus_client.parser import text_string_to_metric_families

    from adapterkit.serve.metrics import ServerMetrics

    eng = Engine(model, config=EngineConfig(block_size=BS, num_pages=64), start=False)
    run(eng, [PREFIX + [1]])
    run(eng, [PREFIX + [2]])
    got = {s.name: s.value for f in text_string_to_metric_families(ServerMetrics(eng).render().decode())
           for s in f.samples}
    assert got["adapterkit_prefix_cache_queries_total"] == 2 * (len(PREFIX) + 1)
    assert got["adapterkit_prefix_cache_hits_total"] == len(PREFIX)
    assert got["adapterkit_pool_pages_cached"] == len(PREFIX) // BS
