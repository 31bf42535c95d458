"""Native adapter files: round trip, fingerprint checks, defensive loading, atomic saves."""
from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
import torch

import adapterkit as ak
from adapterkit.errors import AdapterFileError, IncompatibleBaseError
from adapterkit.formats import native as fnative
from conftest import randomize_adapters, tiny_llama


@pytest.fixture
def saved(tmp_path, ids):
    m = tiny_llama()
    ak.add_adapter(m, "math", ak.LoRAConfig(r=4, alpha=8, use_rslora=True, targets=["q_proj", "v_proj"]))
    randomize_adapters(m)
    ref = m(ids).logits
    path = ak.save_adapter(m, "math", tmp_path / "math")
    return path, ref


def test_round_trip_and_layout(saved, ids):
    path, ref = saved
    assert sorted(os.listdir(path)) == ["adapter.safetensors", "adapter_config.json"]
    meta = json.loads((path / "adapter_config.json").read_text())
    assert meta["format"] == "adapterkit" and meta["method"] == "lora"
    assert meta["config"]["r"] == 4 and meta["config"]["use_rslora"] is True
    assert meta["base"]["architecture"] == "LlamaForCausalLM" and meta["base"]["hidden_size"] == 64
    assert meta["base"]["modules"]["model.layers.0.self_attn.v_proj"]["weight"] == [32, 64]
    m2 = tiny_llama()
    ak.load_adapter(m2, path, name="m2", trainable=True)
    assert ak.list_adapters(m2) == ["m2"]
    assert (m2(ids).logits - ref).abs().max().item() <= 1e-6
    assert ak.trainable_parameters(m2, "m2") == 2 * 4 * (64 + 64) + 2 * 4 * (64 + 32)


def test_default_name_is_directory_name(saved):
    m2 = tiny_llama()
    ak.load_adapter(m2, saved[0])
    assert ak.list_adapters(m2) == ["math"]


def test_wrong_base_names_tensor_and_shapes(saved):
    other = tiny_llama(hidden_size=32, head_dim=8) if False else None  # noqa: F841 (keep simple below)
    from transformers import LlamaConfig, LlamaForCausalLM

    m = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=4, vocab_size=128)).eval()
    with pytest.raises(IncompatibleBaseError, match=r"v_proj\.weight has shape \(64, 64\).*\(32, 64\)"):
        ak.load_adapter(m, saved[0])
    assert ak.list_adapters(m) == []


def test_fewer_layers_base_refused(saved):
    from transformers import LlamaConfig, LlamaForCausalLM

    m = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                     num_attention_heads=4, num_key_value_heads=2, vocab_size=128))
    with pytest.raises(IncompatibleBaseError, match="model.layers.1"):
        ak.load_adapter(m, saved[0])


def test_missing_dir(tmp_path):
    with pytest.raises(AdapterFileError, match="does not exist"):
        ak.load_adapter(tiny_llama(), tmp_path / "nope")


def test_missing_config(saved):
    (saved[0] / "adapter_config.json").unlink()
    with pytest.raises(AdapterFileError, match="missing adapter_config.json"):
        ak.load_adapter(tiny_llama(), saved[0])


def test_corrupt_config(saved):
    (saved[0] / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterFileError, match="not valid JSON"):
        ak.load_adapter(tiny_llama(), saved[0])


def test_missing_weights(saved):
    (saved[0] / "adapter.safetensors").unlink()
    with pytest.raises(AdapterFileError, match="missing adapter weights"):
        ak.load_adapter(tiny_llama(), saved[0])


def test_truncated_weights(saved):
    f = saved[0] / "adapter.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(AdapterFileError, match="corrupt or truncated"):
        ak.load_adapter(tiny_llama(), saved[0])


def test_garbage_weights(saved):
    (saved[0] / "adapter.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(AdapterFileError, match="corrupt or truncated"):
        ak.load_adapter(tiny_llama(), saved[0])


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_inf_weights_refused(saved, bad):
    from safetensors.torch import load_file, save_file

    f = saved[0] / "adapter.safetensors"
    t = load_file(str(f))
    k = sorted(t)[0]
    t[k][0, 0] = bad
    save_file(t, str(f))
    m = tiny_llama()
    with pytest.raises(AdapterFileError, match=f"{k}.*(NaN|Inf)"):
        ak.load_adapter(m, saved[0])
    assert ak.list_adapters(m) == []


def test_bin_loads_weights_only_when_no_safetensors(saved, ids):
    from safetensors.torch import load_file

    path, ref = saved
    tensors = load_file(str(path / "adapter.safetensors"))
    (path / "adapter.safetensors").unlink()
    torch.save(tensors, path / "adapter.bin")
    m = tiny_llama()
    ak.load_adapter(m, path)
    assert (m(ids).logits - ref).abs().max().item() <= 1e-6


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch /tmp/adapterkit-pwned",))


def test_malicious_pickle_refused(saved):
    path = saved[0]
    (path / "adapter.safetensors").unlink()
    with open(path / "adapter.bin", "wb") as fh:
        pickle.dump({"x": _Evil()}, fh)
    if os.path.exists("/tmp/adapterkit-pwned"):
        os.unlink("/tmp/adapterkit-pwned")
    with pytest.raises(AdapterFileError, match="weights_only"):
        ak.load_adapter(tiny_llama(), path)
    assert not os.path.exists("/tmp/adapterkit-pwned")


def test_safetensors_preferred_over_bin(saved, ids):
    path, ref = saved
    with open(path / "adapter.bin", "wb") as fh:
        pickle.dump({"x": _Evil()}, fh)  # never opened: safetensors is there
    m = tiny_llama()
    ak.load_adapter(m, path)
    assert (m(ids).logits - ref).abs().max().item() <= 1e-6


def test_not_an_adapter_config(saved):
    (saved[0] / "adapter_config.json").write_text(json.dumps({"hello": 1}))
    with pytest.raises(AdapterFileError, match="neither an adapterkit nor a PEFT"):
        ak.load_adapter(tiny_llama(), saved[0])


def test_crash_mid_save_keeps_old_adapter(saved, monkeypatch, ids):
    path, ref = saved
    before = {p.name: p.read_bytes() for p in path.iterdir()}
    m = tiny_llama(seed=5)
    ak.add_adapter(m, "math", ak.LoRAConfig(r=4, alpha=8, use_rslora=True, targets=["q_proj", "v_proj"]))

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(fnative, "write_json", boom)  # weights written, then the config write fails
    with pytest.raises(OSError, match="disk full"):
        ak.save_adapter(m, "math", path)
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before
    assert [p.name for p in path.parent.iterdir() if p.name.startswith(".")] == []  # no temp leftovers


def test_overwrite_replaces_atomically(saved, ids):
    path, _ = saved
    m = tiny_llama()
    ak.add_adapter(m, "math", ak.LoRAConfig(r=2, targets=["q_proj"]))
    randomize_adapters(m, seed=9)
    ref = m(ids).logits
    ak.save_adapter(m, "math", path)
    m2 = tiny_llama()
    ak.load_adapter(m2, path)
    assert (m2(ids).logits - ref).abs().max().item() <= 1e-6
    assert [p.name for p in Path(path).parent.iterdir() if p.name.startswith(".")] == []


def test_save_to_a_file_path_refused(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    m = tiny_llama()
    ak.add_adapter(m, "a", ak.LoRAConfig())
    with pytest.raises(AdapterFileError, match="not a directory"):
        ak.save_adapter(m, "a", f)
    assert f.read_text() == "x"
