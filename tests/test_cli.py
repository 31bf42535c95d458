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
