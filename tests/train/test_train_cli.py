"""`adapterkit train`: --set parsing, errors naming the closest field, an end-to-end run + resume."""
from __future__ import annotations

import argparse
import json

import pytest

import adapterkit as ak
from adapterkit.errors import ConfigError, DataError
from adapterkit.train.cli import add_train_parser, parse_sets, parse_value, run_train


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="adapterkit")
    add_train_parser(p.add_subparsers(dest="command", required=True))
    return p


@pytest.mark.parametrize("text,value", [
    ("8", 8), ("-3", -3), ("0.1", 0.1), ("1e-4", 1e-4), ("true", True), ("False", False), ("none", None),
    ("q_proj,v_proj", ["q_proj", "v_proj"]), ("1,2", [1, 2]), ("gaussian", "gaussian"), (".*proj", ".*proj"),
])
def test_parse_value(text, value):
    assert parse_value(text) == value


def test_parse_sets():
    got = parse_sets("lora", ["r=4", "alpha=8", "targets=q_proj,v_proj", "use-rslora=true", "dropout=0.1"])
    assert got == {"r": 4, "alpha": 8, "targets": ["q_proj", "v_proj"], "use_rslora": True, "dropout": 0.1}
    assert parse_sets("lora", ["targets=q_proj"])["targets"] == ["q_proj"]  # one name -> a list
    assert parse_sets("lora", ["targets=.*(q|v)_proj"])["targets"] == ".*(q|v)_proj"  # a regex stays a string
    ak.make_config("lora", **got)  # the parsed values are accepted by the config
    with pytest.raises(ConfigError, match="has no field 'rank'.*Closest: 'r'"):
        parse_sets("lora", ["rank=4"])
    with pytest.raises(ConfigError, match="has no field 'alpah'.*'alpha'"):
        parse_sets("lora", ["alpah=4"])
    with pytest.raises(ConfigError, match="key=value"):
        parse_sets("lora", ["r"])
    with pytest.raises(ConfigError, match="unknown adapter method 'lorra'"):
        parse_sets("lorra", [])


def write_jsonl(path, recs):
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


def test_cli_end_to_end_and_resume(tmp_path, qa, chat, capsys):
    data = write_jsonl(tmp_path / "train.jsonl", qa + chat)
    ev = write_jsonl(tmp_path / "eval.jsonl", qa[:4])
    out = tmp_path / "run"
    argv = ["train", "--method", "lora", "--data", str(data), "--eval-data", str(ev), "--out", str(out), "--model", "tiny",
            "--set", "r=4", "--set", "targets=q_proj,v_proj", "--steps", "4", "--lr", "5e-3", "--batch-size", "4",
            "--save-every", "2", "--log-every", "1", "--no-progress"]
    args = parser().parse_args(argv)
    assert args.fn is run_train
    assert run_train(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["steps"] == 4 and summary["eval_loss"] is not None
    saved = ak.formats.read_adapter(out / "adapter")
    assert saved.method == "lora" and saved.config["r"] == 4
    assert {k.rsplit(".", 2)[-2] for k in saved.tensors} == {"q_proj", "v_proj"}
    # resume of a finished run: nothing to do, the same adapter is written again
    assert run_train(parser().parse_args(argv + ["--resume"])) == 0
    summary2 = json.loads(capsys.readouterr().out)
    assert summary2["resumed_from"].endswith("step-000004") and summary2["steps"] == 4
    with pytest.raises(ConfigError, match="Closest: 'r'"):
        run_train(parser().parse_args(argv[:-1] + ["--set", "rnk=3"]))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: missing the key 'completion'"):
        run_train(parser().parse_args(["train", "--method", "lora", "--data", str(bad), "--out", str(tmp_path / "x"),
                                       "--model", "tiny"]))


def test_hooked_into_adapterkit_cli(tmp_path, capsys):
    from adapterkit.cli import main

    bad = tmp_path / "bad.jsonl"
    bad.write_text("{oops\n")
    rc = main(["train", "--method", "lora", "--data", str(bad), "--out", str(tmp_path / "x"), "--model", "tiny"])
    assert rc == 2
    assert "bad.jsonl:1: invalid JSON" in capsys.readouterr().err
