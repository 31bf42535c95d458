"""benchmarks/roofline.py: the cost model against a hand count, and a run on tiny sizes."""
from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest

_DIR = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(_DIR))  # roofline imports decode_step beside it
_spec = importlib.util.spec_from_file_location("roofline", _DIR / "roofline.py")
roofline = importlib.util.module_from_spec(_spec)
sys.modules["roofline"] = roofline  # dataclasses resolve their module by name
_spec.loader.exec_module(roofline)

# 1 layer, hidden 8, MLP 16, 2 heads of 4, 1 KV head, vocab 10
S = roofline.Shapes(layers=1, hidden=8, inter=16, heads=2, kv_heads=1, vocab=10)


def test_base_step_counts_weights_flops_and_kv_by_hand():
    # q 8x8 + k 8x4 + v 8x4 + o 8x8 = 192; MLP 3*8*16 = 384; LM head 10*8 = 80
    assert S.linear_params() == 192 + 384 + 80
    flops, nbytes = roofline.step_cost(S, tokens=3, ctx=5, ranks=[], elem=2)
    # linears 2*3*656; attention QK^T + PV: 2 * 2 * 3 tokens * 5 ctx * 2 heads * 4 dims
    assert flops == 2 * 3 * 656 + 2 * 2 * 3 * 5 * 2 * 4
    # weights 656 * 2 bytes; K and V: 2 * 3 * 5 * 1 kv head * 4 dims * 2 bytes
    assert nbytes == 656 * 2 + 2 * 3 * 5 * 4 * 2


def test_each_distinct_adapter_adds_its_weights_once():
    base_f, base_b = roofline.step_cost(S, tokens=4, ctx=1, ranks=[], elem=4)
    one_f, one_b = roofline.step_cost(S, tokens=4, ctx=1, ranks=[2], elem=4)
    two_f, two_b = roofline.step_cost(S, tokens=4, ctx=1, ranks=[2, 2], elem=4)
    # A (r x in) + B (out x r) over q,k,v,o: r * ((8+8) + (8+4) + (8+4) + (8+8)) = 2 * 56
    assert one_b - base_b == 2 * 56 * 4
    assert two_b - base_b == 2 * (2 * 56 * 4)
    # FLOPs depend on the tokens' (mean) rank, not on how many distinct adapters there are
    assert one_f - base_f == 2 * 4 * 2 * 56
    assert two_f == one_f


def test_peaks_are_positive_and_finite():
    import torch

    peaks = roofline.matmul_peak(torch.float32, 64, 2)
    assert "torch.mm" in peaks and all(0 < v < 1e15 for v in peaks.values())
    bw = roofline.bandwidth(1 << 20, 2)
    assert set(bw) == {"copy", "sum"} and all(0 < v < 1e14 for v in bw.values())


def test_small_run_prints_every_case_with_a_ratio(capsys):
    roofline.main(["--small", "--dtype", "float32"])
    out = capsys.readouterr().out
    assert re.search(r"matmul peak float32: [\d.]+ GFLOP/s", out)
    rows = [ln for ln in out.splitlines() if ln.strip().startswith("float32 ")]
    assert [r.split()[1:3] for r in rows] == [["B=1", "base"], ["B=4", "base"], ["B=4", "4x"], ["B=4", "2x"]]
    for r in rows:
        cols = r.split()  # ... floor bound step ratio GFLOP/s (the case label has 1 or 2 words)
        floor, step, ratio = float(cols[-5]), float(cols[-3]), float(cols[-2].rstrip("x"))
        assert floor > 0 and step > 0
        assert ratio == pytest.approx(step / floor, rel=0.02, abs=0.01)
