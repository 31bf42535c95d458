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


def test_adapter_name_shadowing_a_module_attribute_is_refused(llama):
    with pytest.raises(ConfigError, match="adapter name 'half' .*attribute of torch.nn.ModuleDict"):
        ak.add_adapter(llama, "half", ak.LoRAConfig(r=2))
    assert ak.list_adapters(llama) == []


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


# -- PEFT habits ------------------------------------------------------------------------
def test_parameter_summary_counts_and_prints(llama, capsys):
    _two(llama)
    s = ak.parameter_summary(llama)
    total = sum(p.numel() for p in llama.parameters())
    a = 2 * (4 * (64 + 64) + 4 * (64 + 32))
    b = 2 * (2 * (64 + 64) + 2 * (64 + 128))
    assert (s.trainable, s.total) == (a + b, total)
    assert s.percent == pytest.approx(100 * (a + b) / total)
    assert [(x.name, x.method, x.params, x.trainable, x.active) for x in s.adapters] == [
        ("a", "lora", a, a, True), ("b", "lora", b, b, False)]
    assert s.to_dict()["adapters"][1]["params"] == b
    ak.print_trainable_parameters(llama)
    out = capsys.readouterr().out
    assert out.startswith(f"trainable params: {a + b:,} || all params: {total:,} || trainable%: {s.percent:.4f}\n")
    assert "  a (lora, active): " in out and "  b (lora): " in out


def test_disable_adapters_runs_the_base_and_restores(llama, ids):
    base = llama(ids).logits
    _two(llama)
    ak.set_adapter(llama, ["a", "b"])
    both = llama(ids).logits
    with ak.disable_adapters(llama):
        torch.testing.assert_close(llama(ids).logits, base, rtol=0, atol=0)
    assert ak.api.active_adapters(llama) == ("a", "b")
    torch.testing.assert_close(llama(ids).logits, both, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="boom"), ak.disable_adapters(llama):
        raise RuntimeError("boom")
    assert ak.api.active_adapters(llama) == ("a", "b")
    with ak.adapter_batch(llama, ["a", None]), ak.disable_adapters(llama):
        torch.testing.assert_close(llama(ids).logits, base, rtol=0, atol=0)


def test_disable_adapters_with_a_merged_adapter_and_a_composition(llama, ids):
    base = llama(ids).logits
    _two(llama)
    ak.merge_into_base(llama, "a")
    merged = llama(ids).logits
    with ak.disable_adapters(llama):
        torch.testing.assert_close(llama(ids).logits, base, atol=1e-5, rtol=0)
    assert ak.api._is_merged(ak.api.get_record(llama, "a"))
    torch.testing.assert_close(llama(ids).logits, merged, atol=1e-5, rtol=0)
    ak.unmerge_from_base(llama, "a")
    ak.set_adapter(llama, ak.Parallel("a", "b"))
    par = llama(ids).logits
    with ak.disable_adapters(llama):  # the merge round trip above moved the base by ulps
        torch.testing.assert_close(llama(ids).logits, base, atol=1e-5, rtol=0)
    torch.testing.assert_close(llama(ids).logits, par, rtol=0, atol=0)


def test_merge_and_unload_folds_the_active_adapters_and_returns_the_model(llama, ids):
    _two(llama)
    ak.set_adapter(llama, ["a", "b"])
    want = llama(ids).logits
    keys = {k for k in llama.state_dict() if ".adapterkit." not in k}
    out = ak.merge_and_unload(llama)
    assert out is llama and ak.list_adapters(llama) == []
    assert set(llama.state_dict()) == keys
    torch.testing.assert_close(llama(ids).logits, want, atol=1e-5, rtol=0)


def test_merge_and_unload_refuses_a_non_mergeable_active_adapter_untouched(llama, ids):
    ak.add_adapter(llama, "a", ak.LoRAConfig(r=2))
    ak.add_adapter(llama, "p", ak.PromptTuningConfig(num_virtual_tokens=2))
    ak.set_adapter(llama, ["a", "p"])
    with pytest.raises(NotMergeableError, match="active adapter 'p' \\(prompt"):
        ak.merge_and_unload(llama)
    assert ak.list_adapters(llama) == ["a", "p"] and not ak.api._is_merged(ak.api.get_record(llama, "a"))


def test_unload_detaches_everything_without_folding(llama, ids):
    base = llama(ids).logits
    _two(llama)
    ak.merge_into_base(llama, "b")
    assert ak.unload(llama) is llama and ak.list_adapters(llama) == []
    torch.testing.assert_close(llama(ids).logits, base, atol=1e-5, rtol=0)


def test_load_adapter_is_frozen_for_inference_unless_trainable(llama, tmp_path):
    ak.add_adapter(llama, "a", ak.LoRAConfig(r=2, targets=["q_proj"]))
    ak.save_adapter(llama, "a", tmp_path / "a")
    m = tiny_llama()
    ak.load_adapter(m, tmp_path / "a")
    assert ak.trainable_parameters(m) == 0 and ak.parameter_summary(m).adapters[0].params == 2 * 2 * 128
    ak.set_requires_grad(m, "a")
    assert ak.trainable_parameters(m) == 2 * 2 * 128
    m2 = tiny_llama()
    ak.load_adapter(m2, tmp_path / "a", trainable=True)
    assert ak.trainable_parameters(m2) == 2 * 2 * 128
    with pytest.raises(AdapterNotFoundError, match="'aa'"):
        ak.set_requires_grad(m2, ["a", "aa"], False)
    assert ak.trainable_parameters(m2) == 2 * 2 * 128  # nothing changed before the bad name was found


def test_set_requires_grad_keeps_what_the_method_freezes():
    from adapterkit.methods.ssf import SSFConfig  # noqa: F401  (registers "ssf")

    model = tiny_llama()
    ak.add_adapter(model, "s", ak.make_config("ssf"))
    before = {k: p.requires_grad for k, p in ak.api.adapter_parameters(model, "s").items()}
    ak.set_requires_grad(model, "s", False)
    ak.set_requires_grad(model, "s", True)
    assert {k: p.requires_grad for k, p in ak.api.adapter_parameters(model, "s").items()} == before


def test_old_names_warn_and_still_work(llama, ids):
    _two(llama)
    with pytest.warns(DeprecationWarning, match="ak.merge is deprecated; use ak.merge_into_base"):
        ak.merge(llama, "a")
    with pytest.warns(DeprecationWarning, match="ak.unmerge is deprecated; use ak.unmerge_from_base"):
        ak.unmerge(llama, "a")
    with pytest.warns(DeprecationWarning, match="ak.merge_adapters is deprecated; use ak.combine_adapters"):
        assert ak.merge_adapters(llama, {"a": 1.0, "b": 1.0}, name="ab") == "ab"
    assert ak.combine_adapters(llama, {"a": 0.5}, method="linear", name="avg") == "avg"
    assert ak.get_adapter_config(llama, "ab").r == 6
