"""Bone against a block-by-block reference of the paper's formula, and against PEFT's MiSS (ex-Bone)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import adapterkit as ak
from adapterkit.api import get_record
from adapterkit.errors import ConfigError
from adapterkit.methods.bone import BoneConfig
from conftest import randomize_adapters, tiny_llama


class Two(nn.Module):
    def __init__(self, i: int = 12, o: int = 8) -> None:
        super().__init__()
        self.a = nn.Linear(i, o)
        self.b = nn.Linear(o, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.a(x)))


def two(seed: int = 0, i: int = 12, o: int = 8) -> Two:
    torch.manual_seed(seed)
    return Two(i, o).eval()


def bat_ref(W: torch.Tensor, blocks: torch.Tensor, b: int) -> torch.Tensor:
    """W'[j, i] = W[j, i] + W[j, i] @ B_j + B_j, block by block."""
    out = W.clone()
    for j in range(W.shape[0] // b):
        for i in range(W.shape[1] // b):
            blk = W[j * b:(j + 1) * b, i * b:(i + 1) * b]
            out[j * b:(j + 1) * b, i * b:(i + 1) * b] = blk + blk @ blocks[j] + blocks[j]
    return out


def shared_ref(W: torch.Tensor, block: torch.Tensor, b: int) -> torch.Tensor:
    """Every column block gets B^T added (the last, partial one its first columns)."""
    out = W.clone()
    for c0 in range(0, W.shape[1], b):
        w = min(b, W.shape[1] - c0)
        out[:, c0:c0 + w] += block.T[:, :w]
    return out


def test_bat_forward_and_merge_match_blockwise_reference():
    m = two()
    x = torch.randn(3, 5, 12)
    y0 = m(x)
    ak.add_adapter(m, "bn", BoneConfig(r=4, targets=["a", "b"]))
    assert torch.allclose(m(x), y0, atol=1e-6)  # zero init: identity
    randomize_adapters(m, std=0.2)
    pa, pb = (get_record(m, "bn").pieces[h] for h in ("a", "b"))
    assert pa.bone_block.shape == (2, 4, 4) and pb.bone_block.shape == (1, 4, 4)
    Wa, Wb = bat_ref(m.a.weight, pa.bone_block, 4), bat_ref(m.b.weight, pb.bone_block, 4)
    with pytest.raises(ConfigError, match="must divide"):
        ak.add_adapter(two(), "bad", BoneConfig(r=3, targets=["a"]))
    want = F.linear(torch.tanh(F.linear(x, Wa, m.a.bias)), Wb, m.b.bias)
    assert torch.allclose(m(x), want, atol=1e-5)
    w0 = m.a.weight.detach().clone()
    with torch.no_grad():
        ak.merge(m, "bn")
        assert torch.allclose(m.a.weight, Wa, atol=1e-6)
        assert torch.allclose(m(x), want, atol=1e-5)
        ak.unmerge(m, "bn")
    assert torch.equal(m.a.weight, w0)


def test_shared_forward_matches_reference_with_partial_block():
    m = two(i=10)
    x = torch.randn(4, 10)
    ak.add_adapter(m, "bn", BoneConfig(r=4, variant="shared", init="random", targets=["a"]))
    p = get_record(m, "bn").pieces["a"]
    assert p.bone_block.shape == (4, 8)
    Wa = shared_ref(m.a.weight, p.bone_block, 4)
    assert torch.allclose(m(x), m.b(torch.tanh(F.linear(x, Wa, m.a.bias))), atol=1e-5)
    assert torch.allclose(p.delta_weight(), Wa - m.a.weight, atol=1e-6)


@pytest.mark.parametrize("variant,i", [("bat", 12), ("shared", 12), ("shared", 10)])
def test_matches_peft_miss(variant, i):
    peft = pytest.importorskip("peft")
    ours, theirs = two(i=i), two(i=i)
    ak.add_adapter(ours, "x", BoneConfig(r=4, variant=variant, targets=["a", "b"] if i == 12 else ["a"]))
    randomize_adapters(ours, std=0.2)
    cfg = peft.MissConfig(r=4, init_weights="bat" if variant == "bat" else True,
                          target_modules=["a", "b"] if i == 12 else ["a"])
    pm = peft.get_peft_model(theirs, cfg)
    sd = {f"base_model.model.{k.rsplit('.', 1)[0]}.miss_block.default": v
          for k, v in ak.api.adapter_state_dict(ours, "x").items()}
    res = pm.load_state_dict(sd, strict=False)
    assert not res.unexpected_keys
    x = torch.randn(3, i)
    with torch.no_grad():
        assert torch.allclose(ours(x), pm(x), atol=1e-5)


def test_count_save_load_and_mixed_batch(tmp_path):
    model = tiny_llama()
    ak.add_adapter(model, "bn", BoneConfig(r=16))  # q_proj (64->64), v_proj (64->32) in 2 layers
    assert ak.trainable_parameters(model, "bn") == 2 * (16 * 64 + 16 * 32)  # r * out per target
    randomize_adapters(model, std=0.02)
    ids = torch.randint(0, 128, (2, 5))
    with torch.no_grad():
        want = model(ids).logits
    ak.save_adapter(model, "bn", tmp_path / "bn")
    fresh = tiny_llama()
    ak.load_adapter(fresh, tmp_path / "bn")
    with torch.no_grad(), ak.adapter_batch(fresh, [None, "bn"]):
        mixed = fresh(ids).logits
    assert (mixed[1] - want[1]).abs().max() < 1e-5
    model.train()
    model(ids).logits.sum().backward()
    for n, t in model.named_parameters():
        assert (t.grad is not None) == n.endswith("bone_block"), n


def test_config_errors():
    with pytest.raises(ConfigError, match="variant"):
        BoneConfig(variant="x")
    with pytest.raises(ConfigError, match="shared"):
        BoneConfig(dropout=0.1)
    with pytest.raises(ConfigError, match="exceeds"):
        ak.add_adapter(two(), "x", BoneConfig(r=16, variant="shared", targets=["a"]))
