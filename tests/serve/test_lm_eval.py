"""lm-eval against the REAL server (issue 13 b): `lm_eval` runs as a subprocess on a local task
(``dataset_path: json`` with a local ``data_files``, nothing from a hub) twice, once with
``--model local-completions`` pointed at ``adapterkit serve`` with an adapter, once with lm-eval's
own ``hf`` model loading the same adapter in PEFT format (``peft=``, the real `peft` package).
Every per-example log-likelihood agrees within 1e-3 (fp32 both sides).

The model is the tests' tiny random Llama with the char-level tokenizer, saved as a HF directory
(lm-eval's ``tokenizer=`` and ``pretrained=`` read it). Offline: HF_HUB_OFFLINE, HF_DATASETS_OFFLINE.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("lm_eval")
pytest.importorskip("tenacity")  # lm-eval[api]: local-completions needs it
pytest.importorskip("peft")

from test_server_utils import char_tokenizer, save_lora, serve_cli, tiny_llama  # noqa: E402

pytestmark = pytest.mark.slow  # two lm_eval processes: ~30-60 s on 2 CPU cores

TASK = "adapterkit_local_mc"
DOCS = [  # multiple_choice: lm-eval scores " " + each choice after the question
    {"question": "Colour of the sky?", "choices": ["blue", "green", "red"], "label": 0},
    {"question": "2 + 2 =", "choices": ["4", "5", "22"], "label": 0},
    {"question": "Opposite of hot:", "choices": ["warm", "cold"], "label": 1},
    {"question": "First letter:", "choices": ["a", "z", "m", "q"], "label": 0},
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path, Path, str]]:
    """(model dir, PEFT adapter dir, task dir, server base URL) with the server running."""
    tmp = tmp_path_factory.mktemp("lmeval")
    model_dir, adapter = tmp / "model", tmp / "adapters" / "ada"
    model = tiny_llama()
    model.save_pretrained(model_dir)
    char_tokenizer().save_pretrained(model_dir)
    save_lora(model, adapter, r=4, seed=11, fmt="peft")
    task_dir = tmp / "tasks"
    task_dir.mkdir()
    data = task_dir / "data.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    (task_dir / f"{TASK}.yaml").write_text(
        f"task: {TASK}\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        "doc_to_text: '{{question}}'\n"
        "doc_to_choice: '{{choices}}'\n"
        "doc_to_target: '{{label}}'\n"
        "metric_list:\n  - metric: acc\n")
    with serve_cli("--model", str(model_dir), "--adapter", f"ada={adapter}", "--max-model-len", "256") as (_, st):
        yield model_dir, adapter, task_dir, f"http://127.0.0.1:{st.port}"


def run_lm_eval(model: str, model_args: str, task_dir: Path, out: Path) -> dict[tuple[int, int], float]:
    """Run lm_eval; return {(doc id, choice index): log-likelihood} from its logged samples."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "OPENAI_API_KEY": "unused"}
    cmd = [sys.executable, "-m", "lm_eval", "--model", model, "--model_args", model_args, "--tasks", TASK,
           "--include_path", str(task_dir), "--batch_size", "1", "--device", "cpu", "--log_samples",
           "--output_path", str(out)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"lm_eval failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}"
    files = sorted(out.rglob(f"samples_{TASK}_*.jsonl"))
    assert files, f"no samples file under {out}: {list(out.rglob('*'))}"
    got: dict[tuple[int, int], float] = {}
    for line in files[-1].read_text().splitlines():
        s = json.loads(line)
        for i, resp in enumerate(s["resps"]):
            got[(s["doc_id"], i)] = float(resp[0][0])
    return got


def test_lm_eval_scores_agree_with_hf_peft(setup: tuple[Path, Path, Path, str], tmp_path: Path,
                                          record_property: Any) -> None:
    model_dir, adapter, task_dir, url = setup
    served = run_lm_eval(
        "local-completions",
        f"base_url={url}/v1/completions,model=ada,tokenizer={model_dir},tokenizer_backend=huggingface,"
        "num_concurrent=1,max_retries=1,max_length=256",
        task_dir, tmp_path / "served")
    hf = run_lm_eval("hf", f"pretrained={model_dir},peft={adapter},dtype=float32", task_dir, tmp_path / "hf")
    n_choices = sum(len(d["choices"]) for d in DOCS)
    assert len(served) == len(hf) == n_choices
    assert served.keys() == hf.keys()
    worst = max(abs(served[k] - hf[k]) for k in hf)
    print(f"\n{len(hf)} log-likelihoods; max |served - hf+peft| = {worst:.2e}; e.g. {served[(0, 0)]:.6f} vs "
          f"{hf[(0, 0)]:.6f}")
    record_property("max_abs_diff", worst)
    assert worst < 1e-3, {k: (served[k], hf[k]) for k in hf}
    # the adapter mattered: the base model's scores differ (else the agreement proves little)
    base = run_lm_eval("hf", f"pretrained={model_dir},dtype=float32", task_dir, tmp_path / "base")
    assert max(abs(base[k] - hf[k]) for k in hf) > 1e-3
