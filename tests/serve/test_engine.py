"""Engine correctness: mixed-adapter batches are token-identical to HF generate per request."""
from __future__ import annotations

import asyncio
import random

import pytest
from _engine_utils import hf_greedy, make_lora, merged_copy
from conftest import tiny_llama

from adapterkit.errors import AdapterNotFoundError, ConfigError, QueueFullError
from adapterkit.serve.engine import Engine
from adapterkit.serve.types import EngineConfig, EngineProtocol, GenerationRequest, SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
TARGETS = [("q_proj", "v_proj"), ("q_proj", "k_proj", "v_proj", "o_proj"), ("gate_proj", "up_proj", "down_proj"),
           ("o_proj", "down_proj"), ("k_proj", "up_proj")]


@pytest.fixture(scope="module")
def model():
    m = tiny_llama(seed=3)
    m.generation_config.eos_token_id = None
    return m


def _adapters(model, n: int, seed: int = 0) -> dict:
    rng = random.Random(seed)
    return {f"a{i}": make_lora(model, rng.choice([1, 2, 4, 8]), TARGETS[i % len(TARGETS)], seed=100 + i)
            for i in range(n)}


def _check_against_hf(model, engine, adapters, reqs, max_new):
    outs = engine.generate_sync([p for p, _ in reqs], [a for _, a in reqs],
                                SamplingParams(temperature=0, max_tokens=max_new, ignore_eos=True))
    refs = {name: merged_copy(model, ad) for name, ad in adapters.items()} | {None: model}
    for (prompt, a), out in zip(reqs, outs):
        want = hf_greedy(refs[a], prompt, max_new)
        assert out.token_ids == want, f"adapter {a}, prompt len {len(prompt)}"
        assert out.finish_reason == "length" and out.usage.completion_tokens == max_new
    return outs


@pytest.mark.parametrize("seed", [0, 1])
def test_mixed_batch_matches_hf_generate(model, seed):
    rng = random.Random(seed)
    adapters = _adapters(model, 5, seed)
    eng = Engine(model, config=EngineConfig(max_loras=8, block_size=4, num_pages=128))
    try:
        for n, ad in adapters.items():
            eng.register_adapter(n, ad)
        reqs = [([rng.randrange(128) for _ in range(rng.randint(1, 20))], rng.choice([None, *adapters]))
                for _ in range(12)]
        outs = _check_against_hf(model, eng, adapters, reqs, 6)
        # the adapters really change the output (so the comparison above can fail)
        base = eng.generate_sync([p for p, _ in reqs], None, GREEDY)
        assert any(o.token_ids != b.token_ids for (_, a), o, b in zip(reqs, outs, base) if a is not None)
        assert eng.stats().pool_pages_kv == 0  # every page came back
    finally:
        eng.shutdown()


def test_more_adapters_than_slots_churns_cache(model):
    adapters = _adapters(model, 6, seed=5)
    eng = Engine(model, config=EngineConfig(max_loras=2, block_size=4, num_pages=64, max_num_seqs=4))
    try:
        for n, ad in adapters.items():
            eng.register_adapter(n, ad)
        rng = random.Random(7)
        reqs = [([rng.randrange(128) for _ in range(rng.randint(2, 9))], f"a{i % 6}") for i in range(12)]
        _check_against_hf(model, eng, adapters, reqs, 5)
        st = eng.stats()
        assert st.cache_evictions > 0 and st.cache_misses >= 6 and st.adapter_slots_used <= 2
    finally:
        eng.shutdown()


def test_chunked_prefill_and_preemption_stay_exact(model):
    """A token budget smaller than the prompts (chunked prefill) and a pool too small for all
    sequences at once (preemption + recompute) must not change a single token."""
    adapters = _adapters(model, 3, seed=9)
    eng = Engine(model, config=EngineConfig(max_loras=3, block_size=4, num_pages=14, max_num_batched_tokens=7))
    try:
        for n, ad in adapters.items():
            eng.register_adapter(n, ad)
        rng = random.Random(11)
        reqs = [([rng.randrange(128) for _ in range(rng.randint(8, 20))], rng.choice([None, "a0", "a1", "a2"]))
                for _ in range(6)]
        _check_against_hf(model, eng, adapters, reqs, 8)
        assert eng.scheduler.preemptions > 0
    finally:
        eng.shutdown()


def test_abort_mid_generation_frees_pages(model):
    eng = Engine(model, config=EngineConfig(block_size=4, num_pages=32), start=False)
    eng.register_adapter("x", make_lora(model, 4, ("q_proj",), seed=1))
    got = []
    r1 = GenerationRequest(prompt_token_ids=list(range(10)), adapter="x", params=SamplingParams(max_tokens=50))
    r2 = GenerationRequest(prompt_token_ids=list(range(5)), params=SamplingParams(max_tokens=3, temperature=0))
    eng.submit(r1, got.append)
    eng.submit(r2, got.append)
    for _ in range(3):
        eng.step()
    assert eng.pool.used("kv") > 0 and eng.cache.refs == {"x": 1}
    assert eng.abort(r1.request_id)
    assert not eng.abort(r1.request_id)
    assert eng.kv.num_pages(r1.request_id) == 0 and eng.cache.refs == {}
    mine = [c for c in got if c.request_id == r1.request_id]
    assert mine[-1].finish_reason == "abort" and sum(len(c.token_ids) for c in mine) == 3  # prefill + 2 decodes
    while eng.scheduler.has_work():
        eng.step()
    assert eng.pool.used("kv") == 0 and eng.stats().aborted == 1


def test_errors_are_typed(model):
    eng = Engine(model, config=EngineConfig(max_queue=2, max_model_len=16), start=False)
    with pytest.raises(AdapterNotFoundError, match="nope"):
        eng.submit(GenerationRequest(prompt_token_ids=[1], adapter="nope"), print)
    with pytest.raises(ConfigError, match="prompt"):
        eng.submit(GenerationRequest(prompt_token_ids=list(range(16))), print)
    with pytest.raises(ConfigError, match="prompt_token_ids"):
        eng.submit(GenerationRequest(prompt_token_ids=[1, 999]), print)
    with pytest.raises(ConfigError, match="tokenizer"):
        eng.submit(GenerationRequest(prompt="hi"), print)
    eng.submit(GenerationRequest(prompt_token_ids=[1]), lambda c: None)
    eng.submit(GenerationRequest(prompt_token_ids=[2]), lambda c: None)
    with pytest.raises(QueueFullError):
        eng.submit(GenerationRequest(prompt_token_ids=[3]), lambda c: None)


def test_max_model_len_finishes_with_length(model):
    eng = Engine(model, config=EngineConfig(max_model_len=10), start=False)
    out = eng.generate_sync([[1, 2, 3, 4, 5, 6]], None, SamplingParams(max_tokens=50, temperature=0, ignore_eos=True))
    assert out[0].finish_reason == "length" and len(out[0].token_ids) == 4


def test_async_generate_streams_and_unregister_waits(model):
    eng = Engine(model, config=EngineConfig(block_size=4, num_pages=32))
    assert isinstance(eng, EngineProtocol)
    ad = make_lora(model, 2, ("v_proj",), seed=4)
    eng.register_adapter("s", ad)
    assert [i.name for i in eng.list_adapters()] == ["s"]

    async def run():
        req = GenerationRequest(prompt_token_ids=[5, 6, 7], adapter="s", params=GREEDY)
        return [c async for c in eng.generate(req)]

    try:
        chunks = asyncio.run(run())
        assert [len(c.token_ids) for c in chunks] == [1] * 6 and chunks[-1].finish_reason == "length"
        assert [t for c in chunks for t in c.token_ids] == hf_greedy(merged_copy(model, ad), [5, 6, 7], 6)
        eng.unregister_adapter("s", wait=True, timeout=5)
        assert eng.list_adapters() == [] and eng.cache.slot_of == {}
        with pytest.raises(AdapterNotFoundError):
            eng.unregister_adapter("s")
        st = eng.stats()
        assert st.finished == 1 and st.ttft_p50_s > 0 and st.generated_tokens == 6
    finally:
        eng.shutdown()


def test_async_consumer_leaving_aborts(model):
    eng = Engine(model, config=EngineConfig(block_size=4, num_pages=32))

    async def run():
        req = GenerationRequest(prompt_token_ids=[5, 6, 7], params=SamplingParams(max_tokens=200, ignore_eos=True))
        agen = eng.generate(req)
        first = await agen.__anext__()
        await agen.aclose()  # the client went away
        return first

    try:
        assert asyncio.run(run()).finish_reason is None
        assert eng.pool.used("kv") == 0 and eng.stats().aborted == 1
    finally:
        eng.shutdown()


def test_failing_consumer_is_aborted_alone(model):
    eng = Engine(model, config=EngineConfig(block_size=4, num_pages=32), start=False)
    got = []

    def broken(c):
        raise RuntimeError("event loop is closed")

    bad = GenerationRequest(prompt_token_ids=[1, 2], params=GREEDY)
    good = GenerationRequest(prompt_token_ids=[1, 2], params=GREEDY)
    eng.submit(bad, broken)
    eng.submit(good, got.append)
    while eng.scheduler.has_work():
        eng.step()
    assert sum(len(c.token_ids) for c in got) == 6 and got[-1].finish_reason == "length"
    assert eng.stats().aborted == 1 and eng.pool.used("kv") == 0


def test_registration_runs_on_the_engine_thread(model, monkeypatch):
    """After start, all tensor work happens on the engine thread (see the engine module doc:
    a second thread with an OpenMP pool made every step ~2x slower); errors still reach the
    caller, and a shut-down engine refuses new work clearly."""
    import threading

    eng = Engine(model, config=EngineConfig(block_size=4, num_pages=32))
    seen = []
    real = eng.store.register
    monkeypatch.setattr(eng.store, "register", lambda *a: (seen.append(threading.current_thread().name), real(*a))[1])
    ads = _adapters(model, 1)
    info = eng.register_adapter("a0", ads["a0"])
    assert seen == ["adapterkit-engine"] and info.name == "a0"
    with pytest.raises(Exception, match="already registered"):
        eng.register_adapter("a0", ads["a0"])
    out = eng.generate_sync([[1, 2, 3]], adapters=["a0"], params=SamplingParams(temperature=0, max_tokens=3),
                            timeout=60)
    assert len(out[0].token_ids) == 3
    eng.shutdown()
    with pytest.raises(RuntimeError, match="shut down"):
        eng.register_adapter("a1", ads["a0"])
