"""S2FT against its definition: the base model with the selected heads' columns of W_o and the
selected channels' columns of W_down replaced by trained dense sub-matrices."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import adapterkit as ak
from adapterkit.api import get_record
from adapterkit.errors import ConfigError, TargetNotFoundError
from adapterkit.methods.s2ft import S2FTConfig
from _method_checks import assert_merge_round_trip, assert_mixed_batch_rows_match
from conftest import randomize_adapters, tiny_bert, tiny_gpt2, tiny_llama

HEAD_DIM = 16  # tiny_llama: hidden 64, 4 heads


def _replaced(model: nn.Module, pieces: dict) -> nn.Module:
    """Reference: an identical base model whose sub-matrices W[:, cols] are set to W[:, cols] + delta."""
    mods = dict(model.named_modules())
    with torch.no_grad():
        for h, p in pieces.items():
            W = mods[h].weight
            sub = W[:, p.s2ft_cols] + p.s2ft_delta.detach()  # the trained dense sub-matrix
            W[:, p.s2ft_cols] = sub
    return model


def test_selects_whole_heads_and_channels_and_equals_base_with_submatrices_replaced():
    model = tiny_llama()
    ak.add_adapter(model, "s", S2FTConfig(heads=2, channels=8))
    pieces = get_record(model, "s").pieces
    assert sorted(pieces) == sorted(f"model.layers.{i}.{m}" for i in range(2)
                                    for m in ("self_attn.o_proj", "mlp.down_proj"))
    for h, p in pieces.items():
        cols = p.s2ft_cols
        if h.endswith("o_proj"):  # 2 whole heads: 2 runs of 16 consecutive columns starting at k*16
            assert cols.numel() == 2 * HEAD_DIM
            heads = cols.reshape(2, HEAD_DIM)
            assert torch.equal(heads - heads[:, :1], torch.arange(HEAD_DIM).expand(2, -1))
            assert bool((heads[:, 0] % HEAD_DIM == 0).all()) and heads[0, 0] != heads[1, 0]
        else:
            assert cols.numel() == 8 and cols.unique().numel() == 8 and int(cols.max()) < 128
    # closed form: out * heads * head_dim per o_proj + out * channels per down_proj, 2 layers
    assert ak.trainable_parameters(model, "s") == 2 * (64 * 2 * HEAD_DIM + 64 * 8)
    randomize_adapters(model, std=0.1)
    ids = torch.randint(0, 128, (2, 7))
    with torch.no_grad():
        got = model(ids).logits
        want = _replaced(tiny_llama(), pieces)(ids).logits
    assert (got - want).abs().max() < 1e-4


def test_weight_selection_picks_the_heaviest_heads_and_channels():
    model = tiny_llama()
    o = model.model.layers[0].self_attn.o_proj.weight.detach()
    d = model.model.layers[0].mlp.down_proj.weight.detach()
    ak.add_adapter(model, "s", S2FTConfig(heads=1, channels=4, selection="weight"))
    rec = get_record(model, "s")
    head_norms = torch.stack([o[:, i * HEAD_DIM:(i + 1) * HEAD_DIM].pow(2).sum() for i in range(4)])
    best = int(head_norms.argmax())
    assert torch.equal(rec.pieces["model.layers.0.self_attn.o_proj"].s2ft_cols,
                       torch.arange(best * HEAD_DIM, (best + 1) * HEAD_DIM))
    want = sorted(d.pow(2).sum(0).topk(4).indices.tolist())
    assert rec.pieces["model.layers.0.mlp.down_proj"].s2ft_cols.tolist() == want


def test_only_deltas_train_and_merge_save_load_mixed_batch(tmp_path):
    model = tiny_llama()
    ak.add_adapter(model, "a", S2FTConfig(heads=1, channels=4, seed=1))
    ak.add_adapter(model, "b", S2FTConfig(heads=2, channels=0, seed=2))
    randomize_adapters(model, std=0.1)
    model.train()
    ids = torch.randint(0, 128, (3, 6))
    with ak.adapter_batch(model, ["a", "b", "a"]):
        model(input_ids=ids, labels=ids).loss.backward()
    for n, t in model.named_parameters():
        assert (t.grad is not None) == n.endswith("s2ft_delta"), n
    model.eval()
    names = ["a", None, "b"]
    with torch.no_grad():
        assert_mixed_batch_rows_match(model, ids, names)

    ak.set_adapter(model, "a")
    want, _ = assert_merge_round_trip(model, "a", ids)

    ak.save_adapter(model, "a", tmp_path / "a")
    t = load_file(tmp_path / "a" / "adapter.safetensors")
    assert {k.rsplit(".", 1)[1] for k in t} == {"s2ft_cols", "s2ft_delta"}
    fresh = tiny_llama()
    ak.load_adapter(fresh, tmp_path / "a")
    with torch.no_grad():
        assert (fresh(ids).logits - want).abs().max() < 1e-5


def test_gpt2_and_bert_default_targets():
    g = tiny_gpt2()
    ak.add_adapter(g, "s", S2FTConfig(heads=1, channels=4))
    assert sorted(get_record(g, "s").pieces) == sorted(
        f"transformer.h.{i}.{m}" for i in range(2) for m in ("attn.c_proj", "mlp.c_proj"))
    randomize_adapters(g, std=0.05)
    ids = torch.randint(0, 128, (2, 5))
    with torch.no_grad():
        got = g(ids).logits
        ref = tiny_gpt2()
        rmods = dict(ref.named_modules())
        for h, p in get_record(g, "s").pieces.items():  # Conv1D: columns of W (out, in) are rows of its weight
            rmods[h].weight[p.s2ft_cols, :] += p.s2ft_delta.detach().T
        assert (got - ref(ids).logits).abs().max() < 1e-4
    b = tiny_bert()
    ak.add_adapter(b, "s", S2FTConfig(heads=1, channels=4))
    assert sorted(get_record(b, "s").pieces) == sorted(
        f"encoder.layer.{i}.{m}" for i in range(2) for m in ("attention.output.dense", "output.dense"))


def test_config_and_target_errors():
    with pytest.raises(ConfigError, match="both 0"):
        S2FTConfig(heads=0, channels=0)
    with pytest.raises(ConfigError, match="selection"):
        S2FTConfig(selection="best")
    with pytest.raises(ConfigError, match="head_dim"):
        S2FTConfig(head_dim=0)
    model = tiny_llama()
    with pytest.raises(ConfigError, match="heads=5 exceeds the 4 heads"):
        ak.add_adapter(model, "s", S2FTConfig(heads=5, channels=0))
    with pytest.raises(ConfigError, match="not a multiple of head_dim=48"):
        ak.add_adapter(model, "s", S2FTConfig(heads=1, channels=0, head_dim=48))
    with pytest.raises(ConfigError, match="both targets"):
        ak.add_adapter(model, "s", S2FTConfig(targets=["o_proj"], ffn_targets=["o_proj"]))
    with pytest.raises(TargetNotFoundError, match="down_prj"):
        ak.add_adapter(model, "s", S2FTConfig(ffn_targets=["down_prj"]))
    assert ak.list_adapters(model) == []
