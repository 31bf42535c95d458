"""PEFT files: exact key/config layout, legacy .bin files, per-layer ranks, refusals, convert."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import adapterkit as ak
from adapterkit.errors import AdapterFileError, ConfigError, IncompatibleBaseError
from adapterkit.formats import detect_format, read_adapter
from adapterkit.formats.convert import convert
from adapterkit.formats.peft import from_peft, to_peft
from conftest import randomize_adapters, tiny_gpt2, tiny_llama

peft = pytest.importorskip("peft")


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def peft_lora_dir(tmp_path: Path, name: str = "peft", safe: bool = True, **cfg) -> tuple[Path, torch.nn.Module]:
    """A PEFT LoRA adapter with random weights saved from a tiny Llama; returns (dir, PEFT model)."""
    cfg.setdefault("target_modules", ["q_proj", "v_proj"])
    cfg.setdefault("r", 4)
    pm = peft.get_peft_model(tiny_llama(), peft.LoraConfig(init_lora_weights=False, **cfg)).eval()
    d = tmp_path / name
    pm.save_pretrained(d, safe_serialization=safe)
    return d, pm


def edit_config(d: Path, **changes) -> None:
    p = d / "adapter_config.json"
    meta = json.loads(p.read_text())
    meta.update(changes)
    p.write_text(json.dumps(meta))


# -- layout of what we write ----------------------------------------------------------------
def test_export_writes_peft_keys_and_config(tmp_path) -> None:
    m = tiny_llama()
    ak.add_adapter(m, "a", ak.LoRAConfig(r=4, alpha=8, targets=["q_proj", "v_proj"]))
    out = ak.save_adapter(m, "a", tmp_path / "p", format="peft")
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert detect_format(out) == "peft"
    keys = set(load_file(str(out / "adapter_model.safetensors")))
    want = {f"base_model.model.model.layers.{i}.self_attn.{p}_proj.lora_{ab}.weight"
            for i in range(2) for p in "qv" for ab in "AB"}
    assert keys == want
    meta = json.loads((out / "adapter_config.json").read_text())
    assert meta["peft_type"] == "LORA" and meta["task_type"] == "CAUSAL_LM"
    assert meta["target_modules"] == ["q_proj", "v_proj"]  # leaf names: they select exactly these modules
    assert (meta["r"], meta["lora_alpha"], meta["use_dora"], meta["bias"]) == (4, 8, False, "none")
    cfg = peft.LoraConfig.from_pretrained(str(out))  # PEFT itself accepts the config
    assert cfg.r == 4 and set(cfg.target_modules) == {"q_proj", "v_proj"}


def test_subset_of_layers_exported_as_full_paths(tmp_path, ids) -> None:
    m = tiny_llama()
    ak.add_adapter(m, "a", ak.LoRAConfig(r=2, targets=r"model\.layers\.0\.self_attn\.q_proj"))
    randomize_adapters(m)
    want = logits(m, ids)
    out = ak.save_adapter(m, "a", tmp_path / "p", format="peft")
    meta = json.loads((out / "adapter_config.json").read_text())
    assert meta["target_modules"] == ["model.layers.0.self_attn.q_proj"]  # "q_proj" would hit layer 1 too
    pm = peft.PeftModel.from_pretrained(tiny_llama(), out).eval()
    assert (logits(pm, ids) - want).abs().max() <= 1e-5
    assert not hasattr(pm.base_model.model.model.layers[1].self_attn.q_proj, "lora_A")


def test_import_targets_exactly_the_modules_in_the_file(tmp_path) -> None:
    d, _ = peft_lora_dir(tmp_path, layers_to_transform=[1])
    m = tiny_llama()
    ak.load_adapter(m, d, name="x")
    cfg = ak.get_adapter_config(m, "x")
    assert cfg.targets == ("model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj")
    assert sorted(ak.api.get_record(m, "x").pieces) == list(cfg.targets)


@pytest.mark.parametrize("bias", [True, False])
def test_native_peft_tensor_maps_are_inverse(bias: bool) -> None:
    g = torch.Generator().manual_seed(0)
    if bias:
        tensors = {f"model.layers.0.self_attn.{p}.{n}": torch.randn(*s, generator=g)
                   for p in ("q_proj", "o_proj") for n, s in (("lora_A", (4, 64)), ("lora_B", (64, 4)),
                                                              ("lora_bias", (64,)))}
        peft_key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.bias"
    else:
        tensors = {"model.layers.0.self_attn.q_proj.lora_A": torch.randn(4, 64, generator=g),
                   "model.layers.0.self_attn.q_proj.lora_B": torch.randn(64, 4, generator=g),
                   "model.embed_tokens.lora_embedding_A": torch.randn(4, 128, generator=g),
                   "model.embed_tokens.lora_embedding_B": torch.randn(64, 4, generator=g)}
        peft_key = "base_model.model.model.embed_tokens.lora_embedding_A"
    cfg = ak.LoRAConfig(r=4, alpha=8, bias=bias, use_rslora=True, targets=["model.layers.0.self_attn"])
    meta, ptensors = to_peft("lora", cfg, tensors)
    assert peft_key in ptensors
    method, back_cfg, back = from_peft(json.loads(json.dumps(meta)), ptensors)
    assert method == "lora" and back.keys() == tensors.keys()
    assert all(torch.equal(back[k], tensors[k]) for k in tensors)
    assert (back_cfg["r"], back_cfg["alpha"], back_cfg["bias"], back_cfg["use_rslora"]) == (4, 8, bias, True)


def test_keys_without_base_model_prefix_load(tmp_path, ids) -> None:
    """Files written by transformers' PEFT integration lack PEFT's ``base_model.model.``."""
    d, pm = peft_lora_dir(tmp_path)
    sd = load_file(str(d / "adapter_model.safetensors"))
    save_file({k.removeprefix("base_model.model."): v for k, v in sd.items()}, str(d / "adapter_model.safetensors"))
    m = tiny_llama()
    ak.load_adapter(m, d)
    assert (logits(m, ids) - logits(pm, ids)).abs().max() <= 1e-5


# -- legacy .bin files ----------------------------------------------------------------------
def test_bin_only_peft_dir_loads(tmp_path, ids) -> None:
    d, pm = peft_lora_dir(tmp_path, safe=False)
    assert (d / "adapter_model.bin").is_file() and not (d / "adapter_model.safetensors").exists()
    m = tiny_llama()
    ak.load_adapter(m, d)
    assert (logits(m, ids) - logits(pm, ids)).abs().max() <= 1e-5


class Payload:
    """Stands for an arbitrary object in a pickle (what weights_only=True must refuse)."""


@pytest.mark.parametrize("obj", [Payload(), "not a tensor", [1, 2]])
def test_bin_with_non_tensor_object_is_refused(tmp_path, obj) -> None:
    d, _ = peft_lora_dir(tmp_path, safe=False)
    sd = torch.load(d / "adapter_model.bin", weights_only=True)
    sd["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"] = obj
    torch.save(sd, d / "adapter_model.bin")
    with pytest.raises(AdapterFileError, match="adapter_model.bin"):
        ak.load_adapter(tiny_llama(), d)


def test_safetensors_preferred_over_bin(tmp_path, ids) -> None:
    d, pm = peft_lora_dir(tmp_path)
    torch.save({"junk": Payload()}, d / "adapter_model.bin")  # never unpickled
    m = tiny_llama()
    ak.load_adapter(m, d)
    assert (logits(m, ids) - logits(pm, ids)).abs().max() <= 1e-5


# -- per-layer ranks (rank_pattern / alpha_pattern) -----------------------------------------
def test_rank_pattern_covering_every_module_loads(tmp_path, ids) -> None:
    d, pm = peft_lora_dir(tmp_path, r=8, lora_alpha=16, rank_pattern={"q_proj": 2, "v_proj": 2},
                          alpha_pattern={"q_proj": 3, "v_proj": 3})
    m = tiny_llama()
    ak.load_adapter(m, d, name="x")
    cfg = ak.get_adapter_config(m, "x")
    assert (cfg.r, cfg.alpha) == (2, 3)  # the per-module values, not the file's r=8, alpha=16
    assert (logits(m, ids) - logits(pm, ids)).abs().max() <= 1e-5


def test_rank_pattern_with_different_ranks_is_refused(tmp_path) -> None:
    d, _ = peft_lora_dir(tmp_path, rank_pattern={"layers.1.self_attn.q_proj": 2})
    m = tiny_llama()
    with pytest.raises(AdapterFileError, match=r"rank_pattern.*model\.layers\.\d\.self_attn\.q_proj: r=\d"):
        ak.load_adapter(m, d)
    assert ak.list_adapters(m) == []


def test_alpha_pattern_with_different_alphas_is_refused(tmp_path) -> None:
    d, _ = peft_lora_dir(tmp_path, alpha_pattern={"v_proj": 32})
    with pytest.raises(AdapterFileError, match="alpha_pattern"):
        ak.load_adapter(tiny_llama(), d)


def test_rank_pattern_is_checked_against_the_tensors(tmp_path) -> None:
    d, _ = peft_lora_dir(tmp_path, rank_pattern={"q_proj": 2})
    edit_config(d, rank_pattern={"q_proj": 3})
    with pytest.raises(AdapterFileError, match=r"q_proj\.lora_A\.weight' has rank 2.*rank_pattern\['q_proj'\]=3"):
        ak.load_adapter(tiny_llama(), d)


def test_invalid_rank_pattern_regex_is_named(tmp_path) -> None:
    d, _ = peft_lora_dir(tmp_path)
    edit_config(d, rank_pattern={"q_proj(": 4})
    with pytest.raises(AdapterFileError, match=r"rank_pattern has an invalid pattern 'q_proj\('"):
        read_adapter(d)


# -- refusals -----------------------------------------------------------------------------
@pytest.mark.parametrize("field,value,needle", [
    ("bias", "all", "bias='all'"),
    ("modules_to_save", "lm_head", "modules_to_save='lm_head' must be a list"),
    ("init_lora_weights", "pissa", "init_lora_weights='pissa'"),
    ("layer_replication", [[0, 2]], "layer_replication"),
    ("peft_type", "LOHA", "peft_type 'LOHA'"),
])
def test_unsupported_peft_fields_are_refused(tmp_path, field, value, needle) -> None:
    d, _ = peft_lora_dir(tmp_path)
    edit_config(d, **{field: value})
    with pytest.raises(AdapterFileError, match=needle.replace("[", r"\[").replace("(", r"\(")):
        read_adapter(d)


def test_unknown_tensor_key_is_refused(tmp_path) -> None:
    d, _ = peft_lora_dir(tmp_path)
    sd = load_file(str(d / "adapter_model.safetensors"))
    sd["base_model.model.lm_head.modules_to_save.weight"] = torch.zeros(128, 64)
    save_file(sd, str(d / "adapter_model.safetensors"))
    with pytest.raises(AdapterFileError, match="lm_head.modules_to_save.weight"):
        read_adapter(d)


def test_missing_lora_B_is_named(tmp_path) -> None:
    d, _ = peft_lora_dir(tmp_path)
    sd = load_file(str(d / "adapter_model.safetensors"))
    del sd["base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight"]
    save_file(sd, str(d / "adapter_model.safetensors"))
    with pytest.raises(AdapterFileError, match=r"model\.layers\.0\.self_attn\.v_proj.*lora_B\.weight"):
        read_adapter(d)


def test_prompt_tuning_for_seq_cls_is_refused(tmp_path) -> None:
    pm = peft.get_peft_model(tiny_llama(), peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2))
    pm.save_pretrained(tmp_path / "p")
    edit_config(tmp_path / "p", task_type="SEQ_CLS")
    with pytest.raises(AdapterFileError, match="task_type='SEQ_CLS'"):
        read_adapter(tmp_path / "p")


def narrow_llama() -> torch.nn.Module:
    """Same module names as tiny_llama, other shapes (hidden 32)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=128)).eval()


def test_wrong_base_names_the_tensor(tmp_path) -> None:
    d, _ = peft_lora_dir(tmp_path)
    other = narrow_llama()
    with pytest.raises(IncompatibleBaseError, match=r"lora_A' has shape \(4, 64\).*\(4, 32\)"):
        ak.load_adapter(other, d)
    assert ak.list_adapters(other) == []


def test_export_of_a_method_peft_lacks_is_refused(tmp_path) -> None:
    m = tiny_llama()
    ak.add_adapter(m, "b", ak.make_config("bottleneck", targets=["mlp"]))
    with pytest.raises(ConfigError, match="no PEFT equivalent"):
        ak.save_adapter(m, "b", tmp_path / "p", format="peft")
    assert not (tmp_path / "p").exists()


# -- convert -------------------------------------------------------------------------------
CONVERT_CASES = {
    "lora": lambda: ak.LoRAConfig(r=4, alpha=8, targets=["q_proj", "embed_tokens"]),
    "lora-bias": lambda: ak.LoRAConfig(r=4, alpha=8, bias=True, init="gaussian", targets=["o_proj"]),
    "dora": lambda: ak.make_config("dora", r=2, alpha=4, use_rslora=True, targets=["v_proj"]),
    "ia3": lambda: ak.make_config("ia3", targets=["k_proj", "down_proj"], feedforward_targets=["down_proj"]),
    "prompt": lambda: ak.make_config("prompt", num_virtual_tokens=3),
    "prefix": lambda: ak.make_config("prefix", num_virtual_tokens=3),
}


@pytest.mark.parametrize("method", list(CONVERT_CASES))
def test_convert_native_peft_native_round_trip(method, tmp_path, ids) -> None:
    m = tiny_llama()
    ak.add_adapter(m, "a", CONVERT_CASES[method]())
    randomize_adapters(m)
    want = logits(m, ids)
    ak.save_adapter(m, "a", tmp_path / "native")
    convert(tmp_path / "native", tmp_path / "peft", to="peft")  # no model: the fingerprint is enough
    assert detect_format(tmp_path / "peft") == "peft"
    convert(tmp_path / "peft", tmp_path / "back", to="native")
    first, back = read_adapter(tmp_path / "native"), read_adapter(tmp_path / "back")
    assert back.method == first.method and back.base is None
    assert back.tensors.keys() == first.tensors.keys()
    assert all(torch.equal(back.tensors[k], first.tensors[k]) for k in first.tensors)
    fresh = tiny_llama()
    ak.load_adapter(fresh, tmp_path / "back")
    assert (logits(fresh, ids) - want).abs().max() <= 1e-5
    pm = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "peft").eval()
    got = logits(pm, ids)
    assert (got[:, -ids.shape[1]:] - want).abs().max() <= 1e-5


def test_convert_peft_to_native_with_model_records_fingerprint(tmp_path) -> None:
    d, _ = peft_lora_dir(tmp_path)
    m = tiny_llama()
    convert(d, tmp_path / "native", to="native", model=m)
    saved = read_adapter(tmp_path / "native")
    assert saved.base["architecture"] == "LlamaForCausalLM"
    assert saved.base["modules"]["model.layers.0.self_attn.q_proj"] == {"type": "Linear", "weight": [64, 64]}
    assert ak.list_adapters(m) == [] and all(p.requires_grad for p in m.parameters())  # model left as it was
    with pytest.raises(IncompatibleBaseError):  # the fingerprint now guards the base
        ak.load_adapter(narrow_llama(), tmp_path / "native")


@pytest.mark.parametrize("make,error", [(narrow_llama, IncompatibleBaseError), (tiny_gpt2, IncompatibleBaseError)])
def test_convert_with_wrong_model_is_refused_and_leaves_it_alone(tmp_path, make, error) -> None:
    d, _ = peft_lora_dir(tmp_path)
    other = make()
    with pytest.raises(error, match="q_proj"):
        convert(d, tmp_path / "native", to="native", model=other)
    assert ak.list_adapters(other) == [] and all(p.requires_grad for p in other.parameters())
    assert not (tmp_path / "native").exists()


def test_convert_unknown_format(tmp_path) -> None:
    with pytest.raises(ConfigError, match="'gguf'"):
        convert(tmp_path, tmp_path / "x", to="gguf")


def test_cli_convert_uses_this_converter(tmp_path, ids) -> None:
    from adapterkit.cli import main

    d, pm = peft_lora_dir(tmp_path)
    assert main(["convert", "--to", "native", str(d), str(tmp_path / "native")]) == 0
    saved = read_adapter(tmp_path / "native")
    assert saved.format == "adapterkit" and saved.method == "lora" and saved.base is None
    m = tiny_llama()
    ak.load_adapter(m, tmp_path / "native")
    assert (logits(m, ids) - logits(pm, ids)).abs().max() <= 1e-5
