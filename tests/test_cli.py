"""The command line: a thin layer over the API (commands that need no real model)."""
from __future__ import annotations

import json

import adapterkit as ak
from adapterkit.cli import main
from conftest import randomize_adapters, tiny_llama


def test_info(tmp_path, capsys):
    m = tiny_llama()
    ak.add_adapter(m, "a", ak.LoRAConfig(r=4, targets=["q_proj"]))
    randomize_adapters(m)
    ak.save_adapter(m, "a", tmp_path / "a")
    assert main(["info", str(tmp_path / "a"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["method"] == "lora" and info["format"] == "adapterkit"
    assert info["parameters"] == 2 * 4 * (64 + 64)
    assert info["base"]["architecture"] == "LlamaForCausalLM" and info["base"]["target_modules"] == 2
    assert main(["info", str(tmp_path / "a")]) == 0
    assert "parameters 1,024" in capsys.readouterr().out


def test_info_bad_dir_is_a_clear_error(tmp_path, capsys):
    assert main(["info", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err


def _tiny_model_dir(tmp_path):
    from adapterkit.train.toy import toy_llama, toy_tokenizer

    m, tok = toy_llama(), toy_tokenizer()
    d = tmp_path / "base"
    m.save_pretrained(d)
    tok.save_pretrained(d)
    return d, m, tok


def test_generate_and_merge(tmp_path, capsys):
    import torch

    from adapterkit.models import load_model

    base_dir, m, tok = _tiny_model_dir(tmp_path)
    ak.add_adapter(m, "a", ak.LoRAConfig(r=4, targets=["q_proj", "v_proj", "o_proj"]))
    randomize_adapters(m, std=0.5)
    ak.save_adapter(m, "a", tmp_path / "a")
    x = torch.randint(3, 200, (1, 6))
    ref = m(x).logits

    assert main(["generate", "--model", str(base_dir), "--adapter", str(tmp_path / "a"), "--prompt", "hi",
                 "--max-new-tokens", "5"]) == 0
    with_adapter = capsys.readouterr().out
    assert main(["generate", "--model", str(base_dir), "--prompt", "hi", "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out != with_adapter  # the adapter changes greedy output

    assert main(["merge", "--model", str(base_dir), "--adapter", str(tmp_path / "a"), "--out",
                 str(tmp_path / "merged")]) == 0
    merged, _ = load_model(tmp_path / "merged")
    assert ak.list_adapters(merged) == []
    assert not any("adapterkit" in k for k in merged.state_dict())
    assert (merged(x).logits - ref).abs().max().item() <= 1e-4


def test_convert_round_trip(tmp_path):
    m = tiny_llama()
    ak.add_adapter(m, "a", ak.LoRAConfig(r=4))
    randomize_adapters(m)
    ak.save_adapter(m, "a", tmp_path / "a")
    assert main(["convert", "--to", "peft", str(tmp_path / "a"), str(tmp_path / "p")]) == 0
    assert (tmp_path / "p" / "adapter_model.safetensors").is_file()
    m2 = tiny_llama()
    ak.load_adapter(m2, tmp_path / "p")
    import torch

    x = torch.randint(0, 128, (2, 5))
    assert (m2(x).logits - m(x).logits).abs().max().item() <= 1e-5

    assert main(["convert", "--to", "adapterhub", str(tmp_path / "a"), str(tmp_path / "ah")]) == 0
    m3 = tiny_llama()
    ak.load_adapter(m3, tmp_path / "ah")
    assert (m3(x).logits - m(x).logits).abs().max().item() <= 1e-5
