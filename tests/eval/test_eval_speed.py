"""benchmarks/eval_speed.py, smoke size: a tiny random Llama, 3 PEFT adapters, 5 examples.
Checks what the full run claims besides speed: identical greedy answers to HF generate + PEFT
(one adapter at a time), and the adapters sharing forward steps in the eval pass."""
from __future__ import annotations

import importlib.util
from pathlib import Path

from _eval_utils import char_tokenizer, tiny_llama

import adapterkit.eval as ev

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "eval_speed.py"


def _bench():
    spec = importlib.util.spec_from_file_location("eval_speed_bench", _PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_eval_speed_smoke(tmp_path):
    bench = _bench()
    model, tok = tiny_llama(), char_tokenizer()
    adapters = bench.make_adapters(model, 3, tmp_path, rank=4, std=0.1)
    spec = ev.load_task("sentiment", n=5, max_tokens=6)
    lines: list[str] = []
    s = bench.run(model, tok, adapters, spec, hf_batch_size=2, log=lines.append)
    assert s["answers"] == 15 and s["mismatches"] == 0, lines
    assert s["eval_s"] > 0 and s["hf_peft_s"] > 0
    assert s["batching"]["max_models_per_step"] == 3 and s["batching"]["mixed_steps"] > 0
    assert s["distinct_answer_lists"] > 1  # the adapters are not all the same model


def test_eval_speed_cli_tiny(capsys):
    assert _bench().main(["--tiny", "--adapters", "2", "--examples", "3", "--max-tokens", "4"]) == 0
    assert '"mismatches": 0' in capsys.readouterr().out
