"""SSF (scale & shift) against a plain re-implementation of y' = gamma * y + beta, and its merge."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import adapterkit as ak
from adapterkit.errors import ConfigError, NotMergeableError, UnsupportedModuleError
from adapterkit.methods import SSFConfig
from _method_checks import adapter_pieces, assert_mixed_batch_rows_match, random_biases, replace_module
from conftest import tiny_bert, tiny_gpt2, tiny_llama, tiny_vit

MAKERS = {"llama": tiny_llama, "gpt2": tiny_gpt2, "bert": tiny_bert, "vit": tiny_vit}


class ScaledShifted(nn.Module):
    """Reference: the host's own math, then ``gamma * y + beta`` over the channel axis ``dim``."""

    def __init__(self, host: nn.Module, gamma: torch.Tensor, beta: torch.Tensor | None, dim: int):
        super().__init__()
        self.host, self.g, self.b, self.dim = host, gamma, beta, dim

    @property
    def weight(self):  # ViT's patch embedding reads its conv's weight dtype
        return self.host.weight

    def forward(self, x, *a, **k):
        y = self.host(x, *a, **k)
        shape = [1] * y.dim()
        shape[self.dim] = -1
        if self.dim == -1 and self.g.dim() > 1:  # LayerNorm over several trailing axes
            shape = list(self.g.shape)
        out = y * self.g.reshape(shape)
        return out + self.b.reshape(shape) if self.b is not None else out


def _randomize(model: nn.Module, seed: int = 1) -> None:
    """scale ~ 1 + N(0, 0.2), shift ~ N(0, 0.1): away from the identity, never zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".adapterkit." in f".{n}":
                p.copy_(torch.randn(p.shape, generator=g) * (0.2 if "scale" in n else 0.1)
                        + (1.0 if "scale" in n else 0.0))


def _inputs(arch):
    torch.manual_seed(123)
    if arch == "vit":
        return {"pixel_values": torch.randn(3, 3, 32, 32)}
    return {"input_ids": torch.randint(0, 128, (3, 7))}


def _out(model, arch):
    return model(**_inputs(arch))[0]


def _dim(m: nn.Module) -> int:
    return 1 if isinstance(m, (nn.Conv2d, nn.BatchNorm2d)) else -1


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert", "vit"])
def test_default_targets_match_reference(arch):
    model = random_biases(MAKERS[arch]())
    ref = copy.deepcopy(model)
    base = _out(model, arch)
    ak.add_adapter(model, "a", SSFConfig())
    _randomize(model)
    pieces = adapter_pieces(model)
    kinds = {type(ref.get_submodule(h)).__name__ for h in pieces}
    expected = {"llama": {"Linear", "LlamaRMSNorm"}, "gpt2": {"Conv1D", "LayerNorm"},
                "bert": {"Linear", "LayerNorm"}, "vit": {"Linear", "LayerNorm", "Conv2d"}}[arch]
    assert kinds == expected
    assert not any(h.endswith(("lm_head", "classifier")) for h in pieces)  # the head is not a target
    for h, p in pieces.items():
        host = ref.get_submodule(h)
        if type(host).__name__ == "LlamaRMSNorm":
            assert p.ssf_shift is None  # no bias to merge a shift into
        beta = None if p.ssf_shift is None else p.ssf_shift.detach().clone()
        replace_module(ref, h, ScaledShifted(host, p.ssf_scale.detach().clone(), beta, _dim(host)))
    got, want = _out(model, arch), _out(ref, arch)
    assert not torch.allclose(got, base, atol=1e-3)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_closed_form_trainable_count():
    # Llama (d=64, ffn=128, kv width 32, 2 layers): 2*C per linear, C per RMSNorm (scale only)
    per_layer_lin = 64 + 32 + 32 + 64 + 128 + 128 + 64
    m = tiny_llama()
    ak.add_adapter(m, "a", SSFConfig())
    assert ak.trainable_parameters(m, "a") == 2 * (2 * per_layer_lin) + (2 * 2 + 1) * 64
    # GPT-2: c_attn 3d, attn.c_proj d, c_fc 4d, mlp.c_proj d; LayerNorms (bias): 2*d each
    g = tiny_gpt2()
    ak.add_adapter(g, "a", SSFConfig())
    assert ak.trainable_parameters(g, "a") == 2 * 2 * (3 * 64 + 64 + 256 + 64) + (2 * 2 + 1) * 2 * 64
    # ViT: patch conv (64 channels), 6 linears per layer (q,k,v,o: 64, fc1: 128, fc2: 64), 2 LN per layer + final
    v = tiny_vit()
    ak.add_adapter(v, "a", SSFConfig())
    assert ak.trainable_parameters(v, "a") == 2 * 64 + 2 * 2 * (5 * 64 + 128) + (2 * 2 + 1) * 2 * 64


def test_fresh_adapter_is_identity_and_normal_init():
    m = tiny_llama()
    ids = _inputs("llama")
    base = m(**ids).logits
    ak.add_adapter(m, "a", SSFConfig())
    torch.testing.assert_close(m(**ids).logits, base, rtol=0, atol=0)
    m2 = tiny_vit()
    ak.add_adapter(m2, "a", SSFConfig(init="normal", init_std=0.02))
    scales = torch.cat([p.ssf_scale.flatten() for p in adapter_pieces(m2).values()])
    shifts = torch.cat([p.ssf_shift.flatten() for p in adapter_pieces(m2).values()])
    assert abs(scales.mean().item() - 1) < 0.01 and 0.015 < scales.std().item() < 0.025
    assert abs(shifts.mean().item()) < 0.01 and 0.015 < shifts.std().item() < 0.025


def test_merge_folds_into_weight_and_bias_exactly():
    """W' = diag(gamma) W and b' = gamma * b + beta, for nn.Linear and GPT-2's transposed Conv1D."""
    for make, path in ((tiny_bert, "encoder.layer.0.intermediate.dense"), (tiny_gpt2, "transformer.h.0.mlp.c_fc")):
        m = random_biases(make())
        host = m.get_submodule(path)
        W, b = host.weight.detach().clone(), host.bias.detach().clone()
        ak.add_adapter(m, "a", SSFConfig(targets=[path]))
        _randomize(m)
        p = adapter_pieces(m)[path]
        g, be = p.ssf_scale.detach(), p.ssf_shift.detach()
        ak.merge(m, "a")
        want_w = g[:, None] * W if isinstance(host, nn.Linear) else W * g[None, :]
        torch.testing.assert_close(host.weight, want_w, rtol=0, atol=0)
        torch.testing.assert_close(host.bias, g * b + be, rtol=0, atol=0)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert", "vit"])
def test_merge_unmerge_exact(arch):
    m = random_biases(MAKERS[arch]())
    orig = {k: v.clone() for k, v in m.state_dict().items()}
    ak.add_adapter(m, "a", SSFConfig())
    _randomize(m)
    want = _out(m, arch)
    ak.merge(m, "a")
    got = _out(m, arch)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    ak.set_adapter(m, "a")
    ak.unmerge(m, "a")
    sd = {k: v for k, v in m.state_dict().items() if ".adapterkit." not in k}
    assert set(sd) == set(orig)  # the biases made for Llama's bias-free projections are gone again
    for k, v in orig.items():
        torch.testing.assert_close(sd[k], v, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(_out(m, arch), want, rtol=1e-5, atol=1e-5)


def test_merge_creates_bias_on_bias_free_linear():
    m = tiny_llama()
    q = m.model.layers[0].self_attn.q_proj
    assert q.bias is None
    ak.add_adapter(m, "a", SSFConfig(targets=["q_proj"]))
    _randomize(m)
    beta = adapter_pieces(m)["model.layers.0.self_attn.q_proj"].ssf_shift.detach()
    ak.merge(m, "a")
    torch.testing.assert_close(q.bias, beta, rtol=0, atol=0)
    assert not q.bias.requires_grad
    ak.unmerge(m, "a")
    assert q.bias is None


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 6, 3, stride=2)
        self.gn = nn.GroupNorm(2, 6)
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        h = self.gn(self.conv2(F.relu(self.bn(self.conv1(x)))))
        return self.fc(h.mean((2, 3)))


def test_conv_net_per_channel_reference_and_merge():
    torch.manual_seed(0)
    net = ConvNet().eval()
    with torch.no_grad():
        net.bn.running_mean.normal_()
        net.bn.running_var.uniform_(0.5, 2.0)
    x = torch.randn(2, 3, 9, 9)
    ref = copy.deepcopy(net)
    ak.add_adapter(net, "a", SSFConfig(targets=["conv1", "bn", "conv2", "gn"]))
    _randomize(net)
    for h, p in adapter_pieces(net).items():
        assert p.ssf_scale.shape == (ref.get_submodule(h).weight.shape[0],)
        replace_module(ref, h, ScaledShifted(ref.get_submodule(h), p.ssf_scale.detach(), p.ssf_shift.detach(), 1))
    want = net(x)
    torch.testing.assert_close(want, ref(x), rtol=1e-5, atol=1e-5)
    ak.merge(net, "a")
    torch.testing.assert_close(net(x), want, rtol=1e-4, atol=1e-5)
    assert net.conv1.bias is not None  # created to hold the shift
    ak.unmerge(net, "a")
    assert net.conv1.bias is None


class OnePlusNorm(nn.Module):
    """Gemma-style RMSNorm: (1 + w) * x / rms(x): scaling w does not scale the output."""

    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(d))

    def forward(self, x):
        return (1 + self.weight) * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


def test_merge_refuses_norm_that_is_not_weight_times_normalized():
    net = nn.Sequential(nn.Linear(8, 8), OnePlusNorm(8))
    ak.add_adapter(net, "a", SSFConfig(targets=["1"]))
    _randomize(net)
    before = net[1].weight.detach().clone()
    with pytest.raises(NotMergeableError, match="does not scale its output"):
        ak.merge(net, "a")
    torch.testing.assert_close(net[1].weight, before, rtol=0, atol=1e-7)
    assert not adapter_pieces(net)["1"].merged


def test_merge_refusals_leave_base_untouched():
    g = tiny_gpt2()  # lm_head shares wte's weight
    ak.add_adapter(g, "a", SSFConfig(targets=["lm_head"]))
    _randomize(g)
    w = g.lm_head.weight.detach().clone()
    with pytest.raises(NotMergeableError, match="tied"):
        ak.merge(g, "a")
    torch.testing.assert_close(g.lm_head.weight, w, rtol=0, atol=0)
    m = tiny_llama()
    ak.add_adapter(m, "a", SSFConfig(targets=["k_proj"]))
    with torch.no_grad():
        adapter_pieces(m)["model.layers.1.self_attn.k_proj"].ssf_scale[2] = 0.0
    k0 = m.model.layers[0].self_attn.k_proj.weight.detach().clone()
    with pytest.raises(NotMergeableError, match="zeros"):
        ak.merge(m, "a")
    torch.testing.assert_close(m.model.layers[0].self_attn.k_proj.weight, k0, rtol=0, atol=0)


def test_training_gradients_only_on_ssf_params():
    m = tiny_llama()
    ids = _inputs("llama")["input_ids"]
    ak.add_adapter(m, "a", SSFConfig())
    m.train()
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    loss = F.cross_entropy(m(ids).logits[:, :-1].reshape(-1, 128), ids[:, 1:].reshape(-1))
    loss.backward()
    for n, p in m.named_parameters():
        if ".adapterkit.a." in n:
            assert p.grad is not None and p.grad.abs().sum() > 0, n
        else:
            assert not p.requires_grad and p.grad is None, n
    opt.step()
    changed = {k for k, v in m.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(".adapterkit.a.ssf_" in k for k in changed)


def test_mixed_batch_equals_rows_alone():
    m = random_biases(tiny_gpt2())
    ids = _inputs("gpt2")["input_ids"]
    ak.add_adapter(m, "a", SSFConfig())
    ak.add_adapter(m, "b", SSFConfig(targets=["c_fc", "ln_f"]))
    _randomize(m)
    names = ["a", None, "b"]
    assert_mixed_batch_rows_match(m, ids, names)


def test_save_load_round_trip(tmp_path):
    m = tiny_vit()
    x = _inputs("vit")
    ak.add_adapter(m, "a", SSFConfig(init="normal"))
    _randomize(m)
    want = m(**x).logits
    ak.save_adapter(m, "a", tmp_path / "ssf")
    fresh = tiny_vit()
    ak.load_adapter(fresh, tmp_path / "ssf", name="a")
    assert ak.get_adapter_config(fresh, "a") == ak.get_adapter_config(m, "a")
    torch.testing.assert_close(fresh(**x).logits, want, rtol=0, atol=0)


def test_config_and_target_errors():
    with pytest.raises(ConfigError, match="init"):
        SSFConfig(init="ones")
    with pytest.raises(ConfigError, match="init_std"):
        SSFConfig(init_std=-1.0)
    with pytest.raises(ConfigError, match="init_sd"):
        ak.make_config("ssf", init_sd=0.1)
    net = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4, elementwise_affine=False), nn.Embedding(3, 4))
    with pytest.raises(UnsupportedModuleError, match="'1'"):
        ak.add_adapter(net, "a", SSFConfig(targets=["1"]))
    with pytest.raises(UnsupportedModuleError, match="Embedding"):
        ak.add_adapter(net, "a", SSFConfig(targets=["2"]))
    assert ak.list_adapters(net) == []
