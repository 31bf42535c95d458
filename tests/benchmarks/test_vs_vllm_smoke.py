"""benchmarks/vs_vllm.py without vLLM: its workloads are fixed by the seed and shaped as the
issue asks, and its streaming client measures a REAL adapterkit server (tiny model) right."""
from __future__ import annotations

import argparse
import asyncio
import importlib.util
import sys
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

_TESTS = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(_TESTS / "serve"))
from test_server_utils import API_KEY, serve_tree  # noqa: E402

_spec = importlib.util.spec_from_file_location("vs_vllm", _TESTS.parent / "benchmarks" / "vs_vllm.py")
vs = importlib.util.module_from_spec(_spec)
sys.modules["vs_vllm"] = vs
_spec.loader.exec_module(vs)


def _args(**kw) -> argparse.Namespace:
    d = dict(seed=0, concurrency=48, adapters=100, burst_prompt=16, max_tokens=32, trace_requests=64, rate=2.0,
             zipf=1.0)
    return argparse.Namespace(**{**d, **kw})


def test_workloads_are_seeded_and_shaped_as_asked():
    pool = list(range(500))
    a, b = vs.cases(_args(), pool), vs.cases(_args(), pool)
    assert a == b and vs.cases(_args(seed=1), pool) != a
    assert [m for _, m, _, _ in a["burst-base"]] == ["base"] * 48
    assert len({m for _, m, _, _ in a["burst-distinct"]}) == 48
    trace = a["trace"]
    assert len(trace) == 64 and all(8 <= len(p) <= 64 and 8 <= n <= 64 for _, _, p, n in trace)
    arrivals = [t for t, _, _, _ in trace]
    assert arrivals == sorted(arrivals) and 10 < arrivals[-1] < 70  # Poisson at 2/s: ~32 s
    counts = {}
    for _, m, _, _ in trace:
        counts[m] = counts.get(m, 0) + 1
    assert counts.get("a000", 0) > counts.get("a050", 0)  # power law: the first adapter is popular


def test_client_measures_a_real_server(tmp_path: Path):
    with serve_tree(tmp_path, "--max-loras", "2", "--max-lora-rank", "8", "--max-model-len", "128") as srv:
        reqs = [(0.0, "alpha", [5, 6, 7, 8], 6), (0.1, "beta", [9, 10], 6), (0.0, "alpha", [11, 12, 13], 6)]
        summary, res = asyncio.run(vs.run_case(srv.url, reqs, api_key=API_KEY))
    assert summary.errors == 0, [r.error for r in res]
    assert [r.tokens for r in res] == [6, 6, 6]
    assert all(r.ttft > 0 and r.tpot is not None and r.tpot > 0 for r in res)
    assert summary.tok_s == pytest.approx(18 / summary.extra["wall"])
