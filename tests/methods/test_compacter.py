"""Compacter / Compacter++: PHM weights vs a naive Kronecker sum, the whole adapter vs a dense
bottleneck adapter holding those weights, sharing of the rule matrices, counts, save/load."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import adapterkit as ak
from adapterkit.errors import ConfigError, NotMergeableError
from adapterkit.methods import BottleneckConfig, CompacterConfig
from adapterkit.methods.compacter import PHMLinear, PHMRule, kron_sum
from _method_checks import assert_fresh_adapter_is_identity, assert_mixed_batch_rows_match
from conftest import randomize_adapters, tiny_bert, tiny_gpt2, tiny_llama, tiny_vit

MAKERS = {"llama": tiny_llama, "gpt2": tiny_gpt2, "bert": tiny_bert, "vit": tiny_vit}


def naive_phm_weight(rule: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """W = sum_i A_i ⊗ B_i, B_i = sum_j s_ij t_ij^T (the paper, term by term with torch.kron)."""
    n, p, r = left.shape
    W = 0
    for i in range(n):
        B = sum(torch.outer(left[i, :, j], right[i, j, :]) for j in range(r))
        W = W + torch.kron(rule[i], B)
    return W


@pytest.mark.parametrize("n,p,q", [(2, 3, 5), (4, 2, 16), (3, 1, 1)])
def test_kron_sum_matches_torch_kron(n, p, q):
    g = torch.Generator().manual_seed(n * 10 + p)
    rule, fast = torch.randn(n, n, n, generator=g), torch.randn(n, p, q, generator=g)
    want = sum(torch.kron(rule[i], fast[i]) for i in range(n))
    torch.testing.assert_close(kron_sum(rule, fast), want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("rank", [1, 3])
def test_phm_linear_matches_naive(rank):
    torch.manual_seed(0)
    cfg = CompacterConfig(phm_dim=4, phm_rank=rank, shared_phm_rule=False)
    lin = PHMLinear(16, 8, cfg, torch.zeros(1), None, zero_init=False)
    with torch.no_grad():
        lin.b.normal_()
    W = naive_phm_weight(lin.phm_rule, lin.W_left, lin.W_right)
    assert W.shape == (8, 16)
    x = torch.randn(5, 16)
    torch.testing.assert_close(lin(x), x @ W.T + lin.b, rtol=1e-5, atol=1e-6)
    assert sum(p.numel() for p in lin.parameters()) == 4 ** 3 + rank * (16 + 8) + 8


def _dense_reference(model: nn.Module, cfg: CompacterConfig, name: str = "a") -> nn.Module:
    """A copy of the base with a plain bottleneck adapter at the same sites, holding the
    Compacter's weights composed naively."""
    rec = ak.api.get_record(model, name)
    ref = copy.deepcopy(model)
    ak.delete_adapter(ref, name)
    k = next(p for h, p in rec.pieces.items() if h).adapter_down.W_left.shape[1] * cfg.phm_dim
    ak.add_adapter(ref, "dense", BottleneckConfig(
        mode="houlsby" if cfg.mode == "compacter" else "pfeiffer", bottleneck_size=k,
        non_linearity=cfg.non_linearity, scaling=cfg.scaling, original_ln_before=cfg.original_ln_before,
        residual_before_ln=cfg.residual_before_ln, targets=cfg.targets))
    dense = ak.api.get_record(ref, "dense").pieces
    assert set(dense) == {h for h in rec.pieces if h}  # same placements
    with torch.no_grad():
        for h, piece in rec.pieces.items():
            if not h:
                continue
            for proj in ("adapter_down", "adapter_up"):
                phm, lin = getattr(piece, proj), getattr(dense[h], proj)
                lin.weight.copy_(naive_phm_weight(phm.rule, phm.W_left, phm.W_right))
                lin.bias.copy_(phm.b)
    return ref


@pytest.mark.parametrize("mode", ["compacter", "compacter++"])
@pytest.mark.parametrize("arch", ["llama", "bert", "vit"])
def test_matches_dense_bottleneck_with_naive_kronecker_weights(arch, mode):
    model = MAKERS[arch]()
    cfg = CompacterConfig(mode=mode, reduction_factor=8)
    ak.add_adapter(model, "a", cfg)
    randomize_adapters(model)
    ref = _dense_reference(model, ak.get_adapter_config(model, "a"))
    torch.manual_seed(3)
    inp = {"pixel_values": torch.randn(2, 3, 32, 32)} if arch == "vit" else {"input_ids": torch.randint(0, 128, (2, 7))}
    got, want = model(**inp)[0], ref(**inp)[0]
    ak.set_adapter(model, None)
    assert not torch.allclose(got, model(**inp)[0], atol=1e-3)  # the adapter does something
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_rule_is_shared_once_and_trained_by_every_layer(llama, ids):
    ak.add_adapter(llama, "a", CompacterConfig(reduction_factor=8))
    pieces = ak.api.get_record(llama, "a").pieces
    holder = pieces[""]
    assert isinstance(holder, PHMRule)
    for h, p in pieces.items():
        if h:
            assert p.adapter_down.rule is holder.phm_rule and p.adapter_up.rule is holder.phm_rule
    keys = [k for k in ak.api.adapter_state_dict(llama, "a") if "phm_rule" in k]
    assert keys == ["phm_rule"]
    randomize_adapters(llama)
    llama(ids).logits.pow(2).mean().backward()
    assert holder.phm_rule.grad.abs().sum() > 0
    for n, p in llama.named_parameters():
        assert p.grad is None or ".adapterkit.a." in f".{n}", n
    # one parameter object for the optimizer: the model's parameters list it once
    assert sum(p is holder.phm_rule for p in llama.parameters()) == 1


@pytest.mark.parametrize("mode,sites", [("compacter", 4), ("compacter++", 2)])
@pytest.mark.parametrize("shared,rank", [(True, 1), (False, 1), (True, 2)])
def test_trainable_count_closed_form(mode, sites, shared, rank):
    d, n = 64, 4
    k = 8  # 64 // 8, a multiple of n
    m = tiny_llama()
    ak.add_adapter(m, "a", CompacterConfig(mode=mode, reduction_factor=8, shared_phm_rule=shared, phm_rank=rank))
    per_site = 2 * rank * (d + k) + (k + d)  # fast factors of down and up, plus their biases
    rules = n ** 3 if shared else sites * 2 * n ** 3
    assert ak.trainable_parameters(m, "a") == sites * per_site + rules
    assert ak.trainable_parameters(m) == ak.trainable_parameters(m, "a")  # nothing counted twice


def test_bottleneck_rounds_to_multiple_of_phm_dim():
    cfg = CompacterConfig()
    assert cfg.bottleneck_for(64) == 4 and cfg.bottleneck_for(576) == 16 and cfg.bottleneck_for(4096) == 128
    m = tiny_gpt2()
    ak.add_adapter(m, "a", CompacterConfig(mode="compacter++"))  # defaults work on a 64-wide model
    assert ak.trainable_parameters(m, "a") == 2 * (2 * (64 + 4) + 68) + 64


def test_fresh_adapter_is_identity_and_gradients(ids):
    m = tiny_gpt2()
    assert_fresh_adapter_is_identity(m, ids, CompacterConfig(reduction_factor=8))
    m(ids).logits.pow(2).mean().backward()
    for n, p in m.named_parameters():
        if ".adapterkit.a." in f".{n}":
            assert p.requires_grad
        else:
            assert not p.requires_grad and p.grad is None, n
    up = ak.api.get_record(m, "a").pieces["transformer.h.0.mlp"].adapter_up
    assert up.W_right.grad.abs().sum() > 0  # the zero factor is what starts learning


@pytest.mark.parametrize("shared", [True, False])
def test_save_load_round_trip(shared, ids, tmp_path):
    m = tiny_bert()
    ak.add_adapter(m, "a", CompacterConfig(reduction_factor=8, shared_phm_rule=shared))
    randomize_adapters(m)
    want = m(ids)[0]
    ak.save_adapter(m, "a", tmp_path / "c")
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "c" / "adapter.safetensors")
    assert sum("phm_rule" in k for k in saved) == (1 if shared else 4 * 2)
    fresh = tiny_bert()
    ak.load_adapter(fresh, tmp_path / "c", name="a")
    assert ak.get_adapter_config(fresh, "a") == ak.get_adapter_config(m, "a")
    torch.testing.assert_close(fresh(ids)[0], want, rtol=0, atol=0)
    if shared:  # still one tensor used everywhere after loading
        pieces = ak.api.get_record(fresh, "a").pieces
        assert all(p.adapter_up.rule is pieces[""].phm_rule for h, p in pieces.items() if h)


def test_mixed_batch_equals_rows_alone(ids):
    m = tiny_llama()
    ak.add_adapter(m, "a", CompacterConfig(reduction_factor=8))
    ak.add_adapter(m, "b", CompacterConfig(mode="compacter++", phm_dim=2, reduction_factor=4))
    randomize_adapters(m)
    names = ["b", None, "a", "a"]
    assert_mixed_batch_rows_match(m, ids, names)


def test_errors(llama):
    with pytest.raises(ConfigError, match="mode"):
        CompacterConfig(mode="compacter+")
    with pytest.raises(ConfigError, match="phm_dim"):
        CompacterConfig(phm_dim=0)
    with pytest.raises(ConfigError, match="phm_rank"):
        CompacterConfig(phm_rank=1.5)
    with pytest.raises(ConfigError, match="phm_dim=3 must divide the width 64"):
        ak.add_adapter(llama, "a", CompacterConfig(phm_dim=3))
    assert ak.list_adapters(llama) == []
    ak.add_adapter(llama, "a", CompacterConfig())
    with pytest.raises(NotMergeableError):
        ak.merge(llama, "a")
    assert ak.get_adapter_config(llama, "a").original_ln_before is False
    assert CompacterConfig(mode="compacter++").original_ln_before is True
