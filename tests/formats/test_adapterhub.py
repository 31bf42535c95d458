"""AdapterHub files without the real package: detection, write -> read round trips, and every
refusal naming its field (parity with the real ``adapters`` package: test_parity_adapterhub.py)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import adapterkit.api as ak
from adapterkit.errors import AdapterFileError, ConfigError, IncompatibleBaseError
from adapterkit.formats import detect_format, read_adapter
from adapterkit.formats.adapterhub import write_adapterhub
from adapterkit.formats.convert import convert
from adapterkit.methods.bottleneck import BottleneckConfig
from adapterkit.methods.compacter import CompacterConfig
from adapterkit.methods.ia3 import IA3Config
from adapterkit.methods.lora import LoRAConfig
from conftest import tiny_bert, tiny_gpt2, tiny_llama

CONFIGS = {
    "bottleneck": BottleneckConfig(mode="houlsby", scaling="learned"),
    "compacter": CompacterConfig(mode="compacter++", phm_dim=4, reduction_factor=8),
    "lora": LoRAConfig(r=2, alpha=4, targets=["q_proj", "v_proj", "up_proj"]),
    "ia3": IA3Config(targets=["k_proj", "v_proj"]),
}


def _randomize(model: torch.nn.Module, name: str = "x") -> None:
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in ak.adapter_parameters(model, name).items():
            one = n.endswith("ia3_l") or n.endswith("scaling")
            p.copy_(torch.randn(p.shape, generator=g) * 0.3 + (1.0 if one else 0.0))


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _saved(tmp_path: Path, model: torch.nn.Module, config, name: str = "x") -> Path:
    ak.add_adapter(model, name, config)
    _randomize(model, name)
    rec = ak.get_record(model, name)
    return write_adapterhub(tmp_path / "ah", model, rec.method, rec.config, ak.adapter_state_dict(model, name), name)


def _edit(path: Path, **changes) -> None:
    meta = json.loads((path / "adapter_config.json").read_text())
    meta["config"].update(changes)
    (path / "adapter_config.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_write_read_round_trip_llama(method: str, tmp_path: Path, ids: torch.Tensor) -> None:
    model = tiny_llama()
    path = _saved(tmp_path, model, CONFIGS[method])
    assert detect_format(path) == "adapterhub"
    assert {p.name for p in path.iterdir()} == {"adapter_config.json", "adapter.safetensors", "pytorch_adapter.bin"}
    want = _logits(model, ids)
    fresh = tiny_llama()
    ak.load_adapter(fresh, path, name="x")
    got = _logits(fresh, ids)
    assert (got - want).abs().max().item() <= 1e-5
    assert (got - _logits(tiny_llama(), ids)).abs().max().item() > 1e-3


def test_round_trip_bert_without_head_prefix_and_from_bin(tmp_path: Path) -> None:
    """A BertModel (no ``bert.`` prefix in the keys); the pickle file alone is read safely."""
    model = tiny_bert()
    path = _saved(tmp_path, model, BottleneckConfig(mode="pfeiffer", residual_before_ln=False))
    (path / "adapter.safetensors").unlink()
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(0))
    fresh = tiny_bert()
    ak.load_adapter(fresh, path, name="x")
    assert (_logits(fresh, ids) - _logits(model, ids)).abs().max().item() <= 1e-5


def test_gpt2_merged_qkv_lora_reads_as_one_rank(tmp_path: Path) -> None:
    """AdapterHub's q/v-only LoRA on GPT-2's fused c_attn: rank 2r on import, k rows zero."""
    model = tiny_gpt2()
    path = _saved(tmp_path, model, LoRAConfig(r=2, targets=["c_attn", "mlp.c_fc"]))
    _edit(path, attn_matrices=["q", "v"])
    tensors = torch.load(path / "pytorch_adapter.bin", weights_only=True)
    d = 64
    for k in list(tensors):
        if "c_attn" in k and k.endswith("lora_A"):
            tensors[k] = tensors[k][:4]  # (n r, in) for q and v
        elif "c_attn" in k and k.endswith("lora_B"):
            tensors[k] = torch.cat([tensors[k][:d], tensors[k][2 * d:]])  # (n d, r)
    torch.save(tensors, path / "pytorch_adapter.bin")
    (path / "adapter.safetensors").unlink()
    saved = read_adapter(path)
    assert saved.method == "lora" and saved.config["r"] == 4 and saved.config["alpha"] == 16 * 4 / 2  # alpha/r kept
    b = saved.tensors["transformer.h.0.attn.c_attn.lora_B"]
    assert b.shape == (3 * d, 4) and not b[d:2 * d].any() and not b[:d, 2:].any() and not b[2 * d:, :2].any()
    a = saved.tensors["transformer.h.0.mlp.c_fc.lora_A"]
    assert a.shape == (4, 64) and not a[2:].any()  # zero-padded to the common rank


@pytest.mark.parametrize("field, value, method", [
    ("ln_after", True, "bottleneck"), ("use_gating", True, "bottleneck"), ("residual_before_ln", "post_add", "bottleneck"),
    ("original_ln_after", False, "bottleneck"), ("scaling", "channel", "bottleneck"), ("inv_adapter", "nice", "bottleneck"),
    ("stochastic_depth", 0.1, "bottleneck"), ("non_linearity", "gelu_10", "bottleneck"),
    ("phm_c_init", "uniform", "compacter"), ("shared_W_phm", True, "compacter"), ("learn_phm", False, "compacter"),
    ("use_dora", True, "lora"), ("vera_d", 0.1, "lora"), ("composition_mode", "mix", "lora"),
    ("not_a_field", 1, "lora"),
])
def test_refused_fields_are_named(field: str, value, method: str, tmp_path: Path) -> None:
    path = _saved(tmp_path, tiny_llama(), CONFIGS[method])
    _edit(path, **{field: value})
    model = tiny_llama()
    with pytest.raises(AdapterFileError, match=f"AdapterHub config field '{field}'"):
        ak.load_adapter(model, path, name="x")
    assert ak.list_adapters(model) == []


@pytest.mark.parametrize("arch", ["prefix_tuning", "prompt_tuning", "union", "reft", "something_new"])
def test_other_architectures_refused(arch: str, tmp_path: Path) -> None:
    path = _saved(tmp_path, tiny_llama(), CONFIGS["lora"])
    _edit(path, architecture=arch)
    with pytest.raises(AdapterFileError, match=f"'architecture' = '{arch}'"):
        read_adapter(path)


def test_file_problems_named(tmp_path: Path) -> None:
    path = _saved(tmp_path, tiny_llama(), CONFIGS["bottleneck"])
    meta = json.loads((path / "adapter_config.json").read_text())
    (path / "adapter_config.json").write_text(json.dumps({**meta, "model_type": "t5"}))
    with pytest.raises(AdapterFileError, match="model_type 't5' is not supported"):
        read_adapter(path)
    (path / "adapter_config.json").write_text(json.dumps({**meta, "name": "other"}))
    with pytest.raises(AdapterFileError, match="not part of a bottleneck adapter named 'other'"):
        read_adapter(path)
    (path / "adapter_config.json").write_text(json.dumps({**meta, "hidden_size": 32}))
    with pytest.raises(IncompatibleBaseError, match="hidden_size=32"):
        ak.load_adapter(tiny_llama(), path, name="x")
    (path / "adapter_config.json").write_text(json.dumps(meta))
    tensors = torch.load(path / "pytorch_adapter.bin", weights_only=True)
    (path / "adapter.safetensors").unlink()
    first = sorted(tensors)[0]
    torch.save({k: v for k, v in tensors.items() if k != first}, path / "pytorch_adapter.bin")
    with pytest.raises(AdapterFileError, match="holds .* expected"):
        read_adapter(path)
    torch.save({**tensors, first: tensors[first] * float("nan")}, path / "pytorch_adapter.bin")
    with pytest.raises(AdapterFileError, match="NaN"):
        read_adapter(path)
    torch.save({"x": object()}, path / "pytorch_adapter.bin")  # an arbitrary pickle
    with pytest.raises(AdapterFileError, match="weights_only"):
        read_adapter(path)


def test_flex_head_refused_static_head_mapped(tmp_path: Path) -> None:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                     num_attention_heads=4, vocab_size=64, num_labels=3)).eval()
    path = _saved(tmp_path, model, BottleneckConfig())  # modules_to_save default: the classifier
    hc = json.loads((path / "head_config.json").read_text())
    assert hc["config"] is None and hc["num_labels"] == 3
    saved = read_adapter(path)
    assert saved.config["modules_to_save"] == ["classifier"]
    assert "classifier.modules_to_save.weight" in saved.tensors
    (path / "head_config.json").write_text(json.dumps({**hc, "config": {"head_type": "classification"}}))
    with pytest.raises(AdapterFileError, match="head field 'config' = 'classification'"):
        read_adapter(path)


@pytest.mark.parametrize("config, named", [
    (BottleneckConfig(mode="parallel"), "parallel"),
    (IA3Config(), "feedforward_targets"),
    (LoRAConfig(r=2, targets=["o_proj"]), "o_proj"),
    (LoRAConfig(r=2, bias=True), "bias"),
    (LoRAConfig(r=2, targets=["layers.0.self_attn.q_proj"]), None),  # layer 1 left out: fine
])
def test_export_refusals_write_nothing(config, named: str | None, tmp_path: Path) -> None:
    model = tiny_llama()
    ak.add_adapter(model, "x", config)
    rec = ak.get_record(model, "x")
    args = (tmp_path / "out", model, rec.method, rec.config, ak.adapter_state_dict(model, "x"), "x")
    if named is None:
        write_adapterhub(*args)
        assert json.loads((tmp_path / "out" / "adapter_config.json").read_text())["config"]["leave_out"] == [1]
        return
    with pytest.raises(ConfigError, match=named):
        write_adapterhub(*args)
    assert not (tmp_path / "out").exists()


def test_convert_both_ways(tmp_path: Path, ids: torch.Tensor) -> None:
    model = tiny_llama()
    ak.add_adapter(model, "x", CONFIGS["lora"])
    _randomize(model)
    ak.save_adapter(model, "x", tmp_path / "native")
    convert(tmp_path / "native", tmp_path / "ah", to="adapterhub")
    meta = json.loads((tmp_path / "ah" / "adapter_config.json").read_text())
    assert meta["name"] == "ah" and meta["model_type"] == "llama" and meta["config"]["leave_out"] == []
    convert(tmp_path / "ah", tmp_path / "back", to="native")
    fresh = tiny_llama()
    ak.load_adapter(fresh, tmp_path / "back", name="x")
    assert (_logits(fresh, ids) - _logits(model, ids)).abs().max().item() <= 1e-5
    # a PEFT file records no base: AdapterHub needs model_type and sizes, from the model
    convert(tmp_path / "native", tmp_path / "peft", to="peft")
    with pytest.raises(ConfigError, match="model_type and hidden_size"):
        convert(tmp_path / "peft", tmp_path / "ah2", to="adapterhub")
    convert(tmp_path / "peft", tmp_path / "ah2", to="adapterhub", model=tiny_llama())
    assert detect_format(tmp_path / "ah2") == "adapterhub"


def test_save_adapter_in_adapterhub_format(tmp_path: Path, ids: torch.Tensor) -> None:
    model = tiny_llama()
    ak.add_adapter(model, "x", CONFIGS["lora"])
    _randomize(model, "x")
    path = ak.save_adapter(model, "x", tmp_path / "ah", format="adapterhub")
    assert detect_format(path) == "adapterhub"
    assert json.loads((path / "adapter_config.json").read_text())["name"] == "x"
    fresh = tiny_llama()
    ak.load_adapter(fresh, path, name="y")
    assert (_logits(fresh, ids) - _logits(model, ids)).abs().max().item() <= 1e-5
    with pytest.raises(ConfigError, match="'adapterkit', 'peft' or 'adapterhub'"):
        ak.save_adapter(model, "x", tmp_path / "other", format="adapterhubb")
