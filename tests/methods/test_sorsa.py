"""SORSA against the paper: W = W_r + U_p diag(S_p) V_p^T and its orthonormal regularizer."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

import adapterkit as ak
from adapterkit.api import get_record, regularization_loss
from adapterkit.errors import ConfigError
from adapterkit.methods.sorsa import SORSAConfig
from conftest import tiny_gpt2, tiny_llama


def linear(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 10))


def test_forward_is_residual_plus_trainable_principal_part():
    m = linear()
    W, b = m[0].weight.detach().clone(), m[0].bias.detach().clone()
    x = torch.randn(5, 12)
    ak.add_adapter(m, "s", SORSAConfig(r=3, targets=["0"]))
    p = get_record(m, "s").pieces["0"]
    U, S, Vh = torch.linalg.svd(W)
    W_r = U[:, 3:10] @ torch.diag(S[3:]) @ Vh[3:10]  # frozen residual: the other singular triplets
    # initial principal part = top-3 triplets, the adapter starts as the identity
    assert torch.allclose(p.sorsa_S, S[:3], atol=1e-5)
    assert torch.allclose((p.sorsa_U * p.sorsa_S) @ p.sorsa_Vh, W - W_r, atol=1e-5)
    assert torch.allclose(m(x), F.linear(x, W, b), atol=1e-5)
    with torch.no_grad():
        for t in (p.sorsa_U, p.sorsa_S, p.sorsa_Vh):
            t.add_(torch.randn_like(t) * 0.1)
    Wp = p.sorsa_U @ torch.diag(p.sorsa_S) @ p.sorsa_Vh
    assert torch.allclose(m(x), F.linear(x, W_r + Wp, b), atol=1e-5)
    assert torch.allclose(p.delta_weight(), W_r + Wp - W, atol=1e-5)


def test_regularizer_value_and_it_drives_vectors_to_orthonormal():
    m = linear(1)
    ak.add_adapter(m, "s", SORSAConfig(r=4, gamma=0.5, targets=["0"]))
    p = get_record(m, "s").pieces["0"]
    assert regularization_loss(m).item() < 1e-8  # singular vectors start orthonormal
    torch.manual_seed(0)
    with torch.no_grad():
        p.sorsa_U.add_(torch.randn_like(p.sorsa_U) * 0.3)
        p.sorsa_Vh.add_(torch.randn_like(p.sorsa_Vh) * 0.3)
    U, Vh, I = p.sorsa_U.detach(), p.sorsa_Vh.detach(), torch.eye(4)
    want = 0.5 * (torch.linalg.matrix_norm(U.T @ U - I) ** 2 + torch.linalg.matrix_norm(Vh @ Vh.T - I) ** 2)
    start = regularization_loss(m)
    assert torch.allclose(start, want, rtol=1e-5) and start.item() > 0.05
    opt = torch.optim.Adam([p.sorsa_U, p.sorsa_Vh], lr=0.01)
    for _ in range(300):
        opt.zero_grad()
        regularization_loss(m).backward()
        opt.step()
    U, Vh = p.sorsa_U.detach(), p.sorsa_Vh.detach()
    assert (U.T @ U - I).abs().max() < 2e-3 and (Vh @ Vh.T - I).abs().max() < 2e-3
    assert SORSAConfig(gamma=0).gamma == 0


def test_count_gradients_and_regularization_sum_over_targets():
    model = tiny_llama()
    ak.add_adapter(model, "s", SORSAConfig(r=4, targets=["q_proj", "v_proj"]))
    # q_proj (64 -> 64), v_proj (64 -> 32), 2 layers: r (out + in + 1) each
    assert ak.trainable_parameters(model, "s") == 2 * (4 * (64 + 64 + 1) + 4 * (32 + 64 + 1))
    rec = get_record(model, "s")
    for p in rec.pieces.values():
        with torch.no_grad():
            p.sorsa_U.mul_(1.1)
    total = sum(p.regularization() for p in rec.pieces.values())
    assert torch.allclose(regularization_loss(model, "s"), total)
    model.train()
    (model(torch.randint(0, 128, (2, 5))).logits.sum() + regularization_loss(model)).backward()
    for n, t in model.named_parameters():
        assert (t.grad is not None) == (".adapterkit.s." in n), n


def test_merge_save_load(tmp_path):
    model = tiny_gpt2()  # Conv1D hosts
    ids = torch.randint(0, 128, (2, 6))
    ak.add_adapter(model, "s", SORSAConfig(r=4, targets=["c_attn"]))
    with torch.no_grad():
        for n, t in model.named_parameters():
            if ".adapterkit." in n:
                t.add_(torch.randn_like(t) * 0.02)
        want = model(ids).logits
        ak.merge(model, "s")
        assert (model(ids).logits - want).abs().max() < 1e-4
        ak.unmerge(model, "s")
    ak.save_adapter(model, "s", tmp_path / "s")
    assert sorted({k.rsplit(".", 1)[1] for k in load_file(tmp_path / "s" / "adapter.safetensors")}) == [
        "sorsa_S", "sorsa_U", "sorsa_Vh"]
    fresh = tiny_gpt2()
    ak.load_adapter(fresh, tmp_path / "s")
    with torch.no_grad():
        assert (fresh(ids).logits - want).abs().max() < 1e-4


def test_errors():
    with pytest.raises(ConfigError, match="gamma"):
        SORSAConfig(gamma=-1)
    with pytest.raises(ConfigError, match="r=20 exceeds"):
        ak.add_adapter(linear(), "s", SORSAConfig(r=20, targets=["0"]))
