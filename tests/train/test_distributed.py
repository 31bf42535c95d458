"""Data-parallel training with real processes on CPU/gloo: `torchrun --nproc_per_node 2` (and
`accelerate launch`) with batch b per rank follows the 1-process run with batch 2b (losses,
eval losses, token counts, adapter), only rank 0 writes and reports, and a checkpoint resumes
under another world size as long as the global batch is kept."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import adapterkit as ak
from conftest import chat_records, qa_records
from adapterkit.errors import CheckpointError, ConfigError
from adapterkit.formats import read_adapter
from adapterkit.train import TrainConfig, Trainer
from adapterkit.train.cli import _device
from adapterkit.train.distributed import DistInfo, env_info
from adapterkit.train.metrics import read_metrics
from adapterkit.train.toy import toy_llama, toy_tokenizer

# the tests on `runs` are slow: 6 real training jobs (5 of them 2-process), ~45 s on 2 loaded cores
STEPS, B = 6, 2
TIMING = {"tokens_per_s", "elapsed_s"}
BIN = Path(sys.executable).parent
# 17 examples, global batch 4: the last batch of each epoch has 1 example, so rank 1 gets none
N_QA, N_CHAT = 11, 6


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_args(d: Path, out: Path, batch: int, *extra: str) -> list[str]:
    # dropout 0: with dropout the ranks draw their own masks, so only the expectation matches
    return ["train", "--method", "lora", "--data", str(d / "train.jsonl"), "--eval-data", str(d / "eval.jsonl"),
            "--out", str(out), "--model", "tiny", "--set", "r=4", "--set", "targets=q_proj,v_proj,o_proj",
            "--steps", str(STEPS), "--lr", "5e-3", "--batch-size", str(batch), "--grad-accum", "2",
            "--warmup-steps", "2", "--save-every", "3", "--keep-last", "5", "--eval-every", "3",
            "--log-every", "1", "--seed", "3", *extra]


def one_process(d: Path, out: Path, batch: int, *extra: str) -> subprocess.Popen:
    return _spawn([sys.executable, "-m", "adapterkit.cli", *train_args(d, out, batch, "--no-progress", *extra)])


def torchrun(d: Path, out: Path, *extra: str) -> subprocess.Popen:
    """2 ranks with batch B each; each rank's stdout/stderr goes to out.logs/<run>/attempt_0/<rank>/."""
    cmd = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()),
           "--log-dir", str(out.with_suffix(".logs")), "--redirects", "3",
           "-m", "adapterkit.cli", *train_args(d, out, B, *extra)]
    return _spawn(cmd)


def accelerate(d: Path, out: Path) -> subprocess.Popen:
    # --multi_gpu, not --cpu: accelerate's --cpu mode starts a single process unless run under
    # mpirun; --multi_gpu goes through torch.distributed.run and works on a CPU-only machine
    cmd = [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
           "-m", "adapterkit.cli", *train_args(d, out, B, "--no-progress")]
    return _spawn(cmd)


def _spawn(cmd: list[str]) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # 2 loaded cores: no oversubscription
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def finish(p: subprocess.Popen) -> str:
    try:
        out, err = p.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)  # the launcher and its ranks: a hung collective never ends
        raise
    assert p.returncode == 0, f"{' '.join(p.args[:6])}...\n{out[-2000:]}\n{err[-4000:]}"
    return out


def rank_logs(out: Path, rank: int) -> tuple[str, str]:
    """(stdout, stderr) of one torchrun rank."""
    (attempt,) = out.with_suffix(".logs").glob("*/attempt_0")
    return (attempt / str(rank) / "stdout.log").read_text(), (attempt / str(rank) / "stderr.log").read_text()


def records(out: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in read_metrics(out / "metrics.jsonl")]


def assert_same_curve(a: Path, b: Path) -> None:
    ra, rb = records(a), records(b)
    assert [r["step"] for r in ra] == [r["step"] for r in rb] and len(ra) == STEPS + 2  # + 2 eval records
    for x, y in zip(ra, rb):
        assert x.keys() == y.keys(), (x, y)
        for k in x:
            if isinstance(x[k], float):
                assert abs(x[k] - y[k]) <= 1e-5, (k, x, y)
            else:
                assert x[k] == y[k], (k, x, y)  # step, tokens


def assert_same_adapter(a: Path, b: Path) -> None:
    ta, tb = read_adapter(a).tensors, read_adapter(b).tensors
    assert sorted(ta) == sorted(tb) and ta
    for k in ta:
        torch.testing.assert_close(ta[k], tb[k], rtol=0, atol=1e-6, msg=k)


# The Python API under torchrun, with FSDP2: the same model, adapter and config as train_args()
FSDP_SCRIPT = """
import json, os, sys
import torch
from torch.distributed.tensor import DTensor
import adapterkit as ak
from adapterkit.train import TrainConfig, Trainer, seed_everything
from adapterkit.train.toy import toy_llama, toy_tokenizer

d, out = sys.argv[1], sys.argv[2]
seed_everything(3)
model = toy_llama()
ak.add_adapter(model, "lora", ak.LoRAConfig(r=4, targets=["q_proj", "v_proj", "o_proj"]))
cfg = TrainConfig(out_dir=out, steps=6, lr=5e-3, batch_size=2, grad_accum=2, warmup_steps=2, save_every=3,
                  keep_last=5, eval_every=3, log_every=1, seed=3, progress=False, fsdp=True)
trainer = Trainer(model, d + "/train.jsonl", eval_data=d + "/eval.jsonl", config=cfg, tokenizer=toy_tokenizer(),
                  adapter_name="lora")
res = trainer.train()
frozen = [p for p in model.parameters() if not p.requires_grad]
report = "REPORT " + json.dumps({
    "rank": trainer.dist.rank, "final_loss": res.final_loss,
    "frozen_dtensors": sum(isinstance(p, DTensor) for p in frozen), "frozen": len(frozen),
    "local": sum((p.to_local() if isinstance(p, DTensor) else p).numel() for p in frozen),
    "full": sum(p.numel() for p in frozen),
    "trainable_dtensors": sum(isinstance(p, DTensor) for p in model.parameters() if p.requires_grad)}) + "\\n"
# both ranks share torchrun's stdout pipe: one write() of a whole line (< PIPE_BUF) is atomic,
# a buffered print may be split and interleave with the other rank's line
sys.stdout.flush()
os.write(1, report.encode())
"""


def fsdp_run(d: Path, out: Path) -> subprocess.Popen:
    (d / "fsdp_train.py").write_text(FSDP_SCRIPT)
    return _spawn([str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()),
                   str(d / "fsdp_train.py"), str(d), str(out)])


def copy_run_until_step3(src: Path, dst: Path) -> None:
    """A run dir as if ``src`` had stopped after its step-3 checkpoint."""
    (dst / "checkpoints").mkdir(parents=True)
    shutil.copytree(src / "checkpoints" / "step-000003", dst / "checkpoints" / "step-000003")
    shutil.copy(src / "metrics.jsonl", dst / "metrics.jsonl")  # records after step 3 are dropped on resume


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("dist")
    (d / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in qa_records(N_QA) + chat_records(N_CHAT)))
    (d / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in qa_records(5)))
    first = {"one": one_process(d, d / "one", 2 * B), "two": torchrun(d, d / "two"),  # progress bar on
             "acc": accelerate(d, d / "acc")}
    outs = {k: finish(p) for k, p in first.items()}
    # resume across world sizes: 2 ranks -> 1 process (batch 2B), 1 process -> 2 ranks
    copy_run_until_step3(d / "two", d / "two_then_one")
    copy_run_until_step3(d / "one", d / "one_then_two")
    second = {"two_then_one": one_process(d, d / "two_then_one", 2 * B, "--resume"),
              "one_then_two": torchrun(d, d / "one_then_two", "--resume", "--no-progress"),
              "fsdp": fsdp_run(d, d / "fsdp")}
    outs.update({k: finish(p) for k, p in second.items()})
    return {"dir": d, "outs": outs}


@pytest.mark.slow
def test_two_ranks_follow_the_one_process_run_with_double_batch(runs):
    d = runs["dir"]
    assert len({r["loss"] for r in records(d / "one") if "loss" in r}) == STEPS  # the loss does move
    assert_same_curve(d / "one", d / "two")  # loss, eval loss, lr, grad norm within 1e-5; tokens equal
    assert_same_adapter(d / "one" / "adapter", d / "two" / "adapter")


@pytest.mark.slow
def test_accelerate_launch_runs_the_same_training(runs):
    d = runs["dir"]
    assert runs["outs"]["acc"].count('"steps"') == 1  # one summary: rank 0's
    assert_same_curve(d / "one", d / "acc")
    assert_same_adapter(d / "one" / "adapter", d / "acc" / "adapter")


@pytest.mark.slow
def test_only_rank0_writes_logs_and_shows_progress(runs):
    d = runs["dir"]
    out0, err0 = rank_logs(d / "two", 0)
    out1, err1 = rank_logs(d / "two", 1)
    assert "on 2 processes" in err0 and "train: 100%" in err0  # the summary line and the tqdm bar
    assert json.loads(out0)["steps"] == STEPS
    assert out1 == "" and err1 == "", (out1, err1)
    steps = [r["step"] for r in read_metrics(d / "two" / "metrics.jsonl") if "loss" in r]
    assert steps == list(range(1, STEPS + 1))  # one record per step, not one per rank
    assert sorted(p.name for p in (d / "two" / "checkpoints").iterdir()) == ["step-000003", "step-000006"]
    state = json.loads((d / "two" / "checkpoints" / "step-000006" / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and state["config"]["batch_size"] == B


@pytest.mark.slow
def test_resume_under_another_world_size_continues_the_run(runs):
    d = runs["dir"]
    assert_same_curve(d / "one", d / "two_then_one")
    assert_same_adapter(d / "one" / "adapter", d / "two_then_one" / "adapter")
    assert_same_curve(d / "one", d / "one_then_two")
    assert_same_adapter(d / "one" / "adapter", d / "one_then_two" / "adapter")


@pytest.mark.slow
def test_fsdp2_shards_the_frozen_base_and_keeps_the_curve(runs):
    d = runs["dir"]
    reports = sorted((json.loads(line[len("REPORT "):]) for line in runs["outs"]["fsdp"].splitlines()
                      if line.startswith("REPORT ")), key=lambda r: r["rank"])
    assert [r["rank"] for r in reports] == [0, 1]
    for r in reports:
        assert r["frozen_dtensors"] == r["frozen"] > 0 and r["trainable_dtensors"] == 0
        assert r["local"] <= r["full"] // 2 + 4096  # each rank holds about half of the base (dim-0 shards)
    assert sum(r["local"] for r in reports) == reports[0]["full"]
    assert_same_curve(d / "one", d / "fsdp")
    assert_same_adapter(d / "one" / "adapter", d / "fsdp" / "adapter")


def _tiny_trainer(out: Path, d: Path, batch: int) -> Trainer:
    torch.manual_seed(3)
    model = toy_llama()
    ak.add_adapter(model, "lora", ak.LoRAConfig(r=4, targets=["q_proj", "v_proj", "o_proj"]))
    cfg = TrainConfig(out_dir=out, steps=STEPS, lr=5e-3, batch_size=batch, grad_accum=2, warmup_steps=2,
                      save_every=3, keep_last=5, eval_every=3, log_every=1, seed=3, progress=False)
    return Trainer(model, d / "train.jsonl", eval_data=d / "eval.jsonl", config=cfg, tokenizer=toy_tokenizer(),
                   adapter_name="lora")


@pytest.mark.slow
def test_resume_with_another_global_batch_is_refused(runs, tmp_path):
    # 2 ranks x 2 = global 4; 1 process x 2 would silently be another run
    copy_run_until_step3(runs["dir"] / "two", tmp_path / "run")
    with pytest.raises(CheckpointError, match=r"global batch \(batch_size x processes\): checkpoint 2 x 2 vs now 2 x 1.*batch_size 4"):
        _tiny_trainer(tmp_path / "run", runs["dir"], B).train(resume=True)


@pytest.mark.slow
def test_rank_slices_partition_the_global_batches(runs, tmp_path):
    """In process: the ranks' micro-batches of each global batch are the 1-process batch of 2B, in order."""
    single = _tiny_trainer(tmp_path / "a", runs["dir"], 2 * B)
    ranks = [_tiny_trainer(tmp_path / "b", runs["dir"], B) for _ in range(2)]
    for r, t in enumerate(ranks):
        t.dist = DistInfo(world_size=2, rank=r, local_rank=r)
    streams = [t._batches(0, 0) for t in [single, *ranks]]
    empty = 0
    for _ in range(12):  # 2.4 epochs of 5 global batches
        (whole, e, pos), *parts = (next(s) for s in streams)
        assert all((pe, pp) == (e, pos) for _, pe, pp in parts)  # one global data position
        ids = [row[m.bool()].tolist() for b in [p for p, _, _ in parts if p is not None]
               for row, m in zip(b["input_ids"], b["attention_mask"])]
        assert ids == [row[m.bool()].tolist() for row, m in zip(whole["input_ids"], whole["attention_mask"])]
        empty += parts[1][0] is None
    assert empty == 2  # the 1-example last batch of epochs 0 and 1 leaves rank 1 idle


def test_env_info_reads_the_launcher_environment(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    info = env_info()
    assert (info.world_size, info.rank, info.local_rank, info.enabled, info.is_main) == (4, 3, 1, True, False)
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(ConfigError, match="WORLD_SIZE=4, RANK=4"):
        env_info()
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ConfigError, match="WORLD_SIZE='two' is not an integer"):
        env_info()
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(k)
    assert env_info() == DistInfo() and not DistInfo().enabled


def test_fsdp_flag_is_validated():
    with pytest.raises(ConfigError, match="TrainConfig.fsdp must be True or False"):
        TrainConfig(fsdp="yes")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error of a machine without CUDA")
def test_cuda_device_without_cuda_is_a_clear_error():
    assert _device("cpu") == torch.device("cpu")
    with pytest.raises(ConfigError, match="--device cuda, but torch sees no CUDA device"):
        _device("cuda")
