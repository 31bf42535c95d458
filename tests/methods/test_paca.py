"""PaCA against its formula: W'[:, cols] = W[:, cols] + delta, y = x W'^T + b."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

import adapterkit as ak
from adapterkit.api import get_record
from adapterkit.errors import AdapterFileError, ConfigError
from adapterkit.methods.paca import PaCAConfig, PartialColumnsFn, partial_columns
from _method_checks import (assert_base_restored, assert_mixed_batch_rows_match, assert_rank_and_embedding_errors,
                            base_weights)
from conftest import randomize_adapters, tiny_gpt2, tiny_llama


def _saved_numels(fn) -> list[int]:
    """numel of every tensor autograd saves while ``fn()`` runs, and its result."""
    seen: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        seen.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return seen, out


def test_partial_columns_fn_matches_plain_autograd_and_saves_only_selected_inputs():
    torch.manual_seed(0)
    N, T, n_in, n_out, r = 3, 5, 16, 12, 4
    x = torch.randn(N, T, n_in, requires_grad=True)
    y = torch.randn(N, T, n_out, requires_grad=True)
    delta = torch.randn(n_out, r, requires_grad=True)
    cols = torch.tensor([1, 7, 8, 15])
    saved, fast = _saved_numels(lambda: PartialColumnsFn.apply(y, x, cols, delta))
    ref = partial_columns(y, x, cols, delta)
    g = torch.randn_like(ref)
    gf = torch.autograd.grad(fast, (y, x, delta), g)
    gr = torch.autograd.grad(ref, (y, x, delta), g)
    assert torch.allclose(fast, ref, atol=1e-5)
    for a, b in zip(gf, gr):
        assert torch.allclose(a, b, atol=1e-5)
    # x[..., cols] (N*T*r), the index (r) and delta (parameter) -- never the full x (N*T*in)
    assert sorted(saved) == sorted([N * T * r, r, n_out * r])
    # the input gradient reaches exactly the selected features
    assert torch.equal(gf[1].abs().sum((0, 1)) != 0, torch.isin(torch.arange(n_in), cols))


def _ref_linear(x: torch.Tensor, W: torch.Tensor, b: torch.Tensor | None, cols: torch.Tensor, d: torch.Tensor):
    W2 = W.clone()
    W2[:, cols] += d
    return F.linear(x, W2, b)


def test_forward_equals_base_with_columns_changed_linear_and_conv1d():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(10, 6))
    x = torch.randn(2, 3, 10)
    W, b = m[0].weight.detach().clone(), m[0].bias.detach().clone()
    ak.add_adapter(m, "p", PaCAConfig(r=3, targets=["0"]))
    p = get_record(m, "p").pieces["0"]
    assert p.paca_cols.shape == (3,) and len(set(p.paca_cols.tolist())) == 3
    assert torch.allclose(m(x), F.linear(x, W, b))  # delta starts at 0: identity
    randomize_adapters(m, std=0.5)
    assert torch.allclose(m(x), _ref_linear(x, W, b, p.paca_cols, p.paca_delta.detach()), atol=1e-5)

    model = tiny_gpt2()  # Conv1D stores W as (in, out): the columns of W (out, in) are its rows
    ids = torch.randint(0, 128, (2, 6))
    ak.add_adapter(model, "p", PaCAConfig(r=4, targets=["c_attn"]))
    randomize_adapters(model, std=0.05)
    host = model.transformer.h[0].attn.c_attn
    p = get_record(model, "p").pieces["transformer.h.0.attn.c_attn"]
    h = torch.randn(2, 6, 64)
    want = _ref_linear(h, host.weight.T, host.bias, p.paca_cols, p.paca_delta.detach())
    with torch.no_grad():
        assert torch.allclose(host(h), want, atol=1e-5)
        y = model(ids).logits
        ak.merge(model, "p")
        assert (model(ids).logits - y).abs().max() < 1e-4


def test_trainable_count_is_r_times_out_and_only_delta_gets_gradients():
    model = tiny_llama()
    ak.add_adapter(model, "p", PaCAConfig(r=5, targets=["q_proj", "k_proj", "down_proj"]))
    # per layer: q (out 64), k (out 2 kv heads * 16 = 32), down (out 64); 2 layers
    assert ak.trainable_parameters(model, "p") == 2 * 5 * (64 + 32 + 64)
    assert ak.trainable_parameters(model) == ak.trainable_parameters(model, "p")
    model.train()
    ids = torch.randint(0, 128, (2, 7))
    model(input_ids=ids, labels=ids).loss.backward()
    for n, t in model.named_parameters():
        assert (t.grad is not None) == n.endswith("paca_delta"), n


def test_training_lowers_the_loss():
    model = tiny_llama()
    ak.add_adapter(model, "p", PaCAConfig(r=8, targets=["q_proj", "v_proj", "down_proj"]))
    model.train()
    ids = torch.randint(0, 128, (4, 12))
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(8):
        loss = model(input_ids=ids, labels=ids).loss
        losses.append(loss.item())
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert losses[-1] < losses[0] - 0.05


def test_merge_unmerge_is_bit_exact_and_merged_output_matches():
    model = tiny_llama()
    ids = torch.randint(0, 128, (2, 6))
    ak.add_adapter(model, "p", PaCAConfig(r=6, targets=["q_proj", "o_proj", "up_proj"]))
    randomize_adapters(model, std=0.1)
    base = base_weights(model)
    with torch.no_grad():
        y = model(ids).logits
        ak.merge(model, "p")
        for n, p in get_record(model, "p").pieces.items():  # only the selected columns changed
            W0 = base[f"{n}.weight"]
            changed = (dict(model.named_modules())[n].weight != W0).any(0)
            assert set(changed.nonzero().flatten().tolist()) <= set(p.paca_cols.tolist())
        assert (model(ids).logits - y).abs().max() < 1e-4
        ak.unmerge(model, "p")
    assert_base_restored(model, base)


def test_save_holds_only_columns_and_delta_and_load_restores(tmp_path):
    model = tiny_llama()
    ids = torch.randint(0, 128, (2, 5))
    ak.add_adapter(model, "p", PaCAConfig(r=4, seed=3, targets=["q_proj", "gate_proj"]))
    randomize_adapters(model, std=0.2)
    with torch.no_grad():
        want = model(ids).logits
    ak.save_adapter(model, "p", tmp_path / "p")
    t = load_file(tmp_path / "p" / "adapter.safetensors")
    assert {k.rsplit(".", 1)[1] for k in t} == {"paca_cols", "paca_delta"}
    assert all(v.shape == (4,) for k, v in t.items() if k.endswith("paca_cols"))
    fresh = tiny_llama()
    ak.add_adapter(fresh, "other", PaCAConfig(r=4, seed=99, targets=["q_proj"]))  # coexists
    ak.load_adapter(fresh, tmp_path / "p", name="p")
    ak.set_adapter(fresh, "p")
    with torch.no_grad():
        assert (fresh(ids).logits - want).abs().max() < 1e-5
    got = get_record(fresh, "p").pieces["model.layers.1.mlp.gate_proj"].paca_cols
    assert torch.equal(got, t["model.layers.1.mlp.gate_proj.paca_cols"])
    # a file with repeated columns is refused, naming the tensor
    t["model.layers.0.self_attn.q_proj.paca_cols"] = torch.tensor([1, 1, 2, 3])
    save_file(t, str(tmp_path / "p" / "adapter.safetensors"))
    with pytest.raises(AdapterFileError, match="paca_cols holds repeated"):
        ak.load_adapter(tiny_llama(), tmp_path / "p", name="bad")


def test_mixed_batch_and_two_adapters_stack():
    model = tiny_llama()
    ak.add_adapter(model, "a", PaCAConfig(r=3))
    ak.add_adapter(model, "b", PaCAConfig(r=2, seed=1, targets=["q_proj", "k_proj"]))
    randomize_adapters(model, std=0.3)
    ids = torch.randint(0, 128, (3, 5))
    names = ["a", None, "b"]
    with torch.no_grad():
        assert_mixed_batch_rows_match(model, ids, names)
    # both active == both merged
    ak.set_adapter(model, ["a", "b"])
    with torch.no_grad():
        both = model(ids).logits
        ak.merge(model, "a")
        ak.merge(model, "b")
        ak.set_adapter(model, ["a", "b"])
        assert (model(ids).logits - both).abs().max() < 1e-4


def test_config_and_target_errors():
    with pytest.raises(ConfigError, match="r must be"):
        PaCAConfig(r=0)
    with pytest.raises(ConfigError, match="seed"):
        PaCAConfig(seed=-1)
    assert_rank_and_embedding_errors(PaCAConfig, too_big_r=5, match="r=5 exceeds in_features=4")
    assert "paca" in ak.list_methods()
    assert ak.make_config("paca", r=2) == PaCAConfig(r=2)


def test_paca_keeps_fewer_activations_than_lora_at_the_same_rank():
    """The paper's memory claim: LoRA keeps each target's full input for dA, PaCA only x[..., cols]."""
    def saved_bytes(cfg) -> int:
        model = tiny_llama()
        ak.add_adapter(model, "a", cfg)
        model.train()
        seen: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            s = t.untyped_storage()
            seen[s.data_ptr()] = s.nbytes()
            return t

        ids = torch.randint(0, 128, (2, 16))
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(input_ids=ids, labels=ids)
        return sum(seen.values())

    targets = ["q_proj", "o_proj", "down_proj"]
    lora = saved_bytes(ak.LoRAConfig(r=4, targets=targets))
    paca = saved_bytes(PaCAConfig(r=4, targets=targets))
    # per layer LoRA keeps q's input (N x 64) and down's input (N x 128) that nothing else keeps
    # (o_proj's input is the attention output, which is kept anyway); N = 32 tokens, fp32
    assert lora - paca >= 2 * 32 * (64 + 128) * 4
