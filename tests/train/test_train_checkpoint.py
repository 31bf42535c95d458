"""Checkpoints: resume reproduces the uninterrupted run (and its metrics window); half-written
dirs are ignored; saves are atomic, also on a full disk; keep_last prunes; resume refuses a
different config; metrics + plot."""
from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess

import pytest
import torch

from adapterkit.errors import CheckpointError
from adapterkit.train import TrainConfig, Trainer
from adapterkit.train import checkpoint as ckpt


class Crash(Exception):
    pass


def reg_term(crash_at: int | None = None):
    """A small L2 regularizer that raises on call number ``crash_at`` (simulated kill)."""
    calls = {"n": 0}

    def term(model):
        calls["n"] += 1
        if calls["n"] == crash_at:
            raise Crash(f"killed in step {calls['n']}")
        return 1e-3 * sum((p**2).sum() for p in model.parameters() if p.requires_grad)

    return term


def config(out, **kw) -> TrainConfig:
    base = dict(out_dir=out, lr=1e-2, steps=6, batch_size=3, grad_accum=2, warmup_steps=2, save_every=3,
                log_every=1, progress=False, seed=7, weight_decay=0.01)
    base.update(kw)
    return TrainConfig(**base)


def params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("save_every,ckpts,explicit", [
    (3, ["step-000003"], False),  # the 3 + 3 split, checkpoint on an epoch boundary
    # 16 examples, 3 per micro-batch, 2 micro-batches per step: step 4 ends mid-epoch 1
    (2, ["step-000002", "step-000004"], True),
])
def test_resume_reproduces_uninterrupted_run(tmp_path, make_model, tok, qa, save_every, ckpts, explicit):
    # dropout on: resume must also restore the torch RNG to reproduce the dropout masks
    def dropout_model():
        m = make_model(seed=0)
        for layer in m.model.layers:
            layer.self_attn.attention_dropout = 0.1
        return m

    straight_model = dropout_model()
    straight = Trainer(straight_model, qa, config=config(tmp_path / "a"), tokenizer=tok, loss_terms=[reg_term()]).train()
    assert len({round(l, 6) for _, l in straight.losses}) == 6  # the losses do change step to step

    with pytest.raises(Crash):  # killed inside step 5
        Trainer(dropout_model(), qa, config=config(tmp_path / "b", save_every=save_every), tokenizer=tok,
                loss_terms=[reg_term(crash_at=5)]).train()
    root = tmp_path / "b" / "checkpoints"
    assert [p.name for _, p in ckpt.list_checkpoints(root)] == ckpts
    k = int(ckpts[-1][-6:])
    model = dropout_model()  # a fresh process rebuilds the model from scratch
    resumed = Trainer(model, qa, config=config(tmp_path / "b", save_every=save_every), tokenizer=tok,
                      loss_terms=[reg_term()]).train(resume=root / ckpts[-1] if explicit else True)
    assert resumed.resumed_from.name == ckpts[-1]
    assert [s for s, _ in resumed.losses] == list(range(k + 1, 7))
    assert resumed.losses == straight.losses[k:]  # bit for bit (CPU, deterministic="auto")
    for n, p in params(straight_model).items():
        assert torch.equal(params(model)[n], p), n
    # metrics of the resumed run: each step once (records after the checkpoint rewritten), same values
    recs = [json.loads(l) for l in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2, 3, 4, 5, 6]
    ref = [json.loads(l) for l in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in recs] == [r["loss"] for r in ref]
    assert [r["lr"] for r in recs] == [r["lr"] for r in ref]
    assert [r["tokens"] for r in recs] == [r["tokens"] for r in ref]  # cumulative across the resume


def test_resume_continues_the_metrics_window(tmp_path, make_model, tok, qa):
    # a metrics record every 4 steps, checkpoints every 3: the resumed run's record at step 4
    # must average steps 1-4 (3 of them run before the crash), not step 4 alone
    cfg = dict(steps=8, log_every=4, save_every=3)
    straight = Trainer(make_model(), qa, config=config(tmp_path / "a", **cfg), tokenizer=tok, loss_terms=[reg_term()]).train()
    with pytest.raises(Crash):
        Trainer(make_model(), qa, config=config(tmp_path / "b", **cfg), tokenizer=tok, loss_terms=[reg_term(crash_at=5)]).train()
    state = ckpt.load_checkpoint(tmp_path / "b" / "checkpoints" / "step-000003").state
    assert state["log_window"]["losses"] == [l for _, l in straight.losses[:3]]
    Trainer(make_model(), qa, config=config(tmp_path / "b", **cfg), tokenizer=tok, loss_terms=[reg_term()]).train(resume=True)

    def train_records(run: str) -> list[dict]:
        recs = [json.loads(l) for l in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if k not in ("tokens_per_s", "elapsed_s")} for r in recs]

    assert train_records("b") == train_records("a")
    assert train_records("b")[0]["loss"] == sum(l for _, l in straight.losses[:4]) / 4


def test_resume_with_another_thread_count_warns(tmp_path, make_model, tok, qa, caplog):
    out = tmp_path / "run"
    Trainer(make_model(), qa, config=config(out, steps=2, save_every=2), tokenizer=tok).train()
    n = torch.get_num_threads()
    torch.set_num_threads(n + 1)
    try:
        with caplog.at_level("WARNING", logger="adapterkit.train.trainer"):
            Trainer(make_model(), qa, config=config(out, steps=2, save_every=2), tokenizer=tok).train(resume=True)
    finally:
        torch.set_num_threads(n)
    assert f"written with {n} torch threads, this run has {n + 1}" in caplog.text


def test_incomplete_checkpoints_are_ignored(tmp_path, make_model, tok, qa):
    out = tmp_path / "run"
    Trainer(make_model(), qa, config=config(out, steps=3), tokenizer=tok).train()
    root = out / "checkpoints"
    good = root / "step-000003"
    assert ckpt.is_complete(good)
    # a half-written later checkpoint (no COMPLETE marker) and one whose files were truncated
    shutil.copytree(good, root / "step-000004")
    (root / "step-000004" / ckpt.MARKER).unlink()
    shutil.copytree(good, root / "step-000005")
    with open(root / "step-000005" / "trainable.safetensors", "r+b") as f:
        f.truncate(10)
    assert ckpt.latest_checkpoint(root) == good
    with pytest.raises(CheckpointError, match="incomplete checkpoint"):
        ckpt.load_checkpoint(root / "step-000004")
    res = Trainer(make_model(), qa, config=config(out, steps=3), tokenizer=tok).train(resume=True)
    assert res.resumed_from == good and res.losses == [] and res.steps == 3
    with pytest.raises(CheckpointError, match="incomplete checkpoint"):
        Trainer(make_model(), qa, config=config(out, steps=3), tokenizer=tok).train(resume=root / "step-000004")


def test_save_is_atomic_when_interrupted(tmp_path, monkeypatch):
    root = tmp_path / "checkpoints"
    t = {"w": torch.ones(2, 2)}
    ckpt.save_checkpoint(root, 1, t, {"optimizer": {}, "scheduler": {}}, {"step": 1})
    real_save = torch.save
    calls = {"n": 0}

    def dying_save(obj, f, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:  # optimizer.pt written, rng.pt dies half-way
            raise KeyboardInterrupt
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(root, 2, t, {"optimizer": {}, "scheduler": {}}, {"step": 2})
    monkeypatch.undo()
    assert sorted(p.name for p in root.iterdir()) == ["step-000001"]  # no partial dir, no temp left
    c = ckpt.load_checkpoint(root / "step-000001")
    assert c.step == 1 and torch.equal(c.tensors["w"], t["w"])


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs at ``tmp_path/run/checkpoints`` (needs root or CAP_SYS_ADMIN, else skipped)."""
    mnt = tmp_path / "run" / "checkpoints"
    mnt.mkdir(parents=True)
    try:
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True, text=True)
    except OSError as e:
        pytest.skip(f"cannot run mount: {e}")
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs to fill (needs root / CAP_SYS_ADMIN): {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill_disk_in_step(step: int | None, where):
    """A zero loss term that, in step ``step``, fills the filesystem of ``where`` to the last byte."""
    calls = {"n": 0}

    def term(model):
        calls["n"] += 1
        if calls["n"] == step:
            fd = os.open(where / "filler", os.O_WRONLY | os.O_CREAT)
            try:
                while True:
                    os.write(fd, b"\0" * 65536)
            except OSError as e:
                assert e.errno == errno.ENOSPC
            finally:
                os.close(fd)
        return torch.zeros(())

    return term


def test_full_disk_during_a_checkpoint(tmp_path, small_disk, make_model, tok, qa):
    out, cfg = tmp_path / "run", dict(steps=6, save_every=2, keep_last=2)
    with pytest.raises(CheckpointError) as err:  # the disk fills up in step 3: the step-4 save fails
        Trainer(make_model(), qa, config=config(out, **cfg), tokenizer=tok, loss_terms=[fill_disk_in_step(3, small_disk)]).train()
    msg = str(err.value)
    assert str(small_disk / "step-000004") in msg and "no space left" in msg
    assert "step-000002 is intact" in msg
    # no temp dir left behind; the previous checkpoint is still complete
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler", "step-000002"]
    assert ckpt.latest_checkpoint(small_disk) == small_disk / "step-000002"
    (small_disk / "filler").unlink()  # the user frees space and resumes: the run continues exactly
    resumed = Trainer(make_model(), qa, config=config(out, **cfg), tokenizer=tok, loss_terms=[fill_disk_in_step(None, small_disk)]).train(resume=True)
    straight = Trainer(make_model(), qa, config=config(tmp_path / "straight", **cfg), tokenizer=tok,
                       loss_terms=[fill_disk_in_step(None, small_disk)]).train()
    assert resumed.resumed_from.name == "step-000002"
    assert resumed.losses == straight.losses[2:]


def test_keep_last_and_refusals(tmp_path, make_model, tok, qa):
    out = tmp_path / "run"
    res = Trainer(make_model(), qa, config=config(out, steps=4, save_every=1, keep_last=2), tokenizer=tok).train()
    assert [p.name for _, p in ckpt.list_checkpoints(out / "checkpoints")] == ["step-000003", "step-000004"]
    assert res.last_checkpoint.name == "step-000004"
    with pytest.raises(CheckpointError, match="already holds checkpoints"):
        Trainer(make_model(), qa, config=config(out, steps=4, save_every=1, keep_last=2), tokenizer=tok).train()
    with pytest.raises(CheckpointError, match="lr: checkpoint 0.01 vs now 0.02"):
        Trainer(make_model(), qa, config=config(out, steps=4, save_every=1, keep_last=2, lr=0.02), tokenizer=tok).train(resume=True)
    with pytest.raises(CheckpointError, match="training data differs"):
        Trainer(make_model(), qa[:-1], config=config(out, steps=4, save_every=1, keep_last=2), tokenizer=tok).train(resume=True)
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        Trainer(make_model(), qa, config=config(tmp_path / "other"), tokenizer=tok).train(resume=tmp_path / "nowhere")
    # resume=True with nothing to resume from starts fresh
    fresh = Trainer(make_model(), qa, config=config(tmp_path / "new", steps=2), tokenizer=tok).train(resume=True)
    assert fresh.resumed_from is None and fresh.steps == 2


def test_metrics_and_plot(tmp_path, make_model, tok, qa):
    out = tmp_path / "run"
    res = Trainer(make_model(), qa, eval_data=qa[:4], config=config(out, steps=5, log_every=2, eval_every=2, save_every=0),
                  tokenizer=tok).train()
    recs = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in recs if "loss" in r]
    evals = [r for r in recs if "eval_loss" in r]
    assert [r["step"] for r in train] == [2, 4, 5]  # every log_every and the last step
    assert [r["step"] for r in evals] == [2, 4, 5]
    for r in train:
        assert {"loss", "lr", "grad_norm", "tokens_per_s", "tokens", "epoch", "elapsed_s"} <= set(r)
        assert r["tokens_per_s"] > 0 and r["grad_norm"] > 0
    # window means: the record at step 4 averages the losses of steps 3 and 4
    assert train[1]["loss"] == pytest.approx((res.losses[2][1] + res.losses[3][1]) / 2, rel=1e-9)
    assert evals[-1]["eval_loss"] == pytest.approx(res.eval_loss)
    png = (out / "loss.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    import matplotlib.image

    img = matplotlib.image.imread(out / "loss.png")
    assert img.shape[0] > 100 and img.shape[1] > 100
    assert not (out / "checkpoints").exists() or not ckpt.list_checkpoints(out / "checkpoints")


def test_concurrent_run_into_same_dir_is_refused(tmp_path, make_model, tok, qa):
    out = tmp_path / "run"
    with ckpt.run_lock(out):
        with pytest.raises(CheckpointError, match="another training run is using this dir"):
            Trainer(make_model(), qa, config=config(out, steps=1), tokenizer=tok).train()
    assert Trainer(make_model(), qa, config=config(out, steps=1), tokenizer=tok).train().steps == 1  # lock released
