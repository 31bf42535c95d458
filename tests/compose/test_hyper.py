"""Hyperformer++: generated adapters against a naive re-implementation of the paper's
equations, exact parameter counts, task ids, save/load."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import adapterkit as ak
from adapterkit.compose import HyperformerConfig, task_ids
from adapterkit.errors import AdapterError, ConfigError
from conftest import tiny_llama

T = 3
CFG = dict(n_tasks=T, task_dim=8, site_dim=4, hidden_dim=16, proj_dim=6, reduction_factor=8)


def _model(mode="houlsby", seed=1, **kw):
    m = tiny_llama()
    ak.add_adapter(m, "h", HyperformerConfig(mode=mode, **{**CFG, **kw}))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # a trained-looking network (the up generators start at zero)
        for p in ak.api.adapter_parameters(m, "h").values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return m


def _naive_weights(sd, task, site, b, d):
    """The paper's equations, written out with the raw tensors of the state dict."""
    i = torch.cat([sd["task_embedding"][task], sd["site_embedding"][site]])
    i = F.relu(sd["projector.0.weight"] @ i + sd["projector.0.bias"])
    i = sd["projector.2.weight"] @ i + sd["projector.2.bias"]
    wd = (sd["down_weight.weight"] @ i + sd["down_weight.bias"]).view(b, d)
    bd = sd["down_bias.weight"] @ i + sd["down_bias.bias"]
    wu = (sd["up_weight.weight"] @ i + sd["up_weight.bias"]).view(d, b)
    bu = sd["up_bias.weight"] @ i + sd["up_bias.bias"]
    return wd, bd, wu, bu


@pytest.mark.parametrize("mode", ["houlsby", "parallel"])
def test_hyperformer_matches_naive_equations(mode):
    m = _model(mode)
    x = torch.randint(0, 128, (3, 5))
    ids = [2, 0, 2]
    with task_ids(m, ids), torch.no_grad():
        got = m(x).logits
    sd = ak.api.adapter_state_dict(m, "h")
    sites = [h for h in ak.api.get_record(m, "h").pieces if h]
    assert len(sites) == (4 if mode == "houlsby" else 2)
    ref = tiny_llama()
    mods = dict(ref.named_modules())
    b, d = 8, 64
    for k, host in enumerate(sites):
        def hook(mod, args, kwargs, out, k=k):
            y = out[0] if isinstance(out, tuple) else out
            inp = args[0] if args else kwargs["hidden_states"]
            o = y.clone()
            for row, t in enumerate(ids):  # row by row, each with its own generated adapter
                wd, bd, wu, bu = _naive_weights(sd, t, k, b, d)
                h = inp[row] if mode == "parallel" else y[row]
                o[row] = y[row] + F.relu(h @ wd.T + bd) @ wu.T + bu
            return (o, *out[1:]) if isinstance(out, tuple) else o

        mods[host].register_forward_hook(hook, with_kwargs=True)
    with torch.no_grad():
        want = ref(x).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_counts_closed_form_one_network_for_all_sites():
    t, l, hid, p, b, d = 8, 4, 16, 6, 8, 64

    def closed(L):
        return (T * t + L * l + (t + l) * hid + hid + hid * p + p
                + (p + 1) * b * d + (p + 1) * b + (p + 1) * d * b + (p + 1) * d)

    for mode, L in (("pfeiffer", 2), ("houlsby", 4)):
        m = tiny_llama()
        ak.add_adapter(m, "h", HyperformerConfig(mode=mode, **CFG))
        assert ak.trainable_parameters(m, "h") == closed(L)
        assert ak.trainable_parameters(m) == closed(L)
    assert closed(4) - closed(2) == 2 * l  # more sites cost only their embeddings


def test_fresh_is_identity_grads_and_unused_task_rows():
    m = tiny_llama()
    x = torch.randint(0, 128, (2, 5))
    with torch.no_grad():
        base = m(x).logits
    ak.add_adapter(m, "h", HyperformerConfig(**CFG))
    with task_ids(m, [1, 2]), torch.no_grad():
        torch.testing.assert_close(m(x).logits, base, atol=0, rtol=0)  # up generators start at zero
    m = _model()
    with task_ids(m, [0, 0]):
        m(input_ids=x, labels=x).loss.backward()
    params = ak.api.adapter_parameters(m, "h")
    emb = params["adapterkit.h.task_embedding"].grad
    assert emb[0].abs().sum() > 0 and emb[1:].abs().sum() == 0  # only the used task's embedding moves
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for k, p in params.items() if "task_embedding" not in k)
    assert all(p.grad is None for n, p in m.named_parameters() if ".adapterkit." not in f".{n}")


def test_mixed_batch_save_load(tmp_path):
    m = _model()
    x = torch.randint(0, 128, (3, 5))
    with task_ids(m, [1, 0, 2]), torch.no_grad():
        want = m(x).logits
        with ak.adapter_batch(m, [None, "h", "h"]):
            mixed = m(x).logits
    torch.testing.assert_close(mixed[1:], want[1:], atol=1e-5, rtol=1e-5)
    ak.save_adapter(m, "h", tmp_path / "h")
    fresh = tiny_llama()
    ak.load_adapter(fresh, tmp_path / "h")
    with task_ids(fresh, [1, 0, 2]), torch.no_grad():
        torch.testing.assert_close(fresh(x).logits, want, atol=1e-6, rtol=1e-6)


def test_errors():
    m = _model()
    x = torch.randint(0, 128, (2, 5))
    with pytest.raises(AdapterError, match="task_ids"):
        m(x)
    with pytest.raises(AdapterError, match="out of range"):
        with task_ids(m, [0, 5]):
            m(x)
    with pytest.raises(ConfigError, match="same"):
        ak.add_adapter(tiny_llama(), "h", HyperformerConfig(targets=["q_proj", "k_proj"], **CFG))
    with pytest.raises(ConfigError, match="task_dim"):
        HyperformerConfig(task_dim=0)
    with pytest.raises(ConfigError, match="mode"):
        HyperformerConfig(mode="series")


def test_registered_and_made_by_name():
    cfg = ak.make_config("hyperformer", n_tasks=4, task_dim=8)
    assert isinstance(cfg, HyperformerConfig) and HyperformerConfig.from_dict(cfg.to_dict()) == cfg
