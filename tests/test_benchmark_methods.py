"""benchmarks/methods.py (every method on one task): its core on a tiny model, 2 steps."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

import adapterkit as ak

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "methods.py"


@pytest.fixture(autouse=True)
def one_thread():
    # the benchmark's CLI sets torch's thread count; restore it for the rest of the session
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: one thread avoids oversubscription on a busy machine
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_methods", _PATH)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_methods"] = mod  # dataclasses resolve their module by name
    spec.loader.exec_module(mod)
    return mod


def test_three_methods_two_steps(bench):
    torch.manual_seed(0)
    base, tok = bench.build_base(hidden=32, layers=1)
    rows = bench.run_benchmark(base, tok, ["paca", "ia3", "lora"], steps=2, batch_size=4, r=4, n_train=16,
                               n_eval=4, accuracy_eval=True, log=lambda s: None)
    by = {r.method: r for r in rows}
    assert [r.method for r in rows] == ["(base)", "lora", "paca", "ia3", "paca r=8"]  # lora first: the reference
    # LoRA's closed form: r (in + out) per targeted Linear; PaCA: r * out; (IA)^3: k, v outputs + down input
    lin = {n: m for n, m in base.named_modules() if isinstance(m, torch.nn.Linear)}
    want_lora = sum(4 * (m.in_features + m.out_features) for n, m in lin.items() if n.endswith(bench.TARGETS))
    want_paca = sum(4 * m.out_features for n, m in lin.items() if n.endswith(bench.TARGETS))
    assert by["lora"].trainable == want_lora
    assert by["paca"].trainable == want_paca
    for name in ("lora", "paca", "ia3"):
        r = by[name]
        assert r.step_s > 0 and r.act_bytes > 0 and r.mem_bytes > r.act_bytes
        assert r.eval_loss > 0 and 0.0 <= r.acc <= 1.0
        assert r.mergeable is True
    table = bench.format_table(rows)
    lines = table.splitlines()
    assert len(lines) == 2 + len(rows)
    lora_line = next(line for line in lines if line.startswith("| lora |"))
    assert "| 1.00x | 1.00x |" in lora_line
    for line in lines[2:]:
        for cell in line.split("|"):
            if cell.strip().endswith("x") and cell.strip()[:-1].replace(".", "").isdigit():
                assert float(cell.strip()[:-1]) > 0
    assert "PaCA vs LoRA" in bench.paca_note(rows)


def test_activation_bytes_counts_only_what_backward_needs(bench):
    base, tok = bench.build_base(hidden=32, layers=1)
    batch = bench.make_batches(bench.training_records(ak.tasks.make_splits("dates", 8, 1)[0], tok), tok, 2, 1, 0)[0]
    for p in base.parameters():
        p.requires_grad_(False)
    assert bench.activation_bytes(base, batch) == 0  # nothing trains: autograd saves nothing
    ak.add_adapter(base, "a", ak.LoRAConfig(r=4, targets=["q_proj"]))
    assert bench.activation_bytes(base, batch) > 0


def test_unknown_method_is_a_config_error(bench):
    base, tok = bench.build_base(hidden=32, layers=1)
    with pytest.raises(ak.errors.ConfigError, match="lora"):
        bench.run_benchmark(base, tok, ["loraa"], steps=1, log=lambda s: None)


def test_cli(bench, capsys):
    rc = bench.main(["--methods", "lora,ssf", "--steps", "2", "--hidden", "32", "--layers", "1", "--batch-size", "2",
                     "--pretrain-steps", "0", "--no-accuracy", "--n-eval", "4", "--threads", "1"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "| ssf |" in out and "| lora |" in out


def test_a_broken_method_gets_a_failed_row_and_the_others_still_run(bench, monkeypatch):
    def broken(ctx):
        raise RuntimeError("boom")

    real = bench.setups
    monkeypatch.setattr(bench, "setups", lambda r=8: {**real(r), "ia3": bench.Setup(broken)})
    base, tok = bench.build_base(hidden=32, layers=1)
    rows = bench.run_benchmark(base, tok, ["ia3", "fusion"], steps=1, batch_size=2, n_train=8, n_eval=2,
                               accuracy_eval=False, log=lambda s: None)
    by = {r.method: r for r in rows}
    assert "FAILED" in by["ia3"].note and "boom" in by["ia3"].note and by["ia3"].step_s is None
    assert by["fusion"].trainable is None and "compose" in by["fusion"].note  # no single-task row
    assert by["lora"].step_s > 0
