"""Full fine-tuning (adapterkit.train.full, `adapterkit train --method full`): every weight
moves, the loss falls, resume equals the straight run, the saved directory reloads (and serves
as an eval/engine base) with the same logits, and bad combinations fail clearly."""
from __future__ import annotations

import argparse
import json

import pytest
import torch

import adapterkit as ak
from adapterkit.errors import CheckpointError, ConfigError
from adapterkit.models import load_model
from adapterkit.train import TrainConfig
from adapterkit.train.cli import add_train_parser, run_train
from adapterkit.train.full import MODEL_DIR, train_full
from adapterkit.train.toy import toy_llama


def config(out, **kw) -> TrainConfig:
    base = dict(out_dir=out, lr=3e-3, steps=6, batch_size=4, save_every=3, log_every=1, progress=False, seed=3)
    base.update(kw)
    return TrainConfig(**base)


def weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_every_weight_moves_and_loss_falls(tmp_path, tok, qa):
    model = toy_llama(seed=0).requires_grad_(False)  # frozen, as load_model returns it
    before = weights(model)
    res = train_full(model, qa, config=config(tmp_path / "run", steps=12, save_every=0), tokenizer=tok)
    losses = [l for _, l in res.train.losses]
    assert losses[-1] < 0.7 * losses[0], losses
    after = weights(model)
    unchanged = [n for n in before if torch.equal(before[n], after[n])]
    assert unchanged == []  # embeddings, norms, every projection
    assert res.trainable == sum(p.numel() for p in model.parameters())
    assert not any(p.requires_grad for p in model.parameters())  # frozen again afterwards
    assert (res.model_dir / "model.safetensors").is_file()


def test_resume_equals_uninterrupted(tmp_path, tok, qa):
    straight = toy_llama(seed=1)
    train_full(straight, qa, config=config(tmp_path / "a"), tokenizer=tok)

    class Killed(Exception):
        pass

    first = toy_llama(seed=1)
    cfg = config(tmp_path / "b")
    calls = {"n": 0}

    def kill_after_checkpoint(model):  # a loss term that raises in step 4: after step-3's checkpoint
        calls["n"] += 1
        if calls["n"] == 4:
            raise Killed
        return torch.zeros(())

    from adapterkit.train import Trainer
    from adapterkit.train.full import all_trainable

    with all_trainable(first), pytest.raises(Killed):
        Trainer(first, qa, config=cfg, tokenizer=tok, loss_terms=[kill_after_checkpoint]).train()
    assert [p.name for p in (tmp_path / "b" / "checkpoints").iterdir()] == ["step-000003"]
    resumed = toy_llama(seed=99)  # other weights: everything must come from the checkpoint
    res = train_full(resumed, qa, config=cfg, tokenizer=tok, resume=True)
    assert res.train.resumed_from.name == "step-000003"
    a, b = weights(straight), weights(resumed)
    worst = max(float((a[n] - b[n]).abs().max()) for n in a)
    assert worst <= 1e-6, worst


def test_saved_model_reloads_with_same_logits_and_serves_as_eval_base(tmp_path, tok, qa):
    model = toy_llama(seed=2)
    res = train_full(model, qa, config=config(tmp_path / "run", save_every=0), tokenizer=tok)
    assert res.model_dir == tmp_path / "run" / MODEL_DIR
    loaded, loaded_tok = load_model(res.model_dir)
    ids = torch.tensor([tok("Q3: what is 3 + 3?")["input_ids"]])
    with torch.no_grad():
        want, got = model(input_ids=ids).logits, loaded(input_ids=ids).logits
    assert torch.allclose(want, got, atol=1e-6, rtol=0)
    assert loaded_tok("abc")["input_ids"] == tok("abc")["input_ids"]

    # the engine loads it as a base: adapterkit.eval scores a task with it
    import adapterkit.eval as ev

    task = tmp_path / "mc.jsonl"
    task.write_text("".join(json.dumps({"prompt": f"Q{i}", "choices": [" 1", " 22"], "answer": i % 2}) + "\n" for i in range(3)))
    out = ev.evaluate(loaded, loaded_tok, [str(task)], progress=False)
    lls = out.logliks["base"]["mc"]
    assert len(lls) == 3 and all(len(x) == 2 and all(v < 0 for v in x) for x in lls)


def test_bad_combinations_fail_clearly(tmp_path, tok, qa):
    model = toy_llama(seed=0)
    ak.add_adapter(model, "x", ak.LoRAConfig(r=2, targets=["q_proj"]))
    with pytest.raises(ConfigError, match=r"adapters \['x'\] are attached"):
        train_full(model, qa, config=config(tmp_path / "a"), tokenizer=tok)
    with pytest.raises(ConfigError, match="fsdp"):
        train_full(toy_llama(), qa, config=config(tmp_path / "b", fsdp=True), tokenizer=tok)
    with pytest.raises(ConfigError, match="TrainConfig"):
        train_full(toy_llama(), qa, config={"lr": 1e-3}, tokenizer=tok)
    # a finished run is not silently overwritten
    train_full(toy_llama(), qa, config=config(tmp_path / "c"), tokenizer=tok)
    with pytest.raises(CheckpointError, match="already holds checkpoints"):
        train_full(toy_llama(), qa, config=config(tmp_path / "c"), tokenizer=tok)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="adapterkit")
    add_train_parser(p.add_subparsers(dest="command", required=True))
    return p


def test_cli_method_full(tmp_path, qa, capsys):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in qa))
    base = ["train", "--method", "full", "--data", str(data), "--model", "tiny", "--steps", "4", "--lr", "1e-3",
            "--batch-size", "4", "--save-every", "2", "--no-progress"]
    for extra, msg in ((["--set", "r=8"], "no adapter config; drop --set 'r=8'"),
                       (["--name", "m"], "drop --name 'm'"), (["--fsdp"], "no frozen base")):
        with pytest.raises(ConfigError, match=msg):
            run_train(parser().parse_args(base + ["--out", str(tmp_path / "x")] + extra))
    assert run_train(parser().parse_args(base + ["--out", str(tmp_path / "run")])) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["steps"] == 4 and summary["model"] == str(tmp_path / "run" / "model")
    assert summary["trainable"] == sum(p.numel() for p in toy_llama().parameters())
    assert load_model(summary["model"])[0].config.num_hidden_layers == 2
