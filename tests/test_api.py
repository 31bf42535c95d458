"""The public API on a tiny Llama: attach, activate, mixed batches, merge, delete."""
from __future__ import annotations

import pytest
import torch

import adapterkit as ak
from adapterkit.errors import (
    AdapterError,
    AdapterNotFoundError,
    ConfigError,
    DuplicateAdapterError,
    NotMergeableError,
    TargetNotFoundError,
)
from conftest import randomize_adapters, tiny_gpt2, tiny_llama


def _two(llama):
    ak.add_adapter(llama, "a", ak.LoRAConfig(r=4, targets=["q_proj", "v_proj"]))
    ak.add_adapter(llama, "b", ak.LoRAConfig(r=2, alpha=4, targets=["o_proj", "up_proj"]))
    randomize_adapters(llama)
    return llama


def test_public_api_names():
    for n in ["add_adapter", "set_adapter", "adapter_batch", "merge", "unmerge", "save_adapter", "load_adapter",
              "delete_adapter", "list_adapters", "trainable_parameters", "list_methods", "make_config", "LoRAConfig"]:
        assert hasattr(ak, n), n
    assert "lora" in ak.list_methods()


def test_add_freezes_base_and_keeps_state_dict_keys(llama):
    before = set(llama.state_dict())
    ak.add_adapter(llama, "a", ak.LoRAConfig(r=4, targets=["q_proj"]))
    after = set(llama.state_dict())
    assert before <= after  # the model's own keys are unchanged
    added = sorted(after - before)
    assert added[0] == "model.layers.0.self_attn.q_proj.adapterkit.a.lora_A"
    trainable = [n for n, p in llama.named_parameters() if p.requires_grad]
    assert trainable and all(".adapterkit.a." in n for n in trainable)


def test_trainable_count_closed_form(llama):
    ak.add_adapter(llama, "a", ak.LoRAConfig(r=4, targets=["q_proj", "v_proj"]))
    # q: 64->64, v: 64->32 (2 kv heads x 16), 2 layers: r*(in+out) each
    assert ak.trainable_parameters(llama, "a") == 2 * (4 * (64 + 64) + 4 * (64 + 32))
    assert ak.trainable_parameters(llama) == ak.trainable_parameters(llama, "a")


def test_fresh_lora_is_identity(llama, ids):
    base = llama(ids).logits
    ak.add_adapter(llama, "a", ak.LoRAConfig(r=4))
    torch.testing.assert_close(llama(ids).logits, base, rtol=0, atol=0)


def test_set_adapter_modes_and_first_is_active(llama, ids):
    base = llama(ids).logits
    _two(llama)
    assert ak.api.active_adapters(llama) == ("a",)
    la = llama(ids).logits
    assert (la - base).abs().max() > 1e-3
    ak.set_adapter(llama, "b")
    lb = llama(ids).logits
    ak.set_adapter(llama, None)
    torch.testing.assert_close(llama(ids).logits, base, rtol=0, atol=0)
    ak.set_adapter(llama, ["a", "b"])
    lab = llama(ids).logits
    assert (lab - la).abs().max() > 1e-3 and (lab - lb).abs().max() > 1e-3
    # LoRA deltas on disjoint modules add up: merging both gives the same model
    ak.merge(llama, "a")
    ak.merge(llama, "b")
    torch.testing.assert_close(llama(ids).logits, lab, atol=1e-4, rtol=0)


def test_mixed_batch_equals_rows_alone(llama, ids):
    _two(llama)
    names = ["a", "b", None, "a"]
    with ak.adapter_batch(llama, names):
        mixed = llama(ids).logits
    for i, n in enumerate(names):
        ak.set_adapter(llama, n)
        alone = llama(ids[i : i + 1]).logits
        assert (mixed[i] - alone[0]).abs().max().item() <= 1e-5, (i, n)


def test_mixed_batch_gradients_reach_only_own_rows(llama, ids):
    _two(llama)
    llama.train()
    names = ["a", "b", None, "a"]
    with ak.adapter_batch(llama, names):
        out = llama(ids).logits
    (out[0].sum() + out[3].sum()).backward()  # only rows that use "a"
    for n, p in llama.named_parameters():
        if ".adapterkit.b." in n:
            assert p.grad is None or p.grad.abs().max() == 0, n
    a_grads = {n: p.grad.clone() for n, p in llama.named_parameters() if ".adapterkit.a." in n}
    assert all(g.abs().max() > 0 for n, g in a_grads.items() if "lora_B" in n)
    # same gradients as running those rows alone with "a"
    llama.zero_grad()
    ak.set_adapter(llama, "a")
    llama(ids[[0, 3]]).logits.sum().backward()
    for n, p in llama.named_parameters():
        if n in a_grads:
            torch.testing.assert_close(p.grad, a_grads[n], atol=1e-5, rtol=1e-4)


def test_mixed_batch_wrong_size_is_clear(llama, ids):
    _two(llama)
    with pytest.raises(AdapterError, match="rows"):
        with ak.adapter_batch(llama, ["a", "b"]):
            llama(ids)


def test_merge_unmerge(llama, ids):
    base_w = {n: p.detach().clone() for n, p in llama.named_parameters()}
    _two(llama)
    ak.set_adapter(llama, "a")
    ref = llama(ids).logits
    ak.merge(llama, "a")
    assert (llama(ids).logits - ref).abs().max().item() <= 1e-4
    with pytest.raises(AdapterError, match="already merged"):
        ak.merge(llama, "a")
    with pytest.raises(AdapterError, match="unmerge"):
        ak.set_adapter(llama, None)
    with pytest.raises(AdapterError, match="merged"):
        with ak.adapter_batch(llama, ["a", None, None, None]):
            pass
    ak.unmerge(llama, "a")
    for n, p in llama.named_parameters():
        if n in base_w:
            assert (p - base_w[n]).abs().max().item() <= 1e-6, n


def test_merge_gpt2_conv1d():
    m = tiny_gpt2()
    x = torch.randint(0, 128, (2, 7))
    ak.add_adapter(m, "a", ak.LoRAConfig(r=4))  # default target on GPT-2: c_attn (Conv1D)
    randomize_adapters(m)
    ref = m(x).logits
    ak.merge(m, "a")
    assert (m(x).logits - ref).abs().max().item() <= 1e-4


def test_delete_restores_base(llama, ids):
    base = llama(ids).logits
    keys = set(llama.state_dict())
    _two(llama)
    ak.merge(llama, "a")
    ak.delete_adapter(llama, "a")
    ak.delete_adapter(llama, "b")
    assert ak.list_adapters(llama) == []
    assert set(llama.state_dict()) == keys
    torch.testing.assert_close(llama(ids).logits, base, atol=1e-5, rtol=0)


def test_regex_targets(llama):
    rec = ak.add_adapter(llama, "a", ak.LoRAConfig(r=2, targets=r"model\.layers\.1\.mlp\.(up|down)_proj"))
    assert sorted(rec.pieces) == ["model.layers.1.mlp.down_proj", "model.layers.1.mlp.up_proj"]


def test_default_targets_per_architecture():
    assert sorted({k.rsplit(".", 1)[-1] for k in ak.add_adapter(tiny_llama(), "a", ak.make_config("lora")).pieces}) == [
        "q_proj", "v_proj"]
    assert {k.rsplit(".", 1)[-1] for k in ak.add_adapter(tiny_gpt2(), "a", ak.make_config("lora")).pieces} == {"c_attn"}


# -- bad input: each row of the README's table ------------------------------------------
def test_unknown_target_lists_closest(llama):
    with pytest.raises(TargetNotFoundError, match="q_proj") as e:
        ak.add_adapter(llama, "a", ak.LoRAConfig(targets=["q_prj"]))
    assert "q_prj" in str(e.value)
    assert ak.list_adapters(llama) == []


def test_unknown_regex_target(llama):
    with pytest.raises(TargetNotFoundError, match="matches no module"):
        ak.add_adapter(llama, "a", ak.LoRAConfig(targets=r"nothing\..*"))


@pytest.mark.parametrize("r", [0, -1, 2.5])
def test_bad_rank(r):
    with pytest.raises(ConfigError, match="r must be a positive integer"):
        ak.LoRAConfig(r=r)


def test_unknown_config_field_and_method():
    with pytest.raises(ConfigError, match="'alpha'"):
        ak.make_config("lora", alpah=3)
    with pytest.raises(ConfigError, match="'lora'"):
        ak.make_config("lorra")


def test_duplicate_adapter_name(llama):
    ak.add_adapter(llama, "a", ak.LoRAConfig())
    with pytest.raises(DuplicateAdapterError, match="'a'"):
        ak.add_adapter(llama, "a", ak.LoRAConfig())


def test_unknown_adapter_name(llama):
    ak.add_adapter(llama, "math", ak.LoRAConfig())
    for call in (lambda: ak.set_adapter(llama, "maht"), lambda: ak.merge(llama, "maht"),
                 lambda: ak.delete_adapter(llama, "maht"), lambda: ak.trainable_parameters(llama, "maht")):
        with pytest.raises(AdapterNotFoundError, match="'math'"):
            call()
    with pytest.raises(AdapterNotFoundError, match="'math'"):
        with ak.adapter_batch(llama, ["maht"]):
            pass


def test_bad_adapter_name(llama):
    with pytest.raises(ConfigError, match="name"):
        ak.add_adapter(llama, "a.b", ak.LoRAConfig())


def test_not_a_config(llama):
    with pytest.raises(ConfigError, match="config must be"):
        ak.add_adapter(llama, "a", {"r": 8})  # type: ignore[arg-type]


def test_not_mergeable_error_type():
    assert issubclass(NotMergeableError, AdapterError)


def test_merge_and_unload_leaves_a_plain_model(llama, ids):
    keys = set(llama.state_dict())
    _two(llama)
    ak.set_adapter(llama, "a")
    ref = llama(ids).logits
    ak.merge_and_unload(llama, "a")
    assert ak.list_adapters(llama) == ["b"]
    ak.delete_adapter(llama, "b")
    assert set(llama.state_dict()) == keys
    assert (llama(ids).logits - ref).abs().max().item() <= 1e-4


def test_failed_add_leaves_model_untouched(llama):
    with pytest.raises(TargetNotFoundError):
        ak.add_adapter(llama, "a", ak.LoRAConfig(targets=["nope"]))
    assert all(p.requires_grad for p in llama.parameters())
    assert ak.list_adapters(llama) == []


def test_piece_follows_host_mode(llama):
    llama.eval()
    rec = ak.add_adapter(llama, "a", ak.LoRAConfig(r=2, dropout=0.5))
    assert not any(p.training for p in rec.pieces.values())


def test_deepcopy_gives_an_independent_adapted_model(llama, ids):
    import copy

    _two(llama)
    ak.add_adapter(llama, "bn", ak.BottleneckConfig(reduction_factor=8))
    randomize_adapters(llama)
    ak.set_adapter(llama, ["a", "bn"])
    ref = llama(ids).logits
    twin = copy.deepcopy(llama)
    torch.testing.assert_close(twin(ids).logits, ref, atol=0, rtol=0)
    piece = ak.api.get_record(twin, "bn").pieces["model.layers.0.mlp"]
    assert piece.host is twin.model.layers[0].mlp
    ak.set_adapter(twin, None)  # the copy has its own state...
    ak.delete_adapter(twin, "a")  # ...and its own hooks
    torch.testing.assert_close(llama(ids).logits, ref, atol=0, rtol=0)
    assert ak.list_adapters(llama) == ["a", "b", "bn"]
    with ak.adapter_batch(twin, ["bn", None, "b", "bn"]):
        twin(ids)


def test_pickle_round_trip(llama, ids, tmp_path):
    _two(llama)
    randomize_adapters(llama)
    ref = llama(ids).logits
    torch.save(llama, tmp_path / "m.pt")
    back = torch.load(tmp_path / "m.pt", weights_only=False)
    torch.testing.assert_close(back(ids).logits, ref, atol=0, rtol=0)
    ak.set_adapter(back, "b")
    assert ak.api.active_adapters(llama) == ("a",)
