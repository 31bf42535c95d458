"""VL-Adapter-style shared adapters: each task's rows equal a plain bottleneck adapter holding
that task's weights; exact parameter counts; task ids."""
from __future__ import annotations

import pytest
import torch

import adapterkit as ak
from adapterkit.compose import SharedAdapterConfig, task_ids
from adapterkit.errors import AdapterError, ConfigError, UnsupportedModuleError
from conftest import tiny_bert, tiny_llama

T = 3


def _randomize(m, name, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in ak.api.adapter_parameters(m, name).values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def _plain_for_task(make, cfg: SharedAdapterConfig, shared_model, t: int):
    """A fresh base with a plain bottleneck adapter holding task t's weights."""
    m = make()
    bcfg = ak.BottleneckConfig(mode=cfg.mode, reduction_factor=cfg.reduction_factor, non_linearity=cfg.non_linearity,
                               scaling=1.0, original_ln_before=False if cfg.mode != "parallel" else None)
    ak.add_adapter(m, "p", bcfg)
    src = ak.api.get_record(shared_model, "s").pieces
    with torch.no_grad():
        for h, piece in ak.api.get_record(m, "p").pieces.items():
            sp = src[h]
            di = t if sp.down_weight.shape[0] > 1 else 0
            ui = t if sp.up_weight.shape[0] > 1 else 0
            piece.adapter_down.weight.copy_(sp.down_weight[di])
            piece.adapter_down.bias.copy_(sp.down_bias[di])
            piece.adapter_up.weight.copy_(sp.up_weight[ui])
            piece.adapter_up.bias.copy_(sp.up_bias[ui])
    return m


def _out(m, x):
    o = m(x)
    return o.logits if hasattr(o, "logits") and o.logits is not None else o.last_hidden_state


@pytest.mark.parametrize("share", ["all", "down", "up", "none"])
@pytest.mark.parametrize("kind,mode", [("llama", "pfeiffer"), ("llama", "parallel"), ("llama", "houlsby"),
                                       ("bert", "pfeiffer")])
def test_each_task_equals_a_plain_bottleneck(kind, mode, share):
    make = tiny_llama if kind == "llama" else tiny_bert
    m = make()
    cfg = SharedAdapterConfig(n_tasks=T, share=share, mode=mode, reduction_factor=8)
    ak.add_adapter(m, "s", cfg)
    _randomize(m, "s")
    x = torch.randint(0, 128, (4, 6))
    ids = torch.tensor([2, 0, 1, 2])
    with task_ids(m, ids), torch.no_grad():
        got = _out(m, x)
    outs = []
    for t in range(T):
        with torch.no_grad():
            want = _out(_plain_for_task(make, cfg, m, t), x)
        outs.append(want)
        rows = (ids == t).nonzero().flatten()
        torch.testing.assert_close(got[rows], want[rows], atol=1e-5, rtol=1e-5)
    if share != "all":
        assert (outs[0] - outs[1]).abs().max() > 1e-3  # tasks really differ


@pytest.mark.parametrize("share", ["all", "down", "up", "none"])
def test_counts_closed_form(share):
    m = tiny_llama()
    ak.add_adapter(m, "s", SharedAdapterConfig(n_tasks=T, share=share, mode="houlsby", reduction_factor=8))
    H, d, b = 4, 64, 8  # 2 layers x (self_attn, mlp)
    td = 1 if share in ("all", "down") else T
    tu = 1 if share in ("all", "up") else T
    assert ak.trainable_parameters(m, "s") == H * (td * (b * d + b) + tu * (d * b + d))


def test_grads_per_task_mixed_batch_and_save_load(tmp_path):
    m = tiny_llama()
    ak.add_adapter(m, "s", SharedAdapterConfig(n_tasks=T, share="down", reduction_factor=8))
    _randomize(m, "s")
    x = torch.randint(0, 128, (3, 5))
    with task_ids(m, [0, 0, 2]):
        m(x).logits.sum().backward()
    up = ak.api.get_record(m, "s").pieces["model.layers.0.mlp"].up_weight.grad  # (T, d, b)
    assert up[0].abs().sum() > 0 and up[2].abs().sum() > 0 and up[1].abs().sum() == 0
    with task_ids(m, [1, 0, 2]), torch.no_grad():
        want = m(x).logits
        with ak.adapter_batch(m, ["s", None, "s"]):
            mixed = m(x).logits
    ak.set_adapter(m, None)
    with torch.no_grad():
        base = m(x).logits
    torch.testing.assert_close(mixed[[0, 2]], want[[0, 2]], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mixed[1], base[1], atol=1e-5, rtol=1e-5)
    ak.save_adapter(m, "s", tmp_path / "s")
    fresh = tiny_llama()
    ak.load_adapter(fresh, tmp_path / "s")
    with task_ids(fresh, [1, 0, 2]), torch.no_grad():
        torch.testing.assert_close(fresh(x).logits, want, atol=1e-6, rtol=1e-6)
    with task_ids(fresh, 2), torch.no_grad():  # one id for every row
        torch.testing.assert_close(fresh(x).logits[2], want[2], atol=1e-5, rtol=1e-5)


def test_errors():
    m = tiny_llama()
    ak.add_adapter(m, "s", SharedAdapterConfig(n_tasks=T, share="up"))
    x = torch.randint(0, 128, (2, 5))
    with pytest.raises(AdapterError, match="task_ids"):
        m(x)
    with pytest.raises(AdapterError, match="out of range"):
        with task_ids(m, [0, 3]):
            m(x)
    with pytest.raises(AdapterError, match="3 task ids for a batch of 2"):
        with task_ids(m, [0, 1, 2]):
            m(x)
    ak.add_adapter(m, "one", SharedAdapterConfig(n_tasks=T, share="all"))
    ak.set_adapter(m, "one")
    assert torch.isfinite(m(x).logits).all()  # one adapter for every task: no ids needed
    with pytest.raises(ConfigError, match="share"):
        SharedAdapterConfig(n_tasks=2, share="half")
    with pytest.raises(ConfigError, match="n_tasks"):
        SharedAdapterConfig(n_tasks=0)
    with pytest.raises(UnsupportedModuleError, match="post-LN"):
        ak.add_adapter(tiny_bert(), "p", SharedAdapterConfig(n_tasks=2, mode="parallel"))


def test_registered_and_made_by_name():
    cfg = ak.make_config("shared_adapter", n_tasks=2, share="up")
    assert isinstance(cfg, SharedAdapterConfig) and cfg.to_dict()["share"] == "up"
    with pytest.raises(ConfigError, match="Closest: 'share'"):
        ak.make_config("shared_adapter", shrae="up")
