"""MoLA: per-token top-k routing over per-layer LoRA experts, against a naive token loop."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import adapterkit as ak
from adapterkit.api import get_record, regularization_loss
from adapterkit.errors import ConfigError, NotMergeableError
from adapterkit.methods.mola import MoLAConfig
from conftest import randomize_adapters, tiny_llama


class Stack(nn.Module):
    """``layers.<i>.lin``: a stack of Linear layers, like a transformer's numbered blocks."""

    def __init__(self, n: int = 4, d: int = 8) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.ModuleDict({"lin": nn.Linear(d, d)}) for _ in range(n))
        self.head = nn.Linear(d, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.layers:
            x = torch.tanh(blk["lin"](x))
        return self.head(x)


def stack(n: int = 4, seed: int = 0) -> Stack:
    torch.manual_seed(seed)
    return Stack(n).eval()


def naive_mola(x: torch.Tensor, W, b, A, B, G, k: int, s: float) -> torch.Tensor:
    """Token by token: softmax router, top-k, renormalised weights, weighted sum of expert LoRAs."""
    out = torch.empty(x.shape[0], W.shape[0])
    for n in range(x.shape[0]):
        xn = x[n]
        p = torch.softmax(G @ xn, dim=0)
        top = sorted(range(len(p)), key=lambda e: -p[e].item())[:k]
        z = sum(p[e] for e in top)
        y = W @ xn + b
        for e in top:
            y = y + s * (p[e] / z) * (B[e] @ (A[e] @ xn))
        out[n] = y
    return out


def test_routing_matches_naive_token_loop():
    m = stack()
    ak.add_adapter(m, "mo", MoLAConfig(r=2, alpha=4, experts_per_layer="2,4,6,8", top_k=2, targets=["lin"]))
    randomize_adapters(m, std=0.5)
    lin = m.layers[3]["lin"]
    p = get_record(m, "mo").pieces["layers.3.lin"]
    x = torch.randn(2, 5, 8)
    got = lin(x).reshape(-1, 8)
    want = naive_mola(x.reshape(-1, 8), lin.weight, lin.bias, p.lora_A, p.lora_B, p.router, 2, 2.0)
    assert torch.allclose(got, want, atol=1e-5)
    # gradients of the sparse dispatch match the naive loop's (experts and router)
    params = (p.lora_A, p.lora_B, p.router)
    g_got = torch.autograd.grad(got.pow(2).sum(), params)
    g_want = torch.autograd.grad(want.pow(2).sum(), params)
    for a, b in zip(g_got, g_want):
        assert torch.allclose(a, b, atol=1e-4)
    # top_k larger than a layer's expert count uses them all; k=1 picks the argmax expert with weight 1
    p0 = get_record(m, "mo").pieces["layers.0.lin"]
    assert p0.num_experts == 2
    ak.add_adapter(m, "k1", MoLAConfig(r=2, experts_per_layer="3,3,3,3", top_k=1, targets=["lin"]))
    randomize_adapters(m, std=0.5, seed=3)
    ak.set_adapter(m, "k1")
    q = get_record(m, "k1").pieces["layers.1.lin"]
    lin1, x1 = m.layers[1]["lin"], torch.randn(6, 8)
    want = naive_mola(x1, lin1.weight, lin1.bias, q.lora_A, q.lora_B, q.router, 1, 8.0)
    assert torch.allclose(lin1(x1), want, atol=1e-5)


@pytest.mark.parametrize("schedule,layers,want", [
    ("2,4,6,8", 4, [2, 4, 6, 8]),
    ("triangle", 4, [8, 6, 4, 2]),
    ("inverted-triangle", 8, [2, 2, 4, 4, 6, 6, 8, 8]),
    ("hourglass", 4, [8, 2, 2, 8]),
    ("uniform", 3, [3, 3, 3]),
    ((1, 2, 3), 3, [1, 2, 3]),
])
def test_expert_count_per_layer_follows_schedule_and_count_closed_form(schedule, layers, want):
    m = stack(layers)
    cfg = MoLAConfig(r=2, experts_per_layer=schedule, num_experts=3, targets=["lin"])
    ak.add_adapter(m, "mo", cfg)
    rec = get_record(m, "mo")
    assert [rec.pieces[f"layers.{i}.lin"].num_experts for i in range(layers)] == want
    d, r = 8, 2
    assert ak.trainable_parameters(m, "mo") == sum(E * (r * (d + d)) + E * d for E in want)  # + router E x in


def test_load_balancing_loss_matches_switch_formula_and_trains_router():
    m = stack()
    ak.add_adapter(m, "mo", MoLAConfig(r=2, experts_per_layer="4,4,4,4", top_k=2, aux_loss_weight=0.1,
                                       targets=["lin"]))
    randomize_adapters(m, std=0.5)
    assert regularization_loss(m) is None  # nothing ran yet
    m.train()
    x = torch.randn(16, 8)
    m(x)
    total = regularization_loss(m)
    # layer 0's term from its own input x
    p = get_record(m, "mo").pieces["layers.0.lin"]
    probs = torch.softmax(x @ p.router.T, -1)
    top = probs.topk(2, -1).indices
    f = torch.stack([(top == e).float().sum() for e in range(4)]) / top.shape[0]  # share of tokens using e
    assert torch.allclose(p.regularization(), 0.1 * 4 * (f * probs.mean(0)).sum(), atol=1e-6)
    assert torch.allclose(total, sum(q.regularization() for q in get_record(m, "mo").pieces.values()))
    total.backward()
    assert p.router.grad is not None and p.router.grad.abs().sum() > 0


def test_llama_mixed_batch_save_load_and_not_mergeable(tmp_path):
    model = tiny_llama()
    ak.add_adapter(model, "mo", MoLAConfig(r=2, experts_per_layer=[1, 3], targets=["q_proj", "up_proj"]))
    randomize_adapters(model, std=0.1)
    rec = get_record(model, "mo")
    assert rec.pieces["model.layers.0.self_attn.q_proj"].num_experts == 1
    assert rec.pieces["model.layers.1.mlp.up_proj"].num_experts == 3
    assert ak.trainable_parameters(model, "mo") == (1 + 3) * (2 * (64 + 64) + 64) + (1 + 3) * (2 * (64 + 128) + 64)
    with pytest.raises(NotMergeableError):
        ak.merge(model, "mo")
    ids = torch.randint(0, 128, (2, 6))
    with torch.no_grad():
        want = model(ids).logits
        with ak.adapter_batch(model, [None, "mo"]):
            mixed = model(ids).logits
    assert (mixed[1] - want[1]).abs().max() < 1e-5
    ak.save_adapter(model, "mo", tmp_path / "mo")
    fresh = tiny_llama()
    rec2 = ak.load_adapter(fresh, tmp_path / "mo")
    assert rec2.config.experts_per_layer == (1, 3)
    with torch.no_grad():
        assert (fresh(ids).logits - want).abs().max() < 1e-5
    model.train()
    model(ids).logits.sum().backward()
    for n, t in model.named_parameters():
        assert (t.grad is not None) == (".adapterkit.mo." in n), n


def test_errors():
    with pytest.raises(ConfigError, match="comma list"):
        MoLAConfig(experts_per_layer="pyramid")
    with pytest.raises(ConfigError, match="positive"):
        MoLAConfig(experts_per_layer=(2, 0))
    with pytest.raises(ConfigError, match="only 2 layers"):
        ak.add_adapter(stack(2), "mo", MoLAConfig(experts_per_layer="triangle", targets=["lin"]))
    with pytest.raises(ConfigError, match="'head'"):
        ak.add_adapter(stack(2), "mo", MoLAConfig(targets=["head"]))
