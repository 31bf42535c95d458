"""The README's "Evaluating adapters" example runs and prints what its comments say."""
from __future__ import annotations

import json
import re
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_eval_example(tmp_path, monkeypatch, capsys):
    section = README.read_text().split("## Evaluating adapters", 1)[1].split("\n## ", 1)[0]
    (code,) = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("| model") and out[-1] == "3"
    assert {line.split("|")[1].strip() for line in out[2:5]} == {"base", "math", "chat"}
    data = json.loads((tmp_path / "eval_out" / "results.json").read_text())
    assert set(data["models"]) == {"base", "math", "chat"} and (tmp_path / "eval_out" / "results.png").is_file()
