"""Adapter store validation, disk registration, host LRU (cold loads) and the slot cache."""
from __future__ import annotations

import pytest
import torch
from _engine_utils import hf_greedy, make_lora, merged_copy
from conftest import tiny_llama

from adapterkit.errors import (
    AdapterFileError,
    AdapterNotFoundError,
    ConfigError,
    DuplicateAdapterError,
    IncompatibleBaseError,
)
from adapterkit.serve.adapters import AdapterStore, LoraSlots, SlotCache
from adapterkit.serve.engine import Engine
from adapterkit.serve.pool import UnifiedPool
from adapterkit.serve.runner import ModelRunner
from adapterkit.serve.types import EngineConfig, SamplingParams


@pytest.fixture(scope="module")
def model():
    m = tiny_llama(seed=2)
    m.generation_config.eos_token_id = None
    return m


@pytest.fixture(scope="module")
def shapes(model):
    return ModelRunner(model).module_shapes()


def test_validation_errors_name_the_problem(model, shapes):
    st = AdapterStore(shapes, 2, max_rank=8)
    with pytest.raises(ConfigError, match="r=16 exceeds max_lora_rank=8"):
        st.register("big", make_lora(model, 16, ("q_proj",), seed=0))
    bad = make_lora(model, 4, ("q_proj",), seed=0)
    bad.tensors["model.layers.1.self_attn.q_proj.lora_A"][0, 0] = float("nan")
    with pytest.raises(AdapterFileError, match=r"layers\.1\.self_attn\.q_proj\.lora_A.*NaN"):
        st.register("nan", bad)
    wrong = make_lora(model, 4, ("q_proj",), seed=0)
    wrong.tensors["model.layers.0.self_attn.q_proj.lora_B"] = torch.zeros(65, 4)
    with pytest.raises(IncompatibleBaseError, match=r"layers\.0\.q_proj.*\(64, 4\)"):
        st.register("wrong", wrong)
    deep = make_lora(model, 2, ("q_proj",), seed=0)
    deep.tensors["model.layers.7.self_attn.q_proj.lora_A"] = torch.zeros(2, 64)
    with pytest.raises(IncompatibleBaseError, match="layer 7"):
        st.register("deep", deep)
    odd = make_lora(model, 2, ("q_proj",), seed=0)
    odd.tensors["model.layers.0.self_attn.qq_proj.lora_A"] = torch.zeros(2, 64)
    with pytest.raises(IncompatibleBaseError, match="q_proj"):
        st.register("odd", odd)
    st.register("ok", make_lora(model, 2, ("q_proj",), seed=0))
    with pytest.raises(DuplicateAdapterError):
        st.register("ok", make_lora(model, 2, ("q_proj",), seed=0))
    with pytest.raises(AdapterNotFoundError, match="Closest: 'ok'"):
        st.get("okk")
    assert st.names() == ["ok"]


def _save_native(ad, path):
    from adapterkit.formats import write_native

    return write_native(path, "lora", ad.config, ad.tensors, {"architecture": "LlamaForCausalLM"})


def test_disk_adapters_cold_load_and_match_hf(model, shapes, tmp_path):
    ads = {f"d{i}": make_lora(model, 2 + i, ("q_proj", "down_proj"), seed=i) for i in range(3)}
    for n, ad in ads.items():
        _save_native(ad, tmp_path / n)
    eng = Engine(model, config=EngineConfig(max_loras=1, max_cpu_loras=1, block_size=4, num_pages=32), start=False)
    for n in ads:
        info = eng.register_adapter(n, str(tmp_path / n))
        assert info.rank == ads[n].config["r"] and info.targets == ("down_proj", "q_proj")
    assert sum(a.weights is not None for a in eng.store._adapters.values()) == 1  # host LRU holds one
    prompts = [[3, 1, 4, 1, 5], [9, 2, 6]]
    for n, ad in ads.items():
        outs = eng.generate_sync(prompts, [n, n], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
        for p, o in zip(prompts, outs):
            assert o.token_ids == hf_greedy(merged_copy(model, ad), p, 4)
    assert len(eng.store.cold_loads) >= 2  # dropped from host memory, re-read from disk


def test_corrupt_file_is_refused(model, tmp_path):
    ad = make_lora(model, 2, ("q_proj",), seed=0)
    _save_native(ad, tmp_path / "c")
    f = tmp_path / "c" / "adapter.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    eng = Engine(model, config=EngineConfig(num_pages=8), start=False)
    with pytest.raises(AdapterFileError):
        eng.register_adapter("c", str(tmp_path / "c"))
    with pytest.raises(AdapterFileError):
        eng.register_adapter("missing", str(tmp_path / "nope"))


def test_slot_cache_lru_never_evicts_held_adapter(model, shapes):
    st = AdapterStore(shapes, 2, max_rank=8)
    for i in range(4):
        st.register(f"a{i}", make_lora(model, 2, ("q_proj",), seed=i))
    pool = UnifiedPool(2, 2, 16, 4, 64)
    cache = SlotCache(st, LoraSlots(2, shapes, torch.float32, "cpu"), pool)
    assert cache.acquire("a0") is not None and cache.acquire("a1") is not None
    assert cache.acquire("a2") is None  # both slots held by running requests
    cache.release("a0")
    s2 = cache.acquire("a2")  # evicts a0 (idle), never a1
    assert s2 is not None and set(cache.slot_of) == {"a1", "a2"} and cache.evictions == 1
    assert cache.acquire("a1") == cache.slot_of["a1"] and cache.hits == 1
    assert pool.used("adapter") == 2 * pool.pages_for(st.get("a0").nbytes)
    # prefetch only fills free slots
    cache.release("a2")
    cache.prefetch(["a3"])
    assert "a3" not in cache.slot_of
    cache.remove("a2")
    cache.prefetch(["a3"])
    assert "a3" in cache.slot_of and cache.refs == {"a1": 2}


def test_slot_reuse_leaves_no_stale_weights(model, shapes):
    """An adapter without q_proj loaded into a slot that held a q_proj adapter must see zeros."""
    st = AdapterStore(shapes, 2, max_rank=8)
    st.register("q", make_lora(model, 4, ("q_proj",), seed=0))
    st.register("v", make_lora(model, 2, ("v_proj",), seed=1))
    slots = LoraSlots(1, shapes, torch.float32, "cpu")
    cache = SlotCache(st, slots)
    cache.acquire("q")
    cache.release("q")
    cache.acquire("v")
    A, B = slots.weights[(0, "q_proj")]
    assert (A == 0).all() and (B == 0).all()
    Av, Bv = slots.weights[(0, "v_proj")]
    assert (Av[0, 2:] == 0).all() and torch.equal(Av[0, :2], st.get("v").weights[(0, "v_proj")][0])
    assert slots.rank == 4  # grown to the largest rank seen


def test_slot_reuse_by_a_lower_rank_adapter_zeroes_the_rows_past_its_rank(model, shapes):
    """A rank-2 adapter loaded where a rank-4 one sat on the same modules: its rows, the old
    adapter's rows 2..3 zeroed, B holding the scaling; the other modules of the old one zeroed."""
    st = AdapterStore(shapes, 2, max_rank=8)
    st.register("big", make_lora(model, 4, ("q_proj", "v_proj"), seed=0))
    st.register("small", make_lora(model, 2, ("q_proj",), seed=1, alpha=6.0))
    slots = LoraSlots(1, shapes, torch.float32, "cpu")
    slots.set(0, st.get("big"), st.weights("big"))
    slots.set(0, st.get("small"), st.weights("small"))
    A, B = slots.weights[(0, "q_proj")]
    A2, B2 = st.get("small").weights[(0, "q_proj")]
    assert torch.equal(A[0, :2], A2) and (A[0, 2:] == 0).all()
    torch.testing.assert_close(B[0, :, :2], B2 * 3.0)  # alpha / r = 6 / 2
    assert (B[0, :, 2:] == 0).all()
    Av, Bv = slots.weights[(0, "v_proj")]
    assert (Av[0] == 0).all() and (Bv[0] == 0).all()
    assert int(slots.ranks[0]) == 2 and float(slots.scale[0]) == 1.0


def test_nan_file_on_disk_is_refused(model, tmp_path):
    from safetensors.torch import save_file

    ad = make_lora(model, 2, ("q_proj",), seed=0)
    _save_native(ad, tmp_path / "n")
    bad = dict(ad.tensors)
    bad["model.layers.0.self_attn.q_proj.lora_B"] = torch.full((64, 2), float("inf"))
    save_file(bad, str(tmp_path / "n" / "adapter.safetensors"))
    eng = Engine(model, config=EngineConfig(num_pages=8), start=False)
    with pytest.raises(AdapterFileError):
        eng.register_adapter("n", str(tmp_path / "n"))
    assert eng.list_adapters() == []
