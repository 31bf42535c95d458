"""The training examples run end to end on the tiny model (subprocess, as a user runs them)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import adapterkit

ROOT = Path(__file__).resolve().parents[2]


def run_example(name: str, *args: str) -> str:
    env = dict(os.environ)
    src = str(Path(adapterkit.__file__).resolve().parents[1])  # works installed or from a checkout
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / name), *args], capture_output=True, text=True,
                          env=env, timeout=240, cwd=ROOT)
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout}\n{proc.stderr[-3000:]}"
    return proc.stdout


def test_train_lora_example(tmp_path):
    out = run_example("train_lora.py", "--model", "tiny", "--steps", "6", "--out", str(tmp_path / "run"), "--no-progress")
    assert "adapter saved to" in out and "[pirate]" in out and "[base]" in out
    assert (tmp_path / "run" / "adapter" / "adapter.safetensors").is_file()
    assert (tmp_path / "run" / "loss.png").is_file()


def test_hf_trainer_example(tmp_path):
    out = run_example("hf_trainer.py", "--steps", "10", "--out", str(tmp_path / "hf"))
    assert "== adapter params" in out
    saved = adapterkit.formats.read_adapter(tmp_path / "hf")
    assert saved.method == "lora" and saved.tensors
