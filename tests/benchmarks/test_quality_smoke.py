"""benchmarks/quality.py at smoke size (random 2-layer Llama, byte tokenizer, 1-2 steps): both
modes run end to end, the lr kept is the sweep's lowest validation loss, full fine-tuning is the
100% row, trainable counts are the models' own, and composing methods are listed as skipped."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "quality.py"
_spec = importlib.util.spec_from_file_location("quality", _PATH)
quality = importlib.util.module_from_spec(_spec)
sys.modules["quality"] = quality  # dataclasses resolve their module by name
_spec.loader.exec_module(quality)

SMOKE = ["--tiny", "--steps", "1", "--batch-size", "2", "--n-train", "6", "--n-val", "2", "--n-test", "2"]


def test_table_and_methods_modes(tmp_path, capsys):
    out = tmp_path / "q"
    assert quality.main([*SMOKE, "--mode", "both", "--tasks", "commonsense_mc,arithmetic",
                         "--methods", "lora,ia3,fusion", "--out", str(out)]) == 0
    res = json.loads((out / "quality.json").read_text())
    assert (out / "quality.md").read_text().strip() in capsys.readouterr().out
    for task in ("commonsense_mc", "arithmetic"):
        t = res["tasks"][task]
        assert [r["row"] for r in t["rows"]] == ["Series", "Parallel", "LoRA", "Prefix", "Full FT"]
        for r in t["rows"]:
            sweep = t["sweeps"][r["row"]]
            assert [s["lr"] for s in sweep] == list(quality.LRS[r["row"]])
            assert r["lr"] == min(sweep, key=lambda s: s["val_loss"])["lr"]  # chosen on validation
            assert 0.0 <= r["test"] <= 1.0 and r["trainable"] > 0
        full = t["rows"][-1]
        assert full["method"] == "full" and full["trainable"] == 107_200  # every weight of the toy Llama
        assert t["n_test"] == 2 and t["metric"] == ("acc" if task == "commonsense_mc" else "numeric")
    m = res["methods"]
    assert [r["method"] for r in m["rows"]] == ["full", "lora", "ia3"]
    assert m["rows"][0]["share"] == 1.0 and all(r["memory_bytes"] > 0 and r["step_s"] > 0 for r in m["rows"])
    assert m["rows"][2]["trainable"] < m["rows"][1]["trainable"]  # ia3's vectors vs LoRA's matrices
    assert "composes" in m["skipped"]["fusion"]


def test_bad_flags():
    with pytest.raises(SystemExit):
        quality.main([*SMOKE, "--rows", "Serial"])
    with pytest.raises(SystemExit):
        quality.main([*SMOKE, "--mode", "methods", "--methods", "lorra"])
