"""DoRA against the paper's formula y = m / ||W + sBA||_c * (W + sBA) x + b, and against PEFT."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

import adapterkit as ak
from adapterkit.api import get_record
from adapterkit.errors import ConfigError
from adapterkit.methods import DoRAConfig
from _method_checks import assert_base_restored, base_weights, peft_lora_state_dict
from conftest import randomize_adapters, tiny_gpt2, tiny_llama


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.lin = nn.Linear(8, 6)
        self.c1 = Conv1D(5, 6)  # weight (in=6, out=5)

    def forward(self, ids: torch.Tensor, img: torch.Tensor) -> torch.Tensor:
        c = self.conv(img).mean((2, 3))  # (B, 8)
        return self.c1(self.lin(self.emb(ids) + c[:, None]))  # (B, T, 5)


def toy(seed: int = 0) -> Toy:
    torch.manual_seed(seed)
    return Toy().eval()


def toy_inputs(b: int = 3):
    g = torch.Generator().manual_seed(7)
    return torch.randint(0, 20, (b, 4), generator=g), torch.randn(b, 3, 9, 9, generator=g)


TARGETS = ["emb", "conv", "lin", "c1"]


def piece(model, name, host):
    return get_record(model, name).pieces[host]


def dora_matrix(W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, m: torch.Tensor, s: float) -> torch.Tensor:
    """The paper's adapted weight for W (out, in): m * V / ||V|| per output row, V = W + s B A."""
    V = W + s * B @ A
    return m.reshape(-1, 1) * V / V.norm(dim=1, keepdim=True)


# -- forward vs the formula on every host type -------------------------------------------
def test_forward_matches_formula_on_every_host():
    m = toy()
    ak.add_adapter(m, "d", DoRAConfig(r=2, alpha=3, init="random", targets=TARGETS))
    randomize_adapters(m, std=0.2)  # magnitude ~ 1 + noise: away from ||W||
    ids, img = toy_inputs()
    s = 1.5
    p = piece(m, "d", "lin")
    x = torch.randn(3, 4, 8)
    W = dora_matrix(m.lin.weight, p.lora_A, p.lora_B, p.lora_magnitude_vector, s)
    assert torch.allclose(m.lin(x), F.linear(x, W, m.lin.bias), atol=1e-5)
    p = piece(m, "d", "c1")
    x6 = torch.randn(3, 4, 6)
    W = dora_matrix(m.c1.weight.T, p.lora_A, p.lora_B, p.lora_magnitude_vector, s)  # (out, in)
    assert torch.allclose(m.c1(x6), x6 @ W.T + m.c1.bias, atol=1e-5)
    p = piece(m, "d", "emb")
    assert p.lora_magnitude_vector.shape == (8,)
    W = dora_matrix(m.emb.weight.T, p.lora_embedding_A, p.lora_embedding_B, p.lora_magnitude_vector, s)  # (dim, num)
    assert torch.allclose(m.emb(ids), F.embedding(ids, W.T), atol=1e-5)
    p = piece(m, "d", "conv")
    assert p.lora_magnitude_vector.shape == (1, 8, 1, 1)  # PEFT's layout
    W = dora_matrix(m.conv.weight.reshape(8, -1), p.lora_A.reshape(2, -1), p.lora_B.reshape(8, 2),
                    p.lora_magnitude_vector, s).reshape(m.conv.weight.shape)
    assert torch.allclose(m.conv(img), F.conv2d(img, W, m.conv.bias, 2, 1), atol=1e-5)


def test_magnitude_starts_at_weight_norm_and_adapter_at_identity():
    llama = tiny_llama()
    ids = torch.randint(0, 128, (2, 5))
    with torch.no_grad():
        y0 = llama(ids).logits
    ak.add_adapter(llama, "d", DoRAConfig(r=4, targets=["q_proj", "v_proj"]))
    q = llama.model.layers[0].self_attn.q_proj
    assert torch.allclose(piece(llama, "d", "model.layers.0.self_attn.q_proj").lora_magnitude_vector,
                          q.weight.norm(dim=1))
    with torch.no_grad():
        assert torch.allclose(llama(ids).logits, y0, atol=1e-5)


def test_pissa_init_with_dora_keeps_identity_and_norm_of_original_weight():
    torch.manual_seed(0)
    lin = nn.Sequential(nn.Linear(12, 10))
    W = lin[0].weight.detach().clone()
    x = torch.randn(4, 12)
    y0 = lin(x)
    ak.add_adapter(lin, "d", DoRAConfig(r=3, init="pissa", targets=["0"]))
    assert torch.allclose(piece(lin, "d", "0").lora_magnitude_vector, W.norm(dim=1), atol=1e-5)
    assert torch.allclose(lin(x), y0, atol=1e-5)
    ak.delete_adapter(lin, "d")
    assert torch.allclose(lin[0].weight, W, atol=1e-6)


# -- gradients: the norm is a constant (paper sec. 4.3) -----------------------------------
def test_gradients_treat_the_norm_as_constant():
    torch.manual_seed(0)
    lin = nn.Sequential(nn.Linear(7, 5))
    ak.add_adapter(lin, "d", DoRAConfig(r=2, alpha=2, init="random", targets=["0"]))
    randomize_adapters(lin, std=0.3)
    p = piece(lin, "d", "0")
    x = torch.randn(3, 7)
    lin(x).pow(2).sum().backward()
    A, B, mag = (t.detach().clone().requires_grad_() for t in (p.lora_A, p.lora_B, p.lora_magnitude_vector))
    W = lin[0].weight
    V = W + B @ A  # s = 1
    Wd = mag[:, None] * V / V.norm(dim=1, keepdim=True).detach()
    F.linear(x, Wd, lin[0].bias).pow(2).sum().backward()
    for ours, ref in ((p.lora_A, A), (p.lora_B, B), (p.lora_magnitude_vector, mag)):
        assert torch.allclose(ours.grad, ref.grad, atol=1e-5)
    assert lin[0].weight.grad is None and lin[0].bias.grad is None


def test_dropout_path_matches_peft_formula():
    torch.manual_seed(0)
    lin = nn.Sequential(nn.Linear(16, 8))
    ak.add_adapter(lin, "d", DoRAConfig(r=4, dropout=0.5, init="random", targets=["0"]))
    randomize_adapters(lin, std=0.2)
    p = piece(lin, "d", "0")
    W, b = lin[0].weight, lin[0].bias
    x = torch.randn(5, 16)
    lin.eval()
    Wd = dora_matrix(W, p.lora_A, p.lora_B, p.lora_magnitude_vector, p.scaling)
    assert torch.allclose(lin(x), F.linear(x, Wd, b), atol=1e-5)
    lin.train()
    torch.manual_seed(3)
    y = lin(x)
    torch.manual_seed(3)
    xd = F.dropout(x, 0.5, training=True)
    V = W + p.scaling * p.lora_B @ p.lora_A
    scale = p.lora_magnitude_vector / V.norm(dim=1)
    # PEFT: y = W x + b + (m/n - 1) W xd + (m/n) s B A xd
    want = F.linear(x, W, b) + (scale - 1) * F.linear(xd, W) + scale * p.scaling * (xd @ p.lora_A.T @ p.lora_B.T)
    assert torch.allclose(y, want, atol=1e-5)


# -- merge / unmerge ----------------------------------------------------------------------
@pytest.mark.parametrize("family", ["toy", "gpt2"])
def test_merge_matches_and_unmerge_restores_exactly(family):
    if family == "toy":
        model = toy()
        ak.add_adapter(model, "d", DoRAConfig(r=2, init="random", targets=TARGETS))
        ids, img = toy_inputs()

        def run():
            return model(ids, img)
    else:
        model = tiny_gpt2()
        ak.add_adapter(model, "d", DoRAConfig(r=2, targets=["c_attn", "c_proj"]))
        ids = torch.randint(0, 128, (2, 6))

        def run():
            return model(ids).logits
    randomize_adapters(model, std=0.1)
    base = base_weights(model)
    with torch.no_grad():
        y = run()
        ak.merge(model, "d")
        assert (run() - y).abs().max() <= 1e-4
        ak.unmerge(model, "d")
        assert (run() - y).abs().max() <= 1e-5
    assert_base_restored(model, base)
    assert "_w_before_merge" not in dict(piece(model, "d", next(iter(get_record(model, "d").pieces))).named_buffers())


def test_unmerge_in_any_order_with_a_lora_merged_first():
    torch.manual_seed(0)
    lin = nn.Sequential(nn.Linear(6, 4))
    ak.add_adapter(lin, "a", ak.LoRAConfig(r=2, init="random", targets=["0"]))
    ak.add_adapter(lin, "d", DoRAConfig(r=2, init="random", targets=["0"]))
    randomize_adapters(lin, std=0.3)
    w0 = lin[0].weight.detach().clone()
    ak.merge(lin, "a")
    ak.merge(lin, "d")
    ak.unmerge(lin, "a")  # not the reverse order
    ak.unmerge(lin, "d")
    assert torch.allclose(lin[0].weight, w0, atol=1e-6)


def test_merged_weight_is_the_dora_matrix():
    torch.manual_seed(0)
    lin = nn.Sequential(nn.Linear(6, 4))
    ak.add_adapter(lin, "d", DoRAConfig(r=2, init="random", targets=["0"]))
    randomize_adapters(lin, std=0.3)
    p = piece(lin, "d", "0")
    want = dora_matrix(lin[0].weight, p.lora_A, p.lora_B, p.lora_magnitude_vector, p.scaling).detach()
    b0 = lin[0].bias.clone()
    ak.merge(lin, "d")
    assert torch.allclose(lin[0].weight, want, atol=1e-6) and torch.equal(lin[0].bias, b0)


# -- counts, batches, files, PEFT ---------------------------------------------------------
def test_trainable_count_closed_form():
    llama = tiny_llama()
    ak.add_adapter(llama, "d", DoRAConfig(r=4, targets=["q_proj", "v_proj"]))
    assert ak.trainable_parameters(llama, "d") == 2 * (4 * 128 + 64 + 4 * 96 + 32)
    m = toy()
    ak.add_adapter(m, "d", DoRAConfig(r=3, targets=["conv", "emb"]))
    assert ak.trainable_parameters(m, "d") == 3 * (27 + 8) + 8 + 3 * (20 + 8) + 8


def test_mixed_batch_with_dora_rows():
    model = tiny_llama()
    ak.add_adapter(model, "d", DoRAConfig(r=2, targets=["q_proj", "v_proj", "embed_tokens"]))
    ak.add_adapter(model, "l", ak.LoRAConfig(r=4, targets=["q_proj", "o_proj"]))
    ak.add_adapter(model, "d2", DoRAConfig(r=4, use_rslora=True, targets=["down_proj"]))
    randomize_adapters(model, std=0.1)
    ids = torch.randint(0, 128, (5, 6))
    names = ["d", "l", None, "d2", "d"]
    model.train()  # gradients flow per row too
    with ak.adapter_batch(model, names):
        mixed = model(ids).logits
    mixed[0].sum().backward()  # row 0 uses "d" only
    for n, p in model.named_parameters():
        if ".adapterkit.d." in n:
            assert p.grad is not None and p.grad.abs().sum() > 0, n
        elif ".adapterkit." in n:
            assert p.grad is None or p.grad.abs().sum() == 0, n
    model.eval()
    for i, n in enumerate(names):
        ak.set_adapter(model, n)
        with torch.no_grad():
            single = model(ids[i:i + 1]).logits
        assert torch.allclose(mixed[i].detach(), single[0], atol=1e-5), (i, n)


def test_save_load_roundtrip(tmp_path):
    model = tiny_llama()
    ids = torch.randint(0, 128, (2, 5))
    ak.add_adapter(model, "d", DoRAConfig(r=2, alpha=4, init="olora", targets=["q_proj", "v_proj"]))
    randomize_adapters(model, std=0.05)
    with torch.no_grad():
        want = model(ids).logits
    ak.save_adapter(model, "d", tmp_path / "d")
    fresh = tiny_llama()
    rec = ak.load_adapter(fresh, tmp_path / "d")
    assert rec.method == "dora" and isinstance(rec.config, DoRAConfig) and rec.config.r == 4
    with torch.no_grad():
        assert (fresh(ids).logits - want).abs().max() <= 1e-4


def test_outputs_match_peft_dora():
    peft = pytest.importorskip("peft")
    ours, theirs = toy(), toy()
    ak.add_adapter(ours, "x", DoRAConfig(r=2, alpha=3, init="random", targets=TARGETS))
    randomize_adapters(ours, std=0.2)
    pm = peft.get_peft_model(theirs, peft.LoraConfig(r=2, lora_alpha=3, target_modules=TARGETS, use_dora=True,
                                                     init_lora_weights=False))
    assert not pm.load_state_dict(peft_lora_state_dict(ours, "x"), strict=False).unexpected_keys
    ids, img = toy_inputs()
    with torch.no_grad():
        assert torch.allclose(ours(ids, img), pm(ids, img), atol=1e-5)


def test_dora_config_errors():
    with pytest.raises(ConfigError, match="bias"):
        DoRAConfig(bias=True)
    with pytest.raises(ConfigError, match="r must be"):
        DoRAConfig(r=-1)
    assert ak.make_config("dora", r=4).method == "dora"
