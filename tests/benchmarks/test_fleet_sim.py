"""benchmarks/_fleet.py (the fleet simulator core): invariants, routing policies, closed forms."""
from __future__ import annotations

import importlib.util
import random
import sys
from dataclasses import replace
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "_fleet.py"
_spec = importlib.util.spec_from_file_location("_fleet", _PATH)
fleet = importlib.util.module_from_spec(_spec)
sys.modules["_fleet"] = fleet  # dataclasses resolve their module by name
_spec.loader.exec_module(fleet)

COST = fleet.CostModel(step_base_s=0.010, step_per_token_s=0.001, step_per_row_s=0.002, step_per_adapter_s=0.003,
                       load_disk_s=0.050, load_host_s=0.005, slots=4, host_cache=8, max_num_seqs=8,
                       max_batched_tokens=128)


def trace(n: int = 300, adapters: int = 50, rate: float = 40.0, seed: int = 3):
    return fleet.power_law_trace(n, adapters, rate, seed=seed)


@pytest.mark.parametrize("policy", fleet.POLICIES)
def test_every_request_finishes_once_with_its_tokens(policy):
    tr = trace()
    res = fleet.simulate(tr, 4, COST, policy)
    assert [r.rid for r in res.requests] == [r.rid for r in tr]
    assert all(r.t_done is not None and r.t <= r.t_first <= r.t_done for r in res.requests)
    assert all(0 <= r.replica < 4 for r in res.requests)
    assert res.tokens == sum(r.out for r in tr)  # nothing lost, nothing generated twice
    assert all(not rep.waiting and not rep.running and not rep.refs for rep in res.replicas)
    assert tr[0].replica == -1 and tr[0].t_first is None  # the caller's trace is not modified


def test_same_seed_same_result_other_seed_differs():
    tr = trace()
    a, b = (fleet.simulate(tr, 4, COST, "random", seed=1) for _ in range(2))
    assert [(r.replica, r.t_first, r.t_done) for r in a.requests] == [(r.replica, r.t_first, r.t_done)
                                                                      for r in b.requests]
    c = fleet.simulate(tr, 4, COST, "random", seed=2)
    assert [r.replica for r in c.requests] != [r.replica for r in a.requests]


def test_one_request_closed_form_disk_then_host():
    prompt, out = 20, 5
    req = [fleet.Request(0, 1.0, adapter=7, prompt=prompt, out=out)]
    r = fleet.simulate(req, 1, COST, "least_loaded").requests[0]
    first = 1.0 + COST.load_disk_s + COST.step_s(prompt, 1, 1)  # cold: not registered into host memory
    assert r.t_first == pytest.approx(first)
    assert r.t_done == pytest.approx(first + (out - 1) * COST.step_s(1, 1, 1))
    r = fleet.simulate(req, 1, COST, "least_loaded", preload=[7]).requests[0]
    assert r.t_first == pytest.approx(1.0 + COST.load_host_s + COST.step_s(prompt, 1, 1))


def test_batch_closed_form_and_throughput():
    k, prompt, out = 6, 10, 4  # all admitted at once, prompts fit one step, one shared adapter
    reqs = [fleet.Request(i, 0.0, 3, prompt, out) for i in range(k)]
    res = fleet.simulate(reqs, 1, COST, "random", preload=[3])
    span = COST.load_host_s + COST.step_s(k * prompt, k, 1) + (out - 1) * COST.step_s(k, k, 1)
    assert res.makespan == pytest.approx(span)
    assert res.tok_s == pytest.approx(k * out / span)
    assert res.replicas[0].host_loads == 1 and res.replicas[0].disk_loads == 0 and res.replicas[0].hits == k - 1


def test_slots_cap_distinct_adapters_running():
    cost = replace(COST, slots=1)  # the second adapter waits until the first one's request ends
    reqs = [fleet.Request(0, 0.0, 1, 8, 3), fleet.Request(1, 0.0, 2, 8, 3)]
    a, b = fleet.simulate(reqs, 1, cost, "random").requests
    assert b.t_first > a.t_done


def test_replica_loads_only_what_is_not_resident():
    rep = fleet.Replica(COST, preload=[1, 2])
    for rid, a in enumerate([1, 1, 2, 3, 3, 1]):
        rep.submit(fleet.Request(rid, 0.0, a, 4, 2))
    while rep.outstanding:
        rep.begin_step()
        rep.end_step(0.0)
    assert (rep.host_loads, rep.disk_loads) == (2, 1)  # 1 and 2 from host memory, 3 from disk, once each


def test_affinity_never_reloads_a_resident_adapter_while_its_holder_has_room():
    # one hot adapter at a rate one replica handles: affinity loads it once, random on every replica
    reqs = [fleet.Request(i, i * 0.5, 5, 8, 4) for i in range(40)]
    aff = fleet.simulate(reqs, 4, COST, "affinity")
    assert aff.disk_loads == 1 and aff.slot_loads == 1
    assert len({r.replica for r in aff.requests}) == 1
    rnd = fleet.simulate(reqs, 4, COST, "random")
    assert rnd.disk_loads == 4


def test_affinity_router_prefers_holders_until_they_are_full():
    r = fleet.Router("affinity", 4, max_ongoing=3)
    assert r.choose(9, [0, 0, 2, 1], holders=[2, 3]) == 3  # least-loaded holder, not the idle non-holders
    assert r.choose(9, [0, 1, 3, 3], holders=[2, 3]) == 0  # holders at max_ongoing: least-loaded overall
    assert r.choose(9, [2, 1, 3, 3], holders=[]) == 1


def test_bounded_load_hashing_respects_its_bound():
    n, router, rng = 8, fleet.Router("chash_bounded", 8, eps=0.25), random.Random(0)
    loads, held = [0] * n, []
    hot = 0
    for step in range(3000):
        if held and rng.random() < 0.45:
            loads[held.pop(rng.randrange(len(held)))] -= 1
        a = hot if rng.random() < 0.5 else rng.randrange(1000)  # one adapter takes half the traffic
        cap = router.bound(sum(loads))
        i = router.choose(a, loads, ())
        assert loads[i] + 1 <= cap
        loads[i] += 1
        held.append(i)
    # without load, an adapter always maps to the same replica (the point of hashing)
    assert len({router.choose(123, [0] * n, ()) for _ in range(5)}) == 1


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="policy"):
        fleet.Router("round_robin", 2)
    with pytest.raises(ValueError, match="load_disk_s"):
        replace(COST, load_disk_s=-1.0)
    with pytest.raises(ValueError, match="slots"):
        replace(COST, slots=0)
    with pytest.raises(ValueError, match="sorted"):
        fleet.simulate([fleet.Request(0, 2.0, 0, 4, 4), fleet.Request(1, 1.0, 0, 4, 4)], 1, COST, "random")


def test_power_law_trace_is_poisson_and_skewed():
    tr = fleet.power_law_trace(4000, 1000, rate=50.0, seed=0)
    assert tr[-1].t / len(tr) == pytest.approx(1 / 50.0, rel=0.1)
    counts = [0] * 1000
    for r in tr:
        counts[r.adapter] += 1
        assert 8 <= r.prompt <= 64 and 8 <= r.out <= 64
    assert counts[0] > 5 * counts[9] > 0 or counts[0] > 200  # p(0) / p(9) = 10 under alpha = 1


def test_replica_makes_the_real_engines_scheduling_decisions(tmp_path):
    """The same requests through the real engine (tiny Llama, real adapter files, stepped by
    hand) and through `Replica`: the same tokens in every step, the same slot and disk loads."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from adapterkit.formats import write_native
    from adapterkit.serve.engine import Engine
    from adapterkit.serve.types import EngineConfig, GenerationRequest, SamplingParams

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=256)).eval()
    model.generation_config.eos_token_id = None
    # fewer sequences than slots, so prefetch into free slots happens too
    cost = replace(COST, slots=3, host_cache=4, max_num_seqs=2, max_batched_tokens=16)
    eng = Engine(model, config=EngineConfig(max_loras=3, max_cpu_loras=4, max_num_seqs=2, max_num_batched_tokens=16,
                                            max_lora_rank=8), start=False)
    g = torch.Generator().manual_seed(0)
    for a in range(8):
        t = {f"model.layers.{i}.self_attn.q_proj.lora_A": torch.randn(4, 64, generator=g) for i in range(2)}
        t |= {f"model.layers.{i}.self_attn.q_proj.lora_B": torch.randn(64, 4, generator=g) for i in range(2)}
        eng.register_adapter(f"ad{a}", str(write_native(tmp_path / f"a{a}", "lora", {"r": 4, "alpha": 8.0}, t, {})))
    rng = random.Random(1)
    reqs = [fleet.Request(i, 0.0, rng.choice([0, 0, 1, 2, 4, 5, 6, 7]), rng.randint(3, 20), rng.randint(1, 6))
            for i in range(16)]
    rep = fleet.Replica(cost, preload=range(8))
    for r in reqs:
        eng.submit(GenerationRequest(prompt_token_ids=[(r.rid + k) % 256 for k in range(r.prompt)],
                                     adapter=f"ad{r.adapter}", params=SamplingParams(temperature=0, max_tokens=r.out,
                                                                                     ignore_eos=True)), lambda c: None)
        rep.submit(r)
    real, sim = [], []
    while eng.scheduler.has_work():  # per step: tokens generated, slot loads so far, disk loads so far
        real.append((eng.step(), eng.cache.misses, len(eng.cache.cold_load_times)))
    while rep.outstanding:
        before = rep.tokens
        rep.begin_step()
        rep.end_step(0.0)
        sim.append((rep.tokens - before, rep.disk_loads + rep.host_loads, rep.disk_loads))
    eng.shutdown()
    assert sim == real
    assert rep.disk_loads > 0 and rep.host_loads > 0  # both tiers were exercised
    assert any(r.prompt > cost.max_batched_tokens for r in reqs)  # chunked prefills were in the mix
