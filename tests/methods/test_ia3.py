"""(IA)^3 against explicit re-implementations of the rescaled layers, and against PEFT."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import adapterkit as ak
from adapterkit.errors import ConfigError, NotMergeableError, TargetNotFoundError
from adapterkit.methods import IA3Config
from _method_checks import (adapter_pieces, assert_fresh_adapter_is_identity, assert_mixed_batch_rows_match,
                            random_biases, replace_module)
from conftest import randomize_adapters, tiny_bert, tiny_gpt2, tiny_llama, tiny_vit

MAKERS = {"llama": tiny_llama, "gpt2": tiny_gpt2, "bert": tiny_bert}
#: expected (output-scaled, input-scaled) module suffixes for the default targets
DEFAULTS = {
    "llama": ({"k_proj", "v_proj"}, {"down_proj"}),
    "gpt2": ({"c_attn"}, {"mlp.c_proj"}),
    "bert": ({"key", "value"}, {"output.dense"}),
}


class Scaled(nn.Module):
    """A Linear / Conv1D computed by hand, then rescaled: (W x + b) * l  or  W (x * l) + b."""

    def __init__(self, host: nn.Module, l: torch.Tensor, feedforward: bool):
        super().__init__()
        self.host, self.l, self.ff = host, l.flatten(), feedforward

    def forward(self, x):
        w, b = self.host.weight, self.host.bias
        lin = (lambda t: F.linear(t, w, b)) if isinstance(self.host, nn.Linear) else (lambda t: t @ w + b)
        return lin(x * self.l) if self.ff else lin(x) * self.l


@pytest.fixture
def ids():
    torch.manual_seed(123)
    return torch.randint(0, 128, (3, 7))


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_default_targets_shapes_and_reference(arch, ids):
    model = random_biases(MAKERS[arch]())
    ref = copy.deepcopy(model)
    base = model(ids)[0]
    ak.add_adapter(model, "a", IA3Config())
    randomize_adapters(model)
    out_sfx, in_sfx = DEFAULTS[arch]
    pieces = adapter_pieces(model)
    for host, piece in pieces.items():
        ff = any(host.endswith("." + s) for s in in_sfx)
        assert ff or any(host.endswith("." + s) for s in out_sfx), host
        mod = ref.get_submodule(host)
        out_f, in_f = (mod.out_features, mod.in_features) if isinstance(mod, nn.Linear) else mod.weight.shape[::-1]
        assert piece.ia3_l.shape == ((1, in_f) if ff else (out_f, 1))
        assert f"{host}.adapterkit.a.ia3_l" in model.state_dict()
        replace_module(ref, host, Scaled(mod, piece.ia3_l.detach().clone(), ff))
    n_layers = 2
    assert len(pieces) == n_layers * (len(out_sfx) + len(in_sfx) + (1 if arch == "bert" else 0))  # bert: 2 x output.dense
    got, exp = model(ids)[0], ref(ids)[0]
    assert not torch.allclose(got, base, atol=1e-3)
    torch.testing.assert_close(got, exp, rtol=1e-5, atol=1e-5)


def test_vit_defaults():
    torch.manual_seed(0)
    px = torch.randn(2, 3, 32, 32)
    m = tiny_vit()
    ak.add_adapter(m, "a", IA3Config())
    kinds = {h.rsplit(".", 1)[-1]: type(p).__name__ for h, p in adapter_pieces(m).items()}
    assert kinds == {"k_proj": "IA3Out", "v_proj": "IA3Out", "fc2": "IA3In"}
    assert m(pixel_values=px).logits.shape == (2, 5)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_fresh_adapter_is_identity(arch, ids):
    assert_fresh_adapter_is_identity(MAKERS[arch](), ids, IA3Config())


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_merge_unmerge(arch, ids):
    m = random_biases(MAKERS[arch]())
    orig = {k: v.clone() for k, v in m.state_dict().items()}
    ak.add_adapter(m, "a", IA3Config())
    randomize_adapters(m)
    want = m(ids)[0]
    ak.merge(m, "a")
    changed = [k for k, v in orig.items() if not torch.equal(m.state_dict()[k], v)]
    assert changed and all(k.endswith((".weight", ".bias")) for k in changed)
    torch.testing.assert_close(m(ids)[0], want, rtol=0, atol=1e-4)
    ak.unmerge(m, "a")
    for k, v in orig.items():
        torch.testing.assert_close(m.state_dict()[k], v, rtol=0, atol=1e-6)
    torch.testing.assert_close(m(ids)[0], want, rtol=0, atol=1e-5)


def test_merge_two_adapters_stacked(llama, ids):
    ak.add_adapter(llama, "a", IA3Config())
    ak.add_adapter(llama, "b", IA3Config(targets=["v_proj", "up_proj"], feedforward_targets=["up_proj"]))
    randomize_adapters(llama)
    ak.set_adapter(llama, ["a", "b"])
    want = llama(ids).logits
    ak.merge(llama, "a")
    ak.merge(llama, "b")
    torch.testing.assert_close(llama(ids).logits, want, rtol=0, atol=1e-4)


def test_merge_refuses_zero_vector(llama):
    ak.add_adapter(llama, "a", IA3Config(targets=["k_proj"]))
    before = llama.model.layers[0].self_attn.k_proj.weight.clone()
    with torch.no_grad():
        adapter_pieces(llama)["model.layers.1.self_attn.k_proj"].ia3_l[3, 0] = 0.0
    with pytest.raises(NotMergeableError, match="zeros"):
        ak.merge(llama, "a")
    torch.testing.assert_close(llama.model.layers[0].self_attn.k_proj.weight, before, rtol=0, atol=0)


def test_mixed_batch_equals_rows_alone(ids):
    m = tiny_gpt2()
    ak.add_adapter(m, "a", IA3Config())
    ak.add_adapter(m, "b", IA3Config(targets=["c_fc", "attn.c_proj"], feedforward_targets=["attn.c_proj"]))
    randomize_adapters(m)
    names = ["a", None, "b"]
    assert_mixed_batch_rows_match(m, ids, names)


def test_trainable_counts_closed_form():
    m = tiny_llama()  # k/v: 2 kv heads x 16 = 32 outputs; down_proj: 128 inputs
    ak.add_adapter(m, "a", IA3Config())
    assert ak.trainable_parameters(m, "a") == 2 * (32 + 32 + 128)
    g = tiny_gpt2()  # c_attn: 3 x 64 outputs; mlp.c_proj: 4 x 64 inputs
    ak.add_adapter(g, "a", IA3Config())
    assert ak.trainable_parameters(g, "a") == 2 * (192 + 256)
    b = tiny_bert()  # key, value: 64 outputs; attention.output.dense: 64 inputs, output.dense: 128 inputs
    ak.add_adapter(b, "a", IA3Config())
    assert ak.trainable_parameters(b, "a") == 2 * (64 + 64 + 64 + 128)


def test_gradients_only_on_adapter_params(llama, ids):
    ak.add_adapter(llama, "a", IA3Config())
    randomize_adapters(llama)
    llama(ids).logits.pow(2).mean().backward()
    for n, p in llama.named_parameters():
        if ".adapterkit.a." in n:
            assert p.grad is not None and p.grad.abs().sum() > 0, n
        else:
            assert not p.requires_grad and p.grad is None, n


def test_save_load_round_trip(ids, tmp_path):
    m = tiny_gpt2()
    ak.add_adapter(m, "a", IA3Config(targets=["c_attn", "c_fc", "mlp.c_proj"], feedforward_targets=["mlp.c_proj"]))
    randomize_adapters(m)
    want = m(ids).logits
    ak.save_adapter(m, "a", tmp_path / "ia3")
    fresh = tiny_gpt2()
    ak.load_adapter(fresh, tmp_path / "ia3", name="a")
    assert ak.get_adapter_config(fresh, "a") == ak.get_adapter_config(m, "a")
    torch.testing.assert_close(fresh(ids).logits, want, rtol=0, atol=0)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_matches_peft(arch, ids):
    """Same vectors in PEFT's IA3 model give the same logits: interop is a key rename."""
    peft = pytest.importorskip("peft")
    m = MAKERS[arch]()
    theirs = copy.deepcopy(m)
    ak.add_adapter(m, "a", IA3Config())
    randomize_adapters(m)
    tg = sorted(DEFAULTS[arch][0] | DEFAULTS[arch][1])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(theirs, peft.IA3Config(target_modules=tg, feedforward_modules=sorted(DEFAULTS[arch][1])))
    ours = ak.api.adapter_state_dict(m, "a")
    sd = {k: v for k, v in pm.state_dict().items() if "ia3_l" in k}
    assert len(sd) == len(ours)
    with torch.no_grad():
        for k, p in pm.named_parameters():
            if "ia3_l" in k:
                key = k.replace("base_model.model.", "", 1).replace(".ia3_l.default", ".ia3_l")
                assert ours[key].shape == p.shape, key
                p.copy_(ours[key])
    torch.testing.assert_close(m(ids).logits, pm(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_config_errors(llama):
    with pytest.raises(ConfigError, match="subset"):
        ak.add_adapter(llama, "a", IA3Config(targets=["k_proj"], feedforward_targets=["down_proj"]))
    with pytest.raises(ConfigError, match="subset"):
        IA3Config(feedforward_targets=["down_proj"])
    with pytest.raises(ConfigError):
        IA3Config(targets=["k_proj"], feedforward_targets=[""])
    with pytest.raises(TargetNotFoundError, match="k_prj"):
        ak.add_adapter(llama, "a", IA3Config(targets=["k_prj"]))
    with pytest.raises(ConfigError, match="feedforward_target"):
        ak.make_config("ia3", feedforward_target=["x"])
    assert ak.list_adapters(llama) == []
    tiny = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(TargetNotFoundError, match="targets"):
        ak.add_adapter(tiny, "a", IA3Config())


def test_peft_files_round_trip(ids, tmp_path):
    """Our PEFT export loads in PEFT with the same logits; PEFT's own save loads back into adapterkit."""
    peft = pytest.importorskip("peft")
    m = tiny_llama()
    ak.add_adapter(m, "a", IA3Config())
    randomize_adapters(m)
    want = m(ids).logits
    ak.save_adapter(m, "a", tmp_path / "p", format="peft")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "p"))
    torch.testing.assert_close(pm(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)
    pm.save_pretrained(str(tmp_path / "from_peft"))
    fresh = tiny_llama()
    ak.load_adapter(fresh, tmp_path / "from_peft", name="b")
    kinds = {h.rsplit(".", 1)[-1]: type(p).__name__ for h, p in adapter_pieces(fresh, "b").items()}
    assert kinds == {"k_proj": "IA3Out", "v_proj": "IA3Out", "down_proj": "IA3In"}
    torch.testing.assert_close(fresh(ids).logits, want, rtol=1e-5, atol=1e-5)


def test_model_to_dtype_after_attach(ids):
    """Moving/casting the model after attaching casts the vectors too (and stays correct)."""
    m = random_biases(tiny_gpt2())
    ak.add_adapter(m, "a", IA3Config())
    randomize_adapters(m)
    want = m(ids).logits
    m.to(torch.float64)
    assert {p.dtype for p in ak.api.adapter_parameters(m, "a").values()} == {torch.float64}
    torch.testing.assert_close(m(ids).logits.float(), want, rtol=1e-5, atol=1e-5)
    ak.merge(m, "a")
    torch.testing.assert_close(m(ids).logits.float(), want, rtol=1e-5, atol=1e-5)
