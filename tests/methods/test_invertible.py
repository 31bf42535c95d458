"""Invertible (MAD-X / NICE) adapters: exact inverse, a plain re-implementation of the coupling,
the whole LM vs embed -> coupling -> body -> inverse -> head by hand, sharing, save/load."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import adapterkit as ak
from adapterkit.errors import ConfigError, NotMergeableError, TargetNotFoundError, UnsupportedModuleError
from adapterkit.methods import InvertibleConfig
from adapterkit.methods.invertible import NICECoupling, NICEInverse
from _method_checks import adapter_pieces, assert_fresh_adapter_is_identity, assert_mixed_batch_rows_match
from conftest import randomize_adapters, tiny_bert, tiny_gpt2, tiny_llama, tiny_vit


def _block(model, name="a") -> NICECoupling:
    return next(p for p in adapter_pieces(model, name).values() if isinstance(p, NICECoupling))


def ref_coupling(block: NICECoupling, x: torch.Tensor, reverse: bool = False) -> torch.Tensor:
    """The paper's additive coupling written out with the raw weights (relu MLPs)."""
    def mlp(m, u):
        return F.linear(torch.relu(F.linear(u, m.down.weight, m.down.bias)), m.up.weight, m.up.bias)

    h = x.shape[-1] // 2
    a, b = x[..., :h], x[..., h:]
    if not reverse:
        y1 = a + mlp(block.F, b)
        return torch.cat([y1, b + mlp(block.G, y1)], -1)
    x2 = b - mlp(block.G, a)
    return torch.cat([a - mlp(block.F, x2), x2], -1)


@pytest.mark.parametrize("dim", [64, 9])
def test_inverse_of_forward_is_identity_and_matches_reference(dim):
    torch.manual_seed(0)
    block = NICECoupling(dim, InvertibleConfig(), torch.zeros(1))
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(std=0.2)
    x = torch.randn(4, 7, dim)
    y = block.coupling(x)
    assert not torch.allclose(y, x, atol=1e-2)
    torch.testing.assert_close(y, ref_coupling(block, x), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(block.inverse(y), ref_coupling(block, y, reverse=True), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(block.inverse(y), x, rtol=0, atol=1e-5)
    torch.testing.assert_close(block.coupling(block.inverse(x)), x, rtol=0, atol=1e-5)
    block64, x64 = block.double(), x.double() * 10  # exact up to float64 rounding, even for large inputs
    torch.testing.assert_close(block64.inverse(block64.coupling(x64)), x64, rtol=0, atol=1e-11)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_lm_matches_manual_embed_coupling_body_inverse_head(arch, ids):
    m = tiny_llama() if arch == "llama" else tiny_gpt2()
    ak.add_adapter(m, "a", InvertibleConfig())
    emb_path, head_path = list(adapter_pieces(m))
    assert head_path == "lm_head" and emb_path.endswith(("embed_tokens", "wte"))
    assert isinstance(adapter_pieces(m)[head_path], NICEInverse)
    randomize_adapters(m, std=0.2)
    got = m(ids).logits
    block = _block(m)
    ak.set_adapter(m, None)  # the reference runs the base modules by hand
    with torch.no_grad():
        body = m.model if arch == "llama" else m.transformer
        embeds = ref_coupling(block, m.get_input_embeddings()(ids))
        h = body(inputs_embeds=embeds).last_hidden_state
        want = m.lm_head(ref_coupling(block, h, reverse=True))
        plain = m(ids).logits
    assert not torch.allclose(got, plain, atol=1e-3)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_fresh_adapter_is_identity(ids):
    assert_fresh_adapter_is_identity(tiny_gpt2(), ids, InvertibleConfig())


def test_gradient_flows_through_both_pieces(ids):
    m = tiny_llama()
    ak.add_adapter(m, "a", InvertibleConfig())
    randomize_adapters(m, std=0.2)
    m(ids).logits.pow(2).mean().backward()
    grads = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    assert set(grads) == {n for n, _ in m.named_parameters() if ".adapterkit.a." in n}
    assert all(g.abs().sum() > 0 for g in grads.values())
    assert all(not p.requires_grad for n, p in m.named_parameters() if ".adapterkit." not in n)
    # without the inverse on the head the gradient differs: the head piece is in the graph
    m2 = tiny_llama()
    ak.add_adapter(m2, "a", InvertibleConfig(head=False))
    randomize_adapters(m2, std=0.2)
    assert list(adapter_pieces(m2)) == ["model.embed_tokens"]
    m2(ids).logits.pow(2).mean().backward()
    n0 = "model.embed_tokens.adapterkit.a.F.down.weight"
    assert not torch.allclose(m2.get_parameter(n0).grad, grads[n0])


def test_closed_form_count_and_saved_once(ids, tmp_path):
    for d, dims in ((64, (32, 32)), (9, (4, 5))):
        s1, s2 = dims
        hf, hg = s1 // 2, s2 // 2
        want = (s2 * hf + hf + hf * s1 + s1) + (s1 * hg + hg + hg * s2 + s2)
        net = nn.Sequential(nn.Embedding(10, d), nn.Linear(d, 10))
        ak.add_adapter(net, "a", InvertibleConfig(targets=["0"], head="1"))
        assert ak.trainable_parameters(net, "a") == want
        assert ak.trainable_parameters(net) == want
    m = tiny_llama()
    ak.add_adapter(m, "a", InvertibleConfig(reduction_factor=4))
    randomize_adapters(m, std=0.2)
    want = m(ids).logits
    sd = ak.api.adapter_state_dict(m, "a")
    assert sd and all(k.startswith("model.embed_tokens.") for k in sd)  # the head piece holds nothing
    assert ak.trainable_parameters(m, "a") == 2 * (32 * 8 + 8 + 8 * 32 + 32)
    ak.save_adapter(m, "a", tmp_path / "inv")
    fresh = tiny_llama()
    ak.load_adapter(fresh, tmp_path / "inv", name="a")
    assert ak.get_adapter_config(fresh, "a") == ak.get_adapter_config(m, "a")
    torch.testing.assert_close(fresh(ids).logits, want, rtol=0, atol=0)
    assert adapter_pieces(fresh)["lm_head"]._block is _block(fresh)


def test_encoders_and_vision(ids):
    b = tiny_bert()  # BertModel: no output embeddings, so no inverse
    ak.add_adapter(b, "a", InvertibleConfig())
    assert list(adapter_pieces(b)) == ["embeddings.word_embeddings"]
    ak.add_adapter(b, "w", InvertibleConfig(targets=["embeddings"]))  # AdapterHub's site: the whole block
    randomize_adapters(b)
    ak.set_adapter(b, "w")
    got = b(ids).last_hidden_state
    ak.set_adapter(b, None)
    with torch.no_grad():
        want = b.encoder(ref_coupling(_block(b, "w"), b.embeddings(ids))).last_hidden_state
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    v = tiny_vit()
    ak.add_adapter(v, "a", InvertibleConfig())
    assert list(adapter_pieces(v)) == ["vit.embeddings.patch_embeddings"]
    assert v(pixel_values=torch.randn(2, 3, 32, 32)).logits.shape == (2, 5)


def test_mixed_batch_equals_rows_alone(ids):
    m = tiny_llama()
    ak.add_adapter(m, "a", InvertibleConfig())
    ak.add_adapter(m, "b", InvertibleConfig(non_linearity="gelu"))
    randomize_adapters(m, std=0.2)
    names = ["a", None, "b", "a"]
    assert_mixed_batch_rows_match(m, ids, names)


def test_errors(llama):
    with pytest.raises(ConfigError, match="head"):
        InvertibleConfig(head=3)
    with pytest.raises(ConfigError, match="reduction_factor"):
        InvertibleConfig(reduction_factor=0)
    with pytest.raises(ConfigError, match="non_linearity"):
        InvertibleConfig(non_linearity="relu6")
    with pytest.raises(ConfigError, match="exactly one"):
        ak.add_adapter(llama, "a", InvertibleConfig(targets=["q_proj"]))
    with pytest.raises(TargetNotFoundError, match="output embeddings"):
        ak.add_adapter(tiny_bert(), "a", InvertibleConfig(head=True))
    with pytest.raises(UnsupportedModuleError, match="reads 128 features"):
        ak.add_adapter(llama, "a", InvertibleConfig(head="model.layers.0.mlp.down_proj"))
    with pytest.raises(ConfigError, match="exactly one module, matched 2"):
        ak.add_adapter(llama, "a", InvertibleConfig(head="down_proj"))
    with pytest.raises(TargetNotFoundError, match="get_input_embeddings"):
        ak.add_adapter(nn.Sequential(nn.Linear(4, 4)), "a", InvertibleConfig())
    assert ak.list_adapters(llama) == []
    ak.add_adapter(llama, "a", InvertibleConfig())
    with pytest.raises(NotMergeableError):
        ak.merge(llama, "a")
