"""LT-SFT against its definition: top-k of |W1 - W0| after full fine-tuning, W' = W + scatter(values)."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

import adapterkit as ak
from adapterkit.api import get_record
from adapterkit.errors import AdapterFileError, ConfigError
from adapterkit.methods.sft import SFTConfig, SparseDeltaPiece, prepare_sft
from _method_checks import assert_base_restored, base_weights
from conftest import randomize_adapters, tiny_gpt2, tiny_llama

TARGETS = ["q_proj", "v_proj", "down_proj"]


def _batches(n: int = 2, seed: int = 5) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 128, (2, 8), generator=g) for _ in range(n)]


def _dense(piece: SparseDeltaPiece) -> torch.Tensor:
    """Reference D (out, in) from the piece's (indices, values), built entry by entry."""
    D = torch.zeros(piece.out_features, piece.in_features)
    for i, v in zip(piece.indices.tolist(), piece.values.detach().tolist()):
        D[i // piece.in_features, i % piece.in_features] += v
    return D


def _with_deltas(model: nn.Module, deltas: dict[str, torch.Tensor]) -> nn.Module:
    mods = dict(model.named_modules())
    with torch.no_grad():
        for h, D in deltas.items():
            mods[h].weight += D
    return model


def test_phase1_picks_the_global_top_k_of_the_weight_change_and_restores_weights():
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batches = _batches(2)
    cfg = prepare_sft(model, SFTConfig(budget=300, targets=TARGETS), batches, steps=3, lr=0.1)
    for k, v in model.state_dict().items():  # W0 restored bit-exactly, flags untouched
        assert torch.equal(v, before[k]), k
    assert all(p.requires_grad for p in model.parameters())

    # reference: plain full fine-tuning (SGD) of the target weights of an identical model
    ref = tiny_llama()
    hosts = [n for n, m in ref.named_modules() if n.endswith(tuple(TARGETS))]
    mods = dict(ref.named_modules())
    ws = [mods[h].weight for h in hosts]
    w0 = [w.detach().clone() for w in ws]
    for p in ref.parameters():
        p.requires_grad_(False)
    for w in ws:
        w.requires_grad_(True)
    opt = torch.optim.SGD(ws, lr=0.1)
    for b in [batches[0], batches[1], batches[0]]:
        ref(input_ids=b, labels=b).loss.backward()
        opt.step()
        opt.zero_grad()
    change = torch.cat([(w.detach() - b).abs().reshape(-1) for w, b in zip(ws, w0)])
    thresh = change.topk(300).values.min()

    assert dict(cfg.sizes).keys() == set(hosts) and sum(k for _, k in cfg.sizes) == 300
    ak.add_adapter(model, "lt", cfg)
    assert ak.trainable_parameters(model, "lt") == 300  # closed form: k
    rec = get_record(model, "lt")
    picked = torch.cat([change[sum(w.numel() for w in ws[:i]):][: ws[i].numel()][rec.pieces[h].indices]
                        for i, h in enumerate(hosts)])
    assert picked.numel() == 300 and bool((picked >= thresh * (1 - 1e-5)).all())
    assert all(float(p.values.detach().abs().sum()) == 0.0 for p in rec.pieces.values())  # phase 2 starts at W0


def test_density_gives_k_and_only_values_get_gradients():
    model = tiny_llama()
    cfg = prepare_sft(model, SFTConfig(density=0.01), _batches(1), steps=1, lr=0.1)
    hosts = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"]
    numel = sum(dict(model.named_modules())[h].weight.numel() for h in hosts)
    ak.add_adapter(model, "s", cfg)
    assert set(get_record(model, "s").pieces) == set(hosts)  # default: every body linear
    assert ak.trainable_parameters(model, "s") == round(0.01 * numel)
    model.train()
    ids = _batches(1)[0]
    model(input_ids=ids, labels=ids).loss.backward()
    for n, t in model.named_parameters():  # (a target may get no entry: an empty no-op piece)
        assert (t.grad is not None) == (n.endswith("sft_values") and t.numel() > 0), n


@pytest.mark.parametrize("path", ["gather", "dense"])
def test_forward_and_gradients_match_dense_reference_on_both_paths(path, monkeypatch):
    monkeypatch.setattr(SparseDeltaPiece, "path", path)
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(10, 6))
    W, b = m[0].weight.detach().clone(), m[0].bias.detach().clone()
    idx = torch.tensor([0, 7, 13, 29, 59])
    cfg = prepare_sft(m, SFTConfig(targets=["0"]), indices={"0": idx})
    ak.add_adapter(m, "s", cfg)
    randomize_adapters(m, std=0.5)
    p = get_record(m, "s").pieces["0"]
    x = torch.randn(3, 4, 10, requires_grad=True)
    vals = p.values.detach().clone().requires_grad_(True)
    D = torch.zeros(60).index_put((idx,), vals).view(6, 10)
    want = F.linear(x, W + D, b)
    got = m(x)
    assert torch.allclose(got, want, atol=1e-5)
    assert torch.allclose(D.detach(), _dense(p))
    g = torch.randn_like(got)
    gx, gv = torch.autograd.grad(got, (x, p.values), g)
    rx, rv = torch.autograd.grad(want, (x, vals), g)
    assert torch.allclose(gx, rx, atol=1e-5) and torch.allclose(gv, rv, atol=1e-5)


def test_composition_equals_the_summed_dense_diff_and_merge_is_exact():
    model = tiny_llama()
    lang = prepare_sft(model, SFTConfig(budget=200, targets=TARGETS), _batches(2, seed=1), steps=2, lr=0.1)
    ak.add_adapter(model, "lang", lang)
    hosts = list(get_record(model, "lang").pieces)
    g = torch.Generator().manual_seed(3)
    task_idx = {h: torch.randperm(dict(model.named_modules())[h].weight.numel(), generator=g)[:40] for h in hosts}
    ak.add_adapter(model, "task", prepare_sft(model, SFTConfig(targets=TARGETS), indices=task_idx))
    randomize_adapters(model, std=0.2)
    ids = torch.randint(0, 128, (2, 7))
    ak.set_adapter(model, ["lang", "task"])
    with torch.no_grad():
        both = model(ids).logits
    deltas = {h: _dense(get_record(model, "lang").pieces[h]) + _dense(get_record(model, "task").pieces[h])
              for h in hosts}
    with torch.no_grad():
        want = _with_deltas(tiny_llama(), deltas)(ids).logits
    assert (both - want).abs().max() < 1e-4

    base = base_weights(model)
    with torch.no_grad():
        ak.merge(model, "lang")
        ak.merge(model, "task")
        assert (model(ids).logits - want).abs().max() < 1e-4
        ak.unmerge(model, "task")
        ak.unmerge(model, "lang")
    assert_base_restored(model, base)


def test_conv1d_host_uses_out_in_positions():
    model = tiny_gpt2()
    host = model.transformer.h[0].mlp.c_fc  # Conv1D weight (in 64, out 256)
    idx = torch.tensor([0, 5, 64 * 3 + 1, 256 * 64 - 1])  # flat positions in W (out 256, in 64)
    cfg = prepare_sft(model, SFTConfig(targets=["h.0.mlp.c_fc"]), indices={"transformer.h.0.mlp.c_fc": idx})
    ak.add_adapter(model, "s", cfg)
    randomize_adapters(model, std=0.3)
    p = get_record(model, "s").pieces["transformer.h.0.mlp.c_fc"]
    h = torch.randn(2, 3, 64)
    with torch.no_grad():
        want = h @ (host.weight + _dense(p).T) + host.bias
        assert torch.allclose(host(h), want, atol=1e-5)
        assert torch.allclose(p.delta_weight(), _dense(p).T)


def test_save_load_roundtrip_and_mixed_batch(tmp_path):
    model = tiny_llama()
    ids = torch.randint(0, 128, (3, 5))
    ak.add_adapter(model, "s", prepare_sft(model, SFTConfig(budget=150, targets=TARGETS), _batches(1), steps=1, lr=0.1))
    randomize_adapters(model, std=0.3)
    with torch.no_grad():
        want = model(ids).logits
    ak.save_adapter(model, "s", tmp_path / "s")
    t = load_file(tmp_path / "s" / "adapter.safetensors")
    assert {k.rsplit(".", 1)[1] for k in t} == {"sft_indices", "sft_values"}
    assert sum(v.numel() for k, v in t.items() if k.endswith("sft_values")) == 150
    conf = json.loads((tmp_path / "s" / "adapter_config.json").read_text())
    assert conf["method"] == "sft" and sum(k for _, k in conf["config"]["sizes"]) == 150

    fresh = tiny_llama()
    ak.load_adapter(fresh, tmp_path / "s", name="s")
    with torch.no_grad():
        assert (fresh(ids).logits - want).abs().max() < 1e-5
    names = ["s", None, "s"]
    with torch.no_grad(), ak.adapter_batch(fresh, names):
        mixed = fresh(ids).logits
    assert torch.allclose(mixed[[0, 2]], want[[0, 2]], atol=1e-5)
    with torch.no_grad():
        ak.set_adapter(fresh, None)
        assert torch.allclose(mixed[1], fresh(ids[1:2]).logits[0], atol=1e-5)

    # a file whose indices point outside the weight is refused, naming the tensor
    key = next(k for k in t if k.endswith("sft_indices") and t[k].numel())
    t[key] = t[key].clone()
    t[key][0] = 10 ** 7
    save_file(t, str(tmp_path / "s" / "adapter.safetensors"))
    with pytest.raises(AdapterFileError, match="sft_indices"):
        ak.load_adapter(tiny_llama(), tmp_path / "s", name="bad")


def test_config_and_prepare_errors():
    with pytest.raises(ConfigError, match="density"):
        SFTConfig(density=0.0)
    with pytest.raises(ConfigError, match="budget"):
        SFTConfig(budget=0)
    model = tiny_llama()
    with pytest.raises(ConfigError, match="prepare_sft"):
        ak.add_adapter(model, "s", SFTConfig(targets=["q_proj"]))
    with pytest.raises(ConfigError, match="needs batches"):
        prepare_sft(model, SFTConfig(targets=["q_proj"]))
    with pytest.raises(ConfigError, match=r"in \[0, 4096\)"):
        prepare_sft(model, SFTConfig(targets=["q_proj"]),
                    indices={"model.layers.0.self_attn.q_proj": torch.tensor([4096]),
                             "model.layers.1.self_attn.q_proj": torch.tensor([1])})
    with pytest.raises(ConfigError, match="no entry for target"):
        prepare_sft(model, SFTConfig(targets=["q_proj"]), indices={"model.layers.0.self_attn.q_proj": [1]})
    with pytest.raises(ConfigError, match="entries to tune"):
        prepare_sft(model, SFTConfig(budget=10 ** 9, targets=["q_proj"]), _batches(1), steps=1)
    assert ak.list_adapters(model) == []
