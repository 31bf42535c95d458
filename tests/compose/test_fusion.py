"""AdapterHub blocks: Parallel, and AdapterFusion against a naive implementation of the paper."""
from __future__ import annotations

import pytest
import torch

import adapterkit as ak
from adapterkit.compose import Fuse, FusionConfig, Parallel, add_fusion
from adapterkit.errors import AdapterError, AdapterNotFoundError, ConfigError, UnsupportedModuleError
from conftest import randomize_adapters, tiny_bert, tiny_llama


def use(model, comp) -> None:
    """Activate a composition. Parallel.activate is idempotent: a no-op once set_adapter calls it."""
    ak.set_adapter(model, comp)
    if isinstance(comp, Parallel):
        comp.activate(model)


# -- Parallel ------------------------------------------------------------------------------------
def _llama3():
    m = tiny_llama()
    ak.add_adapter(m, "a", ak.LoRAConfig(r=4, targets=["q_proj", "down_proj"]))
    ak.add_adapter(m, "b", ak.BottleneckConfig(mode="pfeiffer", reduction_factor=8))
    ak.add_adapter(m, "c", ak.BottleneckConfig(mode="houlsby", reduction_factor=8))
    randomize_adapters(m, std=0.3)
    return m


def _alone(m, name, **inputs):
    ak.set_adapter(m, name)
    return m(**inputs)


def test_parallel_rows_equal_each_adapter_alone():
    m = _llama3()
    x = torch.randint(0, 128, (3, 7))
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[0, :2] = 0  # a left-padded row: the mask must be repeated with the ids
    want = [_alone(m, n, input_ids=x, attention_mask=mask).logits for n in ("a", "b", "c")]
    use(m, Parallel("a", "b", "c"))
    out = m(input_ids=x, attention_mask=mask).logits  # (3 * 3, 7, V)
    assert out.shape == (9, 7, 128)
    for i, w in enumerate(want):
        torch.testing.assert_close(out[3 * i:3 * (i + 1)], w, atol=1e-5, rtol=1e-5)
    assert (want[0] - want[1]).abs().max() > 1e-3  # the adapters really differ
    # positional input works too
    torch.testing.assert_close(m(x).logits[3:6], _alone(m, "b", input_ids=x).logits, atol=1e-5, rtol=1e-5)


def test_parallel_nested_block_and_labels_and_grads():
    m = _llama3()
    x = torch.randint(0, 128, (2, 6))
    stacked = ak.Stack("b", "c")
    ak.set_adapter(m, stacked)
    want_bc = m(input_ids=x, labels=x)
    want_a = _alone(m, "a", input_ids=x, labels=x)
    par = Parallel("a", stacked)
    use(m, par)
    out = m(input_ids=x, labels=x)
    torch.testing.assert_close(out.logits[:2], want_a.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.logits[2:], want_bc.logits, atol=1e-5, rtol=1e-5)
    # labels are repeated: equal token counts per copy, so the loss is the mean of both
    torch.testing.assert_close(out.loss, (want_a.loss + want_bc.loss) / 2, atol=1e-5, rtol=1e-5)
    # gradients: the first copy's rows reach only adapter "a"
    out.logits[:2].sum().backward()
    grads = {n: p.grad for n, p in m.named_parameters() if p.requires_grad}
    assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if ".adapterkit.a." in n)
    assert all(g is None or g.abs().sum() == 0 for n, g in grads.items() if ".adapterkit.a." not in n)


def test_parallel_pre_side_pieces_on_bert():
    # BERT Pfeiffer adapters sit on the LayerNorm's INPUT (pre-hook): the row slicing of the pre side
    m = tiny_bert()
    ak.add_adapter(m, "p", ak.BottleneckConfig(mode="pfeiffer", reduction_factor=8))
    ak.add_adapter(m, "q", ak.BottleneckConfig(mode="parallel", reduction_factor=8))
    randomize_adapters(m, std=0.3)
    x = torch.randint(0, 128, (2, 5))
    tt = torch.zeros(2, 5, dtype=torch.long)
    wp = _alone(m, "p", input_ids=x, token_type_ids=tt).last_hidden_state
    wq = _alone(m, "q", input_ids=x, token_type_ids=tt).last_hidden_state
    use(m, Parallel("p", "q"))
    out = m(input_ids=x, token_type_ids=tt).last_hidden_state
    torch.testing.assert_close(out, torch.cat([wp, wq]), atol=1e-5, rtol=1e-5)


def test_parallel_deactivates_and_refuses_misuse():
    m = _llama3()
    x = torch.randint(0, 128, (2, 5))
    par = Parallel("a", "b")
    use(m, par)
    n_hooks = len(m._forward_pre_hooks)
    assert m(x).logits.shape[0] == 4
    with ak.adapter_batch(m, ["b", None]):  # a mixed batch inside: not repeated, and Parallel stays active
        mixed = m(x).logits
    assert len(par._handles) == 2 and m(x).logits.shape[0] == 4
    torch.testing.assert_close(mixed[0], _alone(m, "b", input_ids=x).logits[0], atol=1e-5, rtol=1e-5)
    use(m, par)
    ak.set_adapter(m, "a")
    assert m(x).logits.shape[0] == 2  # the repeating hook is gone
    assert len(m._forward_pre_hooks) == n_hooks - 1 and not par._handles
    with pytest.raises(ConfigError, match="at least two"):
        Parallel("a")
    use(m, par)
    with pytest.raises(AdapterError, match="generation"):
        m.generate(x, max_new_tokens=2, do_sample=False)
    ak.set_adapter(m, ak.Stack("c", Parallel("a", "b")))  # not top level: no input repetition
    with pytest.raises(AdapterError, match="top-level"):
        m(x)


# -- AdapterFusion -------------------------------------------------------------------------------
def _fused(temperature: float = 1.0):
    m = tiny_llama()
    ak.add_adapter(m, "a", ak.BottleneckConfig(mode="pfeiffer", reduction_factor=8))
    ak.add_adapter(m, "b", ak.BottleneckConfig(mode="houlsby", reduction_factor=4))
    randomize_adapters(m, std=0.3)
    add_fusion(m, "f", ["a", "b"], temperature=temperature)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # a trained-looking fusion: V away from the identity, larger Q/K
        for p in ak.api.get_record(m, "f").pieces.values():
            for lin in (p.query, p.key, p.value):
                lin.weight.add_(torch.randn(lin.weight.shape, generator=g) * 0.2)
                lin.bias.add_(torch.randn(lin.bias.shape, generator=g) * 0.2)
    return m


def _naive_fusion(h, zs, Q, bq, K, bk, V, bv, T):
    """Pfeiffer et al. 2021, eqs. for one host, token by token: h (B, L, d), zs list of (B, L, d)."""
    out = torch.empty_like(h)
    for b in range(h.shape[0]):
        for t in range(h.shape[1]):
            q = Q @ h[b, t] + bq
            s = torch.stack([q @ (K @ z[b, t] + bk) for z in zs]) / T
            p = torch.exp(s - s.max())
            p = p / p.sum()
            out[b, t] = h[b, t] + sum(p[n] * (V @ zs[n][b, t] + bv) for n in range(len(zs)))
    return out


@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_fusion_matches_naive_paper_equations(temperature):
    m = _fused(temperature)
    x = torch.randint(0, 128, (2, 5))
    use(m, Fuse("a", "b", name="f"))
    got = m(x).logits
    ref = tiny_llama()  # the same base weights, no adapterkit: fusion done by plain hooks
    recs = {n: ak.api.get_record(m, n) for n in ("a", "b", "f")}
    mods = dict(ref.named_modules())
    for host, fp in recs["f"].pieces.items():
        srcs = [recs[n].pieces[host] for n in ("a", "b") if host in recs[n].pieces]

        def hook(mod, args, out, srcs=srcs, fp=fp):
            h = out[0] if isinstance(out, tuple) else out  # attention returns (h, weights)
            zs = [s.adapter(h) for s in srcs]  # bottleneck: up(act(down(h))) * s
            o = _naive_fusion(h, zs, fp.query.weight, fp.query.bias, fp.key.weight, fp.key.bias,
                              fp.value.weight, fp.value.bias, temperature)
            return (o, *out[1:]) if isinstance(out, tuple) else o

        mods[host].register_forward_hook(hook)
    with torch.no_grad():
        want = ref(x).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert set(recs["f"].pieces) == set(recs["b"].pieces)  # houlsby sites: attention and mlp
    # activating the fusion adapter by name is the same thing
    ak.set_adapter(m, "f")
    torch.testing.assert_close(m(x).logits, got, atol=0, rtol=0)


def test_fresh_fusion_of_one_adapter_is_that_adapter():
    m = tiny_llama()
    ak.add_adapter(m, "a", ak.LoRAConfig(r=4, targets=["q_proj", "down_proj"]))
    randomize_adapters(m, std=0.3)
    x = torch.randint(0, 128, (2, 5))
    want = _alone(m, "a", input_ids=x).logits
    add_fusion(m, "f", ["a"])
    use(m, Fuse("a", name="f"))
    torch.testing.assert_close(m(x).logits, want, atol=1e-5, rtol=1e-5)


def test_fusion_trains_only_fusion_counts_and_regularizer():
    m = _fused()
    recs = ak.api.get_record(m, "f")
    d, n_hosts = 64, 4  # 2 layers x (self_attn, mlp)
    assert len(recs.pieces) == n_hosts
    assert ak.trainable_parameters(m, "f") == n_hosts * 3 * d * (d + 1)
    assert ak.trainable_parameters(m, "a") == 0 and ak.trainable_parameters(m, "b") == 0
    assert ak.trainable_parameters(m) == n_hosts * 3 * d * (d + 1)
    use(m, Fuse("a", "b", name="f"))
    m.train()
    x = torch.randint(0, 128, (2, 5))
    m(input_ids=x, labels=x).loss.backward()
    for n, p in m.named_parameters():
        moved = p.grad is not None and p.grad.abs().sum() > 0
        if ".adapterkit.f." not in n:
            assert not moved, n
        elif "self_attn" in n and ("query" in n or "key" in n):
            assert not moved, n  # one source there ("b"): softmax over one adapter is constant
        else:
            assert moved, n
    want = sum(0.01 * (p.value.weight - torch.eye(d)).pow(2).sum() for p in recs.pieces.values())
    torch.testing.assert_close(ak.api.regularization_loss(m, "f"), want)


def test_fusion_save_load_and_mixed_batch(tmp_path):
    m = _fused()
    x = torch.randint(0, 128, (2, 5))
    use(m, Fuse("a", "b", name="f"))
    want = m(x).logits
    for n in ("a", "b", "f"):
        ak.save_adapter(m, n, tmp_path / n)
    fresh = tiny_llama()
    ak.load_adapter(fresh, tmp_path / "a")
    ak.load_adapter(fresh, tmp_path / "b")
    ak.load_adapter(fresh, tmp_path / "f")
    ak.set_adapter(fresh, Fuse("a", "b", name="f"))
    torch.testing.assert_close(fresh(x).logits, want, atol=1e-6, rtol=1e-6)
    base = _alone(m, None, input_ids=x).logits
    with ak.adapter_batch(m, ["f", None]):
        mixed = m(x).logits
    torch.testing.assert_close(mixed[0], want[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mixed[1], base[1], atol=1e-5, rtol=1e-5)


def test_fusion_errors():
    m = _fused()
    with pytest.raises(AdapterNotFoundError, match="'b'"):
        add_fusion(m, "g", ["a", "bb"])
    with pytest.raises(ConfigError, match="twice"):
        FusionConfig(adapters=("a", "a"))
    with pytest.raises(ConfigError, match="temperature"):
        FusionConfig(adapters=("a",), temperature=0)
    with pytest.raises(ConfigError, match="targets"):
        FusionConfig(adapters=("a",), targets=["mlp"])
    with pytest.raises(ConfigError, match="fusion adapter"):
        add_fusion(m, "g", ["a", "f"])
    ak.set_adapter(m, Fuse("b", "a", name="f"))
    with pytest.raises(ConfigError, match="reads"):
        m(torch.randint(0, 128, (1, 3)))
    bert = tiny_bert()
    ak.add_adapter(bert, "p", ak.BottleneckConfig(mode="pfeiffer"))
    with pytest.raises(UnsupportedModuleError, match="LayerNorm"):
        add_fusion(bert, "g", ["p"])
    assert ak.list_adapters(bert) == ["p"]
    ak.delete_adapter(m, "a")  # a source deleted under its fusion: a typed error, never a silent skip
    ak.set_adapter(m, "f")
    with pytest.raises(AdapterNotFoundError, match="'a' was deleted"):
        m(torch.randint(0, 128, (1, 3)))
