"""LoRA-SB: B R A initialised from the SVD of the first full-fine-tuning step -lr * grad."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import adapterkit as ak
from adapterkit.api import get_record
from adapterkit.errors import ConfigError
from adapterkit.methods.lora_xs import LoRASBConfig, prepare_lora_sb
from conftest import tiny_llama


def regression_task(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(16, 12))
    with torch.no_grad():
        model[0].weight.copy_(torch.randn(12, 16, generator=g) * 0.3)
    target = torch.randn(12, 16, generator=g) * 0.3
    batches = []
    for _ in range(3):
        x = torch.randn(32, 16, generator=g)
        batches.append((x, x @ target.T))
    return model, batches


def mse(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return F.mse_loss(model(x), y)


@pytest.mark.parametrize("update,lr", [("sgd", 0.5), ("adam", 0.02)])
def test_init_is_best_rank_r_approximation_of_first_step(update, lr):
    model, batches = regression_task()
    r = 3
    W = model[0].weight
    grads = torch.stack([torch.autograd.grad(mse(model, b), W)[0] for b in batches]).mean(0)
    step = -lr * (grads if update == "sgd" else torch.sign(grads))  # the first full-FT SGD / Adam step
    U, S, Vh = torch.linalg.svd(step)
    cfg = LoRASBConfig(r=r, alpha=6.0, init_lr=lr, init_update=update, targets=["0"])
    assert prepare_lora_sb(model, cfg, batches, loss_fn=mse) is cfg
    assert W.requires_grad  # flags restored (add_adapter freezes the base later)
    ak.add_adapter(model, "sb", cfg)
    p = get_record(model, "sb").pieces["0"]
    assert torch.allclose(p.scaling * p.lora_B @ p.lora_R @ p.lora_A, U[:, :r] * S[:r] @ Vh[:r], atol=1e-5)
    assert torch.allclose(p.lora_A @ p.lora_A.T, torch.eye(r), atol=1e-5)  # orthonormal projections
    assert torch.allclose(p.lora_B.T @ p.lora_B, torch.eye(r), atol=1e-5)
    assert torch.allclose(torch.diag(p.lora_R) * p.scaling, S[:r], atol=1e-6)
    assert ak.trainable_parameters(model, "sb") == r * r
    # the adapter starts one (approximate) full-FT step ahead: the loss went down
    ak.set_adapter(model, None)
    with torch.no_grad():
        before = sum(mse(model, b) for b in batches)
    ak.set_adapter(model, "sb")
    with torch.no_grad():
        after = sum(mse(model, b) for b in batches)
    assert after < before


def test_training_the_core_keeps_lowering_the_loss():
    model, batches = regression_task(1)
    cfg = LoRASBConfig(r=4, init_lr=0.3, init_update="sgd", targets=["0"])
    ak.add_adapter(model, "sb", prepare_lora_sb(model, cfg, batches, loss_fn=mse))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.3)
    first = None
    for _ in range(30):
        loss = sum(mse(model, b) for b in batches)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.7 * first


def test_lm_batches_save_and_load_without_data(tmp_path):
    model = tiny_llama()
    ids = torch.randint(0, 128, (2, 7))
    cfg = LoRASBConfig(r=4, init_lr=0.05)
    with pytest.raises(ConfigError, match="prepare_lora_sb"):
        ak.add_adapter(model, "sb", cfg)
    prepare_lora_sb(model, cfg, [ids, {"input_ids": ids[:1]}])
    ak.add_adapter(model, "sb", cfg)
    with torch.no_grad():
        want = model(ids).logits
    ak.save_adapter(model, "sb", tmp_path / "sb")
    fresh = tiny_llama()
    rec = ak.load_adapter(fresh, tmp_path / "sb")
    assert rec.config.init_from == "file"
    with torch.no_grad():
        assert (fresh(ids).logits - want).abs().max() < 1e-5
    with torch.no_grad():  # merge is exact too
        ak.merge(fresh, "sb")
        assert (fresh(ids).logits - want).abs().max() < 1e-4


def test_errors():
    with pytest.raises(ConfigError, match="init_lr"):
        LoRASBConfig(init_lr=-1.0)
    with pytest.raises(ConfigError, match="init_update"):
        LoRASBConfig(init_update="lion")
    with pytest.raises(ConfigError, match="init_from"):
        LoRASBConfig(init_from="data")
    model, batches = regression_task()
    with pytest.raises(ConfigError, match="no batches"):
        prepare_lora_sb(model, LoRASBConfig(r=2, targets=["0"]), [], loss_fn=mse)


def test_conv1d_gradient_is_taken_in_out_in_layout():
    from conftest import tiny_gpt2

    model = tiny_gpt2()
    ids = torch.randint(0, 128, (2, 6))
    host = model.transformer.h[0].attn.c_attn  # Conv1D: weight (in=64, out=192)
    g = torch.autograd.grad(model(ids, labels=ids).loss, host.weight)[0].T  # (out, in)
    U, S, Vh = torch.linalg.svd(-0.1 * g)
    cfg = LoRASBConfig(r=3, init_lr=0.1, init_update="sgd", targets=["c_attn"])
    ak.add_adapter(model, "sb", prepare_lora_sb(model, cfg, [ids]))
    p = get_record(model, "sb").pieces["transformer.h.0.attn.c_attn"]
    assert p.lora_A.shape == (3, 64) and p.lora_B.shape == (192, 3)
    assert torch.allclose(p.lora_B @ p.lora_R @ p.lora_A, U[:, :3] * S[:3] @ Vh[:3], atol=1e-5)
