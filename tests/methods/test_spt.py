"""SPT against its definition: g^2 sensitivity, global top-tau under a budget, LoRA on matrices
whose sensitive count reaches the threshold, sparse deltas elsewhere."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import adapterkit as ak
from adapterkit.api import get_record
from adapterkit.errors import ConfigError
from adapterkit.methods.spt import SPTConfig, prepare_spt, spt_allocate, spt_sensitivity
from _method_checks import assert_base_restored, base_weights
from conftest import randomize_adapters, tiny_vit

R = 2


def _batches(n: int = 2) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(7)
    return [{"pixel_values": torch.randn(3, 3, 32, 32, generator=g), "labels": torch.randint(0, 5, (3,), generator=g)}
            for _ in range(n)]


def _linears(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and not n.endswith("classifier")}


@pytest.mark.parametrize("criterion", ["grad_sq", "taylor"])
def test_sensitivity_is_the_summed_squared_gradient(criterion):
    model = tiny_vit()
    hosts = _linears(model)
    got = spt_sensitivity(model, hosts, _batches(), criterion=criterion)
    assert all(p.grad is None for p in model.parameters())
    ref = tiny_vit()
    want = {h: torch.zeros_like(m.weight) for h, m in _linears(ref).items()}
    for b in _batches():
        ref.zero_grad()
        ref(**b).loss.backward()
        for h, m in _linears(ref).items():
            g = m.weight.grad
            want[h] += g ** 2 if criterion == "grad_sq" else (g * m.weight).abs()
    for h in hosts:
        assert torch.allclose(got[h], want[h], rtol=1e-4, atol=1e-12), h


def _reference_allocation(scores: dict[str, torch.Tensor], budget: int, r: int, ratio: float):
    """Brute force, straight from the paper: try every tau, then top up entry by entry."""
    names = list(scores)
    entries = sorted(((float(v), j, i) for j, h in enumerate(names) for i, v in enumerate(scores[h].reshape(-1))),
                     key=lambda e: -e[0])
    cost = [r * sum(scores[h].shape) for h in names]
    thr = [c / ratio for c in cost]

    def total(cnt):
        return sum(cost[j] if cnt[j] >= thr[j] else cnt[j] for j in range(len(names)))

    best = 0
    for tau in range(len(entries) + 1):
        cnt = [0] * len(names)
        for _, j, _ in entries[:tau]:
            cnt[j] += 1
        if total(cnt) <= budget:
            best = tau
    cnt = [0] * len(names)
    for _, j, _ in entries[:best]:
        cnt[j] += 1
    structured = [cnt[j] >= thr[j] for j in range(len(names))]
    slack = budget - total(cnt)
    chosen = [(j, i) for _, j, i in entries[:best] if not structured[j]]
    for _, j, i in entries[best:]:
        if slack == 0:
            break
        if not structured[j] and cnt[j] + 1 < thr[j]:
            chosen.append((j, i))
            cnt[j] += 1
            slack -= 1
    lora = [names[j] for j in range(len(names)) if structured[j]]
    sparse = {names[j]: sorted(i for jj, i in chosen if jj == j) for j in range(len(names)) if not structured[j]}
    return lora, sparse, budget - slack


def test_allocation_matches_brute_force_and_hits_the_budget_exactly():
    g = torch.Generator().manual_seed(0)
    shapes = {"a": (6, 5), "b": (4, 4), "c": (8, 3), "d": (5, 7)}
    hit_both = False
    for trial in range(6):
        # skewed scores so that some matrices collect many sensitive entries
        scores = {h: torch.rand(s, generator=g) * (1 + 4 * (k == trial % 4)) for k, (h, s) in enumerate(shapes.items())}
        for budget in (3, 9, 17, 30, 55, 90):
            a = spt_allocate(scores, budget, r=1, threshold_ratio=2.0)
            lora, sparse, total = _reference_allocation(scores, budget, r=1, ratio=2.0)
            assert a.lora == lora, (trial, budget)
            assert {h: t.tolist() for h, t in a.indices.items()} == sparse, (trial, budget)
            assert a.total == total <= budget
            hit_both |= bool(a.lora) and any(t.numel() for t in a.indices.values())
    assert hit_both
    # where the unstructured matrices have room for the slack, the budget is met exactly
    scores = {h: torch.rand(20, 20, generator=g) * (1 + 3 * (h == "b")) for h in "abcd"}  # thr 40, LoRA cost 80
    for budget in range(1, 200, 7):
        a = spt_allocate(scores, budget, r=2, threshold_ratio=2.0)
        assert a.total == budget, budget
        assert all(t.numel() < 40 for t in a.indices.values())
    assert a.lora == ["b"]
    # a budget beyond everything the targets can take: all matrices structured, total below it
    a = spt_allocate({"a": torch.rand(3, 3)}, 1000, r=1)
    assert a.lora == ["a"] and a.total == 6


def test_vit_budget_lora_and_sparse_pieces_forward_matches_reference():
    model = tiny_vit()
    budget = 2500
    cfg = prepare_spt(model, SPTConfig(budget=budget, r=R, lora_alpha=4.0, threshold_ratio=4.0), _batches())
    assert cfg.lora_modules and cfg.sizes  # both granularities are used here
    ak.add_adapter(model, "spt", cfg)
    rec = get_record(model, "spt")
    hosts = _linears(model)
    lora_cost = {h: R * (m.in_features + m.out_features) for h, m in hosts.items()}
    # closed form: sum of sparse entries + r (in + out) per LoRA matrix == the budget exactly
    assert sum(k for _, k in cfg.sizes) + sum(lora_cost[h] for h in cfg.lora_modules) == budget
    assert ak.trainable_parameters(model, "spt") == budget == ak.trainable_parameters(model)
    for h, p in rec.pieces.items():
        if h in cfg.lora_modules:
            assert type(p).__name__ == "LoRALinear" and p.lora_A.shape == (R, hosts[h].in_features)
        else:  # sparse matrices stay below the threshold r (in + out) / ratio
            assert p.spt_indices.numel() < lora_cost[h] / 4.0
    randomize_adapters(model, std=0.1)
    x = _batches(1)[0]["pixel_values"]
    ref = tiny_vit()
    rmods = dict(ref.named_modules())
    with torch.no_grad():
        for h, p in rec.pieces.items():
            W = rmods[h].weight
            if h in cfg.lora_modules:
                W += (4.0 / R) * p.lora_B @ p.lora_A  # s = lora_alpha / r
            else:
                W.view(-1)[p.spt_indices] += p.spt_values
        assert (model(pixel_values=x).logits - ref(pixel_values=x).logits).abs().max() < 1e-5


def test_train_merge_save_load(tmp_path):
    model = tiny_vit()
    cfg = prepare_spt(model, SPTConfig(budget=2500, r=R, threshold_ratio=4.0), _batches())
    ak.add_adapter(model, "spt", cfg)
    randomize_adapters(model, std=0.1)
    model.train()
    model(**_batches(1)[0]).loss.backward()
    for n, t in model.named_parameters():
        assert (t.grad is not None) == (".adapterkit.spt." in n), n
    model.eval()
    x = _batches(1)[0]["pixel_values"]
    base = base_weights(model)
    with torch.no_grad():
        want = model(pixel_values=x).logits
        ak.merge(model, "spt")
        assert (model(pixel_values=x).logits - want).abs().max() < 1e-5
        ak.unmerge(model, "spt")
    assert_base_restored(model, base, atol=1e-6)
    ak.save_adapter(model, "spt", tmp_path / "spt")
    t = load_file(tmp_path / "spt" / "adapter.safetensors")
    assert {k.rsplit(".", 1)[1] for k in t} <= {"spt_indices", "spt_values", "lora_A", "lora_B"}
    conf = json.loads((tmp_path / "spt" / "adapter_config.json").read_text())["config"]
    assert conf["lora_modules"] == list(cfg.lora_modules)
    fresh = tiny_vit()
    ak.load_adapter(fresh, tmp_path / "spt", trainable=True)
    with torch.no_grad():
        assert (fresh(pixel_values=x).logits - want).abs().max() < 1e-5
    assert ak.trainable_parameters(fresh, "spt") == 2500


def test_config_errors():
    with pytest.raises(ConfigError, match="budget"):
        SPTConfig(budget=0)
    with pytest.raises(ConfigError, match="criterion"):
        SPTConfig(criterion="fisher")
    with pytest.raises(ConfigError, match="threshold_ratio"):
        SPTConfig(threshold_ratio=0)
    model = tiny_vit()
    with pytest.raises(ConfigError, match="prepare_spt"):
        ak.add_adapter(model, "s", SPTConfig())
    with pytest.raises(ConfigError, match="no batches"):
        prepare_spt(model, SPTConfig(), [])
    assert ak.list_adapters(model) == []
