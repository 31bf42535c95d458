"""TrainConfig validation and the lr schedules (closed forms, and what the Trainer applies)."""
from __future__ import annotations

import json
import math

import pytest

from adapterkit.errors import ConfigError
from adapterkit.train import TrainConfig, Trainer, lr_factor


def closed_form(step: int, total: int, warmup: int, schedule: str) -> float:
    """Independent restatement of the documented schedule for 0-based step ``step``."""
    if step < warmup:
        return (step + 1) / warmup
    p = (step - warmup) / (total - warmup)
    return {"cosine": (1 + math.cos(math.pi * p)) / 2, "linear": 1 - p, "constant": 1.0}[schedule]


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
@pytest.mark.parametrize("warmup", [0, 3])
def test_lr_factor_closed_form(schedule, warmup):
    total = 11
    for s in range(total):
        assert lr_factor(s, total, warmup, schedule) == pytest.approx(closed_form(s, total, warmup, schedule), abs=1e-12)
    assert lr_factor(0, total, 0, "cosine") == 1.0  # no warmup: the first step uses the peak lr
    if warmup:
        assert lr_factor(warmup - 1, total, warmup, schedule) == 1.0


@pytest.mark.parametrize("schedule,warmup_kw", [("cosine", {"warmup_steps": 2}), ("linear", {"warmup_ratio": 0.25}),
                                                ("constant", {})])
def test_trainer_applies_schedule(tmp_path, make_model, tok, qa, schedule, warmup_kw):
    cfg = TrainConfig(out_dir=tmp_path, lr=0.01, steps=8, batch_size=4, schedule=schedule, log_every=1,
                      progress=False, **warmup_kw)
    Trainer(make_model(), qa, config=cfg, tokenizer=tok).train()
    recs = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    lrs = [r["lr"] for r in recs if "lr" in r]
    warmup = cfg.resolved_warmup(8)
    assert warmup == (2 if "warmup_steps" in warmup_kw else 2 if warmup_kw else 0)
    assert lrs == pytest.approx([0.01 * closed_form(s, 8, warmup, schedule) for s in range(8)], rel=1e-9)


@pytest.mark.parametrize("kw,field", [
    ({"lr": 0}, "lr"), ({"lr": float("nan")}, "lr"), ({"steps": 0}, "steps"), ({"epochs": -1}, "epochs"),
    ({"batch_size": 0}, "batch_size"), ({"grad_accum": 1.5}, "grad_accum"), ({"warmup_ratio": 1.0}, "warmup_ratio"),
    ({"schedule": "cosin"}, "schedule"), ({"weight_decay": -0.1}, "weight_decay"), ({"max_grad_norm": -1}, "max_grad_norm"),
    ({"bf16": "yes"}, "bf16"), ({"max_length": 1}, "max_length"), ({"save_every": -1}, "save_every"),
    ({"log_every": 0}, "log_every"), ({"steps": True}, "steps"),
    ({"deterministic": "yes"}, "deterministic"), ({"deterministic": 1}, "deterministic"),
])
def test_config_validation_names_field(kw, field):
    with pytest.raises(ConfigError, match=f"TrainConfig.{field}"):
        TrainConfig(**kw)


def test_config_exclusive_fields_and_total_steps():
    with pytest.raises(ConfigError, match="steps or epochs, not both"):
        TrainConfig(steps=3, epochs=1)
    with pytest.raises(ConfigError, match="warmup_steps or warmup_ratio"):
        TrainConfig(warmup_steps=3, warmup_ratio=0.1)
    assert TrainConfig(steps=7).total_steps(1000) == 7
    assert TrainConfig(batch_size=4).total_steps(10) == 3  # default: one epoch, last batch partial
    assert TrainConfig(batch_size=4, grad_accum=2, epochs=2).total_steps(10) == 3  # ceil(2 * 3 / 2)
    assert TrainConfig(batch_size=4, epochs=0.5).total_steps(16) == 2


def test_deterministic_mode_is_scoped_to_training(tmp_path, make_model, tok, qa):
    """deterministic=True turns torch's mode on while training and restores the caller's after."""
    import torch

    from adapterkit.train import Trainer
    from adapterkit.train.repro import resolve_deterministic

    seen = []

    def probe(model):  # a zero loss term that records the mode inside the training loop
        seen.append(torch.are_deterministic_algorithms_enabled())
        return torch.zeros(())

    assert not torch.are_deterministic_algorithms_enabled()
    for det, inside in ((True, True), (False, False), ("auto", True)):  # auto: on for CPU
        seen.clear()
        Trainer(make_model(), qa, config=TrainConfig(out_dir=tmp_path / str(det), steps=1, progress=False, deterministic=det),
                tokenizer=tok, loss_terms=[probe]).train()
        assert seen == [inside]
        assert not torch.are_deterministic_algorithms_enabled()
    assert resolve_deterministic("auto", torch.device("cuda")) is False
