"""benchmarks/coserve.py at smoke size (random toy model): every row it reports is printed, the
with/alone ratios are those of the printed figures, and the knobs reach the engine."""
from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest

_DIR = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(_DIR))  # coserve imports trace.py and decode_step.py beside it
_stdlib_trace = sys.modules.pop("trace", None)  # benchmarks/trace.py, not the stdlib module
try:
    _spec = importlib.util.spec_from_file_location("coserve_bench", _DIR / "coserve.py")
    coserve = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(coserve)
finally:
    if _stdlib_trace is not None:
        sys.modules["trace"] = _stdlib_trace


def test_tiny_run_prints_every_row(capsys: pytest.CaptureFixture[str]) -> None:
    coserve.main(["--tiny", "--requests", "6", "--adapters", "8", "--idle-seconds", "1", "--trainer-steps", "2",
                  "--ft-time-share", "0.3", "--ft-token-share", "0.5"])
    out = capsys.readouterr().out
    assert "ft_token_share 0.5, ft_time_share 0.3" in out
    assert re.search(r"saturation: [\d.]+ req/s", out)
    for load in (50, 90):
        alone = re.search(rf"{load}% load, inference alone : +([\d.]+) tok/s", out)
        co = re.search(rf"{load}% load, with the job +: +([\d.]+) tok/s", out)
        assert alone and co, out
        ratio = re.search(r"ratios with/alone: tok/s ([\d.]+)x", out[co.end():])
        assert float(ratio.group(1)) == pytest.approx(float(co.group(1)) / float(alone.group(1)), abs=0.011)
        job = re.search(rf"job under {load}% load: ([\d.]+) tok/s", out)
        assert job and float(job.group(1)) > 0  # the job trained while the trace ran
    idle = re.search(r"job on the idle engine: ([\d.]+) trained tok/s; standalone Trainer: ([\d.]+) tok/s", out)
    assert idle and float(idle.group(1)) > 0 and float(idle.group(2)) > 0
    assert re.search(r"first token for the new model \d+ ms after the job reported success", out)
    assert re.search(r"activation memory: \d+ KiB/token for the Trainer's batch of 4", out)
