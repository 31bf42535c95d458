"""DyLoRA: nested ranks y = W x + (alpha/b) B[:, :b] A[:b] x, trained over a range of b."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import adapterkit as ak
from adapterkit.api import get_record
from adapterkit.errors import AdapterError, ConfigError
from adapterkit.methods.dylora import DyLoRAConfig, truncate_dylora
from conftest import randomize_adapters, tiny_llama


def linear(seed: int = 0, d_in: int = 10, d_out: int = 6) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, d_out)).eval()


def test_eval_forward_at_any_rank_matches_formula_and_merge():
    m = linear()
    x = torch.randn(3, 10)
    ak.add_adapter(m, "d", DyLoRAConfig(r=4, alpha=8, targets=["0"]))
    randomize_adapters(m, std=0.3)
    p = get_record(m, "d").pieces["0"]
    W, bias = m[0].weight, m[0].bias
    for b in (4, 3, 1):
        truncate_dylora(m, "d", b)
        want = F.linear(x, W, bias) + (8 / b) * x @ p.lora_A[:b].T @ p.lora_B[:, :b].T
        assert torch.allclose(m(x), want, atol=1e-5), b
        assert get_record(m, "d").config.eval_rank == b
    w0 = W.detach().clone()
    with torch.no_grad():
        ak.merge(m, "d")
        assert torch.allclose(m(x), want, atol=1e-5)
        with pytest.raises(AdapterError, match="unmerge"):
            truncate_dylora(m, "d", 2)
        ak.unmerge(m, "d")
    assert torch.allclose(W, w0, atol=1e-6)


def test_training_samples_ranks_in_range_and_last_mode_trains_only_bth_component():
    m = linear(1)
    ak.add_adapter(m, "d", DyLoRAConfig(r=6, r_min=2, alpha=6, targets=["0"]))
    randomize_adapters(m, std=0.3)
    p = get_record(m, "d").pieces["0"]
    m.train()
    seen = set()
    x = torch.randn(4, 10)
    for _ in range(60):
        p.lora_A.grad = p.lora_B.grad = None
        y = m(x)
        b = p.last_rank
        seen.add(b)
        y.pow(2).sum().backward()
        # reference: the b-th component is the only one with a gradient; its value matches autograd
        A, B = p.lora_A.detach().clone(), p.lora_B.detach().clone()
        a_b, b_b = A[b - 1].clone().requires_grad_(), B[:, b - 1].clone().requires_grad_()
        Ar = torch.cat([A[:b - 1], a_b[None]], 0)
        Br = torch.cat([B[:, :b - 1], b_b[:, None]], 1)
        (F.linear(x, m[0].weight, m[0].bias) + (6 / b) * x @ Ar.T @ Br.T).pow(2).sum().backward()
        assert torch.allclose(p.lora_A.grad[b - 1], a_b.grad, atol=1e-4)
        assert torch.allclose(p.lora_B.grad[:, b - 1], b_b.grad, atol=1e-4)
        others = [i for i in range(6) if i != b - 1]
        assert p.lora_A.grad[others].abs().sum() == 0 and p.lora_B.grad[:, others].abs().sum() == 0
    assert seen == {2, 3, 4, 5, 6}
    m.eval()
    m(x)
    assert p.last_rank == 6


def test_update_all_trains_the_first_b_components():
    m = linear(2)
    ak.add_adapter(m, "d", DyLoRAConfig(r=5, update="all", targets=["0"]))
    randomize_adapters(m, std=0.3)
    p = get_record(m, "d").pieces["0"]
    m.train()
    m(torch.randn(4, 10)).sum().backward()
    b = p.last_rank
    assert (p.lora_A.grad[:b].abs().sum(1) > 0).all() and p.lora_A.grad[b:].abs().sum() == 0


def test_truncated_ranks_keep_working_unlike_truncated_lora():
    """The paper's claim on a toy regression: after training, every rank <= r_max works and is far
    better than a LoRA of rank r_max truncated the same way (first b components)."""
    d = 32
    g = torch.Generator().manual_seed(0)
    W0 = torch.randn(d, d, generator=g) / d ** 0.5
    U, _ = torch.linalg.qr(torch.randn(d, d, generator=g))
    V, _ = torch.linalg.qr(torch.randn(d, d, generator=g))
    s = torch.tensor([3, 2.2, 1.6, 1.2, 0.9, 0.6, 0.4, 0.25])
    X = torch.randn(512, d, generator=g)
    Y = X @ (W0 + U[:, :8] * s @ V[:, :8].T).T  # a rank-8 change with decaying spectrum to learn
    best = {b: (s[b:] ** 2).sum().item() / d for b in (1, 2, 4, 8)}  # optimal rank-b loss (Eckart-Young)

    def train(r_min: int, update: str) -> dict[int, float]:
        torch.manual_seed(1)
        m = nn.Sequential(nn.Linear(d, d, bias=False))
        with torch.no_grad():
            m[0].weight.copy_(W0)
        ak.add_adapter(m, "a", DyLoRAConfig(r=8, r_min=r_min, alpha=8, update=update, targets=["0"]))
        opt = torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=0.01)
        m.train()
        for _ in range(400):
            idx = torch.randint(0, 512, (64,))
            loss = F.mse_loss(m(X[idx]), Y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        m.eval()
        out = {}
        for b in (1, 2, 4, 8):
            truncate_dylora(m, "a", b)
            with torch.no_grad():
                out[b] = F.mse_loss(m(X), Y).item()
        return out

    dy, lora = train(1, "last"), train(8, "all")  # r_min = r_max = 8, all trained: a plain rank-8 LoRA
    assert lora[8] < 1e-3 and dy[8] < 0.15
    for b in (1, 2, 4):
        assert dy[b] < 0.6 * lora[b], (b, dy, lora)
        assert dy[b] < best[b] + 0.15, (b, dy, best)  # close to the best any rank-b update can do
    assert dy[1] > dy[2] > dy[4] > dy[8]


def test_count_save_load_keeps_eval_rank(tmp_path):
    model = tiny_llama()
    ak.add_adapter(model, "d", DyLoRAConfig(r=6))
    assert ak.trainable_parameters(model, "d") == 6 * 2 * ((64 + 64) + (64 + 32))
    randomize_adapters(model, std=0.05)
    truncate_dylora(model, "d", 3)
    ids = torch.randint(0, 128, (2, 5))
    with torch.no_grad():
        want = model(ids).logits
    ak.save_adapter(model, "d", tmp_path / "d")
    assert json.loads((tmp_path / "d" / "adapter_config.json").read_text())["config"]["eval_rank"] == 3
    fresh = tiny_llama()
    ak.load_adapter(fresh, tmp_path / "d")
    with torch.no_grad():
        assert (fresh(ids).logits - want).abs().max() < 1e-5
        truncate_dylora(fresh, "d", 6)
        assert (fresh(ids).logits - want).abs().max() > 1e-4


def test_errors():
    with pytest.raises(ConfigError, match="r_min"):
        DyLoRAConfig(r=4, r_min=5)
    with pytest.raises(ConfigError, match="eval_rank"):
        DyLoRAConfig(r=4, eval_rank=5)
    with pytest.raises(ConfigError, match="update"):
        DyLoRAConfig(update="some")
    m = linear()
    ak.add_adapter(m, "d", DyLoRAConfig(r=4, targets=["0"]))
    with pytest.raises(ConfigError, match=r"\[1, 4\]"):
        truncate_dylora(m, "d", 5)
    ak.add_adapter(m, "l", ak.LoRAConfig(r=2, targets=["0"]))
    with pytest.raises(ConfigError, match="not dylora"):
        truncate_dylora(m, "l", 1)
