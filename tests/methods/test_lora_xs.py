"""LoRA-XS against its formula y = W x + b + s U_r S_r R V_r^T x (truncated SVD of W)."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

import adapterkit as ak
from adapterkit.api import get_record
from adapterkit.errors import ConfigError
from adapterkit.methods.lora_xs import LoRAXSConfig
from _method_checks import assert_merge_round_trip, assert_mixed_batch_rows_match, assert_rank_and_embedding_errors
from conftest import randomize_adapters, tiny_gpt2, tiny_llama


def test_projections_are_the_truncated_svd_and_forward_matches_formula():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(12, 10))
    x = torch.randn(4, 12)
    W, b = m[0].weight.detach().clone(), m[0].bias.detach().clone()
    ak.add_adapter(m, "xs", LoRAXSConfig(r=3, alpha=6, targets=["0"]))
    p = get_record(m, "xs").pieces["0"]
    U, S, Vh = torch.linalg.svd(W)
    # B A is the best rank-3 approximation of W (sign-free check), A orthonormal rows, B = U_r S_r
    assert torch.allclose(p.lora_B @ p.lora_A, U[:, :3] @ torch.diag(S[:3]) @ Vh[:3], atol=1e-5)
    assert torch.allclose(p.lora_A @ p.lora_A.T, torch.eye(3), atol=1e-5)
    assert torch.allclose(p.lora_B.norm(dim=0), S[:3], atol=1e-5)
    assert torch.allclose(m(x), F.linear(x, W, b), atol=1e-6)  # R = 0: identity
    randomize_adapters(m, std=0.3)
    R = p.lora_R.detach()
    want = F.linear(x, W, b) + 2.0 * x @ (p.lora_B @ R @ p.lora_A).T  # s = 6 / 3
    assert torch.allclose(m(x), want, atol=1e-5)


def test_conv1d_host_and_merge_roundtrip():
    model = tiny_gpt2()
    ids = torch.randint(0, 128, (2, 6))
    ak.add_adapter(model, "xs", LoRAXSConfig(r=4, targets=["c_attn", "c_fc"]))
    randomize_adapters(model, std=0.05)
    p = get_record(model, "xs").pieces["transformer.h.0.attn.c_attn"]
    W = model.transformer.h[0].attn.c_attn.weight.T  # (out, in)
    U, S, Vh = torch.linalg.svd(W.detach())
    assert torch.allclose(p.lora_B @ p.lora_A, U[:, :4] * S[:4] @ Vh[:4], atol=1e-4)
    assert_merge_round_trip(model, "xs", ids, restore_atol=1e-6)


def test_trainable_count_is_r_squared_per_target_and_only_R_gets_gradients():
    model = tiny_llama()
    ak.add_adapter(model, "xs", LoRAXSConfig(r=5))  # default targets: q_proj, v_proj in 2 layers
    assert ak.trainable_parameters(model, "xs") == 4 * 5 ** 2
    assert ak.trainable_parameters(model) == 4 * 5 ** 2
    model.train()
    model(torch.randint(0, 128, (2, 5))).logits.sum().backward()
    for n, t in model.named_parameters():
        assert (t.grad is not None) == n.endswith("lora_R"), n


def test_save_holds_only_R_and_load_recomputes_projections(tmp_path):
    model = tiny_llama()
    ids = torch.randint(0, 128, (2, 5))
    ak.add_adapter(model, "xs", LoRAXSConfig(r=4, alpha=8, targets=["q_proj", "o_proj"]))
    randomize_adapters(model, std=0.2)
    with torch.no_grad():
        want = model(ids).logits
    ak.save_adapter(model, "xs", tmp_path / "xs")
    keys = load_file(tmp_path / "xs" / "adapter.safetensors")
    assert keys and all(k.endswith("lora_R") and v.shape == (4, 4) for k, v in keys.items())
    assert json.loads((tmp_path / "xs" / "adapter_config.json").read_text())["method"] == "lora_xs"
    fresh = tiny_llama()
    ak.load_adapter(fresh, tmp_path / "xs")
    with torch.no_grad():
        assert (fresh(ids).logits - want).abs().max() < 1e-5


def test_mixed_batch_rows_match_single_runs():
    model = tiny_llama()
    ak.add_adapter(model, "a", LoRAXSConfig(r=3))
    ak.add_adapter(model, "b", LoRAXSConfig(r=2, targets=["k_proj"]))
    randomize_adapters(model, std=0.3)
    ids = torch.randint(0, 128, (3, 5))
    names = ["a", None, "b"]
    with torch.no_grad():
        assert_mixed_batch_rows_match(model, ids, names)


def test_config_and_target_errors():
    with pytest.raises(ConfigError, match="r must be"):
        LoRAXSConfig(r=0)
    with pytest.raises(ConfigError, match="alpha"):
        LoRAXSConfig(alpha=-1.0)
    assert_rank_and_embedding_errors(LoRAXSConfig, too_big_r=4, match="r=4 exceeds")
