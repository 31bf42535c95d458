"""The README's Python examples run (those that need no real model)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
RUNNABLE = [b for b in BLOCKS if "load_default" not in b and "localhost" not in b]  # no real model, no server


def test_readme_has_examples():
    assert len(RUNNABLE) >= 1


@pytest.mark.parametrize("code", RUNNABLE, ids=[f"block{i}" for i in range(len(RUNNABLE))])
def test_readme_block_runs(code, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})
    out = capsys.readouterr().out
    if "list_adapters" in code:
        assert "['math', 'chat'] 3584" in out
    if "add_scalearn" in code:
        assert out.splitlines()[0] == "2" and "torch.Size([2, 8, 128])" in out
    if "ak.Parallel" in code:
        assert "torch.Size([4, 8, 128])" in out
