"""Hydra against the paper: y = W x + b + s (B1 A1 x + B2 A2 W x)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import adapterkit as ak
from adapterkit.api import get_record
from adapterkit.errors import ConfigError
from adapterkit.methods.hydra import HydraConfig
from _method_checks import assert_base_restored, assert_merge_round_trip
from conftest import randomize_adapters, tiny_gpt2, tiny_llama


def hydra_ref(x, W, b, A1, B1, A2, B2, s):
    """The paper's two branches, written out: parallel on x, sequential on the layer's output W x + b."""
    h = x @ W.T + b
    return h + s * (x @ A1.T @ B1.T + h @ A2.T @ B2.T)


def test_forward_matches_formula_and_starts_as_identity():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(12, 10))
    x = torch.randn(4, 3, 12)
    y0 = m(x)
    ak.add_adapter(m, "h", HydraConfig(r=3, r_seq=2, alpha=6, targets=["0"]))
    assert torch.allclose(m(x), y0, atol=1e-6)
    randomize_adapters(m, std=0.2)
    p = get_record(m, "h").pieces["0"]
    assert p.par_A.shape == (3, 12) and p.par_B.shape == (10, 3) and p.seq_A.shape == (2, 10) and p.seq_B.shape == (10, 2)
    want = hydra_ref(x, m[0].weight, m[0].bias, p.par_A, p.par_B, p.seq_A, p.seq_B, 2.0)
    assert torch.allclose(m(x), want, atol=1e-5)
    # delta_weight = s (B1 A1 + B2 A2 W); merging also moves the bias by s B2 A2 b
    dw = 2.0 * (p.par_B @ p.par_A + p.seq_B @ p.seq_A @ m[0].weight)
    assert torch.allclose(p.delta_weight(), dw, atol=1e-6)
    W0, b0 = m[0].weight.detach().clone(), m[0].bias.detach().clone()
    with torch.no_grad():
        ak.merge(m, "h")
        assert torch.allclose(m[0].weight, W0 + dw, atol=1e-6)
        assert torch.allclose(m[0].bias, b0 + 2.0 * p.seq_B @ p.seq_A @ b0, atol=1e-6)
        assert torch.allclose(m(x), want, atol=1e-5)
        ak.unmerge(m, "h")
    assert torch.equal(m[0].weight, W0) and torch.equal(m[0].bias, b0)


def test_gradients_match_reference_and_stay_on_adapter():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(7, 5))
    ak.add_adapter(m, "h", HydraConfig(r=2, alpha=2, targets=["0"]))
    randomize_adapters(m, std=0.3)
    p = get_record(m, "h").pieces["0"]
    x = torch.randn(6, 7)
    m(x).pow(2).sum().backward()
    ref = [t.detach().clone().requires_grad_() for t in (p.par_A, p.par_B, p.seq_A, p.seq_B)]
    hydra_ref(x, m[0].weight, m[0].bias, *ref, 1.0).pow(2).sum().backward()
    for ours, r in zip((p.par_A, p.par_B, p.seq_A, p.seq_B), ref):
        assert torch.allclose(ours.grad, r.grad, atol=1e-4)
    assert m[0].weight.grad is None


def test_merge_unmerge_exact_and_with_lora_merged_between():
    model = tiny_gpt2()
    ids = torch.randint(0, 128, (2, 6))
    ak.add_adapter(model, "h", HydraConfig(r=2, targets=["c_attn", "c_proj"]))
    ak.add_adapter(model, "l", ak.LoRAConfig(r=2, init="random", targets=["c_attn"]))
    randomize_adapters(model, std=0.05)
    ak.set_adapter(model, "h")
    _, base = assert_merge_round_trip(model, "h", ids)
    ak.set_adapter(model, ["h", "l"])
    ak.merge(model, "h")
    ak.merge(model, "l")
    ak.unmerge(model, "h")  # not the reverse order: takes back only its own change
    ak.unmerge(model, "l")
    assert_base_restored(model, base, atol=1e-6)


def test_trainable_count_closed_form_and_save_load(tmp_path):
    model = tiny_llama()
    ak.add_adapter(model, "h", HydraConfig(r=4, r_seq=2))  # default targets q_proj (64->64), v_proj (64->32)
    per = lambda i, o: 4 * (i + o) + 2 * 2 * o  # noqa: E731
    assert ak.trainable_parameters(model, "h") == 2 * (per(64, 64) + per(64, 32))
    randomize_adapters(model, std=0.05)
    ids = torch.randint(0, 128, (2, 5))
    with torch.no_grad():
        want = model(ids).logits
    ak.save_adapter(model, "h", tmp_path / "h")
    fresh = tiny_llama()
    ak.load_adapter(fresh, tmp_path / "h")
    with torch.no_grad():
        assert (fresh(ids).logits - want).abs().max() < 1e-5
        with ak.adapter_batch(fresh, ["h", None]):
            mixed = fresh(ids).logits
        assert (mixed[0] - want[0]).abs().max() < 1e-5
        ak.set_adapter(fresh, None)
        assert (mixed[1] - fresh(ids[1:]).logits[0]).abs().max() < 1e-5


def test_errors():
    with pytest.raises(ConfigError, match="r_seq"):
        HydraConfig(r_seq=0)
    with pytest.raises(ConfigError, match="dropout"):
        HydraConfig(dropout=1.0)
