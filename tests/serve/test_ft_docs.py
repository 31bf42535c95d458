"""docs/fine-tuning.md's openai-client walk-through, run as written against a REAL server
(uvicorn, `adapterkit serve --enable-fine-tuning` on a tiny random Llama with the char
tokenizer). Only the server's address and API key are substituted; the walk-through's own
asserts (the job succeeds) and its prints are checked."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
import python_multipart  # noqa: E402,F401  the serve extra's upload parser; never skip

from test_server_utils import API_KEY, MAX_LORA_RANK, serve_tree  # noqa: E402

DOC = Path(__file__).resolve().parents[2] / "docs" / "fine-tuning.md"
WALK = next(b for b in re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
            if "client.fine_tuning.jobs.create" in b)
README = Path(__file__).resolve().parents[2] / "README.md"


def test_the_walk_through_runs_against_a_real_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    target = 'OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")'
    assert target in WALK  # what the reader runs against `make serve-demo`
    with serve_tree(tmp_path, "--max-lora-rank", str(MAX_LORA_RANK), "--max-model-len", "128",
                    "--enable-fine-tuning", "--state-dir", str(tmp_path / "state")) as srv:
        code = WALK.replace(target, f'OpenAI(base_url="{srv.url}/v1", api_key="{API_KEY}", max_retries=0)')
        monkeypatch.chdir(tmp_path)
        exec(compile(code, str(DOC), "exec"), {})
        out = capsys.readouterr().out
        lines = out.splitlines()
        assert re.match(r"job ftjob-\S+ (queued|running)$", lines[0]), out  # it may start at once
        # 8 examples x 3 epochs / batch 4 = 6 optimizer steps, each an event with its loss
        steps = re.findall(r"step (\d+)/6: training loss=([\d.]+)", out)
        assert [int(s) for s, _ in steps] == list(range(1, 7)), out
        model = next(ln.split()[1] for ln in lines if ln.startswith("model "))
        assert model.startswith(f"ft:{srv.base}:colors:ftjob-")
        ckpts = [ln.split()[2] for ln in lines if re.match(r"checkpoint \d+ ", ln)]  # the script's own lines
        assert ckpts and all(c.startswith(model + ":ckpt-") for c in ckpts)
        assert model in {m.id for m in srv.client().models.list()}  # served by name, no restart
        assert (tmp_path / "colors.jsonl").read_text().count("\n") == 8


def test_readme_points_to_the_walk_through() -> None:
    text = README.read_text()
    assert "--enable-fine-tuning" in text and "docs/fine-tuning.md" in text
