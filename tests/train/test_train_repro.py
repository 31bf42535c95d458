"""Reproducibility with real processes: two same-seed `adapterkit train` runs are equal bit for
bit, and `kill -9` + `--resume` continues exactly the uninterrupted run (losses, metrics
window, final adapter)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import chat_records, qa_records
from adapterkit.formats import read_adapter
from adapterkit.train import checkpoint as ckpt
from adapterkit.train.metrics import read_metrics

STEPS = 24
pytestmark = pytest.mark.slow  # real processes: ~4 s of imports each, 5 of them
TIMING = {"tokens_per_s", "elapsed_s"}  # wall-clock fields: the only ones allowed to differ


def train_cmd(data: Path, out: Path, *extra: str) -> list[str]:
    # LoRA dropout on and grad_accum 2: the dropout RNG and the data order are both exercised
    return [sys.executable, "-m", "adapterkit.cli", "train", "--method", "lora", "--data", str(data), "--out", str(out),
            "--model", "tiny", "--set", "r=4", "--set", "targets=q_proj,v_proj,o_proj", "--set", "dropout=0.1",
            "--steps", str(STEPS), "--lr", "5e-3", "--batch-size", "3", "--grad-accum", "2", "--warmup-steps", "3",
            "--save-every", "3", "--log-every", "1", "--seed", "3", "--no-progress", *extra]


def spawn(cmd: list[str], hash_seed: int) -> subprocess.Popen:
    # a different PYTHONHASHSEED per process: nothing may depend on set/dict-of-str order
    env = {**os.environ, "PYTHONHASHSEED": str(hash_seed)}
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(p: subprocess.Popen) -> dict:
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-3000:]
    return json.loads(out)


def records(out: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in read_metrics(out / "metrics.jsonl")]


def assert_same_adapter(a: Path, b: Path) -> None:
    ta, tb = read_adapter(a).tensors, read_adapter(b).tensors
    assert sorted(ta) == sorted(tb) and ta
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """Two uninterrupted same-seed CLI runs and a 2-step run with another seed, in parallel processes."""
    d = tmp_path_factory.mktemp("repro")
    data = d / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in qa_records(16) + chat_records(8)))
    procs = [spawn(train_cmd(data, d / f"run{i}"), hash_seed=i + 1) for i in range(2)]
    procs.append(spawn(train_cmd(data, d / "seed4", "--steps", "2", "--seed", "4"), hash_seed=3))  # last flag wins
    for p in procs:
        finish(p)
    return {"dir": d, "data": data, "outs": [d / "run0", d / "run1"], "other_seed": d / "seed4"}


def test_two_same_seed_runs_are_bit_identical(runs):
    a, b = runs["outs"]
    ra, rb = records(a), records(b)
    assert [r["step"] for r in ra] == list(range(1, STEPS + 1))
    assert len({r["loss"] for r in ra}) > STEPS // 2  # the loss does move
    assert ra == rb  # exact: losses, lr, grad norms, token counts
    assert_same_adapter(a / "adapter", b / "adapter")
    ca, cb = (ckpt.load_checkpoint(ckpt.latest_checkpoint(x / "checkpoints")) for x in (a, b))
    assert ca.state["log_window"]["losses"] == cb.state["log_window"]["losses"]
    assert all(torch.equal(ca.tensors[k], cb.tensors[k]) for k in ca.tensors)
    # and not equal merely because the seed is ignored: another seed, another data order and init
    other = records(runs["other_seed"])
    assert [(r["loss"], r["grad_norm"]) for r in other] != [(r["loss"], r["grad_norm"]) for r in ra[:2]]


def test_kill_9_then_resume_equals_uninterrupted_run(runs):
    out = runs["dir"] / "killed"
    cmd = train_cmd(runs["data"], out)
    p = spawn(cmd, hash_seed=7)
    first = out / "checkpoints" / "step-000003" / ckpt.MARKER
    deadline = time.monotonic() + 120
    while not first.exists():  # SIGKILL as soon as the first checkpoint is complete
        assert p.poll() is None, p.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.005)
    p.send_signal(signal.SIGKILL)
    p.communicate()
    assert p.returncode == -signal.SIGKILL
    assert not (out / "adapter").exists()  # really killed mid-run
    done = [r["step"] for r in read_metrics(out / "metrics.jsonl")]
    assert done and done[-1] < STEPS

    summary = finish(spawn(cmd + ["--resume"], hash_seed=8))
    resumed_from = Path(summary["resumed_from"])
    assert ckpt.is_step_dir_name(resumed_from.name) and int(resumed_from.name[5:]) < STEPS
    assert summary["steps"] == STEPS
    ref = runs["outs"][0]
    assert records(out) == records(ref)  # every step once, the same loss, bit for bit
    assert_same_adapter(out / "adapter", ref / "adapter")
