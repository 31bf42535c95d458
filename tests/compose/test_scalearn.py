"""ScaLearn: the four variants against a plain reference, closed-form parameter counts."""
from __future__ import annotations

import pytest
import torch

import adapterkit as ak
from adapterkit.compose import ScaLearn, ScaLearnConfig, add_scalearn
from adapterkit.errors import ConfigError
from conftest import randomize_adapters, tiny_llama

VARIANTS = {  # name: (uniform, shared)
    "scalearn": (False, False),
    "uniform": (True, False),
    "scalearn++": (False, True),
    "uniform++": (True, True),
}


def _sources():
    m = tiny_llama()
    ak.add_adapter(m, "a", ak.BottleneckConfig(mode="pfeiffer", reduction_factor=8))  # mlp
    ak.add_adapter(m, "b", ak.BottleneckConfig(mode="houlsby", reduction_factor=4))  # self_attn + mlp
    ak.add_adapter(m, "c", ak.LoRAConfig(r=4, targets=["down_proj"]))
    randomize_adapters(m, std=0.3)
    return m


def _randomize_omegas(m, name):
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in ak.api.adapter_parameters(m, name).values():
            p.copy_(torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_scalearn_matches_reference(variant):
    uniform, shared = VARIANTS[variant]
    m = _sources()
    srcs = ("a", "b", "c")
    add_scalearn(m, "s", srcs, uniform=uniform, shared=shared)
    _randomize_omegas(m, "s")
    x = torch.randint(0, 128, (2, 6))
    ak.set_adapter(m, ScaLearn(*srcs, name="s"))
    got = m(x).logits

    # reference: each source's output delta computed alone (source activated by itself, on a
    # plain hook-captured host output), then y + sum_n omega_n * a_n with the raw coefficients
    recs = {n: ak.api.get_record(m, n) for n in (*srcs, "s")}
    params = ak.api.adapter_state_dict(m, "s")
    ref = tiny_llama()
    mods = dict(ref.named_modules())
    for host in [h for h in recs["s"].pieces if h]:
        om = params["omega"] if shared else params[f"{host}.omega"]  # (N,) or (N, d)

        def hook(mod, args, kwargs, out, host=host, om=om):
            y = out[0] if isinstance(out, tuple) else out
            xin = args[0] if args else kwargs["hidden_states"]
            o = y.clone()
            for i, n in enumerate(srcs):
                piece = recs[n].pieces.get(host)
                if piece is None:
                    continue
                if isinstance(piece, ak.methods.lora.LoRAPiece):
                    a = (xin @ piece.lora_A.T @ piece.lora_B.T) * piece.scaling
                else:
                    a = piece.adapter(y)
                w = om[i] if uniform else om[i].view(1, 1, -1)
                o = o + w * a
            return (o, *out[1:]) if isinstance(out, tuple) else o

        mods[host].register_forward_hook(hook, with_kwargs=True)
    with torch.no_grad():
        want = ref(x).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_scalearn_counts_closed_form(variant):
    uniform, shared = VARIANTS[variant]
    m = _sources()
    add_scalearn(m, "s", ["a", "b", "c"], uniform=uniform, shared=shared)
    H, N, d = 6, 3, 64  # hosts: 2 x (self_attn, mlp, down_proj); 3 sources; width 64
    assert len([h for h in ak.api.get_record(m, "s").pieces if h]) == H
    per_source = 1 if uniform else d
    want = N * per_source if shared else H * N * per_source
    assert ak.trainable_parameters(m, "s") == want
    assert ak.trainable_parameters(m) == want  # sources frozen
    assert {"scalearn": 1152, "uniform": 18, "scalearn++": 192, "uniform++": 3}[variant] == want


def test_uniform_pp_with_eight_sources_has_eight_parameters():
    m = tiny_llama()
    names = [f"t{i}" for i in range(8)]
    for n in names:
        ak.add_adapter(m, n, ak.BottleneckConfig(mode="pfeiffer", bottleneck_size=2))
    add_scalearn(m, "s", names, uniform=True, shared=True)
    assert ak.trainable_parameters(m, "s") == 8  # the paper's "8 transfer parameters"


def test_fresh_scalearn_is_the_average_of_its_sources():
    m = _sources()
    x = torch.randint(0, 128, (2, 6))
    ak.set_adapter(m, ak.Average("a", "b", "c"))
    want = m(x).logits
    add_scalearn(m, "s", ["a", "b", "c"])
    ak.set_adapter(m, ScaLearn("a", "b", "c", name="s"))
    torch.testing.assert_close(m(x).logits, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shared", [False, True])
def test_scalearn_grads_save_load_mixed_batch(tmp_path, shared):
    m = _sources()
    add_scalearn(m, "s", ["a", "b", "c"], uniform=False, shared=shared)
    _randomize_omegas(m, "s")
    ak.set_adapter(m, ScaLearn("a", "b", "c", name="s"))
    x = torch.randint(0, 128, (2, 6))
    m(input_ids=x, labels=x).loss.backward()
    for n, p in m.named_parameters():
        moved = p.grad is not None and p.grad.abs().sum() > 0
        assert moved == ("adapterkit.s." in n), n
    with torch.no_grad():
        want = m(x).logits
    for n in ("a", "b", "c", "s"):
        ak.save_adapter(m, n, tmp_path / n)
    fresh = tiny_llama()
    for n in ("a", "b", "c", "s"):
        ak.load_adapter(fresh, tmp_path / n)
    ak.set_adapter(fresh, "s")  # the adapter by name = the block
    with torch.no_grad():
        torch.testing.assert_close(fresh(x).logits, want, atol=1e-6, rtol=1e-6)
        with ak.adapter_batch(fresh, [None, "s"]):
            mixed = fresh(x).logits
        torch.testing.assert_close(mixed[1], want[1], atol=1e-5, rtol=1e-5)
        ak.set_adapter(fresh, None)
        torch.testing.assert_close(mixed[0], fresh(x).logits[0], atol=1e-5, rtol=1e-5)


def test_scalearn_errors():
    m = tiny_llama()
    ak.add_adapter(m, "q", ak.LoRAConfig(r=2, targets=["q_proj"]))  # width 64
    ak.add_adapter(m, "k", ak.LoRAConfig(r=2, targets=["k_proj"]))  # width 32
    with pytest.raises(ConfigError, match="widths differ"):
        add_scalearn(m, "s", ["q", "k"], shared=True)
    add_scalearn(m, "s", ["q", "k"], uniform=True, shared=True)  # scalars: any widths
    assert ak.trainable_parameters(m, "s") == 2
    with pytest.raises(ConfigError, match="init"):
        ScaLearnConfig(adapters=("q",), init=True)
    with pytest.raises(ConfigError, match="non-empty"):
        ScaLearnConfig(adapters=())
    with pytest.raises(ak.errors.AdapterNotFoundError, match="'q'"):
        add_scalearn(m, "t", ["qq"])
    ak.set_adapter(m, ScaLearn("k", "q", name="s"))
    with pytest.raises(ConfigError, match="reads"):
        m(torch.randint(0, 128, (1, 3)))


def test_parallel_with_root_level_coefficients():
    # ScaLearn++ keeps its coefficients on the root model; with labels the root's main output is the
    # loss (a scalar): Parallel must leave the root alone
    from adapterkit.compose import Parallel

    m = _sources()
    add_scalearn(m, "s", ["a", "b", "c"], shared=True)
    _randomize_omegas(m, "s")
    x = torch.randint(0, 128, (2, 6))
    with torch.no_grad():
        want = []
        for n in ("s", "a"):
            ak.set_adapter(m, n)
            want.append(m(input_ids=x, labels=x))
        par = Parallel("s", "a")
        ak.set_adapter(m, par)
        par.activate(m)  # a no-op once set_adapter calls Composition.activate
        out = m(input_ids=x, labels=x)
    torch.testing.assert_close(out.logits, torch.cat([w.logits for w in want]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.loss, (want[0].loss + want[1].loss) / 2, atol=1e-5, rtol=1e-5)


def test_registered_and_made_by_name():
    cfg = ak.make_config("scalearn", adapters=["a", "b"], uniform=True)
    assert isinstance(cfg, ScaLearnConfig) and cfg.adapters == ("a", "b")
    assert ScaLearnConfig.from_dict(cfg.to_dict()) == cfg
