"""Bottleneck adapters against plain re-implementations of each placement's equations.

The reference models are deep copies of the base model in which the adapted blocks are
replaced by wrappers that compute the documented formula explicitly (no hooks involved).
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import adapterkit as ak
from adapterkit.errors import ConfigError, NotMergeableError, TargetNotFoundError
from adapterkit.methods import BottleneckConfig
from _method_checks import assert_mixed_batch_rows_match, replace_module
from conftest import randomize_adapters, tiny_bert, tiny_gpt2, tiny_llama, tiny_vit

ACT = {"relu": F.relu, "swish": F.silu, "gelu": F.gelu, "tanh": torch.tanh}


def ref_a(p: dict[str, torch.Tensor], h: torch.Tensor, act, s: float) -> torch.Tensor:
    """a(h) = (W_up f(W_down h + b_down) + b_up) * s, written out."""
    s = p["scaling"] if "scaling" in p else s
    return (act(h @ p["adapter_down.weight"].T + p["adapter_down.bias"]) @ p["adapter_up.weight"].T
            + p["adapter_up.bias"]) * s


def piece_params(model: nn.Module, name: str, host: str) -> dict[str, torch.Tensor]:
    pre = f"{host}.adapterkit.{name}."
    return {k[len(pre):]: v.detach().clone() for k, v in model.state_dict().items() if k.startswith(pre)}


class Series(nn.Module):
    """Pre-LN block: F(x) + a(F(x)); keeps tuple outputs (attention returns (out, weights))."""

    def __init__(self, block, p, act, s, parallel=False):
        super().__init__()
        self.block, self.p, self.act, self.s, self.parallel = block, p, act, s, parallel

    def forward(self, *args, **kwargs):
        out = self.block(*args, **kwargs)
        y = out[0] if isinstance(out, tuple) else out
        x = args[0] if args else kwargs["hidden_states"]
        y = y + ref_a(self.p, x if self.parallel else y, self.act, self.s)
        return (y, *out[1:]) if isinstance(out, tuple) else y


class PostLN(nn.Module):
    """BERT output block, explicit: h = dropout(dense(u)), then the placement's formula."""

    def __init__(self, block, p, act, s, kind):
        super().__init__()
        self.block, self.p, self.act, self.s, self.kind = block, p, act, s, kind

    def forward(self, u, r):
        b = self.block
        h = b.dropout(b.dense(u))
        ln = b.LayerNorm
        a = lambda t: ref_a(self.p, t, self.act, self.s)  # noqa: E731
        if self.kind == "houlsby":  # LN(h + a(h) + r)
            return ln(h + a(h) + r)
        if self.kind == "pfeiffer":  # AdapterHub: residual h (before LN), adapter on LN(h + r)
            return ln(h + a(ln(h + r)) + r)
        if self.kind == "pfeiffer_after_ln":  # residual taken after the LN
            return ln(ln(h + r) + a(ln(h + r)) + r)
        return ln(h + a(r) + r)  # parallel


def _sites(model, name):
    return list(ak.api.get_record(model, name).pieces)


@pytest.fixture
def ids():
    torch.manual_seed(123)
    return torch.randint(0, 128, (3, 7))


# -- placements vs references -----------------------------------------------------
@pytest.mark.parametrize("mode", ["pfeiffer", "houlsby", "parallel"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_pre_ln_placements_match_reference(mode, arch, ids):
    model = tiny_llama() if arch == "llama" else tiny_gpt2()
    ref = copy.deepcopy(model)
    base = model(ids).logits
    cfg = BottleneckConfig(mode=mode)
    ak.add_adapter(model, "a", cfg)
    randomize_adapters(model)
    sites = _sites(model, "a")
    attn, mlp = ("self_attn", "mlp") if arch == "llama" else ("attn", "mlp")
    want = [s for s in sites if s.endswith("." + mlp)]
    assert len(want) == 2
    if mode == "houlsby":
        assert len(sites) == 4 and sum(s.endswith("." + attn) for s in sites) == 2
    else:
        assert sites == want
    for s in sites:
        replace_module(ref, s, Series(ref.get_submodule(s), piece_params(model, "a", s), ACT[cfg.non_linearity],
                                      cfg.scaling, parallel=mode == "parallel"))
    got, exp = model(ids).logits, ref(ids).logits
    assert not torch.allclose(got, base, atol=1e-3)  # the adapter does change the output
    torch.testing.assert_close(got, exp, rtol=1e-5, atol=1e-5)


def test_vit_houlsby_and_parallel_match_reference():
    torch.manual_seed(0)
    px = torch.randn(2, 3, 32, 32)
    for mode in ("houlsby", "parallel"):
        model = tiny_vit()
        ref = copy.deepcopy(model)
        cfg = BottleneckConfig(mode=mode, non_linearity="gelu", scaling=2.0)
        ak.add_adapter(model, "a", cfg)
        randomize_adapters(model)
        sites = _sites(model, "a")
        assert len(sites) == (4 if mode == "houlsby" else 2)
        for s in sites:
            replace_module(ref, s, Series(ref.get_submodule(s), piece_params(model, "a", s), F.gelu, 2.0,
                                          parallel=mode == "parallel"))
        torch.testing.assert_close(model(pixel_values=px).logits, ref(pixel_values=px).logits, rtol=1e-5, atol=1e-5)


BERT_CASES = [
    # (config kwargs, reference kind, sub-host suffix where the parameters live)
    (dict(mode="houlsby"), "houlsby", ".dropout"),
    (dict(mode="pfeiffer"), "pfeiffer", ".LayerNorm"),
    (dict(mode="pfeiffer", residual_before_ln=False), "pfeiffer_after_ln", ""),
    (dict(mode="parallel"), "parallel", ""),
    (dict(mode="pfeiffer", original_ln_before=False), "houlsby", ".dropout"),
]


@pytest.mark.parametrize("kw,kind,sub", BERT_CASES)
def test_bert_post_ln_placements_match_reference(kw, kind, sub, ids):
    model = tiny_bert()
    ref = copy.deepcopy(model)
    cfg = BottleneckConfig(**kw)
    ak.add_adapter(model, "a", cfg)
    randomize_adapters(model)
    sites = _sites(model, "a")
    blocks = [s[: len(s) - len(sub)] if sub else s for s in sites]
    assert all(s.endswith(sub) for s in sites)
    n_attn = sum(b.endswith("attention.output") for b in blocks)
    assert len(blocks) == (4 if cfg.mode == "houlsby" else 2) and n_attn == (2 if cfg.mode == "houlsby" else 0)
    for s, b in zip(sites, blocks):
        replace_module(ref, b, PostLN(ref.get_submodule(b), piece_params(model, "a", s), ACT[cfg.non_linearity],
                                      cfg.scaling, kind))
    mask = torch.ones_like(ids)
    mask[0, -2:] = 0
    got = model(input_ids=ids, attention_mask=mask).last_hidden_state
    exp = ref(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(got, exp, rtol=1e-5, atol=1e-5)


def test_bert_houlsby_sits_after_dropout_in_training(ids):
    """In train mode (dropout active) the adapter must see dropout(dense(u)), as in AdapterHub."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    model = BertModel(BertConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                 vocab_size=128, hidden_dropout_prob=0.3, attention_probs_dropout_prob=0.0))
    ref = copy.deepcopy(model)
    ak.add_adapter(model, "a", BottleneckConfig(mode="houlsby"))
    randomize_adapters(model)
    for s in _sites(model, "a"):
        b = s[: -len(".dropout")]
        replace_module(ref, b, PostLN(ref.get_submodule(b), piece_params(model, "a", s), F.silu, 1.0, "houlsby"))
    model.train(), ref.train()
    torch.manual_seed(7)
    got = model(input_ids=ids).last_hidden_state
    torch.manual_seed(7)
    exp = ref(input_ids=ids).last_hidden_state
    torch.testing.assert_close(got, exp, rtol=1e-5, atol=1e-5)


# -- identity, mixed batches, counts --------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
@pytest.mark.parametrize("kw", [dict(mode="pfeiffer"), dict(mode="houlsby"), dict(mode="parallel"),
                                dict(mode="houlsby", init="houlsby"), dict(mode="pfeiffer", init="mam_adapter")])
def test_fresh_adapter_is_identity(arch, kw, ids):
    model = {"llama": tiny_llama, "gpt2": tiny_gpt2, "bert": tiny_bert}[arch]()
    out = lambda: model(ids)[0]  # noqa: E731
    base = out()
    ak.add_adapter(model, "a", BottleneckConfig(**kw))
    # the down projection is random, the up projection zero
    params = dict(ak.api.adapter_parameters(model, "a"))
    assert any(k.endswith("adapter_down.weight") and v.abs().sum() > 0 for k, v in params.items())
    assert all(v.abs().sum() == 0 for k, v in params.items() if "adapter_up" in k)
    torch.testing.assert_close(out(), base, rtol=0, atol=0)


def test_bert_residual_after_ln_is_not_identity_at_init(ids):
    """LN(LN(z) + r) != LN(z): AdapterHub's residual_before_ln=False is not an identity even with W_up = 0."""
    model = tiny_bert()
    base = model(ids).last_hidden_state
    ak.add_adapter(model, "a", BottleneckConfig(mode="pfeiffer", residual_before_ln=False))
    assert not torch.allclose(model(ids).last_hidden_state, base, atol=1e-3)


@pytest.mark.parametrize("arch,kw", [
    ("llama", dict(mode="houlsby")),
    ("llama", dict(mode="parallel")),
    ("bert", dict(mode="pfeiffer")),
    ("bert", dict(mode="pfeiffer", residual_before_ln=False)),
    ("bert", dict(mode="parallel")),
    ("bert", dict(mode="houlsby")),
])
def test_mixed_batch_equals_rows_alone(arch, kw, ids):
    model = tiny_llama() if arch == "llama" else tiny_bert()
    ak.add_adapter(model, "a", BottleneckConfig(**kw))
    ak.add_adapter(model, "b", BottleneckConfig(**{**kw, "bottleneck_size": 3}))
    randomize_adapters(model)
    names = ["b", None, "a"]
    assert_mixed_batch_rows_match(model, ids, names)


def test_trainable_counts_closed_form():
    h = 64
    site = lambda b: 2 * h * b + b + h  # noqa: E731  (down: h*b + b, up: b*h + h)
    m = tiny_llama()
    ak.add_adapter(m, "p", BottleneckConfig(mode="pfeiffer"))  # 2 mlp sites, b = 64 // 16
    ak.add_adapter(m, "h", BottleneckConfig(mode="houlsby"))  # 4 sites
    ak.add_adapter(m, "par", BottleneckConfig(mode="parallel", scaling="learned"))  # 2 sites, b = 32, +1 scalar
    ak.add_adapter(m, "s", BottleneckConfig(mode="houlsby", bottleneck_size=5))
    assert ak.trainable_parameters(m, "p") == 2 * site(4)
    assert ak.trainable_parameters(m, "h") == 4 * site(4)
    assert ak.trainable_parameters(m, "par") == 2 * (site(32) + 1)
    assert ak.trainable_parameters(m, "s") == 4 * site(5)
    assert ak.trainable_parameters(m) == 6 * site(4) + 2 * (site(32) + 1) + 4 * site(5)
    b = tiny_bert()
    ak.add_adapter(b, "x", BottleneckConfig(mode="houlsby", reduction_factor=8))
    assert ak.trainable_parameters(b, "x") == 4 * site(8)


def test_learned_scaling_is_a_trainable_scalar(ids):
    m = tiny_llama()
    ref = copy.deepcopy(m)
    ak.add_adapter(m, "a", BottleneckConfig(mode="parallel", scaling="learned"))
    randomize_adapters(m)
    with torch.no_grad():
        for k, p in ak.api.adapter_parameters(m, "a").items():
            if k.endswith(".scaling"):
                assert p.shape == (1,)
                p.fill_(2.5)
    for s in _sites(m, "a"):
        replace_module(ref, s, Series(ref.get_submodule(s), piece_params(m, "a", s), F.relu, None, parallel=True))
    torch.testing.assert_close(m(ids).logits, ref(ids).logits, rtol=1e-5, atol=1e-5)


# -- training, merge, files, errors ------------------------------------------------
@pytest.mark.parametrize("kw", [dict(mode="houlsby"), dict(mode="pfeiffer"), dict(mode="parallel"),
                                dict(mode="pfeiffer", residual_before_ln=False)])
def test_gradients_only_on_adapter_params(kw, ids):
    m = tiny_bert()
    ak.add_adapter(m, "a", BottleneckConfig(**kw))
    randomize_adapters(m)
    m(ids).last_hidden_state.pow(2).mean().backward()
    for n, p in m.named_parameters():
        if ".adapterkit.a." in n:
            assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, n
        else:
            assert not p.requires_grad and p.grad is None, n


def test_merge_raises_not_mergeable(llama):
    ak.add_adapter(llama, "a", BottleneckConfig())
    with pytest.raises(NotMergeableError, match="bottleneck"):
        ak.merge(llama, "a")
    piece = next(iter(ak.api.get_record(llama, "a").pieces.values()))
    with pytest.raises(NotMergeableError, match="bottleneck"):
        piece.merge()


def test_peft_export_refused(llama, tmp_path):
    ak.add_adapter(llama, "a", BottleneckConfig())
    with pytest.raises(ConfigError, match="bottleneck"):
        ak.save_adapter(llama, "a", tmp_path / "p", format="peft")
    assert not (tmp_path / "p").exists()


@pytest.mark.parametrize("arch,kw", [
    ("llama", dict(mode="houlsby", scaling="learned")),
    ("bert", dict(mode="pfeiffer")),
    ("bert", dict(mode="pfeiffer", residual_before_ln=False, non_linearity="tanh")),
    ("bert", dict(mode="parallel", bottleneck_size=7)),
])
def test_save_load_round_trip(arch, kw, ids, tmp_path):
    make = tiny_llama if arch == "llama" else tiny_bert
    m = make()
    ak.add_adapter(m, "a", BottleneckConfig(**kw))
    randomize_adapters(m)
    want = m(ids)[0]
    ak.save_adapter(m, "a", tmp_path / "bn")
    fresh = make()
    ak.load_adapter(fresh, tmp_path / "bn", name="a")
    assert ak.get_adapter_config(fresh, "a") == ak.get_adapter_config(m, "a")
    torch.testing.assert_close(fresh(ids)[0], want, rtol=0, atol=0)


def test_config_validation_and_defaults(llama):
    assert BottleneckConfig().reduction_factor == 16 and BottleneckConfig().non_linearity == "relu"
    hou = BottleneckConfig(mode="houlsby")
    assert (hou.non_linearity, hou.original_ln_before, hou.scaling) == ("swish", False, 1.0)
    par = BottleneckConfig(mode="parallel")
    assert (par.reduction_factor, par.scaling, par.init) == (2, 4.0, "mam_adapter")
    assert ak.make_config("bottleneck", mode="houlsby") == hou
    for bad in [dict(mode="sideways"), dict(non_linearity="relu6x"), dict(scaling="big"), dict(reduction_factor=0),
                dict(bottleneck_size=0), dict(init="xavier"), dict(dropout=1.0),
                dict(mode="parallel", original_ln_before=True), dict(residual_before_ln="post_add")]:
        with pytest.raises(ConfigError):
            BottleneckConfig(**bad)
    with pytest.raises(ConfigError, match="reduction_factr"):
        ak.make_config("bottleneck", reduction_factr=4)
    with pytest.raises(TargetNotFoundError, match="mpl"):
        ak.add_adapter(llama, "a", BottleneckConfig(targets=["mpl"]))


def test_explicit_targets_and_unknown_architecture(ids):
    m = tiny_llama()
    ak.add_adapter(m, "a", BottleneckConfig(mode="pfeiffer", targets=["self_attn"]))
    assert all(s.endswith("self_attn") for s in _sites(m, "a")) and len(_sites(m, "a")) == 2
    tiny = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
    with pytest.raises(TargetNotFoundError, match="targets"):
        ak.add_adapter(tiny, "a", BottleneckConfig())
    ak.add_adapter(tiny, "b", BottleneckConfig(targets=["2"], bottleneck_size=2))
    randomize_adapters(tiny)
    x = torch.randn(4, 8)
    p = piece_params(tiny, "b", "2")
    ak.set_adapter(tiny, None)
    y = tiny(x)
    ak.set_adapter(tiny, "b")
    torch.testing.assert_close(tiny(x), y + ref_a(p, y, F.relu, 1.0))


def test_model_to_dtype_after_attach(ids):
    m = tiny_bert()
    ak.add_adapter(m, "a", BottleneckConfig(mode="houlsby", scaling="learned"))
    randomize_adapters(m)
    want = m(ids).last_hidden_state
    m.to(torch.float64)
    assert {p.dtype for p in ak.api.adapter_parameters(m, "a").values()} == {torch.float64}
    torch.testing.assert_close(m(ids).last_hidden_state.float(), want, rtol=1e-5, atol=1e-5)


def test_parallel_on_a_linear_host_llm_adapters_style(ids):
    """mode="parallel" on down_proj: y = W x + s * up(tanh(down(x))), x: the (B, T, 128) intermediate."""
    m = tiny_llama()
    ref = copy.deepcopy(m)
    cfg = BottleneckConfig(mode="parallel", targets=["down_proj"], bottleneck_size=8, non_linearity="tanh", scaling=1.5)
    ak.add_adapter(m, "a", cfg)
    randomize_adapters(m)
    assert ak.trainable_parameters(m, "a") == 2 * ((128 * 8 + 8) + (8 * 64 + 64))
    for s in _sites(m, "a"):
        replace_module(ref, s, Series(ref.get_submodule(s), piece_params(m, "a", s), torch.tanh, 1.5, parallel=True))
    torch.testing.assert_close(m(ids).logits, ref(ids).logits, rtol=1e-5, atol=1e-5)
