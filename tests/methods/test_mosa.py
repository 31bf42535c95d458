"""MoSA: disjoint sparse modules of a bottleneck adapter, sparse training, merge = sum of modules."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import adapterkit as ak
from adapterkit.errors import AdapterError, ConfigError
from adapterkit.methods import BottleneckConfig, MoSAConfig, mosa_merge, set_mosa_modules
from _method_checks import adapter_pieces, assert_fresh_adapter_is_identity
from conftest import randomize_adapters, tiny_bert, tiny_gpt2, tiny_llama

MAKERS = {"llama": tiny_llama, "gpt2": tiny_gpt2, "bert": tiny_bert}
SPLIT = ("adapter_down.weight", "adapter_down.bias", "adapter_up.weight", "adapter_up.bias")


def _masks(piece) -> dict[str, torch.Tensor]:
    return {k: piece.get_submodule(k.split(".")[0]).get_buffer(k.split(".")[1] + "_module") for k in SPLIT}


def _dense_with(model, name: str, tensors_of) -> torch.nn.Module:
    """Reference: a copy of the base with a PLAIN bottleneck adapter holding ``tensors_of(piece)``."""
    cfg = ak.get_adapter_config(model, name)
    ref = copy.deepcopy(model)
    ak.delete_adapter(ref, name)
    ak.add_adapter(ref, "dense", cfg.as_bottleneck())
    dense = adapter_pieces(ref, "dense")
    with torch.no_grad():
        for h, p in adapter_pieces(model, name).items():
            dense[h].load_state_dict(tensors_of(p))
    return ref


@pytest.mark.parametrize("arch,mode", [("llama", "pfeiffer"), ("bert", "houlsby"), ("gpt2", "parallel"),
                                       ("bert", "parallel")])
def test_sparse_module_matches_masked_bottleneck_reference(arch, mode, ids):
    m = MAKERS[arch]()
    ak.add_adapter(m, "a", MoSAConfig(mode=mode, reduction_factor=8, num_modules=3))
    randomize_adapters(m)
    for k in (0, 2):
        set_mosa_modules(m, "a", [k])
        want = _dense_with(m, "a", lambda p: {t: v * (_masks(p)[t] == k) for t, v in p.state_dict().items()
                                              if t in SPLIT})(ids)[0]
        torch.testing.assert_close(m(ids)[0], want, rtol=1e-6, atol=1e-6)
    set_mosa_modules(m, "a", None)
    full = _dense_with(m, "a", lambda p: {t: v for t, v in p.state_dict().items() if t in SPLIT})(ids)[0]
    torch.testing.assert_close(m(ids)[0], full, rtol=1e-6, atol=1e-6)  # eval: the complete adapter


def test_modules_are_disjoint_balanced_and_sum_to_the_adapter(llama):
    ak.add_adapter(llama, "a", MoSAConfig(reduction_factor=8, num_modules=4))
    randomize_adapters(llama)
    for p in adapter_pieces(llama).values():
        masks = _masks(p)
        for t, ids_ in masks.items():
            assert ids_.dtype == torch.uint8 and int(ids_.max()) < 4
            counts = torch.bincount(ids_.flatten().long(), minlength=4)
            assert counts.max() - counts.min() <= 1, t  # balanced
        mods = [p.module_tensors(k) for k in range(4)]
        for t in SPLIT:
            nz = torch.stack([(m[t] != 0) for m in mods]).sum(0)
            assert int(nz.max()) <= 1  # disjoint: no entry in two modules
            total = mods[0][t] + mods[1][t] + mods[2][t] + mods[3][t]
            assert torch.equal(total, p.get_parameter(t))  # the sum is the adapter, exactly


def test_training_updates_only_the_active_modules_entries(llama, ids):
    ak.add_adapter(llama, "a", MoSAConfig(reduction_factor=8, num_modules=4, num_active=1))
    randomize_adapters(llama)
    llama.train()
    opt = torch.optim.SGD([p for p in llama.parameters() if p.requires_grad], lr=0.5)
    seen = set()
    torch.manual_seed(7)
    for _ in range(4):
        before = {h: {t: v.clone() for t, v in p.state_dict().items()} for h, p in adapter_pieces(llama).items()}
        opt.zero_grad()
        F.cross_entropy(llama(ids).logits[:, :-1].reshape(-1, 128), ids[:, 1:].reshape(-1)).backward()
        opt.step()
        for h, p in adapter_pieces(llama).items():
            (k,) = p.mosa_active
            seen.add(k)
            for t in SPLIT:
                mask = _masks(p)[t] == k
                moved = p.get_parameter(t) != before[h][t]
                assert not bool((moved & ~mask).any()), (h, t)  # nothing outside module k moves
                assert p.get_parameter(t).grad[~mask].abs().max() == 0
            assert any(bool(((p.get_parameter(t) != before[h][t]) & (_masks(p)[t] == k)).any()) for t in SPLIT)
        for n, q in llama.named_parameters():
            assert q.grad is None or ".adapterkit.a." in n, n
    assert len(seen) > 1  # modules are drawn at random


def test_num_active_trains_the_union(llama, ids):
    ak.add_adapter(llama, "a", MoSAConfig(reduction_factor=8, num_modules=4, num_active=2))
    randomize_adapters(llama)
    llama.train()
    llama(ids).logits.pow(2).mean().backward()
    for p in adapter_pieces(llama).values():
        assert len(p.mosa_active) == 2
        for t in SPLIT:
            mask = torch.isin(_masks(p)[t], torch.tensor(p.mosa_active, dtype=torch.uint8))
            g = p.get_parameter(t).grad
            assert g[~mask].abs().max() == 0 and g[mask].abs().sum() > 0


@pytest.mark.parametrize("as_name", [None, "merged"])
def test_mosa_merge_gives_plain_bottleneck_equal_to_eval_output(as_name, ids, tmp_path):
    m = tiny_bert()
    ak.add_adapter(m, "a", MoSAConfig(mode="houlsby", reduction_factor=8))
    randomize_adapters(m)
    want = m(ids)[0]  # eval: all modules
    dense = {h: {t: v.clone() for t, v in p.state_dict().items() if t in SPLIT} for h, p in adapter_pieces(m).items()}
    mosa_merge(m, "a", as_name=as_name)
    new = as_name or "a"
    assert ak.api.get_record(m, new).method == "bottleneck"
    assert ak.list_adapters(m) == (["a", "merged"] if as_name else ["a"])
    for h, p in adapter_pieces(m, new).items():
        for t in SPLIT:
            assert torch.equal(p.state_dict()[t], dense[h][t])
    ak.set_adapter(m, new)
    torch.testing.assert_close(m(ids)[0], want, rtol=0, atol=0)
    ak.save_adapter(m, new, tmp_path / "b")  # saved as a plain bottleneck adapter
    fresh = tiny_bert()
    ak.load_adapter(fresh, tmp_path / "b", name="x")
    torch.testing.assert_close(fresh(ids)[0], want, rtol=0, atol=0)


def test_count_equals_bottleneck_closed_form():
    d, k = 64, 8
    for mode, sites in (("pfeiffer", 2), ("houlsby", 4)):
        m = tiny_llama()
        ak.add_adapter(m, "a", MoSAConfig(mode=mode, reduction_factor=8))
        assert ak.trainable_parameters(m, "a") == sites * (2 * d * k + k + d)
        ak.add_adapter(m, "b", BottleneckConfig(mode=mode, reduction_factor=8))
        assert ak.trainable_parameters(m, "a") == ak.trainable_parameters(m, "b")


def test_save_load_keeps_the_split(ids, tmp_path):
    m = tiny_gpt2()
    ak.add_adapter(m, "a", MoSAConfig(mode="parallel", num_modules=3))
    randomize_adapters(m)
    set_mosa_modules(m, "a", [1])
    want_sparse = m(ids).logits
    set_mosa_modules(m, "a", None)
    want = m(ids).logits
    ak.save_adapter(m, "a", tmp_path / "m")
    fresh = tiny_gpt2()
    torch.manual_seed(99)  # a fresh add would draw another split: the file's must win
    ak.load_adapter(fresh, tmp_path / "m", name="a")
    for h, p in adapter_pieces(fresh).items():
        for t, v in _masks(p).items():
            assert torch.equal(v, _masks(adapter_pieces(m)[h])[t])
    torch.testing.assert_close(fresh(ids).logits, want, rtol=0, atol=0)
    set_mosa_modules(fresh, "a", [1])
    torch.testing.assert_close(fresh(ids).logits, want_sparse, rtol=0, atol=0)


def test_fresh_adapter_is_identity(ids):
    assert_fresh_adapter_is_identity(tiny_llama(), ids, MoSAConfig())


def test_errors(llama):
    with pytest.raises(ConfigError, match="num_modules"):
        MoSAConfig(num_modules=1)
    with pytest.raises(ConfigError, match="num_active"):
        MoSAConfig(num_modules=3, num_active=4)
    with pytest.raises(ConfigError, match="learned"):
        MoSAConfig(scaling="learned")
    ak.add_adapter(llama, "a", MoSAConfig())
    with pytest.raises(ConfigError, match="0..3"):
        set_mosa_modules(llama, "a", [4])
    ak.add_adapter(llama, "b", BottleneckConfig())
    with pytest.raises(AdapterError, match="not mosa"):
        mosa_merge(llama, "b")
    with pytest.raises(ak.errors.NotMergeableError):
        ak.merge(llama, "a")
